"""The factor cache: generation with it equals generation without it, and it holds exactly the factor bytes."""

import copy

import pytest
import torch
from conftest import VOCAB, random_ids, randomize_head_proj
from transformers import DynamicCache

from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token, cache_bytes, measured_kv_bytes_per_token
from factorconv.modeling import CACHE_KEY, FactorConvConfig, FactorConvForCausalLM, output_cache
from factorconv.modeling.modeling_factorconv import FactorConvTPAAttention, _masked_scores

VARIANTS = {
    "tpa": {},
    "contextual": {"contextual": True},
    "factorized_q": {"rank_q": 8},
    "rank_reduced": {"rank_k": 1, "rank_v": 1},
    "rank_reduced_contextual_q": {"rank_k": 1, "rank_v": 2, "rank_q": 3, "contextual": True},
}


@pytest.fixture(scope="module")
def models(converted, load_model):
    """variant -> converted llama_gqa (8 heads, 2 KV heads); contextual ones get a random A."""
    out = {}
    for variant, options in VARIANTS.items():
        model = load_model(converted("llama_gqa", **options))
        if model.config.tpa_contextual:
            model = randomize_head_proj(model, seed=len(out))
        out[variant] = model
    return out


def generate(model, ids, new_tokens, mask=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids) if mask is None else mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **kwargs,
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_uncached(models, variant, monkeypatch):
    model = models[variant]
    ids = random_ids(2, 7, seed=20)
    # Count the calls of the decode path this variant must take (heads folded, straight from the cached factors).
    decode = "factor_attention" if model.config.tpa_contextual else "concatenated_factor_attention"
    calls = []
    original = getattr(FactorConvTPAAttention, decode)

    def spy(self, query, *args):
        calls.append(query.shape[2])
        return original(self, query, *args)

    monkeypatch.setattr(FactorConvTPAAttention, decode, spy)
    cached = generate(model, ids, 12, use_cache=True, return_dict_in_generate=True, output_scores=True)
    assert calls == [1] * (12 - 1) * model.config.num_hidden_layers  # every step after the prefill, every layer
    calls.clear()
    uncached = generate(model, ids, 12, use_cache=False, return_dict_in_generate=True, output_scores=True)
    assert calls == []  # without a cache every step is a prefill of the whole sequence
    assert isinstance(output_cache(cached), DynamicCache)
    assert output_cache(uncached) is None
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=0)
    assert output_cache(cached).get_seq_length() == 7 + 12 - 1


def test_contextual_head_factors_matter(models):
    """Sanity check of the fixture: the random A changes the model (so contextual tests test something)."""
    plain, contextual = models["tpa"], models["contextual"]
    ids = random_ids(1, 10, seed=21)
    with torch.no_grad():
        assert (plain(ids).logits - contextual(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["tpa", "contextual", "rank_reduced_contextual_q"])
def test_left_padded_batch_matches_single_runs(models, variant):
    model = models[variant]
    lengths = [9, 4, 6]
    prompts = [random_ids(1, n, seed=30 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad_token_id 0, left padding
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel() :] = prompt
        mask[row, width - prompt.numel() :] = 1
    batch = generate(model, ids, 10, mask=mask)
    for row, prompt in enumerate(prompts):
        single = generate(model, prompt[None], 10)
        assert torch.equal(batch[row, width:], single[0, prompt.numel() :]), row


@pytest.mark.parametrize("variant", ["tpa", "contextual", "factorized_q"])
@pytest.mark.parametrize("cached_prefix", [5, 9])
def test_continue_from_prompt_cache(models, variant, cached_prefix):
    """Prefill part (or all but one token) of the prompt into a cache, then generate: same as from scratch."""
    model = models[variant]
    prompt = random_ids(1, 10, seed=40)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :cached_prefix], use_cache=True, **{CACHE_KEY: cache})
    assert cache.get_seq_length() == cached_prefix
    assert all(layer.keys.shape[1] == 1 for layer in cache.layers)  # factor rows, not per-head keys
    continued = generate(model, prompt, 8, **{CACHE_KEY: copy.deepcopy(cache)})
    scratch = generate(model, prompt, 8)
    assert torch.equal(continued, scratch)


