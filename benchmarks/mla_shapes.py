"""The shape of an `--mla` conversion and what DeepSeek-V3's latent norm costs, at one KV budget.

    python benchmarks/mla_shapes.py --model stories260K [--budget 0.25] [--device cpu]
    python benchmarks/mla_shapes.py --model pycode-27M --shapes 32+32 48+16

Rows, all default conversions with calibration (statistics + refinement) at the same KV bytes: free MFA-KR; `--mla`
with every standard RoPE width that fits (or --shapes); and `--mla` at the budget's default shape with the latent
norm switched off (an ablation, not something `convert` offers: the exported DeepSeek-V3 always normalises).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from common import convert_and_load, machine, measure
from quality import MODELS
from transformers import AutoModelForCausalLM, AutoTokenizer

import factorconv.convert.plan as planning
from factorconv.data import load_tokens

BUILD_CONFIG = planning.build_target_config


def _without_latent_norm(*args, **kwargs):
    config = BUILD_CONFIG(*args, **kwargs)
    config.latent_norm = False
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["stories260K", "pycode-27M"], default="stories260K")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--shapes", nargs="+", help="N+R shapes (default: every standard RoPE width that fits)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    args = parser.parse_args()
    spec = MODELS[args.model]
    tokens = load_tokens(spec["eval"], AutoTokenizer.from_pretrained(spec["folder"]), max_tokens=args.eval_tokens)
    source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
    base = measure("source", source, tokens, spec["seq_len"], None, 0.0)["ppl"]
    head_dim = source.config.head_dim
    width = int(args.budget * 2 * source.config.num_key_value_heads * head_dim)
    fitting = [r for r in range(2, head_dim + 1, 2) if head_dim % r == 0 and r <= width // 2]
    shapes = args.shapes or [f"{width - r}+{r}" for r in fitting]
    calib = dict(calib=str(spec["calib"]), device=args.device)
    variants = [("mfa_kr free", dict(kv_budget=args.budget), BUILD_CONFIG)]
    variants += [(f"--mla {shape}", dict(mla=True, mla_shape=shape), BUILD_CONFIG) for shape in shapes]
    variants += [("--mla default shape, latent norm off", dict(mla=True, kv_budget=args.budget), _without_latent_norm)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, options, build in variants:
            planning.build_target_config = build
            try:
                model, seconds = convert_and_load(spec["folder"], Path(tmp) / "out", to="mfa_kr", **calib, **options)
            finally:
                planning.build_target_config = BUILD_CONFIG
            if options.get("mla"):
                label += f" ({model.config.nope_dim[0]}+{model.config.rope_dim[0]})" if "default" in label else ""
            rows.append(measure(label, model, tokens, spec["seq_len"], base, seconds))
    print(f"\n### {args.model}, MFA-KR at {args.budget:.1%} of the KV bytes ({width} per layer): eval "
          f"{spec['eval'].name} ({tokens.numel():,} tokens), defaults with calibration {spec['calib'].name}; "
          f"fp32; {machine()}\n")
    print("| conversion | KV bytes/token | perplexity | ratio | convert s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['kv_bytes']:,} | {r['ppl']:.3f} | {r['ratio']:.3f}x | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
