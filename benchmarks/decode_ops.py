"""Ops one decoding step dispatches, per attention layer and for the whole step: source and every target.

    python benchmarks/decode_ops.py [--batch 1 4] [--tokens 1024 1025] [--dtype bfloat16] [--path gpu]

A small-batch GPU decode step is host-bound (benchmarks/results/decode_gpu.md: the H200 worked 12-14 ms of a 35-49 ms
target step), so the number of kernels the host launches per layer is what the step time follows. This counts them
on the CPU: every ATen op of the forward, split into kernels (ops that write memory of their own) and views, from
`factorconv.evaluate.dispatch`. `--path gpu` (the default) takes the decode path a CUDA device takes (two matrix
products and a softmax; on a CPU the fused SDPA kernel), so the counts are the GPU's. The model is Llama-3.1-8B's
head layout (32 query heads, 8 KV heads) at a small head size with random weights; targets at 25% of the source's
KV bytes (weight-only conversions, the same shapes as decode_gpu.py's). Tokens attended: a count that is not a
multiple of 8 (7 of every 8 steps) takes the tokens-first products, one that is takes the other.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from common import machine
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.evaluate.dispatch import decode_step_ops
from factorconv.modeling import modeling_factorconv

SOURCE = dict(  # Llama-3.1-8B's head layout at a small width
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=8, head_dim=16, max_position_embeddings=4096,
)
TARGETS = {  # 25% of the source's 2 · 8 · 16 = 256 KV numbers per token and layer
    "TPA R_K=R_V=2": dict(rank_k=2, rank_v=2),
    "TPA contextual R_K=R_V=1": dict(rank_k=1, rank_v=1, contextual=True),  # (R·(h + D) per factor: 48 of 128)
    "MFA d_K=d_V=32": dict(to="mfa", key_dim=32, value_dim=32),
    "MFA-KR d_R=d_N=32": dict(to="mfa_kr", rope_dim=32, nope_dim=32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 1025], help="tokens the step attends over")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--path", default="gpu", choices=["gpu", "cpu"], help="which decode path to count")
    parser.add_argument("--breakdown", action="store_true", help="also print each model's kernels by op")
    args = parser.parse_args()
    if args.path == "gpu":
        modeling_factorconv.fused_decode_applies = lambda key: False
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        source_dir = Path(tmp) / "source"
        LlamaForCausalLM(LlamaConfig(**SOURCE)).save_pretrained(source_dir)
        models = {"source (LlamaAttention, SDPA)": source_dir}
        for name, options in TARGETS.items():
            out = Path(tmp) / name.replace(" ", "_")
            convert(ConvertOptions(source=str(source_dir), output=out, **options), progress=False)
            models[name] = out
        print(f"decode-step ops, {args.path} path, {args.dtype}, 32 heads / 8 KV heads, {SOURCE['num_hidden_layers']} layers "
              f"(a step: the layers, embedding, norms and head), {machine()}\n")
        print("| model | batch × tokens | kernels / layer | views / layer | kernels / step | views / step |")
        print("|---|---|---:|---:|---:|---:|")
        breakdowns = {}
        for name, folder in models.items():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            for batch in args.batch:
                for tokens in args.tokens:
                    ops = decode_step_ops(model, batch, tokens)
                    print(
                        f"| {name} | {batch} × {tokens} | {ops.attention.total()} | {ops.attention.total(views=True)}"
                        f" | {ops.step.total()} | {ops.step.total(views=True)} |"
                    )
                    breakdowns.setdefault(name, dict(ops.attention.kernels))
        if args.breakdown:
            print("\nkernels of one attention layer by op (first batch × tokens):\n")
            for name, kernels in breakdowns.items():
                print(f"- {name}: " + ", ".join(f"{op} {n}" for op, n in sorted(kernels.items())))


if __name__ == "__main__":
    main()