@pytest.mark.parametrize("variant", ["contextual", "rank_reduced"])
def test_beam_search_cache_reordering(models, variant):
    model = models[variant]
    ids = random_ids(2, 6, seed=45)
    cached = generate(model, ids, 8, num_beams=3, use_cache=True)
    uncached = generate(model, ids, 8, num_beams=3, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", ["tpa", "contextual"])
def test_sampling_with_seed(models, variant):
    model = models[variant]
    ids = random_ids(2, 5, seed=50)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(1234)
        runs.append(generate(model, ids, 10, do_sample=True, top_k=0, temperature=1.5, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])  # the cache does not change what is sampled
    greedy = generate(model, ids, 10)
    assert not torch.equal(runs[0], greedy)  # it really sampled
    torch.manual_seed(999)
    assert not torch.equal(runs[0], generate(model, ids, 10, do_sample=True, top_k=0, temperature=1.5))


def _measured_bytes(model, batch: int = 2, prompt: int = 6, new: int = 5):
    ids = random_ids(batch, prompt, seed=60)
    out = generate(model, ids, new, return_dict_in_generate=True)
    cache = output_cache(out)
    tokens = cache.get_seq_length()
    assert tokens == prompt + new - 1
    return cache, cache_bytes(cache) / (tokens * batch)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_measured_cache_bytes_equal_analytic(models, variant, source_model):
    model = models[variant]
    cache, per_token = _measured_bytes(model)
    assert len(cache.layers) == model.config.num_hidden_layers
    for i, layer in enumerate(cache.layers):
        assert layer.keys.dtype == torch.float32
        assert layer.keys.shape[1] == 1  # one packed row of factors per token, not one per head
        width = layer.keys.shape[-1] + layer.values.shape[-1]
        assert width == model.config.kv_cache_width(i)
    assert per_token == analytic_kv_bytes_per_token(model.config, 4)
    assert measured_kv_bytes_per_token(model) == analytic_kv_bytes_per_token(model.config, 4)

    source = source_model("llama_gqa")
    _, source_per_token = _measured_bytes(source)
    assert source_per_token == analytic_kv_bytes_per_token(source.config, 4) == 2 * 2 * 16 * 2 * 4
    if max(model.config.tpa_rank_k + model.config.tpa_rank_v) < source.config.num_key_value_heads:
        assert per_token < source_per_token


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_rank_below_kv_heads_shrinks_cache(rank, converted, load_model, source_model):
    source = source_model("llama_mha")  # 4 KV heads
    model = load_model(converted("llama_mha", rank_k=rank, rank_v=rank))
    _, per_token = _measured_bytes(model)
    _, source_per_token = _measured_bytes(source)
    assert per_token == analytic_kv_bytes_per_token(model.config, 4) == 2 * rank * 16 * 2 * 4
    assert per_token < source_per_token


# --- factor_attention against the reconstruct-K/V path ------------------------------------------------------------


def _attention_module(contextual: bool, rank_q, seed: int) -> tuple[FactorConvTPAAttention, FactorConvForCausalLM]:
    torch.manual_seed(seed)
    config = FactorConvConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tpa_rank_k=2,
        tpa_rank_v=3,
        tpa_rank_q=rank_q,
        tpa_contextual=contextual,
        qkv_bias=True,
    )
    config._attn_implementation = "eager"
    model = FactorConvForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model.model.layers[0].self_attn, model


