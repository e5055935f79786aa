"""Perplexity on the eval blocks during training, spread over the processes."""

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, accelerator: "Accelerator") -> float:
    """exp(mean NLL) of tokens 2..L of every eval block; blocks are spread over processes and summed.

    Every process runs the same number of forward passes (padding with zero-weight blocks), as FSDP needs.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, blocks.shape[0], world))
    per_rank = math.ceil(blocks.shape[0] / world)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, per_rank, batch_size):
        chosen = mine[start : start + batch_size]
        weight = [1.0] * len(chosen) + [0.0] * (min(batch_size, per_rank - start) - len(chosen))
        chosen = chosen + [0] * (len(weight) - len(chosen))
        ids = blocks[chosen].to(accelerator.device)
        with accelerator.autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
        ).sum(-1)
        w = torch.tensor(weight, dtype=torch.float64, device=nll.device)
        totals[0] += (nll.double() * w).sum()
        totals[1] += w.sum() * (ids.shape[1] - 1)
    totals = accelerator.reduce(totals, reduction="sum")
    if was_training:
        model.train()
    return math.exp(float(totals[0] / totals[1]))
