"""Whole conversions along paths the unit tests reach only in parts: `--init query-aware`, greedy allocation inside
`convert` (it must apply what `factorconv plan` prints), and calibration from a `datasets` name (offline, from the
datasets cache), each through the CLI as a user runs it."""

import json
import random
import re
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import random_ids, tiny_tokenizer
from safetensors.torch import load_file
from tokenizers import processors

from factorconv.cli import main
from factorconv.convert import calibrate
from factorconv.modeling import FactorConvConfig
from factorconv.output_folder import RECIPE_FILE, REPORT_FILE

# 8 sequences of 16 tokens, refinement reduced to the output-projection refit: seconds per conversion, and the
# weights then come from the initialisation under test rather than from Adam.
CALIB = ["--calib-samples", "8", "--calib-seq-len", "16", "--refine-steps", "0"]


def cli(*args) -> str:
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def words(count: int, seed: int) -> str:
    """Text in the tiny tokenizer's vocabulary ('w0' ... 'w124'), one id per word."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(125)}" for _ in range(count))


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(words(400, seed=0))
    return path


def saved_options(folder) -> dict:
    """The options a conversion saved with its output (what ran, defaults resolved)."""
    return yaml.safe_load((folder / RECIPE_FILE).read_text())["convert"]


def attention_tensors(folder, layer: int = 0) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.self_attn."
    return {k[len(prefix):]: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(prefix)}


# --- init query-aware ---------------------------------------------------------------------------------------------


def test_query_aware_conversion_is_exact_at_full_width_and_changes_the_key_merge(
    source_dirs, source_model, load_model, calib_text, tmp_path
):
    src = source_dirs["llama_gqa"]
    full = tmp_path / "full"
    cli("convert", src, full, "--to", "mfa", "--calib", calib_text, "--init", "query-aware", *CALIB)
    assert saved_options(full)["init"] == "query-aware"
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        got, expected = load_model(full)(ids).logits, source_model("llama_gqa")(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # Below full key width the query weighting picks other key pairs than plain statistics on the same data;
    # the value basis does not depend on the queries.
    reduced = {}
    for init in ("query-aware", "stats"):
        reduced[init] = tmp_path / init
        cli("convert", src, reduced[init], "--to", "mfa", "--key-dim", "8", "--calib", calib_text, "--init", init,
            *CALIB)
        assert saved_options(reduced[init])["init"] == init
    aware, stats = attention_tensors(reduced["query-aware"]), attention_tensors(reduced["stats"])
    assert aware.keys() == stats.keys()
    assert torch.equal(aware["v_proj.weight"], stats["v_proj.weight"])
    assert (aware["k_proj.weight"] - stats["k_proj.weight"]).abs().max() > 1e-3


# --- greedy allocation inside convert -------------------------------------------------------------------------------


def plan_widths(output: str, names: tuple[str, ...]) -> list[dict[str, int]]:
    """The per-layer widths of `factorconv plan`'s table (its header names the width columns)."""
    lines = output.splitlines()
    header = lines[0].split()
    assert header[0] == "layer" and all(n in header for n in names), output
    rows = [line.split() for line in lines[1:] if re.match(r"\s*\d+\s", line)]
    return [{n: int(row[header.index(n)]) for n in names} for row in rows]


@pytest.mark.parametrize("target, names", [("mfa", ("key_dim", "value_dim")), ("mfa-kr", ("rope_dim", "nope_dim"))])
def test_greedy_allocation_in_convert_applies_the_plan(target, names, source_dirs, calib_text, tmp_path):
    src = source_dirs["llama_gqa"]
    budget = ["--kv-budget", "0.5", "--calib", calib_text, "--calib-samples", "8", "--calib-seq-len", "16"]
    planned = plan_widths(cli("plan", src, "--to", target, "--allocation", "greedy", *budget), names)
    uniform = plan_widths(cli("plan", src, "--to", target, "--allocation", "uniform", *budget), names)
    out = tmp_path / "greedy"
    cli("convert", src, out, "--to", target, "--allocation", "greedy", *budget, "--refine-steps", "0")

    config = FactorConvConfig.from_pretrained(out)
    written = [{n: getattr(config, n)[i] for n in names} for i in range(config.num_hidden_layers)]
    assert written == planned
    assert written != uniform  # greedy really ran: it spends the budget unevenly where the spectra differ
    # llama_gqa caches 2 KV heads x 16 for keys and values: 64 numbers per layer, 2 layers, half of them.
    assert sum(config.kv_cache_width(i) for i in range(config.num_hidden_layers)) <= 0.5 * 64 * 2
    recipe = saved_options(out)
    assert recipe["allocation"] == "greedy" and recipe["kv_budget"] == 0.5
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["kv_bytes_per_token"]["converted"] <= 0.5 * report["kv_bytes_per_token"]["source"]


# --- calibration from a datasets name -------------------------------------------------------------------------------


def cache_dataset(cache, name: str, rows: list[str], data_file) -> None:
    """Put `rows` in the datasets cache as `datasets.load_dataset(name)` leaves a Hub dataset there (config
    'default', a commit-hash folder), so that an offline load of `name` finds it and nothing reaches the Hub."""
    from datasets.packaged_modules.json.json import Json

    data_file.write_text("".join(f'{{"text": "{row}"}}\n' for row in rows))
    builder = Json(cache_dir=str(cache), dataset_name=name, hash="0" * 40, config_id="default",
                   data_files={"train": str(data_file)})
    builder.download_and_prepare()


def with_bos_tokenizer(source, folder):
    """A copy of `source` whose tokenizer starts every text with BOS, so rows and documents are visible in the ids."""
    shutil.copytree(source, folder)
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout", ["one row, as a .txt", "rows, as a .jsonl"])
def test_datasets_name_calibrates_on_the_same_tokens_as_a_file(layout, source_dirs, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the `datasets` extra; CI installs it
    assert datasets.config.HF_HUB_OFFLINE  # conftest: no test may reach the Hub
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    rows = [words(200, seed=1)] if layout.startswith("one") else [words(n, seed=n) for n in (40, 70, 55, 90)]
    if layout.startswith("one"):
        file = tmp_path / "calib.txt"
        file.write_text(rows[0])
    else:
        file = tmp_path / "calib.jsonl"  # cache_dataset writes the same rows as this file
    cache_dataset(tmp_path / "datasets-cache", "tiny_calib", rows, tmp_path / "rows.jsonl")
    if not file.exists():
        file.write_text((tmp_path / "rows.jsonl").read_text())

    fed: list[torch.Tensor] = []
    original = calibrate.LayerwiseRunner.__init__

    def spy(self, source, tokens, *args, **kwargs):
        fed.append(tokens.clone())
        original(self, source, tokens, *args, **kwargs)

    monkeypatch.setattr(calibrate.LayerwiseRunner, "__init__", spy)
    monkeypatch.chdir(tmp_path)  # 'tiny_calib' is no path here: it can only be a datasets name
    src = with_bos_tokenizer(source_dirs["llama_gqa"], tmp_path / "source")
    for calib in ("tiny_calib", str(file)):
        cli("convert", src, tmp_path / f"out-{len(fed)}", "--to", "mfa", "--key-dim", "8", "--calib", calib, *CALIB)
    from_name, from_file = fed
    assert from_name.shape == (8, 16)
    assert torch.equal(from_name, from_file)
    assert len(set(from_name.flatten().tolist())) > 20  # real text, not padding
    assert int((from_name == 1).sum()) == (1 if layout.startswith("one") else 3)  # BOS per row within 128 tokens
    assert saved_options(tmp_path / "out-0")["calib"] == "tiny_calib"
