"""Validated options for factorconv's commands (pydantic, unknown keys rejected), with YAML round trip."""

import copy
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FactorConvError
from .hub import HUB_ID

DType = Literal["auto", "float32", "bfloat16", "float16"]
TARGET_OPTIONS: dict[str, set[str]] = {
    "tpa": {"rank_k", "rank_v", "rank_q", "contextual"},
    "mfa": {"key_dim", "value_dim", "query_rank", "mqa"},
    "mfa_kr": {"rope_dim", "nope_dim", "query_rank", "mla", "mla_shape"},
}
WIDTH_OPTIONS = {"rank_k", "rank_v", "key_dim", "value_dim", "rope_dim", "nope_dim"}  # what kv_budget allocates
# Default refinement step (fraction of each tensor's RMS) and schedule per target (benchmarks/results/refine_lr_*.md,
# 50% of the KV bytes). TPA's head-mixing factors want larger, constant steps: pycode-27M 1.138x (0.02, warm-up +
# cosine) -> 1.089x (0.04, warm-up + cosine) -> 1.050x (0.04 constant); SmolLM2 2.63x -> 2.32x -> 2.13x. MFA/MFA-KR
# want the warm-up + cosine schedule at 0.02 (SmolLM2 MFA-KR 1.200x; 1.213x at 0.04; 1.24x constant).
REFINE_DEFAULTS: dict[str, tuple[float, str]] = {
    "tpa": (0.04, "constant"), "mfa": (0.02, "warmup-cosine"), "mfa_kr": (0.02, "warmup-cosine"),
}
REFINE_DEFAULTS_TEXT = "; ".join(f"{kind} {lr:g} {schedule}" for kind, (lr, schedule) in REFINE_DEFAULTS.items())

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device_name(name: str) -> str:
    """Catch a misspelt device when the recipe is validated; whether it exists here is checked at run time."""
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    return name


DeviceName = Annotated[str, AfterValidator(_device_name)]


