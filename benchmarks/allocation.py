"""Allocations of a KV budget side by side (uniform vs measured by default): the default calibrated conversion,
zero-shot, one row per (target, budget).

    python benchmarks/allocation.py --models stories260K [--targets mfa mfa_kr tpa] [--budgets 0.5 0.25 0.125]
        [--allocations uniform measured greedy] [--init auto|stats|query-aware]

`measured` converts every layer at the uniform widths first, measures the KL each one causes alone on held-out
calibration sequences and gives width to the layers that cost most (factorconv/convert/sensitivity.py); the
conversion is otherwise the same (calibration, refinement). Data, eval and calibration as benchmarks/quality.py.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import convert_and_load, machine, text_slice
from factorconv.errors import FactorConvError
from factorconv.data import load_tokens
from factorconv.evaluate.perplexity import perplexity
from quality import MODELS, SMOLLM2, model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["stories260K"])
    parser.add_argument("--targets", nargs="+", choices=["tpa", "mfa", "mfa_kr"], default=["tpa", "mfa", "mfa_kr"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    parser.add_argument("--allocations", nargs="+", choices=["uniform", "measured", "greedy"],
                        default=["uniform", "measured"])
    parser.add_argument("--init", default="auto", choices=["auto", "stats", "query-aware"])
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for name in args.models:
        spec = model_spec(name, args.smollm2)
        with tempfile.TemporaryDirectory() as tmp:
            calib, evaluation = text_slice(spec["calib"], Path(tmp)), text_slice(spec["eval"], Path(tmp))
            tokenizer = None if evaluation.suffix == ".npy" else AutoTokenizer.from_pretrained(spec["folder"])
            tokens = load_tokens(evaluation, tokenizer, max_tokens=spec.get("eval_tokens", args.eval_tokens))
            source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
            base = perplexity(source, tokens, spec["seq_len"], progress=False)
            rows = []
            for budget in args.budgets:
                for target in args.targets:
                    row = [f"{budget:.1%}", target]
                    for allocation in args.allocations:
                        try:
                            model, seconds = convert_and_load(spec["folder"], Path(tmp) / "out", to=target,
                                                              kv_budget=budget, calib=str(calib), allocation=allocation,
                                                              init=args.init, device=args.device)
                        except FactorConvError as err:
                            if "too small" not in str(err):
                                raise
                            break  # this target cannot reach this budget
                        ratio = perplexity(model, tokens, spec["seq_len"], progress=False) / base
                        row += [f"{ratio:.3f}x", f"{seconds:.0f}"]
                        print(f"{name} {budget:.1%} {target} {allocation}: {ratio:.3f}x", file=sys.stderr, flush=True)
                    if len(row) == 2 + 2 * len(args.allocations):
                        rows.append(row)
        print(f"\n### {name}: eval {evaluation.name} ({tokens.numel():,} tokens, windows of {spec['seq_len']}), "
              f"source perplexity {base:.3f}; default calibrated conversion (calibration {calib.name}, init "
              f"{args.init}); fp32; {machine()}\n")
        print("| budget | target | " + " | ".join(f"{a} | convert s" for a in args.allocations) + " |")
        print("|---:|---|" + "---:|---:|" * len(args.allocations))
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
