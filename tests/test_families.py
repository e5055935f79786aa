"""Source families (factorconv/families/): each supported family's spec names exactly the attention tensors the
installed transformers class creates, and each refused family gets one line naming it and why, from its real
config.json alone (no weights), with every stated reason checked against transformers' own class."""

import json
import shutil

import pytest
import torch
from conftest import TINY
from test_cli import assert_clean_failure, parent, run  # noqa: F401  (parent: the fixture)
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

from factorconv.families import FAMILIES, HF_ATTENTION, REFUSED, SUPPORTED_ARCHITECTURES
from factorconv.families.refused import GEMMA, GEMMA2, GEMMA3, PHI3, QWEN3
from factorconv.families.supported import LLAMA, MISTRAL, QWEN2

HEADS = dict(num_attention_heads=4, num_key_value_heads=2)

SUPPORTED_CONFIGS = {  # id -> (family, a config of it)
    "llama": (LLAMA, LlamaConfig(**TINY, **HEADS)),
    "llama-attention-bias": (LLAMA, LlamaConfig(**TINY, **HEADS, attention_bias=True)),
    "llama-mlp-bias": (LLAMA, LlamaConfig(**TINY, **HEADS, mlp_bias=True)),
    "mistral": (MISTRAL, MistralConfig(**TINY, **HEADS, sliding_window=32)),
    "qwen2": (QWEN2, Qwen2Config(**TINY, **HEADS)),
    "qwen2-sliding": (QWEN2, Qwen2Config(**TINY, **HEADS, use_sliding_window=True, sliding_window=32)),
}


def state_names(config) -> set[str]:
    with torch.device("meta"):
        return set(AutoModelForCausalLM.from_config(config).state_dict())


@pytest.mark.parametrize("case", list(SUPPORTED_CONFIGS))
def test_spec_names_exactly_the_attention_tensors_transformers_creates(case):
    family, config = SUPPORTED_CONFIGS[case]
    names = state_names(config)
    for layer in range(config.num_hidden_layers):
        prefix = family.attention.prefix.format(layer=layer)
        assert {n for n in names if n.startswith(prefix)} == family.attention_tensors(layer, config), case
    # The pattern the conversion walks the checkpoint with picks out exactly those tensors (no q_norm, no MLP).
    matched = {n for n in names if family.attention.pattern.match(n)}
    assert matched == set().union(*(family.attention_tensors(i, config) for i in range(config.num_hidden_layers)))
    assert ("model.layers.0.mlp.gate_proj.bias" in names) == family.has_mlp_bias(config)


@pytest.mark.parametrize("family", FAMILIES + REFUSED, ids=lambda f: f.name)
def test_family_names_are_the_transformers_ones(family):
    """Every model_type a family claims is one transformers knows, and maps to one of its architectures."""
    for model_type in family.model_types:
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] in family.architectures, model_type
    assert any(t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES for t in family.model_types), family.name


def test_supported_families_share_the_names_the_pipeline_walks():
    """convert/layers.py walks every source with HF_ATTENTION's pattern and kinds/layer.py's SourceAttention reads
    under its names: a family with other names must take its own through both before it is registered."""
    assert all(family.attention == HF_ATTENTION for family in FAMILIES)


def test_sliding_window_is_reported_only_where_the_family_has_one():
    assert MISTRAL.window(SUPPORTED_CONFIGS["mistral"][1]) == 32
    assert QWEN2.window(SUPPORTED_CONFIGS["qwen2-sliding"][1]) == 32
    assert QWEN2.window(SUPPORTED_CONFIGS["qwen2"][1]) is None  # use_sliding_window off, as Qwen2.5 ships
    assert LLAMA.window(LlamaConfig(**TINY, **HEADS, sliding_window=32)) is None  # Llama's class ignores the key


