"""MFA-KR (MFA with Key-Reuse): one cached vector per token, [RoPE part | shared latent], the key, with its
latent also read as the value; built with `mla`, it exports as DeepSeek-V3 (MLA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import FactorConvError, OptionError, option
from ..factorize.common import split_bias_column
from ..factorize.key_reuse import key_reuse_inits, latent_norm_weight, phase_average
from ..factorize.mfa import strided_pairs
from ..modeling import FactorConvConfig
from ..modeling.modeling_factorconv import FactorConvRotaryEmbedding
from .base import Geometry, TargetSpec
from .layer import LayerReport, LayerResult, LayerStatistics, SourceAttention, fitting_inputs, selection_error
from .mfa import MFA
from .shared_kv import SharedKVKind, query_rank, source_side_tensors, value_up

if TYPE_CHECKING:
    from ..convert.options import ConvertOptions

# Closed forms tried with calibration activations: (move slow frequencies to NoPE, NoPE key weight).
# (False, 0.0) is the MFA merge with a values-only latent, the one used without activations.
KEY_REUSE_CANDIDATES = ((False, 0.0), (False, 0.1), (False, 0.3), (False, 1.0), (True, 0.1), (True, 0.3), (True, 1.0))
# vLLM's fused MLA decode kernels (FlashMLA and friends) take these kv_lora_rank + qk_rope_head_dim shapes.
ENGINE_MLA_SHAPES = ("512+64", "256+64")


class MFAKRKind(SharedKVKind):
    name = "mfa_kr"
    sizes = ("rope_dim", "nope_dim", "query_rank")
    switches = ("mla", "mla_shape")
    widths = ("rope_dim", "nope_dim")
    symbols = ("d_R", "d_N")
    refine_lr = MFA.refine_lr
    refine_schedule = MFA.refine_schedule
    modeling_class = "FactorConvMFAKRAttention"

    def validate(self, options: ConvertOptions) -> None:
        if options.mla_shape is not None and not options.mla:
            raise ValueError("mla_shape is the shape of a DeepSeek-V3 export: use it with mla")
        if options.mla:
            self.check_fixed_shape(options, "mla", " (give the shape as mla_shape N+R)")
            if (options.mla_shape is None) == (options.kv_budget is None):
                raise ValueError("mla needs its shape: pass mla_shape (e.g. 256+64) or kv_budget, not both")

    def serving_format(self, target: TargetSpec) -> str | None:
        return "deepseek_v3" if target["mla"] else None

    def config_fields(self, target: TargetSpec) -> dict:
        return dict(rope_dim=target["rope_dim"], nope_dim=target["nope_dim"], query_rank=target["query_rank"],
                    latent_norm=target["mla"])

    def serving_widths(self, target: TargetSpec, geometry: Geometry) -> dict[str, int] | None:
        """`mla`: kv_lora_rank + qk_rope_head_dim from `mla_shape`, or from `kv_budget` with the widest standard
        RoPE part (at most the head dim) that takes no more than half the layer's width."""
        if not target["mla"]:
            return None
        d, source_width = geometry.head_dim, geometry.source_width
        if target["mla_shape"] is not None:
            nope, rope = (int(part) for part in target["mla_shape"].split("+"))
            where = f"{option('mla_shape')} {target['mla_shape']}"
        else:
            width = int(target.kv_budget * source_width)
            where = f"{option('kv_budget')} {target.kv_budget}"
            # Every source frequency once when it fits in half the layer's width (measured best:
            # benchmarks/results/quality_*.md), else the widest standard RoPE part that does. DeepSeek-V3 itself
            # rotates 64 of 128.
            fitting = [w for w in range(2, d + 1, 2) if d % w == 0 and w <= width // 2]
            if not fitting:
                raise OptionError(f"{where} is too small for {option('mla')}: the least it can cache is "
                                      f"{4 / source_width:.1%} of the source")
            rope = fitting[-1]
            nope = width - rope
        if rope % 2 or not 2 <= rope <= d or d % rope:
            raise OptionError(
                f"{where}: the RoPE part ({rope}) must be even and divide the head dim {d} (e.g. {d // 2}), so that "
                "its frequencies are the source's"
            )
        if not 1 <= nope <= source_width - rope:
            raise OptionError(
                f"{where}: the latent (kv_lora_rank, {nope}) must be between 1 and {source_width - rope} for this "
                f"source, e.g. {d}+{d // 2}"
            )
        return {"rope_dim": rope, "nope_dim": nope}

    def serving_note(self, target: TargetSpec, geometry: Geometry) -> str | None:
        try:
            widths = self.serving_widths(target.with_settings(mla=True), geometry)
        except FactorConvError as err:
            return f"as DeepSeek-V3 (--mla): {err}"
        shape = f"{widths['nope_dim']}+{widths['rope_dim']}"
        engines = []
        for engine in ENGINE_MLA_SHAPES:
            width = sum(int(part) for part in engine.split("+"))
            try:
                self.serving_widths(target.with_settings(mla=True, mla_shape=engine), geometry)
                engines.append(f"--mla-shape {engine} is {width / geometry.source_width:.1%} of the source's KV bytes")
            except FactorConvError:
                engines.append(f"{engine} does not fit this source")
        return (f"as DeepSeek-V3 (--mla, then `factorconv export --format deepseek-v3`): kv_lora_rank+qk_rope_head_dim "
                f"= {shape}; vLLM's fused MLA kernels take {' or '.join(ENGINE_MLA_SHAPES)} ({'; '.join(engines)})")

    def convert(
        self, src: SourceAttention, layer: int, config: FactorConvConfig, stats: LayerStatistics | None
    ) -> LayerResult:
        """c_proj = [RoPE key merge | joint latent of key directions moved to NoPE and the values]
        (factorize/key_reuse.py); the source's q_proj and o_proj stay, with per-group maps into both parts. With
        calibration activations the partial-RoPE split and the key/value balance are chosen by measured
        attention-output error. Built to serve as DeepSeek-V3 (MLA), the rotated part keeps one direction per
        frequency of the standard sequence of its width and the latent is normalised (`latent_norm`, scale fitted
        on the calibration inputs)."""
        heads, groups = config.num_attention_heads, config.source_num_key_value_heads
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
            out = source_side_tensors(src, query_rank(config, layer))
            weight, bias = split_bias_column(init.latent, k[1] is not None)
            out[f"{src.prefix}c_proj.weight"] = weight
            if bias is not None:
                out[f"{src.prefix}c_proj.bias"] = bias
            if config.latent_norm:
                inputs = fitting_inputs(acts) if acts is not None else None
                nope_bias = None if bias is None else bias[rope_dim:]
                out[f"{src.prefix}kv_norm.weight"] = latent_norm_weight(weight[rope_dim:], nope_bias, inputs, moment)
            out[f"{src.prefix}rope_mix"] = init.rope_mix
            out[f"{src.prefix}key_up"] = init.key_up
            out[f"{src.prefix}value_up"] = value_up(init.value, groups)
            result = LayerResult(out, LayerReport(layer, init.key_error, init.value_error), init.pairs)
            error = selection_error(config, layer, out, acts, init.pairs) if acts is not None else 0.0
            if best is None or error < best[0]:
                best = (error, result)
        return best[1]

    def describe(self, config: FactorConvConfig) -> str:
        return (
            "MFA with Key-Reuse (MFA-KR): one cached vector per token, [RoPE part | shared part], serving as the "
            "key, with its shared part also read as the value."
        )


MFA_KR = MFAKRKind()
