"""config.json of a converted model: only the active kind's fields, cache-sizing fields that describe the cache,
and folders written in the older form (every kind's fields, the source's num_key_value_heads) load unchanged."""

import json
import shutil

import pytest
import torch
from conftest import random_ids
from transformers import AutoModelForCausalLM

from factorconv.kinds import KINDS
from factorconv.modeling import FactorConvConfig
from factorconv.modeling.configuration_factorconv import KIND_FIELDS

KIND_OPTIONS = {"tpa": {"rank_k": 1}, "mfa": {"key_dim": 8, "value_dim": 8}, "mfa_kr": {"rope_dim": 4, "nope_dim": 8}}


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_json_holds_the_active_kind_and_a_true_cache_head_count(kind, converted, source_model):
    out = converted("llama_gqa", to=kind, **KIND_OPTIONS[kind])
    written = json.loads((out / "config.json").read_text())
    others = {f for name, fields in KIND_FIELDS.items() if name != kind for f in fields} - set(KIND_FIELDS[kind])
    assert others and not others & set(written)
    assert set(KIND_FIELDS[kind]) - {"tpa_rank_q", "query_rank", "tpa_contextual", "latent_norm"} <= set(written)
    source_heads = source_model("llama_gqa").config.num_key_value_heads
    assert written["num_key_value_heads"] == 1 and written["source_num_key_value_heads"] == source_heads == 2


@pytest.mark.parametrize("kind", list(KINDS))
def test_old_form_config_loads_as_the_same_model(kind, converted, tmp_path):
    """A folder written before source_num_key_value_heads: every kind's fields, num_key_value_heads the source's."""
    out = converted("llama_gqa", to=kind, **KIND_OPTIONS[kind])
    old = tmp_path / "old"
    shutil.copytree(out, old)
    config = json.loads((out / "config.json").read_text())
    full = FactorConvConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    every_field = {f: getattr(full, f) for fields in KIND_FIELDS.values() for f in fields}
    config.update(every_field, num_key_value_heads=config.pop("source_num_key_value_heads"))
    (old / "config.json").write_text(json.dumps(config))

    ids = random_ids(2, 12, seed=5)
    logits = {}
    for name, folder in (("new", out), ("old", old)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert (model.config.num_key_value_heads, model.config.source_num_key_value_heads) == (1, 2)
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert torch.equal(logits["old"], logits["new"])


def test_every_kind_writes_only_config_fields_of_its_own():
    from factorconv.convert.options import ConvertOptions

    for name, kind in KINDS.items():
        written = set(kind.config_fields(ConvertOptions(source="s", output="o", to=name).target()))
        planned = {kind.config_name(width) for width in kind.widths}
        assert written and (written | planned) <= set(KIND_FIELDS[name])


def test_a_new_form_config_refuses_a_second_kv_head_count():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        FactorConvConfig(num_key_value_heads=4, source_num_key_value_heads=4, num_attention_heads=8, hidden_size=64)
