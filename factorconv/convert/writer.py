"""Stream tensors into size-bounded safetensors shards with Hugging Face names and index."""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FactorConvError
from ..output_folder import INDEX_FILE, SINGLE_FILE

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'500MB', '2GB', '1GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise FactorConvError(f"max shard size {size!r} is not a size; use e.g. 500MB or 2GB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise FactorConvError(f"max shard size must be positive, got {size!r}")
    return value


class ShardedWriter:
    """Collects tensors and writes a shard whenever the next tensor would push it past `max_shard_bytes`.

    Shards get their final `model-0000i-of-0000N.safetensors` names in `close()`, once N is known; a single
    shard is written as `model.safetensors` without an index, as transformers does.
    """

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, name the shards, write the index; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for i, (path, tensor_names) in enumerate(self._shards, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update({tensor: name for tensor in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
