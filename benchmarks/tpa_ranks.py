"""TPA rank sweep on a real pretrained GQA model: perplexity and KV bytes/token vs mean-pooled GQA.

    python benchmarks/tpa_ranks.py [--model ../shared/real/stories260K-hf] [--data .../valid.tok512.npy]

Prints a Markdown table (the one quoted in README.md). CPU is enough: the model has 260K parameters.
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import factorconv
from factorconv.convert import convert
from factorconv.evaluate.baselines import mean_pooled_gqa
from factorconv.evaluate.data import load_tokens
from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token, measured_kv_bytes_per_token
from factorconv.evaluate.perplexity import perplexity
from factorconv.recipe import ConvertOptions

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


def row(name: str, model, tokens: torch.Tensor, seq_len: int, source_ppl: float | None, seconds: float) -> dict:
    ppl = perplexity(model, tokens, seq_len, progress=False)
    return {
        "method": name,
        "kv_bytes": analytic_kv_bytes_per_token(model.config, 4),
        "kv_measured": measured_kv_bytes_per_token(model),
        "ppl": ppl,
        "ratio": ppl / source_ppl if source_ppl else 1.0,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REAL / "stories260K-hf")
    parser.add_argument("--data", type=Path, default=REAL / "tinystories" / "valid.tok512.npy")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = load_tokens(args.data)
    source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    kv_heads = source.config.num_key_value_heads
    rows = [row("source (GQA)", source, tokens, args.seq_len, None, 0.0)]
    source_ppl = rows[0]["ppl"]
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(kv_heads, 0, -1):
            start = time.perf_counter()
            out = convert(
                ConvertOptions(source=str(args.model), output=Path(tmp) / f"r{rank}", rank_k=rank, rank_v=rank),
                progress=False,
            )
            seconds = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            rows.append(row(f"TPA R_K=R_V={rank} (head-mode SVD)", model, tokens, args.seq_len, source_ppl, seconds))
            if kv_heads % rank == 0 and rank < kv_heads:
                start = time.perf_counter()
                pooled = mean_pooled_gqa(source, rank)
                seconds = time.perf_counter() - start
                rows.append(row(f"mean-pooled GQA, {rank} KV heads", pooled, tokens, args.seq_len, source_ppl, seconds))
    print(f"model: {args.model.name}, data: {args.data.name} ({tokens.numel():,} tokens, windows of {args.seq_len}), "
          f"fp32, {platform.processor() or platform.machine()}, torch {torch.__version__}, factorconv {factorconv.__version__}\n")
    print("| method | KV bytes/token | measured | of source | perplexity | ratio | convert s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["kv_bytes"]
    for r in rows:
        print(f"| {r['method']} | {r['kv_bytes']:,} | {r['kv_measured']:,.0f} | {r['kv_bytes'] / base:.1%} | "
              f"{r['ppl']:.3f} | {r['ratio']:.2f}x | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
