"""finetune(): distillation healing of a converted model with accelerate (one process, DDP or FSDP).

One run: check OUTPUT and the options, load student + frozen teacher, tokenize and pack the data (on the main
process, cached in OUTPUT), train with gradient accumulation, clipping and a warmup + cosine schedule, save
accelerate checkpoints (trainable weights, optimizer, RNG) every `save_every` steps and on SIGINT/SIGTERM, log
one JSON line per step, and finally write the healed model like a conversion output.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data import check_token_ids
from ..dtypes import DTYPES
from ..errors import FactorConvError
from ..model_folder import resolve_source
from ..output_folder import check_output_path, publish, refuse_foreign, unwritable
from . import data as data_lib
from .loss import distillation_loss
from .options import RESUMABLE_CHANGES, FinetuneOptions, default_lr
from .output import write_outputs
from .plot import plot_curves
from .trainable import select_trainable, trainable_modules, wrap_lora

logger = logging.getLogger("factorconv")

CHECKPOINTS = ".checkpoints"
TOKEN_CACHE = ".token_cache"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "finetune_metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "step_seconds", "seconds")


def lr_at(step: int, options: FinetuneOptions, total: int, warmup: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine down to lr × min_lr_ratio."""
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = options.lr * options.min_lr_ratio
    return floor + (options.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def default_warmup(total: int) -> int:
    return int(0.05 * total)


# --- set-up helpers ----------------------------------------------------------------------------------------------


def _accelerator(options: FinetuneOptions):
    from accelerate import Accelerator

    has_cuda = torch.cuda.is_available()
    has_mps = torch.backends.mps.is_available()
    if options.device == "cuda" and not has_cuda:
        raise FactorConvError("device cuda is not available here; use --device cpu or auto")
    if options.device == "mps" and not has_mps:
        raise FactorConvError("device mps is not available here; use --device cpu or auto")
    cpu = options.device == "cpu" or (options.device == "auto" and not has_cuda and not has_mps)
    precision = options.mixed_precision
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None  # `accelerate launch --mixed_precision` / its config file decides
        elif not cpu and has_cuda and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "no"
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # each would train alone, and all write OUTPUT
        raise FactorConvError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); check the accelerate config / --device"
        )
    return accelerator


def _resolve_model(name: str, revision: str | None, what: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FactorConvError(f"{what} {name} has no config.json; pass a Hugging Face model folder")
        return path
    return resolve_source(name, revision)  # a Hub id (or a clear error)


def _config(folder: Path, what: str):
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise FactorConvError(f"cannot read the {what} config in {folder}: {str(err).splitlines()[0]}") from None


def _load(folder: Path, dtype: torch.dtype, what: str):
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as err:
        raise FactorConvError(f"cannot load the {what} from {folder}: {str(err).splitlines()[0]}") from None


def _tokenizer(*folders: Path):
    for folder in folders:
        if folder is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            continue
    return None


def _on_main_then_all(accelerator, build):
    """Run `build()` on the main process first, then on the others (which read what it cached).

    A FactorConvError on the main process is re-raised on every process instead of leaving them at a barrier.
    """
    from accelerate.utils import broadcast_object_list

    error = None
    result = None
    if accelerator.is_main_process:
        try:
            result = build()
        except FactorConvError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error is not None:
        raise FactorConvError(error)
    if not accelerator.is_main_process:
        result = build()
    return result


def _checkpoints(root: Path) -> list[Path]:
    folder = root / CHECKPOINTS
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _options_dump(options: FinetuneOptions) -> dict:
    return options.model_dump(mode="json")


def _changed(saved: dict, now: dict) -> list[str]:
    return [
        f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(set(saved) | set(now))
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key)
    ]


