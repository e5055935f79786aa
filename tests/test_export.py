"""`factorconv export`: converted models written as stock DeepSeek-V3 (MLA) and Llama (MQA) folders.

The exports are loaded in a separate process where factorconv cannot be imported (and nothing is trusted as
remote code): their logits must equal the factorconv model's (fp32, max |Δ| ≤ 1e-4), greedy generation must be the
same, and the bytes transformers' own cache holds after `generate` must be what the format caches per token.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REAL, TINY, VOCAB, SourceSpec, build_source, random_ids
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from factorconv.cli import main
from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.errors import FactorConvError
from factorconv.export import EXPORT_FILE, ExportRefused, export
from factorconv.factorize.key_reuse import latent_norm_weight
from factorconv.modeling import FactorConvConfig
from factorconv.recipe import parse_recipe

MLA = dict(to="mfa_kr", mla=True, mla_shape="24+8")  # head dim 16: RoPE part 8 (every other pair), latent 24
MQA = dict(to="mfa", mqa=True)
PROMPT_LEN, NEW_TOKENS = 12, 8

# Runs in a fresh interpreter that cannot import factorconv: what a serving machine without it sees.
STOCK_RUNNER = r"""
import json, sys
sys.modules["factorconv"] = None  # any import of factorconv now fails
import torch
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
results = {}
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32).eval()
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=job["new_tokens"], do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0)
    cache = getattr(out, "cache", None) or out.past_key_values
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tokens = ids.shape[0] * (out.sequences.shape[1] - 1)
    torch.save({"logits": logits, "sequences": out.sequences, "class": type(model).__name__,
                "bytes_per_token": cached / tokens}, job["result"])
