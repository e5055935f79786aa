"""The converted model's config, derived from the source config and the conversion plan."""

import logging

import torch

from ..dtypes import DTYPES
from ..kinds import Geometry
from ..model_folder import source_reference
from ..modeling import FactorConvConfig
from .conversion import ConversionPlan
from .source import SourceCheckpoint

logger = logging.getLogger("factorconv")


def output_dtype(name: str, source: SourceCheckpoint) -> torch.dtype:
    """The dtype named, or with 'auto' the source's own (float32 when it declares none)."""
    if name != "auto":
        return DTYPES[name]
    declared = getattr(source.config, "dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if declared in DTYPES.values() else torch.float32


def _has_bias(source: SourceCheckpoint, name: str, from_config: bool) -> bool:
    """From the weights when present; from the config alone (planning) otherwise."""
    if source.has_weights:
        return source.has(name)
    return from_config


def build_target_config(
    source: SourceCheckpoint, plan: ConversionPlan, layers: list | None = None
) -> FactorConvConfig:
    """FactorConvConfig with the source's geometry and the requested ranks or widths (validated here).

    MFA / MFA-KR pair tables are filled in per layer by the conversion (they depend on the weights).
    `layers` (convert/plan.py's LayerPlans: a KV budget or a serving shape) give per-layer widths that replace
    the scalar options.
    """
    cfg, target, family = source.config, plan.target, source.family
    kind, geometry, names = target.kind, Geometry.of(cfg), family.attention
    kind.check_widths(target, geometry, cfg.hidden_size)
    window = family.window(cfg)
    if window is not None:
        logger.warning(
            "the source uses a %d-token sliding window; the converted model attends to the full context, "
            "so outputs match only on sequences up to %d tokens",
            window,
            window,
        )
    per_layer: dict[str, list[int]] = {}
    for layer in layers or []:
        for name, value in layer.widths.items():
            per_layer.setdefault(kind.config_name(name), []).append(value)
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=geometry.heads,
        source_num_key_value_heads=geometry.kv_heads,
        head_dim=geometry.head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=getattr(cfg, "initializer_range", 0.02),
        rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_parameters=dict(cfg.rope_parameters),
        qkv_bias=_has_bias(source, names.tensor(0, "q", "bias"), family.has_bias("q", cfg)),
        o_bias=_has_bias(source, names.tensor(0, "o", "bias"), family.has_bias("o", cfg)),
        mlp_bias=_has_bias(source, "model.layers.0.mlp.gate_proj.bias", family.has_mlp_bias(cfg)),
        attention=kind.name,
        **kind.config_fields(target),
        serving_format=kind.serving_format(target),
        source_model=source_reference(plan.source),
        source_revision=plan.revision,
        source_architecture=source.architecture,
        architectures=["FactorConvForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_factorconv.FactorConvConfig",
            "AutoModel": "modeling_factorconv.FactorConvModel",
            "AutoModelForCausalLM": "modeling_factorconv.FactorConvForCausalLM",
        },
        dtype=output_dtype(plan.output.dtype, source),
    )
    return FactorConvConfig(**{**fields, **per_layer})
