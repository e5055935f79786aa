"""`factorconv eval`: the converted model and (optionally) its source side by side, in one table."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..data import check_token_ids, first_tokenizer, load_tokens
from ..dtypes import DTYPES
from ..errors import FactorConvError, first_of
from ..model_folder import resolve_source
from .kv_cache import analytic_kv_bytes_per_token, measured_kv_bytes_per_token
from .perplexity import perplexity


@dataclass
class EvalRow:
    name: str
    parameters: int
    kv_bytes_analytic: int
    kv_bytes_measured: float
    perplexity: float


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Load a source or converted folder (factorconv's classes are registered on import)."""
    import factorconv  # noqa: F401  (registers the Auto classes)

    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise FactorConvError(
            f"{path} holds only pickled .bin weights, which factorconv never loads; "
            "re-save it with save_pretrained (safetensors) first"
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise FactorConvError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from None
    if info["missing_keys"]:
        raise FactorConvError(f"{path} lacks {first_of(sorted(info['missing_keys']))}; the checkpoint is incomplete")
    return model.to(device).eval()


def evaluate_row(
    name: str, model: PreTrainedModel, tokens: torch.Tensor, seq_len: int, progress: bool
) -> EvalRow:
    size = next(model.parameters()).element_size()
    return EvalRow(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        kv_bytes_analytic=analytic_kv_bytes_per_token(model.config, size),
        kv_bytes_measured=measured_kv_bytes_per_token(model),
        perplexity=perplexity(model, tokens, seq_len, progress=progress),
    )


def evaluate(
    model_path: str,
    data: Path,
    compare: str | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> list[EvalRow]:
    """Evaluate `compare` (usually the source) and `model_path` on the same tokens, in that order."""
    device = device or torch.device("cpu")
    runs = ([("source", compare)] if compare else []) + [("model", model_path)]
    folders = {name: resolve_source(name) for _, name in runs}
    tokens = load_tokens(data, first_tokenizer(folders[model_path], *([folders[compare]] if compare else [])), max_tokens)
    rows = []
    for label, name in runs:
        folder = folders[name]
        model = load_model(folder, device, DTYPES[dtype])
        check_token_ids(tokens, model.config.vocab_size, str(data))
        length = seq_len or min(model.config.max_position_embeddings, 2048)
        if length > model.config.max_position_embeddings:
            raise FactorConvError(
                f"--seq-len {length} exceeds the model's context of {model.config.max_position_embeddings} tokens"
            )
        rows.append(evaluate_row(f"{label}: {Path(name).name}", model, tokens, length, progress))
        del model
    return rows


def format_table(rows: list[EvalRow]) -> str:
    """A fixed-width table; the last column compares KV bytes with the first row's."""
    header = ("model", "params", "KV B/token", "KV B/token measured", "KV vs first", "perplexity")
    base = rows[0].kv_bytes_analytic
    body = [
        (
            r.name,
            f"{r.parameters:,}",
            f"{r.kv_bytes_analytic:,}",
            f"{r.kv_bytes_measured:,.0f}",
            f"{r.kv_bytes_analytic / base:.1%}",
            f"{r.perplexity:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
