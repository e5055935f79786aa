"""Push a finished output folder to the Hugging Face Hub: `create_repo(exist_ok=True)`, then one `upload_folder`.

The token is never read, printed or written by factorconv: huggingface_hub finds it (`HF_TOKEN`, or the login
saved by `hf auth login`). Only complete conversion outputs are pushed (see `folder_problems`).
"""

import json
import re
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import EntryNotFoundError, HTTPError
from safetensors import SafetensorError, safe_open

from .errors import FactorConvError
from .output_folder import INDEX_FILE, SINGLE_FILE

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name: a Hub repository id (the one definition)
MODELING_FILES = ("configuration_factorconv.py", "modeling_factorconv.py")
# Left out of uploads: hidden files and folders (editor/OS litter, caches, partial writes).
IGNORE_PATTERNS = [".*", "*/.*"]
# What a Hub call raises when the Hub says no or cannot be reached (HTTP status, network, offline, not found, a bad
# repo id): expected failures, reported in one line. Anything else is a bug and keeps its traceback.
HUB_FAILURES = (HTTPError, EntryNotFoundError, OSError, ValueError)


def folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from being a complete factorconv output (empty list: complete).

    Checks config.json (model_type factorconv, auto_map), the modeling files it points at, and the weights:
    `model.safetensors`, or an index whose every shard exists and holds every tensor listed for it, with no
    unlisted shard beside it. Only safetensors headers are read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        return [f"no config.json in {folder}"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"config.json in {folder} is not valid JSON ({err})"]
    if config.get("model_type") != "factorconv":
        problems.append(f"config.json has model_type {config.get('model_type')!r}, not 'factorconv'")
    if not config.get("auto_map"):
        problems.append("config.json has no auto_map (the model would not load with trust_remote_code)")
    problems += [f"missing modeling file {name}" for name in MODELING_FILES if not (folder / name).is_file()]
    problems += _weight_problems(folder)
    return problems or _architecture_problems(folder, config)


def _architecture_problems(folder: Path, config: dict) -> list[str]:
    """Tensors the architecture needs but the weights lack (transformers would initialise them at random)."""
    import torch

    from .modeling import FactorConvConfig, FactorConvForCausalLM

    try:
        with torch.device("meta"):
            expected = set(FactorConvForCausalLM(FactorConvConfig(**config)).state_dict())
    except (TypeError, ValueError) as err:
        return [f"config.json does not describe a factorconv model ({str(err).splitlines()[0]})"]
    needed = expected - {"lm_head.weight"} if config.get("tie_word_embeddings") else expected  # tied: may be absent
    index = folder / INDEX_FILE
    names = set(json.loads(index.read_text())["weight_map"]) if index.is_file() else _keys(folder / SINGLE_FILE)
    return [f"the weights lack {name}, which the architecture needs" for name in sorted(needed - names)] + [
        f"the weights hold {name}, which the architecture does not use" for name in sorted(names - expected)
    ]


def _weight_problems(folder: Path) -> list[str]:
    index_path, single = folder / INDEX_FILE, folder / SINGLE_FILE
    shards_on_disk = {p.name for p in folder.glob("model-*.safetensors")}
    if not index_path.is_file():
        if not single.is_file():
            return [f"no {SINGLE_FILE} or {INDEX_FILE}"]
        problems = [f"shard {name} is not listed in any index" for name in sorted(shards_on_disk)]
        return problems + [p for p in [_header_problem(single)] if p]
    if single.is_file():
        return [f"both {SINGLE_FILE} and {INDEX_FILE}: remove the stale one"]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise KeyError("weight_map")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return [f"{INDEX_FILE} is corrupt ({type(err).__name__}: {err})"]
    listed: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        listed.setdefault(shard, set()).add(tensor)
    problems = [f"shard {name} is not listed in {INDEX_FILE}" for name in sorted(shards_on_disk - set(listed))]
    for shard, tensors in sorted(listed.items()):
        path = folder / shard
        if not path.is_file():
            problems.append(f"missing shard {shard} (listed in {INDEX_FILE})")
            continue
        keys = _keys(path)
        if isinstance(keys, str):
            problems.append(keys)
        elif not tensors <= keys:
            problems.append(f"shard {shard} lacks {len(tensors - keys)} tensor(s) the index lists, e.g. {min(tensors - keys)}")
        elif keys - tensors:
            problems.append(f"shard {shard} holds tensor(s) the index does not list, e.g. {min(keys - tensors)}")
    return problems


def _keys(path: Path) -> set[str] | str:
    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as err:
        return f"corrupt safetensors file {path.name} ({err})"


def _header_problem(path: Path) -> str | None:
    keys = _keys(path)
    return keys if isinstance(keys, str) else None


def check_complete(folder: Path) -> None:
    """Raise a one-line FactorConvError unless `folder` is a complete factorconv output."""
    problems = folder_problems(folder)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FactorConvError(f"{folder} is not a complete factorconv output: {problems[0]}{more}")


def require_token() -> None:
    """Fail early (before hours of conversion) when no Hub token is configured; the token itself is not kept."""
    if not get_token():
        raise FactorConvError("no Hugging Face token: set HF_TOKEN or run `hf auth login` before pushing")


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a complete output folder to `repo_id` (created if missing) on branch `revision` (default main).

    `private` applies when the repo is created; an existing repo keeps its visibility. Returns the commit URL.
    """
    if not HUB_ID.match(repo_id):
        raise FactorConvError(f"repo id {repo_id!r} is not of the form 'user-or-org/name'")
    folder = Path(folder)
    check_complete(folder)
    if api is None:
        require_token()
        api = HfApi()
    branch = revision if revision not in (None, "main") else None
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if branch is not None:
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=branch,
            commit_message=commit_message or f"Upload {folder.name} (factorconv)",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except HUB_FAILURES as err:  # HTTP, network and validation errors: expected, one line; anything else is a bug
        raise FactorConvError(f"push to {repo_id} failed: {failure_line(err)}") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return _redact(str(url))


def failure_line(err: Exception) -> str:
    """A Hub failure in one line, with a hint for auth errors and the token (if it appears) masked."""
    return _redact(_first_line(err))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return f"{first} (not authenticated: set HF_TOKEN or run `hf auth login`)"
    if status == 403:
        return f"{first} (the token may lack write access to this repo)"
    return first


def _redact(text: str) -> str:
    token = get_token()
    return text.replace(token, "***") if token else text