TEXT = dict(TINY, **HEADS)
REFUSED_CONFIGS = {  # family -> (its config as a real config.json carries it, words of the reason)
    QWEN3: (Qwen3Config(**TEXT, architectures=["Qwen3ForCausalLM"]), "q_norm, k_norm"),
    GEMMA: (GemmaConfig(**TEXT, architectures=["GemmaForCausalLM"]), "(1 + weight)"),
    GEMMA2: (Gemma2Config(**TEXT, architectures=["Gemma2ForCausalLM"]), "soft-caps"),
    GEMMA3: (Gemma3TextConfig(**TEXT, architectures=["Gemma3ForCausalLM"]), "q_norm, k_norm"),
    PHI3: (Phi3Config(**{k: v for k, v in TEXT.items() if k != "head_dim"}, pad_token_id=0,
                      architectures=["Phi3ForCausalLM"]),
           "qkv_proj"),
}


@pytest.mark.parametrize("family", REFUSED, ids=lambda f: f.name)
@pytest.mark.parametrize("command", ["convert", "plan"])
def test_refused_family_gets_one_line_from_its_config_alone(family, command, tmp_path, parent):
    config, words = REFUSED_CONFIGS[family]
    source = tmp_path / family.name
    config.save_pretrained(source)  # config.json only: refused before any weight is looked for
    args = [source, parent / "out"] if command == "convert" else [source, "--to", "mfa", "--kv-budget", "0.5"]
    message = assert_clean_failure(run(command, *args), parent, f"unsupported architecture {config.architectures[0]}:",
                                   f" {family.name} ", words, "supported: LlamaForCausalLM")
    assert "checkpoint" not in message and "model.safetensors" not in message


def test_gemma3_multimodal_checkpoint_is_refused_as_gemma3(tmp_path, parent):
    source = tmp_path / "gemma3"
    Gemma3Config(text_config=TEXT, architectures=["Gemma3ForConditionalGeneration"]).save_pretrained(source)
    assert_clean_failure(run("convert", source, parent / "out"), parent,
                         "unsupported architecture Gemma3ForConditionalGeneration: Gemma3 ", "q_norm")


def test_family_is_known_by_model_type_too(tmp_path, parent):
    """A Qwen3 config relabelled as Llama still builds a Qwen3 in transformers: refused as Qwen3."""
    source = tmp_path / "relabelled"
    Qwen3Config(**TEXT, architectures=["LlamaForCausalLM"]).save_pretrained(source)
    assert_clean_failure(run("convert", source, parent / "out"), parent, "Qwen3 normalises", "q_norm")


def test_architecture_and_model_type_must_agree(source_dirs, tmp_path, parent):
    source = tmp_path / "mislabelled"
    shutil.copytree(source_dirs["llama_gqa"], source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert_clean_failure(run("convert", source, parent / "out"), parent,
                         "names LlamaForCausalLM but model_type 'mistral'", "must agree")


def test_supported_architectures_are_the_families():
    assert SUPPORTED_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


# Each refusal's reason, checked against the installed transformers' class, so a stale reason fails here.


def test_qwen3_and_gemma3_norm_queries_and_keys():
    for family in (QWEN3, GEMMA3):
        names = state_names(REFUSED_CONFIGS[family][0])
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= names
    assert "model.layers.0.post_feedforward_layernorm.weight" in names


def test_phi3_fuses_qkv():
    names = state_names(REFUSED_CONFIGS[PHI3][0])
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    assert "model.layers.0.self_attn.q_proj.weight" not in names


def test_gemma2_soft_caps_and_norms_after():
    config = REFUSED_CONFIGS[GEMMA2][0]
    assert config.attn_logit_softcapping and config.final_logit_softcapping and config.query_pre_attn_scalar
    assert "model.layers.0.post_feedforward_layernorm.weight" in state_names(config)


def test_gemma_scales_norms_by_one_plus_weight_and_embeddings():
    norm = GemmaRMSNorm(8)
    with torch.no_grad():
        norm.weight.zero_()  # a Llama RMSNorm with zero weight outputs zeros; Gemma's is the plain normalisation
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps), atol=1e-6)
    config = REFUSED_CONFIGS[GEMMA][0]
    with torch.device("meta"):
        embed = AutoModelForCausalLM.from_config(config).model.embed_tokens
    assert embed.scalar_embed_scale == pytest.approx(config.hidden_size**0.5)