def _checksum(parameters: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, param in parameters:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the step and stops. A second one aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequest":
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


# --- the run -----------------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, options: FinetuneOptions, progress: bool) -> None:
        self.options, self.progress = options, progress
        self.out = self.final_out = Path(options.output).expanduser()  # out: where this run writes
        self.accelerator = _accelerator(options)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index

    # -- preparation --------------------------------------------------------------------------------------------

    def check_output(self) -> None:
        o, out = self.options, self.out
        check_output_path(out, [self.model_folder] + ([self.teacher_folder] if self.teacher_folder else []))
        used = out.is_dir() and any(out.iterdir())
        if used and not (o.resume or o.overwrite):
            raise FactorConvError(
                f"output folder {out} exists; pass --resume to continue its training or --overwrite to replace it"
            )
        refuse_foreign(out)
        # A run that fails before its first step removes what it created (not a folder it resumes).
        self.created = not used or o.overwrite
        if used and o.overwrite:
            # The previous result stays whole until this run's is complete: train beside it, swap at the end.
            self.out = out.parent / f".{out.name}.partial-overwrite"
        self.accelerator.wait_for_everyone()
        if self.main:
            if self.out != out:
                shutil.rmtree(self.out, ignore_errors=True)  # an interrupted --overwrite run's
            self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()

    def resolve_models(self) -> None:
        o = self.options
        self.model_folder = _on_main_then_all(self.accelerator, lambda: _resolve_model(o.model, o.revision, "model"))
        self.config = _config(self.model_folder, "model")
        if o.lr is None:  # resolved here, so what is saved and compared on --resume says what ran
            self.options = o = o.model_copy(update={"lr": default_lr(o.trainable, self.config.hidden_size)})
        self.teacher_name = o.teacher or getattr(self.config, "source_model", None)
        self.teacher_folder = None
        if o.uses_teacher:
            if not self.teacher_name:
                raise FactorConvError(f"{o.model} records no source model to distill from; pass --teacher SOURCE")
            revision = o.teacher_revision if o.teacher else getattr(self.config, "source_revision", None)
            recorded = "" if o.teacher else f" (the source recorded in {o.model}/config.json)"
            try:
                self.teacher_folder = _on_main_then_all(
                    self.accelerator, lambda: _resolve_model(self.teacher_name, revision, "teacher")
                )
            except FactorConvError as err:
                message = f"teacher {self.teacher_name}{recorded} not usable: {err}; pass --teacher"
                raise FactorConvError(message) from None
            teacher_config = _config(self.teacher_folder, "teacher")
            if teacher_config.vocab_size != self.config.vocab_size:
                raise FactorConvError(
                    f"teacher {self.teacher_name} has a vocabulary of {teacher_config.vocab_size} tokens but "
                    f"{o.model} has {self.config.vocab_size}; pass the model it was converted from as --teacher"
                )
        context = self.config.max_position_embeddings
        self.seq_len = o.seq_len or min(context, 2048)
        if self.seq_len > context:
            raise FactorConvError(f"--seq-len {self.seq_len} exceeds the model's context of {context} tokens")
        if self.teacher_folder is not None:
            teacher_context = teacher_config.max_position_embeddings
            if self.seq_len > teacher_context:
                raise FactorConvError(
                    f"--seq-len {self.seq_len} exceeds the teacher's context of {teacher_context} tokens"
                )

    def find_data(self) -> None:
        o = self.options
        self.train_sources = data_lib.resolve_sources(o.data)
        self.eval_sources = data_lib.resolve_sources([o.eval_data]) if o.eval_data else None

    def load_data(self) -> None:
        o = self.options
        tokenizer = _tokenizer(self.model_folder, self.teacher_folder)
        train_sources, eval_sources = self.train_sources, self.eval_sources
        cache = self.out / TOKEN_CACHE
        self.tokens_per_step = o.batch_size * o.grad_accum * self.world * self.seq_len
        planned = o.tokens or (o.steps * self.tokens_per_step if o.steps else None)
        train_cap = None  # datasets names stream only what the run needs (files are read whole)
        if planned is not None:
            held_out = 0 if eval_sources else o.eval_tokens
            train_cap = math.ceil(planned / (1 - o.eval_fraction)) + held_out + self.seq_len
        eval_cap = o.eval_tokens + self.seq_len

        def build(sources, cap):
            key = data_lib.fingerprint(sources, tokenizer, extra=f"{o.dataset_split}:{cap}")
            return lambda: data_lib.cached_stream(
                cache, key, lambda: data_lib.load_stream(sources, tokenizer, o.dataset_split, cap)
            )

        stream = _on_main_then_all(self.accelerator, build(train_sources, train_cap))
        eval_stream = _on_main_then_all(self.accelerator, build(eval_sources, eval_cap)) if eval_sources else None
        vocab = self.config.vocab_size
        for name, tokens in (("--data", stream), ("--eval-data", eval_stream)):
            if tokens is not None:
                check_token_ids(tokens, vocab, name)
        self.split = data_lib.split_blocks(stream, self.seq_len, eval_stream, o.eval_fraction, o.eval_tokens)
        blocks = self.split.train.shape[0]
        if o.batch_size > blocks:  # every micro-batch would repeat blocks, and memory grows with the batch
            raise FactorConvError(
                f"--batch-size {o.batch_size} is more than the {blocks} training blocks of {self.seq_len} tokens "
                f"in the data; pass --batch-size {blocks} or less, or more data"
            )
        self.sampler = data_lib.BlockSampler(self.split.train.shape[0], o.batch_size, o.grad_accum, self.world, o.seed)
        per_step = o.batch_size * o.grad_accum * self.world
        if self.split.train.shape[0] < per_step:
            logger.warning(
                "only %d training blocks for %d per step: blocks repeat within a step; give more data or a smaller "
                "batch", self.split.train.shape[0], per_step,
            )
        if o.steps is not None:
            self.total = o.steps
        elif o.tokens is not None:
            self.total = math.ceil(o.tokens / self.tokens_per_step)
        else:
            self.total = self.sampler.steps_per_epoch()
        self.warmup = o.warmup if o.warmup is not None else default_warmup(self.total)
        names = ", ".join(Path(d).name for d in o.data)
        if self.split.held_out:
            self.eval_description = f"{names} (last {self.split.eval.shape[0]} blocks, held out)"
        else:
            self.eval_description = Path(o.eval_data).name
        self.eval_tokens = int(self.split.eval.numel())

    def build_models(self) -> None:
        from accelerate.utils import set_seed

        o, acc = self.options, self.accelerator
        set_seed(o.seed)
        dtype = DTYPES[o.dtype]
        saved = getattr(self.config, "dtype", None)
        self.output_dtype = DTYPES.get(saved, saved) if isinstance(saved, str) else saved
        if self.output_dtype not in DTYPES.values():
            self.output_dtype = torch.float32
        student = _load(self.model_folder, dtype, "model")
        student.config.use_cache = False
        modules = trainable_modules(student, o.trainable)
        if o.grad_checkpointing:
            if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.23
                student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if o.lora_r is not None:
            with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                student = wrap_lora(student, o, modules)
            self.lora_scaling = (o.lora_alpha or 2 * o.lora_r) / o.lora_r
        else:
            select_trainable(student, modules)
            self.lora_scaling = None
        self.trainable_count = sum(p.numel() for p in student.parameters() if p.requires_grad)
        self.total_count = sum(p.numel() for p in student.parameters())
        student.to(acc.device).train()
        decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = acc.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=o.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None
        )
        self.student, self.optimizer = acc.prepare(student, optimizer)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.teacher = None
        if self.teacher_folder is not None:
            teacher = _load(self.teacher_folder, dtype, "teacher")
            teacher.config.use_cache = False
            self.teacher = teacher.requires_grad_(False).eval().to(acc.device)
        # Checkpoints hold only the trained weights (the frozen ones are re-read from MODEL on resume).
        acc.register_save_state_pre_hook(self._keep_trainable)

    @staticmethod
    def _keep_trainable(models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            keep = {name for name, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in keep]:
                del state[key]

    # -- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def perplexity(self, model) -> float:
        """exp(mean NLL) of tokens 2..L of every eval block; blocks are spread over processes and summed.

        Every process runs the same number of forward passes (padding with zero-weight blocks), as FSDP needs.
        """
        blocks, batch = self.split.eval, self.options.batch_size
        mine = list(range(self.rank, blocks.shape[0], self.world))
        per_rank = math.ceil(blocks.shape[0] / self.world)
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for start in range(0, per_rank, batch):
            chosen = mine[start : start + batch]
            weight = [1.0] * len(chosen) + [0.0] * (min(batch, per_rank - start) - len(chosen))
            chosen = chosen + [0] * (len(weight) - len(chosen))
            ids = blocks[chosen].to(self.accelerator.device)
            with self.accelerator.autocast():
                logits = model(input_ids=ids, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
            ).sum(-1)
            w = torch.tensor(weight, dtype=torch.float64, device=nll.device)
            totals[0] += (nll.double() * w).sum()
            totals[1] += w.sum() * (ids.shape[1] - 1)
        totals = self.accelerator.reduce(totals, reduction="sum")
        if was_training:
            model.train()
        return math.exp(float(totals[0] / totals[1]))

    # -- checkpoints and metrics ----------------------------------------------------------------------------------

    def _metrics_path(self) -> Path:
        return self.out / METRICS_FILE

    def _append_metrics(self, record: dict) -> None:
        if self.main:
            with self._metrics_path().open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines past the checkpoint we resume from (the interrupted run may have logged further)."""
        path = self._metrics_path()
        if self.main and path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        root = self.out / CHECKPOINTS
        final, partial = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
        if self.main:
            for folder in (final, partial):
                shutil.rmtree(folder, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if self.main:
            state = {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "world_size": self.world,
                "before": self.before,
                "options": _options_dump(self.options),
            }
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            partial.rename(final)
            for old in _checkpoints(self.out)[: -self.options.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            plot_curves(self._metrics_path(), self.out)
        acc.wait_for_everyone()
        return final

    def maybe_resume(self) -> int:
        """The step to start from: 0, or that of OUTPUT's newest checkpoint (state loaded) with --resume."""
        self.before: dict = {}
        found = _checkpoints(self.out) if self.options.resume else []
        if not found:
            if self.options.resume and self.main:
                logger.warning("no checkpoint in %s to resume from: training starts at step 0", self.out)
            if self.main:
                self._metrics_path().unlink(missing_ok=True)
            self.accelerator.wait_for_everyone()
            return 0
        latest = found[-1]
        state = json.loads((latest / STATE_FILE).read_text())
        saved, now = state["options"], _options_dump(self.options)
        # Another split of the same global batch (processes × accumulation) reads the same blocks in the
        # same order (BlockSampler), so a checkpoint from N GPUs can go on with N× the accumulation on one.
        global_then = saved["batch_size"] * saved["grad_accum"] * state["world_size"]
        if global_then == self.tokens_per_step // self.seq_len and saved["batch_size"] == now["batch_size"]:
            saved = {**saved, "grad_accum": now["grad_accum"]}
        changed = _changed(saved, now)
        if changed:
            raise FactorConvError(
                f"cannot resume {self.out}: it was started with other options ({'; '.join(changed)}); "
                "use the same options or --overwrite"
            )
        if global_then != self.tokens_per_step // self.seq_len:
            raise FactorConvError(
                f"cannot resume {self.out}: it was trained on {state['world_size']} processes × "
                f"{saved['grad_accum']} accumulation; keep processes × --grad-accum the same"
            )
        self.accelerator.load_state(str(latest), strict=False)
        self.before = state["before"]
        self._truncate_metrics(state["step"])
        self.accelerator.wait_for_everyone()
        logger.info("resumed %s at step %d", self.out, state["step"])
        return int(state["step"])

    # -- training -----------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> list[float]:
        o, acc = self.options, self.accelerator
        sums = torch.zeros(3, device=acc.device)
        for micro in range(o.grad_accum):
            ids = self.split.train[self.sampler.indices(step, micro, self.rank)].to(acc.device, non_blocking=True)
            sync = micro == o.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.student):
                teacher_logits = None
                if self.teacher is not None:
                    with torch.no_grad(), acc.autocast():
                        teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
                with acc.autocast():
                    student_logits = self.student(input_ids=ids, use_cache=False).logits
                parts = distillation_loss(
                    student_logits, teacher_logits, ids, o.kl_weight, o.ce_weight, o.temperature
                )
                acc.backward(parts.loss / o.grad_accum)
            sums += torch.stack([parts.loss.detach(), parts.kl, parts.ce])
            del teacher_logits, student_logits, parts
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, o, self.total, self.warmup)
        grad_norm = acc.clip_grad_norm_(self.params, o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stop = 1.0 if self.stop.signal is not None else 0.0
        flag = torch.tensor([stop], device=acc.device)
        stats = torch.cat([sums / o.grad_accum, grad_norm.detach().float().reshape(1), flag])
        stats = acc.reduce(stats.float(), reduction="sum")
        return (stats / self.world).tolist()[:4] + [float(stats[4])]

    def train(self, start: int) -> None:
        o = self.options
        bar = tqdm(
            total=self.total, initial=start, desc="healing", unit="step", disable=not (self.progress and self.main)
        )
        self.loop_seconds, self.loop_tokens = 0.0, 0
        for step in range(start, self.total):
            began = time.perf_counter()
            loss, kl, ce, grad_norm, stop = self.train_step(step)
            seconds = time.perf_counter() - began
            self.loop_seconds += seconds
            self.loop_tokens += self.tokens_per_step
            done = step + 1
            record = {
                "step": done,
                "loss": loss,
                "kl": kl,
                "ce": ce,
                "lr": lr_at(step, o, self.total, self.warmup),
                "grad_norm": grad_norm,
                "tokens": done * self.tokens_per_step,
                "epoch": self.sampler.epoch(done),
                "tokens_per_s": self.tokens_per_step / seconds,
                "step_seconds": seconds,
            }
            if done == self.total or (o.eval_every and done % o.eval_every == 0):
                record["eval_ppl"] = self.perplexity(self.student)
                record["eval_loss"] = math.log(record["eval_ppl"])
            self._append_metrics(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            if stop or (o.save_every and (done % o.save_every == 0 or done == self.total)):
                where = self.save_checkpoint(done)
            if stop:
                bar.close()
                name = signal.Signals(self.stop.signal).name if self.stop.signal else "a signal on another process"
                if self.out != self.final_out:  # an --overwrite run cannot be resumed: drop what it wrote
                    if self.main:
                        shutil.rmtree(self.out, ignore_errors=True)
                    raise FactorConvError(
                        f"stopped by {name} after step {done} of {self.total}; {self.final_out} still holds the "
                        "previous model; run again with --overwrite to replace it"
                    )
                raise FactorConvError(
                    f"stopped by {name} after step {done} of {self.total}; checkpoint saved in {where}; "
                    "run again with --resume to continue"
                )
        bar.close()
        if start == self.total:  # resumed a finished run: nothing to train, measure the result again
            self.final_ppl = self.perplexity(self.student)
        else:
            self.final_ppl = record["eval_ppl"]

    # -- the whole run ------------------------------------------------------------------------------------------

    def execute(self) -> Path:
        self.resolve_models()
        self.find_data()
        self.check_output()
        try:
            self.load_data()
            self.build_models()
            start = self.maybe_resume()
        except FactorConvError:
            if self.created and self.main:
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        if self.main:
            self.describe(start)
        if start == 0:
            self.before = {"model_ppl": self.perplexity(self.student)}
            if self.teacher is not None:
                self.before["teacher_ppl"] = self.perplexity(self.teacher)
            record = {"step": 0, "tokens": 0, "eval_ppl": self.before["model_ppl"]}
            record["eval_loss"] = math.log(record["eval_ppl"])
            if "teacher_ppl" in self.before:
                record["teacher_eval_ppl"] = self.before["teacher_ppl"]
            self._append_metrics(record)
        with _StopRequest() as self.stop, warnings.catch_warnings():
            # DDP notes that einsum gives small factor gradients another stride than its bucket: harmless.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.train(start)
        checksums = self.replica_checksums()
        state = self.accelerator.get_state_dict(self.student)
        summary = self.summary(checksums)
        if self.main:
            try:
                write_outputs(self, state, summary)
                plot_curves(self._metrics_path(), self.out)
                if self.out != self.final_out:
                    publish(self.out, self.final_out, overwrite=True)
            except OSError as err:  # the trained state is in the last checkpoint, if one was saved
                raise unwritable(self.final_out, err) from None
        self.accelerator.wait_for_everyone()
        return self.final_out

    def replica_checksums(self) -> list[str] | None:
        """One digest of the trained weights per process: equal when gradients were synchronised (not FSDP)."""
        from accelerate.utils import DistributedType, gather_object

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return None
        model = self.accelerator.unwrap_model(self.student)
        mine = _checksum([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        return gather_object([mine]) if self.world > 1 else [mine]

    def summary(self, checksums: list[str] | None) -> dict:
        o = self.options
        return {
            "model": o.model,
            "teacher": self.teacher_name if self.teacher is not None else None,
            "steps": self.total,
            "tokens": self.total * self.tokens_per_step,
            "tokens_per_step": self.tokens_per_step,
            "seq_len": self.seq_len,
            "processes": self.world,
            "mixed_precision": str(self.accelerator.mixed_precision),
            "trainable_parameters": self.trainable_count,
            "parameters": self.total_count,
            "train_blocks": int(self.split.train.shape[0]),
            "eval": {
                "data": self.eval_description,
                "tokens": self.eval_tokens,
                "teacher_ppl": self.before.get("teacher_ppl"),
                "before_ppl": self.before.get("model_ppl"),
                "after_ppl": self.final_ppl,
            },
            "seconds": self.loop_seconds,
            "tokens_per_s": self.loop_tokens / self.loop_seconds if self.loop_seconds else None,
            "replica_checksums": checksums,
            "replicas_identical": None if checksums is None else len(set(checksums)) == 1,
            "options": _options_dump(o),
        }

    def describe(self, start: int) -> None:
        o = self.options
        lines = [
            f"healing {o.model}: {self.trainable_count:,} of {self.total_count:,} parameters train ({o.trainable}"
            + (f" + LoRA r={o.lora_r} on {','.join(o.lora_targets)}" if o.lora_r else "")
            + ")",
            f"{self.total} steps × {self.tokens_per_step:,} tokens at peak lr {o.lr:.2e} ({self.world} process(es), "
            f"{self.accelerator.device}, mixed precision {self.accelerator.mixed_precision})"
            + (f", resuming at step {start}" if start else ""),
            f"data: {self.split.train.shape[0]:,} blocks of {self.seq_len}; eval: {self.eval_description}",
        ]
        for line in lines:
            logger.info(line)
        if self.progress:
            for line in lines:
                tqdm.write(line)

    def close(self) -> None:
        from accelerate.state import AcceleratorState, GradientState

        # Let a later finetune() in this process pick its own precision/device (single process only: a
        # distributed process group stays as it is).
        single = self.world == 1
        AcceleratorState._reset_state(reset_partial_state=single)
        GradientState._reset_state()


def finetune(options: FinetuneOptions, progress: bool = True) -> Path:
    """Heal `options.model` by distillation from its source; writes the result to `options.output`."""
    run = _Run(options, progress)
    try:
        return run.execute()
    finally:
        run.close()
