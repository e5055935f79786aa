"""TPA `als` and the head-mode basis from calibration tensors; MFA-KR calibrated partial RoPE + joint latent."""

import json

import numpy as np
import pytest
import torch
from conftest import random_ids
from test_cache import generate
from test_calibration import correlated_inputs, moment_of

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token, measured_kv_bytes_per_token
from factorconv.factorize.common import cholesky_whitening
from factorconv.factorize.key_reuse import key_reuse_inits, phase_average
from factorconv.factorize.tpa import tensor_product_init
from factorconv.factorize.tpa_als import fit_contextual
from factorconv.modeling.modeling_factorconv import TensorProduct, apply_rope


def _rotate(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF-style RoPE of (..., T, 2P) rows at `positions`, pair p at frequency freqs[p]."""
    angle = positions.double()[:, None] * freqs.double()[None]
    emb = torch.cat([angle, angle], dim=-1)
    return apply_rope(x, emb.cos()[None], emb.sin()[None], 1)


def test_phase_average_is_the_mean_score_over_causal_distances():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, generator=gen).double(), torch.randn(2, generator=gen).double()
    theta, context = torch.tensor([0.07]), 50
    cos, sin = phase_average(theta, context)
    # Every (query, key) pair with key ≤ query in a window of `context` tokens, scored with RoPE.
    pos = torch.arange(context)
    qr, kr = _rotate(q.expand(context, 2)[None, None], theta, pos), _rotate(k.expand(context, 2)[None, None], theta, pos)
    scores = (qr[0, 0] @ kr[0, 0].T).tril()
    mean = scores.sum() / (context * (context + 1) / 2)
    stand_in = q @ torch.stack([cos * k[0] + sin * k[1], cos * k[1] - sin * k[0]]).squeeze(-1)
    assert torch.allclose(mean, stand_in, atol=1e-12)


def _key_reuse_problem(seed: int = 0):
    """A 4-head GQA (2 KV heads, D = 8) layer whose slowest RoPE pair does not rotate at all."""
    gen = torch.Generator().manual_seed(seed)
    d, h, g, D = 32, 4, 2, 8
    weights = [torch.randn(rows, d, generator=gen) for rows in (h * D, g * D, g * D)] + [torch.randn(d, h * D, generator=gen)]
    freqs = torch.tensor([1.0, 0.3, 0.05, 0.0])
    x = correlated_inputs(64, d, seed)
    return weights, freqs, x, (h, g, D)


def _scores_and_values(init, weights, freqs, x, shape):
    """Source scores (all heads, causal) and the converted ones, plus source/converted values."""
    (wq, wk, wv, _), (h, g, D) = weights, shape
    pos = torch.arange(x.shape[0])
    q = _rotate((x.double() @ wq.double().T).view(-1, h, D).transpose(0, 1)[None], freqs, pos)
    k = _rotate((x.double() @ wk.double().T).view(-1, g, D).transpose(0, 1)[None], freqs, pos)
    source = (q @ k.repeat_interleave(h // g, dim=1).transpose(-1, -2))[0].tril()
    rope = 2 * len(init.pairs)
    c = x.double() @ init.latent.double().T
    # Each head's query in c's coordinates, from the factored maps of its source query (group j = i // (h/g)).
    q_plain = (x.double() @ wq.double().T).view(-1, h, D).transpose(0, 1)  # (h, T, D), not rotated
    group = torch.arange(h) // (h // g)
    pairs = torch.tensor(init.pairs)
    mix = torch.cat([init.rope_mix, init.rope_mix], dim=-1).double()[group]  # (h, d_R)
    rope_part = q_plain[..., torch.cat([pairs, pairs + D // 2])] * mix[:, None, :]
    qc = torch.cat([rope_part, q_plain @ init.key_up.double()[group]], dim=-1)
    pair_freqs = freqs[init.pairs]
    qc = torch.cat([_rotate(qc[None, ..., :rope], pair_freqs, pos)[0], qc[..., rope:]], dim=-1)
    c = torch.cat([_rotate(c[None, None, :, :rope], pair_freqs, pos)[0, 0], c[:, rope:]], dim=-1)
    converted = (qc @ c.T).tril()
    values = x.double() @ wv.double().T
    return source, converted, values, c[:, rope:] @ init.value.read.T


def test_moving_a_still_pair_to_nope_is_exact():
    weights, freqs, x, (h, g, D) = _key_reuse_problem()
    phase = phase_average(freqs, x.shape[0])
    moved = 2  # the 2 merged directions of the still pair (one per KV head) = 4 dims
    init = key_reuse_inits(*[(w, None) for w in weights[:3]], weights[3], h, g, g * D - 2 * moved, g * D + 2 * moved,
                           phase, D**-0.5, moment_of(x), [(True, 1.0)])[0]
    assert sorted(set(range(4)) - set(init.pairs)) == [3]  # the still pair is the one not rotated
    source, converted, values, read_back = _scores_and_values(init, weights, freqs, x, (h, g, D))
    assert torch.allclose(converted, source, atol=1e-6 * source.abs().max())
    assert torch.allclose(read_back, values, atol=1e-6 * values.abs().max())
    assert init.key_error < 1e-6 and init.value_error < 1e-6


def test_key_reuse_candidates_share_work_but_not_results():
    """Candidates computed together (shared spectra) equal each computed alone, in any order."""
    weights, freqs, x, (h, g, D) = _key_reuse_problem(seed=2)
    args = (*[(w, None) for w in weights[:3]], weights[3], h, g, 8, 16, phase_average(freqs, x.shape[0]), D**-0.5, moment_of(x))
    candidates = [(False, 0.0), (True, 0.3), (False, 1.0), (True, 1.0)]
    together = key_reuse_inits(*args, candidates)
    for (move_slow, key_weight), init in zip(reversed(candidates), reversed(together)):
        (alone,) = key_reuse_inits(*args, [(move_slow, key_weight)])
        assert init.pairs == alone.pairs and init.key_error == alone.key_error
        assert torch.equal(init.latent, alone.latent) and torch.equal(init.key_up, alone.key_up)
        assert torch.equal(init.value.read, alone.value.read)
    assert len({tuple(i.pairs) for i in together}) > 1 or len({i.key_error for i in together}) > 1  # they differ


def test_partial_rope_beats_dropping_at_the_same_width():
    """Same cache width: moving the still pair into the shared latent loses less key energy than keeping
    the strongest rotated directions and dropping the rest (MFA's choice)."""
    weights, freqs, x, (h, g, D) = _key_reuse_problem(seed=1)
    phase, moment = phase_average(freqs, x.shape[0]), moment_of(x)
    args = (*[(w, None) for w in weights[:3]], weights[3], h, g, 8, 16, phase, D**-0.5, moment)
    dropped, moved = key_reuse_inits(*args, [(False, 0.0), (True, 1.0)])
    assert 3 not in moved.pairs
    assert moved.key_error < dropped.key_error


def test_tucker_head_basis_equals_the_whitened_svd():
    """HOSVD of the calibration key tensor K[tokens, g, D]: its head-mode basis is the input-whitened head-mode
    SVD's, so `tucker` needs no code of its own (DESIGN §4.1)."""
    gen = torch.Generator().manual_seed(3)
    g, D, d, h, rank = 4, 8, 24, 8, 2
    weight, x = torch.randn(g * D, d, generator=gen).double(), correlated_inputs(4000, d, 3).double()
    keys = (x @ weight.T).reshape(-1, g, D)  # K[tokens, g, D]
    unfolded = keys.permute(1, 0, 2).reshape(g, -1)  # head-mode unfolding
    hosvd = torch.linalg.svd(unfolded, full_matrices=False)[0][:, :rank]
    init = tensor_product_init(weight, None, g, h, rank, cholesky_whitening(moment_of(x)[:d, :d]))
    svd = init.head_mix.double()[:, :: h // g].T  # (g, R): the group coefficients
    assert torch.allclose(hosvd @ hosvd.T, svd @ svd.T, atol=1e-4)


def _als_problem(seed: int = 0):
    """Two kinds of token (a marker channel says which) whose keys mix the KV heads differently: one head mix
    cannot fit both, a mix that depends on the token (a(x) = α + A x) can, at rank 1."""
    gen = torch.Generator().manual_seed(seed)
    g, D, d, h, rank, n = 4, 8, 16, 8, 1, 3000
    mix_a, mix_b = torch.randn(g, generator=gen), torch.randn(g, generator=gen)
    basis_a, basis_b = torch.randn(D, 7, generator=gen), torch.randn(D, 8, generator=gen)
    weight = torch.zeros(g, D, d)
    weight[:, :, 1:8] = mix_a[:, None, None] * basis_a
    weight[:, :, 8:] = mix_b[:, None, None] * basis_b
    weight = weight.reshape(g * D, d) + 0.01 * torch.randn(g * D, d, generator=gen)
    bias = 0.1 * torch.randn(g * D, generator=gen)
    kind = torch.rand(n, generator=gen) < 0.5
    x = torch.randn(n, d, generator=gen)
    x[:, 0] = kind.float()
    x[kind, 8:] = 0
    x[~kind, 1:8] = 0
    init = tensor_product_init(weight, bias, g, h, rank, cholesky_whitening(moment_of(x)))
    return weight, bias, x, init, (g, D, d, h, rank)


def test_als_never_increases_the_key_error_and_beats_svd():
    weight, bias, x, init, (g, *_) = _als_problem()
    _, errors = fit_contextual(x, weight, bias, init, g, sweeps=6)
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_als_factors_load_into_the_tensor_product_layout():
    weight, bias, x, init, (g, D, d, h, rank) = _als_problem(seed=1)
    fitted, errors = fit_contextual(x, weight, bias, init, g, sweeps=3)
    module = TensorProduct(d, h, D, rank, bias=True, contextual=True).double()
    with torch.no_grad():
        module.head_mix.copy_(fitted.head_mix)
        module.head_proj.weight.copy_(fitted.head_proj)
        module.basis.weight.copy_(fitted.basis_weight)
        module.basis.bias.copy_(fitted.basis_bias)
        xs = x.double()[None]
        keys = module.mix(*module(xs))[0]  # (h, T, D)
    target = (xs[0] @ weight.double().T + bias.double()).reshape(-1, g, D).transpose(0, 1)
    target = target.repeat_interleave(h // g, dim=0)
    error = float((keys - target).norm() / target.norm())
    assert error == pytest.approx(errors[-1], rel=1e-6)


def _calib(tmp_path, seq=32, count=40):
    path = tmp_path / "calib.npy"
    np.save(path, random_ids(1, seq * count, seed=5)[0].numpy().astype(np.uint16))
    return str(path)


def test_als_needs_contextual_tpa(source_dirs, tmp_path):
    with pytest.raises(ValueError, match="--to tpa --contextual"):
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "o", init="als", calib="x.npy")
    with pytest.raises(ValueError, match="--to mfa"):
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "o", init="query-aware", calib="x.npy")
    with pytest.raises(ValueError, match="need calibration data"):
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "o", contextual=True, init="als")


def test_als_conversion_generates_from_its_cache(source_dirs, tmp_path, load_model):
    out = convert(
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "out", to="tpa", rank_k=1, rank_v=1,
                       contextual=True, init="als", calib=_calib(tmp_path), calib_samples=40, calib_seq_len=32,
                       refine_steps=0),
        progress=False,
    )
    model = load_model(out)
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "head_proj" in n)  # a(x) is contextual
    ids = random_ids(2, 7, seed=21)
    assert torch.equal(generate(model, ids, 8, use_cache=True), generate(model, ids, 8, use_cache=False))
    # ALS fits a(x), b(x) to the calibration keys themselves: its key error is below the statistics start (A = 0)'s.
    stats = convert(
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "stats", to="tpa", rank_k=1, rank_v=1,
                       contextual=True, init="stats", calib=_calib(tmp_path), calib_samples=40, calib_seq_len=32,
                       refine_steps=0),
        progress=False,
    )
    errors = {name: [layer["key_error"] for layer in json.loads((folder / "factorconv_report.json").read_text())["layers"]]
              for name, folder in (("als", out), ("stats", stats))}
    assert all(a < s for a, s in zip(errors["als"], errors["stats"])), errors


def test_calibrated_key_reuse_generates_from_its_smaller_cache(source_dirs, source_model, tmp_path, load_model):
    out = convert(
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "out", to="mfa_kr", kv_budget=0.5,
                       calib=_calib(tmp_path), calib_samples=40, calib_seq_len=32, refine_steps=0),
        progress=False,
    )
    model = load_model(out)
    ids = random_ids(2, 7, seed=22)
    assert torch.equal(generate(model, ids, 8, use_cache=True), generate(model, ids, 8, use_cache=False))
    source_bytes = analytic_kv_bytes_per_token(source_model("llama_gqa").config, 4)
    assert measured_kv_bytes_per_token(model) == analytic_kv_bytes_per_token(model.config, 4) <= 0.5 * source_bytes
