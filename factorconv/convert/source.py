"""Read a source checkpoint (local folder or Hub id) tensor by tensor, without loading the whole model."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PreTrainedConfig

from ..errors import FactorConvError, first_of
from ..families import SourceFamily, accepted_architecture, family_of
from ..output_folder import INDEX_FILE, SINGLE_FILE

# Tensors some checkpoints carry that no model reads (old transformers saved the RoPE table).
UNUSED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


class SourceCheckpoint:
    """Config and lazily read tensors of a checkpoint in safetensors format: a source of a supported family
    (factorconv/families/), or with `architectures` a folder of one of those (export reads factorconv folders)."""

    def __init__(
        self, folder: Path, require_weights: bool = True, architectures: tuple[str, ...] | None = None
    ) -> None:
        self.folder = folder
        if not (folder / "config.json").is_file():
            raise FactorConvError(f"{folder} has no config.json; pass a Hugging Face model folder")
        try:
            self.config: PreTrainedConfig = AutoConfig.from_pretrained(folder)
        except (ValueError, KeyError, OSError) as err:
            raise FactorConvError(f"cannot read {folder / 'config.json'}: {err}".splitlines()[0]) from None
        # Refused before any weight is read, so a config.json alone gets the reason.
        self.family: SourceFamily | None = family_of(self.config) if architectures is None else None
        self.architecture = accepted_architecture(self.config, architectures or self.family.architectures)
        has_files = (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()
        self._file_of = self._index_tensors() if require_weights or has_files else {}

    @property
    def has_weights(self) -> bool:
        return bool(self._file_of)

    def reader(self):
        """name -> tensor, or None for tensors the checkpoint does not have (e.g. absent biases)."""
        return lambda name: self.tensor(name) if self.has(name) else None

    def _index_tensors(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise FactorConvError(f"corrupt {index.name} in {self.folder}: {err}") from None
            files = {name: self.folder / shard for name, shard in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            files = {name: self.folder / SINGLE_FILE for name in self._keys(self.folder / SINGLE_FILE)}
        else:
            raise FactorConvError(
                f"no model.safetensors or model.safetensors.index.json in {self.folder}; "
                "convert .bin checkpoints with `save_pretrained(safe_serialization=True)` first"
            )
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FactorConvError(f"missing shard {shard.name} listed in the index of {self.folder}")
            keys = self._keys(shard)
            listed = {name for name, path in files.items() if path == shard}
            if not listed <= keys:
                raise FactorConvError(f"shard {shard.name} lacks tensors its index lists, e.g. {min(listed - keys)}")
        return files

    @staticmethod
    def _keys(shard: Path) -> set[str]:
        try:
            with safe_open(shard, framework="pt") as f:
                return set(f.keys())
        except (SafetensorError, OSError) as err:
            raise FactorConvError(f"corrupt safetensors file {shard}: {err}; re-download it") from None

    @property
    def names(self) -> list[str]:
        return sorted(self._file_of, key=_natural_key)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def tensor(self, name: str) -> torch.Tensor:
        try:
            with safe_open(self._file_of[name], framework="pt") as f:
                tensor = f.get_tensor(name)
        except KeyError:
            raise FactorConvError(f"tensor {name} not found in {self.folder}") from None
        except (SafetensorError, OSError) as err:
            raise FactorConvError(f"cannot read {name} from {self._file_of[name].name}: {err}") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FactorConvError(f"tensor {name} in {self._file_of[name].name} has NaN or inf values; re-download it")
        return tensor

    def check_complete(self) -> None:
        """Every tensor the architecture needs is there and none it does not know (e.g. a spoofed
        `architectures`), so a truncated index cannot convert into a model with randomly initialised weights."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            expected = set(AutoModelForCausalLM.from_config(self.config).state_dict())
        optional = {"lm_head.weight"} if getattr(self.config, "tie_word_embeddings", False) else set()
        present = {name for name in self._file_of if not name.endswith(UNUSED_TENSOR_SUFFIXES)}
        missing = sorted(expected - optional - present, key=_natural_key)
        unexpected = sorted(present - expected, key=_natural_key)
        if missing:
            raise FactorConvError(
                f"{self.folder} lacks {first_of(missing)} that {self.architecture} needs; the checkpoint is incomplete"
            )
        if unexpected:
            raise FactorConvError(
                f"{self.folder} has {first_of(unexpected)}, which {self.architecture} does not use; "
                "is `architectures` in config.json right?"
            )

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.tensor(name)


def _natural_key(name: str) -> list[object]:
    """Sort layer 2 before layer 10 so the output streams layer by layer."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
