"""The training loop: optimizer steps with gradient accumulation, clipping and the lr schedule, one metrics line
per step, evaluation, checkpoints every `save_every` steps, and a clean stop on SIGINT/SIGTERM (checkpoint at the
end of the step, then a one-line error saying how to go on)."""

import contextlib
import math
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from tqdm.auto import tqdm

from ..errors import FactorConvError
from .checkpoints import save_checkpoint
from .loss import distillation_loss
from .metrics import append_metrics
from .perplexity import perplexity
from .schedule import lr_at
from .state import Training

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the step and stops. A second one aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepStats(NamedTuple):
    """One optimizer step, averaged over processes; `stop`: some process was asked to stop."""

    loss: float
    kl: float
    ce: float
    hidden: float
    attention: float
    grad_norm: float
    stop: bool


@dataclass(frozen=True)
class LoopResult:
    """What the summary reports of the loop (a resumed run counts only its own session's time and tokens)."""

    final_ppl: float  # eval perplexity of the trained student
    seconds: float  # inside training steps (evaluation excluded)
    tokens: int


def clip_gradients(accelerator: "Accelerator", params: tuple[torch.nn.Parameter, ...], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0: no clipping) and return it as a plain tensor: under FSDP2 some accelerate
    releases return it as a DTensor, which must be gathered before it joins the other step statistics."""
    grad_norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    return grad_norm


def train_step(training: Training, step: int, stop: StopRequest) -> StepStats:
    """One optimizer step over `grad_accum` micro-batches (gradients synchronised on the last one)."""
    o, acc, models, data = training.options, training.accelerator, training.models, training.data
    rank = acc.process_index
    sums = torch.zeros(5, device=acc.device)
    match = models.attention_match
    for micro in range(o.grad_accum):
        ids = data.split.train[data.sampler.indices(step, micro, rank)].to(acc.device, non_blocking=True)
        sync = micro == o.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(models.student):
            teacher_out, layers = None, o.hidden_weight > 0
            with match.collect() if match is not None else contextlib.nullcontext():
                if models.teacher is not None:
                    with torch.no_grad(), acc.autocast():
                        teacher_out = models.teacher(input_ids=ids, use_cache=False, output_hidden_states=layers)
                with acc.autocast():
                    student_out = models.student(input_ids=ids, use_cache=False, output_hidden_states=layers)
                    local = match.error(acc.device) if match is not None else None
            # hidden_states: the embedding, then every decoder layer's output (the last one through the final norm)
            hidden = (student_out.hidden_states[1:], teacher_out.hidden_states[1:]) if layers else None
            parts = distillation_loss(
                student_out.logits, teacher_out.logits if teacher_out is not None else None, ids,
                o.kl_weight, o.ce_weight, o.temperature, hidden, o.hidden_weight, local, o.attention_weight,
            )
            acc.backward(parts.loss / o.grad_accum)
        sums += torch.stack([parts.loss.detach(), parts.kl, parts.ce, parts.hidden, parts.attention])
        del teacher_out, student_out, hidden, local, parts
    for group in models.optimizer.param_groups:
        group["lr"] = lr_at(step, o, data.total, data.warmup) * group["lr_scale"]
    grad_norm = clip_gradients(acc, models.params, o.max_grad_norm)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=acc.device)
    stats = torch.cat([sums / o.grad_accum, grad_norm.detach().float().reshape(1), flag])
    stats = acc.reduce(stats.float(), reduction="sum")
    loss, kl, ce, matched, local, norm = (stats[:6] / acc.num_processes).tolist()
    return StepStats(loss, kl, ce, matched, local, norm, bool(stats[6]))


def _stopped(training: Training, stop: StopRequest, done: int, where: Path) -> FactorConvError:
    """The one-line error of a stopped run, after dropping what an --overwrite run wrote (it cannot resume)."""
    folders, total = training.folders, training.data.total
    name = signal.Signals(stop.signal).name if stop.signal else "a signal on another process"
    if folders.work != folders.final:
        if training.accelerator.is_main_process:
            shutil.rmtree(folders.work, ignore_errors=True)
        return FactorConvError(
            f"stopped by {name} after step {done} of {total}; {folders.final} still holds the "
            "previous model; run again with --overwrite to replace it"
        )
    return FactorConvError(
        f"stopped by {name} after step {done} of {total}; checkpoint saved in {where}; "
        "run again with --resume to continue"
    )


def train(training: Training, start: int, before: dict, progress: bool) -> LoopResult:
    """Train from step `start` to the last; `before` (the before-training perplexities) goes into checkpoints."""
    o, acc, data, student = training.options, training.accelerator, training.data, training.models.student
    main, out = acc.is_main_process, training.folders.work
    with StopRequest() as stop, warnings.catch_warnings():
        # DDP notes that einsum gives small factor gradients another stride than its bucket: harmless.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        bar = tqdm(total=data.total, initial=start, desc="healing", unit="step", disable=not (progress and main))
        seconds_total, tokens_total = 0.0, 0
        for step in range(start, data.total):
            began = time.perf_counter()
            stats = train_step(training, step, stop)
            seconds = time.perf_counter() - began
            seconds_total += seconds
            tokens_total += data.tokens_per_step
            done = step + 1
            record = {
                "step": done,
                "loss": stats.loss,
                "kl": stats.kl,
                "ce": stats.ce,
                **({"hidden": stats.hidden} if o.hidden_weight > 0 else {}),
                **({"attention": stats.attention} if o.attention_weight > 0 else {}),
                "lr": lr_at(step, o, data.total, data.warmup),
                "grad_norm": stats.grad_norm,
                "tokens": done * data.tokens_per_step,
                "epoch": data.sampler.epoch(done),
                "tokens_per_s": data.tokens_per_step / seconds,
                "step_seconds": seconds,
            }
            if done == data.total or (o.eval_every and done % o.eval_every == 0):
                record["eval_ppl"] = perplexity(student, data.split.eval, o.batch_size, acc)
                record["eval_loss"] = math.log(record["eval_ppl"])
            if main:
                append_metrics(out, record)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            if stats.stop or (o.save_every and (done % o.save_every == 0 or done == data.total)):
                where = save_checkpoint(training, done, before)
            if stats.stop:
                bar.close()
                raise _stopped(training, stop, done, where)
        bar.close()
        if start == data.total:  # resumed a finished run: nothing to train, measure the result again
            final_ppl = perplexity(student, data.split.eval, o.batch_size, acc)
        else:
            final_ppl = record["eval_ppl"]
    return LoopResult(final_ppl=final_ppl, seconds=seconds_total, tokens=tokens_total)
