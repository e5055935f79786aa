"""Recipes: every shipped recipe validates and plans offline against its model's public config; bad recipes get one
line naming the key path; `factorconv run` goes convert → finetune → eval on a tiny local model and reuses
completed stages on a re-run."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

import factorconv
from factorconv.cli import main
from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token
from factorconv.recipe import RecipeError, load_recipe, parse_recipe, section_keys
from factorconv.run import plan_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FACTS = yaml.safe_load((FIXTURES / "models.yaml").read_text())
BY_HUB_ID = {facts["hub_id"]: slug for slug, facts in FACTS.items()}


def cli(*args: str):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# --- fixtures: the public configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slug", sorted(FACTS))
def test_fixture_configs_match_published_facts(slug):
    """Each config.json builds (meta device, no weights) a model with the published parameter count."""
    facts = FACTS[slug]
    config = AutoConfig.from_pretrained(FIXTURES / slug)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == facts["parameters"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim == facts["head_dim"]
    assert analytic_kv_bytes_per_token(config, 2) == facts["kv_bytes_bf16"]
    names = {n for n, _ in model.named_parameters()}
    assert ("model.layers.0.self_attn.k_proj.bias" in names) == facts["qkv_bias"]
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    rope = config.rope_parameters
    if slug.startswith("llama-3"):
        assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
        assert rope["original_max_position_embeddings"] == 8192
    elif slug.startswith("smollm2"):
        assert rope["rope_type"] == "default" and rope["rope_theta"] == 100000.0 and config.tie_word_embeddings
    else:
        assert rope["rope_type"] == "default" and rope["rope_theta"] == 1000000.0


# --- every shipped recipe ----------------------------------------------------------------------------------------------


def test_recipes_cover_the_models():
    names = {p.stem for p in RECIPES}
    for slug in FACTS:
        assert {f"{slug}-mfa", f"{slug}-mfa-kr"} <= names, slug
    # TPA's KV bytes fall in steps of 1 / KV heads: with 2 (Qwen2.5-0.5B) or 3 (SmolLM2) it cannot make 25%.
    assert {f"{s}-tpa" for s in FACTS if s not in ("qwen2.5-0.5b", "smollm2-135m-instruct")} <= names
    assert len(names) == 20  # and one serving recipe: MLA in vLLM's shape, exported as DeepSeek-V3


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_plans_offline(path):
    recipe = load_recipe(path)
    slug = BY_HUB_ID[recipe.source.model]
    facts = FACTS[slug]
    kind = path.stem.removeprefix(slug + "-").replace("-", "_")
    serving = {"mla": "mfa_kr", "mqa": "mfa"}.get(kind)  # built for a stock architecture, then exported
    assert recipe.target.kind == (serving or kind)
    assert recipe.output.dir == Path("out") / path.stem

    plan = plan_recipe(recipe, FIXTURES / slug)
    config = AutoConfig.from_pretrained(FIXTURES / slug)
    assert plan.geometry.layers == config.num_hidden_layers == len(plan.widths)
    assert plan.source_parameters == facts["parameters"]
    assert plan.source_kv_bytes == facts["kv_bytes_bf16"] and plan.dtype == "bfloat16"
    for widths in plan.widths:
        assert all(value >= 1 for value in widths.values())
    budget = recipe.convert_options().kv_budget
    if serving:
        assert recipe.export is not None and recipe.convert_options().serving_format is not None
    else:
        assert budget is not None and abs(plan.reduction - budget) < 0.02
    assert plan.target_kv_bytes < plan.source_kv_bytes

    # The comment header: how to run it, the KV reduction and parameters (as planned here), hardware.
    text = path.read_text()
    header = text.split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"factorconv run recipes/{path.name}" in header
    assert f"{plan.source_kv_bytes:,} -> {plan.target_kv_bytes:,} bytes/token" in header
    # Says what was run: no recipe has been run end to end; SmolLM2's conversion and healing stages were measured.
    said = "estimated from the shapes, not run|conversion and healing measured, not run end to end"
    assert re.search(rf"^# Hardware \(({said})\): ", header, re.M)
    assert f"Parameters: {plan.source_parameters / 1e9:.2f}B -> {plan.target_parameters / 1e9:.2f}B" in header


def test_validate_command_plans_against_a_local_config():
    path = ROOT / "recipes" / "llama-3.2-1b-mfa-kr.yaml"
    result = cli("validate", path, "--set", f"source.model={FIXTURES / 'llama-3.2-1b'}")
    assert result.exit_code == 0, result.output
    assert "valid recipe" in result.output
    assert "32,768 -> 8,192 bytes/token in bfloat16 (25.0%" in result.output
    assert "rope_dim=128 nope_dim=128 in all 16 layers" in result.output
    assert "1,235,814,400 parameters" in result.output

    # A Hub id that cannot be reached (tests run offline): the schema is still checked, the plan skipped.
    result = cli("validate", path)
    assert result.exit_code == 0, result.output
    assert "config not reachable" in result.output and "plan skipped" in result.output


# --- bad recipes: one line, the YAML key path, what was expected ---------------------------------------------------


GOOD = {
    "source": {"model": "meta-llama/Llama-3.2-1B"},
    "target": {"kind": "mfa", "kv_budget": 0.25},
    "calibration": {"data": "calib.txt", "samples": 8, "seq_len": 64},
    "eval": {"data": "eval.txt"},
    "output": {"dir": "out/x"},
}


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["target.kv_budjet=0.3"], ["target.kv_budjet", "unknown key", "did you mean 'kv_budget'"]),
        (["calibration.sample=3"], ["calibration.sample", "did you mean 'samples'"]),
        (["outptu.dir=x"], ["outptu", "did you mean 'output'"]),
        (["eval.seq_length=8"], ["eval.seq_length", "did you mean 'seq_len'"]),
        (["target.kv_budget=0"], ["target.kv_budget", "greater than 0", "got 0"]),
        (["target.kv_budget=1.5"], ["target.kv_budget", "less than or equal to 1", "got 1.5"]),
        (["target.kv_budget=-0.2"], ["target.kv_budget", "greater than 0"]),
        (["target.kv_budget=lots"], ["target.kv_budget", "valid number", "'lots'"]),
        (["calibration.samples=many"], ["calibration.samples", "valid integer"]),
        (["eval.seq_len=1"], ["eval.seq_len", "greater than or equal to 2"]),
        (["target.kind=gqa"], ["target.kind", "'tpa', 'mfa' or 'mfa_kr'", "'gqa'"]),
        (["target.key_dim=64"], ["target", "kv_budget allocates the widths itself", "key_dim"]),
        (["target.rank_k=2", "target.kv_budget=null"], ["target", "rank_k applies to target.kind tpa"]),
        (["source.model=null"], ["source.model", "valid string"]),
        (["output=null"], ["output", "valid dictionary"]),
        (["calibration.data=null"], ["calibration.data", "required"]),
        (["push.repo_id=not a repo"], ["push.repo_id", "my-org/"]),
        (["push.privat=true", "push.repo_id=me/x"], ["push.privat", "did you mean 'private'"]),
        (["finetune.tokenz=5", "finetune.data=x.txt"], ["finetune.tokenz", "did you mean 'tokens'"]),
        (["finetune.tokens=5"], ["finetune.data", "required"]),
        (["finetune.model=x", "finetune.data=x.txt"], ["finetune.model", "set by `factorconv run`"]),
        (["finetune.data=x.txt", "finetune.tokens=5", "finetune.steps=5"], ["finetune", "finetune.tokens or finetune.steps"]),
        (["target.kind.x=1"], ["--set target.kind.x", "target.kind is a value, not a section"]),
        (["device=quantum"], ["device", "unknown device 'quantum'", "cpu, cuda"]),
        (["target.kv_budget"], ["--set 'target.kv_budget'", "KEY.PATH=VALUE"]),
    ],
)
def test_bad_recipe_is_one_line_with_the_key_path(tmp_path, overrides, needles):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    line = one_error_line(cli("validate", path, *[a for o in overrides for a in ("--set", o)]))
    assert line.startswith(f"Error: {path}: "), line
    for needle in needles:
        assert needle in line, (needle, line)


def test_missing_source_and_broken_files(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in GOOD.items() if k != "source"}))
    assert one_error_line(cli("validate", path)) == f"Error: {path}: source: required"
    path.write_text("source: [unclosed\n")
    assert "not valid YAML at line" in one_error_line(cli("validate", path))
    path.write_text("- a\n- b\n")
    assert "a mapping of sections" in one_error_line(cli("validate", path))
    assert "not found" in one_error_line(cli("validate", tmp_path / "nope.yaml"))
    path.write_text(yaml.safe_dump(GOOD))
    line = one_error_line(cli("validate", path, "--set", "source.model=no/such/local/folder"))
    assert "no such folder, and not a valid Hub id" in line
    # `source: org/model` is short for `source: {model: org/model}`; `--set` overrides what the file says.
    recipe = parse_recipe({**GOOD, "source": "Qwen/Qwen2.5-0.5B"}, ["source.revision=v1", "target.kv_budget=0.5"])
    assert (recipe.source.model, recipe.source.revision) == ("Qwen/Qwen2.5-0.5B", "v1")
    assert recipe.convert_options().kv_budget == 0.5


def test_sections_map_onto_convert_options_by_name():
    """target/calibration keys come from ConvertOptions' fields: no copy of the schema to keep in sync."""
    from factorconv.convert.options import ConvertOptions

    target = set(section_keys("target"))
    assert {"rank_k", "key_dim", "rope_dim", "query_rank", "kv_budget", "allocation"} <= target
    assert {"source", "output", "dtype", "device", "overwrite", "to"}.isdisjoint(target)
    assert set(section_keys("calibration")) == {"data"} | {
        name.removeprefix("calib_") for name in ConvertOptions.model_fields if name.startswith("calib_")
    }
    recipe = parse_recipe(GOOD, ["output.dtype=bfloat16", "device=cpu", "source.revision=abc"])
    options = recipe.convert_options()
    assert (options.to, options.kv_budget, options.calib, options.calib_samples, options.calib_seq_len) == (
        "mfa", 0.25, "calib.txt", 8, 64,
    )
    assert (options.dtype, options.device, options.revision, options.output) == ("bfloat16", "cpu", "abc", Path("out/x"))