"""


def run_stock(jobs: list[dict]) -> None:
    done = subprocess.run([sys.executable, "-c", STOCK_RUNNER, json.dumps(jobs)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def mqa_source(folder: Path) -> Path:
    """A Llama that already has one KV head: converting it with --mqa keeps everything (exact)."""
    spec = SourceSpec("llama_mqa", LlamaForCausalLM, LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1))
    return build_source(spec, folder, seed=5)


CASES = {  # id -> (source, conversion, export format)
    "llama_gqa-mla": ("llama_gqa", MLA, "deepseek-v3"),
    "llama_mha-mla": ("llama_mha", MLA, "deepseek-v3"),
    "llama3_rope-mla": ("llama3_rope", MLA, "deepseek-v3"),
    "llama_gqa-mqa": ("llama_gqa", MQA, "llama"),
    "llama_mha-mqa": ("llama_mha", MQA, "llama"),
    "llama3_rope-mqa": ("llama3_rope", MQA, "llama"),
    "qwen2_gqa-mqa": ("qwen2_gqa", MQA, "llama"),
    "llama_bias-mqa": ("llama_bias", MQA, "llama"),
    "llama_gqa-mla-query_rank": ("llama_gqa", {**MLA, "query_rank": 24}, "deepseek-v3"),  # multiplied out: exact
    "llama_gqa-mqa-query_rank": ("llama_gqa", {**MQA, "query_rank": 24}, "llama"),
}


@pytest.fixture(scope="module")
def exports(source_dirs, converted, tmp_path_factory):
    """(source, format) -> (converted folder, export folder, stock-process results), all exported in one process."""
    root = tmp_path_factory.mktemp("exports")
    folders = {case: (converted(name, **options), None, fmt) for case, (name, options, fmt) in CASES.items()}
    mqa = mqa_source(root / "llama_mqa")
    mqa_converted = root / "llama_mqa-converted"
    convert(ConvertOptions(source=str(mqa), output=mqa_converted, **MQA), progress=False)
    folders["llama_mqa-mqa"] = (mqa_converted, mqa, "llama")
    jobs, result = [], {}
    for case, (folder, source, fmt) in folders.items():
        out = export(str(folder), root / case, fmt, progress=False)
        ids = random_ids(2, PROMPT_LEN, seed=len(jobs))
        jobs.append({"folder": str(out), "ids": ids.tolist(), "new_tokens": NEW_TOKENS, "result": str(out / "r.pt")})
        result[case] = (folder, out, ids, source, fmt)
    run_stock(jobs)
    return {key: (*value, torch.load(value[1] / "r.pt")) for key, value in result.items()}


def _factorconv_run(folder: Path, ids: torch.Tensor):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        sequences = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return model, logits, sequences


@pytest.mark.parametrize("case", [*CASES, "llama_mqa-mqa"])
def test_export_loads_stock_and_matches(exports, case):
    folder, out, ids, _, fmt, stock = exports[case]
    model, logits, sequences = _factorconv_run(folder, ids)
    config = json.loads((out / "config.json").read_text())
    assert stock["class"] == config["architectures"][0]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    assert float((stock["logits"] - logits).abs().max()) <= 1e-4
    assert torch.equal(stock["sequences"], sequences)
    layers, fc = model.config.num_hidden_layers, model.config
    if fmt == "deepseek-v3":
        assert config["model_type"] == "deepseek_v3" and config["first_k_dense_replace"] == layers
        expected = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * layers * 4
        assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (fc.nope_dim[0], fc.rope_dim[0])
    else:
        assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1
        expected = 2 * config["head_dim"] * layers * 4
    assert stock["bytes_per_token"] == expected
    kv_heads = fc.source_num_key_value_heads
    assert expected < 2 * kv_heads * fc.head_dim * layers * 4 or kv_heads == 1
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["kv_bytes_per_token"]["exported"] == expected
    assert "vllm serve" in (out / "README.md").read_text()


def test_mqa_from_an_mqa_source_is_exact(exports, source_model):
    """With one KV head already, --mqa keeps every key pair and value dim: source == converted == export."""
    folder, out, ids, source, _, stock = exports["llama_mqa-mqa"]
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(ids).logits
    assert float((_factorconv_run(folder, ids)[1] - expected).abs().max()) <= 1e-4
    assert float((stock["logits"] - expected).abs().max()) <= 1e-4


def test_mla_conversion_structure(converted):
    """--mla: every layer caches the same N + R, its RoPE part keeps every other source pair, the latent is normed."""
    config = FactorConvConfig.from_pretrained(converted("llama_gqa", **MLA))
    assert config.serving_format == "deepseek_v3" and config.latent_norm
    assert set(config.nope_dim) == {24} and set(config.rope_dim) == {8}
    assert all(list(pairs) == [0, 2, 4, 6] for pairs in config.rope_pair_index)


def test_mla_from_kv_budget(converted):
    """With a budget the RoPE part is the whole head dim (every source frequency once) when that is at most half
    the layer's width, and the latent takes the rest."""
    config = FactorConvConfig.from_pretrained(converted("llama_gqa", to="mfa_kr", mla=True, kv_budget=0.5))
    source_width = 2 * 2 * 16
    assert set(config.rope_dim) == {16} and set(config.nope_dim) == {source_width // 2 - 16}


def test_mla_model_generates_with_a_smaller_cache(converted):
    """The factorconv --mla model itself: cached greedy == uncached greedy, and the cache holds N + R per token."""
    model = AutoModelForCausalLM.from_pretrained(converted("llama_gqa", **MLA), dtype=torch.float32).eval()
    ids = random_ids(2, PROMPT_LEN, seed=3)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                return_dict_in_generate=True)
        uncached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    cache = getattr(cached, "cache", None) or cached.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    per_token = held / (2 * (cached.sequences.shape[1] - 1))
    assert per_token == (24 + 8) * 2 * 4 < 2 * 2 * 16 * 2 * 4


