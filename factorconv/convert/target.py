"""The converted model's config, derived from the source config and the user's options."""

import logging

import torch

from ..dtypes import DTYPES
from ..kinds import Geometry
from ..model_folder import source_reference
from ..modeling import FactorConvConfig
from .options import ConvertOptions
from .source import SourceCheckpoint

logger = logging.getLogger("factorconv")


def output_dtype(options: ConvertOptions, source: SourceCheckpoint) -> torch.dtype:
    """The requested dtype, or with 'auto' the source's own (float32 when it declares none)."""
    if options.dtype != "auto":
        return DTYPES[options.dtype]
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
    source: SourceCheckpoint, options: ConvertOptions, plans: list | None = None
) -> FactorConvConfig:
    """FactorConvConfig with the source's geometry and the requested ranks or widths (validated here).

    MFA / MFA-KR pair tables are filled in per layer by the conversion (they depend on the weights).
    `plans` (from a KV budget) give per-layer widths that replace the scalar options.
    """
    cfg, kind, family = source.config, options.kind, source.family
    names = family.attention
    geometry = Geometry.of(cfg)
    kind.check_widths(options, geometry, cfg.hidden_size)
    window = family.window(cfg)
    if window is not None:
        logger.warning(
            "the source uses a %d-token sliding window; the converted model attends to the full context, "
            "so outputs match only on sequences up to %d tokens",
            window,
            window,
        )
    per_layer = {}
    widths = kind.serving_widths(options, geometry) if plans is None else None
    if widths is not None:
        per_layer = {name: [value] * cfg.num_hidden_layers for name, value in widths.items()}
    for plan in plans or []:
        for name, value in plan.widths.items():
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
        **kind.config_fields(options),
        serving_format=options.serving_format,
        source_model=source_reference(options.source),
        source_revision=options.revision,
        source_architecture=source.architecture,
        architectures=["FactorConvForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_factorconv.FactorConvConfig",
            "AutoModel": "modeling_factorconv.FactorConvModel",
            "AutoModelForCausalLM": "modeling_factorconv.FactorConvForCausalLM",
        },
        dtype=output_dtype(options, source),
    )
    return FactorConvConfig(**{**fields, **per_layer})
