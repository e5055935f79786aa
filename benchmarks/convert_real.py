"""What a default calibrated conversion of a real model costs on this machine, run as a user runs it.

    python benchmarks/convert_real.py [--model SmolLM2-135M] [--to mfa_kr] [--kv-budget 0.5] [--device cpu]
        [--smollm2 DIR] [--out DIR (keep the converted model)] [-- extra convert flags]

Runs `python -m factorconv convert` in a child process (so the peak resident memory is the conversion's own, read
from the kernel's accounting of the finished child), with the calibration data benchmarks/quality.py uses for the
model, then evaluates the result as quality.py does. Prints seconds per stage (from factorconv_report.json),
total wall seconds, peak RSS and the perplexity ratio.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import machine, text_slice
from factorconv.data import load_tokens
from factorconv.evaluate.perplexity import perplexity
from quality import MODELS, SMOLLM2, model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="SmolLM2-135M")
    parser.add_argument("--to", choices=["tpa", "mfa", "mfa-kr"], default="mfa-kr")
    parser.add_argument("--kv-budget", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="(SmolLM2: 8,192 as benchmarks/quality.py)")
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2)
    parser.add_argument("--out", type=Path, help="write the converted model here and keep it (default: a temp dir)")
    parser.add_argument("extra", nargs="*", help="more `factorconv convert` flags, after --")
    args = parser.parse_args()
    spec = model_spec(args.model, args.smollm2)
    with tempfile.TemporaryDirectory() as tmp:
        calib, evaluation = text_slice(spec["calib"], Path(tmp)), text_slice(spec["eval"], Path(tmp))
        out = args.out or Path(tmp) / "out"
        command = [sys.executable, "-m", "factorconv", "convert", str(spec["folder"]), str(out), "--to", args.to,
                   "--kv-budget", str(args.kv_budget), "--calib", str(calib), "--device", args.device, *args.extra]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        report = json.loads((out / "factorconv_report.json").read_text())
        tokenizer = None if evaluation.suffix == ".npy" else AutoTokenizer.from_pretrained(spec["folder"])
        tokens = load_tokens(evaluation, tokenizer, max_tokens=spec.get("eval_tokens", args.eval_tokens))
        ratio = []
        for folder in (spec["folder"], out):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(args.device)
            ratio.append(perplexity(model, tokens, spec["seq_len"], progress=False))
            del model
    options = " ".join(command[6:]).replace(str(calib), calib.name)
    print(f"\n### {args.model}: `factorconv convert SOURCE OUT {options}` (library defaults otherwise; refinement "
          f"{report['refine_steps']} steps x {report.get('refine_batch', 4)} sequences/layer); {machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| stage | seconds |")
    print("|---|---:|")
    for stage, seconds in report["seconds"].items():
        print(f"| {stage} | {seconds:.0f} |")
    print(f"| wall clock of the process (load, write, exit included) | {wall:.0f} |")
    print(f"\npeak resident memory of the conversion process: {peak_gib:.2f} GiB; perplexity {ratio[1]:.3f} vs "
          f"source {ratio[0]:.3f} ({ratio[1] / ratio[0]:.3f}x) on {evaluation.name} ({tokens.numel():,} tokens, "
          f"windows of {spec['seq_len']})")


if __name__ == "__main__":
    main()
