"""Checkpoints in OUTPUT/.checkpoints: accelerate's state (trained weights, optimizer, RNG) plus the step, the
options and the before-training perplexities; and resuming from the newest one, refused when the options changed
what would be computed."""

import json
import logging
import shutil
from pathlib import Path

from ..errors import FactorConvError
from .metrics import metrics_path, truncate_metrics
from .options import RESUMABLE_CHANGES, FinetuneOptions
from .plot import plot_curves
from .state import Training

logger = logging.getLogger("factorconv")

CHECKPOINTS = ".checkpoints"
STATE_FILE = "trainer_state.json"


def saved_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in `root`, oldest first."""
    folder = root / CHECKPOINTS
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def options_record(options: FinetuneOptions) -> dict:
    """The options as saved in checkpoints, the summary and the recipe."""
    return options.model_dump(mode="json")


def _changed(saved: dict, now: dict) -> list[str]:
    return [
        f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(set(saved) | set(now))
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key)
    ]


def save_checkpoint(training: Training, step: int, before: dict) -> Path:
    """Write the checkpoint after `step` (staged, then renamed), keep the newest few and redraw the curves."""
    acc, out, options = training.accelerator, training.folders.work, training.options
    main = acc.is_main_process
    root = out / CHECKPOINTS
    final, partial = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
    if main:
        for folder in (final, partial):
            shutil.rmtree(folder, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    acc.wait_for_everyone()
    if main:
        state = {
            "step": step,
            "tokens": step * training.data.tokens_per_step,
            "world_size": acc.num_processes,
            "before": before,
            "options": options_record(options),
        }
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        partial.rename(final)
        for old in saved_checkpoints(out)[: -options.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        plot_curves(metrics_path(out), out)
    acc.wait_for_everyone()
    return final


def resume(training: Training) -> tuple[int, dict]:
    """(step to start from, before-training perplexities): (0, {}) and a fresh metrics log, or with --resume the
    newest checkpoint's, its state loaded and the log cut back to it."""
    acc, out, options = training.accelerator, training.folders.work, training.options
    main = acc.is_main_process
    found = saved_checkpoints(out) if options.resume else []
    if not found:
        if options.resume and main:
            logger.warning("no checkpoint in %s to resume from: training starts at step 0", out)
        if main:
            metrics_path(out).unlink(missing_ok=True)
        acc.wait_for_everyone()
        return 0, {}
    latest = found[-1]
    state = json.loads((latest / STATE_FILE).read_text())
    saved, now = state["options"], options_record(options)
    # Another split of the same global batch (processes × accumulation) reads the same blocks in the
    # same order (BlockSampler), so a checkpoint from N GPUs can go on with N× the accumulation on one.
    global_then = saved["batch_size"] * saved["grad_accum"] * state["world_size"]
    global_now = options.batch_size * options.grad_accum * acc.num_processes
    if global_then == global_now and saved["batch_size"] == now["batch_size"]:
        saved = {**saved, "grad_accum": now["grad_accum"]}
    changed = _changed(saved, now)
    if changed:
        raise FactorConvError(
            f"cannot resume {out}: it was started with other options ({'; '.join(changed)}); "
            "use the same options or --overwrite"
        )
    if global_then != global_now:
        raise FactorConvError(
            f"cannot resume {out}: it was trained on {state['world_size']} processes × "
            f"{saved['grad_accum']} accumulation; keep processes × --grad-accum the same"
        )
    acc.load_state(str(latest), strict=False)
    if main:
        truncate_metrics(out, state["step"])
    acc.wait_for_everyone()
    logger.info("resumed %s at step %d", out, state["step"])
    return int(state["step"]), state["before"]
