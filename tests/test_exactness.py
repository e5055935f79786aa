"""Full-rank conversions reproduce the source exactly; below full rank the error shrinks as the rank grows."""

import json

import pytest
import torch
from conftest import SOURCE_NAMES, VOCAB, random_ids
from safetensors import safe_open

from factorconv.convert.artifacts import REPORT_FILE
from factorconv.factorize.tpa import group_indicator, per_head_projection, relative_error, tensor_product_init
from factorconv.modeling import FactorConvForCausalLM

ATOL = 1e-4

VARIANTS = {
    "kv_only": lambda cfg: {},
    "factorized_q": lambda cfg: {"rank_q": cfg.num_attention_heads},
    "contextual": lambda cfg: {"contextual": True},
    "contextual_factorized_q": lambda cfg: {"contextual": True, "rank_q": cfg.num_attention_heads},
}


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_full_rank_reproduces_source_logits(name, variant, source_model, converted, load_model):
    source = source_model(name)
    out = converted(name, **VARIANTS[variant](source.config))
    model = load_model(out)
    assert isinstance(model, FactorConvForCausalLM)
    assert model.dtype == torch.float32

    ids = random_ids(2, 48, seed=7)
    expected, got = _logits(source, ids), _logits(model, ids)
    assert got.shape == expected.shape == (2, 48, VOCAB)
    assert expected.std() > 0.5  # non-trivial model: logits are far from flat
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # ... and the report says the projections are exact.
    report = json.loads((out / REPORT_FILE).read_text())
    assert len(report["layers"]) == source.config.num_hidden_layers
    assert report["seconds"]["refinement"] == 0.0  # weight-only: nothing to refine
    assert report["refine_steps"] == 0
    for layer in report["layers"]:
        assert layer["key_error"] < 1e-6 and layer["value_error"] < 1e-6
        if "rank_q" in VARIANTS[variant](source.config):
            assert layer["query_error"] < 1e-6
        else:
            assert layer["query_error"] is None


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_gqa", "llama_bias"])
def test_full_rank_with_padding_mask_matches_source(name, source_model, converted, load_model):
    """A right-padded batch (as perplexity uses it) gives the source's logits on the real tokens."""
    source, model = source_model(name), load_model(converted(name))
    ids = random_ids(2, 24, seed=8)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ids[1, 15:] = 0
    expected, got = _logits(source, ids, mask), _logits(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=ATOL, rtol=0)


def test_eager_attention_matches_sdpa(converted, load_model, source_model):
    out = converted("llama_gqa", contextual=True)
    eager = load_model(out, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    ids = random_ids(2, 32, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding; fully masked rows are arbitrary, so compare real tokens only
    keep = mask.bool()
    got, expected = _logits(eager, ids, mask)[keep], _logits(load_model(out), ids, mask)[keep]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(eager, ids), _logits(source_model("llama_gqa"), ids), atol=ATOL, rtol=0)


def test_llama3_rope_scaling_is_kept(source_model, converted, load_model):
    source = source_model("llama3_rope")
    model = load_model(converted("llama3_rope"))
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["factor"] == 8.0
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32
    # The scaled inverse frequencies are the source's (and differ from unscaled RoPE).
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, source.model.rotary_emb.inv_freq)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert not torch.allclose(model.model.rotary_emb.inv_freq, plain)
    # Beyond the original 32-token context too.
    ids = random_ids(1, 100, seed=10)
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), atol=ATOL, rtol=0)


