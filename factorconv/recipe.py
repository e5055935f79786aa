"""Recipes: the whole pipeline in one YAML file (pydantic, unknown keys rejected), mapped onto the commands'
options (`convert.options.ConvertOptions`, `finetune.options.FinetuneOptions`)."""

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .convert.options import ConvertOptions, DeviceName, DType, KindName
from .errors import FactorConvError, OptionError, option_error_of
from .hub import HUB_ID

# --- Recipes: the whole pipeline in one YAML file (`factorconv run`, `factorconv validate`) ---------------------------
#
# A recipe's sections map onto the library's options by name through `recipe_key`: the `target` section takes
# `kind` plus any ConvertOptions field under its own name (ranks, widths, kv_budget, allocation, init, ...), and
# `calibration` takes `data` plus ConvertOptions' `calib_<x>` fields as `<x>`. Both are checked by ConvertOptions
# itself, so a new ConvertOptions field is a new recipe key with no change here. `finetune` is FinetuneOptions.

# ConvertOptions fields that do not live in `target` under their own name; `overwrite` is decided by `run`.
RECIPE_KEYS = {
    "source": "source.model",
    "revision": "source.revision",
    "to": "target.kind",
    "output": "output.dir",
    "dtype": "output.dtype",
    "max_shard_size": "output.max_shard_size",
    "device": "device",
    "calib": "calibration.data",
    "overwrite": None,
}
# FinetuneOptions fields that `run` fills in from the other sections (the model to train, teacher, output).
# The recipe may still name its own `teacher` (default: the source) in the finetune section.
FINETUNE_FROM_RUN = ("model", "output", "revision", "overwrite", "resume")
CONVERTED_SUFFIX = "-converted"
SAMPLES_SUFFIX = "-samples.npy"


class RecipeError(FactorConvError):
    """A recipe problem, on one line that names the file, the YAML key path and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSection(_Section):
    model: str = Field(min_length=1, description="Hub id (org/name) or local folder of the source model")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit")


class TargetSection(BaseModel):
    """`kind` plus ConvertOptions' target fields under their own names (checked by ConvertOptions)."""

    model_config = ConfigDict(extra="allow")
    kind: KindName

    @field_validator("kind", mode="before")
    @classmethod
    def _dash_or_underscore(cls, value: object) -> object:
        return value.replace("-", "_") if isinstance(value, str) else value


class EvalSection(_Section):
    data: Path = Field(description=".txt, .jsonl (a 'text' field per line) or pre-tokenized .npy")
    seq_len: int | None = Field(default=None, ge=2, description="window length (default: context, at most 2048)")
    max_tokens: int | None = Field(default=None, ge=2, description="evaluate only the first N tokens")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compare_source: bool = Field(default=True, description="also evaluate the source on the same tokens")


class OutputSection(_Section):
    dir: Path = Field(description="the final model folder (the converted one gets '-converted' with finetune)")
    dtype: DType = "auto"
    max_shard_size: str = "2GB"

    @field_validator("dir")
    @classmethod
    def _names_a_folder(cls, folder: Path) -> Path:
        if folder.name in ("", ".", ".."):
            raise ValueError(f"{str(folder)!r} is not a new folder; name one, e.g. out/model")
        return folder


class PushSection(_Section):
    repo_id: str = Field(description="user-or-org/name")
    private: bool = Field(default=False, description="when the repo is created")
    revision: str | None = Field(default=None, description="branch (created if missing); default main")
    commit_message: str | None = None

    @field_validator("repo_id")
    @classmethod
    def _hub_id(cls, value: str) -> str:
        if not HUB_ID.match(value):
            raise ValueError(f"expected a Hub repo id like 'my-org/Model-TPA', got {value!r}")
        return value


class ExportSection(_Section):
    format: Literal["deepseek-v3", "llama"] = Field(description="deepseek-v3 (needs target.mla) or llama (target.mqa)")
    dir: Path = Field(description="folder for the stock-architecture copy of the final model")
    max_shard_size: str = "2GB"


