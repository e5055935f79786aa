"""The model card (`README.md`) of an output folder, built with `huggingface_hub.ModelCard`.

Front matter for Hub search (base_model, library_name, pipeline_tag, tags, license when known); a body saying
what was done, the KV bytes per token before and after, perplexities before/after conversion and after
fine-tuning when measured, the conversion report's per-layer fields (whatever fields it has), a usage
snippet and the exact recipe.
"""

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .evaluate.kv_cache import analytic_kv_bytes_per_token, source_kv_bytes_per_token
from .hub import HUB_ID
from .kinds import KINDS
from .modeling import FactorConvConfig
from .output_folder import REPORT_FILE

logger = logging.getLogger("factorconv")

CARD_FILE = "README.md"
_PLACEHOLDER = "<this repo>"


@dataclass
class CardResults:
    """Measurements a run adds to the card; every field is optional."""

    eval_data: str | None = None
    eval_tokens: int | None = None
    perplexity_source: float | None = None
    perplexity_converted: float | None = None
    perplexity_finetuned: float | None = None
    kv_bytes_measured: float | None = None
    finetune_tokens: int | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> "CardResults":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def source_license(source_folder: Path | None) -> str | None:
    """The `license` of the source's own model card front matter, when the folder has one."""
    card = None if source_folder is None else Path(source_folder) / CARD_FILE
    if card is None or not card.is_file():
        return None
    try:
        license_ = ModelCard.load(card, ignore_metadata_errors=True).data.license
    except (OSError, ValueError) as err:  # unreadable or malformed front matter: no reason to fail a conversion
        logger.warning("no license for the model card: %s could not be parsed (%s)", card, err)
        return None
    return license_ if isinstance(license_, str) and license_ else None


def model_card(
    config: FactorConvConfig,
    report: dict | None,
    *,
    name: str,
    recipe: str | None = None,
    license: str | None = None,
    results: CardResults | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """A Hub model card for a converted (and possibly fine-tuned) model.

    `report` is the conversion report (`factorconv_report.json`): its `kv_bytes_per_token` and its per-layer
    records, rendered column by column whatever fields they have.
    """
    report = report or {}
    results = results or CardResults()
    trained = report.get("finetune") if isinstance(report.get("finetune"), dict) else None
    if trained and results.finetune_tokens is None and isinstance(trained.get("tokens"), int):
        results = CardResults(**{**results.to_dict(), "finetune_tokens": trained["tokens"]})
    source = config.source_model or "the source model"
    data = ModelCardData(
        base_model=config.source_model if _is_hub_id(config.source_model) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["factorconv", config.attention.replace("_", "-"), "kv-cache-compression"],
    )
    parts = [
        f"# {name}",
        f"`{source}` converted by [factorconv](https://pypi.org/project/factorconv/) to {KINDS[config.attention].describe(config)}"
        + (" The converted model was then fine-tuned (distilled from the source)." if results.perplexity_finetuned
           is not None or results.finetune_tokens is not None else ""),
        _summary_table(config, report, results),
        _dims(config) + ".",
        _finetune_section(report.get("finetune")),
        _usage(repo_id or _PLACEHOLDER),
        _layer_table(report.get("layers") or []),
    ]
    if recipe:
        parts.append("## Recipe\n\n```yaml\n" + recipe.strip() + "\n```")
    body = "\n\n".join(p for p in parts if p) + "\n"
    # The body is plain text, not a template: escape nothing by passing it as a variable.
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body=body)


def write_model_card(
    folder: Path,
    *,
    recipe: str | None = None,
    results: CardResults | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """(Re)write `folder/README.md` from the folder's config and report, keeping a license the card had."""
    folder = Path(folder)
    config = FactorConvConfig.from_pretrained(folder)
    report_path = folder / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    card_path = folder / CARD_FILE
    if license is None and card_path.is_file():
        license = source_license(folder)
    model_card(
        config, report, name=folder.name, recipe=recipe, license=license, results=results, repo_id=repo_id
    ).save(card_path)
    return card_path


def export_card(
    config: FactorConvConfig,
    *,
    name: str,
    model: str,
    format_name: str,
    architecture: str,
    serving: str,
    kv_bytes: tuple[int, int],
    license: str | None = None,
) -> ModelCard:
    """The card of a `factorconv export` folder: what it is, where it came from, its cache, how to serve it."""
    exported, source_kv = kv_bytes
    data = ModelCardData(
        base_model=config.source_model if _is_hub_id(config.source_model) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["factorconv", format_name, "kv-cache-compression"],
    )
    body = "\n\n".join([
        f"# {name} as {architecture}",
        f"`{model}` ({config.attention.replace('_', '-')} attention, converted by factorconv from "
        f"`{config.source_model}`) written by `factorconv export --format {format_name}` as a stock `{architecture}`: "
        "the same attention, relabelled, so outputs equal the factorconv model's.",
        f"KV cache per token: {exported:,} bytes ({exported / source_kv:.1%} of the source's {source_kv:,}) "
        f"in {str(config.dtype).removeprefix('torch.')}.",
        "## Serving",
        serving,
    ]) + "\n"
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body=body)


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and HUB_ID.match(source) is not None and not Path(source).exists()