@pytest.mark.parametrize(
    "name, options, fmt, needle",
    [
        ("llama_gqa", dict(to="mfa_kr", rope_dim=8, nope_dim=24), "deepseek-v3", "--mla"),
        ("llama_gqa", dict(to="mfa", key_dim=16, value_dim=16), "llama", "--mqa"),
        ("llama_gqa", dict(to="tpa", rank_k=1, rank_v=1), "llama", "takes mfa models"),
        ("llama_gqa", MQA, "deepseek-v3", "takes mfa-kr models"),
        ("llama_gqa", MLA, "llama", "takes mfa models"),
        ("qwen2_gqa", MLA, "deepseek-v3", "queries have biases"),
    ],
)
def test_export_refuses_models_that_do_not_fit(converted, tmp_path, name, options, fmt, needle):
    out = tmp_path / "out"
    with pytest.raises(ExportRefused, match=needle):
        export(str(converted(name, **options)), out, fmt, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_cli_one_line_errors_and_overwrite(converted, tmp_path):
    folder = converted("llama_gqa", **MQA)
    runner = CliRunner()
    refused = runner.invoke(main, ["export", str(folder), str(tmp_path / "x"), "--format", "deepseek-v3"])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "--to mfa-kr --mla" in refused.output and not (tmp_path / "x").exists()
    out = tmp_path / "llama"
    assert runner.invoke(main, ["export", str(folder), str(out), "--format", "llama", "-q"]).exit_code == 0
    again = runner.invoke(main, ["export", str(folder), str(out), "--format", "llama", "-q"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    replaced = runner.invoke(main, ["export", str(folder), str(out), "--format", "llama", "-q", "--overwrite"])
    assert replaced.exit_code == 0 and (out / EXPORT_FILE).is_file()
    not_factorconv = runner.invoke(main, ["export", str(out), str(tmp_path / "y"), "--format", "llama"])
    assert not_factorconv.exit_code == 1 and "unsupported architecture LlamaForCausalLM" in not_factorconv.output


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(to="mfa_kr", mla_shape="24+8"), "use it with mla"),
        (dict(to="mfa_kr", mla=True), "pass mla_shape"),
        (dict(to="mfa_kr", mla=True, mla_shape="24+8", kv_budget=0.5), "not both"),
        (dict(to="mfa_kr", mla=True, rope_dim=8), "drop rope_dim"),
        (dict(to="mfa_kr", mla=True, kv_budget=0.5, allocation="greedy"), "drop allocation greedy"),
        (dict(to="mfa", mqa=True, kv_budget=0.5), "drop kv_budget"),
        (dict(to="mfa", mqa=True, key_dim=8), "drop key_dim"),
        (dict(to="mfa", mla=True, mla_shape="24+8"), "applies to --to mfa_kr"),
        (dict(to="mfa_kr", mla=True, mla_shape="24-8"), "should match pattern"),
    ],
)
def test_serving_options_are_validated(options, needle):
    with pytest.raises(ValueError, match=needle):
        ConvertOptions(source="s", output="o", **options)


@pytest.mark.parametrize(
    "shape, needle", [("24+6", "must be even and divide the head dim 16"), ("200+8", "between 1 and")]
)
def test_mla_shape_must_fit_the_source(source_dirs, tmp_path, shape, needle):
    with pytest.raises(FactorConvError, match=needle):
        convert(ConvertOptions(source=str(source_dirs["llama_gqa"]), output=tmp_path / "o", to="mfa_kr", mla=True,
                               mla_shape=shape), progress=False)
    assert not (tmp_path / "o").exists()


def test_recipe_takes_the_serving_keys():
    recipe = parse_recipe({"source": "org/m", "target": {"kind": "mfa-kr", "mla": True, "mla_shape": "256+64"},
                           "output": {"dir": "out"}})
    assert recipe.convert_options().serving_format == "deepseek_v3"


