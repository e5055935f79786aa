"""What a target kind is: one object with everything factorconv knows about one factorized attention (its
options and their checks, the widths a KV budget spreads, refinement defaults, the config fields it writes, its
layer converter, its width planning, its model-card text and the name of its modeling class).

In the spirit of peft's config-type mappings: `factorconv.kinds.KINDS` maps a name to its kind, and every
other module asks the kind instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import OptionError, option
from ..factorize.allocate import Component
from ..modeling import FactorConvConfig
from .layer import LayerResult, LayerStatistics, SourceAttention

if TYPE_CHECKING:
    from ..convert.options import ConvertOptions


@dataclass
class Geometry:
    """The source attention shapes that decide what a layer can cache."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Geometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, config.num_key_value_heads or heads, head_dim)

    @property
    def source_width(self) -> int:
        """Numbers the source caches per token and layer (keys and values of every KV head)."""
        return 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class TargetSpec:
    """A target kind with the values of its own options, resolved once from ConvertOptions: what the width
    checks, planning, config fields and serving shapes read, so no stage after the resolution sees the options."""

    kind: TargetKind
    settings: Mapping[str, Any]  # the kind's options (`kind.options`) -> value as given (None / False: not given)
    kv_budget: float | None = None  # fraction of the source's KV bytes the widths are allocated for
    query_aware: bool = False  # init "query-aware": key directions weighted by how strongly queries read them

    def __getitem__(self, option: str) -> Any:
        return self.settings[option]

    def with_settings(self, **changes: Any) -> TargetSpec:
        """The same target with some of its options changed (e.g. what `plan` says of an `mla` build)."""
        return replace(self, settings={**self.settings, **changes})


def check_range(name: str, value: int | None, upper: int, what: str) -> None:
    """An explicit rank or width must lie in 1..upper; the error names the option."""
    if value is not None and not 1 <= value <= upper:
        raise OptionError(f"{option(name)} {value} is out of range: it must be between 1 and {upper} ({what})")


def flat_gains(count: int) -> list[float]:
    """Gain curve without weights: every unit worth the same."""
    return [1.0 / count] * count


def per_layer_text(values: list[int] | None) -> str:
    """One value when every layer has it, else the list (model cards)."""
    if not values:
        return "-"
    return str(values[0]) if len(set(values)) == 1 else "[" + ", ".join(map(str, values)) + "]"


class TargetKind:
    """One target attention. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]  # `--to` value with underscores, config.json's `attention`
    sizes: ClassVar[tuple[str, ...]]  # ConvertOptions' integer fields only this kind takes (ranks, widths)
    switches: ClassVar[tuple[str, ...]] = ()  # its other ConvertOptions fields (flags, shapes)
    widths: ClassVar[tuple[str, str]]  # the two sizes a kv_budget allocates (plan order)
    config_names: ClassVar[dict[str, str]] = {}  # option name -> FactorConvConfig field, where they differ
    inits: ClassVar[dict[str, str]] = {}  # init methods only this kind takes -> what they do, how to ask (template)
    refine_lr: ClassVar[float]  # default refinement step (fraction of each tensor's RMS)
    refine_schedule: ClassVar[str]  # default refinement schedule
    modeling_class: ClassVar[str]  # the attention class in modeling/modeling_factorconv.py

    @property
    def flag(self) -> str:
        """The name as typed on the command line: mfa-kr."""
        return self.name.replace("_", "-")

    @property
    def options(self) -> tuple[str, ...]:
        return self.sizes + self.switches

    def config_name(self, option: str) -> str:
        return self.config_names.get(option, option)

    def given_widths(self, options: ConvertOptions) -> list[str]:
        """The width options set explicitly (sorted, as errors name them)."""
        return [name for name in sorted(self.widths) if getattr(options, name)]

    # --- options -----------------------------------------------------------------------------------------------

    def validate(self, options: ConvertOptions) -> None:
        """Kind-specific checks across ConvertOptions' fields; raise ValueError (pydantic reports it)."""

    def serving_format(self, target: TargetSpec) -> str | None:
        """The stock architecture this target is built to export as (None: not built for one)."""
        return None

    def check_widths(self, target: TargetSpec, geometry: Geometry, hidden: int) -> None:
        """Explicit ranks/widths against the source's shapes; raise OptionError naming the option."""
        raise NotImplementedError

    def config_fields(self, target: TargetSpec) -> dict:
        """The FactorConvConfig fields this target sets (per-layer widths from a plan replace the sizes)."""
        raise NotImplementedError

    # --- planning -----------------------------------------------------------------------------------------------

    def components(self, geometry: Geometry, target: TargetSpec, src: SourceAttention | None = None,
                   moment: torch.Tensor | None = None) -> list[Component]:
        """What one layer can spend width on, with gain curves from its weights (flat without weights) and the
        calibration moment when given."""
        raise NotImplementedError

    def serving_widths(self, target: TargetSpec, geometry: Geometry) -> dict[str, int] | None:
        """The fixed widths of a conversion built to export as a stock architecture (None: not built for one)."""
        return None

    def serving_note(self, target: TargetSpec, geometry: Geometry) -> str | None:
        """What `factorconv plan` says about serving this kind as a stock architecture."""
        return None

    # --- conversion and description -----------------------------------------------------------------------------

    def convert(
        self, src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
    ) -> LayerResult:
        """One layer's target tensors from the source's projections (and calibration statistics)."""
        raise NotImplementedError

    def describe(self, config: FactorConvConfig) -> str:
        """The model card's sentence on what this attention is."""
        raise NotImplementedError

    def dims(self, config: FactorConvConfig) -> str:
        """The model card's ranks or widths per layer."""
        raise NotImplementedError
