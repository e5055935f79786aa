"""Zero-shot quality of every target and initialisation at KV budgets 50%, 25%, 12.5% on real checkpoints.

    python benchmarks/quality.py [--models stories260K pycode-27M SmolLM2-135M] [--device cuda]
        [--smollm2 DIR]   # built by ../shared/tools/build_smollm2.py DIR (see ../shared/real/SOURCES.md)

For each model, target (TPA, MFA, MFA-KR) and budget: weight-only init, calibration-statistics init
(`--refine-steps 0`: closed forms + least-squares o_proj refit, no Adam steps) and the default with calibration (statistics + local refinement); for TPA also
contextual factors from the statistics or fitted by ALS (`--init als`); beside mean-pooled GQA at the same KV
bytes. Budgets a target cannot reach (TPA needs at least one rank per K and V: 1/KV-heads of the bytes) are left
out. MFA-KR built to export as DeepSeek-V3 (`--mla`) is measured beside free MFA-KR at every budget, MFA built to
export as a Llama with one KV head (`--mqa`) beside free MFA at 1/KV-heads. SmolLM2-135M-Instruct (30 layers; a real Hub model) gets every target at 50% and 25%, weight-only and the
defaults, calibrated on the first 600,000 bytes of WikiText-2's test set and evaluated on its last 300,000 (8,192
tokens, windows of 512), as issue 17 measures it. Calibration size and refinement steps are the library's
defaults unless given. Prints one Markdown table per model.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REAL, convert_and_load, machine, measure, text_slice
from transformers import AutoModelForCausalLM

from factorconv.convert.calibrate import calibration_tokens
from factorconv.convert.options import ConvertOptions
from factorconv.errors import FactorConvError
from factorconv.evaluate.baselines import mean_pooled_gqa
from factorconv.data import load_tokens
from factorconv.kinds import REFINE_DEFAULTS_TEXT

SMOLLM2 = Path(os.environ.get("SMOLLM2", "~/.cache/factorconv/smollm2"))
WIKITEXT = REAL / "wikitext-2-raw-canonical" / "wiki.test.raw"
MODELS = {
    "stories260K": dict(
        folder=REAL / "stories260K-hf",
        eval=REAL / "tinystories" / "valid.tok512.npy",
        calib=REAL / "tinystories" / "train.tok512.npy",
        seq_len=512,
    ),
    "pycode-27M": dict(
        folder=REAL / "pycode-27M-hf",
        eval=REAL / "pycode-eval" / "heldout.jsonl",
        calib=REAL / "pycode-eval" / "calib.jsonl",
        seq_len=1024,
    ),
    "SmolLM2-135M": dict(
        folder=None,  # --smollm2
        eval=(WIKITEXT, -300_000),  # the last 300,000 bytes
        calib=(WIKITEXT, 600_000),  # the first 600,000 bytes: disjoint
        seq_len=512,
        eval_tokens=8192,
        budgets=(0.5, 0.25),
        inits=("weight-only", "stats+refine (default)"),
        contextual=False,
    ),
}
BUDGETS = (0.5, 0.25, 0.125)
INITS = {"weight-only": dict(init="weight"), "stats": dict(refine_steps=0), "stats+refine (default)": {}}
# Contextual TPA (a(x) = α + A x cached too): statistics start (A = 0) vs factors fitted by ALS.
TPA_CONTEXTUAL = {
    "contextual stats+refine": dict(contextual=True),
    "contextual als": dict(contextual=True, init="als", refine_steps=0),
    "contextual als+refine": dict(contextual=True, init="als"),
}


def model_spec(name: str, smollm2: Path) -> dict:
    """MODELS[name] with its folder; SmolLM2's is the one build_smollm2.py wrote (not bundled)."""
    spec = MODELS[name]
    if spec["folder"] is not None:
        return spec
    folder = smollm2.expanduser()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} has no SmolLM2 model: build it with ../shared/tools/build_smollm2.py "
                         f"{folder} (see ../shared/real/SOURCES.md) or pass --smollm2 DIR")
    return {**spec, "folder": folder}


