"""Everything in an output folder besides the weights: config, modeling code, tokenizer, recipe, card."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..card import CARD_FILE, model_card, source_license
from ..evaluate.kv_cache import analytic_kv_bytes_per_token, source_kv_bytes_per_token
from ..kinds.layer import LayerReport
from ..modeling import FactorConvConfig
from ..output_folder import RECIPE_FILE, REPORT_FILE
from .conversion import ConversionPlan

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
MODELING_FILES = ("configuration_factorconv.py", "modeling_factorconv.py")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_modeling_files(folder: Path) -> None:
    """The self-contained configuration/modeling code that config.json's auto_map points at."""
    for name in MODELING_FILES:
        shutil.copy(MODELING_DIR / name, folder / name)


def copy_tokenizer_files(folder: Path, source_folder: Path) -> None:
    """Tokenizer, chat-template and generation files of `source_folder`, where it has them."""
    for name in TOKENIZER_FILES:
        if (source_folder / name).is_file():
            shutil.copy(source_folder / name, folder / name)


def write_artifacts(
    folder: Path, source_folder: Path, config: FactorConvConfig, plan: ConversionPlan, reports: list[LayerReport],
    seconds: dict[str, float],
) -> None:
    """`seconds`: wall time per conversion stage, kept in the report so users see what each option costs."""
    config.save_pretrained(folder)
    copy_modeling_files(folder)
    copy_tokenizer_files(folder, source_folder)
    (folder / RECIPE_FILE).write_text(plan.output.recipe)
    size = config.dtype.itemsize if hasattr(config.dtype, "itemsize") else 4
    report = {
        "source": plan.source,
        "attention": config.attention,
        "kv_bytes_per_token": {
            "source": source_kv_bytes_per_token(config, size),
            "converted": analytic_kv_bytes_per_token(config, size),
        },
        "refine_steps": plan.refine.steps,  # resolved: the defaults depend on calibration, budget and device
        "refine_batch": plan.refine.batch_size,
        "seconds": {stage: round(value, 3) for stage, value in seconds.items()},  # ms: tiny models convert in ms
        "layers": [asdict(r) for r in reports],
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    model_card(
        config, report, name=plan.output.folder.name, recipe=plan.output.recipe, license=source_license(source_folder)
    ).save(folder / CARD_FILE)
