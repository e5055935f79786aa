"""The compute device named on the command line, checked before any work starts."""

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