def test_finetune_section_needs_finetune(monkeypatch):
    import factorconv.recipe as recipe_module

    recipe = parse_recipe({**GOOD, "finetune": {"data": "corpus.txt", "tokens": 1000}})
    options = recipe.finetune_options()
    assert options.model == "out/x-converted" and options.output == Path("out/x")
    assert options.teacher == "meta-llama/Llama-3.2-1B" and options.tokens == 1000
    assert recipe.convert_options().output == Path("out/x-converted")

    monkeypatch.setattr(recipe_module, "finetune_model", lambda: None)
    with pytest.raises(RecipeError, match=r"^finetune: fine-tuning is not available in this version"):
        parse_recipe({**GOOD, "finetune": {"data": "corpus.txt"}})


# --- `factorconv run` on a tiny local model ----------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch, source_dirs):
    """A working directory with a source model (tokenizer, an MIT card), calibration and eval text."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(source_dirs["llama_gqa"], tmp_path / "src")
    (tmp_path / "src" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    gen = torch.Generator().manual_seed(5)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(0, 125, (n,), generator=gen))  # noqa: E731
    (tmp_path / "calib.txt").write_text(words(1200))
    (tmp_path / "eval.txt").write_text(words(400))
    return tmp_path


def write_recipe(folder: Path, **sections) -> Path:
    data = {
        "source": "src",
        "target": {"kind": "mfa", "kv_budget": 0.5},
        "calibration": {"data": "calib.txt", "samples": 4, "seq_len": 64},
        "eval": {"data": "eval.txt", "seq_len": 64},
        "output": {"dir": "out/tiny", "dtype": "float32"},
        "device": "cpu",
        **sections,
    }
    path = folder / "tiny.yaml"
    path.write_text("# a tiny recipe\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def test_run_convert_eval_then_reuse(workdir):
    path = write_recipe(workdir, target={"kind": "mfa", "kv_budget": 0.5, "refine_steps": 0})
    result = cli("run", path, "--set", "eval.max_tokens=300")
    assert result.exit_code == 0, result.output
    out = workdir / "out" / "tiny"
    assert "convert   src -> out/tiny (mfa, kv_budget 0.5, calibrated on calib.txt)" in result.output
    assert re.search(r"model: tiny\s+[\d,]+\s+256\s+256\s+50\.0%", result.output), result.output
    assert result.output.strip().endswith("done: out/tiny")
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["tiny"]  # no staging left

    # The exact recipe after overrides is saved, and reloads to the same recipe.
    saved = (out / "factorconv_recipe.yaml").read_text()
    assert saved.startswith(f"# factorconv {factorconv.__version__} ran this recipe: {path} --set eval.max_tokens=300\n")
    assert yaml.safe_load(saved)["eval"] == {"data": "eval.txt", "seq_len": 64, "max_tokens": 300}
    assert parse_recipe(yaml.safe_load(saved)) == load_recipe(path, ["eval.max_tokens=300"])
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "- kv-cache-compression" in card and "pipeline_tag: text-generation" in card
    assert "```yaml\n" + saved.strip() + "\n```" in card
    assert "| KV cache bytes per token | 512 | 256 (50.0%) |" in card
    assert re.search(r"\| perplexity on `eval.txt` \| [\d.]+ \| [\d.]+ \|", card), card
    assert "| layer | key error | value error | attention error |" in card
    assert 'from_pretrained("<this repo>", trust_remote_code=True)' in card
    results = json.loads((out / "factorconv_eval.json").read_text())["results"]
    assert results["kv_bytes_measured"] == 256 and results["perplexity_source"] > 1

    # Second run: nothing recomputed, same files.
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    result = cli("run", path, "--set", "eval.max_tokens=300")
    assert result.exit_code == 0, result.output
    assert "convert   reusing out/tiny (complete, same options)" in result.output
    assert "eval      reusing factorconv_eval.json" in result.output
    assert weights.stat().st_mtime_ns == stamp

    # A changed target converts again; a damaged output (missing modeling file) is not "complete" either.
    result = cli("run", path, "--set", "target.kv_budget=0.25", "--set", "eval=null")
    assert result.exit_code == 0, result.output
    assert "convert   src -> out/tiny" in result.output and "eval" not in result.output.replace("eval=", "")
    (out / "modeling_factorconv.py").unlink()
    result = cli("run", path, "--set", "target.kv_budget=0.25", "--set", "eval=null")
    assert "convert   src -> out/tiny" in result.output and (out / "modeling_factorconv.py").is_file()


def test_run_reuses_a_plain_convert_output(workdir):
    """A folder `factorconv convert` wrote with the same options counts as the recipe's completed convert stage."""
    path = write_recipe(workdir, calibration=None, eval=None, target={"kind": "tpa", "rank_k": 1, "rank_v": 1})
    result = cli("convert", "src", "out/tiny", "--rank-k", "1", "--rank-v", "1", "--dtype", "float32", "--device", "auto")
    assert result.exit_code == 0, result.output
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "convert   reusing out/tiny" in result.output
    assert json.loads((workdir / "out/tiny/factorconv_run.json").read_text())["convert"]["rank_k"] == 1


