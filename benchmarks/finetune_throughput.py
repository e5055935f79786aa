"""Fine-tuning throughput: a Llama-3.2-1B-shaped model (random weights, nothing downloaded) converted to TPA and
healed for a fixed number of steps with `factorconv finetune`'s loop, beside the same loop training the
unconverted source. Both distill from the source (teacher forward included) and train the attention weights.

    python benchmarks/finetune_throughput.py              # one GPU (H100 / H200): bf16 autocast
    python benchmarks/finetune_throughput.py --tiny       # CPU smoke test of the same code path, tiny shapes

Prints a Markdown table: tokens/s (steady state, warm-up steps excluded), peak GPU memory
(torch.cuda.max_memory_allocated over the whole run: weights of student and teacher, optimizer, activations,
logits), and model FLOPs utilisation. Model FLOPs per trained token count the useful matmul work only
(no recomputation): teacher forward 2·N_T + A_T, student forward 2·N + A, student backward 2·N + 2·A for the
activation gradients plus 2·N_train for the weight gradients, where N is the parameter count of the linear
layers (lm_head included, embeddings excluded), N_train that of the trained ones, and A the attention
core per token (causal: 2·h·D·L for scores and mixing, plus 2·h·D·(R_K + R_V) to rebuild TPA keys/values).
MFU divides by the GPU's dense bf16 peak (989 TFLOP/s for H100 SXM and H200; --peak-tflops to override).
"""

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import LLAMA_3_2_1B
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import factorconv
from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.finetune import FinetuneOptions, finetune
from factorconv.finetune.metrics import METRICS_FILE
from factorconv.finetune.trainable import trainable_modules

TINY = dict(
    LLAMA_3_2_1B,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters=dict(LLAMA_3_2_1B["rope_parameters"], original_max_position_embeddings=64),
)
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAKS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAKS.items():  # most specific names first
        if key in name:
            return value
    return None


def build_source(folder: Path, shapes: dict, device: torch.device) -> Path:
    """A Llama with the given shapes and seeded random weights, saved in bf16 (as the real 1B is)."""
    torch.manual_seed(0)
    config = LlamaConfig(**shapes)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    del model
    return folder


