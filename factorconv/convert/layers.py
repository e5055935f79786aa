"""Per-layer conversion of source attention tensors into the target's factor tensors."""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..factorize.tpa import TensorProductInit, relative_error, tensor_product_init
from ..modeling import FactorConvConfig

ATTENTION_TENSOR = re.compile(r"^model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.(weight|bias)$")


@dataclass
class LayerReport:
    """How far each converted projection is from the source (relative Frobenius error over all heads)."""

    layer: int
    key_error: float
    value_error: float
    query_error: float | None


def _product_tensors(prefix: str, init: TensorProductInit, contextual: bool, hidden: int) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.basis.weight": init.basis_weight, f"{prefix}.head_mix": init.head_mix}
    if init.basis_bias is not None:
        tensors[f"{prefix}.basis.bias"] = init.basis_bias
    if contextual:  # A = 0: starts exactly at the non-contextual factors, training moves it
        tensors[f"{prefix}.head_proj.weight"] = init.basis_weight.new_zeros(init.head_mix.numel(), hidden)
    return tensors


def convert_tpa_attention(
    read: Callable[[str], torch.Tensor | None],
    layer: int,
    config: FactorConvConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], LayerReport]:
    """Source q/k/v/o projections of one layer -> TPA tensors (in `dtype`, on CPU) and their errors.

    `read(name)` returns a source tensor or None when it does not exist (biases).
    """
    src, dst = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.self_attn."
    heads, groups, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size

    def load(name: str) -> torch.Tensor | None:
        tensor = read(src + name)
        return None if tensor is None else tensor.to(device=device, dtype=torch.float32)

    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for proj, rank, num_groups in (
        ("k", config.tpa_rank_k[layer], groups),
        ("v", config.tpa_rank_v[layer], groups),
        ("q", config.tpa_rank_q[layer] if config.tpa_rank_q else None, heads),
    ):
        weight, bias = load(f"{proj}_proj.weight"), load(f"{proj}_proj.bias")
        if rank is None:  # standard queries: copied as they are
            out[dst + "q_proj.weight"] = weight
            if bias is not None:
                out[dst + "q_proj.bias"] = bias
            continue
        init = tensor_product_init(weight, bias, num_groups, heads, rank)
        errors[proj] = relative_error(weight, bias, init, num_groups, heads)
        out.update(_product_tensors(f"{dst}{proj}_product", init, config.tpa_contextual, hidden))
    out[dst + "o_proj.weight"] = load("o_proj.weight")
    if (o_bias := load("o_proj.bias")) is not None:
        out[dst + "o_proj.bias"] = o_bias
    tensors = {name: tensor.to(device="cpu", dtype=dtype) for name, tensor in out.items()}
    return tensors, LayerReport(layer, errors["k"], errors["v"], errors.get("q"))
