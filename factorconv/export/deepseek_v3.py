"""MFA-KR written as DeepSeek-V3 (MLA): the same attention, relabelled.

MFA-KR caches c = [RoPE(c_rope) | RMSNorm(c_nope)] (with `latent_norm`), one row shared by all heads; head h of
group j scores a key as RoPE(q_h)·(rope_mix_j ⊙ c_rope) + q_h·key_up_j c_nope and reads key_up_j's twin value_up_j
c_nope. DeepSeek-V3 caches [kv_a_layernorm(c_kv) | RoPE(k_pe)] and scores q_nope·k_nope + q_pe·k_pe with k_nope and
v from kv_b_proj·c_kv. So c_nope → c_kv (kv_lora_rank = d_N), c_rope → k_pe (qk_rope_head_dim = d_R, rows laid out
in DeepSeek's interleaved pairs), key_up/value_up → kv_b_proj (qk_nope_head_dim = v_head_dim = D), and each head's
q_pe is its source query's kept pairs scaled by rope_mix. DeepSeek scales scores by (D + d_R)^-1/2 where we use
the source's D^-1/2: the ratio goes into q_proj. Every layer is a dense MLP layer (first_k_dense_replace = L).
"""

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from ..factorize.mfa import strided_pairs
from ..kinds.mfa_kr import MFA_KR
from ..modeling import FactorConvConfig
from .formats import (
    ExportFormat,
    ExportRefused,
    Reader,
    check_common,
    check_frequencies,
    decoder_fields,
    group_of_heads,
    nonzero,
    per_head,
    query_rows,
    refuse,
)


def _interleaved(rows: torch.Tensor) -> torch.Tensor:
    """Rows of a rotated part from rotate-half order (first components, then second) to DeepSeek's (x0, x1) pairs."""
    half = rows.shape[0] // 2
    return rows[torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()]


def _check(config: FactorConvConfig, read: Reader) -> None:
    width = check_common(config, DEEPSEEK_V3, config.rope_dim)
    if len(set(config.nope_dim)) != 1:
        raise refuse(config, DEEPSEEK_V3, "its layers have different latent widths; DeepSeek-V3 has one kv_lora_rank")
    if not config.latent_norm:
        raise refuse(config, DEEPSEEK_V3, "its latent has no RMSNorm, which DeepSeek-V3 always applies")
    if config.mlp_bias:
        raise ExportRefused("cannot export as deepseek-v3: the MLP has biases, which DeepSeek-V3's MLP does not; "
                            "export --format llama from a `--to mfa --mqa` conversion instead")
    for layer in range(config.num_hidden_layers):
        if nonzero(query_rows(config, layer, read)[1]):
            raise ExportRefused(
                "cannot export as deepseek-v3: the queries have biases (as Qwen2's do), which DeepSeek-V3's q_proj "
                "cannot hold; export --format llama from a `--to mfa --mqa` conversion instead"
            )
    check_frequencies(config, DEEPSEEK_V3, DeepseekV3RotaryEmbedding(_stock_config(config)), width)


def _stock_config(config: FactorConvConfig) -> DeepseekV3Config:
    has_bias = config.qkv_bias or config.o_bias
    return DeepseekV3Config(
        **decoder_fields(config),
        moe_intermediate_size=config.intermediate_size,
        first_k_dense_replace=config.num_hidden_layers,  # every layer dense: no MoE is built
        num_key_value_heads=config.num_attention_heads,  # MLA expands the latent to every head
        kv_lora_rank=config.nope_dim[0],
        q_lora_rank=None,  # low-rank queries without a norm are multiplied out (exact)
        qk_rope_head_dim=config.rope_dim[0],
        qk_nope_head_dim=config.head_dim,
        v_head_dim=config.head_dim,
        rope_interleave=True,
        attention_bias=has_bias,
        num_mtp_layers=0,
        architectures=["DeepseekV3ForCausalLM"],
    )


def _attention_tensors(
    config: FactorConvConfig, stock: DeepseekV3Config, layer: int, read: Reader
) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.self_attn."
    heads, head_dim, rope = config.num_attention_heads, config.head_dim, config.rope_dim[layer]
    with torch.device("meta"):
        stock_scale = DeepseekV3Attention(stock, layer).scaling
    scale = config.attention_scale / stock_scale
    group = group_of_heads(config)
    pairs = torch.tensor(strided_pairs(head_dim, rope))
    dims = torch.cat([pairs, pairs + head_dim // 2])  # the source head dims of the kept pairs, rotate-half order
    mix = read(prefix + "rope_mix").double()  # (g, d_R/2)
    mix = torch.cat([mix, mix], dim=1)[group]  # (H, d_R): both components of each pair
    q = per_head(query_rows(config, layer, read)[0], heads)  # (H, D, hidden)
    q_pe = torch.stack([_interleaved(mix[h, :, None] * q[h, dims]) for h in range(heads)])
    q_rows = (scale * torch.cat([q, q_pe], dim=1)).flatten(0, 1)
    out = {prefix + "q_proj.weight": q_rows}
    latent = read(prefix + "c_proj.weight")
    out[prefix + "kv_a_proj_with_mqa.weight"] = torch.cat([latent[rope:], _interleaved(latent[:rope])])
    latent_bias = read(prefix + "c_proj.bias")
    if stock.attention_bias:
        if latent_bias is None:
            latent_bias = latent.new_zeros(latent.shape[0])
        out[prefix + "kv_a_proj_with_mqa.bias"] = torch.cat([latent_bias[rope:], _interleaved(latent_bias[:rope])])
    out[prefix + "kv_a_layernorm.weight"] = read(prefix + "kv_norm.weight")
    key_up, value_up = read(prefix + "key_up").double(), read(prefix + "value_up").double()  # (g, D, d_N)
    out[prefix + "kv_b_proj.weight"] = torch.cat([key_up[group], value_up[group]], dim=1).flatten(0, 1)
    out[prefix + "o_proj.weight"] = read(prefix + "o_proj.weight")
    if stock.attention_bias:
        o_bias = read(prefix + "o_proj.bias")
        out[prefix + "o_proj.bias"] = o_bias if o_bias is not None else latent.new_zeros(config.hidden_size)
    return out


SERVING = """\
This folder is a stock `DeepseekV3ForCausalLM` (MLA) with dense layers only, no `trust_remote_code` needed:

```bash
vllm serve {folder}                                        # vLLM: MLA kernels cache kv_lora_rank + qk_rope_head_dim
python -m sglang.launch_server --model-path {folder}       # SGLang
```

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{folder}")  # transformers' DeepseekV3ForCausalLM
```

Verified by factorconv's tests with transformers only (logits equal to the factorconv model's, greedy generation,
cache bytes). Serving engines were not run where factorconv is tested. vLLM's fused MLA kernels accept
kv_lora_rank + qk_rope_head_dim of 512+64 (576) and, in recent releases, 256+64 (320); other shapes fall back to
slower paths or are refused. Engines may apply their own DeepSeek RoPE scaling (YaRN) when `rope_parameters` has
a scaling type: sources with llama3 or linear RoPE scaling are exact in transformers but unverified there.
"""

DEEPSEEK_V3 = ExportFormat(
    name="deepseek-v3",
    kind=MFA_KR,
    convert_flag="--to mfa-kr --mla --mla-shape N+R",
    architecture="DeepseekV3ForCausalLM",
    check=_check,
    stock_config=_stock_config,
    attention_tensors=_attention_tensors,
    serving=SERVING,
)
