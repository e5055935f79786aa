"""finetune(): distillation healing of a converted model with accelerate (one process, DDP or FSDP).

One run: check the inputs and OUTPUT, load student + frozen teacher, tokenize and pack the data (on the main
process, cached in OUTPUT), train (loop.py), and write the healed model like a conversion output (output.py),
moved into place only when complete.
"""

import hashlib
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..errors import FactorConvError
from ..output_folder import publish, unwritable
from .accelerator import make_accelerator, reset_accelerate_state
from .checkpoints import options_record, resume
from .loop import LoopResult, train
from .metrics import append_metrics, metrics_path
from .models import build_models
from .options import FinetuneOptions
from .output import write_outputs
from .perplexity import perplexity
from .plot import plot_curves
from .setup import find_data, load_data, prepare_output, resolve_inputs, with_default_lr
from .state import Inputs, Training

if TYPE_CHECKING:  # accelerate is imported when a run starts, not with the options
    from accelerate import Accelerator

logger = logging.getLogger("factorconv")


def _checksum(parameters: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, param in parameters:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def replica_checksums(training: Training) -> list[str] | None:
    """One digest of the trained weights per process: equal when gradients were synchronised (not FSDP)."""
    from accelerate.utils import DistributedType, gather_object

    acc = training.accelerator
    if acc.distributed_type == DistributedType.FSDP:
        return None
    model = acc.unwrap_model(training.models.student)
    mine = _checksum([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return gather_object([mine]) if acc.num_processes > 1 else [mine]


def measure_before(training: Training) -> dict:
    """Eval perplexity of the student (and teacher) before training, logged as step 0."""
    o, acc, models, blocks = training.options, training.accelerator, training.models, training.data.split.eval
    before = {"model_ppl": perplexity(models.student, blocks, o.batch_size, acc)}
    if models.teacher is not None:
        before["teacher_ppl"] = perplexity(models.teacher, blocks, o.batch_size, acc)
    record = {"step": 0, "tokens": 0, "eval_ppl": before["model_ppl"]}
    record["eval_loss"] = math.log(record["eval_ppl"])
    if "teacher_ppl" in before:
        record["teacher_eval_ppl"] = before["teacher_ppl"]
    if acc.is_main_process:
        append_metrics(training.folders.work, record)
    return before


def run_summary(
    training: Training, inputs: Inputs, before: dict, result: LoopResult, checksums: list[str] | None
) -> dict:
    """What the run did, as finetune_summary.json (and the report's `finetune` record) hold it."""
    o, acc, data, models = training.options, training.accelerator, training.data, training.models
    return {
        "model": o.model,
        "teacher": inputs.teacher_name if models.teacher is not None else None,
        "steps": data.total,
        "tokens": data.total * data.tokens_per_step,
        "tokens_per_step": data.tokens_per_step,
        "seq_len": inputs.seq_len,
        "processes": acc.num_processes,
        "mixed_precision": str(acc.mixed_precision),
        "trainable_parameters": models.trainable_count,
        "parameters": models.total_count,
        "train_blocks": int(data.split.train.shape[0]),
        "eval": {
            "data": data.eval_description,
            "tokens": int(data.split.eval.numel()),
            "teacher_ppl": before.get("teacher_ppl"),
            "before_ppl": before.get("model_ppl"),
            "after_ppl": result.final_ppl,
        },
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / result.seconds if result.seconds else None,
        "replica_checksums": checksums,
        "replicas_identical": None if checksums is None else len(set(checksums)) == 1,
        "options": options_record(o),
    }


def describe(training: Training, inputs: Inputs, start: int, progress: bool) -> None:
    """Three lines on what is about to train, logged (and shown above the progress bar)."""
    o, acc, data, models = training.options, training.accelerator, training.data, training.models
    lines = [
        f"healing {o.model}: {models.trainable_count:,} of {models.total_count:,} parameters train ({o.trainable}"
        + (f" + LoRA r={o.lora_r} on {','.join(o.lora_targets)}" if o.lora_r else "")
        + ")",
        f"{data.total} steps × {data.tokens_per_step:,} tokens at peak lr {o.lr:.2e} ({acc.num_processes} "
        f"process(es), {acc.device}, mixed precision {acc.mixed_precision})"
        + (f", resuming at step {start}" if start else ""),
        f"data: {data.split.train.shape[0]:,} blocks of {inputs.seq_len}; eval: {data.eval_description}",
    ]
    for line in lines:
        logger.info(line)
    if progress:
        for line in lines:
            tqdm.write(line)


def _heal(options: FinetuneOptions, accelerator: "Accelerator", progress: bool) -> Path:
    """The stages in order; a failure before the first step removes the folder this run created."""
    main = accelerator.is_main_process
    inputs = resolve_inputs(options, accelerator)
    options = with_default_lr(options, inputs.config)
    sources = find_data(options)
    folders = prepare_output(options, inputs, accelerator)
    try:
        data = load_data(options, inputs, sources, folders, accelerator)
        models = build_models(options, inputs, accelerator)
        training = Training(options=options, accelerator=accelerator, folders=folders, data=data, models=models)
        start, before = resume(training)
    except FactorConvError:
        if folders.created and main:
            shutil.rmtree(folders.work, ignore_errors=True)
        raise
    if main:
        describe(training, inputs, start, progress)
    if start == 0:
        before = measure_before(training)
    result = train(training, start, before, progress)
    checksums = replica_checksums(training)
    state = accelerator.get_state_dict(models.student)
    summary = run_summary(training, inputs, before, result, checksums)
    if main:
        try:
            adapter = accelerator.unwrap_model(models.student) if options.save_adapter else None
            write_outputs(
                folders.work,
                folders.final.name,
                inputs.model,
                state,
                summary,
                dtype=models.output_dtype,
                lora_scaling=models.lora_scaling,
                max_shard_size=options.max_shard_size,
                model_type=getattr(inputs.config, "model_type", None),
                adapter=adapter,
            )
            plot_curves(metrics_path(folders.work), folders.work)
            if folders.work != folders.final:
                publish(folders.work, folders.final, overwrite=True)
        except OSError as err:  # the trained state is in the last checkpoint, if one was saved
            raise unwritable(folders.final, err) from None
    accelerator.wait_for_everyone()
    return folders.final


def finetune(options: FinetuneOptions, progress: bool = True) -> Path:
    """Heal `options.model` by distillation from its source; writes the result to `options.output`."""
    accelerator = make_accelerator(options)
    try:
        return _heal(options, accelerator, progress)
    finally:
        reset_accelerate_state(single_process=accelerator.num_processes == 1)
