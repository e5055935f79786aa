"""The learning-rate schedule: linear warmup, then cosine down to lr × min_lr_ratio."""

import math

from .options import FinetuneOptions


def lr_at(step: int, options: FinetuneOptions, total: int, warmup: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = options.lr * options.min_lr_ratio
    return floor + (options.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def default_warmup(total: int) -> int:
    return int(0.05 * total)
