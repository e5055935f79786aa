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
from .trainable import attention_blocks


def _blocks(model: nn.Module, what: str) -> list[nn.Module]:
    blocks = list(attention_blocks(model).values())
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
    """Forward hooks on both models; inside `collect()`, a teacher forward and then a student forward record each
    layer's teacher attention input and output and the student block's call; `error()` then runs every student
    block on the teacher's input: the mean over layers of ‖attn_s(x_t) − attn_t(x_t)‖² / ‖attn_t(x_t)‖².

    The second passes run after the student's forward, outside any activation checkpoint (a checkpointed layer
    must save the same tensors when it is recomputed); FSDP is refused in build_models for the same reason."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        student_blocks = _blocks(student, "model")
        teacher_blocks = _blocks(teacher, "teacher")
        if len(student_blocks) != len(teacher_blocks):
            raise FactorConvError(
                f"the model has {len(student_blocks)} attention blocks and the teacher {len(teacher_blocks)}: "
                "--attention-weight pairs them layer by layer; give the model's own source as --teacher"
            )
        self._active = False
        self._teacher: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._calls: dict[int, tuple[nn.Module, tuple, dict]] = {}
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
            # Only the training forward: not evaluation, nor a checkpointed layer's recomputation in backward.
            if self._active and torch.is_grad_enabled():
                _, rest, rest_kwargs = _first_input(args, kwargs)
                self._calls[layer] = (module, rest, rest_kwargs)
        return hook

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Record one micro-batch's teacher attention inputs and outputs and the student's block calls."""
        self._teacher.clear()
        self._calls.clear()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._teacher.clear()
            self._calls.clear()

    def error(self, device: torch.device) -> torch.Tensor:
        """Mean over the recorded layers of the relative error (0 when none was recorded); call it inside
        collect() and the student's autocast. `module.forward` skips the block's own hooks, so the second
        passes are not recorded again."""
        errors = []
        for layer in sorted(self._calls.keys() & self._teacher.keys()):
            module, rest, kwargs = self._calls.pop(layer)
            source_in, source_out = self._teacher[layer]
            local = module.forward(source_in, *rest, **kwargs)[0]
            target = source_out.float()
            errors.append((local.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
        return torch.stack(errors).mean() if errors else torch.zeros((), device=device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
