"""Per-layer ranks/widths for a KV budget: from spectra of the weights (and calibration statistics), from
the probe of measured allocation or, with a config alone, uniformly. `plan_target` is the one planning entry
point: `convert` applies it, `factorconv plan` and `factorconv validate` print it (`make_plan`)."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OptionError, option
from ..evaluate.kv_cache import analytic_kv_bytes_per_token
from ..factorize.allocate import Component, greedy_allocation, level_allocation, uniform_allocation
from ..kinds import Geometry, TargetSpec
from ..kinds.layer import SourceAttention
from ..modeling import FactorConvConfig
from .calibrate import LayerwiseRunner
from .conversion import ConversionPlan, resolve_plan
from .options import ConvertOptions
from .sensitivity import layer_levels, probe_layers
from .source import SourceCheckpoint
from .target import build_target_config, output_dtype


@dataclass
class LayerPlan:
    layer: int
    widths: dict[str, int]  # config field -> value, e.g. {"key_dim": 16, "value_dim": 16}
    cache_width: int  # numbers cached per token in this layer
    predicted_error: dict[str, float] | None  # relative error per component, None without weights
    probe_kl: float | None = None  # measured allocation: KL with this layer alone converted at uniform widths


@dataclass
class TargetPlan:
    """The second step of planning: per-layer widths, once the source (and calibration) are known."""

    layers: list[LayerPlan] | None  # from a KV budget or a serving shape; None: the options' widths in every layer
    config: FactorConvConfig


def plan_target(
    plan: ConversionPlan,
    source: SourceCheckpoint,
    tokens: torch.Tensor | None,
    spectra: bool = False,
    progress: bool = False,
) -> TargetPlan:
    """The one place widths are decided (`convert`, `factorconv plan`, `validate`): the layers' widths and the
    target config. `spectra` reads the weights' spectra even where the allocation does not need them (uniform
    widths), for the predicted errors `factorconv plan` prints."""
    layers = allocate_widths(plan, source, tokens, spectra, progress)
    return TargetPlan(layers, build_target_config(source, plan, layers))


def allocate_widths(
    plan: ConversionPlan,
    source: SourceCheckpoint,
    tokens: torch.Tensor | None,
    spectra: bool = False,
    progress: bool = False,
) -> list[LayerPlan] | None:
    """Widths per layer; None without a KV budget or serving shape (the options' widths hold). Serving shapes
    (`mla`, `mqa`) are fixed and read no weights; greedy allocation reads the spectra; measured allocation runs a
    probing pass over the calibration tokens first (convert/sensitivity.py)."""
    geometry, target = Geometry.of(source.config), plan.target
    widths = target.kind.serving_widths(target, geometry)
    if widths is not None:
        return [LayerPlan(i, dict(widths), sum(widths.values()), None) for i in range(geometry.layers)]
    if target.kv_budget is None:
        return None
    if plan.allocation == "measured":
        return measured_plans(plan, source, tokens, progress)
    layers, have_spectra = layer_components(plan, source, tokens, spectra or plan.allocation == "greedy")
    return plan_layers(target, plan.allocation, geometry, layers, have_spectra)


def layer_components(
    plan: ConversionPlan, source: SourceCheckpoint, tokens: torch.Tensor | None, spectra: bool = True
) -> tuple[list[list[Component]], bool]:
    """Every layer's components and whether their gains come from real spectra (weights present and `spectra`).

    With calibration statistics this runs the source layer by layer once (Σ is used and dropped per layer).
    """
    geometry, target, device = Geometry.of(source.config), plan.target, plan.device
    kind = target.kind
    if not (source.has_weights and spectra):
        return [kind.components(geometry, target)] * geometry.layers, False
    read = source.reader()
    if tokens is None or not plan.statistics:
        layers = [kind.components(geometry, target, SourceAttention(read, i, device)) for i in range(geometry.layers)]
        return layers, True
    layers = []
    for acts in LayerwiseRunner(source, tokens, device):
        layers.append(kind.components(geometry, target, SourceAttention(read, acts.layer, device), acts.moment()))
        del acts  # one layer's activations alive at a time
    return layers, True


def plan_layers(
    target: TargetSpec, allocation: str, geometry: Geometry, layers: list[list[Component]], have_spectra: bool
) -> list[LayerPlan]:
    """Allocate `target.kv_budget` over the layers' components (greedy needs real spectra)."""
    budget = int(target.kv_budget * geometry.source_width * geometry.layers)
    allocate = greedy_allocation if allocation == "greedy" and have_spectra else uniform_allocation
    try:
        widths = allocate(layers, budget)
    except ValueError as err:
        least = sum(c.minimum * c.unit_width for c in layers[0]) / geometry.source_width
        raise OptionError(
            f"{option('kv_budget')} {target.kv_budget} is too small for {target.kind.name}: {err}; the least it can cache is "
            f"{least:.1%} of the source's KV bytes"
        ) from None
    plans = []
    for index, (layer_widths, layer_components) in enumerate(zip(widths, layers)):
        units = {c.name: layer_widths[c.name] // c.units_per_value for c in layer_components}
        cache = sum(units[c.name] * c.unit_width for c in layer_components)
        errors = {c.name: c.predicted_error(units[c.name]) for c in layer_components} if have_spectra else None
        plans.append(LayerPlan(index, layer_widths, cache, errors))
    return plans


def measured_plans(
    plan: ConversionPlan, source: SourceCheckpoint, tokens: torch.Tensor, progress: bool
) -> list[LayerPlan]:
    """Per-layer widths (multiples of the uniform ones) minimising the total KL predicted from each layer's probe."""
    geometry, target = Geometry.of(source.config), plan.target
    flat = [target.kind.components(geometry, target)] * geometry.layers
    uniform = plan_layers(target, "uniform", geometry, flat, False)

    def spectra(src: SourceAttention, moment: torch.Tensor) -> list[Component]:
        return target.kind.components(geometry, target, src, moment)

    probed = probe_layers(plan, source, tokens, uniform, spectra, progress)
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
    """What `factorconv plan` and `factorconv validate` print: the allocation and what it saves, before anything
    is written."""

    source: str
    architecture: str
    geometry: Geometry
    target: str
    layers: list[LayerPlan] | None  # None: the options' widths in every layer (no KV budget or serving shape)
    widths: list[dict[str, int]]  # per layer: option name -> width, e.g. {"key_dim": 128, "value_dim": 128}
    dtype: str
    source_kv_bytes: int  # per token, all layers, in `dtype`
    target_kv_bytes: int
    source_parameters: int
    target_parameters: int
    serving: str | None = None  # which stock serving shape this budget allows (`factorconv export`)
    allocation: str | None = None  # how a kv_budget was spread (validate), None for explicit widths
    notes: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        """Converted KV bytes as a fraction of the source's."""
        return self.target_kv_bytes / self.source_kv_bytes


def make_plan(options: ConvertOptions, folder: Path | None = None) -> PlanReport:
    """Plan `options`' conversion on the meta device; from config.json alone when the weights are not needed or
    not present. `folder` (validate): a local copy of the source's config (weights too, when there), planned
    without the calibration pass: greedy allocation reads the spectra where the weights are, measured is planned
    uniformly."""
    from transformers import AutoModelForCausalLM

    from ..model_folder import resolve_source
    from ..modeling import FactorConvForCausalLM
    from .calibrate import calibration_tokens

    notes, allocation = [], None
    if folder is None:
        plan = resolve_plan(options)
        needs_weights = options.calib is not None or options.allocation != "uniform"
        folder = resolve_source(options.source, options.revision, weights=needs_weights)
        source = SourceCheckpoint(folder, require_weights=options.calib is not None)
    else:
        source = SourceCheckpoint(folder, require_weights=False)
        greedy = options.allocation == "greedy" and source.has_weights
        if options.kv_budget is not None:
            if options.allocation == "greedy" and not source.has_weights:
                notes.append("greedy allocation reads the weights: the conversion may spread widths unevenly")
            if options.calib is not None:
                notes.append("planned without the calibration pass, which only the conversion runs")
            spread = "greedy over the weights' spectra" if greedy else "uniform"
            if options.allocation == "measured":
                spread = "uniform here; the conversion measures each layer and moves width between them"
            allocation = f"kv_budget {options.kv_budget:g}, {spread}"
        offline = {"calib": None, "device": "cpu", "allocation": "greedy" if greedy else "uniform"}
        plan = resolve_plan(options.model_copy(update=offline))
    tokens = None
    if plan.calibration is not None:
        calib = plan.calibration
        tokens = calibration_tokens(calib.data, folder, calib.samples, calib.seq_len, source.config)
    target = plan_target(plan, source, tokens, spectra=True)
    config, kind = target.config, plan.target.kind
    dtype = output_dtype(plan.output.dtype, source)
    size = dtype.itemsize
    with torch.device("meta"):
        target_params = sum(p.numel() for p in FactorConvForCausalLM(config).parameters())
        source_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(source.config).parameters())
    geometry = Geometry.of(source.config)
    widths = [{n: getattr(config, kind.config_name(n))[i] for n in kind.widths} for i in range(geometry.layers)]
    return PlanReport(
        source=options.source,
        architecture=source.architecture,
        geometry=geometry,
        target=kind.name,
        layers=target.layers,
        widths=widths,
        dtype=str(dtype).removeprefix("torch."),
        source_kv_bytes=analytic_kv_bytes_per_token(source.config, size),
        target_kv_bytes=analytic_kv_bytes_per_token(config, size),
        source_parameters=source_params,
        target_parameters=target_params,
        serving=kind.serving_note(plan.target, geometry) if plan.target.kv_budget is not None else None,
        allocation=allocation,
        notes=notes,
    )


def describe_plan(report: PlanReport) -> list[str]:
    """`factorconv validate`'s summary of a recipe's plan: source, target widths, KV cache, parameters, notes."""
    g, first = report.geometry, report.widths[0]
    same = all(w == first for w in report.widths)
    dims = " ".join(f"{k}={v}" for k, v in first.items())
    per_layer = f"{dims} in all {g.layers} layers" if same else "per layer " + "; ".join(
        f"{i}: " + " ".join(f"{k}={v}" for k, v in w.items()) for i, w in enumerate(report.widths)
    )
    lines = [
        f"source    {report.source}: {report.architecture}, {g.layers} layers, {g.heads} heads, "
        f"{g.kv_heads} KV heads x {g.head_dim}, {report.source_parameters:,} parameters",
        f"target    {report.target}: {per_layer}" + (f" ({report.allocation})" if report.allocation else ""),
        f"KV cache  {report.source_kv_bytes:,} -> {report.target_kv_bytes:,} bytes/token in {report.dtype} "
        f"({report.reduction:.1%}, {1 / report.reduction:.2f}x smaller)",
        f"params    {report.source_parameters:,} -> {report.target_parameters:,}",
    ]
    return lines + [f"note      {n}" for n in report.notes]


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
