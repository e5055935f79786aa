"""Perplexity over non-overlapping windows of a token stream."""

import math

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import FactorConvError


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokens: torch.Tensor, seq_len: int, batch_size: int = 8, progress: bool = True
) -> float:
    """exp(mean next-token NLL) with every token after the first predicted exactly once.

    Windows of `seq_len` tokens overlap by one token: each predicts its tokens 2..seq_len.
    """
    device = next(model.parameters()).device
    stride = seq_len - 1
    windows = [tokens[i : i + seq_len] for i in range(0, tokens.numel() - 1, stride)]
    windows = [w for w in windows if w.numel() >= 2]
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(w.numel() for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, window in enumerate(batch):
            ids[row, : window.numel()], mask[row, : window.numel()] = window, 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        keep = mask[:, 1:].reshape(-1).bool()
        total_nll += float(nll[keep].sum())
        total_tokens += int(keep.sum())
        bar.update(len(batch))
    bar.close()
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise FactorConvError(
            f"{type(model).__name__} gives non-finite losses (NaN or inf) on this data; its weights are corrupt"
        )
    return math.exp(mean)
