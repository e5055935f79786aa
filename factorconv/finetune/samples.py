"""Healing data without a corpus: token sequences sampled from the source model itself (`factorconv sample`).

Distillation matches the student to the teacher on whatever text it is shown; the teacher's own samples are text
the teacher finds likely, so the KL is spent where the model's behaviour lives. On stories260K (TPA at 25% of the
KV bytes, CPU, the same 1.6M healing tokens in 128-token blocks) samples of 256 tokens heal to 1.250x the source's
held-out perplexity against 1.330x on TinyStories text (benchmarks/results/heal_stories.md).
"""

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..convert.device import resolve_device
from ..errors import FactorConvError
from ..model_folder import resolve_source
from .models import load_model


def _start_token(model: torch.nn.Module) -> int:
    """Every sample starts from the model's BOS token, as its documents did in training."""
    for config in (model.generation_config, model.config):
        bos = getattr(config, "bos_token_id", None)
        if isinstance(bos, int) and 0 <= bos < model.config.vocab_size:
            return bos
    raise FactorConvError(f"{model.name_or_path} names no BOS token to start samples from; set bos_token_id in its config")


def check_sample_output(output: Path, overwrite: bool) -> None:
    """An .npy file that may be written: refused before the model loads, never half-written."""
    if output.suffix != ".npy":
        raise FactorConvError(f"samples are saved as token ids in a .npy file; name the output {output.with_suffix('.npy')}")
    if output.is_dir():
        raise FactorConvError(f"{output} is a folder; name a .npy file")
    if output.exists() and not overwrite:
        raise FactorConvError(f"{output} exists; pass --overwrite to replace it")


def sample_tokens(
    model: str,
    output: Path,
    tokens: int,
    length: int = 256,
    batch_size: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write at least `tokens` token ids to `output` (.npy, one stream, `length` per sequence, each from BOS).

    Plain ancestral sampling at `temperature` (no top-k/top-p, which would cut the tails the KL also matches);
    EOS is held back until `length`, so every sequence is full. The same seed, batch size and device give the same
    tokens."""
    check_sample_output(output, overwrite)
    if length < 2 or tokens < length or batch_size < 1 or temperature <= 0:
        raise FactorConvError("need --length >= 2, --tokens >= --length, --batch-size >= 1 and --temperature > 0")
    where = resolve_device(device)
    folder = resolve_source(model, revision)
    # float32 on CPU (bf16 matmuls there are slow), the stored dtype elsewhere
    source = load_model(folder, torch.float32 if where.type == "cpu" else "auto", "model").to(where).eval()
    start = _start_token(source)
    torch.manual_seed(seed)
    sequences = -(-tokens // length)
    chunks: list[np.ndarray] = []
    dtype = np.uint16 if source.config.vocab_size <= 2**16 else np.int32
    with tqdm(total=sequences * length, desc="sampling", unit="tok", unit_scale=True, disable=not progress) as bar:
        for done in range(0, sequences, batch_size):
            ids = torch.full((min(batch_size, sequences - done), 1), start, device=where)
            with torch.no_grad():
                out = source.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_k=0,
                    top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                    pad_token_id=source.generation_config.pad_token_id or 0,
                )
            chunks.append(out.cpu().numpy().astype(dtype).reshape(-1))
            bar.update(out.numel())
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.stem}.partial.npy")
    np.save(staging, np.concatenate(chunks))
    os.replace(staging, output)
    return output
