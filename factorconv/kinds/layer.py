"""What a kind's layer converter reads and returns (one source layer's projections, its calibration statistics,
the converted tensors and their errors), and how a converted layer is measured against the source's outputs.

Below convert/: the kinds' converters and convert/'s refinement both use these, so neither imports the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..families import HF_ATTENTION
from ..modeling import FactorConvConfig
from ..modeling.modeling_factorconv import ATTENTION_CLASSES
from ..precision import tensor_float32

if TYPE_CHECKING:
    from ..convert.calibrate import LayerActivations


@dataclass
class LayerReport:
    """How far the converted layer is from the source: relative errors of keys and values (0 = exact)."""

    layer: int
    key_error: float
    value_error: float
    query_error: float | None = None
    attention_error: float | None = None  # relative attention-output error on held-out calibration tokens
    refined_attention_error: float | None = None  # the same after local refinement
    probe_kl: float | None = None  # measured allocation: KL with this layer alone converted at uniform widths


@dataclass
class LayerStatistics:
    """Calibration statistics of one layer's attention input."""

    moment: torch.Tensor  # Σ = E[x̃x̃ᵀ], x̃ = [x; 1]
    query_aware: bool = False  # weight key directions by how strongly queries read them
    activations: LayerActivations | None = None  # to choose between closed forms by measured output error
    fit_contextual: bool = False  # TPA: fit a(x), b(x) to the activations' keys/values (init "als")


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]
    report: LayerReport
    rope_pairs: list[int] | None = None  # MFA / MFA-KR: source frequency of each merged key pair


class SourceAttention:
    """One source layer's q/k/v/o projections, read on demand in float32 on the conversion device, under the
    tensor names every supported family shares (families.HF_ATTENTION); `prefix` is where the converted layer's
    own tensors go."""

    def __init__(self, read: Callable[[str], torch.Tensor | None], layer: int, device: torch.device) -> None:
        self.prefix, self._read, self.device = f"model.layers.{layer}.self_attn.", read, device
        self.layer = layer

    def weight(self, proj: str) -> torch.Tensor:
        return self._read(HF_ATTENTION.tensor(self.layer, proj)).to(device=self.device, dtype=torch.float32)

    def bias(self, proj: str) -> torch.Tensor | None:
        tensor = self._read(HF_ATTENTION.tensor(self.layer, proj, "bias"))
        return None if tensor is None else tensor.to(device=self.device, dtype=torch.float32)


Converter = Callable[[SourceAttention, int, FactorConvConfig, "LayerStatistics | None"], LayerResult]


def output_projection(src: SourceAttention) -> dict[str, torch.Tensor]:
    """The source's o_proj as it is (every kind keeps it)."""
    tensors = {f"{src.prefix}o_proj.weight": src.weight("o")}
    if (bias := src.bias("o")) is not None:
        tensors[f"{src.prefix}o_proj.bias"] = bias
    return tensors


def fitting_inputs(acts: LayerActivations, max_tokens: int = 65536) -> torch.Tensor:
    """Attention inputs of the fitting sequences, (M, d), thinned evenly to at most `max_tokens` rows."""
    rows = acts.inputs[: acts.inputs.shape[0] - acts.held_out].reshape(-1, acts.inputs.shape[-1])
    return rows[:: max(1, -(-rows.shape[0] // max_tokens))]


def attention_module(
    config: FactorConvConfig, layer: int, tensors: dict[str, torch.Tensor], device, rope_pairs: list[int] | None = None
) -> torch.nn.Module:
    """The converted layer's attention as a module of the modeling file, loaded with `tensors`."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # causal through is_causal, no explicit mask needed
    if rope_pairs is not None:
        config.rope_pair_index[layer] = rope_pairs
    with torch.device("meta"):  # no random init to overwrite (on CPU at 8B shapes: ~0.2 s per module, 16 per layer)
        module = ATTENTION_CLASSES[config.attention](config, layer)
    module = module.to_empty(device=device).to(torch.float32)
    prefix = f"model.layers.{layer}.self_attn."
    module.load_state_dict({name[len(prefix) :]: t.float() for name, t in tensors.items()}, strict=True)
    return module


def layer_output(module: torch.nn.Module, acts: LayerActivations, rows: slice | torch.Tensor) -> torch.Tensor:
    """The module's attention output on the calibration sequences `rows`."""
    x = acts.inputs[rows]
    cos, sin = (p.expand(x.shape[0], -1, -1) for p in acts.position_embeddings)
    return module(x, position_embeddings=(cos, sin))[0]


def row_chunks(rows: slice, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, rows.stop)) for start in range(rows.start, rows.stop, chunk)]


def output_error(module: torch.nn.Module, acts: LayerActivations, rows: slice, chunk: int = 8) -> float:
    """Relative error of the module's attention output against the source's on the sequences `rows` (TF32 on CUDA:
    these errors rank candidates and decide whether refinement is kept; they do not enter any weight)."""
    num, den = 0.0, 0.0
    with torch.no_grad(), tensor_float32(acts.inputs.device):
        for part in row_chunks(rows, chunk):
            out, target = layer_output(module, acts, part), acts.outputs[part]
            num += float((out - target).pow(2).sum())
            den += float(target.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def selection_error(
    config: FactorConvConfig, layer: int, tensors: dict[str, torch.Tensor], acts: LayerActivations, rope_pairs: list[int]
) -> float:
    """Relative attention-output error on the first fitting sequences (as many as are held out), for choosing
    between closed-form candidates without touching the held-out ones."""
    module = attention_module(config, layer, tensors, acts.inputs.device, rope_pairs)
    return output_error(module, acts, slice(0, min(acts.held_out, acts.inputs.shape[0] - acts.held_out)))
