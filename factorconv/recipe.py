"""Validated options for factorconv's commands (pydantic, unknown keys rejected), with YAML round trip."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
TARGET_OPTIONS: dict[str, set[str]] = {
    "tpa": {"rank_k", "rank_v", "rank_q", "contextual"},
    "mfa": {"key_dim", "value_dim", "query_rank"},
    "mfa_kr": {"rope_dim", "nope_dim", "query_rank"},
}


class ConvertOptions(BaseModel):
    """Everything `factorconv convert` needs; saved as `factorconv_recipe.yaml` in every output folder."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="local folder or Hugging Face Hub id of the source model")
    output: Path = Field(description="folder to write the converted model into")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit of the source")
    to: Literal["tpa", "mfa", "mfa_kr"] = "tpa"
    rank_k: int | None = Field(default=None, ge=1, description="TPA key rank R_K (default: the source's KV heads)")
    rank_v: int | None = Field(default=None, ge=1, description="TPA value rank R_V (default: the source's KV heads)")
    rank_q: int | None = Field(default=None, ge=1, description="factorize queries with this rank (default: no)")
    contextual: bool = Field(default=False, description="add input-dependent head factors a(x) = α + A x")
    key_dim: int | None = Field(default=None, ge=2, description="MFA key width d_K (default: KV heads × head dim)")
    value_dim: int | None = Field(default=None, ge=1, description="MFA value width d_V (default: exact)")
    rope_dim: int | None = Field(default=None, ge=2, description="MFA-KR rotated width d_R (default: exact)")
    nope_dim: int | None = Field(default=None, ge=1, description="MFA-KR shared key/value width d_N (default: exact)")
    query_rank: int | None = Field(default=None, ge=1, description="MFA/MFA-KR low-rank query product width C")
    kv_budget: float | None = Field(
        default=None, gt=0, le=1, description="fraction of the source's KV bytes per token; ranks/dims are allocated"
    )
    allocation: Literal["greedy", "uniform"] = Field(
        default="greedy", description="with kv_budget: spend bytes where spectra predict the most error, or evenly"
    )
    calib: str | None = Field(default=None, description="calibration data: .txt, .jsonl, .npy or a datasets name")
    calib_samples: int = Field(default=128, ge=2, description="calibration sequences (10% are held out)")
    calib_seq_len: int = Field(default=2048, ge=8, description="tokens per calibration sequence")
    init: Literal["auto", "weight", "stats"] = Field(
        default="auto", description="weight-only maths, or calibration statistics (auto: stats when calib is given)"
    )
    refine_steps: int | None = Field(
        default=None, ge=0, description="Adam steps per layer fitting attention outputs (default 200 with calib)"
    )
    dtype: DType = "auto"
    max_shard_size: str = "2GB"
    device: str = "cpu"
    overwrite: bool = False

    @field_validator("to", mode="before")
    @classmethod
    def _dash_or_underscore(cls, value: object) -> object:
        return value.replace("-", "_") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_match_target(self) -> "ConvertOptions":
        for name in sorted(set().union(*TARGET_OPTIONS.values()) - TARGET_OPTIONS[self.to]):
            if getattr(self, name) in (None, False):
                continue
            owners = [t for t, names in TARGET_OPTIONS.items() if name in names]
            raise ValueError(f"{name} applies to --to {'/'.join(owners)}, not {self.to}")
        if self.kv_budget is not None:
            explicit = [n for n in sorted(TARGET_OPTIONS[self.to] - {"contextual", "rank_q", "query_rank"}) if getattr(self, n)]
            if explicit:
                raise ValueError(f"kv_budget allocates the widths itself; drop {', '.join(explicit)}")
        if self.calib is None and (self.init == "stats" or (self.refine_steps or 0) > 0):
            raise ValueError("init 'stats' and refine_steps need calibration data: pass calib")
        return self

    @property
    def uses_statistics(self) -> bool:
        return self.calib is not None and self.init != "weight"

    @property
    def layer_refine_steps(self) -> int:
        if self.refine_steps is not None:
            return self.refine_steps
        return 200 if self.calib is not None else 0

    def to_yaml(self) -> str:
        return yaml.safe_dump({"convert": self.model_dump(mode="json")}, sort_keys=False)
