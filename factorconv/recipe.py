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
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump({"convert": self.model_dump(mode="json")}, sort_keys=False)
