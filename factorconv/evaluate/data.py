"""Evaluation text as one stream of token ids: .txt, .jsonl (a "text" field per line) or pre-tokenized .npy."""

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import FactorConvError


def load_tokens(path: Path, tokenizer=None, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the file; text is tokenized with the model's tokenizer (BOS once per document)."""
    if not path.is_file():
        raise FactorConvError(f"data file {path} not found")
    if path.suffix == ".npy":
        ids = torch.from_numpy(np.load(path).astype(np.int64)).flatten()
    else:
        if tokenizer is None:
            raise FactorConvError(f"{path} is text but no tokenizer was found next to the model; pass --compare SOURCE")
        if path.suffix == ".jsonl":
            try:
                documents = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FactorConvError(f"{path}: every line must be a JSON object with a 'text' field") from None
        else:
            documents = [path.read_text()]
        ids = torch.tensor([i for doc in documents for i in tokenizer(doc)["input_ids"]], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise FactorConvError(f"{path} holds fewer than 2 tokens; nothing to evaluate")
    return ids
