"""The converted model's config, derived from the source config and the user's options."""

import logging

import torch

from ..dtypes import DTYPES
from ..errors import FactorConvError
from ..modeling import FactorConvConfig
from ..recipe import ConvertOptions
from .source import SourceCheckpoint, source_reference

logger = logging.getLogger("factorconv")


def output_dtype(options: ConvertOptions, source: SourceCheckpoint) -> torch.dtype:
    """The requested dtype, or with 'auto' the source's own (float32 when it declares none)."""
    if options.dtype != "auto":
        return DTYPES[options.dtype]
    declared = getattr(source.config, "dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if declared in DTYPES.values() else torch.float32


def _check_rank(name: str, rank: int | None, upper: int, what: str) -> None:
    if rank is not None and not 1 <= rank <= upper:
        raise FactorConvError(f"{name} {rank} is out of range: it must be between 1 and {upper} ({what})")


def _check_widths(options: ConvertOptions, heads: int, kv_heads: int, head_dim: int, hidden: int) -> None:
    full = kv_heads * head_dim
    _check_rank("--rank-k", options.rank_k, kv_heads, "the source's KV heads")
    _check_rank("--rank-v", options.rank_v, kv_heads, "the source's KV heads")
    _check_rank("--rank-q", options.rank_q, heads, "the source's query heads")
    _check_rank("--key-dim", options.key_dim, full, "KV heads × head dim")
    _check_rank("--value-dim", options.value_dim, full, "KV heads × head dim")
    _check_rank("--rope-dim", options.rope_dim, full, "KV heads × head dim")
    _check_rank("--nope-dim", options.nope_dim, full, "KV heads × head dim")
    for name, width in (("--key-dim", options.key_dim), ("--rope-dim", options.rope_dim)):
        if width is not None and width % 2:
            raise FactorConvError(f"{name} {width} must be even: RoPE rotates pairs of dimensions")
    _check_rank("--query-rank", options.query_rank, min(hidden, heads * head_dim), "hidden size and query width")


def _has_bias(source: SourceCheckpoint, name: str, qkv_default: bool) -> bool:
    """From the weights when present; from the config alone (planning) otherwise."""
    if source.has_weights:
        return source.has(name)
    return qkv_default or bool(getattr(source.config, "attention_bias", False))


def serving_widths(options: ConvertOptions, head_dim: int, source_width: int) -> dict[str, int]:
    """The widths of a conversion built to export as a stock architecture (the same in every layer).

    `mqa`: one key and one value head of the source's head dim. `mla`: kv_lora_rank + qk_rope_head_dim from
    `mla_shape`, or from `kv_budget` with the widest standard RoPE part (at most the head dim) that takes no more
    than half the layer's width.
    """
    d = head_dim
    if options.mqa:
        return {"key_dim": d, "value_dim": d}
    if options.mla_shape is not None:
        nope, rope = (int(part) for part in options.mla_shape.split("+"))
        where = f"--mla-shape {options.mla_shape}"
    else:
        width = int(options.kv_budget * source_width)
        where = f"--kv-budget {options.kv_budget}"
        # Every source frequency once when it fits in half the layer's width (measured best: benchmarks/results/
        # quality_*.md), else the widest standard RoPE part that does. DeepSeek-V3 itself rotates 64 of 128.
        fitting = [w for w in range(2, d + 1, 2) if d % w == 0 and w <= width // 2]
        if not fitting:
            raise FactorConvError(f"{where} is too small for --mla: the least it can cache is {4 / source_width:.1%} "
                                  "of the source")
        rope = fitting[-1]
        nope = width - rope
    if rope % 2 or not 2 <= rope <= d or d % rope:
        raise FactorConvError(
            f"{where}: the RoPE part ({rope}) must be even and divide the head dim {d} (e.g. {d // 2}), so that its "
            "frequencies are the source's"
        )
    if not 1 <= nope <= source_width - rope:
        raise FactorConvError(
            f"{where}: the latent (kv_lora_rank, {nope}) must be between 1 and {source_width - rope} for this source, "
            f"e.g. {d}+{d // 2}"
        )
    return {"rope_dim": rope, "nope_dim": nope}


PLAN_FIELDS = {"rank_k": "tpa_rank_k", "rank_v": "tpa_rank_v"}  # plan names that differ from config names


def build_target_config(
    source: SourceCheckpoint, options: ConvertOptions, plans: list | None = None
) -> FactorConvConfig:
    """FactorConvConfig with the source's geometry and the requested ranks or widths (validated here).

    MFA / MFA-KR pair tables are filled in per layer by the conversion (they depend on the weights).
    `plans` (from a KV budget) give per-layer widths that replace the scalar options.
    """
    cfg = source.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    _check_widths(options, heads, kv_heads, head_dim, cfg.hidden_size)
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.max_position_embeddings:
        logger.warning(
            "the source uses a %d-token sliding window; the converted model attends to the full context, "
            "so outputs match only on sequences up to %d tokens",
            window,
            window,
        )
    layer0 = "model.layers.0."
    per_layer = {}
    if plans is None and options.serving_format is not None:
        widths = serving_widths(options, head_dim, 2 * kv_heads * head_dim)
        per_layer = {name: [value] * cfg.num_hidden_layers for name, value in widths.items()}
    for plan in plans or []:
        for name, value in plan.widths.items():
            per_layer.setdefault(PLAN_FIELDS.get(name, name), []).append(value)
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=getattr(cfg, "initializer_range", 0.02),
        rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_parameters=dict(cfg.rope_parameters),
        qkv_bias=_has_bias(source, layer0 + "self_attn.q_proj.bias", cfg.model_type == "qwen2"),
        o_bias=_has_bias(source, layer0 + "self_attn.o_proj.bias", False),
        mlp_bias=_has_bias(source, layer0 + "mlp.gate_proj.bias", bool(getattr(cfg, "mlp_bias", False))),
        attention=options.to,
        tpa_rank_k=options.rank_k,
        tpa_rank_v=options.rank_v,
        tpa_rank_q=options.rank_q,
        tpa_contextual=options.contextual,
        key_dim=options.key_dim,
        value_dim=options.value_dim,
        rope_dim=options.rope_dim,
        nope_dim=options.nope_dim,
        query_rank=options.query_rank,
        latent_norm=options.mla,
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
