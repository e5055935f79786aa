"""What one decoding step dispatches: every ATen op a forward runs, split into kernels (ops that write memory of
their own) and views (ops whose outputs alias an input). At small batch a GPU decode step is bound by the host
launching kernels (benchmarks/results/decode_gpu.md), so their number per layer is the speed a CPU can see."""

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache, PreTrainedModel

from ..modeling import CACHE_KEY


@dataclass
class OpCount:
    """ATen ops by name, kernels and views apart."""

    kernels: Counter = field(default_factory=Counter)
    views: Counter = field(default_factory=Counter)

    def total(self, views: bool = False) -> int:
        return sum((self.views if views else self.kernels).values())


class _Recorder(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        view = bool(outputs) and all(t.untyped_storage().data_ptr() in inputs for t in outputs)
        name = str(func).removeprefix("aten.").removesuffix(".default")
        (self.count.views if view else self.count.kernels)[name] += 1
        return out


@dataclass(frozen=True)
class DecodeOps:
    """One decoding step: the ops of the first layer's attention module and of the whole forward."""

    attention: OpCount
    step: OpCount


def decode_step_ops(model: PreTrainedModel, batch: int, tokens: int, seed: int = 0) -> DecodeOps:
    """A decoding step that attends over `tokens` cached tokens (its own included): prefill `tokens` - 1 random
    tokens per sequence and decode one more, twice; the first time builds whatever the model derives once from its
    weights, the second is counted (with a padding mask, as `generate` passes it)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens), generator=gen).to(device)
    mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    context = tokens - 1
    ops = DecodeOps(OpCount(), OpCount())
    layer = _Recorder(ops.attention)
    counting = [False]

    def enter(*_) -> None:
        if counting[0]:
            layer.__enter__()

    def leave(*_) -> None:
        if counting[0]:
            layer.__exit__(None, None, None)

    module = model.model.layers[0].self_attn
    hooks = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            for counted in (False, True):
                cache = DynamicCache(config=model.config)
                model(ids[:, :context], attention_mask=mask[:, :context], use_cache=True, **{CACHE_KEY: cache})
                counting[0] = counted
                with _Recorder(ops.step) if counted else contextlib.nullcontext():
                    model(ids[:, context:], attention_mask=mask, use_cache=True, **{CACHE_KEY: cache})
    finally:
        for hook in hooks:
            hook.remove()
    return ops