def _attention_weights(source_dir, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    with safe_open(source_dir / "model.safetensors", framework="pt") as f:
        prefix = f"model.layers.{layer}.self_attn.{proj}_proj."
        bias = f.get_tensor(prefix + "bias") if prefix + "bias" in f.keys() else None
        return f.get_tensor(prefix + "weight"), bias


@pytest.mark.parametrize("name", ["llama_mha", "llama_gqa", "qwen2_gqa", "llama_bias"])
@pytest.mark.parametrize("proj", ["k", "v"])
def test_relative_error_decreases_with_rank(name, proj, source_dirs, source_model):
    cfg = source_model(name).config
    groups, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    weight, bias = _attention_weights(source_dirs[name], 0, proj)
    errors = []
    for rank in range(1, groups + 1):
        init = tensor_product_init(weight, bias, groups, heads, rank)
        assert init.rank == rank
        assert init.head_mix.shape == (rank, heads)
        assert init.basis_weight.shape == (rank * cfg.head_dim, cfg.hidden_size)
        errors.append(relative_error(weight, bias, init, groups, heads))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1
    assert errors[-1] < 1e-6

    # Below full rank the error is the optimal (Eckart-Young) one of the stacked per-group matrices.
    stacked = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
    s = torch.linalg.svdvals(stacked.double().reshape(groups, -1))
    for rank, err in enumerate(errors, start=1):
        optimal = float((s[rank:].pow(2).sum() / s.pow(2).sum()).sqrt())
        assert err == pytest.approx(optimal, abs=1e-6)


def test_full_rank_init_is_group_indicator(source_dirs, source_model):
    cfg = source_model("llama_gqa").config
    weight, _ = _attention_weights(source_dirs["llama_gqa"], 1, "k")
    init = tensor_product_init(weight, None, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.num_key_value_heads)
    torch.testing.assert_close(init.head_mix, group_indicator(2, 8))
    per_head = per_head_projection(init).float()
    expected = weight.reshape(2, 16, -1).repeat_interleave(4, dim=0).reshape(8 * 16, -1)
    torch.testing.assert_close(per_head, expected)


@pytest.mark.parametrize("name", ["llama_mha", "llama_gqa", "llama_bias"])
def test_report_errors_decrease_with_rank(name, converted, source_model):
    groups = source_model(name).config.num_key_value_heads
    per_rank = []
    for rank in range(1, groups + 1):
        report = json.loads((converted(name, rank_k=rank, rank_v=rank) / REPORT_FILE).read_text())
        per_rank.append(report)
    for key in ("key_error", "value_error"):
        for layer in range(2):
            errors = [r["layers"][layer][key] for r in per_rank]
            assert all(a > b for a, b in zip(errors, errors[1:])), (key, layer, errors)
            assert errors[-1] < 1e-6
            assert errors[0] > 0.1
    # KV bytes per token grow with the rank and equal the source's at full rank (non-contextual).
    kv = [r["kv_bytes_per_token"] for r in per_rank]
    assert all(a["converted"] < b["converted"] for a, b in zip(kv, kv[1:]))
    assert kv[-1]["converted"] == kv[-1]["source"]


def test_rank_reduced_model_generates(converted, load_model, source_model):
    out = converted("llama_mha", rank_k=1, rank_v=1)
    model = load_model(out)
    assert model.config.tpa_rank_k == [1, 1] and model.config.tpa_rank_v == [1, 1]
    ids = random_ids(2, 6, seed=11)
    with torch.no_grad():
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert gen.shape == (2, 14)
    assert torch.equal(gen[:, :6], ids)
    assert ((gen >= 0) & (gen < VOCAB)).all()
    logits = _logits(model, gen)
    assert torch.isfinite(logits).all()
    # It is an approximation whose logits (RMS error) approach the source's as the rank grows, exact at full rank.
    reference = _logits(source_model("llama_mha"), gen)
    heads = source_model("llama_mha").config.num_key_value_heads
    errors = [(logits - reference).pow(2).mean().sqrt().item()]
    for rank in (2, heads):
        other = load_model(converted("llama_mha", rank_k=rank, rank_v=rank))
        errors.append((_logits(other, gen) - reference).pow(2).mean().sqrt().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4 < errors[1], errors


# --- more source variants, built on the spot ----------------------------------------------------------------------


def _extra_source(tmp_path, config, model_class=None, seed=0):
    from conftest import SourceSpec, build_source
    from transformers import LlamaForCausalLM

    spec = SourceSpec("extra", model_class or LlamaForCausalLM, config)
    return build_source(spec, tmp_path / "source", seed=seed)


def _convert(source, output, **options):
    from factorconv.convert import convert
    from factorconv.convert.options import ConvertOptions

    return convert(ConvertOptions(source=str(source), output=output, **options), progress=False)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_other_rope_types(rope, tmp_path):
    from conftest import TINY
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**TINY, "max_position_embeddings": 64}, num_attention_heads=4, num_key_value_heads=2)
    config.rope_parameters = rope
    source_dir = _extra_source(tmp_path, config, seed=5)
    out = _convert(source_dir, tmp_path / "out", contextual=True)
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    ids = random_ids(1, 90, seed=12)  # longer than the 64-token context: dynamic scaling kicks in
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), atol=ATOL, rtol=0)
    with torch.no_grad():
        gen = model.generate(ids[:, :60], max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        ref = source.generate(ids[:, :60], max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref)


def test_many_layers_and_mlp_bias(tmp_path):
    """12 layers (layer 10 sorts after 9, not after 1) and Llama's mlp_bias."""
    from conftest import TINY
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **{**TINY, "num_hidden_layers": 12, "hidden_size": 32, "head_dim": 8, "intermediate_size": 48},
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=True,
    )
    source_dir = _extra_source(tmp_path, config, seed=6)
    out = _convert(source_dir, tmp_path / "out", rank_k=1)
    report = json.loads((out / REPORT_FILE).read_text())
    assert [layer["layer"] for layer in report["layers"]] == list(range(12))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.mlp_bias is True and model.config.tpa_rank_k == [1] * 12
    full = AutoModelForCausalLM.from_pretrained(_convert(source_dir, tmp_path / "full")).eval()
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    ids = random_ids(2, 20, seed=13)
    torch.testing.assert_close(_logits(full, ids), _logits(source, ids), atol=ATOL, rtol=0)
    assert torch.isfinite(_logits(model, ids)).all()


