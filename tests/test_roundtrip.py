"""Converted folders are self-contained Hugging Face models: they load without factorconv, shard, and round-trip."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from conftest import random_ids
from safetensors import safe_open

import factorconv
from factorconv.convert import convert
from factorconv.convert.artifacts import RECIPE_FILE, REPORT_FILE
from factorconv.convert.options import ConvertOptions

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import numpy as np
    import torch

    try:
        import factorconv  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("factorconv is importable in the child: " + factorconv.__file__)

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    jobs = json.loads(Path(sys.argv[1]).read_text())
    ids = torch.from_numpy(np.load(sys.argv[2]))
    report = {}
    for i, folder in enumerate(jobs):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                do_sample=False, pad_token_id=0, return_dict_in_generate=True,
            )
        np.save(Path(sys.argv[3]) / f"logits{i}.npy", logits.numpy())
        np.save(Path(sys.argv[3]) / f"tokens{i}.npy", out.sequences.numpy())
        modeling = sys.modules[type(model).__module__]
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            hidden = base(ids, use_cache=False).last_hidden_state
        report[folder] = {
            "class_module": type(model).__module__,
            "cache_layers": sorted({type(layer).__name__ for layer in modeling.output_cache(out).layers}),
            "base_class": type(base).__name__,
            "base_matches": bool(torch.allclose(model.lm_head(hidden), logits, atol=1e-5)),
        }
        if Path(folder, "tokenizer_config.json").is_file():  # users load tokenizers without trust_remote_code
            report[folder]["tokenizer"] = type(AutoTokenizer.from_pretrained(folder)).__name__
    report["factorconv_loaded"] = any(name.split(".")[0] == "factorconv" for name in sys.modules)
    Path(sys.argv[3], "report.json").write_text(json.dumps(report))
    """
)


def _child_env(tmp: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp / "hf_modules"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
        )


@pytest.fixture(scope="module")
def sharded(converted):
    return converted("llama_gqa", max_shard_size="20KB", contextual=True)


def run_without_factorconv(
    tmp_path: Path, folders: list[Path], ids: torch.Tensor, python: str = sys.executable
) -> tuple[dict, Path]:
    """Load each folder with trust_remote_code in a fresh interpreter, run from outside the repo, where
    `import factorconv` fails (a shadowing package that raises ImportError comes first on sys.path)."""
    shadow = tmp_path / "shadow"
    (shadow / "factorconv").mkdir(parents=True)
    (shadow / "factorconv" / "__init__.py").write_text("raise ImportError('factorconv is not installed here')\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "child.py").write_text(CHILD)
    (work / "jobs.json").write_text(json.dumps([str(f) for f in folders]))
    np.save(work / "ids.npy", ids.numpy())
    results = work / "results"
    results.mkdir()
    proc = subprocess.run(
        [python, "child.py", "jobs.json", "ids.npy", str(results)],
        cwd=work,
        env=_child_env(tmp_path, shadow),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((results / "report.json").read_text())
    assert report["factorconv_loaded"] is False
    return report, results


def assert_same_as_in_process(report: dict, results: Path, folders: list[Path], ids: torch.Tensor, load_model):
    for i, folder in enumerate(folders):
        entry = report[str(folder)]
        assert entry["class_module"].startswith("transformers_modules."), entry
        assert entry["cache_layers"] == ["DynamicLayer"], entry
        assert entry["base_class"] == "FactorConvModel" and entry["base_matches"], entry
        if (folder / "tokenizer_config.json").is_file():
            assert entry["tokenizer"].endswith("Fast") or entry["tokenizer"].endswith("Backend"), entry
        model = load_model(folder)
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
        got = torch.from_numpy(np.load(results / f"logits{i}.npy"))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert torch.equal(torch.from_numpy(np.load(results / f"tokens{i}.npy")), _generate(model, ids))


def test_loads_with_remote_code_where_factorconv_is_missing(tmp_path, converted, sharded, load_model):
    folders = [
        converted("llama_gqa"),
        converted("qwen2_gqa", contextual=True, rank_q=4, rank_k=1),
        converted("llama3_rope"),
        sharded,
        converted("qwen2_gqa", to="mfa", key_dim=12, value_dim=20, query_rank=40),
        converted("llama3_rope", to="mfa_kr", rope_dim=16, nope_dim=24),
    ]
    ids = random_ids(2, 12, seed=80)
    report, results = run_without_factorconv(tmp_path, folders, ids)
    assert_same_as_in_process(report, results, folders, ids, load_model)
    assert sum("tokenizer" in report[str(f)] for f in folders) == 2  # the two llama_gqa conversions carry one


@pytest.mark.skipif(not os.environ.get("FACTORCONV_OTHER_PYTHON"), reason="FACTORCONV_OTHER_PYTHON not set (CI sets it)")
def test_folders_written_here_load_under_the_other_transformers_release(tmp_path, converted, load_model):
    """CI runs the suite on the oldest and the newest transformers the range admits; each loads the other's work."""
    python = os.environ["FACTORCONV_OTHER_PYTHON"]
    other = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    assert other and other != transformers.__version__, (other, transformers.__version__)
    folders = [
        converted("llama_gqa", contextual=True, rank_k=1),
        converted("qwen2_gqa", to="mfa", key_dim=12, value_dim=20),
        converted("llama3_rope", to="mfa_kr", rope_dim=16, nope_dim=24),
    ]
    ids = random_ids(2, 12, seed=82)
    report, results = run_without_factorconv(tmp_path, folders, ids, python=python)
    assert_same_as_in_process(report, results, folders, ids, load_model)


def test_legacy_layer_types_are_read():
    """Folders written before the stock cache layers name a custom layer type; they load as full attention."""
    from factorconv.modeling import FactorConvConfig

    config = FactorConvConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_types=["factorconv"] * 2)
    assert not hasattr(config, "layer_types")
    with pytest.raises(ValueError, match="full attention"):
        FactorConvConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_types=["sliding_attention"] * 2)


