"""Validated options for factorconv's commands (pydantic, unknown keys rejected), with YAML round trip."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

DType = Literal["auto", "float32", "bfloat16", "float16"]


class ConvertOptions(BaseModel):
    """Everything `factorconv convert` needs; saved as `factorconv_recipe.yaml` in every output folder."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="local folder or Hugging Face Hub id of the source model")
    output: Path = Field(description="folder to write the converted model into")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit of the source")
    to: Literal["tpa"] = "tpa"
    rank_k: int | None = Field(default=None, ge=1, description="TPA key rank R_K (default: the source's KV heads)")
    rank_v: int | None = Field(default=None, ge=1, description="TPA value rank R_V (default: the source's KV heads)")
    rank_q: int | None = Field(default=None, ge=1, description="factorize queries with this rank (default: no)")
    contextual: bool = Field(default=False, description="add input-dependent head factors a(x) = α + A x")
    dtype: DType = "auto"
    max_shard_size: str = "2GB"
    device: str = "cpu"
    overwrite: bool = False

    def to_yaml(self) -> str:
        return yaml.safe_dump({"convert": self.model_dump(mode="json")}, sort_keys=False)
