"""`factorconv run` and `factorconv validate`: the whole pipeline from one recipe.

Stages: convert → sample → finetune → eval → push, each skipped when its section is absent. A stage whose output is
complete is reused on a re-run: the folder passes `hub.folder_problems` (config, modeling files, every shard
its index lists) and its `factorconv_run.json` records the same options as the current recipe's stage.
Every finished folder holds the exact recipe (after `--set` overrides) in `factorconv_recipe.yaml`, and its
model card embeds it.
"""

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from . import __version__
from .card import CardResults, source_license, write_model_card
from .convert.options import ConvertOptions
from .convert.plan import PlanReport, describe_plan, make_plan
from .errors import FactorConvError, OptionError
from .hub import HUB_FAILURES, HUB_ID, failure_line, folder_problems, push, require_token
from .output_folder import RECIPE_FILE, check_output_path, refuse_foreign
from .recipe import Recipe, RecipeError, load_recipe, recipe_phrase

logger = logging.getLogger("factorconv")

STAGE_FILE = "factorconv_run.json"  # {"convert": options, "finetune": options}: what produced the folder
EVAL_FILE = "factorconv_eval.json"  # {"key": what was evaluated, "results": CardResults fields}
# Options that do not change what a stage computes, left out of its record.
CONVERT_VOLATILE = {"overwrite", "device"}
FINETUNE_VOLATILE = {"overwrite", "resume", "device", "save_every", "keep_checkpoints", "eval_every"}
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".npy")
# What an interrupted `finetune` leaves in its output (checkpoints, metrics): resumable, so ours to reuse.
FINETUNE_WORK_FILES = (".checkpoints", "finetune_metrics.jsonl")


# --- validate ---------------------------------------------------------------------------------------------------------


def plan_recipe(recipe: Recipe, folder: Path) -> PlanReport:
    """The recipe's conversion planned against the source config in `folder` (`convert.plan.make_plan`, without the
    calibration pass), its errors naming recipe keys."""
    options = recipe.convert_options()
    try:
        return make_plan(options, folder)
    except OptionError as err:
        raise RecipeError(recipe_phrase(err)) from None


def source_config_folder(recipe: Recipe) -> tuple[Path | None, str | None]:
    """The folder with the source's config.json (a Hub id fetches config.json only), or None and why not."""
    from .model_folder import resolve_source

    model = recipe.source.model
    if Path(model).expanduser().exists() or not HUB_ID.match(model):
        return resolve_source(model, recipe.source.revision, weights=False), None
    try:
        return resolve_source(model, recipe.source.revision, weights=False), None
    except FactorConvError as err:
        return None, str(err)


def validate_recipe(path: Path, overrides: Sequence[str] = ()) -> str:
    """Check a recipe (schema, and the plan against the source config when reachable); writes nothing."""
    recipe = load_recipe(path, overrides)
    lines = [f"{path}: valid recipe"]
    folder, why = source_config_folder(recipe)
    if folder is None:
        why = why.split(". ")[0].split("; ")[0]
        lines.append(f"source    {recipe.source.model}: config not reachable ({why}); schema checked, plan skipped")
        lines.append("          (plan against a local copy with --set source.model=FOLDER)")
    else:
        lines += describe_plan(plan_recipe(recipe, folder))
    lines.append("stages    " + " -> ".join(_stages(recipe)))
    lines += [f"warning   {w}" for w in _missing_inputs(recipe)]
    return "\n".join(lines)


