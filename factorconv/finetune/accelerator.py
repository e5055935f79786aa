"""The accelerate side of a run: one Accelerator from the options, work done on the main process first, and the
process-wide accelerate state reset afterwards."""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from ..errors import FactorConvError
from .options import FinetuneOptions

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator

T = TypeVar("T")


def make_accelerator(options: FinetuneOptions) -> "Accelerator":
    """The device and precision the options ask for; refuses a launch where each process would train alone."""
    from accelerate import Accelerator

    has_cuda = torch.cuda.is_available()
    has_mps = torch.backends.mps.is_available()
    if options.device == "cuda" and not has_cuda:
        raise FactorConvError("device cuda is not available here; use --device cpu or auto")
    if options.device == "mps" and not has_mps:
        raise FactorConvError("device mps is not available here; use --device cpu or auto")
    cpu = options.device == "cpu" or (options.device == "auto" and not has_cuda and not has_mps)
    precision = options.mixed_precision
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None  # `accelerate launch --mixed_precision` / its config file decides
        elif not cpu and has_cuda and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "no"
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # each would train alone, and all write OUTPUT
        raise FactorConvError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); check the accelerate config / --device"
        )
    return accelerator


def on_main_then_all(accelerator: "Accelerator", build: Callable[[], T]) -> T:
    """Run `build()` on the main process first, then on the others (which read what it cached).

    A FactorConvError on the main process is re-raised on every process instead of leaving them at a barrier.
    """
    from accelerate.utils import broadcast_object_list

    error = None
    result = None
    if accelerator.is_main_process:
        try:
            result = build()
        except FactorConvError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error is not None:
        raise FactorConvError(error)
    if not accelerator.is_main_process:
        result = build()
    return result


def reset_accelerate_state(single_process: bool) -> None:
    """Let a later finetune() in this process pick its own precision/device (single process only: a distributed
    process group stays as it is)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=single_process)
    GradientState._reset_state()
