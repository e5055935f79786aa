"""Per-layer conversion of source attention tensors into the target's tensors, one function per target."""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..factorize.common import cholesky_whitening, input_moment, split_bias_column, with_bias_column
from ..factorize.key_reuse import key_reuse_inits, latent_norm_weight, phase_average
from ..factorize.mfa import (
    ValueBasis,
    low_rank_queries,
    output_weighted_value_basis,
    pair_moments,
    query_pair_energy,
    rope_key_merge,
    strided_pairs,
)
from ..factorize.tpa import TensorProductInit, relative_error, tensor_product_init
from ..factorize.tpa_als import fit_contextual
from ..modeling import FactorConvConfig
from ..modeling.modeling_factorconv import FactorConvRotaryEmbedding
from .calibrate import LayerActivations
from .refine import selection_error

ATTENTION_TENSOR = re.compile(r"^model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.(weight|bias)$")


@dataclass
class LayerReport:
    """How far the converted layer is from the source: relative errors of keys and values (0 = exact)."""

    layer: int
    key_error: float
    value_error: float
    query_error: float | None = None
    attention_error: float | None = None  # relative attention-output error on held-out calibration tokens
    refined_attention_error: float | None = None  # the same after local refinement
    probe_kl: float | None = None  # measured allocation: KL with this layer alone converted at uniform widths


@dataclass
class LayerStatistics:
    """Calibration statistics of one layer's attention input."""

    moment: torch.Tensor  # Σ = E[x̃x̃ᵀ], x̃ = [x; 1]
    query_aware: bool = False  # weight key directions by how strongly queries read them
    activations: LayerActivations | None = None  # to choose between closed forms by measured output error
    fit_contextual: bool = False  # TPA: fit a(x), b(x) to the activations' keys/values (init "als")


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]
    report: LayerReport
    rope_pairs: list[int] | None = None  # MFA / MFA-KR: source frequency of each merged key pair


class SourceAttention:
    """One source layer's q/k/v/o projections, read on demand in float32 on the conversion device."""

    def __init__(self, read: Callable[[str], torch.Tensor | None], layer: int, device: torch.device) -> None:
        self.prefix, self._read, self.device = f"model.layers.{layer}.self_attn.", read, device

    def weight(self, proj: str) -> torch.Tensor:
        return self._read(f"{self.prefix}{proj}_proj.weight").to(device=self.device, dtype=torch.float32)

    def bias(self, proj: str) -> torch.Tensor | None:
        tensor = self._read(f"{self.prefix}{proj}_proj.bias")
        return None if tensor is None else tensor.to(device=self.device, dtype=torch.float32)


def _product_tensors(prefix: str, init: TensorProductInit, contextual: bool, hidden: int) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.basis.weight": init.basis_weight, f"{prefix}.head_mix": init.head_mix}
    if init.basis_bias is not None:
        tensors[f"{prefix}.basis.bias"] = init.basis_bias
    if contextual:  # A = 0: starts exactly at the non-contextual factors, training moves it
        tensors[f"{prefix}.head_proj.weight"] = init.basis_weight.new_zeros(init.head_mix.numel(), hidden)
    return tensors


def _output_projection(src: SourceAttention, prefix: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}o_proj.weight": weight}
    if (bias := src.bias("o")) is not None:
        tensors[f"{prefix}o_proj.bias"] = bias
    return tensors


