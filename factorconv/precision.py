"""Where float32 work may run at lower matmul precision: the calibration-time measurements and fits, never the
closed-form factorizations (which keep full-rank conversions exact)."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def tensor_float32(device: torch.device) -> Iterator[None]:
    """TF32 float32 matmuls on CUDA for the calibration passes, refinement steps, output errors and the probe's KL,
    whose float32 results only feed float64 statistics, rankings and fits that are kept when held-out error drops;
    at Llama-3.1-8B shapes those steps are most of a calibrated conversion's time
    (benchmarks/results/convert_cost_8b.md). The closed-form factorizations run outside it, so full-rank conversions
    stay exact. CPU and MPS are left as they are."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def fitting_autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA for the forward passes of refinement's Adam steps: in float32, SDPA has no flash kernel
    and the projections run at TF32 rate, and those steps were 12.6 s of the ~19 s per layer of an MFA-KR conversion
    at Llama-3.1-8B shapes (benchmarks/results/convert_cost_8b.md). The weights, Adam state and loss stay float32,
    and the result is kept only if the held-out error, measured without autocast, drops. Enter it once per forward
    pass: autocast keeps its bf16 copies of the weights until it exits, so one context around several optimizer
    steps would go on computing with the first step's weights. CPU and MPS run as they are."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)
