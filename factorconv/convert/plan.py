"""Per-layer ranks/widths for a KV budget: from spectra of the weights (and calibration statistics) or,
with a config alone, uniformly. `plan_layers` is what `factorconv plan` prints and `convert` applies."""

from dataclasses import dataclass

import torch

from ..errors import FactorConvError
from ..evaluate.kv_cache import analytic_kv_bytes_per_token
from ..factorize.allocate import Component, greedy_allocation, level_allocation, uniform_allocation
from ..kinds import Geometry
from ..kinds.layer import SourceAttention
from .calibrate import LayerwiseRunner
from .options import ConvertOptions
from .sensitivity import layer_levels, probe_layers
from .source import SourceCheckpoint


@dataclass
class LayerPlan:
    layer: int
    widths: dict[str, int]  # config field -> value, e.g. {"key_dim": 16, "value_dim": 16}
    cache_width: int  # numbers cached per token in this layer
    predicted_error: dict[str, float] | None  # relative error per component, None without weights
    probe_kl: float | None = None  # measured allocation: KL with this layer alone converted at uniform widths


def layer_components(
    options: ConvertOptions,
    source: SourceCheckpoint,
    tokens: torch.Tensor | None,
    device: torch.device,
    spectra: bool = True,
) -> tuple[list[list[Component]], bool]:
    """Every layer's components and whether their gains come from real spectra (weights present and `spectra`).

    With calibration statistics this runs the source layer by layer once (Σ is used and dropped per layer).
    """
    geometry, kind = Geometry.of(source.config), options.kind
    if not (source.has_weights and spectra):
        return [kind.components(geometry, options)] * geometry.layers, False
    read = source.reader()
    if tokens is None or not options.uses_statistics:
        layers = [kind.components(geometry, options, SourceAttention(read, i, device)) for i in range(geometry.layers)]
        return layers, True
    return [
        kind.components(geometry, options, SourceAttention(read, acts.layer, device), acts.moment())
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
    options: ConvertOptions,
    source: SourceCheckpoint,
    tokens: torch.Tensor | None,
    device: torch.device,
    spectra: bool = True,
    progress: bool = False,
) -> list[LayerPlan]:
    """Widths per layer; `spectra=False` skips reading the weights (uniform widths do not need them, only the
    predicted errors `factorconv plan` prints do). Serving shapes (`mla`, `mqa`) are fixed, read no weights.
    Measured allocation runs a probing pass over the calibration tokens first (convert/sensitivity.py)."""
    geometry = Geometry.of(source.config)
    widths = options.kind.serving_widths(options, geometry)
    if widths is not None:
        return [LayerPlan(i, dict(widths), sum(widths.values()), None) for i in range(geometry.layers)]
    if options.allocation == "measured":
        return measured_plans(options, source, tokens, device, progress)
    layers, have_spectra = layer_components(options, source, tokens, device, spectra)
    return plan_layers(options, geometry, layers, have_spectra)


def measured_plans(
    options: ConvertOptions, source: SourceCheckpoint, tokens: torch.Tensor, device: torch.device, progress: bool
) -> list[LayerPlan]:
    """Per-layer widths (multiples of the uniform ones) minimising the total KL predicted from each layer's probe."""
    geometry, kind = Geometry.of(source.config), options.kind
    flat = [kind.components(geometry, options)] * geometry.layers
    uniform = plan_layers(options, geometry, flat, False)

    def spectra(src: SourceAttention, moment: torch.Tensor) -> list[Component]:
        return kind.components(geometry, options, src, moment)

    probed = probe_layers(options, source, tokens, device, uniform, spectra, progress)
    levels = [layer_levels(p, u.widths) for p, u in zip(probed, uniform)]
    budget = sum(u.cache_width for u in uniform)
    choice = level_allocation([[(width, kl) for _, width, kl in layer] for layer in levels], budget)
    plans = []
    for index, (probe, layer, pick) in enumerate(zip(probed, levels, choice)):
        widths, width, _ = layer[pick]
        units = {c.name: widths[c.name] // c.units_per_value for c in probe.components}
        errors = {c.name: c.predicted_error(units[c.name]) for c in probe.components}
        plans.append(LayerPlan(index, widths, width, errors, probe.kl))
    return plans


@dataclass
class PlanReport:
    """What `factorconv plan` prints: the allocation and what it saves, before anything is written."""

    source: str
    target: str
    layers: list[LayerPlan]
    bytes_per_value: int
    source_kv_bytes: int  # per token, all layers
    target_kv_bytes: int
    source_parameters: int
    target_parameters: int
    serving: str | None = None  # which stock serving shape this budget allows (`factorconv export`)


def make_plan(options: ConvertOptions) -> PlanReport:
    """Allocate widths for `options.kv_budget`; from config.json alone when the weights are not needed/present."""
    from transformers import AutoModelForCausalLM

    from ..model_folder import resolve_source
    from ..modeling import FactorConvForCausalLM
    from .calibrate import calibration_tokens
    from .device import resolve_device
    from .target import build_target_config, output_dtype

    device = resolve_device(options.device)
    needs_weights = options.calib is not None or options.allocation != "uniform"
    folder = resolve_source(options.source, options.revision, weights=needs_weights)
    source = SourceCheckpoint(folder, require_weights=options.calib is not None)
    tokens = None
    if options.calib is not None:
        tokens = calibration_tokens(options.calib, folder, options.calib_samples, options.calib_seq_len, source.config)
    plans = allocate_widths(options, source, tokens, device)
    config = build_target_config(source, options, plans)
    size = output_dtype(options, source).itemsize
    with torch.device("meta"):
        target_params = sum(p.numel() for p in FactorConvForCausalLM(config).parameters())
        source_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(source.config).parameters())
    geometry = Geometry.of(source.config)
    return PlanReport(
        options.source,
        options.to,
        plans,
        size,
        analytic_kv_bytes_per_token(source.config, size),
        analytic_kv_bytes_per_token(config, size),
        source_params,
        target_params,
        options.kind.serving_note(options, geometry),
    )


def format_plan(report: PlanReport) -> str:
    """Per-layer widths and predicted errors, then the totals."""
    names = list(report.layers[0].widths)
    header = ["layer", *names, "cached/token"] + (
        [f"err {n}" for n in names] if report.layers[0].predicted_error is not None else []
    ) + (["probe KL"] if report.layers[0].probe_kl is not None else [])
    rows = []
    for p in report.layers:
        row = [str(p.layer), *(str(p.widths[n]) for n in names), str(p.cache_width)]
        if p.predicted_error is not None:
            row += [f"{p.predicted_error[n]:.3f}" for n in names]
        if p.probe_kl is not None:
            row.append(f"{p.probe_kl:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    ratio = report.target_kv_bytes / report.source_kv_bytes
    delta = report.target_parameters - report.source_parameters
    lines += [
        "",
        f"{report.target} from {report.source}",
        f"KV bytes/token: {report.source_kv_bytes:,} -> {report.target_kv_bytes:,} ({ratio:.1%} of the source)",
        f"parameters: {report.source_parameters:,} -> {report.target_parameters:,} ({delta:+,})",
    ]
    if report.layers[0].predicted_error is None:
        lines.append("widths are uniform: no weights were read, so no error is predicted")
    if report.serving is not None:
        lines.append(f"serving: {report.serving}")
    return "\n".join(lines)
