"""Refinement step sizes over the steps: zero-shot perplexity after calibrated conversions that differ only in
`--refine-schedule`, `--refine-steps` and `--refine-lr`.

    python benchmarks/refine_schedule.py --model SmolLM2-135M [--device cuda] [--targets mfa_kr] [--budgets 0.5 0.25]
        [--schedules warmup-cosine constant] [--steps 100 200 400] [--lrs 0.02]

Each row is one conversion with the library's other defaults (calibration size, measured allocation), evaluated
as benchmarks/quality.py evaluates that model. Rows print as they finish, so a run cut short keeps its rows.
`--steps default` (the default) uses the library's steps for the budget.
"""

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from common import convert_and_load, machine, text_slice
from quality import MODELS, SMOLLM2, model_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from factorconv.convert.options import ConvertOptions
from factorconv.errors import FactorConvError
from factorconv.data import load_tokens
from factorconv.evaluate.perplexity import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="SmolLM2-135M")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--targets", nargs="+", choices=["tpa", "mfa", "mfa_kr"], default=["mfa_kr"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--schedules", nargs="+", choices=["warmup-cosine", "constant"],
                        default=["warmup-cosine", "constant"])
    parser.add_argument("--steps", nargs="+", default=["default"], help="refinement steps per layer, or 'default'")
    parser.add_argument("--lrs", nargs="+", type=float, default=[None], help="default: the library's for the target")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="(SmolLM2: 8,192 as benchmarks/quality.py)")
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2)
    args = parser.parse_args()
    spec = model_spec(args.model, args.smollm2)
    with tempfile.TemporaryDirectory() as tmp:
        calib, evaluation = text_slice(spec["calib"], Path(tmp)), text_slice(spec["eval"], Path(tmp))
        tokenizer = None if evaluation.suffix == ".npy" else AutoTokenizer.from_pretrained(spec["folder"])
        tokens = load_tokens(evaluation, tokenizer, max_tokens=spec.get("eval_tokens", args.eval_tokens))
        source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
        base = perplexity(source, tokens, spec["seq_len"], progress=False)
        del source
        print(f"\n### {args.model}: eval {evaluation.name} ({tokens.numel():,} tokens, windows of {spec['seq_len']}), "
              f"calibration {calib.name}, library defaults otherwise; source perplexity {base:.3f}; fp32; "
              f"{machine()}\n")
        print("| target | budget | schedule | peak lr | steps/layer | perplexity | ratio | convert s |")
        print("|---|---:|---|---:|---:|---:|---:|---:|", flush=True)
        grid = itertools.product(args.targets, args.budgets, args.steps, args.lrs, args.schedules)
        for target, budget, steps, lr, schedule in grid:
            options = dict(to=target, kv_budget=budget, calib=str(calib), device=args.device, refine_lr=lr,
                           refine_schedule=schedule)
            if steps != "default":
                options["refine_steps"] = int(steps)
            resolved = ConvertOptions(source=str(spec["folder"]), output=Path("-"), **options)
            try:
                model, seconds = convert_and_load(spec["folder"], Path(tmp) / "out", **options)
            except FactorConvError as err:
                if "too small" in str(err):
                    continue  # this target cannot reach this budget
                raise
            ppl = perplexity(model, tokens, spec["seq_len"], progress=False)
            print(f"| {target} | {budget:.1%} | {resolved.refine_schedule} | {resolved.refine_lr:g} | "
                  f"{resolved.layer_refine_steps} | {ppl:.3f} | {ppl / base:.3f}x | {seconds:.1f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
