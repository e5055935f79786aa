"""Long-context decoding on a GPU: KV-cache memory and speed of each target vs the source, Llama-3.2-1B shapes.

    python benchmarks/decode_gpu.py [--batch 16] [--prompt 4096] [--new 128] [--budget 0.25]

Random weights (no download): speed and memory depend on shapes only. Converts the source to TPA, MFA and
MFA-KR at `--budget` of its KV bytes (conversion on the GPU), then for each model times a prefill of
`--prompt` tokens and greedy decoding of `--new` tokens at `--batch`, reading the cache that generate() built.
Prints a Markdown table.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from common import LLAMA_3_2_1B
from factorconv.convert import convert
from factorconv.evaluate.kv_cache import cache_bytes
from factorconv.modeling import output_cache
from factorconv.recipe import ConvertOptions

@torch.no_grad()
def run(model, batch: int, prompt: int, new: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up at the measured shapes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    prefill = float("inf")
    for _ in range(2):  # best of two: a prefill is one step, easily disturbed
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        torch.cuda.synchronize()
        prefill = min(prefill, time.perf_counter() - start)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True, **kwargs)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    cache = output_cache(out)
    return {
        "cache_gib": cache_bytes(cache) / 2**30,
        "bytes_per_token": cache_bytes(cache) / (batch * cache.get_seq_length()),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "prefill_s": prefill,
        "decode_tok_s": batch * (new - 1) / max(total - prefill, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_3_2_1B)
    width = int(args.budget * cfg.num_key_value_heads * cfg.head_dim)
    targets = {
        "source (GQA 32/8)": None,
        f"TPA R_K=R_V={int(args.budget * cfg.num_key_value_heads)}": dict(
            to="tpa", rank_k=int(args.budget * cfg.num_key_value_heads), rank_v=int(args.budget * cfg.num_key_value_heads)
        ),
        f"MFA d_K=d_V={width}": dict(to="mfa", key_dim=width, value_dim=width),
        f"MFA-KR d_R=d_N={width}": dict(to="mfa_kr", rope_dim=width, nope_dim=width),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(source)
        del model
        for name, options in targets.items():
            folder, seconds = source, 0.0
            if options is not None:
                start = time.perf_counter()
                folder = convert(
                    ConvertOptions(source=str(source), output=Path(tmp) / "out", overwrite=True, device="cuda", **options),
                    progress=False,
                )
                seconds = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
            try:
                rows.append({"model": name, "convert_s": seconds, **run(model, args.batch, args.prompt, args.new)})
            except torch.OutOfMemoryError:
                rows.append({"model": name, "convert_s": seconds, "oom": True})
            del model
            torch.cuda.empty_cache()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch {args.batch}, "
        f"prompt {args.prompt}, {args.new} new tokens, Llama-3.2-1B shapes (random weights)\n"
    )
    print("| model | KV bytes/token | cache GiB | peak GiB | prefill s | decode tok/s | convert s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['model']} | out of memory | | | | | {r['convert_s']:.1f} |")
            continue
        print(
            f"| {r['model']} | {r['bytes_per_token']:,.0f} | {r['cache_gib']:.2f} | {r['peak_gib']:.1f} | "
            f"{r['prefill_s']:.2f} | {r['decode_tok_s']:,.0f} | {r['convert_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
