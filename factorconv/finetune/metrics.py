"""The run's metrics log: one JSON line per step in OUTPUT (read by plot.py, `run` and the benchmarks)."""

import json
from pathlib import Path

METRICS_FILE = "finetune_metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "step_seconds", "seconds")  # the record keys that differ between equal runs


def metrics_path(folder: Path) -> Path:
    return folder / METRICS_FILE


def append_metrics(folder: Path, record: dict) -> None:
    with metrics_path(folder).open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(folder: Path, step: int) -> None:
    """Drop lines past the checkpoint we resume from (the interrupted run may have logged further)."""
    path = metrics_path(folder)
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
