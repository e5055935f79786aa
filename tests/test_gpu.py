"""CUDA paths: conversion on the GPU matches the CPU conversion; bf16 decoding from factor caches. Skips without CUDA."""

import pytest
import torch

from conftest import random_ids
from factorconv.convert import convert
from factorconv.recipe import ConvertOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TARGETS = [dict(to="tpa", rank_k=1, rank_v=1), dict(to="mfa", key_dim=16, value_dim=16), dict(to="mfa_kr", rope_dim=16, nope_dim=16)]


@pytest.mark.parametrize("options", TARGETS, ids=lambda o: o["to"])
def test_cuda_conversion_matches_cpu(options, source_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = random_ids(2, 24, seed=9)
    logits = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        convert(ConvertOptions(source=str(source_dirs["llama_gqa"]), output=out, device=device, **options), progress=False)
        with torch.no_grad():
            logits[device] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    # SVD / eigenvector signs may differ between devices, the function the model computes may not.
    assert (logits["cpu"] - logits["cuda"]).abs().max().item() < 1e-3


@pytest.mark.parametrize("options", [dict(to="tpa"), dict(to="tpa", contextual=True), *TARGETS], ids=str)
def test_bf16_cuda_generation_matches_no_cache(options, converted, load_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted("llama_gqa", **options), dtype=torch.bfloat16).cuda().eval()
    ids = random_ids(2, 12, seed=5).cuda()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        fp32 = load_model(converted("llama_gqa", **options))(ids.cpu()).logits
        bf16 = model(ids).logits.float().cpu()
    # bf16 rounding may flip a near-tie late in the sequence: require the first 8 new tokens to agree.
    assert torch.equal(cached[:, : 12 + 8], uncached[:, : 12 + 8])
    assert (bf16 - fp32).abs().max().item() < 0.1 * fp32.abs().max().item()
