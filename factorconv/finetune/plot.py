"""The loss / eval-perplexity curves of a run, as a PNG beside its metrics JSONL."""

import json
import logging
from pathlib import Path

logger = logging.getLogger("factorconv")
CURVES_FILE = "finetune_curves.png"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, folder: Path) -> Path | None:
    """Training loss (and its KL / CE parts) and eval perplexity against the step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", CURVES_FILE)
        return None
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_ppl" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    for key, style in (("loss", "-"), ("kl", "--"), ("ce", ":")):
        if train:
            left.plot(steps, [r[key] for r in train], style, label=key)
    left.set_xlabel("step")
    left.set_ylabel("training loss (per token)")
    left.set_yscale("log")
    left.grid(alpha=0.3)
    if train:
        left.legend()
    if evals:
        right.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-", label="model")
    teacher = [r["teacher_eval_ppl"] for r in rows if r.get("teacher_eval_ppl")]
    if teacher:
        right.axhline(teacher[0], color="gray", linestyle="--", label="teacher")
    right.set_xlabel("step")
    right.set_ylabel("eval perplexity")
    right.set_yscale("log")
    right.grid(alpha=0.3)
    if evals or teacher:
        right.legend()
    fig.tight_layout()
    out = folder / CURVES_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
