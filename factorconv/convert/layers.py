"""Per-layer conversion of source attention tensors into the target's tensors, one function per target."""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..factorize.common import cholesky_whitening, input_moment
from ..factorize.mfa import (
    KeyMerge,
    ValueBasis,
    low_rank_queries,
    merge_queries,
    merged_output_projection,
    output_weighted_value_basis,
    pair_moments,
    query_pair_energy,
    rope_key_merge,
)
from ..factorize.tpa import TensorProductInit, relative_error, tensor_product_init
from ..modeling import FactorConvConfig

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


@dataclass
class LayerStatistics:
    """Calibration statistics of one layer's attention input."""

    moment: torch.Tensor  # Σ = E[x̃x̃ᵀ], x̃ = [x; 1]
    query_aware: bool = False  # weight key directions by how strongly queries read them


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

    With calibration statistics the SVD is input-whitened (error measured on real inputs, SVD-LLM style).
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
        out.update(_product_tensors(f"{src.prefix}{proj}_product", init, config.tpa_contextual, hidden))
    out.update(_output_projection(src, src.prefix, src.weight("o")))
    return LayerResult(out, LayerReport(layer, errors["k"], errors["v"], errors.get("q")))


def _query_tensors(prefix: str, rows: torch.Tensor, has_bias: bool, rank: int | None) -> dict[str, torch.Tensor]:
    """(out, d') query rows -> q_proj, or the q_down/q_up product when a query rank is set."""
    if rank is None:
        tensors = {f"{prefix}q_proj.weight": rows[:, :-1] if has_bias else rows}
        if has_bias:
            tensors[f"{prefix}q_proj.bias"] = rows[:, -1]
        return tensors
    down, up, bias = low_rank_queries(rows, has_bias, rank)
    tensors = {f"{prefix}q_down.weight": down, f"{prefix}q_up.weight": up}
    if bias is not None:
        tensors[f"{prefix}q_up.bias"] = bias
    return tensors


def _merged_key_and_value(
    src: SourceAttention, config: FactorConvConfig, key_dim: int, value_dim: int, stats: LayerStatistics | None
) -> tuple[KeyMerge, ValueBasis]:
    """RoPE-preserving key merge and output-weighted value basis, under the input statistics when given."""
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    k_weight, k_bias = src.weight("k"), src.bias("k")
    moment = stats.moment if stats is not None else None
    energy = None
    if stats is not None and stats.query_aware:
        energy = query_pair_energy(src.weight("q"), src.bias("q"), heads, groups, head_dim, moment)
    moments = pair_moments(k_weight, k_bias, groups, head_dim, moment)
    merge = rope_key_merge(k_weight, k_bias, groups, head_dim, key_dim, moments, energy)
    value = output_weighted_value_basis(src.weight("v"), src.bias("v"), src.weight("o"), heads, groups, value_dim, moment)
    return merge, value


def convert_mfa_attention(
    src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
) -> LayerResult:
    """MFA: RoPE-preserving key merge, output-weighted value basis, queries mapped into the merged key."""
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    merge, value = _merged_key_and_value(src, config, config.key_dim[layer], config.value_dim[layer], stats)
    q_bias = src.bias("q")
    queries = merge_queries(src.weight("q"), q_bias, merge, heads, head_dim).flatten(0, 1)
    rank = config.query_rank[layer] if config.query_rank else None
    out = _query_tensors(src.prefix, queries, q_bias is not None, rank)
    out[f"{src.prefix}k_proj.weight"], out[f"{src.prefix}v_proj.weight"] = merge.weight, value.weight
    if merge.bias is not None:
        out[f"{src.prefix}k_proj.bias"], out[f"{src.prefix}v_proj.bias"] = merge.bias, value.bias
    out.update(_output_projection(src, src.prefix, merged_output_projection(src.weight("o"), value, heads, groups)))
    return LayerResult(out, LayerReport(layer, merge.relative_error, value.relative_error), merge.pairs)


def convert_mfa_kr_attention(
    src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
) -> LayerResult:
    """MFA-KR: c = [merged RoPE key | value basis]; queries read c_rope, the output projection reads c_nope."""
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    merge, value = _merged_key_and_value(src, config, config.rope_dim[layer], config.nope_dim[layer], stats)
    q_bias = src.bias("q")
    rope_part = merge_queries(src.weight("q"), q_bias, merge, heads, head_dim)  # (h, d_R, d')
    nope_part = rope_part.new_zeros(heads, config.nope_dim[layer], rope_part.shape[2])
    queries = torch.cat([rope_part, nope_part], dim=1).flatten(0, 1)
    rank = config.query_rank[layer] if config.query_rank else None
    out = _query_tensors(src.prefix, queries, q_bias is not None, rank)
    out[f"{src.prefix}c_proj.weight"] = torch.cat([merge.weight, value.weight])
    if merge.bias is not None:
        out[f"{src.prefix}c_proj.bias"] = torch.cat([merge.bias, value.bias])
    out.update(_output_projection(src, src.prefix, merged_output_projection(src.weight("o"), value, heads, groups)))
    return LayerResult(out, LayerReport(layer, merge.relative_error, value.relative_error), merge.pairs)


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
