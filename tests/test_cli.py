"""The command line: happy paths, and for every bad input a one-line error, non-zero exit and nothing written."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB, random_ids
from transformers import GPT2Config, GPT2LMHeadModel

import factorconv
from factorconv.cli import main


def run(*args: str):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def assert_clean_failure(result, parent, *needles: str) -> str:
    """Non-zero exit, one `Error: ...` line naming the problem, no traceback, nothing left in `parent`."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    message = lines[0]
    assert message.startswith("Error: "), message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    if parent is not None:
        assert list(parent.iterdir()) == [], list(parent.iterdir())
    return message


def table_rows(output: str) -> dict[str, list[str]]:
    lines = [line for line in output.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    assert set("-") == set(lines[1].replace(" ", ""))
    rows = {}
    for line in lines[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture
def parent(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, random_ids(1, 300, seed=90)[0].numpy().astype(np.uint16))
    return path


# --- happy paths ------------------------------------------------------------------------------------------------------


def test_convert_then_eval(source_dirs, parent, token_file):
    out = parent / "gqa-tpa"
    result = run("convert", source_dirs["llama_gqa"], out, "--contextual", "--rank-q", "8")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert [p.name for p in parent.iterdir()] == ["gqa-tpa"]  # no staging left behind
    config = json.loads((out / "config.json").read_text())
    assert config["tpa_contextual"] is True and config["tpa_rank_q"] == [8, 8]

    result = run(
        "eval", out, "--data", token_file, "--compare", source_dirs["llama_gqa"], "--seq-len", 64, "--max-tokens", 250
    )
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    rows = table_rows(result.output)
    assert list(rows) == ["source: llama_gqa", "model: gqa-tpa"]
    source, model = rows["source: llama_gqa"], rows["model: gqa-tpa"]
    # Full rank: the same perplexity; a plausible one for random weights over a 128-token vocabulary.
    assert model["perplexity"] == source["perplexity"]
    assert 1 < float(source["perplexity"]) < 10 * VOCAB
    # Contextual full rank caches (2 + 2) * (16 + 8) numbers per layer: 1.5x the source's 2 * 2 * 16.
    assert source["KV B/token"] == source["KV B/token measured"] == f"{2 * 2 * 16 * 2 * 4:,}"
    assert model["KV B/token"] == model["KV B/token measured"] == f"{4 * 24 * 2 * 4:,}"
    assert model["KV vs first"] == "150.0%" and source["KV vs first"] == "100.0%"


def test_eval_rank_reduced_text_file(source_dirs, parent, tmp_path):
    """A .txt file evaluated with the tokenizer that travelled with the weights; lower rank, smaller cache."""
    out = parent / "r1"
    assert run("convert", source_dirs["llama_gqa"], out, "--rank-k", "1", "--rank-v", "1").exit_code == 0
    gen = np.random.default_rng(0)
    text = tmp_path / "words.txt"
    text.write_text("\n".join(" ".join(f"w{i}" for i in gen.integers(0, 125, 20)) for _ in range(15)))
    result = run("eval", out, "--data", text, "--compare", source_dirs["llama_gqa"], "--seq-len", 50)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    source, model = rows["source: llama_gqa"], rows["model: r1"]
    assert model["KV vs first"] == "50.0%"
    assert model["KV B/token"] == model["KV B/token measured"] == f"{2 * 16 * 2 * 4:,}"
    assert float(model["perplexity"]) != float(source["perplexity"])

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in text.read_text().splitlines()))
    result = run("eval", out, "--data", jsonl, "--seq-len", 50)
    assert result.exit_code == 0, result.output
    assert list(table_rows(result.output)) == ["model: r1"]


