"""`factorconv push` and the recipe's push stage, against a recording fake of HfApi (nothing reaches the Hub)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub.utils import filter_repo_objects

import factorconv.hub as hub
from factorconv.cli import main
from factorconv.hub import folder_problems

TOKEN = "hf_SentinelToken0123456789abcdefXYZ"


class FakeApi:
    """Records every call; `upload_folder` lists the files the real one would send (same pattern filtering)."""

    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def __init__(self, *args, **kwargs) -> None:
        FakeApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        relative = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        files = list(
            filter_repo_objects(relative, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=kwargs.get("ignore_patterns"))
        )
        FakeApi.calls.append(("upload_folder", {**kwargs, "files": files}))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc"

        return Commit()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.fail_with = [], None
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeApi


def cli(*args: str):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def calls(name: str) -> list[dict]:
    return [kwargs for call, kwargs in FakeApi.calls if call == name]


def assert_no_token(*texts: str, folder: Path | None = None) -> None:
    for text in texts:
        assert TOKEN not in text
    if folder is not None:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
    for _, kwargs in FakeApi.calls:
        assert TOKEN not in repr(kwargs)


@pytest.fixture(scope="module")
def sharded(converted):
    """A complete conversion output in three shards (so index checks have something to check)."""
    folder = converted("llama_gqa", to="mfa", key_dim=16, value_dim=16, max_shard_size="40KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
    return folder


@pytest.fixture
def copy_of(tmp_path):
    def make(folder: Path) -> Path:
        target = tmp_path / folder.name
        shutil.copytree(folder, target)
        return target

    return make


def test_push_sends_the_folder(fake_api, sharded, copy_of):
    folder = copy_of(sharded)
    (folder / ".DS_Store").write_text("litter")
    result = cli("push", folder, "my-org/Tiny-MFA", "--private", "--revision", "v1", "--commit-message", "first")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"pushed {folder} to https://huggingface.co/my-org/Tiny-MFA/commit/0123abc"

    assert calls("create_repo") == [{"repo_id": "my-org/Tiny-MFA", "private": True, "repo_type": "model", "exist_ok": True}]
    assert calls("create_branch") == [{"repo_id": "my-org/Tiny-MFA", "branch": "v1", "repo_type": "model", "exist_ok": True}]
    (upload,) = calls("upload_folder")
    assert upload["repo_id"] == "my-org/Tiny-MFA" and upload["revision"] == "v1" and upload["commit_message"] == "first"
    assert Path(upload["folder_path"]) == folder
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    expected = {
        "config.json", "configuration_factorconv.py", "modeling_factorconv.py", "model.safetensors.index.json",
        "README.md", "factorconv_recipe.yaml", "factorconv_report.json", *shards,
    }
    assert expected <= set(upload["files"]) and ".DS_Store" not in upload["files"]
    # Nobody passed the token around: huggingface_hub reads HF_TOKEN itself.
    assert all("token" not in kwargs for _, kwargs in FakeApi.calls)
    assert_no_token(result.output, folder=folder)


def test_push_defaults_to_main_and_public(fake_api, sharded):
    result = cli("push", sharded, "me/tiny")
    assert result.exit_code == 0, result.output
    assert calls("create_repo")[0]["private"] is False
    assert calls("create_branch") == []
    (upload,) = calls("upload_folder")
    assert upload["revision"] is None and upload["commit_message"] == f"Upload {sharded.name} (factorconv)"


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def _drop_shard(folder: Path) -> str:
    shard = _shards(folder)[1]
    shard.unlink()
    return f"missing shard {shard.name}"


def _index_lists_ghost(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = _shards(folder)[0].name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "lacks 1 tensor(s) the index lists, e.g. model.layers.9.ghost.weight"


def _index_forgets_tensor(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = list(index["weight_map"].values())
    name = next(n for n, shard in sorted(index["weight_map"].items()) if shards.count(shard) > 1)
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"holds tensor(s) the index does not list, e.g. {name}"


def _stray_shard(folder: Path) -> str:
    shutil.copy(_shards(folder)[0], folder / "model-00099-of-00099.safetensors")
    return "shard model-00099-of-00099.safetensors is not listed"


def _no_modeling(folder: Path) -> str:
    (folder / "modeling_factorconv.py").unlink()
    return "missing modeling file modeling_factorconv.py"


def _no_index(folder: Path) -> str:
    (folder / "model.safetensors.index.json").unlink()
    return "no model.safetensors or model.safetensors.index.json"


def _corrupt_shard(folder: Path) -> str:
    shard = _shards(folder)[-1]
    shard.write_bytes(b"not safetensors")
    return f"corrupt safetensors file {shard.name}"


def _source_model(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    return "model_type 'llama', not 'factorconv'"


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "no config.json"


@pytest.mark.parametrize(
    "damage",
    [_drop_shard, _index_lists_ghost, _index_forgets_tensor, _stray_shard, _no_modeling, _no_index, _corrupt_shard,
     _source_model, _no_config],
)
def test_push_refuses_an_incomplete_folder(fake_api, sharded, copy_of, damage):
    folder = copy_of(sharded)
    assert folder_problems(folder) == []
    problem = damage(folder)
    result = cli("push", folder, "me/tiny")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {folder} is not a complete factorconv output: "), lines
    assert problem in lines[0], (problem, lines[0])
    assert FakeApi.calls == []  # refused before any Hub call


def test_push_errors_are_one_line_without_the_token(fake_api, sharded):
    from huggingface_hub.errors import HfHubHTTPError

    class Response:
        status_code = 401
        headers: dict = {}
        request = None

    message = f"401 Client Error: Unauthorized (token {TOKEN} is invalid)\nmore detail"
    FakeApi.fail_with = HfHubHTTPError(message, response=Response())
    result = cli("push", sharded, "me/tiny")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: push to me/tiny failed: 401 Client Error"), lines
    assert "***" in lines[0] and "hf auth login" in lines[0]
    assert_no_token(result.output)

    result = cli("push", sharded, "not a repo id")
    assert "is not of the form 'user-or-org/name'" in result.output


def test_recipe_push_stage(fake_api, tmp_path, monkeypatch, source_dirs):
    """`run` with a push section: the final folder goes up, and its card's usage snippet names the repo."""
    monkeypatch.chdir(tmp_path)
    recipe = {
        "source": str(source_dirs["llama_gqa"]),
        "target": {"kind": "tpa", "rank_k": 1, "rank_v": 1},
        "output": {"dir": "out/tpa", "max_shard_size": "40KB"},
        "push": {"repo_id": "my-org/Tiny-TPA", "private": True, "revision": "exp", "commit_message": "from a recipe"},
        "device": "cpu",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("run", "r.yaml")
    assert result.exit_code == 0, result.output
    assert "push      out/tpa -> https://huggingface.co/my-org/Tiny-TPA/commit/0123abc" in result.output
    assert calls("create_repo")[0]["private"] is True and calls("create_branch")[0]["branch"] == "exp"
    (upload,) = calls("upload_folder")
    assert Path(upload["folder_path"]) == Path("out/tpa") and upload["commit_message"] == "from a recipe"
    assert {"factorconv_run.json", "factorconv_recipe.yaml", "README.md"} <= set(upload["files"])
    card = (tmp_path / "out/tpa/README.md").read_text()
    assert 'from_pretrained("my-org/Tiny-TPA", trust_remote_code=True)' in card
    assert "repo_id: my-org/Tiny-TPA" in card  # the recipe, embedded
    assert_no_token(result.output, folder=tmp_path / "out")


def test_push_lets_a_bug_surface_instead_of_one_line(fake_api, sharded):
    """Only the Hub's own failures become one line: a bug (here a TypeError inside the client) keeps its traceback."""
    FakeApi.fail_with = TypeError("unexpected keyword argument 'revison'")
    result = cli("push", sharded, "me/tiny")
    assert isinstance(result.exception, TypeError)
    from huggingface_hub.errors import LocalEntryNotFoundError

    FakeApi.fail_with = LocalEntryNotFoundError("cannot reach the Hub")  # offline: expected, one line
    result = cli("push", sharded, "me/tiny")
    assert result.exit_code == 1 and result.output.startswith("Error: push to me/tiny failed: cannot reach the Hub")


def test_license_lookup_failures_warn_in_one_line(monkeypatch, tmp_path, caplog):
    """A card published without the source's license says why (one warning line); a bug is not swallowed."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from factorconv.card import source_license
    from factorconv.run import _license

    class Recipe:
        class source:
            model, revision = "some-org/some-model", None

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with caplog.at_level("WARNING", logger="factorconv"):
        assert _license(Recipe) is None
    (record,) = caplog.records
    assert "some-org/some-model" in record.getMessage() and "offline" in record.getMessage()

    def broken(*args, **kwargs):
        raise TypeError("bug")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(TypeError):
        _license(Recipe)

    caplog.clear()
    (tmp_path / "README.md").write_bytes(b"---\nlicense: \xff\xfe\n---\n")  # not UTF-8
    with caplog.at_level("WARNING", logger="factorconv"):
        assert source_license(tmp_path) is None
    assert len(caplog.records) == 1 and "could not be parsed" in caplog.records[0].getMessage()