def evaluate_model(name: str, spec: dict, args: argparse.Namespace, data_dir: Path) -> list[dict]:
    from transformers import AutoTokenizer

    spec = {**spec, "eval": text_slice(spec["eval"], data_dir), "calib": text_slice(spec["calib"], data_dir)}
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    tokens = load_tokens(spec["eval"], tokenizer, max_tokens=spec.get("eval_tokens", args.eval_tokens))
    source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
    kv_heads = source.config.num_key_value_heads
    rows = [{"budget": 1.0, **measure("source", source, tokens, spec["seq_len"], None, 0.0)}]
    base = rows[0]["ppl"]
    given = dict(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    calib = dict(calib=str(spec["calib"]), device=args.device, **{k: v for k, v in given.items() if v is not None})
    sized = ConvertOptions(source=str(spec["folder"]), output=Path("-"), **calib)
    shape = calibration_tokens(calib["calib"], spec["folder"], sized.calib_samples, sized.calib_seq_len, source.config).shape
    inits = {label: INITS[label] for label in spec.get("inits", INITS)}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in spec.get("budgets", BUDGETS):
            heads = budget * kv_heads
            if heads == int(heads) and heads >= 1:
                start = time.perf_counter()
                pooled = mean_pooled_gqa(source, int(heads))
                rows.append({"budget": budget, **measure("mean-pooled GQA", pooled, tokens, spec["seq_len"], base,
                                                         time.perf_counter() - start)})
            for target in args.targets:
                contextual = TPA_CONTEXTUAL if target == "tpa" and spec.get("contextual", True) else {}
                variants = {f"{target} {label}": init for label, init in (inits | contextual).items()}
                # Built to export as a stock architecture, at the same KV bytes (MQA only at 1/KV-heads).
                if target == "mfa_kr":
                    variants |= {f"mfa_kr --mla {label}": {**init, "mla": True} for label, init in inits.items()}
                if target == "mfa" and budget * kv_heads == 1:
                    variants |= {f"mfa --mqa {label}": {**init, "mqa": True} for label, init in inits.items()}
                for method, init in variants.items():
                    options = {**calib, **init} if init.get("init") != "weight" else {"device": args.device, **init}
                    if "refine_steps" not in init and init.get("init") != "weight" and args.refine_steps is not None:
                        options["refine_steps"] = args.refine_steps
                    if not options.get("mqa"):
                        options["kv_budget"] = budget
                    if args.allocation and "calib" in options and not (options.get("mla") or options.get("mqa")):
                        options["allocation"] = args.allocation  # serving shapes are the same in every layer
                    try:
                        model, seconds = convert_and_load(spec["folder"], Path(tmp) / "out", to=target, **options)
                    except FactorConvError as err:
                        if "too small" in str(err):
                            continue  # this target (variant) cannot reach this budget
                        raise
                    if options.get("mla"):
                        width = model.config.rope_dim[0] + model.config.nope_dim[0]
                        method += f" ({model.config.nope_dim[0]}+{model.config.rope_dim[0]})"
                        assert width == int(budget * 2 * kv_heads * model.config.head_dim)
                    rows.append({"budget": budget, **measure(method, model, tokens, spec["seq_len"], base, seconds)})
                    print(f"{name} {budget:.1%} {method}: ratio {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    budgeted = ConvertOptions(source=str(spec["folder"]), output=Path("-"), kv_budget=0.5, **calib)
    steps = args.refine_steps if args.refine_steps is not None else ", ".join(
        f"{b:.1%}: {budgeted.model_copy(update={'kv_budget': b}).layer_refine_steps}"
        for b in spec.get("budgets", BUDGETS))
    allocation = args.allocation or budgeted.allocation  # what the default resolves to with a budget
    print(f"\n### {name}: eval {spec['eval'].name} ({tokens.numel():,} tokens, windows of {spec['seq_len']}), "
          f"calibration {spec['calib'].name} ({shape[0]} x {shape[1]} tokens), "
          f"refinement steps/layer {steps}, peak step (of each tensor's RMS) and schedule {REFINE_DEFAULTS_TEXT}, "
          f"allocation {allocation} (--mla/--mqa: uniform); fp32; {machine()}\n")
    print("| budget | method | KV bytes/token | perplexity | ratio | convert s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget']:.1%} | {r['method']} | {r['kv_bytes']:,} | {r['ppl']:.3f} | {r['ratio']:.2f}x | "
              f"{r['seconds']:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="(SmolLM2: 8,192 as issue 17 measures)")
    parser.add_argument("--calib-samples", type=int, help="default: the library's")
    parser.add_argument("--calib-seq-len", type=int, help="default: the library's")
    parser.add_argument("--refine-steps", type=int, help="default: the library's")
    parser.add_argument("--allocation", choices=["uniform", "greedy", "measured"],
                        help="for calibrated conversions with a budget (default: the library's)")
    parser.add_argument("--targets", nargs="+", choices=["tpa", "mfa", "mfa_kr"], default=["tpa", "mfa", "mfa_kr"])
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2, help="the SmolLM2-135M-Instruct folder build_smollm2.py wrote")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        for name in args.models:
            evaluate_model(name, model_spec(name, args.smollm2), args, Path(data_dir))


if __name__ == "__main__":
    main()
