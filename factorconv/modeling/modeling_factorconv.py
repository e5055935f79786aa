"""A Llama-style decoder with factorized attention whose KV cache stores factors, not keys and values.

Self-contained (torch + transformers only): this file is copied next to converted weights and loads with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` where factorconv is not installed.

TPA (Tensor Product Attention): per token, the keys of all h heads form an h×D matrix written as
    k_i(x) = Σ_r a_{r,i}(x) · RoPE(b_r(x)),   a(x) = α + A x  (R×h),   b(x) = B x + β  (R×D)
and values likewise (no RoPE). RoPE acts on b, shared by every head, so it commutes with the head mix.
The cache holds b (and a, when contextual) per token; decoding scores queries against the factors
directly. Prefill and training rebuild per-head K/V and use transformers' attention functions.

The cache is a stock transformers `DynamicCache` (or `StaticCache`) whose layers hold factor rows of shape
(batch, 1, tokens, width) instead of per-head keys and values, so cropping, beam reordering, batch selection and
static pre-allocation work unchanged. What reads a cache as per-head K/V does not apply to these rows.
"""

import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_factorconv import FactorConvConfig

# transformers 5.24 renamed `past_key_values` to `cache` everywhere a custom model meets it: forward arguments,
# output fields, `create_causal_mask` and GradientCheckpointingLayer's check that drops the cache. Every release in
# our range is served by using the installed release's name for all of them.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as `cache` or under its older name `past_key_values` (removed from kwargs).

    Where the installed release has renamed it, the old name warns as transformers' own models do.
    """
    for key in ("cache", "past_key_values"):
        if key in kwargs:
            if key == "past_key_values" != CACHE_KEY:
                warnings.warn("`past_key_values` is deprecated, pass the cache as `cache`", FutureWarning, stacklevel=3)
            other = kwargs.pop(key)
            if cache is not None and other is not None:
                raise ValueError("Pass the cache once, as `cache` or `past_key_values`, not both")
            cache = cache if cache is not None else other
    return cache


def output_cache(output) -> Cache | None:
    """The cache a model or `generate` output carries, under the installed release's field name."""
    return getattr(output, CACHE_KEY)


class FactorConvRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class FactorConvRotaryEmbedding(nn.Module):
    """cos/sin tables from transformers' rope init functions (default, linear, dynamic, yarn, llama3, ...)."""

    def __init__(self, config: FactorConvConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: FactorConvConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """Rotate the last dim of x; cos/sin are (batch, tokens, dim), unsqueezed where x has its head axis."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return torch.addcmul(x * cos, rotate_half(x), sin)  # x·cos + rotate_half(x)·sin, one kernel fewer


class FactorConvMLP(nn.Module):
    def __init__(self, config: FactorConvConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TensorProduct(nn.Module):
    """Rank-R tensor-product factors of `num_heads` heads of size `head_dim`.

    basis: b(x) = B x + β, shape (..., R, D).  head_mix: α (R, H).  Contextual: a(x) = α + A x, (..., R, H).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rank: int, bias: bool, contextual: bool):
        super().__init__()
        self.rank, self.num_heads, self.head_dim = rank, num_heads, head_dim
        self.basis = nn.Linear(hidden_size, rank * head_dim, bias=bias)
        self.head_mix = nn.Parameter(torch.zeros(rank, num_heads))
        self.head_proj = nn.Linear(hidden_size, rank * num_heads, bias=False) if contextual else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b(x), a): the basis (..., R, D) and the head factors, (..., R, H) per token when contextual, else α.

        α is read here and nowhere else, so hooks that bring weights in around `forward` (accelerate's
        offloading) see every use of it.
        """
        b = self.basis(x).unflatten(-1, (self.rank, self.head_dim))
        if self.head_proj is None:
            return b, self.head_mix
        return b, self.head_mix + self.head_proj(x).unflatten(-1, (self.rank, self.num_heads))

    @staticmethod
    def mix(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Σ_r a_{r,h} b_r: (batch, tokens, R, D) factors -> (batch, heads, tokens, D)."""
        if a.dim() == 2:
            return torch.einsum("btrd,rh->bhtd", b, a.to(b.dtype)).contiguous()
        return torch.einsum("btrd,btrh->bhtd", b, a).contiguous()  # SDPA kernels want unit stride


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scale + mask) v, each key/value head read by `module.num_key_value_groups` query heads;
    returns (B, L, H, D) and the probabilities."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def registry_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function the config selects (sdpa, eager, ...) with the module's scale and dropout."""
    attention_fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention)
    dropout = module.attention_dropout if module.training else 0.0
    return attention_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=module.scaling, **kwargs)