def _factor_path(attn: FactorConvTPAAttention, x, cos, sin, mask):
    """The decode-path maths (factor_attention) applied to a whole block of queries."""
    query = attn._queries(x, cos, sin)
    from factorconv.modeling.modeling_factorconv import apply_rope

    (b_k, a_k), (b_v, a_v) = attn.k_product(x), attn.v_product(x)
    key_row, value_row = attn._pack(apply_rope(b_k, cos, sin, 2), a_k), attn._pack(b_v, a_v)
    keys, values = attn._unpack(key_row, attn.k_product, a_k), attn._unpack(value_row, attn.v_product, a_v)
    out, probs = attn.factor_attention(query, keys, values, mask)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    return attn.o_proj(out.reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("rank_q", [None, 3])
def test_factor_attention_matches_reconstructed_kv(rank_q, impl):
    attn, model = _attention_module(True, rank_q, seed=70)
    model.config._attn_implementation = impl
    bsz, length = 2, 11
    x = torch.randn(bsz, length, 64)
    position_ids = torch.arange(length)[None].expand(bsz, -1)
    cos, sin = model.model.rotary_emb(x, position_ids)
    causal_bool = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(bsz, 1, -1, -1)
    causal_float = torch.zeros(bsz, 1, length, length).masked_fill(~causal_bool, torch.finfo(torch.float32).min)
    with torch.no_grad():
        # The module's own prefill path (per-head K/V rebuilt, transformers' attention function).
        mask = causal_float if impl == "eager" else causal_bool
        reference, _ = attn(x, (cos, sin), attention_mask=mask)
        # The same layer with a None mask: causal is implied both ways.
        for factor_mask in (None, causal_bool, causal_float):
            got = _factor_path(attn, x, cos, sin, factor_mask)
            torch.testing.assert_close(got, reference, atol=1e-5 * float(reference.abs().max()), rtol=0)
        # An unmasked (non-causal) factor computation differs: the mask really matters.
        full = _factor_path(attn, x, cos, sin, torch.ones(bsz, 1, length, length, dtype=torch.bool))
        assert (full - reference).abs().max() > 1e-3


def test_factor_attention_with_past_matches_prefill():
    """Queries for the last L of T tokens against cached factors (bottom-right causal alignment)."""
    attn, model = _attention_module(True, None, seed=71)
    bsz, total, new = 2, 12, 4
    x = torch.randn(bsz, total, 64)
    position_ids = torch.arange(total)[None].expand(bsz, -1)
    cos, sin = model.model.rotary_emb(x, position_ids)
    causal = torch.zeros(total, total).masked_fill(torch.ones(total, total).triu(1).bool(), torch.finfo(torch.float32).min)
    with torch.no_grad():
        reference, _ = attn(x, (cos, sin), attention_mask=causal[None, None].expand(bsz, 1, -1, -1))
        from factorconv.modeling.modeling_factorconv import apply_rope

        (b_k, a_k), (b_v, a_v) = attn.k_product(x), attn.v_product(x)
        key_row, value_row = attn._pack(apply_rope(b_k, cos, sin, 2), a_k), attn._pack(b_v, a_v)
        query = attn._queries(x[:, -new:], cos[:, -new:], sin[:, -new:])
        keys, values = attn._unpack(key_row, attn.k_product, a_k), attn._unpack(value_row, attn.v_product, a_v)
        out, _ = attn.factor_attention(query, keys, values, None)
        got = attn.o_proj(out.reshape(bsz, new, -1))
    torch.testing.assert_close(got, reference[:, -new:], atol=1e-5 * float(reference.abs().max()), rtol=0)


def test_masked_scores_conventions():
    scores = torch.zeros(1, 1, 2, 3)
    causal = _masked_scores(scores, None)
    assert torch.isfinite(causal[0, 0, 1]).all()
    assert causal[0, 0, 0, 2] < -1e30 and torch.isfinite(causal[0, 0, 0, :2]).all()
    boolean = torch.tensor([[True, False, True]]).expand(2, 3)[None, None]
    assert _masked_scores(scores, boolean)[0, 0, 0, 1] < -1e30
    additive = torch.full((1, 1, 2, 3), -5.0)
    assert torch.equal(_masked_scores(scores, additive), additive)


def test_eager_decode_with_left_padding(converted, load_model):
    """The decode path with eager's additive float masks (sdpa hands it boolean ones)."""
    folder = converted("llama_gqa", contextual=True, rank_k=1)
    eager = randomize_head_proj(load_model(folder, attn_implementation="eager"), seed=3)
    sdpa = randomize_head_proj(load_model(folder), seed=3)
    ids = random_ids(2, 8, seed=90)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    a = generate(eager, ids, 8, mask=mask)
    b = generate(sdpa, ids, 8, mask=mask)
    single = generate(eager, ids[1:, 3:], 8)
    assert torch.equal(a, b)
    assert torch.equal(a[1, 8:], single[0, 5:])


def test_per_layer_ranks():
    """The model supports a different rank in every layer; cache widths and bytes follow."""
    torch.manual_seed(91)
    config = FactorConvConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tpa_rank_k=[1, 2, 3],
        tpa_rank_v=[3, 1, 2],
        tpa_contextual=True,
    )
    model = FactorConvForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    ids = random_ids(1, 6, seed=92)
    out = generate(model, ids, 6, return_dict_in_generate=True)
    assert torch.equal(out.sequences, generate(model, ids, 6, use_cache=False))
    widths = [layer.keys.shape[-1] + layer.values.shape[-1] for layer in output_cache(out).layers]
    assert widths == [config.kv_cache_width(i) for i in range(3)] == [4 * 20, 3 * 20, 5 * 20]
    tokens = output_cache(out).get_seq_length()
    assert cache_bytes(output_cache(out)) / tokens == analytic_kv_bytes_per_token(config, 4) == 12 * 20 * 4

    with pytest.raises(ValueError, match="tpa_rank_k has 2 entries but the model has 3 layers"):
        FactorConvConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, tpa_rank_k=[1, 2])
    with pytest.raises(ValueError, match="attention must be one of"):
        FactorConvConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, attention="mla")


def test_prompt_lookup_decoding_and_inputs_embeds(models):
    """Assisted decoding verifies several tokens at once against the cache and crops it on rejection."""
    model = models["contextual"]
    ids = random_ids(1, 12, seed=93)
    ids[0, 6:] = ids[0, :6]  # repeated n-grams give the prompt-lookup candidates
    plain = generate(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, prompt_lookup_num_tokens=3), plain)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.generate(
            inputs_embeds=embeds, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert torch.equal(from_embeds, plain[:, 12:])
