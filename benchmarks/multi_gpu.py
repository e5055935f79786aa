"""Healing on several GPUs of one host: DDP and FSDP beside one GPU, Llama-3.2-1B shapes converted to TPA.

    python benchmarks/multi_gpu.py [--gpus 2] [--steps 20] [--seq-len 2048] [--batch-size 4]

Builds a random-weight Llama-3.2-1B-shaped source (no download), converts it to TPA (R_K = R_V = 2, a quarter
of the KV bytes) and runs `factorconv finetune` through `accelerate launch` with recipes/accelerate/
single_gpu.yaml, multi_gpu_ddp.yaml and fsdp.yaml. Reports tokens/s (total and per GPU, steady-state steps),
scaling efficiency against the one-GPU run, peak memory per GPU (nvidia-smi, sampled every 0.2 s), whether
every DDP rank ended with identical weights, and whether a checkpoint written on N GPUs resumes on one.
Prints a Markdown table.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import LLAMA_3_2_1B
from finetune_throughput import build_source
from safetensors.torch import load_file

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.finetune.checkpoints import CHECKPOINTS
from factorconv.finetune.metrics import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]


def sample_memory(stop: threading.Event, peaks: dict[int, int]) -> None:
    if shutil.which("nvidia-smi") is None:
        return
    while not stop.is_set():
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        ).stdout
        for line in out.strip().splitlines():
            index, used = (int(v) for v in line.split(","))
            peaks[index] = max(peaks.get(index, 0), used)
        time.sleep(0.2)


def launch(config: str, processes: int, args: list[str], log: Path) -> tuple[int, dict[int, int], float]:
    """accelerate launch -m factorconv finetune ...; returns exit code, peak MiB per GPU, wall seconds."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" / config),
               "--num_processes", str(processes), "-m", "factorconv", "-q", "finetune", *args]
    peaks: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(stop, peaks), daemon=True)
    sampler.start()
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ).returncode
    stop.set()
    sampler.join()
    return code, peaks, time.perf_counter() - start


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def steady_tokens_per_s(folder: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    steady = [r for r in rows if "loss" in r and r["step"] > warmup and "eval_ppl" not in r]
    summary = json.loads((folder / "finetune_summary.json").read_text())
    return summary["tokens_per_step"] * len(steady) / sum(r["step_seconds"] for r in steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, help="keep models, runs and logs here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    source = build_source(root / "source", LLAMA_3_2_1B, torch.device("cuda"))
    student = convert(
        ConvertOptions(source=str(source), output=root / "tpa", rank_k=2, rank_v=2, device="cuda", overwrite=True),
        progress=False,
    )
    rng = np.random.default_rng(0)
    blocks = args.steps * args.batch_size * args.gpus + 8
    np.save(root / "train.npy", rng.integers(0, LLAMA_3_2_1B["vocab_size"], blocks * args.seq_len, dtype=np.int64))
    np.save(root / "eval.npy", rng.integers(0, LLAMA_3_2_1B["vocab_size"], 2 * args.seq_len, dtype=np.int64))
    common = [str(student), "--data", str(root / "train.npy"), "--eval-data", str(root / "eval.npy"),
              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", "1e-4", "--overwrite"]
    runs = [("1 GPU", "single_gpu.yaml", 1), (f"DDP {args.gpus} GPUs", "multi_gpu_ddp.yaml", args.gpus),
            (f"FSDP {args.gpus} GPUs", "fsdp.yaml", args.gpus)]
    rows = []
    for label, config, processes in runs:
        out = root / label.split()[0].lower()
        extra = ["--steps", str(args.steps), "--save-every", str(args.steps // 2)]
        code, peaks, wall = launch(config, processes, [*common[:1], str(out), *common[1:], *extra], root / f"{out.name}.log")
        row = {"run": label, "processes": processes, "exit": code, "peak_mib": peaks, "wall_s": wall}
        if code == 0:
            summary = json.loads((out / "finetune_summary.json").read_text())
            row.update(tokens_per_s=steady_tokens_per_s(out, args.warmup_steps),
                       replicas_identical=summary["replicas_identical"], after_ppl=summary["eval"]["after_ppl"])
        else:
            row["error"] = (root / f"{out.name}.log").read_text()[-2000:]
        rows.append(row)
    # The DDP run's mid-way checkpoint, resumed on one GPU with N× accumulation (the same global batch).
    reference, resumed = root / "ddp-finished", root / "ddp"
    shutil.copytree(resumed, reference)
    for late in sorted((resumed / CHECKPOINTS).iterdir())[1:]:
        shutil.rmtree(late)
    resume_args = [*common[:1], str(resumed), *common[1:-1], "--steps", str(args.steps), "--save-every",
                   str(args.steps // 2), "--grad-accum", str(args.gpus), "--resume"]
    code, _, _ = launch("single_gpu.yaml", 1, resume_args, root / "resume.log")
    if code == 0:
        a, b = weights(reference), weights(resumed)
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        resume = f"resumed at step {args.steps // 2} and finished; max |Δweight| vs the DDP run {diff:.2e}"
    else:
        resume = "failed: " + (root / "resume.log").read_text().strip().splitlines()[-1][:300]
    base = next((r["tokens_per_s"] for r in rows if r["processes"] == 1 and "tokens_per_s" in r), None)
    print(f"{torch.cuda.get_device_name()} x{args.gpus}, torch {torch.__version__}, bf16 autocast, fp32 weights, "
          f"TPA R=2 student + frozen teacher, seq {args.seq_len}, batch {args.batch_size}/GPU, {args.steps} steps "
          f"(first {args.warmup_steps} not timed), trainable: attention\n")
    print("| run | tokens/s | tokens/s per GPU | scaling efficiency | peak MiB per GPU | identical replicas |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['run']} | failed (exit {r['exit']}) | | | {r['peak_mib']} | |")
            continue
        per_gpu = r["tokens_per_s"] / r["processes"]
        efficiency = f"{per_gpu / base:.0%}" if base else ""
        peaks = ", ".join(f"{v:,}" for _, v in sorted(r["peak_mib"].items())[: r["processes"]])
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {efficiency} | {peaks} | "
              f"{r['replicas_identical']} |")
    print(f"\ncheckpoint written on {args.gpus} GPUs (DDP), resumed on 1 GPU: {resume}")
    for r in rows:
        if "error" in r:
            print(f"\n{r['run']} log tail:\n{r['error']}")
    (root / "multi_gpu.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
