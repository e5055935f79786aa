"""Which weights train: whole attention blocks, plus norms, or everything; optionally LoRA on the rest.

The trainable set is a list of modules (every decoder layer's `self_attn`, the RMSNorms, or the whole model),
so the same list serves plain training (requires_grad on their parameters) and peft (`modules_to_save`,
trained in full and saved in the adapter beside the LoRA weights).
"""

import torch
from torch import nn

from ..errors import FactorConvError
from .options import FinetuneOptions

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every decoder layer's attention block (the modules named `self_attn`) by full name, in layer order."""
    return {name: module for name, module in model.named_modules() if name.endswith("self_attn")}


def trainable_modules(model: nn.Module, trainable: str) -> list[str]:
    """Full names of the modules whose every parameter trains ('' is the whole model)."""
    if trainable == "all":
        return [""]
    names = list(attention_blocks(model))
    if not names:
        raise FactorConvError(f"{type(model).__name__} has no 'self_attn' modules to train")
    if trainable == "attention+norms":
        inside = tuple(n + "." for n in names)
        names += [n for n, m in model.named_modules() if _is_norm(m) and not n.startswith(inside)]
    return names


def _covered(name: str, modules: list[str]) -> bool:
    return any(m == "" or name == m or name.startswith(m + ".") for m in modules)


def select_trainable(model: nn.Module, modules: list[str]) -> list[str]:
    """Set requires_grad on exactly the parameters inside `modules`; returns their names."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(_covered(name, modules))
        if param.requires_grad:
            names.append(name)
    return names


def param_groups(model: nn.Module, options: FinetuneOptions) -> list[dict]:
    """AdamW groups of the trainable weights: decay on matrices only, and each group's `lr_scale` (1 inside
    attention, outside_lr_ratio elsewhere) that the schedule multiplies in at every step."""
    attention = trainable_modules(model, "attention")
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_covered(name, attention), param.ndim >= 2), []).append(param)
    return [
        {"params": params, "weight_decay": options.weight_decay if matrix else 0.0,
         "lr_scale": 1.0 if inside else options.outside_lr_ratio}
        for (inside, matrix), params in sorted(groups.items(), reverse=True)
    ]


def lora_target_modules(model: nn.Module, targets: list[str], modules: list[str]) -> list[str]:
    """Full names of the Linear layers matching `targets` (last name part), none inside the trainable set."""
    found, clash = [], []
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, nn.Linear):
            (clash if _covered(name, modules) else found).append(name)
    if clash:
        raise FactorConvError(
            f"--lora-targets {clash[0].split('.')[-1]} is already trained in full by --trainable; "
            "pick layers outside it (default: gate_proj,up_proj,down_proj)"
        )
    if not found:
        raise FactorConvError(f"--lora-targets {','.join(targets)} match no Linear layer of the model")
    return found


def wrap_lora(model: nn.Module, options: FinetuneOptions, modules: list[str]) -> nn.Module:
    """peft LoRA on the target layers; the trainable set rides along as `modules_to_save` (trained in full)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, options.lora_targets, modules)
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha or 2 * options.lora_r,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=modules,
        bias="none",
    )
    return get_peft_model(model, config)


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft model's full state dict -> the plain model's, with W + scaling · B A folded into every base layer.

    Works from tensors alone (no peft model needed), so it serves single-process, DDP and gathered FSDP states.
    """
    merged: dict[str, torch.Tensor] = {}
    lora_a, lora_b = {}, {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if f".lora_A.{ADAPTER}." in name:
            lora_a[name.split(f".lora_A.{ADAPTER}.")[0]] = tensor
        elif f".lora_B.{ADAPTER}." in name:
            lora_b[name.split(f".lora_B.{ADAPTER}.")[0]] = tensor
        elif ".original_module." in name:
            continue  # the untouched copy peft keeps beside modules_to_save
        else:
            merged[name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(".base_layer.", ".")] = tensor
    for layer, a in lora_a.items():
        weight = merged[layer + ".weight"]
        delta = (lora_b[layer].float() @ a.float()) * scaling
        merged[layer + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
