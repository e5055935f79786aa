"""Healing: perplexity ratio to the source after N tokens of `factorconv finetune`, per target, budget and method.

    python benchmarks/heal_curves.py --model pycode-27M --device cuda \
        [--targets mfa_kr:0.25,mfa:0.25,tpa:0.5] [--tokens 1M,5M,20M] [--methods "attention lr 1e-3" ...] \
        [--convert refine_steps=800 --convert calib_samples=256] [--json OUT.jsonl] [--png OUT.png]
    python benchmarks/heal_curves.py --model stories260K --tokens 1M        # CPU
    python benchmarks/heal_curves.py --model SmolLM2-135M --device cuda --targets mfa_kr:0.25 --tokens 5M \
        --methods "all lr 1e-3" --train chat.npy wiki.first600000.txt      # chat.npy: `factorconv sample --chat`

Every conversion is the default calibrated one unless --convert KEY=VALUE changes a `convert` option. Each (target,
method, token count) is its own run: a fresh copy of the conversion healed for exactly that many tokens with the
library's schedule (warmup 5%, cosine to 10%), so a row is what a user gets who asks for that many tokens, not a
point on a longer run's curve. Healing is KL to the
source, batch 16 × the model's eval window. Data: stories260K on TinyStories text; pycode-27M on the Python source of
the installed packages with `transformers` excluded (its eval domain): every `*.py` under the interpreter's
site-packages, in sorted path order, concatenated up to --corpus-mb (common.python_corpus); SmolLM2-135M-Instruct
(built by ../shared/tools/build_smollm2.py, --smollm2) on the --train files given. Eval: the held-out text of
quality.py (SmolLM2: the last 300,000 bytes of WikiText-2 test, calibration on its first 600,000). Prints a Markdown
table (ratio per token count, seconds per run) and, for the chat model, every run's greedy answers to
chat_check.py's prompts.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from chat_check import PROMPTS, answer
from common import REAL, convert_and_load, machine, measure, python_corpus, text_slice
from quality import SMOLLM2, WIKITEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from factorconv.data import load_tokens
from factorconv.finetune import FinetuneOptions, finetune

MODELS = {
    "stories260K": dict(
        folder=REAL / "stories260K-hf", eval=REAL / "tinystories" / "valid.tok512.npy",
        calib=REAL / "tinystories" / "train.tok512.npy", train=REAL / "tinystories" / "tinystories.txt",
        heal_eval=REAL / "tinystories" / "TinyStories-valid.txt", seq_len=512,
    ),
    "pycode-27M": dict(
        folder=REAL / "pycode-27M-hf", eval=REAL / "pycode-eval" / "heldout.jsonl",
        calib=REAL / "pycode-eval" / "calib.jsonl", train=None, heal_eval=REAL / "pycode-eval" / "heldout.jsonl",
        seq_len=1024,
    ),
    "SmolLM2-135M": dict(
        folder=None, eval=(WIKITEXT, -300_000), calib=(WIKITEXT, 600_000), train=None,
        heal_eval=(WIKITEXT, -300_000), seq_len=512, chat=True,
    ),
}
OWN = "corpus"  # --train's name for the model's own healing data
# Which weights train, at what peak learning rate, with what weight of the layer-wise hidden-state term or of the
# layer-local attention term (each attention block fed the teacher's input to it) and,
# where named, how many blocks of what length per step instead of --batch-size x the model's eval window
# (FinetuneOptions fields; the logit KL has weight 1).
METHODS = {
    "attention lr 1e-3": dict(trainable="attention", lr=1e-3),
    "attention lr 3e-3": dict(trainable="attention", lr=3e-3),
    "attention lr 1e-2": dict(trainable="attention", lr=1e-2),
    "attention lr 2e-2": dict(trainable="attention", lr=2e-2),
    "attention+norms lr 3e-3": dict(trainable="attention+norms", lr=3e-3),
    "attention lr 3e-3 + LoRA-64 MLP": dict(trainable="attention", lr=3e-3, lora_r=64),
    "all lr 3e-4": dict(trainable="all", lr=3e-4),
    "all lr 1e-3": dict(trainable="all", lr=1e-3),
    "all lr 3e-3": dict(trainable="all", lr=3e-3),
    "all lr 1e-2": dict(trainable="all", lr=1e-2),
    "all lr 1e-3 + hidden 1": dict(trainable="all", lr=1e-3, hidden_weight=1.0),
    "all lr 1e-3 + hidden 10": dict(trainable="all", lr=1e-3, hidden_weight=10.0),
    "all lr 1e-3 + attention 1": dict(trainable="all", lr=1e-3, attention_weight=1.0),
    "all lr 3e-3 + attention 1": dict(trainable="all", lr=3e-3, attention_weight=1.0),
    "attention lr 3e-3 + attention 1": dict(trainable="attention", lr=3e-3, attention_weight=1.0),
    "attention lr 2e-2 + attention 0.3": dict(trainable="attention", lr=2e-2, attention_weight=0.3),
    "attention lr 2e-2 + attention 1": dict(trainable="attention", lr=2e-2, attention_weight=1.0),
    "attention lr 2e-2 + attention 3": dict(trainable="attention", lr=2e-2, attention_weight=3.0),
    "attention lr 2e-2 + attention 10": dict(trainable="attention", lr=2e-2, attention_weight=10.0),
    "all lr 1e-3, batch 8": dict(trainable="all", lr=1e-3, batch_size=8),
    "all lr 1e-3, batch 4": dict(trainable="all", lr=1e-3, batch_size=4),
    "all lr 5e-4, batch 4": dict(trainable="all", lr=5e-4, batch_size=4),
    "all lr 5e-4, batch 2": dict(trainable="all", lr=5e-4, batch_size=2),
    "all, attention lr 3e-3, rest 1e-3": dict(trainable="all", lr=3e-3, outside_lr_ratio=1 / 3),
    "all, attention lr 3e-3, rest 3e-4": dict(trainable="all", lr=3e-3, outside_lr_ratio=0.1),
    "all, attention lr 2e-3, rest 5e-4": dict(trainable="all", lr=2e-3, outside_lr_ratio=0.25),
    "all lr 1e-3, T 2": dict(trainable="all", lr=1e-3, temperature=2.0),
    "all lr 1e-3, min lr 0": dict(trainable="all", lr=1e-3, min_lr_ratio=0.0),
    "all lr 1e-3, 8 x 2048": dict(trainable="all", lr=1e-3, batch_size=8, seq_len=2048),
    "all lr 1e-3, 32 x 512": dict(trainable="all", lr=1e-3, batch_size=32, seq_len=512),
}


def count(text: str) -> int:
    """'5M' -> 5_000_000, '500K' -> 500_000, '1000' -> 1000."""
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="stories260K")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--targets", default="mfa_kr:0.25,mfa:0.25,tpa:0.5", help="kind:budget,...")
    parser.add_argument("--tokens", default="5M", help="healing token counts, e.g. 1M,5M,20M")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--corpus-mb", type=float, default=40.0, help="pycode-27M healing corpus size")
    parser.add_argument("--train", type=Path, nargs="+", default=[Path(OWN)],
                        help=f"heal on these files (e.g. `factorconv sample` output); {OWN!r}, the default, is the "
                        "model's own healing data (pycode-27M: the Python corpus), also to mix with files; SmolLM2 "
                        "has none")
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2, help="the folder build_smollm2.py wrote")
    parser.add_argument("--convert", action="append", default=[], metavar="KEY=VALUE",
                        help="a `convert` option for every conversion (repeatable), e.g. refine_steps=800")
    parser.add_argument("--json", type=Path, help="append one JSON line per run here")
    parser.add_argument("--png", type=Path, help="plot ratio against tokens (needs matplotlib)")
    args = parser.parse_args()
    spec = MODELS[args.model]
    spec = spec | {"folder": spec["folder"] or args.smollm2.expanduser()}
    if not (spec["folder"] / "config.json").is_file():
        raise SystemExit(f"{spec['folder']} not found: this benchmark needs ../shared/real beside the checkout "
                         "(and SmolLM2 built by ../shared/tools/build_smollm2.py)")
    if Path(OWN) in args.train and not (spec["train"] or args.model == "pycode-27M"):
        raise SystemExit(f"{args.model} has no healing data of its own: give --train FILE ... "
                         "(e.g. `factorconv sample --chat` output)")
    targets = [(kind, float(budget)) for kind, budget in (t.split(":") for t in args.targets.split(","))]
    convert_options = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.convert)}
    token_counts = [count(t) for t in args.tokens.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    chat = spec.get("chat", False)
    rows, chats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        eval_file, calib, heal_eval = (text_slice(spec[key], root) for key in ("eval", "calib", "heal_eval"))
        tokens = load_tokens(eval_file, tokenizer)
        source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
        base = measure("source", source, tokens, spec["seq_len"], None, 0.0)["ppl"]
        if chat:
            chats["source"] = [answer(source, tokenizer, prompt, 40) for prompt in PROMPTS]
        del source
        train = [(spec["train"] or python_corpus(root, args.corpus_mb)) if path == Path(OWN) else path
                 for path in args.train]
        data_name = " + ".join(path.name for path in train)
        for kind, budget in targets:
            converted = root / f"{kind}-{budget:g}"
            model, convert_s = convert_and_load(spec["folder"], converted, calib=str(calib),
                                                device=args.device, to=kind, kv_budget=budget, **convert_options)
            zero = measure(kind, model, tokens, spec["seq_len"], base, convert_s)["ratio"]
            if chat:
                chats[f"{kind} {budget:.0%} zero-shot"] = [answer(model, tokenizer, p, 40) for p in PROMPTS]
                print(json.dumps({"zero_shot_answers": chats[f"{kind} {budget:.0%} zero-shot"]}), file=sys.stderr)
            del model
            for method in args.methods:
                for n in token_counts:
                    healed = root / "healed"
                    settings = {"batch_size": args.batch_size, "seq_len": spec["seq_len"]} | METHODS[method]
                    start = time.perf_counter()
                    finetune(FinetuneOptions(
                        model=str(converted), output=healed, data=[str(path) for path in train],
                        eval_data=str(heal_eval), tokens=n, device=args.device,
                        overwrite=True, **settings), progress=False)
                    seconds = time.perf_counter() - start
                    model = AutoModelForCausalLM.from_pretrained(healed, dtype=torch.float32).eval().to(args.device)
                    ratio = measure(kind, model, tokens, spec["seq_len"], base, seconds)["ratio"]
                    row = dict(model=args.model, target=kind, budget=budget, method=method, tokens=n, data=data_name,
                               batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                               convert=convert_options, zero_shot=zero, ratio=ratio, heal_s=seconds,
                               convert_s=convert_s)
                    if chat:
                        row["answers"] = [answer(model, tokenizer, prompt, 40) for prompt in PROMPTS]
                        chats[f"{kind} {budget:.0%}, {method}, {n / 1e6:g}M"] = row["answers"]
                    del model
                    shutil.rmtree(healed)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if args.json:
                        with args.json.open("a") as handle:
                            handle.write(json.dumps(row) + "\n")
    conversions = "calibrated conversions with " + ", ".join(args.convert) if args.convert else \
        "default calibrated conversions"
    print(f"\n### {args.model}: eval {eval_file.name} ({tokens.numel():,} tokens, windows of {spec['seq_len']}), "
          f"source perplexity {base:.3f}; {conversions}; healing KL to the source on {data_name}, batch "
          f"{args.batch_size} x {spec['seq_len']} unless the method names one, fp32 weights; {machine()}\n")
    heads = " | ".join(f"{n / 1e6:g}M tokens" for n in token_counts)
    print(f"| target, KV bytes | method | zero-shot | {heads} | heal s (largest) |")
    print("|---|---|---:|" + "---:|" * len(token_counts) + "---:|")
    for kind, budget in targets:
        for method in args.methods:
            runs = {r["tokens"]: r for r in rows if (r["target"], r["budget"], r["method"]) == (kind, budget, method)}
            cells = " | ".join(f"{runs[n]['ratio']:.3f}x" for n in token_counts)
            first = runs[token_counts[0]]
            print(f"| {kind} {budget:.1%} | {method} | {first['zero_shot']:.3f}x | {cells} | "
                  f"{runs[token_counts[-1]]['heal_s']:.0f} |")
    if chats:
        print_chats(chats)
    if args.png:
        plot(rows, base, args.png)


def print_chats(chats: dict[str, list[str]]) -> None:
    """Greedy answers per model to chat_check.py's prompts; the scored check: the first names Paris."""
    print("\n| model | Paris? | " + " | ".join(PROMPTS) + " |")
    print("|---|---|" + "---|" * len(PROMPTS))
    for name, answers in chats.items():
        cells = " | ".join(a.replace("\n", " ").replace("|", "\\|") for a in answers)
        print(f"| {name} | {'yes' if 'paris' in answers[0].lower() else 'NO'} | {cells} |")


def plot(rows: list[dict], base: float, path: Path) -> None:
    """Ratio against healing tokens, one line per target and method (0 tokens: zero-shot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key in dict.fromkeys((r["target"], r["budget"], r["method"]) for r in rows):
        runs = sorted((r for r in rows if (r["target"], r["budget"], r["method"]) == key), key=lambda r: r["tokens"])
        ax.plot([0] + [r["tokens"] for r in runs], [runs[0]["zero_shot"]] + [r["ratio"] for r in runs], marker="o",
                label=f"{key[0]} {key[1]:.0%}, {key[2]}")
    ax.set_xscale("symlog", linthresh=1e6)
    ax.set_xlabel("healing tokens")
    ax.set_ylabel(f"perplexity / source's ({base:.3f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