def test_run_refuses_what_it_cannot_do_before_working(workdir, monkeypatch):
    path = write_recipe(workdir)
    (workdir / "out" / "tiny").mkdir(parents=True)
    (workdir / "out" / "tiny" / "notes.txt").write_text("mine")
    line = one_error_line(cli("run", path))
    assert "out/tiny exists and is not a factorconv output" in line
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["tiny"]

    line = one_error_line(cli("run", path, "--set", "eval.data=missing.txt", "--set", "output.dir=out/b"))
    assert "eval.data missing.txt not found" in line
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(workdir / "hf-home"))  # no saved login either
    line = one_error_line(cli("run", path, "--set", "push.repo_id=me/tiny", "--set", "output.dir=out/c"))
    assert "no Hugging Face token" in line
    assert not (workdir / "out" / "b").exists() and not (workdir / "out" / "c").exists()


def test_run_with_finetune(workdir):
    """convert → finetune → eval: three perplexities (source, converted, fine-tuned) and the tokens trained."""
    finetune = {"data": "calib.txt", "steps": 2, "seq_len": 32, "batch_size": 2, "eval_tokens": 128}
    path = write_recipe(workdir, finetune=finetune, calibration=None)
    result = cli("run", path, "--set", "eval.max_tokens=200")
    assert result.exit_code == 0, result.output
    assert "finetune  out/tiny-converted -> out/tiny" in result.output
    table = result.output[result.output.index("model  "):]
    assert [line.split()[1] for line in table.splitlines()[2:5]] == ["src", "tiny-converted", "tiny"]
    out = workdir / "out" / "tiny"
    card = (out / "README.md").read_text()
    assert "| | source | converted | fine-tuned |" in card
    assert re.search(r"\| perplexity on `eval.txt` \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", card), card
    assert "| fine-tuning tokens |  |  | 128 |" in card and "## Fine-tuning" in card
    records = json.loads((out / "factorconv_run.json").read_text())
    assert records["finetune"]["model"] == "out/tiny-converted" and records["finetune"]["teacher"] == "src"

    result = cli("run", path, "--set", "eval.max_tokens=200")
    assert result.exit_code == 0, result.output
    for stage in ("convert   reusing", "finetune  reusing", "eval      reusing"):
        assert stage in result.output, result.output


