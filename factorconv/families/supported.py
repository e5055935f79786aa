"""The families factorconv converts. A new one is its entry here and its line in FAMILIES (families/__init__.py)."""

from .spec import SourceFamily

LLAMA = SourceFamily(
    name="Llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    biases=("attention_bias",) * 4,  # one flag for all four projections
    mlp_bias="mlp_bias",
)

MISTRAL = SourceFamily(
    name="Mistral",
    architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    biases=(False, False, False, False),
    sliding_window=True,  # Mistral-7B-v0.1: 4096 tokens; v0.3 declares none
)

QWEN2 = SourceFamily(
    name="Qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    biases=(True, True, True, False),  # q, k and v always carry biases, o never
    sliding_window=True,  # with use_sliding_window, on the layers from max_window_layers on
)
