"""What MFA and MFA-KR share (as modeling's SharedKVAttention does): one cached row per token for all query
heads, the source's query and output projections kept in factored form, key and value width planning, and a
fixed shape when built to export as a stock architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import OptionError, option
from ..factorize.allocate import Component
from ..factorize.common import with_bias_column
from ..factorize.mfa import ValueBasis, key_gains, low_rank_queries, pair_moments, query_pair_energy, value_gains
from ..modeling import FactorConvConfig
from .base import Geometry, TargetKind, TargetSpec, check_range, flat_gains, per_layer_text
from .layer import SourceAttention, output_projection

if TYPE_CHECKING:
    from ..convert.options import ConvertOptions


class SharedKVKind(TargetKind):
    """widths = (the rotated key width, the other cached width); both kinds take a low-rank query product."""

    symbols: ClassVar[tuple[str, str]]  # how the model card writes the two widths, e.g. ("d_K", "d_V")

    def check_widths(self, target: TargetSpec, geometry: Geometry, hidden: int) -> None:
        full = geometry.kv_heads * geometry.head_dim
        for name in self.widths:
            check_range(name, target[name], full, "KV heads × head dim")
        rotated = target[self.widths[0]]
        if rotated is not None and rotated % 2:
            raise OptionError(f"{option(self.widths[0])} {rotated} must be even: RoPE rotates pairs of dimensions")
        check_range("query_rank", target["query_rank"], min(hidden, geometry.heads * geometry.head_dim),
                    "hidden size and query width")

    def check_fixed_shape(self, options: ConvertOptions, flag: str, hint: str = "") -> None:
        """A conversion built for a stock architecture has one shape, which it sets itself."""
        widths = self.given_widths(options)
        if widths:
            raise ValueError(f"{flag} sets the widths itself; drop {', '.join(widths)}{hint}")
        if options.allocation not in ("auto", "uniform"):
            raise ValueError(f"{flag} needs the same widths in every layer: drop allocation {options.allocation}")

    def components(self, geometry: Geometry, target: TargetSpec, src: SourceAttention | None = None,
                   moment: torch.Tensor | None = None) -> list[Component]:
        g, d, h = geometry.kv_heads, geometry.head_dim, geometry.heads
        key_name, value_name = self.widths
        if src is None:
            key, value = flat_gains(g * d // 2), flat_gains(g * d)
        else:
            k_weight, k_bias = src.weight("k"), src.bias("k")
            energy = None
            if moment is not None and target.query_aware:
                energy = query_pair_energy(src.weight("q"), src.bias("q"), h, g, d, moment)
            key = key_gains(pair_moments(k_weight, k_bias, g, d, moment), energy).tolist()
            value = value_gains(src.weight("v"), src.bias("v"), src.weight("o"), h, g, moment).tolist()
        return [Component(key_name, key, 2, units_per_value=2), Component(value_name, value, 1)]

    def dims(self, config: FactorConvConfig) -> str:
        (first, second), (a, b) = self.widths, self.symbols
        dims = (f"Widths per layer: {a} = {per_layer_text(getattr(config, first))}, "
                f"{b} = {per_layer_text(getattr(config, second))}")
        return dims + (f", query rank {per_layer_text(config.query_rank)}" if config.query_rank else "")


def source_side_tensors(src: SourceAttention, rank: int | None) -> dict[str, torch.Tensor]:
    """The source's own query and output projections, which MFA / MFA-KR keep (factored form): q_proj, or
    the q_down/q_up product when a query rank is set, and o_proj."""
    q_bias = src.bias("q")
    if rank is None:
        tensors = {f"{src.prefix}q_proj.weight": src.weight("q")}
        if q_bias is not None:
            tensors[f"{src.prefix}q_proj.bias"] = q_bias
    else:
        down, up, bias = low_rank_queries(with_bias_column(src.weight("q"), q_bias), q_bias is not None, rank)
        tensors = {f"{src.prefix}q_down.weight": down, f"{src.prefix}q_up.weight": up}
        if bias is not None:
            tensors[f"{src.prefix}q_up.bias"] = bias
    return {**tensors, **output_projection(src)}


def value_up(value: ValueBasis, num_groups: int) -> torch.Tensor:
    """(g, D, d_V): the read-back of each group's source-sized value from the cached value part."""
    return value.read.reshape(num_groups, -1, value.read.shape[1])


def query_rank(config: FactorConvConfig, layer: int) -> int | None:
    return config.query_rank[layer] if config.query_rank else None
