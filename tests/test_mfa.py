"""MFA and MFA-KR: exact at full width, RoPE commutes with the key merge, caches hold exactly their vectors."""

import json

import pytest
import torch

from conftest import SOURCE_NAMES, random_ids
from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token, cache_bytes
from factorconv.modeling import output_cache

TARGETS = {
    "mfa": dict(to="mfa"),
    "mfa_low_rank_q": dict(to="mfa", query_rank=64),
    "mfa_kr": dict(to="mfa_kr"),
}
REDUCED = {"mfa": dict(to="mfa", key_dim=8, value_dim=12), "mfa_kr": dict(to="mfa_kr", rope_dim=8, nope_dim=12)}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_full_width_reproduces_source_logits(name, target, source_model, converted, load_model):
    model = load_model(converted(name, **TARGETS[target]))
    ids = random_ids(2, 48, seed=7)
    with torch.no_grad():
        diff = (model(ids).logits - source_model(name)(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{name} -> {target}: max |Δlogit| = {diff:.2e}"


def test_llama3_scaled_frequencies_reach_the_pair_table(converted, load_model):
    """The merged head rotates with the source's llama3-scaled inverse frequencies, gathered per pair."""
    model = load_model(converted("llama3_rope", to="mfa"))
    rotary = model.model.rotary_emb
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert not torch.allclose(rotary.inv_freq, default), "llama3 scaling did not change the frequencies"
    pairs = model.config.rope_pair_index[0]
    assert sorted(pairs) == sorted(list(range(8)) * 2)  # every source pair, once per KV head


@pytest.mark.parametrize("target", ["mfa", "mfa_kr"])
def test_wrong_pair_frequencies_break_exactness(target, source_model, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = converted("llama_gqa", **TARGETS[target])
    config = json.loads((folder / "config.json").read_text())
    ids = random_ids(1, 40, seed=3)
    with torch.no_grad():
        reference = source_model("llama_gqa")(ids).logits
        config["rope_pair_index"] = [pairs[1:] + pairs[:1] for pairs in config["rope_pair_index"]]
        broken = tmp_path / "broken"
        broken.mkdir()
        for item in folder.iterdir():
            (broken / item.name).write_bytes(item.read_bytes())
        (broken / "config.json").write_text(json.dumps(config))
        model = AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32).eval()
        diff = (model(ids).logits - reference).abs().max().item()
    assert diff > 1e-2, "pairs rotating at the wrong frequencies should not reproduce the source"


def test_mixing_across_pairs_breaks_exactness(source_dirs, source_model):
    """Mixing different frequency pairs (instead of heads within one pair) does not commute with RoPE."""
    from factorconv.factorize.mfa import merge_queries, pair_moments, rope_key_merge

    model = source_model("llama_gqa")
    attn = model.model.layers[0].self_attn
    wk, wq = attn.k_proj.weight.detach(), attn.q_proj.weight.detach()
    merge = rope_key_merge(wk, None, 2, 16, 32, pair_moments(wk, None, 2, 16, None))
    queries = merge_queries(wq, None, merge, 8, 16)  # (h, 32, d)
    x = torch.randn(6, 64)
    angles = torch.arange(6)[:, None] * model.model.rotary_emb.inv_freq[None]  # (t, D/2)

    def rotate(v: torch.Tensor, pair_freqs: torch.Tensor) -> torch.Tensor:
        half = v.shape[-1] // 2
        cos, sin = pair_freqs.cos(), pair_freqs.sin()
        a, b = v[..., :half], v[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    k_src = rotate((x @ wk.T).view(6, 2, 16), angles[:, None])
    q_src = rotate((x @ wq.T).view(6, 8, 16), angles[:, None])
    scores_src = torch.einsum("thd,shd->hts", q_src, k_src.repeat_interleave(4, dim=1))
    pair_angles = angles[:, merge.pairs]
    k_new = rotate(x @ merge.weight.T, pair_angles)
    q_new = rotate(torch.einsum("ti,hki->thk", x, queries.float()), pair_angles[:, None])
    assert torch.allclose(torch.einsum("thk,sk->hts", q_new, k_new), scores_src, atol=1e-4)
    shuffled = pair_angles[:, torch.randperm(len(merge.pairs), generator=torch.Generator().manual_seed(0))]
    k_bad = rotate(x @ merge.weight.T, shuffled)
    q_bad = rotate(torch.einsum("ti,hki->thk", x, queries.float()), shuffled[:, None])
    assert not torch.allclose(torch.einsum("thk,sk->hts", q_bad, k_new), scores_src, atol=1e-2)
    assert not torch.allclose(torch.einsum("thk,sk->hts", q_new, k_bad), scores_src, atol=1e-2)


@pytest.mark.parametrize("target", ["mfa", "mfa_kr"])
@pytest.mark.parametrize("reduced", [False, True])
def test_cache_bytes_equal_formula_and_generation_matches_no_cache(target, reduced, converted, load_model):
    options = REDUCED[target] if reduced else TARGETS[target]
    model = load_model(converted("llama_gqa", **options))
    ids = random_ids(2, 9, seed=11)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
        return_dict_in_generate=True, pad_token_id=0,
    )
    no_cache = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert torch.equal(out.sequences, no_cache)
    cache = output_cache(out)
    per_token = cache_bytes(cache) / (cache.get_seq_length() * ids.shape[0])
    cfg = model.config
    widths = [cfg.key_dim[i] + cfg.value_dim[i] if target == "mfa" else cfg.rope_dim[i] + cfg.nope_dim[i] for i in range(2)]
    assert per_token == sum(widths) * 4 == analytic_kv_bytes_per_token(cfg, 4)
    if target == "mfa_kr":  # c is held once: no separate value copy
        assert all(layer.values.shape[-1] == 0 for layer in cache.layers)
    if reduced:
        assert per_token < 2 * 2 * 16 * 2 * 4  # the source's 2·g·D·layers·4 bytes


@pytest.mark.parametrize("target", ["mfa", "mfa_kr"])
def test_left_padded_batch_matches_single_runs(target, converted, load_model):
    model = load_model(converted("qwen2_gqa", **REDUCED[target]))
    prompts = [random_ids(1, 10, seed=21)[0], random_ids(1, 6, seed=22)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        single = model.generate(
            prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8, do_sample=False, pad_token_id=0,
        )
        assert torch.equal(batch[row, width:], single[0, len(prompt) :])


@pytest.mark.parametrize("target", ["mfa", "mfa_kr"])
def test_rank_reduction_reports_growing_error(target, converted):
    errors = []
    for width in (32, 16, 8):
        options = dict(to="mfa", key_dim=width, value_dim=width) if target == "mfa" else dict(
            to="mfa_kr", rope_dim=width, nope_dim=width
        )
        report = json.loads((converted("llama_gqa", **options) / "factorconv_report.json").read_text())
        errors.append(max(layer["key_error"] + layer["value_error"] for layer in report["layers"]))
    assert errors[0] < 1e-6 < errors[1] < errors[2]


@pytest.mark.parametrize("target", list(REDUCED))
def test_parameters_are_the_sources_or_fewer(target, converted, source_model, load_model):
    """The factored form keeps the source's q/o projections and caches less: no more weights than the source."""
    model = load_model(converted("llama_gqa", **REDUCED[target]))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (model.config.num_attention_heads * model.config.head_dim, model.config.hidden_size)
    assert sum(p.numel() for p in model.parameters()) <= sum(p.numel() for p in source_model("llama_gqa").parameters())


@pytest.mark.parametrize("target", list(REDUCED))
def test_a_folder_in_the_old_absorbed_layout_is_refused(target, converted, tmp_path, load_model):
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "old"
    shutil.copytree(converted("llama_gqa", **REDUCED[target]), folder)
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("attention_layout") == "factored"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="absorbed layout.*trust_remote_code=True.*convert it again"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("target", ["mfa", "mfa_kr"])
def test_eager_attention_full_width_probabilities_and_cached_greedy(target, source_dirs, converted, load_model):
    """attn_implementation="eager" (the path that returns attention probabilities): at full width logits and
    every layer's probabilities are the source's, left padding included; at reduced width cached greedy decoding
    gives the uncached tokens. (test_decode_paths.py checks eager decode steps on random layers; this is the
    converted checkpoints.)"""
    source = load_model(source_dirs["llama_gqa"], attn_implementation="eager")
    model = load_model(converted("llama_gqa", **TARGETS[target]), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids = random_ids(2, 20, seed=31)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding; fully masked query rows are arbitrary, so compare the real ones only
    with torch.no_grad():
        got = model(ids, attention_mask=mask, output_attentions=True)
        expected = source(ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()
    torch.testing.assert_close(got.logits[keep], expected.logits[keep], atol=1e-4, rtol=0)
    assert len(got.attentions) == model.config.num_hidden_layers
    for probs, reference in zip(got.attentions, expected.attentions):
        assert probs.shape == (2, model.config.num_attention_heads, 20, 20)
        torch.testing.assert_close(probs[0], reference[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(probs[1, :, 4:], reference[1, :, 4:], atol=1e-5, rtol=0)
        assert float(probs[1, :, 4:, :4].abs().max()) == 0.0  # padded keys get no weight

    reduced = load_model(converted("llama_gqa", **REDUCED[target]), attn_implementation="eager")
    prompt = random_ids(2, 9, seed=32)
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                   pad_token_id=0)
    with torch.no_grad():
        cached = reduced.generate(prompt, use_cache=True, return_dict_in_generate=True, **options)
        uncached = reduced.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached)
    assert output_cache(cached).layers[0].keys.shape[-1] < 2 * 16  # the factor cache, not the source's K
