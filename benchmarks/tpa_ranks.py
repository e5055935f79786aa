"""TPA rank sweep on a real pretrained GQA model: perplexity and KV bytes/token vs mean-pooled GQA.

    python benchmarks/tpa_ranks.py [--model ../shared/real/stories260K-hf] [--data .../valid.tok512.npy]

Prints a Markdown table (the one quoted in README.md). CPU is enough: the model has 260K parameters.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common import REAL, convert_and_load, measure, print_table
from factorconv.evaluate.baselines import mean_pooled_gqa
from factorconv.data import load_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REAL / "stories260K-hf")
    parser.add_argument("--data", type=Path, default=REAL / "tinystories" / "valid.tok512.npy")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    tokens = load_tokens(args.data)
    source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    kv_heads = source.config.num_key_value_heads
    rows = [measure("source (GQA)", source, tokens, args.seq_len, None, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(kv_heads, 0, -1):
            model, seconds = convert_and_load(args.model, Path(tmp) / "out", rank_k=rank, rank_v=rank)
            rows.append(measure(f"TPA R_K=R_V={rank} (head-mode SVD)", model, tokens, args.seq_len, rows[0]["ppl"], seconds))
            if kv_heads % rank == 0 and rank < kv_heads:
                start = time.perf_counter()
                pooled = mean_pooled_gqa(source, rank)
                seconds = time.perf_counter() - start
                rows.append(measure(f"mean-pooled GQA, {rank} KV heads", pooled, tokens, args.seq_len, rows[0]["ppl"], seconds))
    print_table(rows, args.model, args.data, tokens.numel(), args.seq_len)


if __name__ == "__main__":
    main()
