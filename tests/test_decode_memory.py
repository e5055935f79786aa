"""Decoding reads the factor cache as it is: no step allocates a per-head copy of the cached factors or rebuilds
per-head keys/values (the memory traffic that makes a small cache slow). Checked by recording every tensor the
decode step allocates, on a context long enough that such a copy would dwarf everything else."""

import pytest
import torch
from conftest import random_ids, randomize_head_proj
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from factorconv.evaluate.dispatch import decode_step_ops
from factorconv.modeling import CACHE_KEY, output_cache
from factorconv.modeling import modeling_factorconv as modeling

KINDS = {
    "tpa": dict(rank_k=1, rank_v=1),
    "tpa_contextual": dict(contextual=True, rank_k=1, rank_v=1),
    "mfa": dict(to="mfa", key_dim=16, value_dim=16),
    "mfa_kr": dict(to="mfa_kr", rope_dim=16, nope_dim=16),
}


class DecodeRecord(TorchDispatchMode):
    """The largest tensor storage an op creates (outputs that are views of an input do not count), and every
    batched matmul that reads one operand once per batch entry (a stride-0 batch axis: the cached factors
    broadcast over the query heads, so each head reads the whole cache again)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op, self.broadcast_reads = 0, None, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
            self.broadcast_reads += [tuple(t.shape) for t in tensors if t.dim() == 3 and t.shape[0] > 1
                                     and t.stride(0) == 0]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if t.untyped_storage().nbytes() > self.largest:
                    self.largest, self.op = t.untyped_storage().nbytes(), str(func)
        return out


@pytest.mark.parametrize("path", ["sdpa", "matmul"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_decode_step_reads_the_cache_once_and_copies_nothing_per_head(converted, load_model, kind, path, monkeypatch):
    """path matmul: the two matrix products a GPU decodes with (forced here on the CPU)."""
    if path == "matmul":
        monkeypatch.setattr(modeling, "fused_decode_applies", lambda key: False)
    model = load_model(converted("llama_gqa", **KINDS[kind]))  # 8 heads of 16, 2 KV heads; 128 positions
    if model.config.tpa_contextual:
        model = randomize_head_proj(model, seed=0)
    config = model.config
    prompt = random_ids(1, 120, seed=1)
    with torch.no_grad():
        prefill = model(prompt, use_cache=True)
        cache = output_cache(prefill)
        step = prompt[:, -1:]
        with DecodeRecord() as record:
            model(step, use_cache=True, **{CACHE_KEY: cache})
    tokens = prompt.shape[1] + 1
    # A per-head copy of one layer's cached key factors, or per-head keys of the source's head size, is at least
    # heads × tokens × head_dim numbers; decoding must stay well below it (a few heads × tokens score vectors).
    per_head_copy = config.num_attention_heads * tokens * config.head_dim * 4
    assert record.largest < per_head_copy / 2, (record.op, record.largest, per_head_copy)
    assert record.broadcast_reads == []  # the cache is read once for all heads (heads folded into the rows)


# Kernels one decoding step's attention launches per layer on a GPU's path, at most (today's counts, with a batch
# above one and a token count off the multiples of 8, the path with the most). A small-batch GPU decode step is
# host-bound, so each kernel more is time (benchmarks/results/decode_ops.md); the source's LlamaAttention launches
# 17 on the same count. A change that adds kernels to the decode step has to justify it here.
KERNEL_BUDGET = {"tpa": 22, "tpa_contextual": 26, "mfa": 25, "mfa_kr": 27}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_decode_step_launches_few_kernels(converted, kind, monkeypatch):
    monkeypatch.setattr(modeling, "fused_decode_applies", lambda key: False)
    folder = converted("llama_gqa", **KINDS[kind])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    if model.config.tpa_contextual:
        model = randomize_head_proj(model, seed=0)
    ops = decode_step_ops(model, batch=2, tokens=121)
    assert ops.attention.total() <= KERNEL_BUDGET[kind], dict(ops.attention.kernels)
