"""Each attention's decode path (absorbed / concatenated factors, one cached head for all query heads) computes
the same output as its prefill path (per-head keys and values through transformers' attention functions)."""

import pytest
import torch
from transformers import DynamicCache

from factorconv.modeling import CACHE_KEY, FactorConvConfig, FactorConvForCausalLM
from factorconv.modeling import modeling_factorconv as modeling

KINDS = {
    "tpa": dict(attention="tpa", tpa_rank_k=2, tpa_rank_v=3),
    "tpa_contextual": dict(attention="tpa", tpa_rank_k=2, tpa_rank_v=1, tpa_contextual=True),
    "mfa": dict(attention="mfa", key_dim=12, value_dim=20),
    "mfa_low_rank_q": dict(attention="mfa", key_dim=12, value_dim=20, query_rank=10),
    "mfa_kr": dict(attention="mfa_kr", rope_dim=8, nope_dim=24),
}


def _layer(kind: str, impl: str):
    torch.manual_seed(5)
    config = FactorConvConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, qkv_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_pair_index=None, **KINDS[kind],
    )
    config._attn_implementation = impl
    model = FactorConvForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("length", [10, 16])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "sdpa-matmul"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_step_equals_prefill_row(kind, impl, length, monkeypatch):
    """sdpa-matmul: the two-product path that a GPU takes; `length` 10 and 16 tokens: its token-first and
    query-first orders (a token count that is not a multiple of 8 puts the tokens on the products' rows)."""
    if impl == "sdpa-matmul":
        monkeypatch.setattr(modeling, "fused_decode_applies", lambda key: False)
    model = _layer(kind, impl.split("-")[0])
    ids = torch.randint(0, 64, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the decode step's mask must hide it too
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **{CACHE_KEY: cache})
        step = model(ids[:, -1:], attention_mask=mask, use_cache=True, **{CACHE_KEY: cache}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4 * float(full.abs().max()), rtol=0)
    if impl == "eager":  # the decode path's probabilities come back, one distribution per head
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **{CACHE_KEY: cache})
            out = model(ids[:, -1:], attention_mask=mask, output_attentions=True, **{CACHE_KEY: cache})
        probs = out.attentions[0]
        assert probs.shape == (2, 6, 1, length)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6, 1))
        assert float(probs[1, :, 0, :3].abs().max()) == 0.0  # padded positions get no weight


@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_follows_weights_changed_after_a_step(kind, monkeypatch):
    """What decoding derives from the weights once (scaled head mixes, per-head maps) is rebuilt when they change:
    in place (an optimizer step, load_state_dict) or by a move to another dtype."""
    monkeypatch.setattr(modeling, "fused_decode_applies", lambda key: False)
    model = _layer(kind, "sdpa")
    ids = torch.randint(0, 64, (2, 12))

    def step_and_full() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[:, :-1], use_cache=True, **{CACHE_KEY: cache})
            step = model(ids[:, -1:], use_cache=True, **{CACHE_KEY: cache}).logits[:, -1]
            return step, model(ids).logits[:, -1]

    before, _ = step_and_full()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("head_mix", "rope_mix", "key_up", "value_up")):
                param.mul_(-1.5)
    step, full = step_and_full()
    assert not torch.allclose(step, before, atol=1e-3)
    torch.testing.assert_close(step, full, atol=1e-4 * float(full.abs().max()), rtol=0)
    model.double()
    step, full = step_and_full()
    assert step.dtype == torch.float64
    torch.testing.assert_close(step, full, atol=1e-9 * float(full.abs().max()), rtol=0)
