"""What fitting a stock serving architecture costs: free MFA-KR / MFA beside `--mla` (DeepSeek-V3) / `--mqa` (Llama
MQA) at the same KV bytes, zero-shot and after the same healing, and the healed model exported and re-measured.

    python benchmarks/serving_heal.py --model stories260K [--steps 400] [--lr 2e-2]            # CPU, minutes
    python benchmarks/serving_heal.py --model pycode-27M --device cuda [--tokens 5000000] [--lr 1e-3]

Every conversion is the default one with calibration (statistics + refinement). Healing is `factorconv finetune`
(KL to the source, attention trainable) with the same settings for every row: stories260K on TinyStories text
(../shared/real/tinystories/tinystories.txt), pycode-27M on the Python source of the installed packages with
`transformers` excluded (its eval domain): every `*.py` file under the interpreter's site-packages, in sorted path
order, concatenated up to --corpus-mb. The constrained rows are exported with `factorconv export`, loaded as stock
`DeepseekV3ForCausalLM` / `LlamaForCausalLM` and measured again (the `exported` column: equal to the healed one).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REAL, convert_and_load, machine, measure, python_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from factorconv.data import load_tokens
from factorconv.export import export
from factorconv.finetune import FinetuneOptions, finetune

MODELS = {
    "stories260K": dict(
        folder=REAL / "stories260K-hf", eval=REAL / "tinystories" / "valid.tok512.npy",
        calib=REAL / "tinystories" / "train.tok512.npy", train=REAL / "tinystories" / "tinystories.txt",
        heal_eval=REAL / "tinystories" / "TinyStories-valid.txt", seq_len=512, budget=0.25,
    ),
    "pycode-27M": dict(
        folder=REAL / "pycode-27M-hf", eval=REAL / "pycode-eval" / "heldout.jsonl",
        calib=REAL / "pycode-eval" / "calib.jsonl", train=None, heal_eval=REAL / "pycode-eval" / "heldout.jsonl",
        seq_len=1024, budget=0.25,
    ),
}


def rows_for(kv_heads: int, budget: float) -> list[tuple[str, dict, str | None]]:
    """(label, conversion options, export format) pairs at the same KV bytes."""
    rows = [
        (f"mfa_kr free, {budget:.1%}", dict(to="mfa_kr", kv_budget=budget), None),
        (f"mfa_kr --mla, {budget:.1%}", dict(to="mfa_kr", kv_budget=budget, mla=True), "deepseek-v3"),
    ]
    mqa = 1 / kv_heads
    rows += [
        (f"mfa free, {mqa:.1%}", dict(to="mfa", kv_budget=mqa), None),
        (f"mfa --mqa, {mqa:.1%}", dict(to="mfa", mqa=True), "llama"),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="stories260K")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, help="MFA-KR's KV budget (default 0.25)")
    parser.add_argument("--steps", type=int, help="healing steps (default: 400 on stories260K)")
    parser.add_argument("--tokens", type=int, help="healing tokens (default 5,000,000 on pycode-27M)")
    parser.add_argument("--lr", type=float, help="default 2e-2 (stories260K), 1e-3 (pycode-27M)")
    parser.add_argument("--batch-size", type=int, help="default 4 (stories260K), 16 (pycode-27M)")
    parser.add_argument("--corpus-mb", type=float, default=40.0, help="pycode-27M healing corpus size")
    args = parser.parse_args()
    spec = MODELS[args.model]
    stories = args.model == "stories260K"
    if not (spec["folder"] / "config.json").is_file():
        raise SystemExit(f"{spec['folder']} not found: this benchmark needs ../shared/real beside the checkout")
    torch.set_num_threads(1 if stories else torch.get_num_threads())
    heal = dict(
        lr=args.lr or (2e-2 if stories else 1e-3),
        batch_size=args.batch_size or (4 if stories else 16),
        seq_len=spec["seq_len"],
        trainable="attention",
        device=args.device,
        overwrite=True,
    )
    if stories or args.steps:
        heal["steps"] = args.steps or 400
    else:
        heal["tokens"] = args.tokens or 5_000_000
    budget = args.budget or spec["budget"]
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    tokens = load_tokens(spec["eval"], tokenizer)
    source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
    base = measure("source", source, tokens, spec["seq_len"], None, 0.0)["ppl"]
    kv_heads = source.config.num_key_value_heads
    del source
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = spec["train"] or python_corpus(root, args.corpus_mb)
        for label, options, fmt in rows_for(kv_heads, budget):
            converted = root / label.split(",")[0].replace(" ", "_").replace("-", "")
            model, convert_s = convert_and_load(spec["folder"], converted, calib=str(spec["calib"]), device=args.device,
                                                **options)
            zero = measure(label, model, tokens, spec["seq_len"], base, convert_s)
            del model
            start = time.perf_counter()
            healed = finetune(FinetuneOptions(model=str(converted), output=converted.with_name(converted.name + "-healed"),
                                              data=[str(train)], eval_data=str(spec["heal_eval"]), **heal), progress=False)
            heal_s = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(healed, dtype=torch.float32).eval().to(args.device)
            after = measure(label, model, tokens, spec["seq_len"], base, heal_s)
            del model
            exported = None
            if fmt is not None:
                out = export(str(healed), healed.with_name(healed.name + "-export"), fmt, progress=False)
                stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval().to(args.device)
                exported = measure(label, stock, tokens, spec["seq_len"], base, 0.0)
                exported["class"] = type(stock).__name__
                del stock
            table.append((label, zero, after, exported))
            print(f"{label}: {zero['ratio']:.3f}x -> {after['ratio']:.3f}x", file=sys.stderr, flush=True)
    what = f"{heal['steps']} steps" if "steps" in heal else f"{heal['tokens']:,} tokens"
    print(f"\n### {args.model}: eval {spec['eval'].name} ({tokens.numel():,} tokens, windows of {spec['seq_len']}), "
          f"source perplexity {base:.3f}; default conversions (calibration {spec['calib'].name}); healing {what}, "
          f"lr {heal['lr']:g}, batch {heal['batch_size']} x {heal['seq_len']}, attention trainable, KL to the source; "
          f"fp32; {machine()}\n")
    print("| conversion | KV bytes/token | zero-shot | healed | exported (stock class) | convert s | heal s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for label, zero, after, exported in table:
        stock = f"{exported['ratio']:.3f}x ({exported['class']}, measured KV {exported['kv_measured']:,.0f})" if exported else "—"
        print(f"| {label} | {zero['kv_bytes']:,} | {zero['ratio']:.3f}x | {after['ratio']:.3f}x | {stock} | "
              f"{zero['seconds']:.0f} | {after['seconds']:.0f} |")


if __name__ == "__main__":
    main()
