"""Every target at the same KV budgets: TPA, MFA, MFA-KR and mean-pooled GQA, zero-shot (no fine-tuning).

    python benchmarks/targets.py [--model ../shared/real/stories260K-hf] [--data .../valid.tok512.npy]

Budget f of the source's KV bytes per token: MFA d_K = d_V and MFA-KR d_R = d_N = f·g·D; TPA R_K = R_V = f·g
and mean-pooled GQA with f·g KV heads where those are whole numbers. Prints a Markdown table.
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

BUDGETS = (1.0, 0.5, 0.25, 0.125)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REAL / "stories260K-hf")
    parser.add_argument("--data", type=Path, default=REAL / "tinystories" / "valid.tok512.npy")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
    args = parser.parse_args()
    tokens = load_tokens(args.data, max_tokens=args.max_tokens)
    source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    kv_heads, head_dim = source.config.num_key_value_heads, source.config.head_dim
    rows = [measure("source", source, tokens, args.seq_len, None, 0.0)]
    base_ppl = rows[0]["ppl"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        for budget in BUDGETS:
            tag = f"{budget:.1%}:"
            width = int(budget * kv_heads * head_dim)
            rank = budget * kv_heads
            if rank == int(rank) and rank >= 1:
                model, seconds = convert_and_load(args.model, out, rank_k=int(rank), rank_v=int(rank))
                rows.append(measure(f"{tag} TPA R_K=R_V={int(rank)}", model, tokens, args.seq_len, base_ppl, seconds))
                if int(rank) < kv_heads and kv_heads % int(rank) == 0:
                    start = time.perf_counter()
                    pooled = mean_pooled_gqa(source, int(rank))
                    seconds = time.perf_counter() - start
                    rows.append(measure(f"{tag} mean-pooled GQA", pooled, tokens, args.seq_len, base_ppl, seconds))
            key = width - width % 2
            model, seconds = convert_and_load(args.model, out, to="mfa", key_dim=key, value_dim=width)
            rows.append(measure(f"{tag} MFA d_K={key} d_V={width}", model, tokens, args.seq_len, base_ppl, seconds))
            model, seconds = convert_and_load(args.model, out, to="mfa_kr", rope_dim=key, nope_dim=width)
            rows.append(measure(f"{tag} MFA-KR d_R={key} d_N={width}", model, tokens, args.seq_len, base_ppl, seconds))
    print_table(rows, args.model, args.data, tokens.numel(), args.seq_len)


if __name__ == "__main__":
    main()