def flops_per_token(folder: Path, seq_len: int) -> tuple[float, float, float]:
    """(2·N, attention core A, 2·N_train) per token of one forward, from the model's shapes (meta device)."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = trainable_modules(model, "attention")
    linear, trained = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear += module.weight.numel()
            if any(name.startswith(m + ".") for m in modules):
                trained += module.weight.numel()
    heads, head_dim, layers = config.num_attention_heads, config.head_dim, config.num_hidden_layers
    attention = 2 * heads * head_dim * seq_len
    if getattr(config, "attention", None) == "tpa":
        ranks = [k + v for k, v in zip(config.tpa_rank_k, config.tpa_rank_v)]
        mix = sum(2 * heads * head_dim * r for r in ranks)
    else:
        mix = 0
    return 2.0 * linear, float(layers * attention + mix), 2.0 * trained


def run(label: str, model: Path, teacher: Path, data: Path, eval_data: Path, out: Path, args, device: str) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    folder = finetune(
        FinetuneOptions(
            model=str(model),
            teacher=str(teacher),
            output=out,
            data=[str(data)],
            eval_data=str(eval_data),
            eval_tokens=args.seq_len,
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=1e-4,
            trainable="attention",
            grad_checkpointing=args.grad_checkpointing,
            mixed_precision=args.mixed_precision,
            device=device,
            overwrite=True,
        ),
        progress=not args.quiet,
    )
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rows = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    steady = [r for r in rows if "loss" in r and r["step"] > args.warmup_steps]
    # Steps that ran an evaluation carry its time too: leave them out of the throughput.
    steady = [r for r in steady if "eval_ppl" not in r] or steady
    summary = json.loads((folder / "finetune_summary.json").read_text())
    tokens_per_s = summary["tokens_per_step"] * len(steady) / sum(r["step_seconds"] for r in steady)
    student_fwd, student_attn, student_wgrad = flops_per_token(model, args.seq_len)
    teacher_fwd, teacher_attn, _ = flops_per_token(teacher, args.seq_len)
    model_flops = (teacher_fwd + teacher_attn) + (2 * student_fwd + 3 * student_attn + student_wgrad)
    return {
        "label": label,
        "trainable": summary["trainable_parameters"],
        "parameters": summary["parameters"],
        "tokens_per_s": tokens_per_s,
        "step_s": float(np.mean([r["step_seconds"] for r in steady])),
        "peak_bytes": peak,
        "model_tflops_per_s": tokens_per_s * model_flops / 1e12,
        "flops_per_token": model_flops,
        "wall": wall,
        "mixed_precision": summary["mixed_precision"],
        "loss": [r["loss"] for r in rows if "loss" in r],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    parser.add_argument("--steps", type=int, help="optimizer steps per model (default 30; tiny 6)")
    parser.add_argument("--warmup-steps", type=int, help="first steps left out of the timing (default 5; tiny 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per block (default 2048; tiny 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--rank", type=int, help="TPA R_K = R_V (default: a quarter of the KV heads: 2 of 8)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"], help="auto: bf16 on GPU")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from its name)")
    parser.add_argument("--out", type=Path, help="keep the models and runs here (default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.tiny else 30)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if args.tiny else 5)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --tiny for a CPU smoke test")
    device = "cpu" if args.tiny else "cuda"
    shapes = TINY if args.tiny else LLAMA_3_2_1B
    args.rank = args.rank or max(1, shapes["num_key_value_heads"] // 4)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        source = build_source(root / "source", shapes, torch.device(device))
        converted = convert(
            ConvertOptions(
                source=str(source), output=root / "tpa", rank_k=args.rank, rank_v=args.rank, device=device,
                overwrite=True,
            ),
            progress=False,
        )
        setup = time.perf_counter() - started
        rng = np.random.default_rng(0)
        per_step = args.batch_size * args.grad_accum * args.seq_len
        train = root / "train.npy"
        np.save(train, rng.integers(3, shapes["vocab_size"], size=per_step * (args.steps + 2), dtype=np.int32))
        held_out = root / "eval.npy"
        np.save(held_out, rng.integers(3, shapes["vocab_size"], size=args.seq_len, dtype=np.int32))

        kv = shapes["num_key_value_heads"]
        results = [
            run(f"source Llama (GQA {shapes['num_attention_heads']}/{kv} heads)", source, source, train, held_out,
                root / "run-source", args, device),
            run(f"TPA R_K=R_V={args.rank} ({args.rank / kv:.0%} of the KV bytes)", converted, source, train,
                held_out, root / "run-tpa", args, device),
        ]

    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else f"{platform.machine()} CPU"
    peak = args.peak_tflops or (peak_tflops(name) if not args.tiny else None)
    shape = "tiny" if args.tiny else "Llama-3.2-1B"
    print(
        f"\n{shape} shapes, random weights; {args.steps} steps of {args.batch_size} × {args.seq_len} tokens"
        f" (grad accum {args.grad_accum}{', grad checkpointing' if args.grad_checkpointing else ''}), "
        f"first {args.warmup_steps} steps untimed; KL distillation from the source; trainable: attention; "
        f"mixed precision {results[0]['mixed_precision']}; device: {name}; torch {torch.__version__}, "
        f"factorconv {factorconv.__version__}; set-up (build + convert) {setup:.0f} s\n"
    )
    print("| model | trained params | tokens/s | step s | peak GPU memory | model TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        memory = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] is not None else "n/a (CPU)"
        mfu = f"{r['model_tflops_per_s'] / peak:.1%}" if peak else "n/a"
        print(
            f"| {r['label']} | {r['trainable']:,} of {r['parameters']:,} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_s']:.3f} | {memory} | {r['model_tflops_per_s']:.1f} | {mfu} |"
        )
    if args.tiny:
        for r in results:
            assert all(np.isfinite(r["loss"])), r["loss"]
        print("\n(tiny smoke test: numbers say nothing about a GPU)")


if __name__ == "__main__":
    main()
