"""Set-up before training, one function a step: resolve the model and teacher, the lr, the data sources, the
output folder, then tokenize and pack the data. Each takes what it needs and returns a record (state.py).

What can be checked without touching OUTPUT (folders, configs, vocabularies, context, data sources) is checked
before OUTPUT is created.
"""

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig, PretrainedConfig

from ..data import check_token_ids, first_tokenizer
from ..errors import FactorConvError
from ..model_folder import resolve_source
from ..output_folder import check_output_path, refuse_foreign
from . import data as data_lib
from .accelerator import on_main_then_all
from .options import FinetuneOptions, default_lr
from .schedule import default_warmup
from .state import Folders, Inputs, TrainingData

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator

logger = logging.getLogger("factorconv")

TOKEN_CACHE = ".token_cache"
Sources = list[tuple[str, list[Path]]]


def _resolve_model(name: str, revision: str | None, what: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FactorConvError(f"{what} {name} has no config.json; pass a Hugging Face model folder")
        return path
    return resolve_source(name, revision)  # a Hub id (or a clear error)


def _config(folder: Path, what: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise FactorConvError(f"cannot read the {what} config in {folder}: {str(err).splitlines()[0]}") from None


def resolve_inputs(options: FinetuneOptions, accelerator: "Accelerator") -> Inputs:
    """The model, the teacher the loss needs (given, or the source recorded in the model's config) and the block
    length, checked against each other: same vocabulary, blocks within both contexts."""
    o = options
    model = on_main_then_all(accelerator, lambda: _resolve_model(o.model, o.revision, "model"))
    config = _config(model, "model")
    teacher_name, teacher, teacher_config = None, None, None
    if o.uses_teacher:
        teacher_name = o.teacher or getattr(config, "source_model", None)
        if not teacher_name:
            raise FactorConvError(f"{o.model} records no source model to distill from; pass --teacher SOURCE")
        revision = o.teacher_revision if o.teacher else getattr(config, "source_revision", None)
        recorded = "" if o.teacher else f" (the source recorded in {o.model}/config.json)"
        try:
            teacher = on_main_then_all(accelerator, lambda: _resolve_model(teacher_name, revision, "teacher"))
        except FactorConvError as err:
            raise FactorConvError(f"teacher {teacher_name}{recorded} not usable: {err}; pass --teacher") from None
        teacher_config = _config(teacher, "teacher")
        if teacher_config.vocab_size != config.vocab_size:
            raise FactorConvError(
                f"teacher {teacher_name} has a vocabulary of {teacher_config.vocab_size} tokens but "
                f"{o.model} has {config.vocab_size}; pass the model it was converted from as --teacher"
            )
    context = config.max_position_embeddings
    seq_len = o.seq_len or min(context, 2048)
    if seq_len > context:
        raise FactorConvError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens")
    if teacher_config is not None and seq_len > teacher_config.max_position_embeddings:
        raise FactorConvError(
            f"--seq-len {seq_len} exceeds the teacher's context of {teacher_config.max_position_embeddings} tokens"
        )
    return Inputs(model=model, config=config, teacher_name=teacher_name, teacher=teacher, seq_len=seq_len)


def with_default_lr(options: FinetuneOptions, config: PretrainedConfig) -> FinetuneOptions:
    """The options with an unset lr resolved for this model's width, so what is saved and compared on --resume
    says what ran."""
    if options.lr is not None:
        return options
    return options.model_copy(update={"lr": default_lr(options.trainable, config.hidden_size)})


def find_data(options: FinetuneOptions) -> tuple[Sources, Sources | None]:
    """The training and eval sources (files, or `datasets` names), found on every process."""
    train = data_lib.resolve_sources(options.data)
    held_out = data_lib.resolve_sources([options.eval_data]) if options.eval_data else None
    return train, held_out


def prepare_output(options: FinetuneOptions, inputs: Inputs, accelerator: "Accelerator") -> Folders:
    """Refuse an OUTPUT this run may not write, then create the folder it trains in."""
    final = Path(options.output).expanduser()
    check_output_path(final, [inputs.model] + ([inputs.teacher] if inputs.teacher else []))
    used = final.is_dir() and any(final.iterdir())
    if used and not (options.resume or options.overwrite):
        raise FactorConvError(
            f"output folder {final} exists; pass --resume to continue its training or --overwrite to replace it"
        )
    refuse_foreign(final)
    # The previous result stays whole until this run's is complete: train beside it, swap at the end.
    work = final.parent / f".{final.name}.partial-overwrite" if used and options.overwrite else final
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if work != final:
            shutil.rmtree(work, ignore_errors=True)  # an interrupted --overwrite run's
        work.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # A run that fails before its first step removes what it created (not a folder it resumes).
    return Folders(final=final, work=work, created=not used or options.overwrite)


def load_data(
    options: FinetuneOptions,
    inputs: Inputs,
    sources: tuple[Sources, Sources | None],
    folders: Folders,
    accelerator: "Accelerator",
) -> TrainingData:
    """Tokenize (on the main process, cached in the work folder), pack and split the data, and count the steps."""
    o, seq_len, world = options, inputs.seq_len, accelerator.num_processes
    train_sources, eval_sources = sources
    tokenizer = first_tokenizer(inputs.model, inputs.teacher)
    cache = folders.work / TOKEN_CACHE
    tokens_per_step = o.batch_size * o.grad_accum * world * seq_len
    planned = o.tokens or (o.steps * tokens_per_step if o.steps else None)
    train_cap = None  # datasets names stream only what the run needs (files are read whole)
    if planned is not None:
        held_out = 0 if eval_sources else o.eval_tokens
        train_cap = math.ceil(planned / (1 - o.eval_fraction)) + held_out + seq_len
    eval_cap = o.eval_tokens + seq_len

    def build(sources: Sources, cap: int | None):
        key = data_lib.fingerprint(sources, tokenizer, extra=f"{o.dataset_split}:{cap}")
        return lambda: data_lib.cached_stream(
            cache, key, lambda: data_lib.load_stream(sources, tokenizer, o.dataset_split, cap)
        )

    stream = on_main_then_all(accelerator, build(train_sources, train_cap))
    eval_stream = on_main_then_all(accelerator, build(eval_sources, eval_cap)) if eval_sources else None
    for name, tokens in (("--data", stream), ("--eval-data", eval_stream)):
        if tokens is not None:
            check_token_ids(tokens, inputs.config.vocab_size, name)
    split = data_lib.split_blocks(stream, seq_len, eval_stream, o.eval_fraction, o.eval_tokens)
    blocks = split.train.shape[0]
    if o.batch_size > blocks:  # every micro-batch would repeat blocks, and memory grows with the batch
        raise FactorConvError(
            f"--batch-size {o.batch_size} is more than the {blocks} training blocks of {seq_len} tokens "
            f"in the data; pass --batch-size {blocks} or less, or more data"
        )
    sampler = data_lib.BlockSampler(blocks, o.batch_size, o.grad_accum, world, o.seed)
    per_step = o.batch_size * o.grad_accum * world
    if blocks < per_step:
        logger.warning(
            "only %d training blocks for %d per step: blocks repeat within a step; give more data or a smaller "
            "batch", blocks, per_step,
        )
    if o.steps is not None:
        total = o.steps
    elif o.tokens is not None:
        total = math.ceil(o.tokens / tokens_per_step)
    else:
        total = sampler.steps_per_epoch()
    if split.held_out:
        names = ", ".join(Path(d).name for d in o.data)
        eval_description = f"{names} (last {split.eval.shape[0]} blocks, held out)"
    else:
        eval_description = Path(o.eval_data).name
    return TrainingData(
        split=split,
        sampler=sampler,
        tokens_per_step=tokens_per_step,
        total=total,
        warmup=o.warmup if o.warmup is not None else default_warmup(total),
        eval_description=eval_description,
    )
