"""KV-cache bytes per token: from the config (analytic) and from a cache that `generate` really built."""

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..modeling import FactorConvConfig, output_cache


def analytic_kv_bytes_per_token(config: PreTrainedConfig, bytes_per_value: int) -> int:
    """What one token costs in the cache across all layers, from the architecture alone."""
    if isinstance(config, FactorConvConfig):
        return sum(config.kv_cache_width(i) for i in range(config.num_hidden_layers)) * bytes_per_value
    if getattr(config, "kv_lora_rank", None):  # MLA (DeepSeek-V2/V3, and our exports): one latent + RoPE key
        return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * bytes_per_value
    return _per_head_kv_bytes(config, bytes_per_value)


def source_kv_bytes_per_token(config: FactorConvConfig, bytes_per_value: int) -> int:
    """What the model a conversion came from cached per token: its config keeps the source's KV heads."""
    return _per_head_kv_bytes(config, bytes_per_value, config.source_num_key_value_heads)


def _per_head_kv_bytes(config: PreTrainedConfig, bytes_per_value: int, kv_heads: int | None = None) -> int:
    """A key and a value of every KV head (`kv_heads`, default the config's) in every layer (MHA/GQA)."""
    kv_heads = kv_heads or getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * kv_heads * head_dim * config.num_hidden_layers * bytes_per_value


def cache_bytes(cache) -> int:
    """Bytes held by every tensor in every layer of a transformers Cache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def measured_kv_bytes_per_token(model: PreTrainedModel, prompt_tokens: int = 8, new_tokens: int = 8) -> float:
    """Generate greedily from a fixed prompt and divide the returned cache's bytes by the tokens it holds."""
    device = next(model.parameters()).device
    prompt = torch.arange(prompt_tokens, device=device)[None] % model.config.vocab_size
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    cache = output_cache(out)
    return cache_bytes(cache) / (cache.get_seq_length() * prompt.shape[0])