def _stages(recipe: Recipe) -> list[str]:
    stages = [f"convert to {recipe.converted_dir}"]
    if recipe.samples is not None:
        spec = recipe.sample_options()
        stages.append(f"sample {spec.tokens:,} tokens of {'conversations' if spec.chat else 'sequences'} to "
                      f"{recipe.samples_path}")
    if recipe.finetune is not None:
        options = recipe.finetune_options()
        budget = f"{options.tokens:,} tokens" if options.tokens else f"{options.steps} steps" if options.steps else "1 pass"
        stages.append(f"finetune ({budget}) to {recipe.final_dir}")
    if recipe.eval is not None:
        stages.append(f"eval on {recipe.eval.data}")
    if recipe.export is not None:
        stages.append(f"export as {recipe.export.format} to {recipe.export.dir}")
    if recipe.push is not None:
        stages.append(f"push to {recipe.push.repo_id}" + (f"@{recipe.push.revision}" if recipe.push.revision else ""))
    return stages


def _missing_inputs(recipe: Recipe) -> list[str]:
    """Local data files the recipe names that do not exist (yet)."""
    missing = []
    if recipe.eval is not None and not recipe.eval.data.is_file():
        missing.append(f"eval.data {recipe.eval.data} not found")
    calib = (recipe.calibration or {}).get("data")
    if isinstance(calib, str) and _looks_like_file(calib) and not Path(calib).expanduser().exists():
        missing.append(f"calibration.data {calib} not found")
    if recipe.finetune is not None:
        for i, item in enumerate(recipe.finetune_options().data):
            if item == str(recipe.samples_path) and recipe.samples is not None:
                continue  # written by the samples stage
            if _looks_like_file(item) and not Path(item).expanduser().exists():
                missing.append(f"finetune.data[{i}] {item} not found")
    return missing


def _looks_like_file(spec: str) -> bool:
    return Path(spec).suffix in _FILE_SUFFIXES or spec.startswith((".", "/", "~"))


# --- run --------------------------------------------------------------------------------------------------------------


def run_recipe(
    path: Path, overrides: Sequence[str] = (), progress: bool = True, echo: Callable[[str], None] = logger.info
) -> Path:
    """Run every stage the recipe has; returns the final folder. Completed stages are reused."""
    recipe = load_recipe(path, overrides)
    missing = _missing_inputs(recipe)
    if missing:
        raise FactorConvError(f"{path}: {missing[0]}")
    if recipe.push is not None:
        require_token()
    recipe_text = _recipe_text(path, overrides, recipe)
    converted, final = recipe.converted_dir, recipe.final_dir
    options = recipe.convert_options()
    convert_record = _record(options, CONVERT_VOLATILE)
    finetune_options = recipe.finetune_options() if recipe.finetune is not None else None
    records = {"convert": convert_record}
    if recipe.samples is not None:
        records["samples"] = {"source": recipe.source.model, "revision": recipe.source.revision,
                              **recipe.sample_options().model_dump(mode="json")}
    if finetune_options is not None:
        records["finetune"] = _record(finetune_options, FINETUNE_VOLATILE)
    # Refuse up front (not after hours of conversion) to replace a folder that is not ours.
    reuse_convert = _complete(converted, {"convert": convert_record})
    if not reuse_convert:
        _replaceable(converted)
    if finetune_options is not None and not _complete(final, records):
        _replaceable(final)
    if recipe.export is not None:  # an earlier export (factorconv_export.json) may be replaced, nothing else
        check_output_path(recipe.export.dir, [converted, final])
        refuse_foreign(recipe.export.dir)

    license_ = _license(recipe)
    if reuse_convert:
        echo(f"convert   reusing {converted} (complete, same options)")
    else:
        from .convert import convert

        echo(f"convert   {recipe.source.model} -> {converted} ({_target_summary(options)})")
        try:
            convert(options.model_copy(update={"overwrite": converted.exists()}), progress=progress)
        except OptionError as err:
            raise RecipeError(f"{path}: {recipe_phrase(err)}") from None
    _finish(converted, {"convert": convert_record}, recipe_text, license_=license_)

    if recipe.samples is not None and not _complete(final, records):  # a healed model of these samples needs none
        _samples_stage(recipe, records["samples"], progress, echo)

    if finetune_options is not None:
        if _complete(final, records):
            echo(f"finetune  reusing {final} (complete, same options)")
        else:
            echo(f"finetune  {converted} -> {final}")
            _finetune(finetune_options, final, progress, may_resume=reuse_convert)
        _finish(final, records, recipe_text, license_=license_)

    results = CardResults()
    if recipe.eval is not None:
        results = _eval_stage(recipe, records, progress, echo)
    if finetune_options is not None and finetune_options.tokens:
        results.finetune_tokens = results.finetune_tokens or finetune_options.tokens
    repo_id = recipe.push.repo_id if recipe.push is not None else None
    _finish(final, records, recipe_text, license_=license_, results=results, repo_id=repo_id)
    if recipe.export is not None:
        from .export import export

        echo(f"export    {final} -> {recipe.export.dir} ({recipe.export.format})")
        export(str(final), recipe.export.dir, recipe.export.format, overwrite=recipe.export.dir.exists(),
               max_shard_size=recipe.export.max_shard_size, progress=progress)
    if recipe.push is not None:
        url = push(
            final,
            recipe.push.repo_id,
            private=recipe.push.private,
            revision=recipe.push.revision,
            commit_message=recipe.push.commit_message,
        )
        echo(f"push      {final} -> {url}")
    return final


