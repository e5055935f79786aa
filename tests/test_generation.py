"""Generation through transformers' machinery at reduced rank, for every attention kind.

The factor cache must give what running without a cache gives, token for token and step for step (the check
that catches a cache the model silently drops, as transformers 5.24's `cache` rename once made it do), with
dynamic and static caches, a left-padded batch, an assistant model, checkpointed training and offloading.
"""

import copy
import warnings

import pytest
import torch
from conftest import random_ids, randomize_head_proj
from transformers import AutoModelForCausalLM

from factorconv.modeling import CACHE_KEY, output_cache

# llama_gqa: 8 heads, 2 KV heads of 16 (K and V widths 32). Every kind here caches less than the source.
KINDS = {
    "tpa": dict(rank_k=1, rank_v=1),
    "tpa_contextual": dict(contextual=True, rank_k=1, rank_v=1),
    "mfa": dict(to="mfa", key_dim=16, value_dim=16),
    "mfa_kr": dict(to="mfa_kr", rope_dim=16, nope_dim=16),
}


@pytest.fixture(scope="module")
def models(converted, load_model):
    out = {}
    for seed, (kind, options) in enumerate(KINDS.items()):
        model = load_model(converted("llama_gqa", **options))
        out[kind] = randomize_head_proj(model, seed) if model.config.tpa_contextual else model
    return out


def left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # pad_token_id 0 on the left
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = random_ids(1, n, seed=seed + row)[0]
        mask[row, width - n :] = 1
    return ids, mask


def greedy(model, ids, mask, new_tokens=10, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kwargs,
        )


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("batch", ["single", "left_padded_3"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_greedy_equals_uncached_step_by_step(models, kind, batch, cache):
    model = models[kind]
    if batch == "single":
        ids = random_ids(1, 9, seed=1)
        mask = torch.ones_like(ids)
    else:
        ids, mask = left_padded([9, 4, 6], seed=2)
    options = {} if cache == "dynamic" else {"cache_implementation": "static"}
    cached = greedy(model, ids, mask, use_cache=True, **options)
    uncached = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)
    layer = output_cache(cached).layers[0]
    assert layer.keys.shape[1] == 1  # one factor row per token: the cache really is the factorized one
    assert layer.keys.shape[-1] + layer.values.shape[-1] == model.config.kv_cache_width(0) < 2 * 32
    assert output_cache(uncached) is None


@pytest.mark.parametrize("kind", list(KINDS))
def test_chunked_prefill_equals_uncached(models, kind):
    """`prefill_chunk_size` (what bounds prefill activations at long contexts) feeds the prompt in pieces that
    attend to the cached factors of the pieces before them."""
    ids = random_ids(2, 23, seed=5)
    mask = torch.ones_like(ids)
    chunked = greedy(models[kind], ids, mask, prefill_chunk_size=8)
    uncached = greedy(models[kind], ids, mask, use_cache=False)
    assert torch.equal(chunked.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_static_decode_equals_uncached(models, kind):
    """generate's own compilation of the decode step over a static cache (what it does on a GPU; fullgraph, so a
    graph break fails), after a chunked prefill, gives the uncached tokens. Each kind compiles its decode step once, ~10 s on a CPU."""
    from transformers import CompileConfig

    model = copy.deepcopy(models[kind])
    ids, mask = left_padded([9, 6], seed=4)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = greedy(model, ids, mask, cache_implementation="static", compile_config=compile_config,
                      prefill_chunk_size=4)  # chunked: generate pre-sizes the static cache unless the model says no
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step really was compiled
    uncached = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(compiled.sequences, uncached.sequences)


@pytest.mark.parametrize("kind", ["tpa", "mfa_kr"])
def test_assistant_model(models, kind):
    """Assisted decoding (another converted model drafts, this one verifies) gives plain greedy's tokens."""
    ids = random_ids(1, 8, seed=3)
    mask = torch.ones_like(ids)
    plain = greedy(models[kind], ids, mask).sequences
    assistant = models["mfa" if kind == "tpa" else "tpa_contextual"]
    assisted = greedy(models[kind], ids, mask, assistant_model=assistant).sequences
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("kind", list(KINDS))
def test_return_dict_false_and_cache_under_the_old_name(models, kind):
    model = models[kind]
    ids = random_ids(2, 6, seed=4)
    with torch.no_grad():
        as_dict = model(ids, use_cache=True)
        as_tuple = model(ids, use_cache=True, return_dict=False)
        base_tuple = model.model(ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], as_dict.logits)
        torch.testing.assert_close(model.lm_head(base_tuple[0]), as_dict.logits)
        # The next step reads the cache whichever name it is passed under.
        step = random_ids(2, 1, seed=5)
        for name in ("cache", "past_key_values"):
            cache = type(output_cache(as_dict))()
            model(ids, use_cache=True, **{CACHE_KEY: cache})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                logits = model(step, use_cache=True, **{name: cache}).logits
            # The installed release's name is silent; the old one warns where the release renamed it.
            assert any(issubclass(w.category, FutureWarning) for w in caught) == (name == "past_key_values" != CACHE_KEY)
            full = model(torch.cat([ids, step], dim=1), use_cache=False).logits[:, -1:]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["tpa_contextual", "mfa_kr"])
def test_gradient_checkpointing_on_a_padded_batch(models, kind):
    """Checkpointed training with the config's default use_cache=True: same loss and gradients as without."""
    ids, mask = left_padded([7, 5, 3], seed=6)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(models[kind])
        model.train()
        if checkpointing:  # transformers 5.23 renamed gradient_checkpointing_enable
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    assert len(grad_a) == len(grad_b) > 0
    for a, b in zip(grad_a, grad_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["tpa", "tpa_contextual"])
def test_disk_offload_gives_the_same_logits(converted, kind, tmp_path):
    """accelerate offloading (device_map='auto' with too little memory) brings in every weight TPA reads."""
    folder = converted("llama_gqa", **KINDS[kind])
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map="auto", max_memory={"cpu": "40KB"}, offload_folder=tmp_path
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = random_ids(2, 7, seed=7)
    with torch.no_grad():
        got = offloaded(ids).logits
        expected = reference(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
