"""MFA (Multi-matrix Factorization Attention): one RoPE-preserving merged key head and one value head shared
by all query heads; built with `mqa`, it exports as a Llama with one KV head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..factorize.mfa import output_weighted_value_basis, pair_moments, query_pair_energy, rope_key_merge, strided_pairs
from ..modeling import FactorConvConfig
from .base import Geometry, TargetSpec
from .layer import LayerReport, LayerResult, LayerStatistics, SourceAttention
from .shared_kv import SharedKVKind, query_rank, source_side_tensors, value_up

if TYPE_CHECKING:
    from ..convert.options import ConvertOptions


class MFAKind(SharedKVKind):
    name = "mfa"
    sizes = ("key_dim", "value_dim", "query_rank")
    switches = ("mqa",)
    widths = ("key_dim", "value_dim")
    symbols = ("d_K", "d_V")
    inits = {"query-aware": "weights MFA's key merge: use it with {to} mfa"}
    # MFA/MFA-KR want the warm-up + cosine schedule at 0.02 (SmolLM2 MFA-KR 1.200x; 1.213x at 0.04; 1.24x
    # constant; benchmarks/results/refine_lr_*.md).
    refine_lr = 0.02
    refine_schedule = "warmup-cosine"
    modeling_class = "FactorConvMFAAttention"

    def validate(self, options: ConvertOptions) -> None:
        if options.mqa:
            self.check_fixed_shape(options, "mqa")
            if options.kv_budget is not None:
                raise ValueError("mqa caches one key and one value head per layer, a fixed size: drop kv_budget")

    def serving_format(self, target: TargetSpec) -> str | None:
        return "llama" if target["mqa"] else None

    def config_fields(self, target: TargetSpec) -> dict:
        return dict(key_dim=target["key_dim"], value_dim=target["value_dim"], query_rank=target["query_rank"])

    def serving_widths(self, target: TargetSpec, geometry: Geometry) -> dict[str, int] | None:
        """`mqa`: one key and one value head of the source's head dim."""
        return {"key_dim": geometry.head_dim, "value_dim": geometry.head_dim} if target["mqa"] else None

    def serving_note(self, target: TargetSpec, geometry: Geometry) -> str | None:
        share = 2 * geometry.head_dim / geometry.source_width
        return (f"as Llama MQA (--mqa, then `factorconv export --format llama`): one KV head of {geometry.head_dim}, "
                f"{share:.1%} of the source's KV bytes whatever the budget")

    def convert(
        self, src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
    ) -> LayerResult:
        """k_proj = RoPE-preserving key merge, v_proj = output-weighted value basis (under the input statistics
        when given); the source's q_proj and o_proj stay, with per-group maps into the merged key (`rope_mix`) and
        out of the value basis (`value_up`). Built to serve as a Llama with one KV head, the merge keeps one key
        pair per source frequency, in order."""
        heads, groups, head_dim = config.num_attention_heads, config.source_num_key_value_heads, config.head_dim
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
        out = source_side_tensors(src, query_rank(config, layer))
        for name, part in (("k_proj", merge), ("v_proj", value)):
            out[f"{src.prefix}{name}.weight"] = part.weight
            if part.bias is not None:
                out[f"{src.prefix}{name}.bias"] = part.bias
        out[f"{src.prefix}rope_mix"] = merge.query_mixing.T
        out[f"{src.prefix}value_up"] = value_up(value, groups)
        return LayerResult(out, LayerReport(layer, merge.relative_error, value.relative_error), merge.pairs)

    def describe(self, config: FactorConvConfig) -> str:
        return (
            "Multi-matrix Factorization Attention (MFA): one RoPE-preserving merged key head and one value head "
            "shared by all query heads, so the cache holds one key and one value vector per token."
        )


MFA = MFAKind()
