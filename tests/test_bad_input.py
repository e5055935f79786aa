"""Every bad input a hostile user tried, in one table: exit code not 0, one line on stderr that names the problem,
no traceback, and nothing left on disk (no output folder, staging folder or lock)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from factorconv.cli import main


class Workspace:
    """A folder of good and damaged inputs; every case runs with it as the current directory."""

    def __init__(self, root: Path, source: Path, model: Path) -> None:
        self.root = root
        self.src = self.copy(source, "src")
        self.model = self.copy(model, "model")
        np.save(root / "ids.npy", np.random.default_rng(0).integers(3, VOCAB, size=4096))
        (root / "notes.txt").write_text("w3 w4 w5 " * 200)

    def copy(self, folder: Path, name: str) -> Path:
        shutil.copytree(folder, self.root / name)
        return self.root / name

    def damaged(self, name: str, edit) -> Path:
        folder = self.copy(self.src, name)
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    def file(self, name: str, data: bytes) -> Path:
        (self.root / name).write_bytes(data)
        return self.root / name


def _gpt2(ws: Workspace) -> Path:
    folder = ws.root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    return folder


def _bin_only(ws: Workspace) -> Path:
    folder = ws.copy(ws.src, "bin_only")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _index_missing_shard(ws: Workspace) -> Path:
    folder = ws.copy(ws.src, "no_shard")
    names = list(load_file(folder / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    return folder


def _foreign(ws: Workspace) -> Path:
    (ws.root / "photos").mkdir()
    (ws.root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return ws.root / "photos"


def _link(ws: Workspace) -> Path:
    (ws.root / "real").mkdir()
    (ws.root / "link").symlink_to(ws.root / "real")
    return ws.root / "link"


def _nan_model(ws: Workspace) -> Path:
    folder = ws.copy(ws.model, "nan_model")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _without_norm(ws: Workspace) -> Path:
    folder = ws.copy(ws.model, "no_norm_model")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _recipe(ws: Workspace, **changes) -> Path:
    recipe = {"source": str(ws.src), "target": {"kind": "mfa", "kv_budget": 0.5}, "output": {"dir": "out/r"}}
    recipe.update(changes)
    path = ws.root / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


MFA = ["--to", "mfa", "--kv-budget", "0.5"]

# (case, arguments from the workspace, words the error line must contain)
CASES = [
    # convert: sources
    ("source missing", lambda w: ["convert", "no/such/folder/here", "out"], ["no/such/folder/here"]),
    ("source relative typo", lambda w: ["convert", "../src-typo", "out"], ["no such folder"]),
    ("source is a file", lambda w: ["convert", w.root / "notes.txt", "out"], ["is a file"]),
    ("source gpt2", lambda w: ["convert", _gpt2(w), "out"], ["unsupported architecture GPT2LMHeadModel"]),
    ("source only .bin", lambda w: ["convert", _bin_only(w), "out"], ["no model.safetensors"]),
    ("source missing shard", lambda w: ["convert", _index_missing_shard(w), "out"], ["missing shard"]),
    ("source corrupt shard", lambda w: ["convert", _corrupt(w), "out"], ["corrupt safetensors"]),
    ("source lacks a tensor", lambda w: ["convert", w.damaged("no_norm", lambda t: t.pop("model.norm.weight")), "out"],
     ["lacks model.norm.weight"]),
    ("source extra tensor", lambda w: ["convert", w.damaged("qk_norm", lambda t: t.update(
        {"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})), "out"], ["does not use"]),
    ("source NaN weights", lambda w: ["convert", w.damaged("nan", lambda t: t["model.norm.weight"].fill_(float("inf"))),
                                      "out"], ["NaN or inf"]),
    # convert: options
    ("unknown target", lambda w: ["convert", w.src, "out", "--to", "mla"], ["--to", "mla"]),
    ("unknown flag", lambda w: ["convert", w.src, "out", "--rnak-k", "1"], ["no such option"]),
    ("missing argument", lambda w: ["convert", w.src], ["missing argument 'OUTPUT'"]),
    ("rank too large", lambda w: ["convert", w.src, "out", "--rank-k", "99"], ["--rank-k 99 is out of range"]),
    ("rank zero", lambda w: ["convert", w.src, "out", "--rank-k", "0"], ["invalid --rank-k"]),
    ("budget zero", lambda w: ["convert", w.src, "out", *MFA[:2], "--kv-budget", "0"], ["invalid --kv-budget"]),
    ("budget above one", lambda w: ["convert", w.src, "out", *MFA[:2], "--kv-budget", "1.5"], ["--kv-budget"]),
    ("odd key width", lambda w: ["convert", w.src, "out", "--to", "mfa", "--key-dim", "3"], ["must be even"]),
    ("unknown dtype", lambda w: ["convert", w.src, "out", "--dtype", "float8"], ["invalid --dtype", "bfloat16"]),
    ("unknown device", lambda w: ["convert", w.src, "out", "--device", "quantum"], ["unknown device 'quantum'"]),
    ("absent device", lambda w: ["convert", w.src, "out", "--device", "cuda:7"], ["not available"]),
    ("bad shard size", lambda w: ["convert", w.src, "out", "--max-shard-size", "lots"], ["not a size"]),
    ("als without contextual", lambda w: ["convert", w.src, "out", "--init", "als", "--calib", w.root / "ids.npy"],
     ["contextual"]),
    # convert: calibration data
    ("calib missing", lambda w: ["convert", w.src, "out", *MFA, "--calib", "nothing.npy"], ["not found"]),
    ("calib float npy", lambda w: ["convert", w.src, "out", *MFA, "--calib", _npy(w, np.linspace(3, 9, 512))],
     ["must be integers"]),
    ("calib pickled npy", lambda w: ["convert", w.src, "out", *MFA, "--calib", _pickled(w)], ["not a readable .npy"]),
    ("calib outside vocabulary", lambda w: ["convert", w.src, "out", *MFA, "--calib", _npy(w, np.arange(500, 2500))],
     ["token id", "vocabulary has 128"]),
    ("calib beyond context", lambda w: ["convert", w.src, "out", *MFA, "--calib", w.root / "ids.npy",
                                        "--calib-seq-len", "4096"], ["exceeds the model's context of 128"]),
    ("calib too short", lambda w: ["convert", w.src, "out", *MFA, "--calib", _npy(w, np.arange(3, 40)),
                                   "--calib-seq-len", "32"], ["fewer than 2 sequences"]),
    ("calib not utf-8", lambda w: ["convert", w.src, "out", *MFA, "--calib",
                                   w.file("latin.txt", "caf\xe9 ".encode("latin-1") * 100)], ["not UTF-8"]),
    # convert: outputs
    ("output exists", lambda w: ["convert", w.src, w.model], ["exists", "--overwrite"]),
    ("output foreign", lambda w: ["convert", w.src, _foreign(w), "--overwrite"], ["not a factorconv output"]),
    ("output is cwd", lambda w: ["convert", w.src, ".", "--overwrite"], ["current folder"]),
    ("output is the source", lambda w: ["convert", w.model, w.model / "inner", "--overwrite"],
     ["would overwrite the input"]),
    ("output is a link", lambda w: ["convert", w.src, _link(w), "--overwrite"], ["symbolic link"]),
    ("output under a file", lambda w: ["convert", w.src, w.root / "notes.txt" / "out"], ["parent of output"]),
    # plan / eval
    ("plan relative typo", lambda w: ["plan", "./srcx", *MFA], ["no such folder"]),
    ("eval data missing", lambda w: ["eval", w.model, "--data", "nothing.txt"], ["not found"]),
    ("eval data is a folder", lambda w: ["eval", w.model, "--data", w.src], ["is a folder"]),
    ("eval pickled folder", lambda w: ["eval", _bin_only(w), "--data", w.root / "ids.npy"], ["pickled .bin"]),
    ("eval outside vocabulary", lambda w: ["eval", w.model, "--data", _npy(w, np.arange(100, 400))], ["token id"]),
    ("eval beyond context", lambda w: ["eval", w.model, "--data", w.root / "ids.npy", "--seq-len", "4096"],
     ["exceeds"]),
    ("eval corrupt weights", lambda w: ["eval", _nan_model(w), "--data", w.root / "ids.npy"], ["non-finite"]),
    # recipes
    ("recipe missing", lambda w: ["validate", "nothing.yaml"], ["not found"]),
    ("recipe typo", lambda w: ["validate", _recipe(w, target={"kind": "mfa", "kv_budjet": 0.5})], ["kv_budget"]),
    ("recipe device", lambda w: ["validate", _recipe(w, device="quantum")], ["unknown device 'quantum'"]),
    ("recipe output is cwd", lambda w: ["validate", _recipe(w, output={"dir": "."},
                                                            finetune={"data": "ids.npy", "steps": 1})],
     ["output.dir", "not a new folder"]),
    # push
    ("push incomplete", lambda w: ["push", w.src, "me/model"], ["not a complete factorconv output"]),
    ("push lacks a tensor", lambda w: ["push", _without_norm(w), "me/model"], ["lack model.norm.weight"]),
    ("eval lacks a tensor", lambda w: ["eval", _without_norm(w), "--data", w.root / "ids.npy"],
     ["lacks model.norm.weight", "incomplete"]),
    ("push bad repo id", lambda w: ["push", w.model, "not a repo"], ["not of the form"]),
    ("push without token", lambda w: ["push", w.model, "me/model"], ["no hugging face token"]),
    # finetune
    ("finetune no data", lambda w: ["finetune", w.model, "healed", "--data", "nothing.txt", "--steps", "1"],
     ["no training data found"]),
    ("finetune batch beyond data", lambda w: ["finetune", w.model, "healed", "--data", w.root / "ids.npy",
                                              "--seq-len", "64", "--batch-size", "100000", "--steps", "1"],
     ["more than the", "training blocks"]),
    ("finetune resume and overwrite", lambda w: ["finetune", w.model, "healed", "--data", w.root / "ids.npy",
                                                 "--resume", "--overwrite"], ["--resume"]),
    ("finetune into cwd", lambda w: ["finetune", w.model, ".", "--data", w.root / "ids.npy", "--overwrite"],
     ["current folder"]),
    ("finetune over a foreign folder", lambda w: ["finetune", w.model, _foreign(w), "--data", w.root / "ids.npy",
                                                  "--overwrite", "--steps", "1"], ["not a factorconv output"]),
    ("finetune into its input", lambda w: ["finetune", w.model, w.model / "healed", "--data", w.root / "ids.npy",
                                           "--steps", "1"], ["would overwrite the input"]),
]


def _npy(ws: Workspace, values) -> Path:
    path = ws.root / f"data{len(list(ws.root.glob('data*.npy')))}.npy"
    np.save(path, np.asarray(values))
    return path


def _pickled(ws: Workspace) -> Path:
    path = ws.root / "pickled.npy"
    np.save(path, np.array([{"ids": [1, 2]}], dtype=object), allow_pickle=True)
    return path


def _corrupt(ws: Workspace) -> Path:
    folder = ws.copy(ws.src, "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return folder


def test_the_table_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case, arguments, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, arguments, needles, source_dirs, converted, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws", source_dirs["llama_gqa"], converted("llama_gqa"))
    monkeypatch.chdir(ws.root)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    args = [str(a) for a in arguments(ws)]
    before = sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*"))
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code not in (0, None), (case, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (case, repr(result.exception))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), (case, result.stderr)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (case, needle, lines[0])
    after = sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*"))
    assert after == before, (case, sorted(set(after) ^ set(before)))
    assert not os.environ.get("HF_TOKEN")