def _target_summary(options: ConvertOptions) -> str:
    parts = [options.to]
    for name in ("kv_budget", *options.kind.sizes):
        value = getattr(options, name, None)
        if value is not None:
            parts.append(f"{name} {value}")
    if getattr(options, "calib", None):
        parts.append(f"calibrated on {options.calib}")
    return ", ".join(parts)


def _recipe_text(path: Path, overrides: Sequence[str], recipe: Recipe) -> str:
    given = " ".join(f"--set {o}" for o in overrides)
    header = f"# factorconv {__version__} ran this recipe: {path}" + (f" {given}" if given else "") + "\n"
    return header + recipe.to_yaml()


def _record(options, volatile: set[str]) -> dict:
    return {k: v for k, v in options.model_dump(mode="json").items() if k not in volatile}


def _records(folder: Path) -> dict:
    """What produced `folder`: its stage file, or for a plain `factorconv convert` output its recipe file."""
    stage = folder / STAGE_FILE
    if stage.is_file():
        try:
            data = json.loads(stage.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}
    recipe = folder / RECIPE_FILE
    if recipe.is_file():
        try:
            data = yaml.safe_load(recipe.read_text())
        except yaml.YAMLError:
            return {}
        if isinstance(data, dict) and isinstance(data.get("convert"), dict):
            return {"convert": {k: v for k, v in data["convert"].items() if k not in CONVERT_VOLATILE}}
    return {}


def _complete(folder: Path, expected: dict) -> bool:
    if not folder.is_dir() or folder_problems(folder):
        return False
    recorded = _records(folder)
    return all(recorded.get(stage) == record for stage, record in expected.items())