def test_loads_without_remote_code_once_factorconv_is_imported(tmp_path, converted, load_model):
    folder = converted("mistral_gqa", contextual=True)
    ids = random_ids(1, 10, seed=81)
    np.save(tmp_path / "ids.npy", ids.numpy())
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        folder = {str(folder)!r}
        try:
            AutoModelForCausalLM.from_pretrained(folder)
        except Exception as err:
            print("without-import:", type(err).__name__)
        else:
            print("without-import: loaded")
        import factorconv
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        print("module:", type(model).__module__)
        with torch.no_grad():
            np.save("logits.npy", model(torch.from_numpy(np.load("ids.npy"))).logits.numpy())
        """
    )
    package_root = Path(factorconv.__file__).resolve().parents[1]  # importable whether installed or not
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_child_env(tmp_path, extra_path=package_root),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Without the import (and without trust_remote_code) transformers refuses the custom architecture ...
    assert "without-import: loaded" not in proc.stdout
    # ... with it, factorconv's own classes load the folder.
    assert "module: factorconv.modeling.modeling_factorconv" in proc.stdout
    with torch.no_grad():
        expected = load_model(folder)(ids).logits
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "logits.npy")), expected, atol=1e-6, rtol=0)


def test_sharded_output(sharded, converted, load_model):
    shards = sorted(sharded.glob("*.safetensors"))
    count = len(shards)
    assert count >= 3
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (sharded / "model.safetensors").exists()
    assert not list(sharded.glob("*.tmp"))

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    stored, total = {}, 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            names = set(f.keys())
            size = 0
            for name in names:
                assert name not in stored, f"{name} stored twice"
                stored[name] = shard.name
                tensor = f.get_tensor(name)
                size += tensor.numel() * tensor.element_size()
        # A shard exceeds the limit only when it holds a single tensor larger than the limit.
        assert size <= 20_000 or len(names) == 1, (shard.name, size, names)
        total += size
    assert weight_map == stored
    assert index["metadata"]["total_size"] == total

    model = load_model(sharded)
    expected_names = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected_names.discard("lm_head.weight")
    assert set(weight_map) == expected_names

    # The same weights as the unsharded conversion.
    unsharded = load_model(converted("llama_gqa", contextual=True))
    ids = random_ids(2, 16, seed=82)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unsharded(ids).logits, atol=0, rtol=0)


def test_single_shard_has_no_index(converted):
    folder = converted("llama_gqa")
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) == 1


def test_sharded_source_converts(tmp_path, converted, load_model, source_model):
    """A sharded *source* (index + shards) converts to the same model as the single-file one."""
    sharded_source = tmp_path / "sharded_source"
    source_model("llama_bias").save_pretrained(sharded_source, max_shard_size="20KB")
    assert (sharded_source / "model.safetensors.index.json").is_file()
    out = convert(ConvertOptions(source=str(sharded_source), output=tmp_path / "out"), progress=False)
    ids = random_ids(2, 16, seed=84)
    with torch.no_grad():
        got = load_model(out)(ids).logits
        expected = load_model(converted("llama_bias"))(ids).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_output_folder_contents(converted, source_dirs):
    folder = converted("llama_gqa", rank_k=1, contextual=True)
    for name in (
        "config.json",
        "configuration_factorconv.py",
        "modeling_factorconv.py",
        "generation_config.json",
        "README.md",
        RECIPE_FILE,
        REPORT_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "factorconv"
    assert config["architectures"] == ["FactorConvForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_factorconv.FactorConvConfig",
        "AutoModel": "modeling_factorconv.FactorConvModel",
        "AutoModelForCausalLM": "modeling_factorconv.FactorConvForCausalLM",
    }
    assert config["tpa_rank_k"] == [1, 1] and config["tpa_rank_v"] == [2, 2]
    assert config["tpa_contextual"] is True
    assert config["source_architecture"] == "LlamaForCausalLM"
    # The recipe is valid options again.
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())["convert"]
    options = ConvertOptions(**recipe)
    assert options.rank_k == 1 and options.contextual and options.source == str(source_dirs["llama_gqa"])
    report = json.loads((folder / REPORT_FILE).read_text())
    # contextual rank (1, 2): (1 + 2) * (head_dim 16 + 8 heads) per layer, 2 layers, fp32
    assert report["kv_bytes_per_token"] == {"source": 2 * 2 * 16 * 2 * 4, "converted": 3 * 24 * 2 * 4}
    # The tokenizer travelled with the weights.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder)("w1 w2")["input_ids"] == [4, 5]


def test_auto_dtype_follows_the_source(tmp_path, source_model):
    source = tmp_path / "bf16_source"
    copy_of = type(source_model("llama_gqa")).from_pretrained(source_model("llama_gqa").name_or_path)
    copy_of.to(torch.bfloat16).save_pretrained(source)
    out = convert(ConvertOptions(source=str(source), output=tmp_path / "out"), progress=False)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["kv_bytes_per_token"]["converted"] == 2 * 2 * 16 * 2 * 2


def test_resaved_model_stays_self_contained(tmp_path, converted, load_model):
    """Load (factorconv imported), save_pretrained (e.g. after fine-tuning): the new folder must still load with
    trust_remote_code where factorconv is missing, since its config.json keeps the auto_map."""
    from transformers import AutoModelForCausalLM

    resaved = tmp_path / "resaved"
    model = AutoModelForCausalLM.from_pretrained(converted("llama_gqa", rank_k=1, contextual=True))
    model.save_pretrained(resaved)
    config = json.loads((resaved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_factorconv.FactorConvForCausalLM"
    for name in ("configuration_factorconv.py", "modeling_factorconv.py"):
        assert (resaved / name).is_file(), f"{name} missing: auto_map points at code that is not in the folder"
    ids = random_ids(1, 9, seed=85)
    report, results = run_without_factorconv(tmp_path, [resaved], ids)
    assert_same_as_in_process(report, results, [resaved], ids, load_model)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_option(dtype, tmp_path, source_dirs, source_model):
    out = convert(
        ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "out", dtype=dtype), progress=False
    )
    torch_dtype = getattr(torch, dtype)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch_dtype}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["kv_bytes_per_token"] == {"source": 2 * 2 * 16 * 2 * 2, "converted": 2 * 2 * 16 * 2 * 2}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch_dtype
    ids = random_ids(1, 16, seed=83)
    # The same as the source with its weights rounded to that dtype (computed in fp32 on both sides).
    rounded = AutoModelForCausalLM.from_pretrained(source_dirs["llama_gqa"], dtype=torch_dtype).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(model.float()(ids).logits, rounded(ids).logits, atol=1e-4, rtol=0)
