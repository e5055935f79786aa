"""Where a model's files are: a local folder as it is, or a Hub id downloaded. Every command that reads a model
(convert, finetune, eval, export) starts here."""

from pathlib import Path

from .errors import FactorConvError
from .hub import HUB_ID

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def _not_found(source: str) -> FactorConvError:
    return FactorConvError(f"source {source}: no such folder, and not a valid Hub id like 'org/model'")


def resolve_source(source: str, revision: str | None = None, weights: bool = True) -> Path:
    """A local folder as is; a Hub id downloaded (config, safetensors, tokenizer files; config only without weights)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FactorConvError(f"source {source} is a file; pass the model folder that holds config.json")
        return path
    if not HUB_ID.match(source) or source.startswith((".", "~")):
        raise _not_found(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        patterns = HUB_PATTERNS if weights else ["config.json"]
        return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except HFValidationError:
        raise _not_found(source) from None
    except RepositoryNotFoundError:
        raise FactorConvError(f"Hub repo {source} not found (or gated: log in with `hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FactorConvError(f"could not download {source} from the Hub: {first_line}") from None


def source_reference(source: str) -> str:
    """How an output records its source: an absolute path for a local folder (so healing elsewhere finds the
    teacher), the Hub id otherwise."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