def _replaceable(folder: Path) -> None:
    """A folder the run may replace: absent, empty, or written by factorconv (so it holds nothing else)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FactorConvError(f"{folder} is a file; set output.dir to a folder path")
    ours = any((folder / name).exists() for name in (STAGE_FILE, RECIPE_FILE, *FINETUNE_WORK_FILES))
    if not ours and any(folder.iterdir()):
        raise FactorConvError(f"{folder} exists and is not a factorconv output; remove it or choose another output.dir")


def _samples_stage(recipe: Recipe, record: dict, progress: bool, echo: Callable[[str], None]) -> None:
    """Sample the healing tokens from the source, or reuse the file a run with the same options wrote."""
    path, spec = recipe.samples_path, recipe.sample_options()
    stamp = path.with_name(path.name + ".json")  # what produced the file
    try:
        same = path.is_file() and json.loads(stamp.read_text()) == record
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        same = False
    if same:
        echo(f"sample    reusing {path} (same source, same options)")
        return
    from .finetune.samples import sample_tokens

    echo(f"sample    {recipe.source.model} -> {path} ({spec.tokens:,} tokens{', chat' if spec.chat else ''})")
    stamp.unlink(missing_ok=True)
    sample_tokens(recipe.source.model, path, spec, device=recipe.device, revision=recipe.source.revision,
                  overwrite=True, progress=progress)
    stamp.write_text(json.dumps(record, indent=2) + "\n")


def _finetune(options, final: Path, progress: bool, may_resume: bool) -> None:
    try:
        from .finetune import finetune
    except ImportError:
        raise FactorConvError("fine-tuning is not available in this version of factorconv") from None
    # An interrupted fine-tune of the same converted model leaves checkpoints in its output: continue from them.
    resume = may_resume and final.is_dir() and not (final / STAGE_FILE).is_file()
    finetune(options.model_copy(update={"resume": resume, "overwrite": not resume and final.exists()}), progress=progress)


def _eval_stage(recipe: Recipe, records: dict, progress: bool, echo: Callable[[str], None]) -> CardResults:
    from .convert.device import resolve_device
    from .evaluate.report import evaluate, format_table
    from .model_folder import resolve_source

    spec = recipe.eval
    key = {"eval": spec.model_dump(mode="json"), **records}
    cache = recipe.final_dir / EVAL_FILE
    try:
        cached = json.loads(cache.read_text()) if cache.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        cached = None
    if isinstance(cached, dict) and cached.get("key") == key:
        echo(f"eval      reusing {cache.name} (same models, same data)")
        return CardResults.from_dict(cached.get("results"))

    device = resolve_device(recipe.device)
    compare = str(resolve_source(recipe.source.model, recipe.source.revision)) if spec.compare_source else None
    common = dict(seq_len=spec.seq_len, max_tokens=spec.max_tokens, device=device, dtype=spec.dtype, progress=progress)
    rows = evaluate(str(recipe.final_dir), spec.data, compare, **common)
    final_row = rows[-1]
    results = CardResults(eval_data=spec.data.name, kv_bytes_measured=final_row.kv_bytes_measured)
    if compare:
        results.perplexity_source = rows[0].perplexity
    if recipe.finetune is not None:
        results.perplexity_finetuned = final_row.perplexity
        converted_row = evaluate(str(recipe.converted_dir), spec.data, None, **common)[0]
        rows.insert(-1, converted_row)
        results.perplexity_converted = converted_row.perplexity
    else:
        results.perplexity_converted = final_row.perplexity
    echo("eval\n" + format_table(rows))
    cache.write_text(json.dumps({"key": key, "results": results.to_dict()}, indent=2) + "\n")
    return results


def _license(recipe: Recipe) -> str | None:
    """The source's license from its model card: the local folder's, or best effort from the Hub."""
    model = Path(recipe.source.model).expanduser()
    if model.is_dir():
        return source_license(model)
    from huggingface_hub import hf_hub_download

    try:
        card = hf_hub_download(recipe.source.model, "README.md", revision=recipe.source.revision)
    except HUB_FAILURES as err:  # offline, gated, no card: say so, and publish without a license line
        logger.warning("no license for the model card: %s's README.md could not be read (%s)",
                       recipe.source.model, failure_line(err))
        return None
    return source_license(Path(card).parent)


def _finish(
    folder: Path,
    records: dict,
    recipe_text: str,
    license_: str | None,
    results: CardResults | None = None,
    repo_id: str | None = None,
) -> None:
    """Record what produced the folder (first, so the record is never lost), then the exact recipe and the card."""
    (folder / STAGE_FILE).write_text(json.dumps(records, indent=2) + "\n")
    (folder / RECIPE_FILE).write_text(recipe_text)
    write_model_card(folder, recipe=recipe_text, results=results, repo_id=repo_id, license=license_)
