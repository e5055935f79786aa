"""Write the healed model like a conversion output: sharded safetensors under the input's tensor names and
dtype, its config, the modeling and tokenizer files (convert's own helpers), the recipe with a `finetune`
section, the report with a `finetune` record and the model card (factorconv.card) with the results.
Staged in a hidden folder of OUTPUT, then moved in."""

import json
import re
import shutil
import uuid
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ..card import CARD_FILE, CardResults, model_card, source_license
from ..convert.artifacts import copy_modeling_files, copy_tokenizer_files
from ..convert.writer import ShardedWriter, parse_size
from ..errors import FactorConvError
from ..modeling import FactorConvConfig
from ..output_folder import INDEX_FILE, RECIPE_FILE, REPORT_FILE, SINGLE_FILE
from .trainable import merge_lora_state_dict

SUMMARY_FILE = "finetune_summary.json"
ADAPTER_DIR = "adapter"


def checkpoint_tensor_names(folder: Path) -> set[str]:
    """Names of the tensors stored in a model folder (from its index, or its single safetensors file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FactorConvError(f"no model.safetensors or {INDEX_FILE} in {folder}")
    with safe_open(single, framework="pt") as f:
        return set(f.keys())


def _strip_wrappers(state: dict) -> dict:
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def write_weights(folder: Path, state: dict[str, torch.Tensor], names: set[str], dtype: torch.dtype, max_shard: int):
    """Exactly the tensors the input folder stored (tied copies stay out), in model order, in `dtype`."""
    missing = sorted(names - state.keys())
    if missing:
        raise FactorConvError(f"the trained model lacks tensor {missing[0]} that the input model stores")
    writer = ShardedWriter(folder, max_shard)
    for name, tensor in state.items():
        if name in names:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.close()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def summary_line(folder: Path) -> str:
    """One line for the terminal: where the model went and what healing did to its perplexity."""
    summary = json.loads((Path(folder) / SUMMARY_FILE).read_text())
    ev = summary["eval"]
    teacher = f" (teacher {ev['teacher_ppl']:.4f})" if ev.get("teacher_ppl") is not None else ""
    return (
        f"wrote {folder}: {summary['steps']:,} steps, {summary['tokens']:,} tokens; eval perplexity "
        f"{ev['before_ppl']:.4f} -> {ev['after_ppl']:.4f}{teacher} on {ev['data']}"
    )


def _card(folder: Path, name: str, model_folder: Path, recipe: dict, report: dict, summary: dict) -> None:
    """The conversion's model card, rebuilt with the fine-tuning results (the shared card machinery)."""
    ev = summary["eval"]
    config = FactorConvConfig.from_pretrained(folder)
    results = CardResults(
        eval_data=ev["data"],
        eval_tokens=ev["tokens"],
        perplexity_source=ev.get("teacher_ppl") if summary.get("teacher") == config.source_model else None,
        perplexity_converted=ev["before_ppl"],
        perplexity_finetuned=ev["after_ppl"],
        finetune_tokens=summary["tokens"],
    )
    recipe_text = yaml.safe_dump(recipe, sort_keys=False) if recipe else None
    card = model_card(
        config, report, name=name, recipe=recipe_text, license=source_license(model_folder), results=results
    )
    card.save(folder / CARD_FILE)


def save_adapter(model: torch.nn.Module, raw_state: dict, folder: Path, base_model: str) -> None:
    """The peft adapter (LoRA weights + the fully trained modules), loadable on the input model."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(model, state_dict=raw_state)
    folder.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(folder / "adapter_model.safetensors"))
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model
    config.save_pretrained(folder)


def write_outputs(
    out: Path,
    name: str,
    model_folder: Path,
    state: dict[str, torch.Tensor],
    summary: dict,
    *,
    dtype: torch.dtype,
    lora_scaling: float | None,
    max_shard_size: str,
    model_type: str | None,
    adapter: torch.nn.Module | None,
) -> None:
    """Everything a healed folder holds, staged in a hidden folder of OUT and moved in at the end.

    `state` is the trained state dict (LoRA merged here with `lora_scaling`), written in `dtype` under the tensor
    names of `model_folder`; `name` titles the model card; `adapter` is the unwrapped peft model when the adapter
    is saved too.
    """
    staging = out / f".model-partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        raw = _strip_wrappers(state)
        merged = merge_lora_state_dict(raw, lora_scaling) if lora_scaling is not None else raw
        names = checkpoint_tensor_names(model_folder)
        write_weights(staging, merged, names, dtype, parse_size(max_shard_size))
        shutil.copy(model_folder / "config.json", staging / "config.json")
        if model_type == "factorconv":
            copy_modeling_files(staging)
        copy_tokenizer_files(staging, model_folder)
        recipe = _read_yaml(model_folder / RECIPE_FILE)
        recipe["finetune"] = summary["options"]
        (staging / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        report_path = model_folder / REPORT_FILE
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report["finetune"] = {k: v for k, v in summary.items() if k != "options"}
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if model_type == "factorconv":
            _card(staging, name, model_folder, recipe, report, summary)
        if adapter is not None:
            save_adapter(adapter, raw, staging / ADAPTER_DIR, summary["model"])
        for stale in list(out.glob("model*.safetensors")) + list(out.glob(INDEX_FILE)):
            stale.unlink()
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
