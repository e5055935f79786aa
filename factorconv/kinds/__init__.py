"""The target kinds, one module each; a new kind is its module, its line here and its modeling class."""

from .base import Geometry, TargetKind, TargetSpec
from .mfa import MFA
from .mfa_kr import MFA_KR
from .tpa import TPA

KINDS: dict[str, TargetKind] = {kind.name: kind for kind in (TPA, MFA, MFA_KR)}
# Every ConvertOptions field that belongs to one kind (or two: query_rank), in the registry's order.
KIND_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(name for kind in KINDS.values() for name in kind.options))
REFINE_DEFAULTS_TEXT = "; ".join(f"{k.name} {k.refine_lr:g} {k.refine_schedule}" for k in KINDS.values())

__all__ = ["KINDS", "KIND_OPTIONS", "REFINE_DEFAULTS_TEXT", "Geometry", "TargetKind", "TargetSpec"]
