"""Healing by distillation: fine-tune a converted model against its source with accelerate.

`finetune(FinetuneOptions(model=..., output=..., data=[...]))` trains the chosen weights on
KL(teacher ‖ student) (+ optional CE) and writes the healed model like a conversion output. Runs as plain
`python` on one device and under `accelerate launch` / `torchrun` on many (DDP, or FSDP via a config).
"""

from .options import FinetuneOptions
from .pipeline import finetune

__all__ = ["FinetuneOptions", "finetune"]
