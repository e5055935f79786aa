"""Measured allocation (`allocation: measured`): the per-layer KL probe and the widths it allocates."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import random_ids

from factorconv.cli import main
from factorconv.convert import convert, sensitivity
from factorconv.convert.calibrate import AsSourceAttention
from factorconv.convert.conversion import resolve_plan
from factorconv.convert.options import ConvertOptions
from factorconv.convert.plan import plan_layers
from factorconv.convert.source import SourceCheckpoint
from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token
from factorconv.factorize.allocate import Component, level_allocation
from factorconv.kinds import KINDS, Geometry


def _probe(source_dir, tmp_path, budget: float, monkeypatch, to: str = "mfa_kr"):
    """Run the probe at uniform widths; return its sensitivities, the tokens and the converted modules it built."""
    options = ConvertOptions(source=str(source_dir), output=tmp_path / "out", to=to, kv_budget=budget,
                             calib="unused", allocation="measured")
    plan, source = resolve_plan(options), SourceCheckpoint(source_dir)
    geometry = Geometry.of(source.config)
    flat = [KINDS[to].components(geometry, plan.target)] * geometry.layers
    uniform = plan_layers(plan.target, "uniform", geometry, flat, False)
    built = []
    real_module = sensitivity.attention_module
    monkeypatch.setattr(sensitivity, "attention_module", lambda *a, **k: built.append(real_module(*a, **k)) or built[-1])
    tokens = random_ids(20, 16, seed=11)

    def spectra(src, moment):
        return KINDS[to].components(geometry, plan.target, src, moment)

    probed = sensitivity.probe_layers(plan, source, tokens, uniform, spectra, progress=False)
    return probed, tokens, built


@pytest.mark.parametrize("to", ["mfa_kr", "tpa"])
def test_probe_kl_is_the_kl_of_the_model_with_that_layer_converted(to, source_dirs, source_model, tmp_path, monkeypatch):
    probed, tokens, built = _probe(source_dirs["llama_gqa"], tmp_path, 0.5, monkeypatch, to)
    model = source_model("llama_gqa")
    held_out = tokens[-max(1, tokens.shape[0] // 10):]
    with torch.no_grad():
        reference = torch.log_softmax(model(held_out).logits, dim=-1)
    assert len(probed) == len(built) == model.config.num_hidden_layers
    for layer, (probe, module) in enumerate(zip(probed, built)):
        original = model.model.layers[layer].self_attn
        model.model.layers[layer].self_attn = AsSourceAttention(module)
        try:
            with torch.no_grad():
                converted = torch.log_softmax(model(held_out).logits, dim=-1)
        finally:
            model.model.layers[layer].self_attn = original
        direct = float((reference.exp() * (reference - converted)).sum(-1).mean())
        assert direct > 1e-5  # half the bytes: the conversion is not exact, so there is something to measure
        assert probe.kl == pytest.approx(direct, rel=1e-3, abs=1e-7)


def test_probe_of_an_exact_conversion_measures_nothing(source_dirs, tmp_path, monkeypatch):
    probed, _, _ = _probe(source_dirs["llama_gqa"], tmp_path, 1.0, monkeypatch)
    assert all(abs(p.kl) < 1e-6 for p in probed)


def test_measured_allocation_meets_the_budget_and_differs_from_uniform(source_dirs, tmp_path, load_model):
    calib = tmp_path / "calib.npy"
    np.save(calib, random_ids(1, 32 * 16, seed=5)[0].numpy().astype(np.uint16))
    budget = 0.5
    options = dict(source=str(source_dirs["llama_gqa"]), to="mfa_kr", kv_budget=budget, calib=str(calib),
                   calib_samples=16, calib_seq_len=32, refine_steps=0)
    measured = convert(ConvertOptions(output=tmp_path / "m", allocation="measured", **options), progress=False)
    model, source = load_model(measured), load_model(source_dirs["llama_gqa"])
    assert analytic_kv_bytes_per_token(model.config, 4) <= budget * analytic_kv_bytes_per_token(source.config, 4)
    widths = [r + n for r, n in zip(model.config.rope_dim, model.config.nope_dim)]
    assert len(set(widths)) > 1  # layers of different sensitivity get different widths
    report = json.loads((measured / "factorconv_report.json").read_text())["layers"]
    assert all(layer["probe_kl"] > 0 for layer in report), report


def test_measured_allocation_needs_calibration_and_a_budget(source_dirs, tmp_path):
    for bad, fix in ((dict(kv_budget=0.5), "pass --kv-budget and --calib"),
                     (dict(calib="x.txt", rope_dim=8), "pass --kv-budget and --calib"),
                     (dict(calib="x.txt", kv_budget=0.5, mla=True), "drop allocation measured")):
        with pytest.raises(ValueError, match=fix):
            ConvertOptions(source="s", output=tmp_path, to="mfa_kr", allocation="measured", **bad)
    result = CliRunner().invoke(main, ["convert", str(source_dirs["llama_gqa"]), str(tmp_path / "o"), "--to",
                                       "mfa-kr", "--kv-budget", "0.5", "--allocation", "measured"])
    assert result.exit_code != 0 and "pass --kv-budget and --calib" in result.output
    assert not (tmp_path / "o").exists()


def test_plan_prints_the_probed_kl(source_dirs, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 37}" for i in range(3000)))
    result = CliRunner().invoke(main, ["plan", str(source_dirs["llama_gqa"]), "--to", "mfa-kr", "--kv-budget", "0.5",
                                       "--allocation", "measured", "--calib", str(calib), "--calib-samples", "8",
                                       "--calib-seq-len", "32"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.lstrip().startswith("layer"))
    assert header.rstrip().endswith("probe KL")


def test_level_allocation_spends_the_budget_where_cost_drops_most():
    steep = [(1, 10.0), (2, 4.0), (3, 3.5)]
    flat = [(1, 1.0), (2, 0.9), (3, 0.85)]
    assert level_allocation([steep, flat], 3) == [1, 0]
    assert level_allocation([steep, flat], 5) == [2, 1]  # the steep layer's next 0.5 first, then the flat one's 0.1
    assert level_allocation([steep, flat], 6) == [2, 2]
    with pytest.raises(ValueError, match="minimum is 2"):
        level_allocation([steep, flat], 1)


def test_the_layer_that_costs_more_gets_more_width():
    gains = [0.4, 0.3, 0.2, 0.1]
    parts = [Component("key_dim", gains, 2, units_per_value=2), Component("value_dim", gains, 1)]
    uniform = {"key_dim": 4, "value_dim": 2}  # 2 pairs + 2 value dims: 6 numbers per token
    quiet, loud = (sensitivity.LayerSensitivity(i, kl, parts) for i, kl in enumerate((0.01, 0.1)))
    levels = [sensitivity.layer_levels(s, uniform) for s in (quiet, loud)]
    choice = level_allocation([[(w, kl) for _, w, kl in layer] for layer in levels], 12)
    (quiet_widths, quiet_width, _), (loud_widths, loud_width, _) = (layer[c] for layer, c in zip(levels, choice))
    assert loud_width > 6 > quiet_width and quiet_width + loud_width <= 12
    assert loud_widths["key_dim"] // 2 == loud_widths["value_dim"]  # the uniform key/value proportions are kept


def test_probe_streams_stay_within_their_byte_bound():
    """Small models probe every held-out sequence up to PROBE_TOKENS; at Llama-3.1-8B shapes the kept residual
    streams (one per layer, float32) would be 8.6 GB for 16K tokens, so fewer sequences are carried."""
    assert sensitivity.probe_rows(held_out=12, seq_len=512, layers=30, hidden_size=576) == 12
    assert sensitivity.probe_rows(held_out=12, seq_len=2048, layers=16, hidden_size=2048) == 8
    rows = sensitivity.probe_rows(held_out=12, seq_len=2048, layers=32, hidden_size=4096)
    assert rows == 2 and rows * 32 * 2048 * 4096 * 4 <= sensitivity.PROBE_STREAM_BYTES
    assert sensitivity.probe_rows(held_out=12, seq_len=8192, layers=80, hidden_size=8192) == 1
