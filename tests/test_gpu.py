"""CUDA paths: conversion on the GPU matches the CPU conversion; bf16 decoding from factor caches. Skips without CUDA."""

import pytest
import torch
from conftest import random_ids

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.modeling import CACHE_KEY, output_cache

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
def test_cuda_generation_from_factor_cache(options, converted, load_model):
    """fp32 on CUDA: cached greedy decoding gives the no-cache tokens; bf16: cached steps match full forwards."""
    from transformers import AutoModelForCausalLM

    folder = converted("llama_gqa", **options)
    ids = random_ids(2, 12, seed=5).cuda()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        assert torch.equal(fp32.generate(ids, **kwargs), fp32.generate(ids, use_cache=False, **kwargs))
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        full = bf16(ids).logits.float()
        prefix = bf16(ids[:, :8], use_cache=True)
        cache = output_cache(prefix)
        steps = [bf16(ids[:, t : t + 1], **{CACHE_KEY: cache}).logits.float() for t in range(8, 12)]
        reference = load_model(folder)(ids.cpu()).logits.cuda()
    scale = reference.abs().max().item()
    # Decoding from factors and the full forward round differently in bf16, within bf16's precision.
    assert (torch.cat(steps, dim=1) - full[:, 8:]).abs().max().item() < 0.05 * scale
    assert (full - reference).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("padded", [False, True], ids=["no padding", "left padding"])
@pytest.mark.parametrize("options", [*TARGETS, dict(to="tpa", rank_k=1, rank_v=1, contextual=True)], ids=str)
def test_cuda_prefill_through_cudnn_equals_transformers_sdpa(options, padded, converted, monkeypatch):
    """Prefill hands SDPA the rebuilt key/value heads as they are (MFA/MFA-KR: grouped; MFA-KR's values narrower
    than its keys; TPA: one per query head) where cuDNN takes them; the fallback goes through transformers'
    wrapper (heads repeated under a mask, values padded). Both compute the same attention."""
    from transformers import AutoModelForCausalLM

    from factorconv.modeling import modeling_factorconv as modeling

    folder = converted("llama_gqa", **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = random_ids(2, 40, seed=3).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    calls = []
    applies = modeling.cudnn_attention_applies
    monkeypatch.setattr(modeling, "cudnn_attention_applies", lambda *a: calls.append(applies(*a)) or calls[-1])
    with torch.no_grad():
        direct = model(ids, attention_mask=mask).logits.float()
        monkeypatch.setattr(modeling, "cudnn_attention_applies", lambda *a: False)
        fallback = model(ids, attention_mask=mask).logits.float()
    assert calls, "the prefill never asked whether cuDNN applies"
    if not any(calls):
        pytest.skip("this GPU's cuDNN attention does not take these shapes (the fallback ran twice)")
    keep = mask.bool()
    scale = fallback.abs().max().item()
    assert (direct - fallback)[keep].abs().max().item() < 0.02 * scale


@pytest.mark.parametrize("target", ["tpa", "mfa", "mfa_kr"])
def test_cuda_refinement_in_bf16_autocast_fits_as_well_as_float32_on_cpu(target, source_dirs, tmp_path):
    """Refinement's Adam steps run under bf16 autocast on CUDA (precision.fitting_autocast); the errors it reaches
    are those of the float32 CPU steps, up to the noise of a different device's arithmetic."""
    import json

    import numpy as np

    calib = tmp_path / "calib.npy"
    np.save(calib, random_ids(1, 32 * 80, seed=5)[0].numpy().astype(np.uint16))
    reports = {}
    for device in ("cpu", "cuda"):
        out = convert(ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / device, to=target,
                                     kv_budget=0.5, calib=str(calib), calib_samples=80, calib_seq_len=32,
                                     refine_steps=60, device=device), progress=False)
        reports[device] = json.loads((out / "factorconv_report.json").read_text())["layers"]
    cuda_after = sum(layer["refined_attention_error"] for layer in reports["cuda"])
    cpu_after = sum(layer["refined_attention_error"] for layer in reports["cpu"])
    before = sum(layer["attention_error"] for layer in reports["cuda"])
    assert cuda_after < before
    assert cuda_after < 1.05 * cpu_after + 1e-3
