"""The records that set-up hands on, one per stage, each built once and then only read.

pipeline.finetune builds them in order (inputs, output folder, data, models); a stage that needs an earlier one
takes it as an argument, so the order is the one the types allow. `Training` is what the loop and the checkpoints
read.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig

from .data import BlockSampler, Split
from .options import FinetuneOptions

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator

    from .attention_match import AttentionMatch


@dataclass(frozen=True)
class Inputs:
    """The model and teacher folders and the block length, checked before OUTPUT is touched."""

    model: Path
    config: PretrainedConfig
    teacher_name: str | None  # as given or recorded in the model's config; None when the loss needs no teacher
    teacher: Path | None
    seq_len: int


@dataclass(frozen=True)
class Folders:
    """Where the run writes (`work`) and where its result ends up (`final`): beside it for --overwrite, so the
    previous result stays whole until this one is complete."""

    final: Path
    work: Path
    created: bool  # this run made `work`, so a failure before the first step removes it


@dataclass(frozen=True)
class TrainingData:
    """The packed blocks, their order and the step count that follows from them."""

    split: Split
    sampler: BlockSampler
    tokens_per_step: int  # over all processes
    total: int  # optimizer steps
    warmup: int
    eval_description: str


@dataclass(frozen=True)
class Models:
    """Student and optimizer prepared by accelerate, the frozen teacher, and what the output needs of them."""

    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: tuple[torch.nn.Parameter, ...]  # the trained ones, as prepared
    teacher: torch.nn.Module | None
    attention_match: "AttentionMatch | None"  # hooks for the layer-local term; None when its weight is 0
    lora_scaling: float | None  # merged into the base weights on output; None without LoRA
    trainable_count: int
    total_count: int
    output_dtype: torch.dtype  # the input's stored dtype, which the healed weights keep


@dataclass(frozen=True)
class Training:
    """Everything the training loop and its checkpoints read."""

    options: FinetuneOptions  # with lr resolved
    accelerator: "Accelerator"
    folders: Folders
    data: TrainingData
    models: Models
