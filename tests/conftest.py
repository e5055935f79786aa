"""Shared fixtures: tiny random Llama-family source checkpoints built locally, and cached conversions.

Nothing here touches the network: every source model is built from a transformers config with seeded random
weights and saved with `save_pretrained`. Converted folders are cached per session and keyed by the options,
so several tests can share one conversion.
"""

import copy
import os

# Offline before huggingface_hub is imported (it reads these once): no test may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets' own switch (it also honours HF_HUB_OFFLINE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import factorconv  # noqa: E402, F401  (registers the factorconv Auto classes)
from factorconv.convert import convert  # noqa: E402
from factorconv.convert.options import ConvertOptions  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest and robust to a busy machine

# The real checkpoints and texts live beside the checkout: <repo>/../shared/real.
REAL = Path(__file__).parents[2] / "shared" / "real"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.real(path, ...)`: the test reads these files of ../shared/real and skips without them, unless
    FACTORCONV_REQUIRE_REAL is set (.ci/run sets it when ../shared/real exists): then a missing file fails the
    test, so an incomplete shared folder cannot pass as a green run that quietly skipped the real weights."""
    for mark in item.iter_markers("real"):
        missing = [Path(p) for p in mark.args if not Path(p).exists()]
        if not missing:
            continue
        reason = f"needs ../shared/real: {missing[0]} is absent"
        if os.environ.get("FACTORCONV_REQUIRE_REAL"):
            pytest.fail(f"{reason}, and FACTORCONV_REQUIRE_REAL is set", pytrace=False)
        pytest.skip(reason)

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    model_class: type
    config: object


def _specs() -> dict[str, SourceSpec]:
    return {
        "llama_mha": SourceSpec(
            "llama_mha", LlamaForCausalLM, LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=4)
        ),
        "llama_gqa": SourceSpec(
            "llama_gqa", LlamaForCausalLM, LlamaConfig(**TINY, num_attention_heads=8, num_key_value_heads=2)
        ),
        "mistral_gqa": SourceSpec(
            "mistral_gqa",
            MistralForCausalLM,
            MistralConfig(**TINY, num_attention_heads=8, num_key_value_heads=2, sliding_window=None),
        ),
        "qwen2_gqa": SourceSpec(
            "qwen2_gqa",
            Qwen2ForCausalLM,
            Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2),
        ),
        "llama3_rope": SourceSpec(
            "llama3_rope",
            LlamaForCausalLM,
            LlamaConfig(
                **TINY,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            ),
        ),
        # attention_bias=True gives q/k/v *and* o biases; tied embeddings cover the lm_head-less checkpoint.
        "llama_bias": SourceSpec(
            "llama_bias",
            LlamaForCausalLM,
            LlamaConfig(
                **TINY, num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True
            ),
        ),
    }


SOURCE_NAMES = list(_specs())


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Re-initialize every parameter so attention is far from uniform and biases are non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            if name.endswith("norm.weight"):
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)


def randomize_head_proj(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Converted contextual models start with A = 0; a copy whose A is non-zero, so a(x) really depends on x."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "head_proj" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over 'w0' ... 'w124' (ids 3..127) so text files can be evaluated offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_source(spec: SourceSpec, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = spec.model_class(spec.config)
    randomize(model, seed)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def source_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a saved tiny random source model (safetensors, fp32)."""
    root = tmp_path_factory.mktemp("sources")
    dirs = {}
    for seed, (name, spec) in enumerate(_specs().items()):
        dirs[name] = build_source(spec, root / name, seed=1000 + seed)
    # One source also carries a tokenizer, for text evaluation and tokenizer-file copying.
    tiny_tokenizer().save_pretrained(dirs["llama_gqa"])
    return dirs


@pytest.fixture(scope="session")
def source_model(source_dirs):
    """name -> the source model loaded back from its folder (fp32, eval mode), cached."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(source_dirs[name], dtype=torch.float32).eval()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def converted(source_dirs, tmp_path_factory):
    """converted(name, **options) -> output folder of a conversion, cached per (name, options)."""
    root = tmp_path_factory.mktemp("converted")
    cache: dict[tuple, Path] = {}

    def get(name: str, **options) -> Path:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            label = "_".join([name] + [f"{k}-{v}" for k, v in sorted(options.items())])
            out = root / label
            convert(ConvertOptions(source=str(source_dirs[name]), output=out, **options), progress=False)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def load_model():
    """Load a (converted or source) folder with the registered Auto classes, fp32, eval mode; cached."""
    cache: dict[tuple, torch.nn.Module] = {}

    def get(path: Path, **kwargs):
        key = (str(path), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
        return cache[key]

    return get


def random_ids(batch: int, length: int, seed: int, low: int = 3) -> torch.Tensor:
    """Token ids in [low, VOCAB): avoids pad/bos/eos so runs never stop early."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=gen)
