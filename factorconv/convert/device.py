"""The compute device named on the command line, checked before any work starts."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import FactorConvError, OptionError, option


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:1', 'mps' -> a device that exists here, or a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise FactorConvError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    usable = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }[device.type]
    if not usable:
        raise OptionError(f"device {name} is not available here; use {option('device')} cpu or auto")
    return device


@contextmanager
def tensor_float32(device: torch.device) -> Iterator[None]:
    """TF32 float32 matmuls on CUDA for the calibration passes and refinement steps, whose float32 activations
    only feed float64 statistics and fits that are kept when held-out error drops; at Llama-3.1-8B shapes those
    steps are most of a calibrated conversion's time (benchmarks/results/convert_cost_8b.md). The closed-form
    factorizations run outside it, so full-rank conversions stay exact. CPU and MPS are left as they are."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