def test_run_samples_healing_data_from_the_source(workdir):
    """convert → sample → finetune with no corpus: the samples feed the fine-tune, and a re-run reuses them."""
    finetune = {"steps": 2, "seq_len": 32, "batch_size": 2, "eval_tokens": 64}
    samples = {"tokens": "1K", "length": 32, "batch_size": 8}
    path = write_recipe(workdir, finetune=finetune, samples=samples, calibration=None, eval=None)
    assert "sample 1,000 tokens of sequences to out/tiny-samples.npy" in cli("validate", path).output
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "sample    src -> out/tiny-samples.npy (1,000 tokens)" in result.output
    ids = np.load(workdir / "out" / "tiny-samples.npy")
    assert ids.shape == (1024,) and (ids.reshape(-1, 32)[:, 0] == 1).all()  # sequences from BOS
    records = json.loads((workdir / "out" / "tiny" / "factorconv_run.json").read_text())
    assert records["finetune"]["data"] == ["out/tiny-samples.npy"] and records["samples"]["tokens"] == 1000

    result = cli("run", path)  # the healed model is complete: nothing sampled or trained
    assert "sample" not in result.output and "finetune  reusing" in result.output, result.output
    result = cli("run", path, "--set", "finetune.steps=3")  # other healing, same samples: reused
    assert result.exit_code == 0, result.output
    assert "sample    reusing out/tiny-samples.npy" in result.output and "finetune  out/tiny-converted" in result.output
    result = cli("run", path, "--set", "samples.seed=1")  # other samples: sampled and fine-tuned again
    assert result.exit_code == 0, result.output
    assert "sample    src -> out/tiny-samples.npy" in result.output and "finetune  out/tiny-converted" in result.output
    assert not (ids == np.load(workdir / "out" / "tiny-samples.npy")).all()

    line = one_error_line(cli("validate", path, "--set", "samples.batch_size=0"))
    assert "samples.batch_size: input should be greater than or equal to 1 (got 0)" in line
    line = one_error_line(cli("run", write_recipe(workdir, samples=samples)))
    assert "tiny.yaml: samples: healing data needs a finetune section" in line


def test_run_knows_what_an_interrupted_finetune_leaves():
    """`run` resumes (never refuses) a fine-tuning output holding only checkpoints and metrics."""
    from factorconv.finetune.checkpoints import CHECKPOINTS
    from factorconv.finetune.metrics import METRICS_FILE
    from factorconv.run import FINETUNE_WORK_FILES

    assert set(FINETUNE_WORK_FILES) == {CHECKPOINTS, METRICS_FILE}


def test_run_resumes_an_interrupted_finetune_folder(workdir):
    finetune = {"data": "calib.txt", "steps": 1, "seq_len": 32, "batch_size": 2, "eval_tokens": 64}
    path = write_recipe(workdir, finetune=finetune, calibration=None, eval=None)
    (workdir / "out" / "tiny").mkdir(parents=True)
    (workdir / "out" / "tiny" / "finetune_metrics.jsonl").write_text('{"step": 0}\n')  # killed before a checkpoint
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert (workdir / "out" / "tiny" / "factorconv_run.json").is_file()
