"""Training data: files, folders or a `datasets` name -> one token stream -> packed blocks, sharded by process.

Text is tokenized by `factorconv.data.load_tokens` (the model's tokenizer, BOS once per document); folders are
searched recursively for .txt, .jsonl and .npy files, in sorted order. The stream is cut into `seq_len`-token
blocks. Which blocks a process reads at a given step is a pure function of (seed, step, micro-step, rank, world
size): every epoch is one seeded permutation of the blocks, and consecutive slices of that stream go to
consecutive ranks, so processes never read the same block in one epoch and a resumed run reads exactly what
an uninterrupted one would.
"""

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import dataset_tokens, load_tokens
from ..errors import FactorConvError

SUFFIXES = (".txt", ".jsonl", ".npy")


def find_files(source: str) -> list[Path]:
    """The data files that `source` (a file or a folder) names, or [] when it is neither."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise FactorConvError(f"data file {path} is not .txt, .jsonl or .npy")
        return [path]
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix in SUFFIXES and not any(s.startswith(".") for s in p.relative_to(path).parts)
        ]
        if not files:
            raise FactorConvError(f"no training data found in {path}: no .txt, .jsonl or .npy files")
        return files
    return []


def _datasets_available() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _looks_like_a_path(source: str) -> bool:
    """A missing local path, not a dataset name ('name', 'org/name', 'name:config')."""
    return Path(source).is_absolute() or source.startswith((".", "~")) or Path(source).suffix in SUFFIXES


def resolve_sources(sources: list[str]) -> list[tuple[str, list[Path]]]:
    """(source, files) for every source; files is [] for a `datasets` name. Checked on every process."""
    resolved = []
    for source in sources:
        files = find_files(source)
        if not files:
            if _looks_like_a_path(source):
                raise FactorConvError(f"no training data found at {source}: no such file or folder")
            if not _datasets_available():
                raise FactorConvError(
                    f"no training data found at {source}: not a file or folder "
                    "(a Hugging Face dataset name needs `pip install datasets`)"
                )
            resolved.append((source, []))
        else:
            resolved.append((source, files))
    return resolved


def fingerprint(sources: list[tuple[str, list[Path]]], tokenizer, extra: str = "") -> str:
    """Changes whenever a file, its size or modification time, or the tokenizer changes."""
    digest = hashlib.sha256(extra.encode())
    for source, files in sources:
        digest.update(source.encode())
        for f in files:
            stat = f.stat()
            digest.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if tokenizer is not None:
        digest.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.name_or_path}".encode())
    return digest.hexdigest()[:16]


def load_stream(
    sources: list[tuple[str, list[Path]]], tokenizer, split: str = "train", dataset_tokens_cap: int | None = None
) -> torch.Tensor:
    """All sources tokenized and concatenated, in order, as one int64 stream.

    A `datasets` name ('name' or 'name:config') is streamed, up to `dataset_tokens_cap` tokens when given
    (what the run will train on), so a large corpus is never downloaded in full.
    """
    parts = []
    for source, files in sources:
        if not files:
            parts.append(dataset_tokens(source, tokenizer, dataset_tokens_cap, split))
            continue
        for f in files:
            if f.stat().st_size == 0:
                continue
            if f.suffix != ".npy" and tokenizer is None:
                raise FactorConvError(f"{f} is text but the model folder has no tokenizer; pass pre-tokenized .npy")
            try:
                parts.append(load_tokens(f, tokenizer))
            except FactorConvError as err:
                if "fewer than 2 tokens" in str(err):
                    continue  # an (almost) empty file in a folder adds nothing
                raise
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if stream.numel() == 0:
        raise FactorConvError(f"no training data found: {', '.join(s for s, _ in sources)} hold no tokens")
    return stream


def cached_stream(cache_dir: Path, key: str, build) -> torch.Tensor:
    """`build()` once, stored as .npy under `cache_dir`; later calls (other processes, --resume) read the file."""
    path = cache_dir / f"tokens-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))
    stream = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    dtype = np.uint16 if int(stream.max()) < 2**16 else np.int32
    np.save(tmp, stream.numpy().astype(dtype))
    tmp.rename(path)
    return stream


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(blocks, seq_len) int64 view of the stream; the incomplete tail is dropped."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len)


@dataclass
class Split:
    train: torch.Tensor  # (blocks, seq_len)
    eval: torch.Tensor  # (blocks, <= seq_len)
    held_out: bool  # eval blocks were taken from the training data


def split_blocks(
    stream: torch.Tensor, seq_len: int, eval_stream: torch.Tensor | None, eval_fraction: float, eval_tokens: int
) -> Split:
    """Pack the training stream; eval is the packed --eval-data, or the last blocks of the training data."""
    blocks = pack(stream, seq_len)
    max_eval = max(1, eval_tokens // seq_len)
    if eval_stream is not None:
        eval_blocks = pack(eval_stream, seq_len) if eval_stream.numel() >= seq_len else eval_stream[None]
        if eval_blocks.shape[-1] < 2:
            raise FactorConvError("the eval data holds fewer than 2 tokens")
        return Split(blocks, eval_blocks[:max_eval], held_out=False)
    if blocks.shape[0] < 2:
        raise FactorConvError(
            f"not enough training data: {stream.numel():,} tokens make {blocks.shape[0]} block(s) of --seq-len "
            f"{seq_len}; need at least 2 (one is held out for evaluation) or pass --eval-data"
        )
    count = min(max_eval, max(1, round(blocks.shape[0] * eval_fraction)), blocks.shape[0] - 1)
    return Split(blocks[:-count], blocks[-count:], held_out=True)


class BlockSampler:
    """Deterministic block order: epoch e is permutation e of the blocks (seeded); ranks take disjoint slices.

    Optimizer step s, micro-step m, rank r reads stream positions
    ((s · grad_accum + m) · world + r) · batch + [0, batch), so one optimizer step always covers the same
    batch × grad_accum × world blocks, whatever the split between processes and accumulation.
    """

    def __init__(self, num_blocks: int, batch_size: int, grad_accum: int, world: int, seed: int) -> None:
        self.num_blocks, self.batch_size, self.grad_accum, self.world, self.seed = (
            num_blocks,
            batch_size,
            grad_accum,
            world,
            seed,
        )
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_blocks, generator=gen)}  # keep only the current epoch
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = ((step * self.grad_accum + micro) * self.world + rank) * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.num_blocks)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def epoch(self, step: int) -> float:
        """Passes over the data completed after `step` optimizer steps."""
        return step * self.grad_accum * self.world * self.batch_size / self.num_blocks

    def steps_per_epoch(self) -> int:
        return max(1, math.floor(self.num_blocks / (self.grad_accum * self.world * self.batch_size)))