class ConvertOptions(BaseModel):
    """Everything `factorconv convert` needs; saved as `factorconv_recipe.yaml` in every output folder."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="local folder or Hugging Face Hub id of the source model")
    output: Path = Field(description="folder to write the converted model into")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit of the source")
    to: Literal["tpa", "mfa", "mfa_kr"] = "tpa"
    rank_k: int | None = Field(default=None, ge=1, description="TPA key rank R_K (default: the source's KV heads)")
    rank_v: int | None = Field(default=None, ge=1, description="TPA value rank R_V (default: the source's KV heads)")
    rank_q: int | None = Field(default=None, ge=1, description="factorize queries with this rank (default: no)")
    contextual: bool = Field(default=False, description="add input-dependent head factors a(x) = α + A x")
    key_dim: int | None = Field(default=None, ge=2, description="MFA key width d_K (default: KV heads × head dim)")
    value_dim: int | None = Field(default=None, ge=1, description="MFA value width d_V (default: exact)")
    rope_dim: int | None = Field(default=None, ge=2, description="MFA-KR rotated width d_R (default: exact)")
    nope_dim: int | None = Field(default=None, ge=1, description="MFA-KR shared key/value width d_N (default: exact)")
    query_rank: int | None = Field(default=None, ge=1, description="MFA/MFA-KR low-rank query product width C")
    mla: bool = Field(
        default=False,
        description="MFA-KR built to export as DeepSeek-V3 (MLA): standard RoPE part, normalised latent, the same "
        "shape in every layer (mla_shape, or kv_budget: RoPE part up to the head dim, at most half the width)",
    )
    mla_shape: str | None = Field(
        default=None, pattern=r"^\d+\+\d+$",
        description="with mla: kv_lora_rank+qk_rope_head_dim, e.g. 512+64 or 256+64 (what vLLM's MLA kernels take)",
    )
    mqa: bool = Field(
        default=False,
        description="MFA built to export as a Llama with one KV head: key and value one head dim wide, one key pair "
        "per RoPE frequency (caches 1/KV-heads of the source)",
    )
    kv_budget: float | None = Field(
        default=None, gt=0, le=1, description="fraction of the source's KV bytes per token; ranks/dims are allocated"
    )
    allocation: Literal["auto", "uniform", "greedy", "measured"] = Field(
        default="auto",
        description="with kv_budget: measured (probe each layer's KL when converted alone at uniform widths, then "
        "give width where it costs most; needs calib, one extra pass), uniform (the same widths in every layer) or "
        "greedy (water-filling on the spectra; measured worse zero-shot); auto: measured with calib, else uniform "
        "(benchmarks/results/allocation_*.md)",
    )
    calib: str | None = Field(default=None, description="calibration data: .txt, .jsonl, .npy or a datasets name")
    calib_samples: int = Field(default=64, ge=2, description="calibration sequences (10% are held out)")
    calib_seq_len: int | None = Field(
        default=None, ge=8, description="tokens per calibration sequence (default: the context, at most 512)"
    )
    init: Literal["auto", "weight", "stats", "query-aware", "als"] = Field(
        default="auto",
        description="weight-only maths, calibration statistics, statistics with query-weighted key merging, or "
        "(TPA with contextual) factors a(x), b(x) fitted to calibration keys/values by alternating least squares "
        "(auto: stats when calib is given)",
    )
    refine_steps: int | None = Field(
        default=None, ge=0, description="Adam steps per layer fitting attention outputs (default with calib: 200, "
        "400 at kv_budget 0.25 or below, in between 100 / kv_budget; 0: least-squares refit of the output projection "
        "only)"
    )
    refine_lr: float | None = Field(
        default=None, gt=0, le=1,
        description="Adam's peak step as a fraction of each tensor's RMS (Adam moves every element by about its lr; "
        f"default per target: {REFINE_DEFAULTS_TEXT})",
    )
    refine_schedule: Literal["warmup-cosine", "constant"] | None = Field(
        default=None,
        description="refinement step size over the steps: linear warm-up over the first 10% then cosine decay to "
        f"10% of refine_lr, or constant (default per target: {REFINE_DEFAULTS_TEXT})",
    )
    dtype: DType = "auto"
    max_shard_size: str = "2GB"
    device: DeviceName = "cpu"
    overwrite: bool = False

    @field_validator("to", mode="before")
    @classmethod
    def _dash_or_underscore(cls, value: object) -> object:
        return value.replace("-", "_") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_match_target(self) -> "ConvertOptions":
        for name in sorted(set().union(*TARGET_OPTIONS.values()) - TARGET_OPTIONS[self.to]):
            if getattr(self, name) in (None, False):
                continue
            owners = [t for t, names in TARGET_OPTIONS.items() if name in names]
            raise ValueError(f"{name} applies to --to {'/'.join(owners)}, not {self.to}")
        widths = [n for n in sorted(TARGET_OPTIONS[self.to] & WIDTH_OPTIONS) if getattr(self, n)]
        if self.kv_budget is not None and widths:
            raise ValueError(f"kv_budget allocates the widths itself; drop {', '.join(widths)}")
        if self.mla_shape is not None and not self.mla:
            raise ValueError("mla_shape is the shape of a DeepSeek-V3 export: use it with mla")
        if self.mla or self.mqa:
            flag = "mla" if self.mla else "mqa"
            if widths:
                raise ValueError(f"{flag} sets the widths itself; drop {', '.join(widths)}"
                                 + (" (give the shape as mla_shape N+R)" if self.mla else ""))
            if self.allocation not in ("auto", "uniform"):
                raise ValueError(f"{flag} needs the same widths in every layer: drop allocation {self.allocation}")
        if self.mla and (self.mla_shape is None) == (self.kv_budget is None):
            raise ValueError("mla needs its shape: pass mla_shape (e.g. 256+64) or kv_budget, not both")
        if self.mqa and self.kv_budget is not None:
            raise ValueError("mqa caches one key and one value head per layer, a fixed size: drop kv_budget")
        if self.init == "query-aware" and self.to != "mfa":
            raise ValueError("init 'query-aware' weights MFA's key merge: use it with --to mfa")
        if self.init == "als" and not (self.to == "tpa" and self.contextual):
            raise ValueError("init 'als' fits contextual TPA factors: use it with --to tpa --contextual")
        if self.allocation == "auto":  # resolved here, so what is saved with the output says what ran
            fixed = self.mla or self.mqa or self.kv_budget is None or self.calib is None
            self.allocation = "uniform" if fixed else "measured"
        lr, schedule = REFINE_DEFAULTS[self.to]
        self.refine_lr = lr if self.refine_lr is None else self.refine_lr
        self.refine_schedule = schedule if self.refine_schedule is None else self.refine_schedule
        if self.allocation == "measured" and (self.calib is None or self.kv_budget is None):
            raise ValueError("allocation 'measured' spreads a kv_budget by layer sensitivity measured on calibration "
                             "data: pass kv_budget and calib")
        if self.calib is None and (self.init in ("stats", "query-aware", "als") or (self.refine_steps or 0) > 0):
            raise ValueError(f"init {self.init!r} and refine_steps need calibration data: pass calib")
        return self

    @property
    def uses_statistics(self) -> bool:
        return self.calib is not None and self.init != "weight"

    @property
    def query_aware(self) -> bool:
        return self.init == "query-aware"

    @property
    def serving_format(self) -> str | None:
        """The stock architecture the conversion is built to export as."""
        return "deepseek_v3" if self.mla else "llama" if self.mqa else None

    @property
    def layer_refine_steps(self) -> int:
        if self.refine_steps is not None:
            return self.refine_steps
        if self.calib is None:
            return 0
        # Lower budgets start farther from the source and keep improving longer: SmolLM2 MFA-KR at 25%, 200 steps
        # 2.08x (quality_smollm2.md), 400 steps 1.93x (refine_schedule_smollm2.md).
        return round(200 * min(2.0, max(1.0, 0.5 / self.kv_budget))) if self.kv_budget is not None else 200

    def to_yaml(self) -> str:
        return yaml.safe_dump({"convert": self.model_dump(mode="json")}, sort_keys=False)


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
    kind: Literal["tpa", "mfa", "mfa_kr"]

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
    eval: EvalSection | None = None
    output: OutputSection
    export: ExportSection | None = None
    push: PushSection | None = None
    device: DeviceName = Field(default="auto", description="cpu, cuda, cuda:N, mps or auto (convert and eval)")

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
            line = flags_to_keys(_error_line(err, _convert_path), convert_key).replace("pass calib", "add calibration")
            raise RecipeError(line) from None

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
        fields = model.model_fields
        values = {k: v for k, v in defaults.items() if k in fields and k not in given}
        values.update(given)
        values.update({k: v for k, v in run_fields.items() if k in fields})
        try:
            return model(**values)
        except ValidationError as err:
            line = _error_line(err, lambda loc: "finetune." + _dotted(loc) if loc else "finetune")
            raise RecipeError(flags_to_keys(line, lambda name: f"finetune.{name}" if name in fields else None)) from None


FINETUNE_MISSING = "finetune: fine-tuning is not available in this version of factorconv; remove the finetune section"


def recipe_key(field: str) -> str | None:
    """Where ConvertOptions' `field` lives in a recipe ('target.kv_budget', 'calibration.samples', ...)."""
    if field in RECIPE_KEYS:
        return RECIPE_KEYS[field]
    if field.startswith("calib_"):
        return "calibration." + field.removeprefix("calib_")
    return "target." + field


def convert_key(field: str) -> str | None:
    """recipe_key for ConvertOptions fields only (None for other names)."""
    return recipe_key(field) if field in ConvertOptions.model_fields else None


def flags_to_keys(message: str, key_of) -> str:
    """Rewrite command-line flags in a message ('--kv-budget', '--to') as recipe keys ('target.kv_budget')."""

    def replace(match: re.Match) -> str:
        key = key_of(match.group(1).replace("-", "_"))
        return key if key else match.group(0)

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", replace, message)


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


def _convert_path(loc: tuple) -> str:
    if not loc:
        return "target"
    key = recipe_key(str(loc[0])) or str(loc[0])
    return ".".join([key, *map(str, loc[1:])])


def _error_line(err: ValidationError, path_of) -> str:
    """First pydantic error as '<key path>: <expectation> (got <value>)', plus how many more there are."""
    errors = err.errors()
    first = errors[0]
    path = path_of(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        line = f"{path}: required"
    elif not first["loc"] or first["type"] == "value_error":
        line = f"{path}: {message}"
    else:
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        line = f"{path}: {message[0].lower() + message[1:] if message else 'invalid'} (got {shown})"
    return line + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")