class Recipe(_Section):
    """source → target (+ calibration) → finetune → eval → output → export → push; optional sections are stages
    to skip."""

    source: SourceSection
    target: TargetSection
    calibration: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    samples: dict[str, Any] | None = None
    eval: EvalSection | None = None
    output: OutputSection
    export: ExportSection | None = None
    push: PushSection | None = None
    device: DeviceName = Field(default="auto", description="cpu, cuda, cuda:N, mps or auto (convert and eval)")

    @model_validator(mode="after")
    def _samples_feed_finetune(self) -> "Recipe":
        if self.samples is not None and self.finetune is None:
            raise ValueError("samples: healing data needs a finetune section; add one or remove samples")
        return self

    def to_yaml(self) -> str:
        """The recipe as written (after overrides), normalised: reloading it gives the same recipe."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_unset=True), sort_keys=False)

    @property
    def final_dir(self) -> Path:
        """The folder the run ends with (fine-tuned when there is a finetune section): evaluated and pushed."""
        return self.output.dir

    @property
    def converted_dir(self) -> Path:
        """Where the conversion is written: `output.dir`, or `<output.dir>-converted` before fine-tuning."""
        out = self.output.dir
        return out if self.finetune is None else out.with_name(out.name + CONVERTED_SUFFIX)

    @property
    def samples_path(self) -> Path:
        """Where the `samples` stage writes its tokens: `<output.dir>-samples.npy`, beside the converted folder."""
        return self.output.dir.with_name(self.output.dir.name + SAMPLES_SUFFIX)

    def convert_options(self, **run_fields: Any) -> ConvertOptions:
        """The ConvertOptions this recipe means (`run_fields`, e.g. overwrite, are set by the caller)."""
        data = self.model_dump(exclude_unset=False)
        values: dict[str, Any] = {"output": self.converted_dir}
        for name in ConvertOptions.model_fields:
            key = recipe_key(name)
            if key is not None and name != "output":
                found, value = _lookup(data, key)
                if found:
                    values[name] = value
        try:
            return ConvertOptions(**{**values, **run_fields})
        except ValidationError as err:
            raise RecipeError(_error_line(err, _convert_path, recipe_phrase)) from None

    def sample_options(self):
        """SampleOptions from the `samples` section (`factorconv sample`'s options)."""
        from .finetune.samples import SampleOptions

        try:
            return SampleOptions(**self.samples)
        except ValidationError as err:
            raise RecipeError(_error_line(err, lambda loc: "samples." + _dotted(loc) if loc else "samples")) from None

    def finetune_options(self, **run_fields: Any):
        """FinetuneOptions from the `finetune` section plus what `run` fills in (model, teacher, output, ...)."""
        model = finetune_model()
        if model is None:
            raise RecipeError(FINETUNE_MISSING)
        defaults = {
            "model": str(self.converted_dir),
            "output": self.final_dir,
            "teacher": self.source.model,
            "teacher_revision": self.source.revision,
        }
        given = dict(self.finetune or {})
        if self.samples is not None:  # the sampled tokens first, then any finetune.data (one item or a list)
            data = given.get("data")
            given["data"] = [str(self.samples_path), *([] if data is None else [data] if isinstance(data, str) else data)]
        fields = model.model_fields
        values = {k: v for k, v in defaults.items() if k in fields and k not in given}
        values.update(given)
        values.update({k: v for k, v in run_fields.items() if k in fields})
        try:
            return model(**values)
        except ValidationError as err:
            raise RecipeError(_error_line(err, _finetune_path, lambda e: e.phrase(lambda name: f"finetune.{name}"))) from None


FINETUNE_MISSING = "finetune: fine-tuning is not available in this version of factorconv; remove the finetune section"


def recipe_key(field: str) -> str | None:
    """Where ConvertOptions' `field` lives in a recipe ('target.kv_budget', 'calibration.samples', ...); None:
    decided by `run` (overwrite)."""
    if field in RECIPE_KEYS:
        return RECIPE_KEYS[field]
    if field.startswith("calib_"):
        return "calibration." + field.removeprefix("calib_")
    return "target." + field


def recipe_phrase(err: OptionError) -> str:
    """A conversion option's error with the options named as the recipe's keys (target.kv_budget)."""
    return err.phrase(lambda name: recipe_key(name) or name)


def section_keys(section: str) -> list[str]:
    """The keys `target` or `calibration` accept, derived from ConvertOptions' fields."""
    keys = [recipe_key(name) for name in ConvertOptions.model_fields]
    return [k.split(".", 1)[1] for k in keys if k and k.startswith(section + ".")]


def finetune_model() -> type[BaseModel] | None:
    """FinetuneOptions, or None where this version has no fine-tuning."""
    try:
        from .finetune.options import FinetuneOptions
    except ImportError:
        return None
    return FinetuneOptions


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (`a.b=value`, value parsed as YAML) and validate a recipe, or raise one-line RecipeError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        return parse_recipe(data, overrides)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def parse_recipe(data: Any, overrides: Sequence[str] = ()) -> Recipe:
    """Validate recipe data (a dict as read from YAML); every error is one line naming the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of sections (source, target, output, ...), got {type(data).__name__}")
    data = copy.deepcopy(data)
    if isinstance(data.get("source"), str):  # `source: org/model` is short for `source: {model: org/model}`
        data["source"] = {"model": data["source"]}
    apply_overrides(data, overrides)
    _check_keys(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_error_line(err, _dotted)) from None
    if recipe.calibration is not None and recipe.calibration.get("data") is None:
        raise RecipeError("calibration.data: required (a .txt, .jsonl, .npy file or a datasets name)")
    options = recipe.convert_options()
    if recipe.export is not None:
        if options.serving_format != recipe.export.format.replace("-", "_"):
            needs = "kind: mfa_kr with target.mla: true" if recipe.export.format == "deepseek-v3" else "kind: mfa with target.mqa: true"
            raise RecipeError(f"export.format {recipe.export.format}: the model must be built for it; set target.{needs}")
    if recipe.finetune is not None:
        recipe.finetune_options()
    return recipe


def apply_overrides(data: dict, overrides: Sequence[str]) -> None:
    """Apply `a.b=value` overrides in place; values are YAML (`0.25`, `true`, `null`, `[1, 2]`, text)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. target.kv_budget=0.25")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and depth == 0 and part == "source":
                child = node[part] = {"model": child}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value


def _check_keys(data: dict) -> None:
    """Unknown keys, with a did-you-mean; sections this version cannot run."""
    _known(data, "", list(Recipe.model_fields))
    sections = (("source", SourceSection), ("eval", EvalSection), ("output", OutputSection), ("export", ExportSection),
                ("push", PushSection))
    for name, model in sections:
        if isinstance(data.get(name), dict):
            _known(data[name], name, list(model.model_fields))
    if isinstance(data.get("target"), dict):
        _known(data["target"], "target", ["kind", *section_keys("target")])
    if isinstance(data.get("calibration"), dict):
        keys = section_keys("calibration")
        if not keys:
            raise RecipeError("calibration: this version of factorconv does not calibrate; remove the section")
        _known(data["calibration"], "calibration", keys)
    if data.get("finetune") is not None:
        model = finetune_model()
        if model is None:
            raise RecipeError(FINETUNE_MISSING)
        if isinstance(data["finetune"], dict):
            _known(data["finetune"], "finetune", [k for k in model.model_fields if k not in FINETUNE_FROM_RUN])


def _known(section: dict, where: str, allowed: list[str]) -> None:
    for key in section:
        if key in allowed:
            continue
        path = f"{where}.{key}" if where else str(key)
        if where == "finetune" and key in FINETUNE_FROM_RUN:
            raise RecipeError(f"{path}: set by `factorconv run` (the converted model, output.dir); remove it")
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(allowed)}"
        raise RecipeError(f"{path}: unknown key; {hint}")


def _lookup(data: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _finetune_path(loc: tuple) -> str:
    return "finetune." + _dotted(loc) if loc else "finetune"


def _convert_path(loc: tuple) -> str:
    if not loc:
        return "target"
    key = recipe_key(str(loc[0])) or str(loc[0])
    return ".".join([key, *map(str, loc[1:])])


def _error_line(err: ValidationError, path_of, phrase=None) -> str:
    """First pydantic error as '<key path>: <expectation> (got <value>)', plus how many more there are; a
    validator's OptionError is phrased by `phrase` (its options named as recipe keys)."""
    errors = err.errors()
    first = errors[0]
    path = path_of(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if phrase is not None and (found := option_error_of(err)) is not None:
        message = phrase(found)
    if first["type"] == "missing":
        line = f"{path}: required"
    elif not first["loc"] or first["type"] == "value_error":
        line = f"{path}: {message}" if path else message  # a whole-recipe check names its keys itself
    else:
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        line = f"{path}: {message[0].lower() + message[1:] if message else 'invalid'} (got {shown})"
    return line + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")