def test_convert_overwrite(source_dirs, parent):
    out = parent / "out"
    assert run("convert", source_dirs["llama_mha"], out).exit_code == 0
    result = run("convert", source_dirs["llama_mha"], out, "--rank-k", "2")
    assert_clean_failure(result, None, "exists", "--overwrite")
    assert json.loads((out / "config.json").read_text())["tpa_rank_k"] == [4, 4]  # untouched

    result = run("convert", source_dirs["llama_mha"], out, "--rank-k", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["tpa_rank_k"] == [2, 2]
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_real_entry_point_prints_one_line(source_dirs, tmp_path):
    """`python -m factorconv` (not CliRunner): the error is one stderr line, no traceback."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "factorconv", "convert", str(source_dirs["llama_gqa"]), str(tmp_path / "o"), "--rank-k", "99"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "Error: --rank-k 99 is out of range: it must be between 1 and 2 (the source's KV heads)"
    ]
    assert not (tmp_path / "o").exists()


def test_version_and_help():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and factorconv.__version__ in result.output
    result = CliRunner().invoke(main, ["convert", "--help"])
    assert result.exit_code == 0 and "--rank-k" in result.output


# --- bad inputs -------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_source(source_dirs, tmp_path):
    """A copy of a good source to damage."""

    def make(name: str = "llama_gqa"):
        folder = tmp_path / "broken"
        shutil.copytree(source_dirs[name], folder)
        return folder

    return make


def test_unsupported_architecture_gpt2(tmp_path, parent):
    source = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(source)
    message = assert_clean_failure(run("convert", source, parent / "out"), parent, "unsupported architecture")
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message


def test_unsupported_architecture_name(broken_source, parent):
    source = broken_source()
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run("convert", source, parent / "out"), parent, "unsupported architecture FooForCausalLM")


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--rank-k", "99", "--rank-k 99 is out of range"),
        ("--rank-v", "3", "--rank-v 3 is out of range"),
        ("--rank-q", "9", "--rank-q 9 is out of range"),
        ("--rank-k", "0", "invalid --rank-k"),
    ],
)
def test_rank_out_of_range(source_dirs, parent, flag, value, needle):
    assert_clean_failure(run("convert", source_dirs["llama_gqa"], parent / "out", flag, value), parent, needle)


def test_missing_safetensors(broken_source, parent):
    source = broken_source()
    (source / "model.safetensors").unlink()
    assert [p.name for p in source.iterdir() if p.suffix == ".safetensors"] == []
    assert_clean_failure(run("convert", source, parent / "out"), parent, "no model.safetensors")


def test_config_only_folder(source_dirs, tmp_path, parent):
    source = tmp_path / "config_only"
    source.mkdir()
    shutil.copy(source_dirs["llama_gqa"] / "config.json", source / "config.json")
    assert_clean_failure(run("convert", source, parent / "out"), parent, "safetensors")


def test_corrupt_safetensors(broken_source, parent):
    source = broken_source()
    (source / "model.safetensors").write_bytes(b"this is not a safetensors file" * 100)
    assert_clean_failure(run("convert", source, parent / "out"), parent, "corrupt", "model.safetensors")


def test_truncated_safetensors(broken_source, parent):
    source = broken_source()
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_failure(run("convert", source, parent / "out"), parent, "model.safetensors")


def test_missing_shard(tmp_path, source_model, parent):
    source = tmp_path / "sharded"
    source_model("llama_gqa").save_pretrained(source, max_shard_size="20KB")
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert_clean_failure(run("convert", source, parent / "out"), parent, "missing shard", shards[-1].name)


def test_index_lists_missing_tensor(tmp_path, source_model, parent):
    source = tmp_path / "sharded"
    source_model("llama_gqa").save_pretrained(source, max_shard_size="20KB")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = first_shard
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(run("convert", source, parent / "out"), parent, "lacks tensors", "ghost")


@pytest.mark.parametrize("content", ["{not json", '{"weight_map_missing": {}}'])
def test_corrupt_index(broken_source, parent, content):
    source = broken_source()
    (source / "model.safetensors.index.json").write_text(content)
    assert_clean_failure(run("convert", source, parent / "out"), parent, "corrupt model.safetensors.index.json")


def test_invalid_config_json(broken_source, parent):
    source = broken_source()
    (source / "config.json").write_text("{not json")
    assert_clean_failure(run("convert", source, parent / "out"), parent, "cannot read", "config.json")


def test_missing_layers(broken_source, parent):
    source = broken_source()
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (source / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run("convert", source, parent / "out"), parent, "lacks model.layers.2.", "incomplete")


def _rewrite_weights(source, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})


def test_missing_or_unexpected_tensors(broken_source, parent):
    """A checkpoint without a tensor the architecture needs (or with one it does not use) never converts."""
    source = broken_source()
    _rewrite_weights(source, lambda t: t.pop("model.norm.weight"))
    assert_clean_failure(run("convert", source, parent / "out"), parent, "lacks model.norm.weight", "incomplete")
    shutil.rmtree(source)
    source = broken_source()
    _rewrite_weights(source, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    assert_clean_failure(run("convert", source, parent / "out"), parent, "q_norm.weight", "does not use")


def test_non_finite_weights_clean_staging(broken_source, parent):
    """Found only after writing started (norm.weight is read last): still no output and no staging folder."""
    source = broken_source()
    _rewrite_weights(source, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    assert_clean_failure(run("convert", source, parent / "out"), parent, "model.norm.weight", "NaN or inf")


def test_source_is_a_file(source_dirs, parent):
    assert_clean_failure(
        run("convert", source_dirs["llama_gqa"] / "config.json", parent / "out"), parent, "is a file"
    )


def test_output_exists_without_overwrite(source_dirs, parent):
    out = parent / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(run("convert", source_dirs["llama_gqa"], out), None, "exists", "--overwrite")
    assert [p.name for p in parent.iterdir()] == ["taken"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_dtype(source_dirs, parent):
    assert_clean_failure(
        run("convert", source_dirs["llama_gqa"], parent / "out", "--dtype", "float8"), parent, "dtype"
    )


def test_unknown_device(source_dirs, parent):
    assert_clean_failure(
        run("convert", source_dirs["llama_gqa"], parent / "out", "--device", "tpu9"), parent, "device", "tpu9"
    )


@pytest.mark.parametrize("device", ["xpu", "meta"])
def test_device_torch_knows_but_cannot_use(source_dirs, parent, device):
    """Device types torch parses but that cannot convert here get the same one-line error as cuda/mps."""
    assert_clean_failure(
        run("convert", source_dirs["llama_gqa"], parent / "out", "--device", device), parent, "device", device
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--to", "mfa", "--rank-k", "1"], "--rank-k applies to --to tpa"),
        (["--contextual", "--key-dim", "8"], "--key-dim applies to --to mfa"),
    ],
)
def test_options_for_another_target(source_dirs, parent, args, needle):
    assert_clean_failure(run("convert", source_dirs["llama_gqa"], parent / "out", *args), parent, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(source_dirs, parent):
    assert_clean_failure(
        run("convert", source_dirs["llama_gqa"], parent / "out", "--device", "cuda"), parent, "not available"
    )


@pytest.mark.parametrize("size", ["lots", "12XB", "0", "0.0001KB", "-5MB"])
def test_bad_max_shard_size(source_dirs, parent, size):
    assert_clean_failure(
        run("convert", source_dirs["llama_gqa"], parent / "out", "--max-shard-size", size), parent, "shard size"
    )


def test_nonexistent_source_path(tmp_path, parent):
    missing = tmp_path / "no" / "such" / "model"
    assert_clean_failure(run("convert", missing, parent / "out"), parent, str(missing), "no such folder")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="only offline: never reach the Hub")
def test_hub_id_not_available_offline(parent):
    assert_clean_failure(
        run("convert", "no-such-org/no-such-model", parent / "out"), parent, "could not download no-such-org/no-such-model"
    )


def test_eval_text_without_tokenizer(converted, tmp_path):
    text = tmp_path / "words.txt"
    text.write_text("w1 w2 w3 w4")
    assert_clean_failure(run("eval", converted("llama_mha"), "--data", text), None, "no tokenizer")


def test_eval_missing_data_file(converted, tmp_path):
    assert_clean_failure(
        run("eval", converted("llama_mha"), "--data", tmp_path / "nope.npy"), None, "nope.npy", "not found"
    )


def test_eval_seq_len_beyond_context(converted, token_file):
    assert_clean_failure(
        run("eval", converted("llama_mha"), "--data", token_file, "--seq-len", "4096"), None, "exceeds", "128"
    )


def test_eval_bad_jsonl(converted, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "w1 w2"}\nnot json\n')
    assert_clean_failure(run("eval", converted("llama_gqa"), "--data", data), None, "text")


def test_eval_token_ids_beyond_vocabulary(converted, tmp_path):
    """Ids from another tokenizer are a user error: a one-line message, not an IndexError traceback."""
    data = tmp_path / "other_tokenizer.npy"
    np.save(data, np.arange(100, 400, dtype=np.int64))  # vocabulary is 128
    assert_clean_failure(run("eval", converted("llama_mha"), "--data", data, "--seq-len", "32"), None, "vocab")


def test_overwrite_output_that_is_a_file(source_dirs, parent):
    """--overwrite replaces folders we wrote, never a user's *file*: a one-line error naming it, the file kept as it
    was, no staging debris."""
    out = parent / "taken"
    out.write_text("not a folder")
    result = run("convert", source_dirs["llama_gqa"], out, "--overwrite")
    assert_clean_failure(result, None, f"output {out} is a file, not a folder")
    assert [p.name for p in parent.iterdir()] == ["taken"] and out.read_text() == "not a folder"


# --- the evaluation library -------------------------------------------------------------------------------------------


def test_perplexity_predicts_every_token_once(source_model):
    """Windows of seq_len overlap by one token, so every token after the first is predicted exactly once."""
    from factorconv.evaluate.perplexity import perplexity

    model = source_model("llama_mha")
    tokens = random_ids(1, 150, seed=93)[0]
    seq_len = 40  # windows start at 0, 39, 78, 117; the last one (33 tokens) is shorter and batched with padding
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 149, seq_len - 1):
            window = tokens[start : start + seq_len][None]
            loss = model(window, labels=window).loss
            total += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert count == 149
    expected = float(np.exp(total / count))
    for batch_size in (1, 3, 8):
        got = perplexity(model, tokens, seq_len, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)
    # One window covering everything is the plain full-context perplexity.
    with torch.no_grad():
        full = float(np.exp(float(model(tokens[None], labels=tokens[None]).loss)))
    assert perplexity(model, tokens, 150, progress=False) == pytest.approx(full, rel=1e-5)


def test_load_tokens(tmp_path):
    from factorconv.errors import FactorConvError
    from factorconv.data import load_tokens

    from conftest import tiny_tokenizer

    npy = tmp_path / "ids.npy"
    np.save(npy, np.array([[5, 6, 7], [8, 9, 10]], dtype=np.uint16))
    assert load_tokens(npy).tolist() == [5, 6, 7, 8, 9, 10]
    assert load_tokens(npy, max_tokens=4).tolist() == [5, 6, 7, 8]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "w0 w1"}\n\n{"text": "w2"}\n')
    assert load_tokens(jsonl, tiny_tokenizer()).tolist() == [3, 4, 5]
    with pytest.raises(FactorConvError, match="fewer than 2 tokens"):
        load_tokens(npy, max_tokens=1)
    with pytest.raises(FactorConvError, match="not found"):
        load_tokens(tmp_path / "missing.txt")


@pytest.mark.parametrize("case", ["float_npy", "object_npy", "corrupt_npy", "latin1_txt"])
def test_bad_token_files_for_eval(converted, tmp_path, case):
    """Data that would silently become token 0, unpickle, or crash the tokenizer: one line instead."""
    data = tmp_path / ("data.txt" if case.endswith("txt") else "data.npy")
    if case == "float_npy":
        np.save(data, np.linspace(3.2, 90.7, 64))
    elif case == "object_npy":
        np.save(data, np.array([{"ids": [1, 2]}], dtype=object), allow_pickle=True)
    elif case == "corrupt_npy":
        data.write_bytes(b"\x93NUMPY garbage")
    else:
        data.write_bytes("caf\xe9 w3 w4".encode("latin-1"))
    needle = {"float_npy": "token ids must be integers", "object_npy": "not a readable .npy",
              "corrupt_npy": "not a readable .npy", "latin1_txt": "not UTF-8"}[case]
    assert_clean_failure(run("eval", converted("llama_gqa"), "--data", data), None, needle)


def test_non_finite_perplexity_is_an_error(converted, tmp_path):
    """A model with corrupted weights does not print `nan` as its perplexity."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "corrupt"
    shutil.copytree(converted("llama_gqa"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "ids.npy"
    np.save(data, random_ids(1, 64, seed=3).numpy())
    assert_clean_failure(run("eval", folder, "--data", data), None, "non-finite", "corrupt")


def test_relative_path_typo_is_not_a_hub_id(parent, monkeypatch):
    """'../x' and './x' look like 'org/model' to a regex; they are missing folders, said in one line."""
    monkeypatch.chdir(parent)
    for typo in ("../stories260K-hf", "./nothing/here", "~/nothing"):
        assert_clean_failure(run("convert", typo, "out"), parent, "no such folder")


def test_source_recorded_as_an_absolute_path(source_dirs, tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(source_dirs["llama_gqa"].parent)
    assert run("convert", source_dirs["llama_gqa"].name, tmp_path / "out").exit_code == 0
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["source_model"]
    assert os.path.isabs(recorded) and recorded == str(source_dirs["llama_gqa"].resolve())
