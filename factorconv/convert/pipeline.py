"""convert(): source checkpoint -> factorized output folder, one layer's attention in memory at a time."""

import logging
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import FactorConvError
from ..kinds.layer import LayerReport, LayerStatistics
from ..model_folder import resolve_source
from ..output_folder import check_output, staged_output
from .artifacts import write_artifacts
from .calibrate import LayerwiseRunner, calibration_tokens
from .conversion import resolve_plan
from .layers import ATTENTION_TENSOR, convert_attention
from .options import ConvertOptions
from .plan import plan_target
from .refine import cpu_refinement, refine_layer
from .source import UNUSED_TENSOR_SUFFIXES, SourceCheckpoint
from .target import output_dtype
from .writer import ShardedWriter

logger = logging.getLogger("factorconv")


def convert(options: ConvertOptions, progress: bool = True) -> Path:
    """Convert `options.source` and write the result to `options.output` (atomically: temp folder + rename).

    With calibration data the source runs alongside, one layer at a time: each layer is factorized from its
    statistics, optionally refined on its activations, and its attention-output error is measured. The options
    are resolved once (convert/conversion.py); the stages read that plan.
    """
    plan = resolve_plan(options)
    output, device = plan.output.folder, plan.device
    local_source = Path(plan.source).expanduser()
    check_output(output, [local_source] if local_source.exists() else [], plan.output.overwrite)
    source = SourceCheckpoint(resolve_source(plan.source, plan.revision))
    source.check_complete()
    start = time.perf_counter()
    tokens = None
    if plan.calibration is not None:
        calib = plan.calibration
        tokens = calibration_tokens(calib.data, source.folder, calib.samples, calib.seq_len, source.config)
        refine = cpu_refinement(plan.refine, tokens, source.config.num_hidden_layers, source.config.hidden_size)
        if refine != plan.refine:
            logger.warning(
                "refinement on the CPU: %d steps x %d sequences per layer, %.1fx less work than the default %d x %d "
                "(--refine-steps/--refine-batch choose)", refine.steps, refine.batch_size,
                plan.refine.steps * plan.refine.batch_size / (refine.steps * refine.batch_size), plan.refine.steps,
                plan.refine.batch_size,
            )
            plan = replace(plan, refine=refine)
    # Uniform widths do not depend on spectra: no weights read, no calibration pass.
    target = plan_target(plan, source, tokens, progress=progress)
    config, layers = target.config, target.layers
    seconds = {"calibration data and allocation": time.perf_counter() - start, "refinement": 0.0}
    dtype = output_dtype(plan.output.dtype, source)
    runner = iter(LayerwiseRunner(source, tokens, device)) if tokens is not None else None

    with staged_output(output, plan.output.overwrite) as staging:  # one run per OUT; SIGTERM cleans up like Ctrl-C
        writer = ShardedWriter(staging, plan.output.max_shard_bytes)
        reports: list[LayerReport] = []
        read = source.reader()
        bar = tqdm(total=config.num_hidden_layers, desc="converting", unit="layer", disable=not progress)
        for name in source.names:
            match = ATTENTION_TENSOR.match(name)
            if match:
                layer = int(match.group(1))
                if reports and reports[-1].layer == layer:
                    continue  # this layer's attention was converted when its first tensor came up
                acts = next(runner) if runner is not None else None
                stats = None
                if acts is not None and plan.statistics:
                    stats = LayerStatistics(acts.moment(), plan.target.query_aware, acts, plan.fit_contextual)
                result = convert_attention(read, layer, config, device, stats)
                if result.rope_pairs is not None:
                    config.rope_pair_index[layer] = result.rope_pairs
                if acts is not None:
                    refine_start = time.perf_counter()
                    refined = refine_layer(
                        config, layer, result.tensors, acts, plan.refine.steps, plan.refine.lr,
                        batch_size=plan.refine.batch_size, schedule=plan.refine.schedule,
                    )
                    result.tensors = refined.tensors
                    result.report.attention_error = refined.error_before
                    result.report.refined_attention_error = refined.error_after
                    seconds["refinement"] += time.perf_counter() - refine_start
                del acts, stats  # this layer's activations go before the next layer's are collected (8.6 GB at 8B)
                if layers is not None:
                    result.report.probe_kl = layers[layer].probe_kl
                reports.append(result.report)
                bar.update()
                if result.report.attention_error is not None:
                    bar.set_postfix(error=f"{result.report.refined_attention_error:.3f}", refresh=False)
                for target_name, tensor in result.tensors.items():
                    writer.add(target_name, tensor.to(device="cpu", dtype=dtype))
            elif not name.endswith(UNUSED_TENSOR_SUFFIXES):
                writer.add(name, source.tensor(name).to(dtype))
        if len(reports) != config.num_hidden_layers:
            raise FactorConvError(
                f"{source.folder} has attention weights for {len(reports)} of {config.num_hidden_layers} layers"
            )
        bar.close()
        writer.close()
        seconds["total"] = time.perf_counter() - start
        seconds["layers besides refinement"] = seconds["total"] - seconds["refinement"] - seconds[
            "calibration data and allocation"]
        write_artifacts(staging, source.folder, config, plan, reports, seconds)
    logger.info("wrote %s", output)
    return output
