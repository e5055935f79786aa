"""Everything in an output folder besides the weights: config, modeling code, tokenizer, recipe, card."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..modeling import FactorConvConfig
from ..recipe import ConvertOptions
from .layers import LayerReport

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
MODELING_FILES = ("configuration_factorconv.py", "modeling_factorconv.py")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
REPORT_FILE = "factorconv_report.json"
RECIPE_FILE = "factorconv_recipe.yaml"


def source_kv_bytes_per_token(config: FactorConvConfig, bytes_per_value: int) -> int:
    """Bytes the source model caches per token: keys and values of every KV head in every layer."""
    return 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers * bytes_per_value


def target_kv_bytes_per_token(config: FactorConvConfig, bytes_per_value: int) -> int:
    return sum(config.kv_cache_width(i) for i in range(config.num_hidden_layers)) * bytes_per_value


def write_artifacts(
    folder: Path, source_folder: Path, config: FactorConvConfig, options: ConvertOptions, reports: list[LayerReport]
) -> None:
    config.save_pretrained(folder)
    for name in MODELING_FILES:
        shutil.copy(MODELING_DIR / name, folder / name)
    for name in TOKENIZER_FILES:
        if (source_folder / name).is_file():
            shutil.copy(source_folder / name, folder / name)
    (folder / RECIPE_FILE).write_text(options.to_yaml())
    size = config.dtype.itemsize if hasattr(config.dtype, "itemsize") else 4
    report = {
        "source": options.source,
        "attention": config.attention,
        "kv_bytes_per_token": {
            "source": source_kv_bytes_per_token(config, size),
            "converted": target_kv_bytes_per_token(config, size),
        },
        "layers": [asdict(r) for r in reports],
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    model_card(config, options, report).save(folder / "README.md")


def model_card(config: FactorConvConfig, options: ConvertOptions, report: dict) -> ModelCard:
    """A Hub model card: front matter for search, and a body saying what was done and what it saves."""
    kv = report["kv_bytes_per_token"]
    worst = max((max(r["key_error"], r["value_error"]) for r in report["layers"]), default=0.0)
    data = ModelCardData(
        base_model=options.source if not Path(options.source).exists() else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["factorconv", config.attention, "kv-cache-compression"],
    )
    body = f"""
# {Path(options.output).name}

`{options.source}` converted by [factorconv](https://pypi.org/project/factorconv/) to
{_describe(config)}

| | source | converted |
|---|---|---|
| KV cache bytes per token | {kv["source"]:,} | {kv["converted"]:,} ({kv["converted"] / kv["source"]:.1%}) |

{_dims(config)}. Largest relative key/value error over layers: {worst:.3g}
(0 means the conversion is exact).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this repo>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this repo>")
```

## Recipe

```yaml
{options.to_yaml().strip()}
```
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)


def _describe(config: FactorConvConfig) -> str:
    if config.attention == "tpa":
        kind = "contextual " if config.tpa_contextual else ""
        return (
            f"{kind}Tensor Product Attention (TPA): keys and values are sums of per-token tensor products, "
            "and the KV cache stores those factors instead of per-head keys and values."
        )
    if config.attention == "mfa":
        return (
            "Multi-matrix Factorization Attention (MFA): one RoPE-preserving merged key head and one value head "
            "shared by all query heads, so the cache holds one key and one value vector per token."
        )
    return (
        "MFA with Key-Reuse (MFA-KR): one cached vector per token, [RoPE part | shared part], serving as the "
        "key, with its shared part also read as the value."
    )


def _dims(config: FactorConvConfig) -> str:
    if config.attention == "tpa":
        dims = f"Ranks per layer: R_K = {config.tpa_rank_k}, R_V = {config.tpa_rank_v}"
        return dims + (f", R_Q = {config.tpa_rank_q}" if config.tpa_rank_q else "")
    if config.attention == "mfa":
        dims = f"Widths per layer: d_K = {config.key_dim}, d_V = {config.value_dim}"
    else:
        dims = f"Widths per layer: d_R = {config.rope_dim}, d_N = {config.nope_dim}"
    return dims + (f", query rank {config.query_rank}" if config.query_rank else "")
