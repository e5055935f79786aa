"""MFA written as a Llama with one KV head (MQA): the same attention, relabelled.

An MFA model whose key and value are one head dim wide, with one key pair per RoPE frequency in the standard
order, caches exactly a single Llama K/V head. Head h of group j scores RoPE(q_h)·(rope_mix_j ⊙ k) and outputs
o_proj_h(value_up_j v): rope_mix goes into q_proj's rows (per pair, so it commutes with RoPE), value_up into
o_proj's columns, and the ratio of our softmax scale to Llama's D^-1/2 into q_proj.
"""

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from ..kinds.mfa import MFA
from ..modeling import FactorConvConfig
from .formats import (
    ExportFormat,
    Reader,
    check_common,
    check_frequencies,
    decoder_fields,
    group_of_heads,
    per_head,
    query_rows,
    refuse,
)


def _check(config: FactorConvConfig, read: Reader) -> None:
    width = check_common(config, LLAMA, config.key_dim)
    if width != config.head_dim or any(v != config.head_dim for v in config.value_dim):
        raise refuse(config, LLAMA, f"its keys and values are not one head dim ({config.head_dim}) wide")
    check_frequencies(config, LLAMA, LlamaRotaryEmbedding(_stock_config(config)), width)


def _stock_config(config: FactorConvConfig) -> LlamaConfig:
    return LlamaConfig(
        **decoder_fields(config),
        num_key_value_heads=1,
        head_dim=config.head_dim,
        attention_bias=config.qkv_bias or config.o_bias,  # Llama's flag covers q, k, v and o: missing ones are zeros
        mlp_bias=config.mlp_bias,
        architectures=["LlamaForCausalLM"],
    )


def _attention_tensors(
    config: FactorConvConfig, stock: LlamaConfig, layer: int, read: Reader
) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.self_attn."
    heads = config.num_attention_heads
    with torch.device("meta"):
        stock_scale = LlamaAttention(stock, layer).scaling
    group = group_of_heads(config)
    mix = read(prefix + "rope_mix").double()  # (g, D/2): pair n is dims n and n + D/2
    mix = (config.attention_scale / stock_scale) * torch.cat([mix, mix], dim=1)[group]  # (H, D)
    q_weight, q_bias = query_rows(config, layer, read)
    out = {prefix + "q_proj.weight": (mix[:, :, None] * per_head(q_weight, heads)).flatten(0, 1)}
    for name in ("k_proj", "v_proj"):
        out[f"{prefix}{name}.weight"] = read(f"{prefix}{name}.weight")
    o_weight = read(prefix + "o_proj.weight").double()  # (d, H·D)
    value_up = read(prefix + "value_up").double()[group]  # (H, D, D)
    o_heads = o_weight.reshape(o_weight.shape[0], heads, -1).transpose(0, 1)  # (H, d, D)
    out[prefix + "o_proj.weight"] = (o_heads @ value_up).transpose(0, 1).flatten(1)
    if stock.attention_bias:
        zeros = o_weight.new_zeros
        q_rows = (mix * per_head(q_bias, heads)).flatten() if q_bias is not None else zeros(q_weight.shape[0])
        out[prefix + "q_proj.bias"] = q_rows
        for name in ("k_proj", "v_proj"):
            bias = read(f"{prefix}{name}.bias")
            out[f"{prefix}{name}.bias"] = bias if bias is not None else zeros(config.head_dim)
        o_bias = read(prefix + "o_proj.bias")
        out[prefix + "o_proj.bias"] = o_bias if o_bias is not None else zeros(config.hidden_size)
    return out


SERVING = """\
This folder is a stock `LlamaForCausalLM` with one key/value head shared by all query heads (multi-query
attention), no `trust_remote_code` needed; every engine that serves Llama serves it:

```bash
vllm serve {folder}
python -m sglang.launch_server --model-path {folder}
```

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{folder}")  # transformers' LlamaForCausalLM
```

Verified by factorconv's tests with transformers only (logits equal to the factorconv model's, greedy generation,
cache bytes). Serving engines were not run where factorconv is tested. Tensor parallelism replicates the single
KV head on every GPU.
"""

LLAMA = ExportFormat(
    name="llama",
    kind=MFA,
    convert_flag="--to mfa --mqa",
    architecture="LlamaForCausalLM",
    check=_check,
    stock_config=_stock_config,
    attention_tensors=_attention_tensors,
    serving=SERVING,
)
