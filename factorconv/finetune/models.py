"""Student, teacher and optimizer: load both models, choose what trains (± LoRA), build AdamW and let accelerate
prepare the student (DDP / FSDP wrapping) and its optimizer."""

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..dtypes import DTYPES
from ..errors import FactorConvError
from .attention_match import AttentionMatch
from .options import FinetuneOptions
from .state import Inputs, Models
from .trainable import param_groups, select_trainable, trainable_modules, wrap_lora

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator


def load_model(folder: Path, dtype: torch.dtype | str, what: str) -> PreTrainedModel:
    """The model in `folder` from its safetensors (never a pickle), or a one-line error naming `what` it is."""
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise FactorConvError(f"cannot load the {what} from {folder}: {str(err).splitlines()[0]}") from None


def _stored_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the input's weights are stored in (float32 when its config names none we know)."""
    saved = getattr(config, "dtype", None)
    dtype = DTYPES.get(saved, saved) if isinstance(saved, str) else saved
    return dtype if dtype in DTYPES.values() else torch.float32


def _keep_trainable(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
    """Checkpoints hold only the trained weights (the frozen ones are re-read from MODEL on resume)."""
    for model, state in zip(models, weights):
        keep = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def build_models(options: FinetuneOptions, inputs: Inputs, accelerator: "Accelerator") -> Models:
    """The prepared student and optimizer and the frozen teacher, seeded by the options."""
    from accelerate.utils import set_seed

    o, acc = options, accelerator
    set_seed(o.seed)
    dtype = DTYPES[o.dtype]
    student = load_model(inputs.model, dtype, "model")
    student.config.use_cache = False
    modules = trainable_modules(student, o.trainable)
    if o.grad_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.23
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if o.lora_r is not None:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            student = wrap_lora(student, o, modules)
        lora_scaling = (o.lora_alpha or 2 * o.lora_r) / o.lora_r
    else:
        select_trainable(student, modules)
        lora_scaling = None
    trainable_count = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total_count = sum(p.numel() for p in student.parameters())
    student.to(acc.device).train()
    fused = acc.device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(student, o), lr=o.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)
    student, optimizer = acc.prepare(student, optimizer)
    teacher = None
    if inputs.teacher is not None:
        teacher = load_model(inputs.teacher, dtype, "teacher")
        teacher.config.use_cache = False
        teacher = teacher.requires_grad_(False).eval().to(acc.device)
    attention_match = None
    if o.attention_weight > 0:
        from accelerate.utils import DistributedType

        if acc.distributed_type == DistributedType.FSDP:  # its second attention pass runs outside FSDP's unsharding
            raise FactorConvError("--attention-weight does not run under FSDP; use DDP (the default of "
                                  "`accelerate launch` without an FSDP config) or drop --attention-weight")
        attention_match = AttentionMatch(student, teacher)
    acc.register_save_state_pre_hook(_keep_trainable)
    return Models(
        student=student,
        optimizer=optimizer,
        params=tuple(p for p in student.parameters() if p.requires_grad),
        teacher=teacher,
        attention_match=attention_match,
        lora_scaling=lora_scaling,
        trainable_count=trainable_count,
        total_count=total_count,
        output_dtype=_stored_dtype(inputs.config),
    )
