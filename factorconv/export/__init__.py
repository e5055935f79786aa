"""`factorconv export`: a converted (or fine-tuned) factorconv folder rewritten as a stock architecture that serving
engines run without remote code: MFA-KR as DeepSeek-V3 (MLA), MFA as a Llama with one KV head.

Each format (its checks, config, tensor mapping, serving notes) lives in its own module; this one reads the
folder, refuses what does not fit before writing anything, and streams the tensors layer by layer into a
staging folder that is published whole.
"""

import json
import logging
import re
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..card import CARD_FILE, export_card, source_license
from ..convert.artifacts import copy_tokenizer_files
from ..convert.source import SourceCheckpoint
from ..convert.writer import ShardedWriter, parse_size
from ..errors import FactorConvError
from ..evaluate.kv_cache import analytic_kv_bytes_per_token, source_kv_bytes_per_token
from ..model_folder import resolve_source
from ..output_folder import EXPORT_FILE, check_output, staged_output
from .deepseek_v3 import DEEPSEEK_V3
from .formats import ExportFormat, ExportRefused
from .llama import LLAMA

FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (DEEPSEEK_V3, LLAMA)}
_ATTENTION = re.compile(r"^model\.layers\.(\d+)\.self_attn\.")

logger = logging.getLogger("factorconv")

__all__ = ["EXPORT_FILE", "FORMATS", "ExportRefused", "export"]


def export(
    model: str,
    output: Path,
    format: str,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Write `model` (a factorconv folder or Hub id) to `output` as the stock architecture `format`."""
    if format not in FORMATS:
        raise FactorConvError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    output = Path(output).expanduser()
    local = Path(model).expanduser()
    check_output(output, [local] if local.exists() else [], overwrite)
    max_shard = parse_size(max_shard_size)
    folder = resolve_source(model, revision)
    checkpoint = SourceCheckpoint(folder, architectures=("FactorConvForCausalLM",))
    checkpoint.check_complete()
    config, read = checkpoint.config, checkpoint.reader()
    fmt.check(config, read)
    stock = fmt.stock_config(config)

    with staged_output(output, overwrite) as staging:
        writer = ShardedWriter(staging, max_shard)
        done: set[int] = set()
        bar = tqdm(
            total=config.num_hidden_layers, desc=f"exporting to {fmt.name}", unit="layer", disable=not progress
        )
        for name in checkpoint.names:
            match = _ATTENTION.match(name)
            if match is None:
                writer.add(name, checkpoint.tensor(name))
                continue
            layer = int(match.group(1))
            if layer in done:
                continue
            dtype = read(f"model.layers.{layer}.self_attn.o_proj.weight").dtype
            for target, tensor in fmt.attention_tensors(config, stock, layer, read).items():
                writer.add(target, tensor.to(dtype))
            done.add(layer)
            bar.update()
        bar.close()
        writer.close()
        stock.save_pretrained(staging)
        copy_tokenizer_files(staging, folder)
        _write_provenance(staging, folder, model, config, stock, fmt)
    logger.info("wrote %s", output)
    return output


def _write_provenance(staging: Path, folder: Path, model: str, config, stock, fmt: ExportFormat) -> None:
    """factorconv_export.json and the model card: what the folder is, where it came from, how to serve it."""
    size = config.dtype.itemsize if hasattr(config.dtype, "itemsize") else 4
    kv_bytes, source_kv = analytic_kv_bytes_per_token(stock, size), source_kv_bytes_per_token(config, size)
    record = {
        "factorconv_version": __version__,
        "format": fmt.name,
        "architecture": fmt.architecture,
        "exported_from": model,
        "source_model": config.source_model,
        "kv_bytes_per_token": {"source": source_kv, "exported": kv_bytes},
    }
    (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    card = export_card(
        config, name=Path(model).name or model, model=model, format_name=fmt.name, architecture=fmt.architecture,
        serving=fmt.serving.format(folder="<this folder>"), kv_bytes=(kv_bytes, source_kv),
        license=source_license(folder),
    )
    card.save(staging / CARD_FILE)
