"""What factorconv knows about one family of source checkpoints, and about the families it refuses.

In the spirit of mergekit's architecture definitions: a family says where its attention tensors live, which of
them carry biases, whether its config may declare a sliding window, and which `architectures` / `model_type`
values select it. Everything else about a source (every tensor it must hold) comes from transformers' own class.
"""

import re
from dataclasses import dataclass

from transformers import PreTrainedConfig

PROJECTIONS = "qkvo"

# A bias rule: fixed (True / False) or the name of the config flag that switches it (absent flag: no bias).
BiasRule = bool | str


@dataclass(frozen=True)
class AttentionNames:
    """Where one decoder layer's attention projections live in the checkpoint's state dict."""

    prefix: str = "model.layers.{layer}.self_attn."
    module: str = "{proj}_proj"  # proj is one of q, k, v, o

    def tensor(self, layer: int, proj: str, kind: str = "weight") -> str:
        return f"{self.prefix.format(layer=layer)}{self.module.format(proj=proj)}.{kind}"

    @property
    def pattern(self) -> re.Pattern[str]:
        """Matches any projection's weight or bias; group 1 is the layer index."""
        before, after = (re.escape(part) for part in self.prefix.split("{layer}"))
        modules = "|".join(re.escape(self.module.format(proj=p)) for p in PROJECTIONS)
        return re.compile(rf"^{before}(\d+){after}(?:{modules})\.(weight|bias)$")


# Llama's layout, which Mistral and Qwen2 share and the converted model's own tensors follow.
HF_ATTENTION = AttentionNames()


@dataclass(frozen=True)
class SourceFamily:
    """A family factorconv converts: RoPE attention through separate q/k/v/o projections (MHA or GQA), no
    per-head query/key norms, Llama's RMSNorm and MLP around it (what the converted model's layers compute)."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    biases: tuple[BiasRule, BiasRule, BiasRule, BiasRule]  # q, k, v, o, as the transformers class builds them
    mlp_bias: BiasRule = False
    # The config may declare a sliding window; the converted model attends to the full context, so outputs
    # match the source only on sequences up to the window (a warning, not a refusal).
    sliding_window: bool = False
    attention: AttentionNames = HF_ATTENTION

    def has_bias(self, proj: str, config: PreTrainedConfig) -> bool:
        """From the config alone (planning without weights): what the transformers class would build."""
        return _applies(self.biases[PROJECTIONS.index(proj)], config)

    def has_mlp_bias(self, config: PreTrainedConfig) -> bool:
        return _applies(self.mlp_bias, config)

    def window(self, config: PreTrainedConfig) -> int | None:
        """The sliding window the source attends through, when shorter than its context; else None."""
        window = getattr(config, "sliding_window", None) if self.sliding_window else None
        return window if window is not None and window < config.max_position_embeddings else None

    def attention_tensors(self, layer: int, config: PreTrainedConfig) -> set[str]:
        """Every attention tensor of `layer` that the transformers class of this family creates."""
        names = {self.attention.tensor(layer, p) for p in PROJECTIONS}
        return names | {self.attention.tensor(layer, p, "bias") for p in PROJECTIONS if self.has_bias(p, config)}


@dataclass(frozen=True)
class RefusedFamily:
    """A family users try whose layers the converted model cannot reproduce: refused, with the reason."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    reason: str  # completes "<name> ..."; one clause saying what is unsupported and why


def _applies(rule: BiasRule, config: PreTrainedConfig) -> bool:
    return rule if isinstance(rule, bool) else bool(getattr(config, rule, False))
