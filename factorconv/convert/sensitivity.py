"""Measured allocation: spend a KV budget where the model's predictions feel the conversion error.

On a 30-layer model the attention-output error a layer's conversion leaves does not predict what it costs in
perplexity (benchmarks/results/layer_sensitivity_smollm2.md), so the spectra alone misplace width. This probe
converts every layer at the uniform widths (closed forms, no refinement), carries each converted layer's output
alone through the rest of the source, and measures KL(source ‖ source with that layer converted) on the held-out
calibration sequences. Each layer then picks a width level (a multiple of its uniform widths): its spectral error
energy at that level, scaled so that at the uniform widths it equals the measured KL, predicts the KL there, and
`level_allocation` minimises the sum within the same total bytes.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..factorize.allocate import Component
from ..kinds.layer import LayerStatistics, SourceAttention, attention_module
from ..precision import tensor_float32
from .calibrate import LayerwiseRunner
from .conversion import ConversionPlan
from .layers import convert_attention
from .source import SourceCheckpoint
from .target import build_target_config

# At most this many held-out tokens are probed, and at most as many as keep the residual streams (one per layer,
# float32) within PROBE_STREAM_BYTES: KL on a few thousand paired tokens already ranks layers, while each stream is
# carried through every later layer (L²/2 layer applications). Models up to Llama-3.2-1B shapes probe 16,384 tokens;
# Llama-3.1-8B shapes (32 layers × 4,096 wide, windows of 2,048) two sequences, 4,096 tokens in 1 GiB × 2.
PROBE_TOKENS = 16384
PROBE_STREAM_BYTES = 2 * 2**30


@dataclass
class LayerSensitivity:
    layer: int
    kl: float  # mean KL per token (nats) of the model with only this layer converted at the uniform widths
    components: list[Component]  # the layer's spectral gain curves under its calibration statistics


def probe_layers(
    plan: ConversionPlan,
    source: SourceCheckpoint,
    tokens: torch.Tensor,
    uniform_plans: list,
    layer_components: Callable[[SourceAttention, torch.Tensor], list[Component]],
    progress: bool = True,
) -> list[LayerSensitivity]:
    """One pass over the source: per layer, convert at the uniform widths and measure the KL it causes alone."""
    config, device = build_target_config(source, plan, uniform_plans), plan.device
    runner = LayerwiseRunner(source, tokens, device, keep_layer_input=True)
    read = source.reader()
    rows = probe_rows(runner.held_out, tokens.shape[1], config.num_hidden_layers, config.hidden_size)
    probe = slice(tokens.shape[0] - rows, tokens.shape[0])
    streams: list[torch.Tensor] = []  # residual streams of the probe rows, one per converted layer so far
    gains: list[list[Component]] = []
    bar = tqdm(total=config.num_hidden_layers, desc="probing layers", unit="layer", disable=not progress)
    for acts in runner:
        moment = acts.moment()
        stats = LayerStatistics(moment, plan.target.query_aware, acts, plan.fit_contextual)
        result = convert_attention(read, acts.layer, config, device, stats)
        module = attention_module(config, acts.layer, result.tensors, device, result.rope_pairs)
        streams = [runner.apply_layer(stream) for stream in streams]
        streams.append(runner.apply_layer(runner.layer_input[probe], attention=module))
        gains.append(layer_components(SourceAttention(read, acts.layer, device), moment))
        del acts, stats  # free this layer's activations before the runner collects the next layer's
        bar.update()
    bar.close()
    kls = _mean_kls(runner, runner.hidden[probe], streams, progress)
    return [LayerSensitivity(layer, kl, c) for layer, (kl, c) in enumerate(zip(kls, gains))]


def probe_rows(held_out: int, seq_len: int, layers: int, hidden_size: int) -> int:
    """How many held-out sequences the probe carries (at least one)."""
    stream_bytes = layers * seq_len * hidden_size * 4
    return max(1, min(held_out, PROBE_TOKENS // seq_len, PROBE_STREAM_BYTES // stream_bytes))


def _mean_kls(
    runner: LayerwiseRunner, clean: torch.Tensor, perturbed: list[torch.Tensor], progress: bool = False
) -> list[float]:
    """Mean KL(clean ‖ perturbed) per token for each perturbed stream; one sequence at a time (logits are T × vocab),
    the clean sequence's log-probabilities computed once for all streams (the output head dominates on CPU)."""
    totals = [0.0] * len(perturbed)
    rows = tqdm(clean, desc="probe KL", unit="sequence", disable=not progress)
    with tensor_float32(runner.device):
        for row, reference in enumerate(rows):
            p = runner.log_probs(reference)
            probs = p.exp()
            for index, stream in enumerate(perturbed):
                totals[index] += float((probs * (p - runner.log_probs(stream[row]))).sum(-1).mean())
    return [total / clean.shape[0] for total in totals]


# Each layer's width as a multiple of the uniform one, split between its components in the uniform proportions
# (moving width between keys and values by the spectra alone measured worse than uniform: README, allocation).
WIDTH_LEVELS = tuple(k / 8 for k in range(2, 17))


def layer_levels(sensitivity: LayerSensitivity, uniform_widths: dict[str, int]) -> list[tuple[dict[str, int], int, float]]:
    """(widths, cached numbers, predicted KL) per width level: the measured KL at the uniform widths, scaled by
    the error energy the layer's spectra predict at each level."""
    def at(level: float) -> tuple[dict[str, int], int, float]:
        units = {c.name: min(len(c.gains), max(c.minimum, round(uniform_widths[c.name] // c.units_per_value * level)))
                 for c in sensitivity.components}
        energy = sum(c.predicted_error(units[c.name]) ** 2 for c in sensitivity.components)
        width = sum(units[c.name] * c.unit_width for c in sensitivity.components)
        return {c.name: c.value(units[c.name]) for c in sensitivity.components}, width, energy

    levels = [at(level) for level in WIDTH_LEVELS]
    uniform_energy = at(1.0)[2]
    scale = max(sensitivity.kl, 1e-12) / max(uniform_energy, 1e-12)
    distinct: dict[int, tuple[dict[str, int], int, float]] = {}
    for widths, width, energy in levels:
        distinct.setdefault(width, (widths, width, energy * scale))
    return sorted(distinct.values(), key=lambda level: level[1])