def test_latent_norm_weight_reproduces_a_latent_of_constant_rms():
    """When rms(c) is the same for every token the fitted scale makes the norm the identity on c."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=gen, dtype=torch.float64)
    weight = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0][:6] * 3.0
    c = x @ weight.T  # every token's latent rescaled to rms 1
    x = x / c.pow(2).mean(dim=1, keepdim=True).sqrt()
    w = latent_norm_weight(weight, None, x, None, eps=0.0)
    c = x @ weight.T
    normed = w * c / c.pow(2).mean(dim=1, keepdim=True).sqrt()
    assert torch.allclose(normed, c, atol=1e-10)


def test_latent_norm_only_for_mfa_kr():
    with pytest.raises(ValueError, match="latent_norm"):
        FactorConvConfig(attention="mfa", latent_norm=True, **_tiny_config())


def _tiny_config() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@pytest.mark.parametrize("model", [
    pytest.param(m, marks=pytest.mark.real(REAL / m / "config.json")) for m in ("stories260K-hf", "pycode-27M-hf")
])
def test_real_models_export(tmp_path, model):
    """The real checkpoints, weight-only (the export is exact whatever the init): MFA-KR → DeepSeek-V3 and
    MFA → Llama MQA load with stock transformers, outside factorconv, and match."""
    source = REAL / model
    head_dim = 8 if model.startswith("stories") else 64
    shape = f"{2 * head_dim}+{head_dim // 2}"
    jobs, runs = [], []
    for fmt, options in (("deepseek-v3", dict(to="mfa_kr", mla=True, mla_shape=shape)), ("llama", MQA)):
        folder = tmp_path / f"{fmt}-converted"
        convert(ConvertOptions(source=str(source), output=folder, init="weight", dtype="float32", **options),
                progress=False)
        out = export(str(folder), tmp_path / fmt, fmt, progress=False)
        ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(1))
        jobs.append({"folder": str(out), "ids": ids.tolist(), "new_tokens": NEW_TOKENS, "result": str(out / "r.pt")})
        runs.append((folder, ids, out))
    run_stock(jobs)
    for folder, ids, out in runs:
        stock = torch.load(out / "r.pt")
        _, logits, sequences = _factorconv_run(folder, ids)
        assert float((stock["logits"] - logits).abs().max()) <= 1e-4
        assert torch.equal(stock["sequences"], sequences)


def test_plan_names_the_serving_shapes(source_dirs):
    """`factorconv plan` says which DeepSeek-V3 shape a budget gives (and what vLLM's shapes would cost) and what
    an MQA export caches."""
    runner = CliRunner()
    mla = runner.invoke(main, ["plan", str(source_dirs["llama_gqa"]), "--to", "mfa-kr", "--kv-budget", "0.5"])
    assert mla.exit_code == 0, mla.output
    assert "kv_lora_rank+qk_rope_head_dim = 16+16" in mla.output and "512+64 does not fit this source" in mla.output
    mqa = runner.invoke(main, ["plan", str(source_dirs["llama_gqa"]), "--to", "mfa", "--kv-budget", "0.5"])
    assert mqa.exit_code == 0 and "one KV head of 16, 50.0% of the source's KV bytes" in mqa.output


def test_recipe_export_must_match_the_target():
    base = {"source": "org/m", "output": {"dir": "out/x"}, "export": {"format": "deepseek-v3", "dir": "out/y"}}
    with pytest.raises(FactorConvError, match="export.format deepseek-v3: .*target.mla: true"):
        parse_recipe({**base, "target": {"kind": "mfa_kr", "kv_budget": 0.25}})
    with pytest.raises(FactorConvError, match="export.format llama: .*target.mqa: true"):
        parse_recipe({**base, "target": {"kind": "mfa_kr", "mla": True, "mla_shape": "24+8"},
                      "export": {"format": "llama", "dir": "out/y"}})


def test_recipe_run_exports(source_dirs, tmp_path):
    """`factorconv run` with an export section: convert with target.mqa, then the stock Llama copy."""
    from factorconv.run import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"source: {source_dirs['llama_gqa']}\ntarget: {{kind: mfa, mqa: true}}\noutput: {{dir: {tmp_path / 'm'}}}\n"
        f"export: {{format: llama, dir: {tmp_path / 'served'}}}\n"
    )
    run_recipe(recipe, progress=False, echo=lambda line: None)
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 1
    run_recipe(recipe, progress=False, echo=lambda line: None)  # again: the conversion is reused, the export replaced
    assert (tmp_path / "served" / EXPORT_FILE).is_file()
