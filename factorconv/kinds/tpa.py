"""TPA (Tensor Product Attention): keys and values of all heads as sums of per-token tensor products; the cache
holds the factors. Exact at ranks equal to the source's KV heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import OptionError, option
from ..factorize.allocate import Component
from ..factorize.common import cholesky_whitening, input_moment
from ..factorize.tpa import TensorProductInit, head_mode_gains, relative_error, tensor_product_init
from ..factorize.tpa_als import fit_contextual
from ..modeling import FactorConvConfig
from .base import Geometry, TargetKind, TargetSpec, check_range, flat_gains, per_layer_text
from .layer import LayerReport, LayerResult, LayerStatistics, SourceAttention, fitting_inputs, output_projection

if TYPE_CHECKING:
    from ..convert.options import ConvertOptions

ALS = "fits contextual TPA factors: use it with {to} tpa {contextual}"  # an OptionError's template


class TPAKind(TargetKind):
    name = "tpa"
    sizes = ("rank_k", "rank_v", "rank_q")
    switches = ("contextual",)
    widths = ("rank_k", "rank_v")
    config_names = {"rank_k": "tpa_rank_k", "rank_v": "tpa_rank_v"}
    inits = {"als": ALS}
    # TPA's head-mixing factors want larger, constant steps (benchmarks/results/refine_lr_*.md, 50% of the KV
    # bytes): pycode-27M 1.138x (0.02, warm-up + cosine) -> 1.089x (0.04, warm-up + cosine) -> 1.050x (0.04
    # constant); SmolLM2 2.63x -> 2.32x -> 2.13x.
    refine_lr = 0.04
    refine_schedule = "constant"
    modeling_class = "FactorConvTPAAttention"

    def validate(self, options: ConvertOptions) -> None:
        if options.init == "als" and not options.contextual:
            raise OptionError(f"{option('init')} 'als' {ALS}")

    def check_widths(self, target: TargetSpec, geometry: Geometry, hidden: int) -> None:
        check_range("rank_k", target["rank_k"], geometry.kv_heads, "the source's KV heads")
        check_range("rank_v", target["rank_v"], geometry.kv_heads, "the source's KV heads")
        check_range("rank_q", target["rank_q"], geometry.heads, "the source's query heads")

    def config_fields(self, target: TargetSpec) -> dict:
        return dict(tpa_rank_k=target["rank_k"], tpa_rank_v=target["rank_v"], tpa_rank_q=target["rank_q"],
                    tpa_contextual=target["contextual"])

    def components(self, geometry: Geometry, target: TargetSpec, src: SourceAttention | None = None,
                   moment: torch.Tensor | None = None) -> list[Component]:
        g, h = geometry.kv_heads, geometry.heads
        per_rank = geometry.head_dim + (h if target["contextual"] else 0)
        if src is None:
            return [Component(name, flat_gains(g), per_rank) for name in self.widths]
        return [
            Component(name, head_mode_gains(src.weight(p), src.bias(p), g, h, _whitening(src, p, moment)).tolist(),
                      per_rank)
            for name, p in zip(self.widths, "kv")
        ]

    def convert(
        self, src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
    ) -> LayerResult:
        """Head-mode factors of K and V (and Q when `tpa_rank_q` is set); o_proj unchanged.

        With calibration statistics the SVD is input-whitened (error measured on real inputs, SVD-LLM style);
        with init "als" contextual factors are then fitted to the calibration keys/values (factorize/tpa_als.py).
        """
        heads, groups, hidden = config.num_attention_heads, config.source_num_key_value_heads, config.hidden_size
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
                fitted, history = fit_contextual(fitting_inputs(stats.activations), weight, bias, init, num_groups)
                errors[proj] = history[-1]  # relative error of the fitted factors on the calibration tokens
                out.update({f"{prefix}.head_mix": fitted.head_mix, f"{prefix}.head_proj.weight": fitted.head_proj,
                            f"{prefix}.basis.weight": fitted.basis_weight})
                if fitted.basis_bias is not None:
                    out[f"{prefix}.basis.bias"] = fitted.basis_bias
        out.update(output_projection(src))
        return LayerResult(out, LayerReport(layer, errors["k"], errors["v"], errors.get("q")))

    def describe(self, config: FactorConvConfig) -> str:
        kind = "contextual " if config.tpa_contextual else ""
        return (
            f"{kind}Tensor Product Attention (TPA): keys and values are sums of per-token tensor products, "
            "and the KV cache stores those factors instead of per-head keys and values."
        )

    def dims(self, config: FactorConvConfig) -> str:
        dims = f"Ranks per layer: R_K = {per_layer_text(config.tpa_rank_k)}, R_V = {per_layer_text(config.tpa_rank_v)}"
        return dims + (f", R_Q = {per_layer_text(config.tpa_rank_q)}" if config.tpa_rank_q else "")


def _whitening(src: SourceAttention, proj: str, moment: torch.Tensor | None) -> torch.Tensor | None:
    if moment is None:
        return None
    weight, bias = src.weight(proj), src.bias(proj)
    return cholesky_whitening(input_moment(weight.shape[1], bias is not None, moment))


def _product_tensors(prefix: str, init: TensorProductInit, contextual: bool, hidden: int) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.basis.weight": init.basis_weight, f"{prefix}.head_mix": init.head_mix}
    if init.basis_bias is not None:
        tensors[f"{prefix}.basis.bias"] = init.basis_bias
    if contextual:  # A = 0: starts exactly at the non-contextual factors, training moves it
        tensors[f"{prefix}.head_proj.weight"] = init.basis_weight.new_zeros(init.head_mix.numel(), hidden)
    return tensors


TPA = TPAKind()
