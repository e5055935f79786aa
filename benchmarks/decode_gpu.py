"""Decoding speed and memory of every target against its source, at real model shapes and long contexts.

    python benchmarks/decode_gpu.py [--shapes 8b|1b|tiny] [--grid 1x4096,16x4096,4x32768,1x131072]
        [--budgets 0.25,0.125] [--caches dynamic,static] [--static-grid 4x32768] [--steps 40] [--device cuda|cpu]

Random weights in the converted shapes (speed and memory depend on shapes only; `convert_cost.py` times real
conversions), bf16, HF `generate`, greedy. For each model and batch × context cell:
  - decode step: a logits processor takes a timestamp after `torch.cuda.synchronize()` at every step; the step
    time is the median gap over `--steps` steps (after `--skip` warm-up steps, which hold the compilation of the
    static-cache decode), with the 10th–90th percentile;
  - prefill: time to the first timestamp, median of the main run and `--prefill-repeats` more (static cache: of
    the repeats only, as the main run holds the compilation);
  - GPU busy (dynamic cache): the summed kernel time of a decode step under the profiler; the rest of the step
    is the GPU waiting for the host to launch kernels (HF's eager loop);
  - peak memory (max allocated during the main run), parameter bytes, cache bytes measured from the cache that
    generate returned, and the memory floor of a step, (parameter + cache bytes) / read bandwidth, the bandwidth
    measured in the same run (a large bf16 reduction, median of 20);
  - the largest batch at `--fit-context` that fits in `--fit-gib`, estimated from the measured per-sequence
    memory of the largest-batch cell at that context (peak minus parameters, divided by the batch).
The static cache is what `cache_implementation="static"` builds; on CUDA generate then compiles the decode step
(torch.compile, mode reduce-overhead: CUDA graphs). A micro-benchmark first times one layer's decode attention
through each kernel the model can choose. Rows go to stdout as a Markdown table and to `--json`.
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA_3_1_8B, LLAMA_3_2_1B, TINY_LLAMA, machine  # noqa: E402

from factorconv.convert.conversion import resolve_plan  # noqa: E402
from factorconv.convert.options import ConvertOptions  # noqa: E402
from factorconv.convert.plan import plan_target  # noqa: E402
from factorconv.convert.source import SourceCheckpoint  # noqa: E402
from factorconv.evaluate.kv_cache import cache_bytes  # noqa: E402
from factorconv.modeling import CACHE_KEY, FactorConvForCausalLM, output_cache  # noqa: E402
from factorconv.modeling.modeling_factorconv import single_head_attention  # noqa: E402

SHAPES = {"8b": LLAMA_3_1_8B, "1b": LLAMA_3_2_1B, "tiny": TINY_LLAMA}
TARGETS = ("tpa", "mfa", "mfa-kr")


class StepClock(LogitsProcessor):
    """Records a synchronized timestamp each time generate asks for the next token's scores."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def read_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes per second a full read of a large bf16 tensor achieves (median of 20 reductions)."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    size = x.numel() * x.element_size()
    times = []
    for _ in range(22):
        sync(device)
        start = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        times.append(time.perf_counter() - start)
    return size / statistics.median(times[2:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def target_config(source_config: LlamaConfig, to: str, budget: float):
    """The converted model's config for a KV budget, planned from config.json alone (uniform widths)."""
    with tempfile.TemporaryDirectory() as tmp:
        source_config.save_pretrained(tmp)
        options = ConvertOptions(source=tmp, output=Path(tmp) / "out", to=to, kv_budget=budget)
        source = SourceCheckpoint(Path(tmp), require_weights=False)
        return plan_target(resolve_plan(options), source, None).config


def label(config) -> str:
    if not hasattr(config, "attention"):
        return f"source (GQA {config.num_attention_heads}/{config.num_key_value_heads})"
    if config.attention == "tpa":
        return f"TPA R_K={config.tpa_rank_k[0]}, R_V={config.tpa_rank_v[0]}"
    if config.attention == "mfa":
        return f"MFA d_K={config.key_dim[0]}, d_V={config.value_dim[0]}"
    return f"MFA-KR d_R={config.rope_dim[0]}, d_N={config.nope_dim[0]}"


def build(config, device: torch.device) -> torch.nn.Module:
    """The model with random weights, created in bf16 on the device (no float32 copy on the way)."""
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    cls = FactorConvForCausalLM if hasattr(config, "attention") else LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    gc.collect()
    return model.eval()


@torch.no_grad()
def measure_cell(model, batch: int, context: int, cache: str, args, device: torch.device) -> dict:
    """One batch × context cell: prefill, per-step decode times, peak memory and cache bytes."""
    generator = torch.Generator().manual_seed(batch * 7 + context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(device)
    new = args.skip + args.steps + 1
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache == "static":
        common["cache_implementation"] = "static"
    if args.prefill_chunk:
        common["prefill_chunk_size"] = args.prefill_chunk
    clock = StepClock(device)
    resting = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()  # parameters and anything else held before generate starts
    start = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=new, min_new_tokens=new, logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True, **common,
    )
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    cached = cache_bytes(output_cache(out))
    busy = gpu_busy_per_step(model, out) if device.type == "cuda" and cache == "dynamic" else None
    prefills = [clock.stamps[0] - start]
    del out
    for _ in range(args.prefill_repeats):
        again = StepClock(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, logits_processor=LogitsProcessorList([again]), **common)
        prefills.append(again.stamps[0] - start)
    if cache == "static" and len(prefills) > 1:
        prefills = prefills[1:]  # the main run compiled the static-cache forward on its way to the first token
    gaps = [b - a for a, b in zip(clock.stamps[args.skip :], clock.stamps[args.skip + 1 :])]
    quantiles = statistics.quantiles(gaps, n=10)
    return {
        "batch": batch, "context": context, "cache": cache, "cache_bytes": cached, "peak_bytes": peak, "resting_bytes": resting,
        "prefill_s": statistics.median(prefills), "prefill_min_s": min(prefills), "prefill_max_s": max(prefills),
        "step_s": statistics.median(gaps), "step_p10_s": quantiles[0], "step_p90_s": quantiles[-1], "steps": len(gaps),
        "gpu_busy_s": busy,
    }


def gpu_busy_per_step(model, out, steps: int = 5) -> float:
    """Summed GPU kernel time of one dynamic-cache decode step, s (model forward on the cache generate returned,
    under the profiler, mean of `steps`): beside the step's wall time it says how much of the step the GPU works
    and how much it waits for the host to launch kernels."""
    from torch.profiler import ProfilerActivity, profile

    cache, token = output_cache(out), out.sequences[:, -1:]
    length = cache.get_seq_length()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            mask = torch.ones(token.shape[0], length + i + 1, dtype=torch.long, device=token.device)
            logits = model(token, attention_mask=mask, use_cache=True, logits_to_keep=1, **{CACHE_KEY: cache}).logits
            token = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e6 / steps


@torch.no_grad()
def attention_kernels(device: torch.device, cells: list[tuple[int, int]], heads: int, widths: list[tuple[int, int]]):
    """One layer's decode attention (every head against one cached head, with a padding mask) through SDPA, two
    query-first matrix products, and the model's own `single_head_attention`, at each context and one token more
    (a token count that is not a multiple of 8, as 7 of every 8 steps of a growing cache have): median of 50
    synchronized calls, ms."""
    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"), scaling=1.0)
    rows = []
    for batch, base in cells:
        for context in (base, base + 1):
            for key_width, value_width in widths:
                q = torch.randn(batch, heads, 1, key_width, dtype=torch.bfloat16, device=device)
                k = torch.randn(batch, 1, context, key_width, dtype=torch.bfloat16, device=device)
                v = torch.randn(batch, 1, context, value_width, dtype=torch.bfloat16, device=device)
                mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=device)
                folded = q.transpose(1, 2)

                def query_first():  # scores as query @ keyᵀ, whatever the token count
                    scores = torch.matmul(folded, k.transpose(2, 3)).float().masked_fill(~mask, -1e30)
                    return torch.matmul(scores.softmax(-1).to(q.dtype), v)

                variants = {
                    "sdpa+mask": lambda: torch.nn.functional.scaled_dot_product_attention(folded, k, v, attn_mask=mask),
                    "query-first": query_first,
                    "model": lambda: single_head_attention(module, q, k, v, mask),
                }
                row = {"batch": batch, "context": context, "key_width": key_width, "value_width": value_width}
                for name, fn in variants.items():
                    try:
                        times = []
                        for _ in range(55):
                            sync(device)
                            start = time.perf_counter()
                            fn()
                            sync(device)
                            times.append(time.perf_counter() - start)
                        row[name] = statistics.median(times[5:]) * 1e3
                    except RuntimeError as err:  # a backend that refuses these shapes
                        row[name] = str(err).splitlines()[0][:60]
                row["read_mib"] = (k.numel() + v.numel()) * 2 / 2**20
                rows.append(row)
                del q, k, v
    return rows


def parse_grid(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in cell.split("x")) for cell in text.split(",") if cell]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="8b")
    parser.add_argument("--grid", default="1x4096,16x4096,4x32768,1x131072", help="batch x context cells")
    parser.add_argument("--budgets", default="0.25,0.125", help="fractions of the source's KV bytes")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--caches", default="dynamic,static")
    parser.add_argument("--static-grid", default=None, help="cells for the static cache (default: --grid)")
    parser.add_argument("--no-source", action="store_true", help="targets only (the source measured elsewhere)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=6, help="decode steps not timed (compilation, warm-up)")
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, help="generate's prefill_chunk_size (bounds prefill activations)")
    parser.add_argument("--fit-context", type=int, default=32768)
    parser.add_argument("--fit-gib", type=float, default=120.0)
    parser.add_argument("--kernels", action="store_true", help="also the decode-attention micro-benchmark")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--tables-from", type=Path, nargs="+", help="print the tables of earlier --json files")
    args = parser.parse_args()
    if args.tables_from:
        runs = [json.loads(path.read_text()) for path in args.tables_from]
        merged = {**runs[0], "models": [m for run in runs for m in run["models"]]}
        merged["kernels"] = [k for run in runs for k in run.get("kernels", [])]
        print_tables(merged, args.fit_context, args.fit_gib)
        return
    device = torch.device(args.device)
    source_config = LlamaConfig(**SHAPES[args.shapes], architectures=["LlamaForCausalLM"])
    grid, static_grid = parse_grid(args.grid), parse_grid(args.static_grid or args.grid)
    caches = args.caches.split(",")
    bandwidth = read_bandwidth(device, 4.0) if device.type == "cuda" else None  # a CPU sum is not bandwidth-bound
    result = {"machine": machine(), "shapes": args.shapes, "bandwidth": bandwidth}
    print(result, flush=True)
    if args.kernels:
        widths = sorted({(w, w) for w in (128, 256)} | {(512, 256), (256, 128)})
        result["kernels"] = attention_kernels(device, [(4, 32768), (1, 131072)], source_config.num_attention_heads, widths)
        for row in result["kernels"]:
            print(row, flush=True)
    configs = [] if args.no_source else [source_config]
    for budget in [float(b) for b in args.budgets.split(",")]:
        configs += [target_config(source_config, to, budget) for to in args.targets.split(",")]
    result["models"] = []
    for config in configs:
        model = build(config, device)
        entry = {"model": label(config), "params": sum(p.numel() for p in model.parameters()), "cells": []}
        entry["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        for cache in caches:
            for batch, context in grid if cache == "dynamic" else static_grid:
                try:
                    cell = measure_cell(model, batch, context, cache, args, device)
                except torch.OutOfMemoryError:
                    cell = {"batch": batch, "context": context, "cache": cache, "oom": True}
                entry["cells"].append(cell)
                print(entry["model"], cell, flush=True)
        result["models"].append(entry)
        if args.json:  # after every model, so a run stopped at its time limit keeps what it measured
            args.json.write_text(json.dumps(result, indent=1))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print_tables(result, args.fit_context, args.fit_gib)


def print_tables(result: dict, fit_context: int, fit_gib: float) -> None:
    bandwidth = result["bandwidth"]
    where = f"read bandwidth {bandwidth / 1e9:,.0f} GB/s" if bandwidth else "no memory floor on a CPU"
    print(f"\n{result['machine']}, bf16, {result['shapes']} shapes (random weights), HF generate, greedy; {where}\n")
    print("| batch × context | cache | model | params GB | cache GiB | peak GiB | prefill s | decode step ms (p10–p90) "
          "| GPU busy ms | vs source | % of memory floor |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    cells = sorted({(c["batch"], c["context"], c["cache"]) for m in result["models"] for c in m["cells"]},
                   key=lambda c: (c[1] * c[0], c[2]))
    for batch, context, cache in cells:
        base = None
        for model in result["models"]:
            cell = next((c for c in model["cells"] if (c["batch"], c["context"], c["cache"]) == (batch, context, cache)), None)
            if cell is None:
                continue
            where = f"| {batch} × {context // 1024}K | {cache} | {model['model']} | {model['param_bytes'] / 1e9:.1f} |"
            if cell.get("oom"):
                print(f"{where} out of memory | | | | | | | |")
                continue
            if model["model"].startswith("source"):
                base = cell["step_s"]
            floor = f"{(model['param_bytes'] + cell['cache_bytes']) / bandwidth / cell['step_s']:.0%}" if bandwidth else ""
            versus = f"{cell['step_s'] / base:.2f}×" if base else ""
            peak = f"{cell['peak_bytes'] / 2**30:.1f}" if cell["peak_bytes"] is not None else ""
            busy = f"{cell['gpu_busy_s'] * 1e3:.1f}" if cell.get("gpu_busy_s") else ""
            print(f"{where} {cell['cache_bytes'] / 2**30:.2f} | {peak} | {cell['prefill_s']:.2f} | "
                  f"{cell['step_s'] * 1e3:.1f} ({cell['step_p10_s'] * 1e3:.1f}–{cell['step_p90_s'] * 1e3:.1f}) | "
                  f"{busy} | {versus} | {floor} |")
    print(f"\nLargest batch at {fit_context // 1024}K context in {fit_gib:.0f} GiB (estimated from the measured "
          "per-sequence memory of the largest batch measured at that context, dynamic cache):\n")
    print("| model | measured at batch | GiB per sequence | largest batch |")
    print("|---|---:|---:|---:|")
    for model in result["models"]:
        cells = [c for c in model["cells"] if c["context"] == fit_context and c["cache"] == "dynamic"
                 and not c.get("oom") and c["peak_bytes"] is not None]
        if not cells:
            continue
        cell = max(cells, key=lambda c: c["batch"])
        per_sequence = (cell["peak_bytes"] - model["param_bytes"]) / cell["batch"]
        largest = int((fit_gib * 2**30 - model["param_bytes"]) // per_sequence)
        print(f"| {model['model']} | {cell['batch']} | {per_sequence / 2**30:.2f} | {largest} |")
    def variants_of(row: dict) -> tuple[str, ...]:  # a run's kernel columns (earlier runs timed other variants)
        return tuple(k for k in row if k not in ("batch", "context", "key_width", "value_width", "read_mib"))

    for variants in dict.fromkeys(variants_of(row) for row in result.get("kernels", [])):
        print("\nOne layer's decode attention, every head against one cached head (ms, median of 50; model: "
              "`single_head_attention`, with a padding mask like the other masked variants):\n")
        print("| batch × tokens | key/value width | MiB read | " + " | ".join(variants) + " |")
        print("|---|---|---:|" + "---:|" * len(variants))
        for row in result["kernels"]:
            if variants_of(row) == variants:
                values = [row[k] if isinstance(row[k], str) else f"{row[k]:.3f}" for k in variants]
                print(f"| {row['batch']} × {row['context']:,} | {row['key_width']}/{row['value_width']} | "
                      f"{row['read_mib']:.0f} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