def convert_tpa_attention(
    src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
) -> LayerResult:
    """TPA: head-mode factors of K and V (and Q when `tpa_rank_q` is set); o_proj unchanged.

    With calibration statistics the SVD is input-whitened (error measured on real inputs, SVD-LLM style);
    with init "als" contextual factors are then fitted to the calibration keys/values (factorize/tpa_als.py).
    """
    heads, groups, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    rank_q = config.tpa_rank_q[layer] if config.tpa_rank_q else None
    for proj, rank, num_groups in (
        ("k", config.tpa_rank_k[layer], groups),
        ("v", config.tpa_rank_v[layer], groups),
        ("q", rank_q, heads),
    ):
        weight, bias = src.weight(proj), src.bias(proj)
        if rank is None:  # standard queries: copied as they are
            out[f"{src.prefix}q_proj.weight"] = weight
            if bias is not None:
                out[f"{src.prefix}q_proj.bias"] = bias
            continue
        whitening = None
        if stats is not None:
            whitening = cholesky_whitening(input_moment(weight.shape[1], bias is not None, stats.moment))
        init = tensor_product_init(weight, bias, num_groups, heads, rank, whitening)
        errors[proj] = relative_error(weight, bias, init, num_groups, heads)
        prefix = f"{src.prefix}{proj}_product"
        out.update(_product_tensors(prefix, init, config.tpa_contextual, hidden))
        if stats is not None and stats.fit_contextual and stats.activations is not None:
            fitted, history = fit_contextual(_fitting_inputs(stats.activations), weight, bias, init, num_groups)
            errors[proj] = history[-1]  # relative error of the fitted factors on the calibration tokens
            out.update({f"{prefix}.head_mix": fitted.head_mix, f"{prefix}.head_proj.weight": fitted.head_proj,
                        f"{prefix}.basis.weight": fitted.basis_weight})
            if fitted.basis_bias is not None:
                out[f"{prefix}.basis.bias"] = fitted.basis_bias
    out.update(_output_projection(src, src.prefix, src.weight("o")))
    return LayerResult(out, LayerReport(layer, errors["k"], errors["v"], errors.get("q")))


