"""Calibration: run the source one decoder layer at a time and collect what each layer's attention sees.

Layer ℓ's outputs feed layer ℓ+1 (teacher forcing through the source), and only one layer's weights are
resident at once, so peak memory does not grow with depth. Per layer the runner yields the attention
input x (after the layer's norm) and the source attention output; statistics such as Σ = E[x̃x̃ᵀ] are
accumulated from those in float64.
"""

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from ..data import check_token_ids, dataset_tokens, load_tokens
from ..errors import FactorConvError, OptionError, option
from ..precision import tensor_float32
from .source import SourceCheckpoint


def calibration_tokens(
    spec: str, folder: Path, samples: int, seq_len: int | None, config: PreTrainedConfig
) -> torch.Tensor:
    """(N, seq_len) token windows from a .txt/.jsonl/.npy file or a `datasets` name, tokenized for the source.

    `seq_len` None: the model's context, at most 512 tokens (what keeps a default conversion of a 135M model
    within minutes on a 2-core CPU; longer windows cost time linearly in refinement and more in attention)."""
    context = getattr(config, "max_position_embeddings", None) or 2048
    if seq_len is None:
        seq_len = min(context, 512)
    elif seq_len > context:
        raise OptionError(f"{option('calib_seq_len')} {seq_len} exceeds the model's context of {context} tokens")
    path = Path(spec).expanduser()
    if path.exists() or path.suffix in (".txt", ".jsonl", ".npy", ".json"):
        tokenizer = None
        if path.suffix != ".npy":
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError, TypeError):
                raise FactorConvError(f"{folder} has no tokenizer to tokenize {path}; pass pre-tokenized .npy") from None
        stream = load_tokens(path, tokenizer, max_tokens=samples * seq_len)
    else:
        stream = _dataset_tokens(spec, folder, samples * seq_len)
    check_token_ids(stream, config.vocab_size, f"calibration data {spec}")
    count = min(samples, stream.numel() // seq_len)
    if count < 2:
        raise OptionError(
            f"calibration data {spec} gives {stream.numel()} tokens, fewer than 2 sequences of {seq_len}; "
            "lower {calib_seq_len} or give more text"
        )
    return stream[: count * seq_len].reshape(count, seq_len)


def _dataset_tokens(name: str, folder: Path, max_tokens: int) -> torch.Tensor:
    """Tokens of a Hugging Face `datasets` dataset ('name' or 'name:config'), streamed until max_tokens."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return dataset_tokens(name, tokenizer, max_tokens)


class MomentAccumulator:
    """Σ = E[x̃x̃ᵀ] with x̃ = [x; 1], accumulated in float64 over any number of chunks."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).double()
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        product = rows.T @ rows
        self.total = product if self.total is None else self.total + product
        self.count += rows.shape[0]

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no calibration tokens were accumulated")
        return self.total / self.count


@dataclass
class LayerActivations:
    """What one source attention layer saw and produced on the calibration tokens."""

    layer: int
    inputs: torch.Tensor  # (N, T, d): attention input, after the layer's input norm
    outputs: torch.Tensor  # (N, T, d): the source attention's output
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, T, head_dim)
    held_out: int  # the last `held_out` sequences are for measuring error, not for statistics

    def moment(self, chunk: int = 8) -> torch.Tensor:
        """Σ over the fitting sequences (everything but the held-out ones)."""
        acc = MomentAccumulator()
        fit = self.inputs[: self.inputs.shape[0] - self.held_out]
        for start in range(0, fit.shape[0], chunk):
            acc.update(fit[start : start + chunk])
        return acc.value()


