"""What every export format shares: its interface, the checks all of them make, and tensor re-layout helpers."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from ..errors import FactorConvError
from ..factorize.mfa import strided_pairs
from ..kinds import TargetKind
from ..modeling import FactorConvConfig
from ..modeling.modeling_factorconv import FactorConvRotaryEmbedding

Reader = Callable[[str], torch.Tensor | None]  # tensor name -> tensor, None when the folder has no such tensor


class ExportRefused(FactorConvError):
    """The model does not fit the format; the message names the reason and the fix."""


@dataclass(frozen=True)
class ExportFormat:
    """One stock architecture a factorconv model can be written as: the kind it takes, how its config and
    attention tensors are built, and how it is served. Everything but attention is copied by name."""

    name: str  # the --format value, e.g. "deepseek-v3" (dashed config.serving_format of what convert builds for it)
    kind: TargetKind  # the factorconv attention kind it takes (MFA-KR, MFA)
    convert_flag: str  # how to convert a model that fits, e.g. "--to mfa-kr --mla"
    architecture: str  # the stock class name written in config.json
    check: Callable[[FactorConvConfig, Reader], None]  # raises ExportRefused
    stock_config: Callable[[FactorConvConfig], PreTrainedConfig]
    attention_tensors: Callable[[FactorConvConfig, PreTrainedConfig, int, Reader], dict[str, torch.Tensor]]
    serving: str  # markdown: how to serve the folder, what is and is not verified


def refuse(config: FactorConvConfig, fmt: ExportFormat, reason: str) -> ExportRefused:
    return ExportRefused(
        f"cannot export this {config.attention} model as {fmt.name}: {reason}; convert the source with "
        f"`factorconv convert SOURCE OUT {fmt.convert_flag}` to get one that fits"
    )


def check_common(config: FactorConvConfig, fmt: ExportFormat, rotary_widths: list[int]) -> int:
    """The kind, one shape in every layer, and a RoPE part that is a stock head's: one key pair per frequency of
    the standard sequence of its width, in order. Returns that width."""
    if config.attention != fmt.kind.name:
        raise refuse(config, fmt, f"{fmt.name} takes {fmt.kind.flag} models")
    if len(set(rotary_widths)) != 1:
        widths = sorted(set(rotary_widths))
        raise refuse(config, fmt, f"its layers have different widths ({widths}); {fmt.name} has one shape")
    width = rotary_widths[0]
    try:
        standard = strided_pairs(config.head_dim, width)
    except ValueError:
        standard = None
    if standard is None or any(list(map(int, pairs)) != standard for pairs in config.rope_pair_index):
        raise refuse(config, fmt, "its rotated key pairs are not one per frequency of a standard RoPE sequence")
    return width


def check_frequencies(config: FactorConvConfig, fmt: ExportFormat, stock_rotary: torch.nn.Module, width: int) -> None:
    """The stock model's rotary tables must be ours at the kept pairs (rope scaling included), checked numerically."""
    ours = FactorConvRotaryEmbedding(config)
    pairs = torch.tensor(strided_pairs(config.head_dim, width))
    theirs = stock_rotary.inv_freq.double()
    rope_type = config.rope_parameters.get("rope_type", "default")
    same = theirs.shape == pairs.shape and torch.allclose(theirs, ours.inv_freq.double()[pairs], rtol=1e-6, atol=0)
    if not same or abs(stock_rotary.attention_scaling - ours.attention_scaling) > 1e-6:
        raise ExportRefused(
            f"cannot export as {fmt.name}: its rotary embedding with rope_type {rope_type!r} at width {width} does not "
            "reproduce the source's frequencies; export a source with default, linear or llama3 RoPE"
        )
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportRefused(
            f"cannot export as {fmt.name}: rope_type {rope_type!r} changes with the sequence length or the head width, "
            "so the stock model would drift from this one; export a source with default, linear or llama3 RoPE"
        )


def decoder_fields(config: FactorConvConfig) -> dict:
    """The config fields every stock Llama-style decoder takes as they are."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
             "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
             "eos_token_id", "tie_word_embeddings", "attention_dropout", "dtype")
    return {name: getattr(config, name) for name in names} | {"rope_parameters": dict(config.rope_parameters)}


def nonzero(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and bool(tensor.abs().max() > 0)


def query_rows(config: FactorConvConfig, layer: int, read: Reader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The source-sized query projection (H·D, in) and its bias: q_proj, or q_up·q_down multiplied out when the
    queries are low-rank without a norm (exact)."""
    prefix = f"model.layers.{layer}.self_attn."
    weight = read(prefix + "q_proj.weight")
    if weight is not None:
        return weight.double(), _double(read(prefix + "q_proj.bias"))
    product = read(prefix + "q_up.weight").double() @ read(prefix + "q_down.weight").double()
    return product, _double(read(prefix + "q_up.bias"))


def per_head(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(H·D, ·) -> (H, D, ·)."""
    return rows.reshape(heads, -1, *rows.shape[1:])


def group_of_heads(config: FactorConvConfig) -> torch.Tensor:
    return torch.arange(config.num_attention_heads) // (config.num_attention_heads // config.source_num_key_value_heads)


def _double(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.double()
