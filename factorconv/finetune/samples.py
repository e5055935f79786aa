"""Healing data without a corpus: token sequences sampled from the source model itself (`factorconv sample`).

Distillation matches the student to the teacher on whatever text it is shown; the teacher's own samples are text
the teacher finds likely, so the KL is spent where the model's behaviour lives. On stories260K (TPA at 25% of the
KV bytes, CPU, the same 1.6M healing tokens in 128-token blocks) samples of 256 tokens heal to 1.250x the source's
held-out perplexity against 1.330x on TinyStories text (benchmarks/results/heal_stories.md).

A chat model's behaviour lives in its chat template, which samples from BOS never reach; `chat=True` samples
conversations instead: the model writes a user turn after its template's opening, then answers it through the
template's generation prompt, so healing sees the turns it will serve.
"""

import os
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..convert.device import resolve_device
from ..errors import FactorConvError
from ..model_folder import resolve_source
from .models import load_model
from .options import token_count


class SampleOptions(BaseModel):
    """What `factorconv sample` draws; also a recipe's `samples` section."""

    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(ge=2, description="how many tokens to sample, e.g. 2M (rounded up to whole sequences)")
    length: int = Field(default=256, ge=2, description="tokens per sequence, BOS included (chat: per conversation, at most)")
    batch_size: int = Field(default=64, ge=1, description="sequences sampled at once")
    temperature: float = Field(default=1.0, gt=0)
    seed: int = Field(default=0, ge=0)
    chat: bool = Field(default=False, description="conversations through the model's chat template")

    @field_validator("tokens", mode="before")
    @classmethod
    def _count_with_suffix(cls, value: object) -> object:
        return token_count(value) if isinstance(value, str) else value


def _start_token(model: torch.nn.Module) -> int:
    """Every sample starts from the model's BOS token, as its documents did in training."""
    for config in (model.generation_config, model.config):
        bos = getattr(config, "bos_token_id", None)
        if isinstance(bos, int) and 0 <= bos < model.config.vocab_size:
            return bos
    raise FactorConvError(f"{model.name_or_path} names no BOS token to start samples from; set bos_token_id in its config")


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a turn: the generation config's EOS (one id or several) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise FactorConvError(f"{model.name_or_path} names no EOS token to end a chat turn; set eos_token_id in its "
                              "generation_config.json or drop --chat")
    return ids


def _chat_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FactorConvError(f"--chat needs the model's tokenizer and chat template, and {folder} has no usable "
                              f"tokenizer ({str(err).splitlines()[0].rstrip(': ')}); drop --chat") from None


def _user_opening(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The chat template rendered up to where a user's message begins (system prompt and role header included)."""
    marker = "\u2063FACTORCONV\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except (ValueError, TypeError) as err:  # no template, or one that needs other messages
        raise FactorConvError(f"cannot sample conversations: {str(err).splitlines()[0]}; drop --chat") from None
    if marker not in text:
        raise FactorConvError("the chat template does not show the user's message; drop --chat")
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]


def _until_stop(row: list[int], stop: set[int], keep_stop: bool) -> list[int]:
    """A generated row cut at its first stop token (kept or not)."""
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + keep_stop]
    return row


def _generate(model: PreTrainedModel, rows: list[list[int]], new_tokens: int, temperature: float, pad: int,
              stop: set[int] | None) -> list[list[int]]:
    """Ancestral samples after each row (rows left-padded to one length); only the new tokens come back."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    bounds = {"eos_token_id": sorted(stop)} if stop else {"min_new_tokens": new_tokens}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, pad_token_id=pad, **bounds)
    return out[:, width:].tolist()


def _conversations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, opening: list[int], count: int,
                   length: int, temperature: float, pad: int) -> list[list[int]]:
    """`count` conversations of at most about `length` tokens: a user turn sampled after the template's `opening`
    (at most a quarter of `length`), then the model's answer through the template's generation prompt, each turn
    ending at its first stop token or at its limit."""
    stop = _stop_ids(model, tokenizer)
    turns = _generate(model, [opening] * count, max(1, length // 4), temperature, pad, stop)
    questions = [tokenizer.decode(_until_stop(t, stop, False), skip_special_tokens=True) for t in turns]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in questions]
    room = max(1, length - max(map(len, prompts)))
    answers = _generate(model, prompts, room, temperature, pad, stop)
    return [p + _until_stop(a, stop, True) for p, a in zip(prompts, answers)]


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
    options: SampleOptions,
    device: str = "auto",
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write at least `options.tokens` token ids to `output` (.npy, one stream).

    Plain ancestral sampling at `temperature` (no top-k/top-p, which would cut the tails the KL also matches).
    Without `chat`, `length` tokens per sequence from BOS, EOS held back so every sequence is full; with it,
    conversations of at most about `length` tokens (see `_conversations`). The same seed, batch size and device
    give the same tokens."""
    tokens, length, batch_size, temperature = options.tokens, options.length, options.batch_size, options.temperature
    chat = options.chat
    check_sample_output(output, overwrite)
    if tokens < length:
        raise FactorConvError(f"need --tokens >= --length (got {tokens} and {length})")
    where = resolve_device(device)
    folder = resolve_source(model, revision)
    tokenizer = _chat_tokenizer(folder) if chat else None
    opening = _user_opening(tokenizer) if chat else []  # template problems are found before the model loads
    if len(opening) >= length // 2:
        raise FactorConvError(f"the chat template's opening is {len(opening)} tokens; raise --length above "
                              f"{2 * len(opening)}")
    # float32 on CPU (bf16 matmuls there are slow), the stored dtype elsewhere
    source = load_model(folder, torch.float32 if where.type == "cpu" else "auto", "model").to(where).eval()
    pad = source.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else (tokenizer.pad_token_id if tokenizer else None) or 0
    start = None if chat else _start_token(source)
    torch.manual_seed(options.seed)
    chunks: list[np.ndarray] = []
    dtype = np.uint16 if source.config.vocab_size <= 2**16 else np.int32
    total = -(-tokens // length) * length if not chat else tokens
    done = 0
    with tqdm(total=total, desc="sampling", unit="tok", unit_scale=True, disable=not progress) as bar:
        while done < total:
            if chat:
                rows = _conversations(source, tokenizer, opening, batch_size, length, temperature, pad)
            else:
                count = min(batch_size, (total - done) // length)
                rows = [[start] + r for r in _generate(source, [[start]] * count, length - 1, temperature, pad, None)]
            stream = np.array([t for r in rows for t in r], dtype=dtype)
            chunks.append(stream)
            done += stream.size
            bar.update(stream.size)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.stem}.partial.npy")
    np.save(staging, np.concatenate(chunks))
    os.replace(staging, output)
    return output