def _bytes_per_value(config: FactorConvConfig) -> int:
    dtype = getattr(config, "dtype", None)
    if hasattr(dtype, "itemsize"):
        return dtype.itemsize
    return {"bfloat16": 2, "float16": 2, "float32": 4}.get(str(dtype).removeprefix("torch."), 4)


def _kv_bytes(config: FactorConvConfig, report: dict) -> tuple[int, int]:
    kv = report.get("kv_bytes_per_token")
    if kv:
        return kv["source"], kv["converted"]
    size = _bytes_per_value(config)
    return source_kv_bytes_per_token(config, size), analytic_kv_bytes_per_token(config, size)


def _summary_table(config: FactorConvConfig, report: dict, results: CardResults) -> str:
    """Source, converted and (when there was fine-tuning) fine-tuned side by side."""
    finetuned = results.perplexity_finetuned is not None or results.finetune_tokens is not None
    source_kv, converted_kv = _kv_bytes(config, report)
    converted_cell = f"{converted_kv:,} ({converted_kv / source_kv:.1%})"
    rows = [("KV cache bytes per token", f"{source_kv:,}", converted_cell, converted_cell)]
    if results.kv_bytes_measured is not None:  # measured on the final model
        measured = f"{results.kv_bytes_measured:,.0f}"
        rows.append(("KV cache bytes per token, measured after `generate`", "", "" if finetuned else measured, measured))
    if any(v is not None for v in (results.perplexity_source, results.perplexity_converted, results.perplexity_finetuned)):
        where = f" on `{results.eval_data}`" if results.eval_data else ""
        if results.eval_tokens:
            where += f" ({results.eval_tokens:,} tokens)"
        rows.append(
            (
                f"perplexity{where}",
                _num(results.perplexity_source),
                _num(results.perplexity_converted),
                _num(results.perplexity_finetuned),
            )
        )
    if results.finetune_tokens is not None:
        rows.append(("fine-tuning tokens", "", "", f"{results.finetune_tokens:,}"))
    header = "| | source | converted |" + (" fine-tuned |" if finetuned else "")
    rule = "|---|---|---|" + ("---|" if finetuned else "")
    lines = [header, rule]
    for label, *cells in rows:
        lines.append("| " + " | ".join([label, *(cells if finetuned else cells[:2])]) + " |")
    return "\n".join(lines)


def _finetune_section(summary: dict | None) -> str:
    """What fine-tuning did, from the report's `finetune` record (written by `factorconv finetune`)."""
    if not isinstance(summary, dict):
        return ""
    teacher = f" from `{summary['teacher']}`" if summary.get("teacher") else ""
    facts = []
    if summary.get("steps") is not None:
        facts.append(f"{summary['steps']:,} steps")
    if summary.get("tokens") is not None:
        facts.append(f"{summary['tokens']:,} tokens" + (f" in blocks of {summary['seq_len']}" if summary.get("seq_len") else ""))
    if summary.get("trainable_parameters") and summary.get("parameters"):
        facts.append(f"{summary['trainable_parameters']:,} of {summary['parameters']:,} parameters trained")
    lines = ["## Fine-tuning", "", f"Distilled{teacher} with `factorconv finetune`: " + (", ".join(facts) or "done") + "."]
    ev = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
    if ev.get("before_ppl") is not None and ev.get("after_ppl") is not None:
        where = f" on {ev['data']}" if ev.get("data") else ""
        teacher_ppl = f" (teacher {ev['teacher_ppl']:.4g})" if ev.get("teacher_ppl") is not None else ""
        lines.append(
            f"Held-out perplexity during fine-tuning{where}: {ev['before_ppl']:.4g} before, {ev['after_ppl']:.4g} after"
            + teacher_ppl + "."
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _usage(repo: str) -> str:
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("The KV cache of this model", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

`trust_remote_code=True` loads `modeling_factorconv.py` from this repo (it imports only torch and transformers);
with `pip install factorconv` and `import factorconv`, no remote code is needed."""


def _layer_table(layers: list[dict]) -> str:
    """Every field of the per-layer records, as columns (fields that are empty in every layer are left out)."""
    if not layers:
        return ""
    columns: list[str] = []
    for record in layers:
        for key in record:
            if key not in columns and any(r.get(key) is not None for r in layers):
                columns.append(key)
    lines = [
        "## Per-layer conversion report",
        "",
        "Relative errors are ‖converted − source‖ / ‖source‖ (0 = exact).",
        "",
        "| " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for record in layers:
        lines.append("| " + " | ".join(_cell(record.get(c)) for c in columns) + " |")
    worst = {
        c: max(r[c] for r in layers if isinstance(r.get(c), (int, float)))
        for c in columns
        if c.endswith("error") and any(isinstance(r.get(c), (int, float)) for r in layers)
    }
    if worst:
        lines += ["", "Largest over layers: " + ", ".join(f"{c.replace('_', ' ')} {v:.3g}" for c, v in worst.items()) + "."]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|")


def _dims(config: FactorConvConfig) -> str:
    dims = KINDS[config.attention].dims(config)
    if config.serving_format is not None:  # the export format's --format name is its config value, dashed
        fmt = config.serving_format.replace("_", "-")
        dims += (f". Built to fit a stock architecture: `factorconv export MODEL OUT --format {fmt}` writes it as one "
                 "that serving engines run without remote code")
    return dims