def _fitting_inputs(acts: LayerActivations, max_tokens: int = 65536) -> torch.Tensor:
    """Attention inputs of the fitting sequences, (M, d), thinned evenly to at most `max_tokens` rows."""
    rows = acts.inputs[: acts.inputs.shape[0] - acts.held_out].reshape(-1, acts.inputs.shape[-1])
    return rows[:: max(1, -(-rows.shape[0] // max_tokens))]


def _source_side_tensors(src: SourceAttention, rank: int | None) -> dict[str, torch.Tensor]:
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
    return {**tensors, **_output_projection(src, src.prefix, src.weight("o"))}


def _value_up(value: ValueBasis, num_groups: int) -> torch.Tensor:
    """(g, D, d_V): the read-back of each group's source-sized value from the cached value part."""
    return value.read.reshape(num_groups, -1, value.read.shape[1])


def convert_mfa_attention(
    src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
) -> LayerResult:
    """MFA: k_proj = RoPE-preserving key merge, v_proj = output-weighted value basis (under the input
    statistics when given); the source's q_proj and o_proj stay, with per-group maps into the merged key
    (`rope_mix`) and out of the value basis (`value_up`). Built to serve as a Llama with one KV head, the merge
    keeps one key pair per source frequency, in order."""
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    k_weight, k_bias = src.weight("k"), src.bias("k")
    moment = stats.moment if stats is not None else None
    energy = None
    if stats is not None and stats.query_aware:
        energy = query_pair_energy(src.weight("q"), src.bias("q"), heads, groups, head_dim, moment)
    moments = pair_moments(k_weight, k_bias, groups, head_dim, moment)
    key_dim = config.key_dim[layer]
    frequencies = strided_pairs(head_dim, key_dim) if config.serving_format == "llama" else None
    merge = rope_key_merge(k_weight, k_bias, groups, head_dim, key_dim, moments, energy, frequencies)
    value = output_weighted_value_basis(
        src.weight("v"), src.bias("v"), src.weight("o"), heads, groups, config.value_dim[layer], moment
    )
    out = _source_side_tensors(src, _query_rank(config, layer))
    for name, part in (("k_proj", merge), ("v_proj", value)):
        out[f"{src.prefix}{name}.weight"] = part.weight
        if part.bias is not None:
            out[f"{src.prefix}{name}.bias"] = part.bias
    out[f"{src.prefix}rope_mix"] = merge.query_mixing.T
    out[f"{src.prefix}value_up"] = _value_up(value, groups)
    return LayerResult(out, LayerReport(layer, merge.relative_error, value.relative_error), merge.pairs)


# MFA-KR closed forms tried with calibration activations: (move slow frequencies to NoPE, NoPE key weight).
# (False, 0.0) is the MFA merge with a values-only latent, the one used without activations.
KEY_REUSE_CANDIDATES = ((False, 0.0), (False, 0.1), (False, 0.3), (False, 1.0), (True, 0.1), (True, 0.3), (True, 1.0))


def convert_mfa_kr_attention(
    src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
) -> LayerResult:
    """MFA-KR: c_proj = [RoPE key merge | joint latent of key directions moved to NoPE and the values]
    (factorize/key_reuse.py); the source's q_proj and o_proj stay, with per-group maps into both parts. With calibration activations the
    partial-RoPE split and the key/value balance are chosen by measured attention-output error. Built to serve
    as DeepSeek-V3 (MLA), the rotated part keeps one direction per frequency of the standard sequence of its width
    and the latent is normalised (`latent_norm`, scale fitted on the calibration inputs)."""
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    rotary = FactorConvRotaryEmbedding(config)
    phase = phase_average(rotary.inv_freq.to(src.device), config.max_position_embeddings, rotary.attention_scaling)
    q, k, v, o = ((src.weight(p), src.bias(p)) for p in "qkvo")
    acts = stats.activations if stats is not None else None
    moment = stats.moment if stats is not None else None
    rope_dim = config.rope_dim[layer]
    candidates = KEY_REUSE_CANDIDATES if acts is not None else KEY_REUSE_CANDIDATES[:1]
    frequencies = None
    if config.serving_format == "deepseek_v3":
        frequencies = strided_pairs(config.head_dim, rope_dim)
        candidates = tuple(c for c in candidates if not c[0])  # the rotated pairs are fixed: move_slow changes nothing
    inits = key_reuse_inits(
        q, k, v, o[0], heads, groups, rope_dim, config.nope_dim[layer], phase,
        config.attention_scale, moment, list(candidates), frequencies,
    )
    best: tuple[float, LayerResult] | None = None
    for init in inits:
        out = _source_side_tensors(src, _query_rank(config, layer))
        weight, bias = split_bias_column(init.latent, k[1] is not None)
        out[f"{src.prefix}c_proj.weight"] = weight
        if bias is not None:
            out[f"{src.prefix}c_proj.bias"] = bias
        if config.latent_norm:
            inputs = _fitting_inputs(acts) if acts is not None else None
            nope_bias = None if bias is None else bias[rope_dim:]
            out[f"{src.prefix}kv_norm.weight"] = latent_norm_weight(weight[rope_dim:], nope_bias, inputs, moment)
        out[f"{src.prefix}rope_mix"] = init.rope_mix
        out[f"{src.prefix}key_up"] = init.key_up
        out[f"{src.prefix}value_up"] = _value_up(init.value, groups)
        result = LayerResult(out, LayerReport(layer, init.key_error, init.value_error), init.pairs)
        error = selection_error(config, layer, out, acts, init.pairs) if acts is not None else 0.0
        if best is None or error < best[0]:
            best = (error, result)
    return best[1]


def _query_rank(config: FactorConvConfig, layer: int) -> int | None:
    return config.query_rank[layer] if config.query_rank else None


CONVERTERS: dict[str, Callable[[SourceAttention, int, FactorConvConfig, LayerStatistics | None], LayerResult]] = {
    "tpa": convert_tpa_attention,
    "mfa": convert_mfa_attention,
    "mfa_kr": convert_mfa_kr_attention,
}


def convert_attention(
    read: Callable[[str], torch.Tensor | None],
    layer: int,
    config: FactorConvConfig,
    device: torch.device,
    stats: LayerStatistics | None = None,
) -> LayerResult:
    """Convert one layer for `config.attention` (float32 tensors on `device`), from calibration stats if given."""
    result = CONVERTERS[config.attention](SourceAttention(read, layer, device), layer, config, stats)
    result.tensors = {name: t.float().contiguous() for name, t in result.tensors.items()}
    return result