class LayerwiseRunner:
    """Iterates the source's decoder layers over calibration tokens, loading one layer's weights at a time."""

    def __init__(
        self, source: SourceCheckpoint, tokens: torch.Tensor, device: torch.device, batch_size: int = 8,
        keep_layer_input: bool = False,
    ):
        self.source, self.device, self.batch_size, self.keep_layer_input = source, device, batch_size, keep_layer_input
        config = copy.deepcopy(source.config)
        config._attn_implementation = "sdpa"  # causal via is_causal: no (T × T) mask in memory
        self.config = config
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config)
        rotary = type(self.skeleton.model.rotary_emb)(config=config).to(device)
        embed = source.tensor("model.embed_tokens.weight").to(device=device, dtype=torch.float32)
        self.hidden = torch.nn.functional.embedding(tokens.to(device), embed)
        self.position_ids = torch.arange(tokens.shape[1], device=device)[None]
        self.position_embeddings = rotary(self.hidden[:1], self.position_ids)
        self.held_out = max(1, tokens.shape[0] // 10)
        # with keep_layer_input, (N, T, d): the residual stream entering the layer last yielded (one more copy alive)
        self.layer_input: torch.Tensor | None = None
        self._current = -1
        self._head: tuple[torch.nn.Module, torch.Tensor] | None = None  # final norm and output embedding, on demand

    def _layer(self, index: int) -> torch.nn.Module:
        layer = self.skeleton.model.layers[index].to_empty(device=self.device).float()
        prefix = f"model.layers.{index}."
        state = {name[len(prefix) :]: self.source.tensor(name) for name in self.source.names if name.startswith(prefix)}
        layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return layer.eval()

    def _run(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer over `hidden` in batches, written into one preallocated result (a list of batch outputs joined
        by torch.cat would hold the result twice: 4.3 GB more at Llama-3.1-8B shapes with 128 x 2048 tokens)."""
        result = torch.empty_like(hidden)
        with tensor_float32(self.device):
            for start in range(0, hidden.shape[0], self.batch_size):
                chunk = hidden[start : start + self.batch_size]
                out = layer(
                    chunk,
                    attention_mask=None,
                    position_ids=self.position_ids,
                    position_embeddings=tuple(p.expand(chunk.shape[0], -1, -1) for p in self.position_embeddings),
                )
                result[start : start + chunk.shape[0]] = out[0] if isinstance(out, tuple) else out
        return result

    @torch.no_grad()
    def apply_layer(self, hidden: torch.Tensor, attention: torch.nn.Module | None = None) -> torch.Tensor:
        """The layer last yielded applied to other residual streams `hidden` (N', T, d), its attention optionally
        replaced by `attention` (a factorconv attention module): how a converted layer's error propagates."""
        layer = self.skeleton.model.layers[self._current]
        if attention is None:
            return self._run(layer, hidden)
        source_attention, layer.self_attn = layer.self_attn, AsSourceAttention(attention)
        try:
            return self._run(layer, hidden)
        finally:
            layer.self_attn = source_attention

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (T, vocab) of one sequence's final residual stream (T, d)."""
        if self._head is None:
            norm = self.skeleton.model.norm.to_empty(device=self.device).float()
            norm.load_state_dict({"weight": self.source.tensor("model.norm.weight").float()})
            names = set(self.source.names)
            head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
            self._head = (norm, self.source.tensor(head).to(device=self.device, dtype=torch.float32))
        norm, weight = self._head
        return torch.log_softmax(norm(hidden) @ weight.T, dim=-1)

    @torch.no_grad()
    def __iter__(self) -> Iterator[LayerActivations]:
        for index in range(self.config.num_hidden_layers):
            layer = self._layer(index)
            self.skeleton.model.layers[index], self._current = layer, index
            inputs, outputs = torch.empty_like(self.hidden), torch.empty_like(self.hidden)
            filled = 0

            def capture(module, args, kwargs, output):
                nonlocal filled
                x = kwargs.get("hidden_states", args[0] if args else None)
                inputs[filled : filled + x.shape[0]], outputs[filled : filled + x.shape[0]] = x, output[0]
                filled += x.shape[0]

            handle = layer.self_attn.register_forward_hook(capture, with_kwargs=True)
            self.layer_input = self.hidden if self.keep_layer_input else None
            self.hidden = self._run(layer, self.hidden)
            handle.remove()
            yield LayerActivations(index, inputs, outputs, self.position_embeddings, self.held_out)
            del inputs, outputs
            self.layer_input = None
            self.skeleton.model.layers[index] = layer.to("meta")  # free this layer's weights


class AsSourceAttention(torch.nn.Module):
    """A factorconv attention module behind the source decoder layer's attention call (no cache, no mask: causal)."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple[torch.Tensor, None]:
        return self.attention(hidden_states, position_embeddings=position_embeddings)[0], None
