"""Per-layer ranks/widths for a KV budget: from spectra of the weights (and calibration statistics) or,
with a config alone, uniformly. `plan_layers` is what `factorconv plan` prints and `convert` applies."""

from dataclasses import dataclass

import torch

from ..errors import FactorConvError
from ..factorize.allocate import Component, greedy_allocation, uniform_allocation
from ..factorize.mfa import key_gains, pair_moments, query_pair_energy, value_gains
from ..factorize.tpa import head_mode_gains
from ..recipe import ConvertOptions
from .calibrate import LayerwiseRunner
from .layers import SourceAttention
from .source import SourceCheckpoint

WIDTH_FIELDS = {"tpa": ("rank_k", "rank_v"), "mfa": ("key_dim", "value_dim"), "mfa_kr": ("rope_dim", "nope_dim")}


@dataclass
class Geometry:
    """The source attention shapes that decide what a layer can cache."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Geometry":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, config.num_key_value_heads or heads, head_dim)

    @property
    def source_width(self) -> int:
        """Numbers the source caches per token and layer (keys and values of every KV head)."""
        return 2 * self.kv_heads * self.head_dim


@dataclass
class LayerPlan:
    layer: int
    widths: dict[str, int]  # config field -> value, e.g. {"key_dim": 16, "value_dim": 16}
    cache_width: int  # numbers cached per token in this layer
    predicted_error: dict[str, float] | None  # relative error per component, None without weights


def _flat_gains(count: int) -> list[float]:
    return [1.0 / count] * count


def components(
    target: str, geometry: Geometry, contextual: bool, src: SourceAttention | None, moment: torch.Tensor | None
) -> list[Component]:
    """What one layer can spend width on, with gain curves from its weights (flat without weights)."""
    g, d, h = geometry.kv_heads, geometry.head_dim, geometry.heads
    if target == "tpa":
        per_rank = d + (h if contextual else 0)
        if src is None:
            return [Component(name, _flat_gains(g), per_rank) for name in WIDTH_FIELDS["tpa"]]
        whitening = None if moment is None else _whitening(moment)
        return [
            Component(name, head_mode_gains(src.weight(p), src.bias(p), g, h, whitening).tolist(), per_rank)
            for name, p in zip(WIDTH_FIELDS["tpa"], "kv")
        ]
    key_name, value_name = WIDTH_FIELDS[target]
    if src is None:
        key, value = _flat_gains(g * d // 2), _flat_gains(g * d)
    else:
        k_weight, k_bias = src.weight("k"), src.bias("k")
        energy = None if moment is None else query_pair_energy(src.weight("q"), src.bias("q"), h, g, d, moment)
        key = key_gains(pair_moments(k_weight, k_bias, g, d, moment), energy).tolist()
        value = value_gains(src.weight("v"), src.bias("v"), src.weight("o"), h, g, moment).tolist()
    return [Component(key_name, key, 2, units_per_value=2), Component(value_name, value, 1)]


def _whitening(moment: torch.Tensor) -> torch.Tensor:
    from ..factorize.common import cholesky_whitening

    return cholesky_whitening(moment)


def layer_components(
    options: ConvertOptions,
    source: SourceCheckpoint,
    tokens: torch.Tensor | None,
    device: torch.device,
) -> tuple[list[list[Component]], bool]:
    """Every layer's components and whether their gains come from real spectra (weights present).

    With calibration statistics this runs the source layer by layer once (Σ is used and dropped per layer).
    """
    geometry = Geometry.of(source.config)
    if not source.has_weights:
        return [components(options.to, geometry, options.contextual, None, None)] * geometry.layers, False
    read = source.reader()
    if tokens is None or not options.uses_statistics:
        return [
            components(options.to, geometry, options.contextual, SourceAttention(read, i, device), None)
            for i in range(geometry.layers)
        ], True
    return [
        components(options.to, geometry, options.contextual, SourceAttention(read, acts.layer, device), acts.moment())
        for acts in LayerwiseRunner(source, tokens, device)
    ], True


def plan_layers(
    options: ConvertOptions, geometry: Geometry, layers: list[list[Component]], have_spectra: bool
) -> list[LayerPlan]:
    """Allocate `options.kv_budget` over the layers' components (greedy needs real spectra)."""
    budget = int(options.kv_budget * geometry.source_width * geometry.layers)
    allocate = greedy_allocation if options.allocation == "greedy" and have_spectra else uniform_allocation
    try:
        widths = allocate(layers, budget)
    except ValueError as err:
        least = sum(c.minimum * c.unit_width for c in layers[0]) / geometry.source_width
        raise FactorConvError(
            f"--kv-budget {options.kv_budget} is too small for {options.to}: {err}; the least it can cache is "
            f"{least:.1%} of the source's KV bytes"
        ) from None
    plans = []
    for index, (layer_widths, layer_components) in enumerate(zip(widths, layers)):
        units = {c.name: layer_widths[c.name] // c.units_per_value for c in layer_components}
        cache = sum(units[c.name] * c.unit_width for c in layer_components)
        errors = {c.name: c.predicted_error(units[c.name]) for c in layer_components} if have_spectra else None
        plans.append(LayerPlan(index, layer_widths, cache, errors))
    return plans


def allocate_widths(
    options: ConvertOptions, source: SourceCheckpoint, tokens: torch.Tensor | None, device: torch.device
) -> list[LayerPlan]:
    layers, have_spectra = layer_components(options, source, tokens, device)
    return plan_layers(options, Geometry.of(source.config), layers, have_spectra)
