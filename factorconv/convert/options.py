"""The options of `factorconv convert` (pydantic, unknown keys rejected): what a conversion is asked to do,
checked across fields and against each target kind (factorconv/kinds), saved with every output."""

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import OptionError, option
from ..kinds import KIND_OPTIONS, KINDS, REFINE_DEFAULTS_TEXT, TargetKind, TargetSpec

KindName = Literal[tuple(KINDS)]  # type: ignore[valid-type]  # "tpa", "mfa", "mfa_kr": the registry's names
DType = Literal["auto", "float32", "bfloat16", "float16"]
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device_name(name: str) -> str:
    """Catch a misspelt device when the recipe is validated; whether it exists here is checked at run time."""
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    return name


DeviceName = Annotated[str, AfterValidator(_device_name)]


class ConvertOptions(BaseModel):
    """Everything `factorconv convert` needs; saved as `factorconv_recipe.yaml` in every output folder."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="local folder or Hugging Face Hub id of the source model")
    output: Path = Field(description="folder to write the converted model into")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit of the source")
    to: KindName = "tpa"
    rank_k: int | None = Field(default=None, ge=1, description="TPA key rank R_K (default: the source's KV heads)")
    rank_v: int | None = Field(default=None, ge=1, description="TPA value rank R_V (default: the source's KV heads)")
    rank_q: int | None = Field(default=None, ge=1, description="factorize queries with this rank (default: no)")
    contextual: bool = Field(default=False, description="add input-dependent head factors a(x) = α + A x")
    key_dim: int | None = Field(default=None, ge=2, description="MFA key width d_K (default: KV heads × head dim)")
    value_dim: int | None = Field(default=None, ge=1, description="MFA value width d_V (default: exact)")
    rope_dim: int | None = Field(default=None, ge=2, description="MFA-KR rotated width d_R (default: exact)")
    nope_dim: int | None = Field(default=None, ge=1, description="MFA-KR shared key/value width d_N (default: exact)")
    query_rank: int | None = Field(default=None, ge=1, description="MFA/MFA-KR low-rank query product width C")
    mla: bool = Field(
        default=False,
        description="MFA-KR built to export as DeepSeek-V3 (MLA): standard RoPE part, normalised latent, the same "
        "shape in every layer (mla_shape, or kv_budget: RoPE part up to the head dim, at most half the width)",
    )
    mla_shape: str | None = Field(
        default=None, pattern=r"^\d+\+\d+$",
        description="with mla: kv_lora_rank+qk_rope_head_dim, e.g. 512+64 or 256+64 (what vLLM's MLA kernels take)",
    )
    mqa: bool = Field(
        default=False,
        description="MFA built to export as a Llama with one KV head: key and value one head dim wide, one key pair "
        "per RoPE frequency (caches 1/KV-heads of the source)",
    )
    kv_budget: float | None = Field(
        default=None, gt=0, le=1, description="fraction of the source's KV bytes per token; ranks/dims are allocated"
    )
    allocation: Literal["auto", "uniform", "greedy", "measured"] = Field(
        default="auto",
        description="with kv_budget: measured (probe each layer's KL when converted alone at uniform widths, then "
        "give width where it costs most; needs calib, one extra pass), uniform (the same widths in every layer) or "
        "greedy (water-filling on the spectra; measured worse zero-shot); auto: measured with calib, else uniform "
        "(benchmarks/results/allocation_*.md)",
    )
    calib: str | None = Field(default=None, description="calibration data: .txt, .jsonl, .npy or a datasets name")
    calib_samples: int = Field(default=64, ge=2, description="calibration sequences (10% are held out)")
    calib_seq_len: int | None = Field(
        default=None, ge=8, description="tokens per calibration sequence (default: the context, at most 512)"
    )
    init: Literal["auto", "weight", "stats", "query-aware", "als"] = Field(
        default="auto",
        description="weight-only maths, calibration statistics, statistics with query-weighted key merging, or "
        "(TPA with contextual) factors a(x), b(x) fitted to calibration keys/values by alternating least squares "
        "(auto: stats when calib is given)",
    )
    refine_steps: int | None = Field(
        default=None, ge=0, description="Adam steps per layer fitting attention outputs (default with calib: 200, "
        "400 at kv_budget 0.25 or below, in between 100 / kv_budget; on a CPU capped for large models, see "
        "refine_batch; 0: least-squares refit of the output projection only)"
    )
    refine_batch: int | None = Field(
        default=None, ge=1, description="calibration sequences per refinement step (default 4; on a CPU, where the "
        "default steps x sequences x tokens x layers x hidden size would exceed 1.5e9 (refine.CPU_REFINE_WORK), 2, "
        "with the steps scaled down to that work)"
    )
    refine_lr: float | None = Field(
        default=None, gt=0, le=1,
        description="Adam's peak step as a fraction of each tensor's RMS (Adam moves every element by about its lr; "
        f"default per target: {REFINE_DEFAULTS_TEXT})",
    )
    refine_schedule: Literal["warmup-cosine", "constant"] | None = Field(
        default=None,
        description="refinement step size over the steps: linear warm-up over the first 10% then cosine decay to "
        f"10% of refine_lr, or constant (default per target: {REFINE_DEFAULTS_TEXT})",
    )
    dtype: DType = "auto"
    max_shard_size: str = "2GB"
    device: DeviceName = "cpu"
    overwrite: bool = False

    @field_validator("to", mode="before")
    @classmethod
    def _dash_or_underscore(cls, value: object) -> object:
        return value.replace("-", "_") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_match_target(self) -> "ConvertOptions":
        kind = KINDS[self.to]
        for name in sorted(set(KIND_OPTIONS) - set(kind.options)):
            if getattr(self, name) in (None, False):
                continue
            owners = [k.name for k in KINDS.values() if name in k.options]
            raise OptionError(f"{option(name)} applies to {option('to')} {'/'.join(owners)}, not {self.to}")
        widths = kind.given_widths(self)
        if self.kv_budget is not None and widths:
            raise ValueError(f"kv_budget allocates the widths itself; drop {', '.join(widths)}")
        kind.validate(self)
        for owner in KINDS.values():
            if self.init in owner.inits and owner is not kind:
                raise OptionError(f"{option('init')} {self.init!r} {owner.inits[self.init]}")
        if self.allocation == "auto":  # resolved here, so what is saved with the output says what ran
            fixed = self.serving_format is not None or self.kv_budget is None or self.calib is None
            self.allocation = "uniform" if fixed else "measured"
        self.refine_lr = kind.refine_lr if self.refine_lr is None else self.refine_lr
        self.refine_schedule = kind.refine_schedule if self.refine_schedule is None else self.refine_schedule
        if self.allocation == "measured" and (self.calib is None or self.kv_budget is None):
            raise OptionError("{allocation} 'measured' spreads a KV budget by layer sensitivity measured on "
                              "calibration data: pass {kv_budget} and {calib}")
        if self.calib is None and (self.init in ("stats", "query-aware", "als") or (self.refine_steps or 0) > 0):
            raise OptionError(f"{option('init')} {self.init!r} and {option('refine_steps')} need calibration data: "
                              f"pass {option('calib')}")
        return self

    @property
    def uses_statistics(self) -> bool:
        return self.calib is not None and self.init != "weight"

    @property
    def kind(self) -> TargetKind:
        return KINDS[self.to]

    def target(self) -> TargetSpec:
        """The target kind with its own options' values: what planning and the config read."""
        settings = {name: getattr(self, name) for name in self.kind.options}
        return TargetSpec(self.kind, settings, self.kv_budget, self.init == "query-aware")

    @property
    def serving_format(self) -> str | None:
        """The stock architecture the conversion is built to export as."""
        return self.kind.serving_format(self.target())

    @property
    def layer_refine_steps(self) -> int:
        if self.refine_steps is not None:
            return self.refine_steps
        if self.calib is None:
            return 0
        # Lower budgets start farther from the source and keep improving longer: SmolLM2 MFA-KR at 25%, 200 steps
        # 2.08x (quality_smollm2.md), 400 steps 1.93x (refine_schedule_smollm2.md).
        return round(200 * min(2.0, max(1.0, 0.5 / self.kv_budget))) if self.kv_budget is not None else 200

    def to_yaml(self) -> str:
        return yaml.safe_dump({"convert": self.model_dump(mode="json")}, sort_keys=False)
