"""Mean-pooled GQA (Ainslie et al., 2023): the classic baseline that merges KV heads by averaging them."""

import torch


def mean_pool_heads(tensor: torch.Tensor, num_groups: int, new_groups: int) -> torch.Tensor:
    """Average consecutive blocks of heads of a (g·D, ...) weight or (g·D,) bias down to `new_groups` heads."""
    if num_groups % new_groups:
        raise ValueError(f"{num_groups} heads cannot be pooled evenly into {new_groups}")
    head_dim = tensor.shape[0] // num_groups
    grouped = tensor.reshape(new_groups, num_groups // new_groups, head_dim, *tensor.shape[1:])
    return grouped.mean(dim=1).reshape(new_groups * head_dim, *tensor.shape[1:])
