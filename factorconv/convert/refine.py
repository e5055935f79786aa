"""Local refinement: fit each converted attention layer's outputs to the source attention's outputs on
calibration activations (teacher-forced, one layer in memory at a time).

Adam steps on every tensor of the layer, or with zero steps a least-squares refit of the output projection
alone: o_proj is linear in what it reads (the per-head mixed values), so its best fit is one normal-equation
solve (zero-shot gains in benchmarks/results/quality_*.md, `stats` rows). The two are alternatives, not stages:
Adam started from the refitted o_proj ended worse in the runs tried. Either is kept only if held-out error drops.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..kinds.layer import attention_module, layer_output, output_error, row_chunks
from ..modeling import FactorConvConfig
from ..precision import fitting_autocast, tensor_float32
from .calibrate import LayerActivations
from .conversion import REFINE_BATCH, RefineSpec

# On a CPU every refinement step is compute-bound: SmolLM2-135M (30 layers, hidden 576, 64 x 512 calibration tokens)
# spent 1,324 s of a 1,839 s conversion in 200 steps x 4 sequences per layer on 2 cores. Default refinement there
# does at most this much work, counted as steps x sequences x tokens per sequence x layers x hidden size (7.1e9 for
# that SmolLM2 run, now 85 steps x 2: 581 s and 1.292x against 1.200x, benchmarks/results/convert_real_smollm2_cpu*.md;
# pycode-27M 1.7e9 at 50% and twice that below, stories260K 0.13e9 at 50%).
CPU_REFINE_WORK = 1.5e9
# A capped default takes this many sequences per step, in more steps. At a fifth of the work, SmolLM2 at 50%:
# 80 steps x 2 gave 1.299x, 40 x 4 1.328x (benchmarks/results/convert_real_smollm2_cpu_steps.md); an exploratory
# per-layer proxy (held-out attention error of layers 0/10/20, not a benchmarks/ script) agreed: 80 x 2
# 0.024/0.323/0.280, 40 x 4 0.029/0.338/no gain, 160 x 1 0.026/0.323/no gain (200 x 4: 0.018/0.290/0.214).
CPU_REFINE_BATCH = 2


@dataclass
class RefineResult:
    tensors: dict[str, torch.Tensor]
    error_before: float  # relative attention-output error on held-out calibration tokens, closed-form init
    error_after: float  # the same after refinement (equal to before when it did not help)


def cpu_refinement(spec: RefineSpec, tokens: torch.Tensor, layers: int, hidden_size: int) -> RefineSpec:
    """The refinement a CPU conversion runs by default: `spec`, or where its work exceeds CPU_REFINE_WORK, steps of
    CPU_REFINE_BATCH sequences scaled to that work (what keeps a 135M model's CPU conversion within minutes)."""
    work = spec.steps * spec.batch_size * tokens.shape[1] * layers * hidden_size
    if not spec.cpu_default or work <= CPU_REFINE_WORK:
        return spec
    steps = max(1, round(spec.steps * spec.batch_size / CPU_REFINE_BATCH * CPU_REFINE_WORK / work))
    return replace(spec, steps=steps, batch_size=CPU_REFINE_BATCH)


def _output_refit(
    module: torch.nn.Module, acts: LayerActivations, rows: slice, ridge: float = 1e-4, chunk: int = 4
) -> None:
    """o_proj := argmin ‖o_proj(z) − target‖² over the fitting tokens, z = what o_proj reads in `module`.

    Normal equations in float64, ridge-regularised by `ridge` × the mean feature energy."""
    proj = module.o_proj
    captured: list[torch.Tensor] = []
    handle = proj.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    gram = cross = None
    try:
        with torch.no_grad():
            for part in row_chunks(rows, chunk):
                captured.clear()
                layer_output(module, acts, part)
                z = captured[0].reshape(-1, proj.in_features).double()
                if proj.bias is not None:
                    z = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
                y = acts.outputs[part].reshape(-1, proj.out_features).double()
                gram = z.T @ z if gram is None else gram + z.T @ z
                cross = z.T @ y if cross is None else cross + z.T @ y
    finally:
        handle.remove()
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    solution = torch.linalg.solve(gram, cross).T.to(proj.weight.dtype)  # (out, in [+ 1])
    with torch.no_grad():
        proj.weight.copy_(solution[:, : proj.in_features])
        if proj.bias is not None:
            proj.bias.copy_(solution[:, -1])


def _relative_groups(module: torch.nn.Module, lr: float) -> list[dict]:
    """One Adam group per tensor, its step size `lr` × the tensor's RMS: Adam moves every element by about its lr,
    so a fixed lr is a different relative step for each model's weight scale (SmolLM2's attention weights have
    RMS 0.12–0.28, pycode-27M's 0.04–0.05) and for each tensor (rope_mix ≈ 1 beside 0.1-scale projections)."""
    return [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-3))} for p in module.parameters()]


def _step_factor(steps: int, warmup: float, final: float) -> Callable[[int], float]:
    """Step-size factor at step t: linear warm-up over the first `warmup` fraction of the steps (Adam's first
    steps are full-size whatever the gradient and can undo a good closed-form start), then cosine decay to `final` ×
    the peak (late full-size steps only add noise). SmolLM2 at 50%: 1.20x vs 1.24x with a constant step
    (benchmarks/results/refine_schedule_smollm2.md, quality_smollm2.md)."""
    ramp = max(1, round(warmup * steps))

    def factor(t: int) -> float:
        if t < ramp:
            return (t + 1) / ramp
        progress = (t - ramp) / max(1, steps - ramp)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def refine_layer(
    config: FactorConvConfig,
    layer: int,
    tensors: dict[str, torch.Tensor],
    acts: LayerActivations,
    steps: int,
    lr: float = 0.02,
    batch_size: int = REFINE_BATCH,
    seed: int = 0,
    schedule: str = "warmup-cosine",
) -> RefineResult:
    """Fit the layer's attention to the source's outputs (`steps` Adam steps of peak relative size `lr`, shaped by
    `schedule`; 0: least-squares o_proj); keep the result only if held-out error drops."""
    device = acts.inputs.device
    module = attention_module(config, layer, tensors, device)
    total = acts.inputs.shape[0]
    fit, held_out = slice(0, total - acts.held_out), slice(total - acts.held_out, total)
    before = output_error(module, acts, held_out)
    if steps == 0:
        _output_refit(module, acts, fit)
    else:
        optimizer = torch.optim.Adam(_relative_groups(module, lr))
        warmup, final = (0.1, 0.1) if schedule == "warmup-cosine" else (0.0, 1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _step_factor(steps, warmup, final))
        generator = torch.Generator().manual_seed(seed)
        scale = acts.outputs[fit].pow(2).mean()
        with tensor_float32(device):
            for _ in range(steps):
                rows = torch.randint(0, fit.stop, (min(batch_size, fit.stop),), generator=generator).to(device)
                with fitting_autocast(device):
                    out = layer_output(module, acts, rows)
                loss = (out.float() - acts.outputs[rows]).pow(2).mean() / scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    after = output_error(module, acts, held_out)
    if after >= before:
        return RefineResult(tensors, before, before)
    prefix = f"model.layers.{layer}.self_attn."
    refined = {prefix + name: t.detach() for name, t in module.state_dict().items()}
    return RefineResult(refined, before, after)
