"""Source families: which checkpoints factorconv converts (and their tensor names, biases, sliding windows),
and which it refuses with a reason. A new family is its entry in supported.py (or refused.py) and a line here."""

from transformers import PreTrainedConfig

from ..errors import FactorConvError
from .refused import GEMMA, GEMMA2, GEMMA3, PHI3, QWEN3
from .spec import HF_ATTENTION, AttentionNames, RefusedFamily, SourceFamily
from .supported import LLAMA, MISTRAL, QWEN2

FAMILIES: tuple[SourceFamily, ...] = (LLAMA, MISTRAL, QWEN2)
REFUSED: tuple[RefusedFamily, ...] = (QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(name for family in FAMILIES for name in family.architectures)


def accepted_architecture(config: PreTrainedConfig, accepted: tuple[str, ...]) -> str:
    """The config's architecture when it is one of `accepted`; else one line naming it and what is accepted."""
    found = getattr(config, "architectures", None) or []
    if not found or found[0] not in accepted:
        name = found[0] if found else f"model_type {config.model_type!r}"
        raise FactorConvError(f"unsupported architecture {name}; supported: {', '.join(accepted)}")
    return found[0]


def family_of(config: PreTrainedConfig) -> SourceFamily:
    """The family a source config belongs to, or a one-line refusal (the reason, for a family users try).

    transformers builds the model from `model_type`, so it must agree with `architectures`: a Qwen3 config
    relabelled as Llama is still refused as Qwen3.
    """
    found = (getattr(config, "architectures", None) or [None])[0]
    for refused in REFUSED:
        if found in refused.architectures or config.model_type in refused.model_types:
            raise FactorConvError(
                f"unsupported architecture {found or refused.architectures[0]}: {refused.name} {refused.reason}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
    architecture = accepted_architecture(config, SUPPORTED_ARCHITECTURES)
    family = next(family for family in FAMILIES if architecture in family.architectures)
    if config.model_type not in family.model_types:
        raise FactorConvError(
            f"config.json names {architecture} but model_type {config.model_type!r}; they must agree "
            f"({family.name}: model_type {family.model_types[0]!r})"
        )
    return family


__all__ = [
    "FAMILIES",
    "HF_ATTENTION",
    "REFUSED",
    "SUPPORTED_ARCHITECTURES",
    "AttentionNames",
    "RefusedFamily",
    "SourceFamily",
    "accepted_architecture",
    "family_of",
]
