"""Healing demo on real weights: stories260K converted to TPA at R_K = R_V = 1 (a quarter of its KV bytes),
then healed by distillation from the source on TinyStories text, on CPU in a few minutes.

    python benchmarks/heal_stories.py [--steps 400] [--lr 2e-2] [--trainable attention] [--out out/heal-stories]

Prints the perplexity on TinyStories-valid.txt (held out: never trained on) before conversion, after conversion
and after healing, as a Markdown table. Training text: ../shared/real/tinystories/tinystories.txt.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import REAL, measure
from transformers import AutoModelForCausalLM, AutoTokenizer

import factorconv
from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.data import load_tokens
from factorconv.finetune import FinetuneOptions, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REAL / "stories260K-hf")
    parser.add_argument("--train", type=Path, default=REAL / "tinystories" / "tinystories.txt")
    parser.add_argument("--valid", type=Path, default=REAL / "tinystories" / "TinyStories-valid.txt")
    parser.add_argument("--rank", type=int, default=1, help="TPA R_K = R_V")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seq-len", type=int, default=512, help="training blocks and eval windows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--trainable", default="attention", choices=["attention", "attention+norms", "all"])
    parser.add_argument("--out", type=Path, help="keep the converted and healed folders here (default: temporary)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a 260K model gains nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} not found: this demo needs ../shared/real beside the checkout")

    tokens = load_tokens(args.valid, AutoTokenizer.from_pretrained(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        rows = [measure("source (before conversion)", source, tokens, args.seq_len, None, 0.0)]
        base = rows[0]["ppl"]

        start = time.perf_counter()
        converted = convert(
            ConvertOptions(
                source=str(args.model), output=root / "tpa", rank_k=args.rank, rank_v=args.rank, overwrite=True
            ),
            progress=False,
        )
        seconds = time.perf_counter() - start
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
        label = f"TPA R_K=R_V={args.rank}, converted"
        rows.append(measure(label, model, tokens, args.seq_len, base, seconds))

        start = time.perf_counter()
        healed = finetune(
            FinetuneOptions(
                model=str(converted),
                output=root / "tpa-healed",
                data=[str(args.train)],
                eval_data=str(args.valid),
                steps=args.steps,
                lr=args.lr,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                trainable=args.trainable,
                eval_every=max(1, args.steps // 4),
                device="cpu",
                overwrite=True,
            ),
            progress=False,
        )
        seconds = time.perf_counter() - start
        model = AutoModelForCausalLM.from_pretrained(healed, dtype=torch.float32).eval()
        rows.append(measure(f"TPA R_K=R_V={args.rank}, healed", model, tokens, args.seq_len, base, seconds))
        summary = json.loads((healed / "finetune_summary.json").read_text())

    threads = torch.get_num_threads()
    print(
        f"model: {args.model.name}, eval: {args.valid.name} ({tokens.numel():,} tokens, windows of {args.seq_len}), "
        f"healing: {summary['steps']} steps, {summary['tokens']:,} tokens of {args.train.name}, "
        f"trainable {args.trainable} ({summary['trainable_parameters']:,} of {summary['parameters']:,} parameters), "
        f"lr {args.lr:g}, {summary['tokens_per_s']:,.0f} tokens/s; fp32, {platform.machine()} CPU "
        f"({threads} thread{'s' if threads != 1 else ''}), torch {torch.__version__}, "
        f"factorconv {factorconv.__version__}\n"
    )
    print("| model | KV bytes/token | of source | perplexity | ratio | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['kv_bytes']:,} | {r['kv_bytes'] / rows[0]['kv_bytes']:.1%} | {r['ppl']:.3f} | "
            f"{r['ratio']:.2f}x | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
