#!/usr/bin/env bash
# Convert a real pretrained model (exactly, then to half its KV bytes with calibration) and print before/after
# tables. Uses ../shared/real/stories260K-hf when it is there, otherwise a small Llama-family model from the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
src=../shared/real/stories260K-hf
data=../shared/real/tinystories/TinyStories-valid.txt
calib=../shared/real/tinystories/train.tok512.npy
if [ ! -d "$src" ]; then
  src=HuggingFaceTB/SmolLM2-135M   # LlamaForCausalLM, GQA 9/3 heads of 64
  data=README.md
  calib=README.md
fi
factorconv -q convert "$src" out/demo-tpa --to tpa --overwrite
factorconv -q eval out/demo-tpa --compare "$src" --data "$data" --max-tokens 8192
factorconv -q convert "$src" out/demo-mfa-half --to mfa --kv-budget 0.5 --calib "$calib" \
  --calib-samples 32 --calib-seq-len 512 --refine-steps 100 --overwrite
factorconv -q eval out/demo-mfa-half --compare "$src" --data "$data" --max-tokens 8192
