#!/usr/bin/env bash
# Convert a real pretrained model to each target at half its KV bytes, and print before/after tables.
# Uses ../shared/real/stories260K-hf when it is there, otherwise a small Llama-family model from the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
src=../shared/real/stories260K-hf
data=../shared/real/tinystories/TinyStories-valid.txt
half=16      # half of KV heads × head dim (4 × 8): MFA at 50% of the source's KV bytes
if [ ! -d "$src" ]; then
  src=HuggingFaceTB/SmolLM2-135M   # LlamaForCausalLM, GQA 9/3 heads of 64
  data=README.md
  half=96
fi
factorconv -q convert "$src" out/demo-tpa --to tpa --overwrite
factorconv -q eval out/demo-tpa --compare "$src" --data "$data" --max-tokens 8192
factorconv -q convert "$src" out/demo-mfa-half --to mfa --key-dim $half --value-dim $half --overwrite
factorconv -q eval out/demo-mfa-half --compare "$src" --data "$data" --max-tokens 8192
