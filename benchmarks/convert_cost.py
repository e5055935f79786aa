"""What a calibrated conversion costs at Llama shapes: seconds per stage and peak device memory per target.

    python benchmarks/convert_cost.py [--shapes 8b] [--budget 0.25] [--calib-samples 128] [--calib-seq-len 2048]

Random bf16 weights with the public config's shapes (Llama-3.2-1B or Llama-3.1-8B) and random calibration
tokens (timings do not depend on the values). Each row converts once on the GPU (CPU when there is none) with
calibration and the default allocation and refinement, and prints the seconds of each stage (calibration pass
and measured allocation, per-layer refinement, everything else: statistics, closed forms, writing), the peak
allocated device memory and layer 0's held-out attention error before/after refinement (meaningless for
random weights beyond showing the stages ran). `--layers N` keeps the first N layers (a quicker estimate).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import LLAMA_3_1_8B, LLAMA_3_2_1B, machine
from transformers import LlamaConfig, LlamaForCausalLM

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions

SHAPES = {"1b": ("Llama-3.2-1B", LLAMA_3_2_1B), "8b": ("Llama-3.1-8B", LLAMA_3_1_8B)}
METHODS = {
    "TPA (default)": dict(to="tpa"),
    "TPA contextual, als": dict(to="tpa", contextual=True, init="als", refine_steps=0),
    "MFA (default)": dict(to="mfa"),
    "MFA-KR (default: partial-RoPE candidates)": dict(to="mfa_kr"),
}


def build_source(folder: Path, config: dict, device: str) -> None:
    """Random bf16 weights, initialised on the conversion device (an 8B model initialises in seconds there)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--methods", help="comma-separated row labels' first words to run, e.g. 'MFA-KR,TPA'")
    parser.add_argument("--json", type=Path, help="append one JSON line per row here")
    parser.add_argument("--progress", action="store_true", help="the conversions' progress bars on stderr")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, config = SHAPES[args.shapes]
    config = dict(config, num_hidden_layers=args.layers or config["num_hidden_layers"])
    wanted = args.methods.split(",") if args.methods else None
    methods = {k: v for k, v in METHODS.items() if wanted is None or k.split(" ")[0] in wanted}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        build_source(source, config, device)
        calib = Path(tmp) / "calib.npy"
        rng = np.random.default_rng(0)
        np.save(calib, rng.integers(0, config["vocab_size"], args.calib_samples * args.calib_seq_len))
        for label, options in methods.items():
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = convert(
                ConvertOptions(
                    source=str(source), output=Path(tmp) / "out", overwrite=True, device=device, kv_budget=args.budget,
                    calib=str(calib), calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, **options,
                ),
                progress=args.progress,
            )
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            report = json.loads((out / "factorconv_report.json").read_text())
            layer = report["layers"][0]
            row = dict(
                method=label, seconds=seconds, peak_gib=peak, stages=report["seconds"],
                error=layer.get("attention_error"), refined=layer.get("refined_attention_error"),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(dict(row, shapes=args.shapes, layers=config["num_hidden_layers"])) + "\n")
    layers = config["num_hidden_layers"]
    print(f"\n### Conversion cost, {name} shapes ({layers} layers, random weights), {args.budget:.0%} KV budget, "
          f"calibration {args.calib_samples} x {args.calib_seq_len} tokens; {machine()}\n")
    print("| method | convert s | calibration + allocation s | refinement s | rest s | peak GiB | "
          "layer-0 attention error | after refinement |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        stages = r["stages"]
        after = f"{r['refined']:.3f}" if r["refined"] is not None else "—"
        print(f"| {r['method']} | {r['seconds']:.1f} | {stages['calibration data and allocation']:.1f} | "
              f"{stages['refinement']:.1f} | {stages['layers besides refinement']:.1f} | {r['peak_gib']:.1f} | "
              f"{r['error']:.3f} | {after} |")


if __name__ == "__main__":
    main()
