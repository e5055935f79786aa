"""Zero-shot quality of every target and initialisation at KV budgets 50%, 25%, 12.5% on real checkpoints.

    python benchmarks/quality.py [--models stories260K pycode-27M] [--device cuda]

For each model, target (TPA, MFA, MFA-KR) and budget: weight-only init, calibration-statistics init
(`--init stats`, no refinement) and the default with calibration (statistics + local refinement); for TPA also
contextual factors from the statistics or fitted by ALS (`--init als`); beside mean-pooled GQA at the same KV
bytes. Budgets a target cannot reach (TPA needs at least one rank per K and V: 1/KV-heads of the bytes) are left
out. Prints one Markdown table per model.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common import REAL, convert_and_load, machine, measure
from factorconv.convert.calibrate import calibration_tokens
from factorconv.evaluate.baselines import mean_pooled_gqa
from factorconv.evaluate.data import load_tokens
from factorconv.errors import FactorConvError

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
}
BUDGETS = (0.5, 0.25, 0.125)
INITS = {"weight-only": dict(init="weight"), "stats": dict(refine_steps=0), "stats+refine (default)": {}}
# Contextual TPA (a(x) = α + A x cached too): statistics start (A = 0) vs factors fitted by ALS.
TPA_CONTEXTUAL = {
    "contextual stats+refine": dict(contextual=True),
    "contextual als": dict(contextual=True, init="als", refine_steps=0),
    "contextual als+refine": dict(contextual=True, init="als"),
}


def evaluate_model(name: str, spec: dict, args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    tokens = load_tokens(spec["eval"], tokenizer, max_tokens=args.eval_tokens)
    source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
    kv_heads = source.config.num_key_value_heads
    rows = [{"budget": 1.0, **measure("source", source, tokens, spec["seq_len"], None, 0.0)}]
    base = rows[0]["ppl"]
    calib = dict(
        calib=str(spec["calib"]), calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        device=args.device,
    )
    calibration_tokens(calib["calib"], spec["folder"], args.calib_samples, args.calib_seq_len, source.config)  # fail early
    with tempfile.TemporaryDirectory() as tmp:
        for budget in BUDGETS:
            heads = budget * kv_heads
            if heads == int(heads) and heads >= 1:
                start = time.perf_counter()
                pooled = mean_pooled_gqa(source, int(heads))
                rows.append({"budget": budget, **measure("mean-pooled GQA", pooled, tokens, spec["seq_len"], base,
                                                         time.perf_counter() - start)})
            for target in ("tpa", "mfa", "mfa_kr"):
                for label, init in (INITS | TPA_CONTEXTUAL if target == "tpa" else INITS).items():
                    options = {**calib, **init} if init.get("init") != "weight" else {"device": args.device, **init}
                    if "refine_steps" not in init and init.get("init") != "weight":
                        options["refine_steps"] = args.refine_steps
                    try:
                        model, seconds = convert_and_load(
                            spec["folder"], Path(tmp) / "out", to=target, kv_budget=budget, **options
                        )
                    except FactorConvError as err:
                        if "too small" in str(err):
                            continue  # this target (variant) cannot reach this budget
                        raise
                    rows.append({"budget": budget, **measure(f"{target} {label}", model, tokens, spec["seq_len"],
                                                             base, seconds)})
                    print(f"{name} {budget:.1%} {target} {label}: ratio {rows[-1]['ratio']:.2f}", flush=True)
    print(f"\n### {name}: eval {spec['eval'].name} ({tokens.numel():,} tokens, windows of {spec['seq_len']}), "
          f"calibration {spec['calib'].name} ({args.calib_samples} x {args.calib_seq_len} tokens), "
          f"refinement {args.refine_steps} steps/layer; fp32; {machine()}\n")
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
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--refine-steps", type=int, default=200)
    args = parser.parse_args()
    for name in args.models:
        evaluate_model(name, MODELS[name], args)


if __name__ == "__main__":
    main()
