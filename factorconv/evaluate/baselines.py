"""Baselines that the factorized targets are measured against, built in memory from a source model."""

import copy

import torch
from transformers import PreTrainedModel

from ..factorize.gqa_pool import mean_pool_heads


@torch.no_grad()
def mean_pooled_gqa(model: PreTrainedModel, kv_heads: int) -> PreTrainedModel:
    """The same Llama-family model with its KV heads averaged within groups down to `kv_heads`."""
    config = copy.deepcopy(model.config)
    groups = config.num_key_value_heads
    config.num_key_value_heads = kv_heads
    pooled = type(model)(config).to(dtype=next(model.parameters()).dtype).eval()
    state = model.state_dict()
    for name, tensor in state.items():
        if any(f"self_attn.{p}_proj." in name for p in "kv"):
            state[name] = mean_pool_heads(tensor, groups, kv_heads)
    pooled.load_state_dict(state)
    return pooled
