"""What a calibrated conversion costs at Llama-3.2-1B shapes: seconds and peak device memory per init method.

    python benchmarks/convert_cost.py [--budget 0.25] [--calib-samples 32] [--calib-seq-len 2048]

Random bf16 weights with the public config's shapes and random calibration tokens (timings do not depend on
the values). Each row converts once on the GPU (CPU when there is none) with calibration and prints seconds,
peak allocated device memory and per-layer held-out attention error before/after refinement (meaningless
for random weights beyond showing the stages ran).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import LLAMA_3_2_1B, machine
from transformers import LlamaConfig, LlamaForCausalLM

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions

METHODS = {
    "TPA stats+refine (default)": dict(to="tpa"),
    "TPA contextual, als": dict(to="tpa", contextual=True, init="als", refine_steps=0),
    "MFA stats+refine (default)": dict(to="mfa"),
    "MFA-KR stats+refine (default: partial-RoPE candidates)": dict(to="mfa_kr"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        LlamaForCausalLM(LlamaConfig(**LLAMA_3_2_1B)).to(torch.bfloat16).save_pretrained(source)
        calib = Path(tmp) / "calib.npy"
        np.save(calib, np.random.default_rng(0).integers(0, 32000, args.calib_samples * args.calib_seq_len))
        for label, options in METHODS.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = convert(
                ConvertOptions(
                    source=str(source), output=Path(tmp) / "out", overwrite=True, device=device, kv_budget=args.budget,
                    calib=str(calib), calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, **options,
                ),
                progress=False,
            )
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            layers = json.loads((out / "factorconv_report.json").read_text())["layers"]
            rows.append((label, seconds, peak, layers[0].get("attention_error"), layers[0].get("refined_attention_error")))
            print(f"{label}: {seconds:.1f} s", flush=True)
    print(f"\n### Conversion cost, Llama-3.2-1B shapes (random weights), {args.budget:.0%} KV budget, calibration "
          f"{args.calib_samples} x {args.calib_seq_len} tokens; {machine()}\n")
    print("| method | convert s | peak GiB | layer-0 attention error | after refinement |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, peak, before, after in rows:
        after_text = f"{after:.3f}" if after is not None else "—"
        print(f"| {label} | {seconds:.1f} | {peak:.1f} | {before:.3f} | {after_text} |")


if __name__ == "__main__":
    main()
