"""Token data as one stream of ids, for calibration, fine-tuning and evaluation alike: .txt, .jsonl (a "text" field
per line), pre-tokenized .npy, or a `datasets` name."""

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import FactorConvError


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FactorConvError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None


def first_tokenizer(*folders: Path | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer of the first folder that has a loadable one (a model may lack its own; its source has it)."""
    for folder in folders:
        if folder is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str) -> None:
    """Ids from another tokenizer would index past the embedding table: say so instead."""
    if tokens.numel() and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab_size else int(tokens.min())
        raise FactorConvError(
            f"{what} has token id {bad} but the model's vocabulary has {vocab_size} entries; "
            "tokenize the data with this model's tokenizer"
        )


def load_tokens(path: Path, tokenizer=None, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the file; text is tokenized with the model's tokenizer (BOS once per document)."""
    if path.is_dir():
        raise FactorConvError(f"data {path} is a folder; pass a .txt, .jsonl or .npy file")
    if not path.is_file():
        raise FactorConvError(f"data file {path} not found")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)  # never unpickle data files
        except (ValueError, OSError) as err:
            raise FactorConvError(f"{path} is not a readable .npy array of token ids: {err}") from None
        if not np.issubdtype(array.dtype, np.integer):
            raise FactorConvError(f"{path} holds {array.dtype} values; token ids must be integers (save them as int64)")
        ids = torch.from_numpy(array.astype(np.int64)).flatten()
    else:
        if tokenizer is None:
            raise FactorConvError(f"{path} is text but no tokenizer was found next to the model; pass --compare SOURCE")
        text = _read_text(path)
        if path.suffix == ".jsonl":
            try:
                documents = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FactorConvError(f"{path}: every line must be a JSON object with a 'text' field") from None
        else:
            documents = [text]
        ids = torch.tensor([i for doc in documents for i in tokenizer(doc)["input_ids"]], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise FactorConvError(f"{path} holds fewer than 2 tokens; nothing to evaluate")
    return ids


def dataset_tokens(name: str, tokenizer, max_tokens: int | None = None, split: str = "train") -> torch.Tensor:
    """Token ids of a Hugging Face `datasets` dataset ('name' or 'name:config', a 'text' field per row),
    streamed (nothing beyond what is read is downloaded) until `max_tokens`, or to the end of the split."""
    try:
        import datasets
    except ImportError:
        raise FactorConvError(f"{name} is not a file; to use a datasets name, `pip install datasets`") from None
    if tokenizer is None:
        raise FactorConvError(f"{name} is text but no tokenizer was found next to the model")
    dataset_name, _, config_name = name.partition(":")
    try:
        rows = datasets.load_dataset(dataset_name, config_name or None, split=split, streaming=True)
    except Exception as err:  # datasets raises many types; the user needs the message, not the class
        raise FactorConvError(f"cannot load dataset {name}: {str(err).splitlines()[0]}") from None
    ids: list[int] = []
    for row in rows:
        text = row.get("text") if isinstance(row, dict) else None
        if text:
            ids.extend(tokenizer(text)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)