def _masked_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a transformers mask (bool: True attends, float: additive, None: causal) to (B, H, L, T) scores."""
    q_len, kv_len = scores.shape[-2:]
    if attention_mask is None:
        if q_len == 1:
            return scores
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
    else:
        attention_mask = attention_mask[..., :kv_len]
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    return scores + attention_mask


def cudnn_attention_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> bool:
    """Whether SDPA's cuDNN kernel takes these shapes as they are: key/value heads grouped under the query heads
    (also under a mask, where transformers' SDPA wrapper repeats them per query head) and values narrower than keys
    (MFA-KR, where the flash kernels refuse them and the wrapper's path pads them). At 8B shapes, 4 × 32K on an H200
    MFA-KR's prefill took 7.2 s against 8.0 s padded, and chunked by 4,096 tokens 9.4 s against 15.1 s, with
    1.1 GiB less per sequence (benchmarks/results/decode_gpu.md)."""
    if not query.is_cuda:
        return False
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, attention_mask, 0.0, attention_mask is None, True)
    except TypeError:  # torch < 2.5: no grouped-query SDPA
        return False
    return torch.backends.cuda.can_use_cudnn_attention(params, False)


def prefill_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill/training attention over (B, H, L, W) queries and (B, G, T, ·) rebuilt keys/values: under SDPA through
    cuDNN where it takes the shapes as they are (grouped heads under a mask, values narrower than keys), else the
    configured attention, with values padded to the key width for the fused kernels (as DeepSeek-V3's flash path
    does). Returns (B, L, H, V) and the probabilities under eager attention."""
    if module.config._attn_implementation == "sdpa":
        mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
        causal_alignment = mask is not None or key.shape[-2] == query.shape[-2]  # is_causal aligns top-left
        if causal_alignment and cudnn_attention_applies(query, key, value, mask):
            dropout = module.attention_dropout if module.training else 0.0
            out = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, scale=module.scaling, is_causal=mask is None,
                enable_gqa=True,
            )
            return out.transpose(1, 2), None
    width = value.shape[-1]
    if key.shape[-1] != width and module.config._attn_implementation != "eager":
        value = nn.functional.pad(value, (0, key.shape[-1] - width))
    out, weights = registry_attention(module, query, key, value, attention_mask, **kwargs)
    return out[..., :width], weights


def fused_decode_applies(key: torch.Tensor) -> bool:
    """Whether SDPA's fused kernel is the fastest way through a decode step over one cached head of equal key and
    value widths: on a CPU it is (it takes any mask and width); on a GPU two matrix products beat every SDPA kernel
    by 2-38x (benchmarks/results/decode_gpu.md: the fused kernels give the few folded query rows few blocks)."""
    return key.device.type == "cpu"


def derived(
    module: nn.Module, name: str, params: tuple[torch.Tensor, ...], dtype: torch.dtype, build: Callable[[], tuple]
) -> tuple:
    """`build()`: `dtype` tensors that decoding derives from parameters (scaled head mixes, per-head maps), built
    once and rebuilt only when a parameter they come from changes (in-place update, new storage, another device).

    A decode step is host-bound: each small op on the weights is one more kernel launch per layer per step. Under
    torch.compile, or whenever the parameters may be trained, they are built in place (the graph fuses them;
    autograd must see them)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return build()
    key = (dtype, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
    memo = module.__dict__.setdefault("_derived", {})
    hit = memo.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = memo[name] = (key, build())
    return hit[1]


def single_head_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | int, attention_mask
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoding step of every head against one cached head: (B, H, 1, W) queries that already carry the
    softmax scale, (B, 1, T, W) keys, (B, 1, T, V) values -> (B, 1, H, V) and the probabilities (B, H, 1, T) under
    eager attention. `value` may be an offset: the values are then `key[..., value:]` (MFA-KR's latent, read in
    place).

    The heads are folded into the query axis, so the cache is read once for all heads and never copied per head;
    a (B, 1, 1, T) padding mask broadcasts over the folded heads. Where SDPA's fused kernel is the faster way
    (`fused_decode_applies`) it runs with values that are part of the key read as the whole key row, keeping the
    part of the output they make; otherwise two matrix products, which spread over the tokens, and a softmax in
    the scores' dtype (its kernels accumulate in fp32): no casts or scaling between them, each a kernel launch.
    """
    folded = query.transpose(1, 2)  # (B, 1, H, W)
    mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
    eager = module.config._attn_implementation == "eager"
    offset = value if isinstance(value, int) else None
    equal = offset is not None or value.shape[-1] == key.shape[-1]
    if not eager and equal and fused_decode_applies(key):
        whole = key if offset is not None else value
        out = nn.functional.scaled_dot_product_attention(folded, key, whole, attn_mask=mask, scale=1.0)
        return (out[..., offset:] if offset is not None else out), None
    if offset is not None:
        value = key[..., offset:]
    # cuBLAS's fast kernels need leading dimensions that are multiples of 8: with a token count that is not (7 of
    # every 8 steps of a growing cache) query-first products run 3-4x slower at 4 × 32K
    # (benchmarks/results/decode_gpu.md), so the tokens go on the rows of both products, where only the heads lead.
    tokens_first = key.shape[-2] % 8 != 0
    if tokens_first:
        scores = torch.matmul(key, folded.transpose(2, 3)).transpose(2, 3).contiguous()
    else:
        scores = torch.matmul(folded, key.transpose(2, 3))
    if mask is not None:  # (no mask: a single query position attends to every cached token)
        scores = _masked_scores(scores, mask)
    probs = scores.softmax(dim=-1)
    weights = probs.transpose(2, 3).contiguous().transpose(2, 3) if tokens_first else probs
    return torch.matmul(weights, value), probs.transpose(1, 2) if eager else None


class FactorConvTPAAttention(nn.Module):
    """TPA attention (T6). Queries are standard (TPA-KVonly) unless `tpa_rank_q` gives them factors too."""

    def __init__(self, config: FactorConvConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = config.attention_scale
        self.is_causal = True
        self.num_key_value_groups = 1  # rebuilt K/V carry one head per query head
        self.attention_dropout = config.attention_dropout
        h, d, hidden = self.num_heads, self.head_dim, config.hidden_size

        def product(rank: int) -> TensorProduct:
            return TensorProduct(hidden, h, d, rank, config.qkv_bias, config.tpa_contextual)

        rank_q = config.tpa_rank_q[layer_idx] if config.tpa_rank_q is not None else None
        self.q_proj = nn.Linear(hidden, h * d, bias=config.qkv_bias) if rank_q is None else None
        self.q_product = product(rank_q) if rank_q is not None else None
        self.k_product = product(config.tpa_rank_k[layer_idx])
        self.v_product = product(config.tpa_rank_v[layer_idx])
        self.o_proj = nn.Linear(h * d, hidden, bias=config.o_bias)

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.q_product is None:
            q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            return apply_rope(q, cos, sin, unsqueeze_dim=1)
        b, a = self.q_product(x)
        return TensorProduct.mix(apply_rope(b, cos, sin, unsqueeze_dim=2), a)

    @staticmethod
    def _pack(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, T, R, D) basis and its head factors -> one (B, 1, T, width) cache row (a only when per token)."""
        if a.dim() == 2:
            return b.flatten(-2).unsqueeze(1)
        return torch.cat([b.flatten(-2), a.flatten(-2)], dim=-1).unsqueeze(1)

    @staticmethod
    def _unpack(row: torch.Tensor, product: TensorProduct, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A cache row -> (b, a) for all its tokens; `a` is this step's head factors (α, or per token)."""
        row = row.squeeze(1)
        split = product.rank * product.head_dim
        b = row[..., :split].unflatten(-1, (product.rank, product.head_dim))
        if a.dim() > 2:
            a = row[..., split:].unflatten(-1, (product.rank, product.num_heads))
        return b, a

    def concatenated_factor_attention(
        self, query: torch.Tensor, key_row: torch.Tensor, value_row: torch.Tensor, attention_mask
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Non-contextual decoding as an MQA over the concatenated factors: q'_h = [α_1h q_h; …; α_Rh q_h] scores
        the cached row [b_1; …; b_R] in one dot product, the output [Σ p b^V_r]_r is mixed by α^V afterwards.

        query: (B, H, 1, D); rows as cached, (B, 1, T, R·D). Returns (B, 1, H, D) and the probabilities (eager).
        """
        mixes = (self.k_product.head_mix, self.v_product.head_mix)
        key_mix, value_mix = derived(self, "mixes", mixes, query.dtype, lambda: (  # head-major, as the queries
            (mixes[0].T.contiguous() * self.scaling)[:, None, :, None].to(query.dtype),  # (H, 1, R_K, 1)
            mixes[1].T.contiguous()[:, :, None].to(query.dtype),  # (H, R_V, 1)
        ))
        mixed_query = (query.unsqueeze(-2) * key_mix).flatten(-2)  # (B, H, 1, R·D), scaled
        out, probs = single_head_attention(self, mixed_query, key_row, value_row, attention_mask)
        return (out.unflatten(-1, (value_mix.shape[1], self.head_dim)) * value_mix).sum(-2), probs

    def factor_attention(
        self,
        query: torch.Tensor,
        key_factors: tuple[torch.Tensor, torch.Tensor],
        value_factors: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contextual attention straight from cached factors, never forming per-head K/V.

        s_{h,t} = Σ_r a_{t,r,h} (q_h · b_{t,r}) / √D  and  o_h = Σ_t p_{h,t} Σ_r a^V_{t,r,h} b^V_{t,r}.
        query: (B, H, L, D); factors b (B, T, R, D) and per-token head factors a (B, T, R, H).
        Returns the output (B, L, H, D) and the attention probabilities (B, H, L, T).
        """
        (b_k, a_k), (b_v, a_v) = key_factors, value_factors
        bsz, heads, q_len, dim = query.shape
        tokens, rank_k, rank_v = b_k.shape[1], b_k.shape[2], b_v.shape[2]
        # Heads are folded into the rows of one matmul per sequence, so every cached factor is read once for all
        # heads (a per-head broadcast would read the whole cache again for each head).
        rows = query.reshape(bsz, heads * q_len, dim)
        q_dot_b = torch.bmm(rows, b_k.reshape(bsz, tokens * rank_k, dim).transpose(1, 2))
        scores = torch.einsum("bhltr,btrh->bhlt", q_dot_b.view(bsz, heads, q_len, tokens, rank_k), a_k)
        probs = _masked_scores(scores * self.scaling, attention_mask).softmax(dim=-1)  # fp32 inside the kernel
        weights = torch.einsum("bhlt,btrh->bhltr", probs, a_v).reshape(bsz, heads * q_len, tokens * rank_v)
        out = torch.bmm(weights, b_v.reshape(bsz, tokens * rank_v, dim)).view(bsz, heads, q_len, dim)
        return out.transpose(1, 2), probs

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        query = self._queries(hidden_states, cos, sin)
        b_k, a_k = self.k_product(hidden_states)
        b_v, a_v = self.v_product(hidden_states)
        key_row, value_row = self._pack(apply_rope(b_k, cos, sin, 2), a_k), self._pack(b_v, a_v)
        if cache is not None:
            key_row, value_row = cache.update(key_row, value_row, self.layer_idx)
        decoding = q_len == 1 and not self.training
        if decoding and not self.config.tpa_contextual:
            out, weights = self.concatenated_factor_attention(query, key_row, value_row, attention_mask)
        else:
            key_factors = self._unpack(key_row, self.k_product, a_k)
            value_factors = self._unpack(value_row, self.v_product, a_v)
            if decoding:
                out, weights = self.factor_attention(query, key_factors, value_factors, attention_mask)
            else:
                keys, values = TensorProduct.mix(*key_factors), TensorProduct.mix(*value_factors)
                out, weights = prefill_attention(self, query, keys, values, attention_mask, **kwargs)
        return self.o_proj(out.reshape(bsz, q_len, -1)), weights


class SharedKVAttention(nn.Module):
    """Base of MFA and MFA-KR: one cached row per token shared by all h query heads, stored in factored (MLA) form.

    The source's q_proj and o_proj stay as they are; per-group maps (group j of the source's g KV heads, as in
    its GQA) connect the source head's D-dim query and value to the cached row:
      - rotated key pairs: pair n rotates at source frequency `rope_pair_index[n]`; group j's query reads it as
        `rope_mix[j, n]` times the source query's pair at that frequency (a map that commutes with RoPE);
      - MFA-KR's un-rotated key part: `key_up[j]` (D × d_N) maps it into the source query's coordinates;
      - values: `value_up[j]` (D × d_V) reads the source head's value back from the cached value part.
    Prefill and training expand the rows into g key/value heads of the source's head size and run the configured
    attention (the source's own GQA shapes); decoding absorbs the maps into the query and the output and attends
    once over the single cached head, reading each cached byte once for all heads (MLA's absorbed decode).
    """

    def __init__(self, config: FactorConvConfig, layer_idx: int, value_dim: int, nope_dim: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.head_dim, self.num_groups = (
            config.num_attention_heads, config.head_dim, config.source_num_key_value_heads
        )
        self.scaling = config.attention_scale
        self.is_causal = True
        self.num_key_value_groups = self.num_heads // self.num_groups  # expanded heads: the source's GQA
        self.attention_dropout = config.attention_dropout
        hidden, width = config.hidden_size, self.num_heads * self.head_dim
        rank = config.query_rank[layer_idx] if config.query_rank is not None else None
        self.q_proj = nn.Linear(hidden, width, bias=config.qkv_bias) if rank is None else None
        self.q_down = nn.Linear(hidden, rank, bias=False) if rank is not None else None
        self.q_up = nn.Linear(rank, width, bias=config.qkv_bias) if rank is not None else None
        self.o_proj = nn.Linear(width, hidden, bias=config.o_bias)
        self.rope_pairs = [int(p) for p in config.rope_pair_index[layer_idx]]
        self.rotary_width = 2 * len(self.rope_pairs)
        self.rope_mix = nn.Parameter(torch.ones(self.num_groups, len(self.rope_pairs)))
        self.key_up = nn.Parameter(torch.zeros(self.num_groups, self.head_dim, nope_dim)) if nope_dim else None
        self.value_up = nn.Parameter(torch.zeros(self.num_groups, self.head_dim, value_dim))
        self._gather: dict[torch.device, torch.Tensor] = {}

    def _pair_dims(self, device: torch.device) -> torch.Tensor:
        """The source head dims of the rotated part's components: [p_n for n] + [p_n + D/2 for n]."""
        gather = self._gather.get(device)
        if gather is None:  # built once per device, not in every forward
            pairs, half = torch.tensor(self.rope_pairs, device=device), self.head_dim // 2
            gather = self._gather[device] = torch.cat([pairs, pairs + half])
        return gather

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first `rotary_width` dims of (B, 1, L, ·) cache rows, pair n at its source frequency."""
        gather = self._pair_dims(cos.device)
        rotated = apply_rope(x[..., : self.rotary_width], cos[..., gather], sin[..., gather], unsqueeze_dim=1)
        if x.shape[-1] == self.rotary_width:  # MFA: all of it (a concatenation would be one more copy)
            return rotated
        return torch.cat([rotated, x[..., self.rotary_width :]], dim=-1)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """The source-sized queries, (B, H, L, D), not yet rotated."""
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_up(self.q_down(x))
        return q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _per_group(self, x: torch.Tensor, maps: torch.Tensor, transpose: bool) -> torch.Tensor:
        """(B, H, L, ·) per-head vectors through their group's map (g, D, W): x @ map, or x @ mapᵀ."""
        bsz, _, q_len, width = x.shape
        grouped = x.reshape(bsz, self.num_groups, self.num_key_value_groups * q_len, width)
        out = grouped @ (maps.transpose(1, 2) if transpose else maps)
        return out.reshape(bsz, self.num_heads, q_len, -1)

    def _new_entries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's (B, 1, L, width) cache rows: what the subclass stores per token."""
        raise NotImplementedError

    def _parts(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | int]:
        """Cached rows -> (the key row [rotated | un-rotated], its un-rotated part or None, the values or, when
        they are part of the key row, their offset in it); views of the cache (decoding reads them in place)."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        query = self._queries(hidden_states)
        keys, values = self._new_entries(hidden_states, cos, sin)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx)
        parts = self._parts(keys, values)
        if q_len == 1 and not self.training:
            out, weights = self._absorbed(query, cos, sin, *parts, attention_mask)
        else:
            out, weights = self._expanded(query, cos, sin, *parts, attention_mask, **kwargs)
        return self.o_proj(out.reshape(bsz, q_len, -1)), weights

    def _expanded(self, query, cos, sin, key_row, nope, value, attention_mask, **kwargs):
        """Prefill/training: g key/value heads of the source's head size, then the configured attention."""
        rotated = key_row[..., : self.rotary_width]
        value = key_row[..., value:] if isinstance(value, int) else value
        mix = torch.cat([self.rope_mix, self.rope_mix], dim=-1)  # (g, d_R): both components of each pair
        place = nn.functional.one_hot(self._pair_dims(mix.device), self.head_dim).T.to(mix.dtype)  # (D, d_R)
        rope_up = place * mix[:, None, :]  # (g, D, d_R): rotated pair n into source pair p_n, scaled per group
        key = rotated @ rope_up.transpose(1, 2)  # (B, g, T, D): RoPE'd keys in the source's coordinates
        plain_query, query = query, apply_rope(query, cos, sin, unsqueeze_dim=1)
        if nope is not None:  # MFA-KR: [RoPE part | NoPE part], read by the rotated and the plain query
            key = torch.cat([key, nope @ self.key_up.transpose(1, 2)], dim=-1)
            query = torch.cat([query, plain_query], dim=-1)
        value = value @ self.value_up.transpose(1, 2)  # (B, g, T, D)
        return prefill_attention(self, query, key, value, attention_mask, **kwargs)

    def _absorbed(self, query, cos, sin, key_row, nope, value, attention_mask):
        """Decoding: the maps move into the query and the output; one attention over the single cached head."""
        rope_mix, key_up = self._absorbed_maps(query.dtype)
        absorbed = apply_rope(query, cos, sin, unsqueeze_dim=1)[..., self._pair_dims(query.device)] * rope_mix
        if nope is not None:
            absorbed = torch.cat([absorbed, self._per_group(query, key_up, transpose=False)], dim=-1)
        out, weights = single_head_attention(self, absorbed, key_row, value, attention_mask)
        out = self._per_group(out.transpose(1, 2), self.value_up.to(query.dtype), transpose=True)  # (B, H, 1, D)
        return out.transpose(1, 2), weights

    def _absorbed_maps(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query-side maps with the softmax scale in them: each head's pair scales (H, 1, d_R) for both
        components of its rotated pairs, and `key_up` × scale (g, D, d_N) or None."""
        params = (self.rope_mix,) if self.key_up is None else (self.rope_mix, self.key_up)

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            mix = torch.cat([self.rope_mix, self.rope_mix], dim=-1).repeat_interleave(self.num_key_value_groups, 0)
            key_up = (self.key_up * self.scaling).to(dtype) if self.key_up is not None else None
            return (mix * self.scaling)[:, None, :].to(dtype), key_up

        return derived(self, "absorbed_maps", params, dtype, build)


class FactorConvMFAAttention(SharedKVAttention):
    """MFA: one key head (key_dim, all rotated) and one value head (value_dim) for all query heads;
    cache key_dim + value_dim per token."""

    def __init__(self, config: FactorConvConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, config.value_dim[layer_idx], nope_dim=0)
        hidden = config.hidden_size
        self.k_proj = nn.Linear(hidden, config.key_dim[layer_idx], bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, config.value_dim[layer_idx], bias=config.qkv_bias)

    def _new_entries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rope(self.k_proj(x).unsqueeze(1), cos, sin), self.v_proj(x).unsqueeze(1)

    def _parts(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        return keys, None, values


class FactorConvMFAKRAttention(SharedKVAttention):
    """MFA-KR: one cached vector c = [RoPE(c_rope) | c_nope]; keys read all of it, values read c_nope.
    With `latent_norm`, c_nope is RMS-normalised before caching, as in DeepSeek-V3's MLA (exportable as one).

    As in MLA's decoupled RoPE, the rotated part serves keys only, so the cache holds c once, already rotated:
    `values` in the cache layer is empty (zero width).
    """

    def __init__(self, config: FactorConvConfig, layer_idx: int) -> None:
        nope_dim = config.nope_dim[layer_idx]
        super().__init__(config, layer_idx, value_dim=nope_dim, nope_dim=nope_dim)
        self.c_proj = nn.Linear(config.hidden_size, config.rope_dim[layer_idx] + nope_dim, bias=config.qkv_bias)
        # DeepSeek-V3's kv_a_layernorm (its own eps, not the config's): c_nope is normalised before it is cached.
        self.kv_norm = FactorConvRMSNorm(nope_dim, eps=1e-6) if config.latent_norm else None

    def _new_entries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.c_proj(x).unsqueeze(1)
        if self.kv_norm is not None:
            latent = torch.cat([latent[..., : self.rotary_width], self.kv_norm(latent[..., self.rotary_width :])], dim=-1)
        latent = self._rope(latent, cos, sin)
        return latent, latent[..., :0]  # c is cached once, as the key; nothing separate for values

    def _parts(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return keys, keys[..., self.rotary_width :], self.rotary_width


ATTENTION_CLASSES = {"tpa": FactorConvTPAAttention, "mfa": FactorConvMFAAttention, "mfa_kr": FactorConvMFAKRAttention}


class FactorConvDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FactorConvConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[config.attention](config, layer_idx)
        self.mlp = FactorConvMLP(config)
        self.input_layernorm = FactorConvRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = FactorConvRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """kwargs carry the cache under CACHE_KEY, the name GradientCheckpointingLayer clears when checkpointing."""
        cache = take_cache(None, kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FactorConvPreTrainedModel(PreTrainedModel):
    config_class = FactorConvConfig
    config: FactorConvConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FactorConvDecoderLayer"]
    _skip_keys_device_placement = [CACHE_KEY]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": FactorConvDecoderLayer,
        "attentions": [FactorConvTPAAttention, SharedKVAttention],
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TensorProduct):
            init.normal_(module.head_mix, mean=0.0, std=module.rank**-0.5)
        if isinstance(module, SharedKVAttention):
            init.ones_(module.rope_mix)
            for maps in (module.key_up, module.value_up):
                if maps is not None:
                    init.normal_(maps, mean=0.0, std=maps.shape[-1] ** -0.5)


class FactorConvModel(FactorConvPreTrainedModel):
    def __init__(self, config: FactorConvConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(FactorConvDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = FactorConvRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FactorConvRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """`cache` is also accepted as `past_key_values` (the name before transformers 5.24)."""
        cache = take_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KEY: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                **{CACHE_KEY: cache},
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_KEY: cache})


class FactorConvForCausalLM(FactorConvPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FactorConvConfig) -> None:
        super().__init__(config)
        self.model = FactorConvModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _get_static_cache_init_shape(self) -> None:
        """No (heads, head_dim) shape: generate then sizes a static cache from the first rows it stores. Our cached
        key and value rows are factor rows whose widths differ from each other and by layer, which one head count
        and head size cannot say; generate's chunked prefill would otherwise pre-size every layer from
        num_key_value_heads × head_dim and fail on the first write."""
        return None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`cache` is also accepted as `past_key_values` (the name before transformers 5.24)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=take_cache(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_KEY: output_cache(outputs)},
        )


# Saving a loaded model copies this file next to the weights and keeps auto_map pointing at it.
FactorConvModel.register_for_auto_class("AutoModel")
FactorConvForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["CACHE_KEY", "FactorConvForCausalLM", "FactorConvModel", "FactorConvPreTrainedModel", "output_cache"]
