"""ConvertOptions resolved once into what the conversion stages read (device, calibration, allocation, init,
refinement, output), so no stage after `resolve_plan` sees the options as a whole.

Two steps, because some widths are only known after calibration: this plan is everything fixed before the source
is read; `plan.plan_target` then decides the per-layer widths (from the budget, the spectra or the probe).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from ..kinds import TargetSpec
from .device import resolve_device
from .options import ConvertOptions
from .writer import parse_size


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration tokens: `data` (.txt, .jsonl, .npy or a datasets name), `samples` sequences of `seq_len`."""

    data: str
    samples: int
    seq_len: int | None  # None: the model's context, at most 512


REFINE_BATCH = 4  # calibration sequences per refinement step unless given (or capped on a CPU: refine.py)


@dataclass(frozen=True)
class RefineSpec:
    """Local refinement per layer (convert/refine.py); resolved: the defaults depend on budget and kind, and on a
    CPU on the model's size (`refine.cpu_refinement`, once the calibration tokens are known)."""

    steps: int
    batch_size: int  # calibration sequences per step
    lr: float
    schedule: str
    cpu_default: bool = False  # steps and batch are the defaults and the device is a CPU: they may be capped


@dataclass(frozen=True)
class OutputSpec:
    folder: Path
    dtype: str  # a DTYPES name, or "auto": the source's own
    max_shard_bytes: int
    overwrite: bool
    recipe: str  # the options as saved beside the weights (factorconv_recipe.yaml, the model card)


@dataclass(frozen=True)
class ConversionPlan:
    source: str  # local folder or Hub id, as given
    revision: str | None
    target: TargetSpec
    allocation: str  # how target.kv_budget is spread: uniform, greedy or measured
    statistics: bool  # the converters read calibration statistics (calibration data and an init other than weight)
    fit_contextual: bool  # init "als": TPA's contextual factors fitted to the calibration keys/values
    device: torch.device
    calibration: CalibrationSpec | None
    refine: RefineSpec
    output: OutputSpec


def resolve_plan(options: ConvertOptions) -> ConversionPlan:
    """The plan `options` ask for; the device must exist here and the shard size parse (one-line errors)."""
    calibration = None
    if options.calib is not None:
        calibration = CalibrationSpec(options.calib, options.calib_samples, options.calib_seq_len)
    device = resolve_device(options.device)
    return ConversionPlan(
        source=options.source,
        revision=options.revision,
        target=options.target(),
        allocation=options.allocation,
        statistics=options.uses_statistics,
        fit_contextual=options.init == "als",
        device=device,
        calibration=calibration,
        refine=RefineSpec(
            options.layer_refine_steps, options.refine_batch or REFINE_BATCH, options.refine_lr,
            options.refine_schedule,
            cpu_default=device.type == "cpu" and options.refine_steps is None and options.refine_batch is None,
        ),
        output=OutputSpec(
            Path(options.output).expanduser(), options.dtype, parse_size(options.max_shard_size), options.overwrite,
            options.to_yaml(),
        ),
    )