def test_sliding_window_warning(tmp_path, caplog):
    from conftest import TINY
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    source_dir = _extra_source(tmp_path, config, MistralForCausalLM, seed=7)
    with caplog.at_level("WARNING", logger="factorconv"):
        _convert(source_dir, tmp_path / "out")
    assert any("16-token sliding window" in r.getMessage() for r in caplog.records)


def test_loss_and_hidden_states_match_source(source_model, converted, load_model):
    source, model = source_model("qwen2_gqa"), load_model(converted("qwen2_gqa", rank_q=4))
    ids = random_ids(2, 30, seed=14)
    with torch.no_grad():
        a = source(ids, labels=ids, output_hidden_states=True)
        b = model(ids, labels=ids, output_hidden_states=True)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(y, x, atol=ATOL, rtol=0)


def test_contextual_model_trains(converted):
    """A = 0 at conversion; gradients reach it (with gradient checkpointing on), so training can move it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted("llama_gqa", contextual=True, rank_k=1))
    model.train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    ids = random_ids(2, 16, seed=15)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "head_proj" in n}
    assert len(grads) == 2 * 2  # k and v products of 2 layers
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    before = float(loss.detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
    assert float(loss.detach()) < before
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "head_proj" in n)


def test_whitened_factorization_is_optimal_in_the_whitened_norm(source_dirs, source_model):
    """With L (LLᵀ = E[x̃x̃ᵀ]) the factors minimize ‖(W − Ŵ) L‖ and beat the plain factors in that norm."""
    cfg = source_model("qwen2_gqa").config
    groups, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    weight, bias = _attention_weights(source_dirs["qwen2_gqa"], 0, "k")
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(500, weight.shape[1], generator=gen) * torch.linspace(0.1, 3.0, weight.shape[1])
    x = torch.cat([x, torch.ones(500, 1)], dim=1)
    whitening = torch.linalg.cholesky(x.T @ x / 500)
    stacked = torch.cat([weight, bias[:, None]], dim=1).double()

    def whitened_error(init):
        per_group = per_head_projection(init).reshape(heads, -1, stacked.shape[1])[:: heads // groups]
        diff = (stacked - per_group.reshape(stacked.shape)) @ whitening.double()
        return float(diff.norm() / (stacked @ whitening.double()).norm())

    plain = tensor_product_init(weight, bias, groups, heads, 1)
    whitened = tensor_product_init(weight, bias, groups, heads, 1, whitening=whitening)
    s = torch.linalg.svdvals((stacked @ whitening.double()).reshape(groups, -1))
    optimal = float((s[1:].pow(2).sum() / s.pow(2).sum()).sqrt())
    assert whitened_error(whitened) == pytest.approx(optimal, abs=1e-5)
    assert whitened_error(whitened) < whitened_error(plain) - 1e-3
    # In the plain weight norm it is the other way round.
    assert relative_error(weight, bias, plain, groups, heads) < relative_error(weight, bias, whitened, groups, heads)


def test_factorization_input_checks():
    weight = torch.randn(32, 64)
    with pytest.raises(ValueError, match="between 1 and 2"):
        tensor_product_init(weight, None, 2, 4, 3)
    with pytest.raises(ValueError, match="between 1 and 2"):
        tensor_product_init(weight, None, 2, 4, 0)
    with pytest.raises(ValueError, match="equal groups"):
        group_indicator(3, 4)
