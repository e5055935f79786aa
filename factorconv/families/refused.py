"""Families users try next that factorconv refuses, each with the one reason it cannot convert them today.

Each reason is checked against the installed transformers' own classes by tests/test_families.py.
"""

from .spec import RefusedFamily

QWEN3 = RefusedFamily(
    name="Qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    reason="normalises each head's queries and keys (q_norm, k_norm) before RoPE, so its keys are not a linear map "
    "of the layer input and a factorized key cache cannot reproduce them",
)

GEMMA = RefusedFamily(
    name="Gemma",
    architectures=("GemmaForCausalLM",),
    model_types=("gemma",),
    reason="scales its RMSNorms by (1 + weight) and its embeddings by sqrt(hidden_size), which the converted "
    "model's Llama layers do not",
)

GEMMA2 = RefusedFamily(
    name="Gemma2",
    architectures=("Gemma2ForCausalLM",),
    model_types=("gemma2",),
    reason="soft-caps its attention and final logits, scales queries by query_pre_attn_scalar and adds norms after "
    "attention and MLP, which the converted model's Llama layers do not",
)

GEMMA3 = RefusedFamily(
    name="Gemma3",
    architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    model_types=("gemma3", "gemma3_text"),
    reason="normalises each head's queries and keys (q_norm, k_norm), so its keys are not a linear map of the "
    "layer input, and adds norms after attention and MLP, which the converted model's Llama layers do not",
)

PHI3 = RefusedFamily(
    name="Phi3",
    architectures=("Phi3ForCausalLM",),
    model_types=("phi3",),
    reason="stores q, k and v as one fused qkv_proj tensor (and the MLP as gate_up_proj), which the converter "
    "does not split",
)
