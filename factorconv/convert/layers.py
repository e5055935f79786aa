"""Per-layer conversion of source attention tensors into the target's tensors, by the config's kind."""

from collections.abc import Callable

import torch

from ..families import HF_ATTENTION
from ..kinds import KINDS
from ..kinds.layer import LayerResult, LayerStatistics, SourceAttention
from ..modeling import FactorConvConfig

# The source's attention tensors (group 1: the layer): every supported family's, which share Llama's names.
ATTENTION_TENSOR = HF_ATTENTION.pattern


def convert_attention(
    read: Callable[[str], torch.Tensor | None],
    layer: int,
    config: FactorConvConfig,
    device: torch.device,
    stats: LayerStatistics | None = None,
) -> LayerResult:
    """Convert one layer for `config.attention` (float32 tensors on `device`), from calibration stats if given."""
    result = KINDS[config.attention].convert(SourceAttention(read, layer, device), layer, config, stats)
    result.tensors = {name: t.float().contiguous() for name, t in result.tensors.items()}
    return result
