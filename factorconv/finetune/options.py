"""FinetuneOptions: everything `factorconv finetune` needs (also the `finetune:` section of a YAML recipe)."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import OptionError, option

Trainable = Literal["attention", "attention+norms", "all"]
DEFAULT_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
# Options that may differ between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "save_every", "keep_checkpoints", "eval_every", "max_shard_size"})


def default_lr(trainable: Trainable, hidden_size: int) -> float:
    """The measured best peak lr at two widths, extended by how the best one fell between them (heal_curves_*.md):
    attention (± norms) at 2e-2 on stories260K (hidden 64) and 3e-3 on pycode-27M (512) fall as 1 / hidden (Adam's
    update to a width-n matrix moves its outputs ∝ n·lr); all weights at 3e-3 and 1e-3 fall as 1 / √hidden."""
    if trainable == "all":
        return 0.024 / hidden_size**0.5
    return 1.28 / hidden_size


def token_count(value: str) -> int:
    """50M, 1.5B, 200k -> an int (plain numbers too)."""
    text = value.strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"{value!r} is not a token count; use e.g. 5000000 or 5M") from None


class FinetuneOptions(BaseModel):
    """Distillation healing of a converted model: KL(teacher ‖ student) at a temperature, plus optional CE."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the model to fine-tune: a folder written by `factorconv convert` (or a Hub id)")
    output: Path = Field(description="folder for the healed model, checkpoints, metrics and curves")
    data: list[str] = Field(
        min_length=1,
        description=".txt / .jsonl (a 'text' field per line) / pre-tokenized .npy files, folders of them, "
        "or a Hugging Face `datasets` name (needs the optional `datasets` package)",
    )
    revision: str | None = Field(default=None, description="Hub branch, tag or commit of MODEL when it is a Hub id")
    teacher: str | None = Field(
        default=None, description="teacher folder or Hub id (default: the source recorded in MODEL's config)"
    )
    teacher_revision: str | None = Field(default=None, description="Hub revision of the teacher")
    dataset_split: str = Field(default="train", description="split of a `datasets` name")

    tokens: int | None = Field(default=None, ge=1, description="train on this many tokens (rounded up to whole steps)")
    steps: int | None = Field(default=None, ge=1, description="optimizer steps (default: one pass over the data)")
    seq_len: int | None = Field(default=None, ge=2, description="packed block length (default: context, at most 2048)")
    batch_size: int = Field(default=8, ge=1, description="blocks per micro-batch on each process")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")

    lr: float | None = Field(
        default=None, gt=0,
        description="peak learning rate (AdamW; default: by the model's width, see default_lr: 2e-2 at hidden size 64, "
        "2.5e-3 at 512, 3.1e-4 at 4096 for attention; all weights 3e-3, 1.1e-3, 3.75e-4)",
    )
    warmup: int | None = Field(default=None, ge=0, description="linear warmup steps (default: 5% of the steps)")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine decays to lr × this at the last step")
    outside_lr_ratio: float = Field(
        default=1.0, gt=0,
        description="peak lr of the trained weights outside attention (MLP, norms, embeddings, LoRA) as a fraction "
        "of lr: the new attention factors may want larger steps than the pretrained weights around them",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (matrices only)")
    max_grad_norm: float = Field(default=1.0, ge=0, description="clip the global gradient norm (0: no clipping)")

    trainable: Trainable = Field(
        default="attention",
        description="attention: every attention weight (the new factors, queries, output projection); "
        "attention+norms: also the RMSNorm gains; all: every weight",
    )
    lora_r: int | None = Field(default=None, ge=1, description="also train LoRA adapters of this rank on the rest")
    lora_alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (default: 2 × lora_r)")
    lora_targets: list[str] = Field(
        default=list(DEFAULT_LORA_TARGETS), min_length=1, description="module names that get LoRA adapters"
    )
    save_adapter: bool = Field(default=False, description="also save the peft adapter in OUTPUT/adapter")

    kl_weight: float = Field(default=1.0, ge=0, description="weight of KL(teacher ‖ student)")
    ce_weight: float = Field(default=0.0, ge=0, description="weight of next-token cross-entropy")
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature of the KL term (scaled by T²)")
    hidden_weight: float = Field(
        default=0.0, ge=0,
        description="weight of the layer-wise term: mean over decoder layers of ‖student - teacher‖² / ‖teacher‖² "
        "of the layer's output hidden states",
    )
    attention_weight: float = Field(
        default=0.0, ge=0,
        description="weight of the layer-local term: mean over layers of ‖attn(x) - teacher attn(x)‖² / "
        "‖teacher attn(x)‖², each student attention block fed the input the teacher's block of that layer saw",
    )

    grad_checkpointing: bool = Field(default=False, description="recompute activations in backward to save memory")
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="weights of student and teacher while training (bf16 autocast on GPU)"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        default="auto", description="auto: accelerate's setting if given, else bf16 on GPUs that have it, no on CPU"
    )
    device: str = Field(default="auto", description="auto (GPU when there is one), cpu, cuda or mps")

    save_every: int | None = Field(default=None, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(default=2, ge=1, description="keep the newest N checkpoints")
    resume: bool = Field(default=False, description="continue from OUTPUT's newest checkpoint (start if none)")
    overwrite: bool = Field(default=False, description="replace OUTPUT if it exists")

    eval_data: str | None = Field(default=None, description="held-out file or folder (default: a split of --data)")
    eval_every: int | None = Field(default=None, ge=1, description="evaluate every N steps (always before and after)")
    eval_fraction: float = Field(default=0.05, gt=0, lt=1, description="share of --data blocks held out for eval")
    eval_tokens: int = Field(default=262_144, ge=2, description="evaluate on at most this many tokens")

    seed: int = Field(default=0, ge=0, description="data order and any randomness")
    max_shard_size: str = Field(default="2GB", description="largest output safetensors shard")

    @field_validator("tokens", "eval_tokens", mode="before")
    @classmethod
    def _count_with_suffix(cls, value: object) -> object:
        return token_count(value) if isinstance(value, str) else value

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if isinstance(value, (str, Path)):
            return [str(value)]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return value

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return [str(v).strip() for v in value if str(v).strip()]
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda", "mps"):
            if value.startswith("cuda:"):
                raise OptionError(f"pick a GPU with CUDA_VISIBLE_DEVICES={value[5:]}, not {option('device')} {value}")
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or mps")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneOptions":
        if self.tokens is not None and self.steps is not None:
            raise OptionError("give {tokens} or {steps}, not both")
        if self.kl_weight == self.ce_weight == self.hidden_weight == self.attention_weight == 0:
            raise ValueError("kl_weight, ce_weight, hidden_weight and attention_weight are all 0: nothing to train on")
        if self.lora_r is None and (self.save_adapter or self.lora_alpha is not None):
            raise ValueError("save_adapter and lora_alpha need lora_r")
        if self.lora_r is not None and self.trainable == "all":
            raise ValueError("trainable 'all' leaves nothing for LoRA; use attention or attention+norms with lora_r")
        if self.outside_lr_ratio != 1 and self.trainable == "attention" and self.lora_r is None:
            raise OptionError("{outside_lr_ratio} needs weights outside attention to train: "
                              "use {trainable} attention+norms or all, or {lora_r}")
        if self.resume and self.overwrite:
            raise OptionError("give {resume} or {overwrite}, not both")
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0 or self.attention_weight > 0

    def to_yaml(self) -> str:
        return yaml.safe_dump({"finetune": self.model_dump(mode="json")}, sort_keys=False)
