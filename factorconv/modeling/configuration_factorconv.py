"""Configuration of a factorconv model: a Llama-style decoder whose attention keeps a factorized KV cache.

This file is copied next to converted weights and must import nothing but transformers.
"""

from transformers import PreTrainedConfig

# The attention kinds and the fields only each one reads; config.json holds the active kind's (folders with all of
# them still load).
KIND_FIELDS = {
    "tpa": ("tpa_rank_k", "tpa_rank_v", "tpa_rank_q", "tpa_contextual"),
    "mfa": ("key_dim", "value_dim", "rope_pair_index", "query_rank"),
    "mfa_kr": ("rope_dim", "nope_dim", "rope_pair_index", "query_rank", "latent_norm"),
}
ATTENTION_KINDS = tuple(KIND_FIELDS)
SERVING_FORMATS = (None, "deepseek_v3", "llama")  # stock architectures a conversion can be built to fit
# Folders written before the cache became a stock DynamicCache name this layer type in `layer_types`.
_LEGACY_LAYER_TYPE = "factorconv"


def _per_layer(value: int | list[int] | None, num_layers: int, name: str) -> list[int] | None:
    """Broadcast a single rank to every layer and check that a list has one entry per layer."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value] * num_layers
    value = [int(v) for v in value]
    if len(value) != num_layers:
        raise ValueError(f"{name} has {len(value)} entries but the model has {num_layers} layers")
    return value


class FactorConvConfig(PreTrainedConfig):
    """Llama-family hyper-parameters plus the factorized attention's kind and per-layer ranks.

    TPA (`attention="tpa"`): keys and values of all heads are sums of `tpa_rank_k[l]` / `tpa_rank_v[l]`
    tensor products a_r(x) ⊗ b_r(x); queries are standard unless `tpa_rank_q` is set.
    `tpa_contextual` adds the input-dependent head factor a(x) = α + A x (cached per token).

    MFA (`attention="mfa"`): one key head of width `key_dim[l]` and one value head of width `value_dim[l]`
    shared by all query heads. MFA-KR (`attention="mfa_kr"`): one cached vector [c_rope | c_nope] of width
    `rope_dim[l] + nope_dim[l]`; keys are [RoPE(c_rope) | c_nope], values read c_nope. For both, the
    rotated pair n of the key rotates at source frequency `rope_pair_index[l][n]`, the weights are stored in
    factored form (the source's query and output projections plus per-group maps, `attention_layout`
    "factored"), queries may go through a rank-`query_rank[l]` product, and scores
    are scaled by `attention_scale` (the source's 1/√head_dim), as TPA's. MFA-KR's `latent_norm` RMS-normalises
    c_nope before it is cached (DeepSeek-V3's kv_a_layernorm). `serving_format` records that the conversion built
    the model to fit a stock architecture ("deepseek_v3" for MFA-KR, "llama" for MFA), which `factorconv export`
    writes it as.

    Every kind caches one row of factors per token and layer, so `num_key_value_heads` is 1 (what tools that size
    caches from the config read); the source's KV heads, which the per-group maps and the exact ranks follow, are
    `source_num_key_value_heads`. Configs written before that field (num_key_value_heads = the source's) load as
    the same model.
    """

    model_type = "factorconv"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    source_num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    attention: str = "tpa"
    tpa_rank_k: int | list[int] | None = None
    tpa_rank_v: int | list[int] | None = None
    tpa_rank_q: int | list[int] | None = None
    tpa_contextual: bool = False
    key_dim: int | list[int] | None = None
    value_dim: int | list[int] | None = None
    rope_dim: int | list[int] | None = None
    nope_dim: int | list[int] | None = None
    rope_pair_index: list[list[int]] | None = None
    query_rank: int | list[int] | None = None
    latent_norm: bool = False
    serving_format: str | None = None
    attention_scale: float | None = None
    attention_layout: str = "factored"
    source_model: str | None = None
    source_revision: str | None = None
    source_architecture: str | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.source_num_key_value_heads is None:  # the older form: num_key_value_heads was the source's
            self.source_num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        elif self.num_key_value_heads not in (None, 1):
            raise ValueError(f"num_key_value_heads is the cache's one row per layer: 1, got {self.num_key_value_heads}")
        self.num_key_value_heads = 1
        groups = self.source_num_key_value_heads
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        n = self.num_hidden_layers
        self.tpa_rank_k = _per_layer(self.tpa_rank_k, n, "tpa_rank_k") or [groups] * n
        self.tpa_rank_v = _per_layer(self.tpa_rank_v, n, "tpa_rank_v") or [groups] * n
        self.tpa_rank_q = _per_layer(self.tpa_rank_q, n, "tpa_rank_q")
        full = groups * self.head_dim  # the source's K (or V) width: exact at this size
        self.key_dim = _per_layer(self.key_dim, n, "key_dim") or [full] * n
        self.value_dim = _per_layer(self.value_dim, n, "value_dim") or [full] * n
        self.rope_dim = _per_layer(self.rope_dim, n, "rope_dim") or [full] * n
        self.nope_dim = _per_layer(self.nope_dim, n, "nope_dim") or [full] * n
        self.query_rank = _per_layer(self.query_rank, n, "query_rank")
        if self.attention_scale is None:
            self.attention_scale = self.head_dim**-0.5
        if self.latent_norm and self.attention != "mfa_kr":
            raise ValueError("latent_norm normalises MFA-KR's shared latent: use it with attention='mfa_kr'")
        if self.serving_format not in SERVING_FORMATS:
            raise ValueError(f"serving_format must be one of {SERVING_FORMATS}, got {self.serving_format!r}")
        rotated = self.key_dim if self.attention == "mfa" else self.rope_dim
        if any(width % 2 for width in rotated):
            raise ValueError(f"rotated key widths must be even (RoPE rotates pairs), got {rotated}")
        if self.rope_pair_index is None:
            self.rope_pair_index = [[p % (self.head_dim // 2) for p in range(w // 2)] for w in rotated]
        if [len(pairs) for pairs in self.rope_pair_index] != [w // 2 for w in rotated]:
            raise ValueError("rope_pair_index must list one source frequency per rotated key pair in each layer")
        # Every layer is full attention whose cache rows hold factors. No `layer_types` attribute (as in Llama):
        # transformers then builds one mask and stock cache layers, and a plain PreTrainedConfig (AutoTokenizer
        # without trust_remote_code) reads config.json too. Folders from earlier releases name a custom type.
        layer_types = kwargs.pop("layer_types", None)
        if layer_types is not None and set(layer_types) - {_LEGACY_LAYER_TYPE, "full_attention"}:
            raise ValueError(f"factorconv layers are all full attention, got layer_types {layer_types}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Refuses MFA / MFA-KR folders written before the factored layout, whose weights this code cannot read."""
        if config_dict.get("attention") in ("mfa", "mfa_kr") and config_dict.get("attention_layout") != "factored":
            raise ValueError(
                "this MFA/MFA-KR model was written by factorconv 0.1 in the absorbed layout, which this release "
                "does not read: load it with trust_remote_code=True (its own modeling file) or convert it again"
            )
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict:
        """Without the fields of the other kinds (they would describe a model this is not)."""
        output = super().to_dict()
        for name in {f for fields in KIND_FIELDS.values() for f in fields} - set(KIND_FIELDS[self.attention]):
            output.pop(name, None)
        return output

    def kv_cache_width(self, layer_idx: int) -> int:
        """Numbers cached per token in one layer (multiply by the dtype size for bytes)."""
        if self.attention == "mfa":
            return self.key_dim[layer_idx] + self.value_dim[layer_idx]
        if self.attention == "mfa_kr":
            return self.rope_dim[layer_idx] + self.nope_dim[layer_idx]
        h, d = self.num_attention_heads, self.head_dim
        per_rank = d + (h if self.tpa_contextual else 0)
        return (self.tpa_rank_k[layer_idx] + self.tpa_rank_v[layer_idx]) * per_rank


# Saving a loaded model copies this file next to the weights and keeps auto_map pointing at it.
FactorConvConfig.register_for_auto_class("AutoConfig")

__all__ = ["FactorConvConfig"]
