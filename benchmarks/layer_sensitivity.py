"""Which layers' conversion error perplexity feels: convert a model, then put each converted attention layer alone
into the source and measure the perplexity ratio.

    python benchmarks/layer_sensitivity.py [--model SmolLM2-135M] [--to mfa_kr] [--kv-budget 0.5] [--refine-steps 0]

The per-layer ratios are measured on text neither the calibration nor the evaluation uses: the last
`--probe-tokens` tokens of the calibration slice (calibration reads only its first samples × seq_len tokens).
Beside them, each layer's held-out relative attention-output error from the conversion report, to show how far
that error (what refinement and allocation minimise today) is from what perplexity sees.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import convert_and_load, machine, text_slice
from factorconv.convert.calibrate import AsSourceAttention
from factorconv.data import load_tokens
from factorconv.evaluate.perplexity import perplexity
from quality import MODELS, SMOLLM2, model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="SmolLM2-135M")
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2)
    parser.add_argument("--to", default="mfa_kr")
    parser.add_argument("--kv-budget", type=float, default=0.5)
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--probe-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    spec = model_spec(args.model, args.smollm2)
    seq_len = spec["seq_len"]
    with tempfile.TemporaryDirectory() as tmp:
        calib, evaluation = text_slice(spec["calib"], Path(tmp)), text_slice(spec["eval"], Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
        probe = load_tokens(calib, tokenizer)[-args.probe_tokens:]
        eval_tokens = load_tokens(evaluation, tokenizer, max_tokens=spec.get("eval_tokens", 65536))
        start = time.perf_counter()
        model, seconds = convert_and_load(spec["folder"], Path(tmp) / "out", to=args.to, kv_budget=args.kv_budget,
                                          calib=str(calib), refine_steps=args.refine_steps, device=args.device)
        report = json.loads((Path(tmp) / "out" / "factorconv_report.json").read_text())["layers"]
    source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
    whole = perplexity(model, eval_tokens, seq_len, progress=False) / perplexity(source, eval_tokens, seq_len, progress=False)
    base = perplexity(source, probe, seq_len, progress=False)
    rows = []
    for layer, entry in enumerate(report):
        original = source.model.layers[layer].self_attn
        source.model.layers[layer].self_attn = AsSourceAttention(model.model.layers[layer].self_attn)
        rows.append((layer, entry["attention_error"], entry["refined_attention_error"],
                     perplexity(source, probe, seq_len, progress=False) / base))
        source.model.layers[layer].self_attn = original
        print(f"layer {layer}: {rows[-1][-1]:.4f}", file=sys.stderr, flush=True)
    print(f"\n### {args.model} -> {args.to} at {args.kv_budget:.0%} of the KV bytes, refinement {args.refine_steps} "
          f"steps: whole-model perplexity ratio {whole:.3f}x on {eval_tokens.numel():,} eval tokens; per-layer ratios on "
          f"{probe.numel():,} probe tokens (the calibration text's tail); convert {seconds:.0f} s, total "
          f"{time.perf_counter() - start:.0f} s; fp32; {machine()}\n")
    print("| layer | attention error | after refinement | ppl ratio, this layer alone |")
    print("|---:|---:|---:|---:|")
    for layer, before, after, ratio in rows:
        print(f"| {layer} | {before:.3f} | {after:.3f} | {ratio:.4f}x |")
    ratios = [r[-1] for r in rows]
    print(f"\nproduct of the per-layer ratios {torch.tensor(ratios).prod():.3f}x; largest {max(ratios):.4f}x "
          f"(layer {ratios.index(max(ratios))}), smallest {min(ratios):.4f}x (layer {ratios.index(min(ratios))})")


if __name__ == "__main__":
    main()
