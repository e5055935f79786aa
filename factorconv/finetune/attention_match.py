"""Layer-local attention distillation: every student attention block is run a second time on the input the
teacher's attention of the same layer saw, and its output is pulled towards the teacher attention's output.

The logit KL reaches a layer's new factors only through every layer above it, and the residual-stream term
(`hidden_weight`) compares outputs that already differ by the errors of the layers below. Fed the teacher's own
input, each converted attention is trained on exactly the map it replaces, on every healing token: the
calibration-time refinement's objective, with the healing data instead of the calibration set.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import FactorConvError


def _attention_blocks(model: nn.Module, what: str) -> list[nn.Module]:
    """Every decoder layer's `self_attn`, in layer order (the names trainable_modules trains)."""
    blocks = [module for name, module in model.named_modules() if name.endswith("self_attn")]
    if not blocks:
        raise FactorConvError(f"the {what} ({type(model).__name__}) has no 'self_attn' modules; "
                              "--attention-weight needs a decoder with attention blocks named self_attn")
    return blocks


def _first_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """The hidden states an attention block was called with (first positional or `hidden_states=`), and the rest."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


class AttentionMatch:
    """Forward hooks on both models; inside `collect()` a teacher forward followed by a student forward leaves
    `error()`: the mean over layers of ‖attn_s(x_t) − attn_t(x_t)‖² / ‖attn_t(x_t)‖², x_t the teacher's input."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        student_blocks = _attention_blocks(student, "model")
        teacher_blocks = _attention_blocks(teacher, "teacher")
        if len(student_blocks) != len(teacher_blocks):
            raise FactorConvError(
                f"the model has {len(student_blocks)} attention blocks and the teacher {len(teacher_blocks)}: "
                "--attention-weight pairs them layer by layer; give the model's own source as --teacher"
            )
        self._active = False
        self._inside = False
        self._teacher: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._errors: list[torch.Tensor] = []
        self._handles = [
            block.register_forward_hook(self._teacher_hook(i), with_kwargs=True)
            for i, block in enumerate(teacher_blocks)
        ] + [block.register_forward_hook(self._student_hook(i), with_kwargs=True)
             for i, block in enumerate(student_blocks)]

    def _teacher_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if self._active:
                self._teacher[layer] = (_first_input(args, kwargs)[0].detach(), output[0].detach())
        return hook

    def _student_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            # Only in the training forward: not while evaluating, nor when checkpointing recomputes the layer.
            if not self._active or self._inside or not torch.is_grad_enabled() or layer not in self._teacher:
                return
            source_in, source_out = self._teacher.pop(layer)
            _, rest, rest_kwargs = _first_input(args, kwargs)
            self._inside = True
            try:
                local = module.forward(source_in, *rest, **rest_kwargs)[0]
            finally:
                self._inside = False
            target = source_out.float()
            self._errors.append((local.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
        return hook

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Record the teacher's attention inputs and outputs and the student's matching errors of one micro-batch."""
        self._teacher.clear()
        self._errors.clear()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._teacher.clear()

    def error(self, device: torch.device) -> torch.Tensor:
        """Mean over layers of the last collect()'s relative errors (0 when none was recorded)."""
        errors, self._errors = self._errors, []
        return torch.stack(errors).mean() if errors else torch.zeros((), device=device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
