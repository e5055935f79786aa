"""MFA-KR initialisation: calibrated partial RoPE and the joint K_nope/V latent (DESIGN §4.3).

MFA-KR caches one vector c = [c_rope | c_nope]: c_rope is a RoPE-preserving key merge (as MFA's keys),
c_nope is read by the queries as an un-rotated key *and* by the output projection as the value. So key
information can share cache dims with values only if it needs no rotation.

Partial RoPE. A merged key direction n (frequency pair p, angle θ_p per token of distance) contributes
qᵀR(−θ_pΔ)k to a score. Moved to NoPE, the best position-free stand-in is its average over distances,
qᵀM_p k with M_p = E_Δ[R(−θ_pΔ)] (Δ triangular on [0, context): causal attention over a window), which
keeps the part |m_p|² = c̄² + s̄² of the direction's energy λ_n. Keeping it rotated is worth λ_n(1 − |m_p|²)
over the NoPE stand-in, so the d_R/2 directions with the largest λ_n(1 − |m_p|²) keep RoPE: slow
frequencies (|m_p| ≈ 1) move first, whatever their energy, because moving them loses almost nothing.

Joint latent. The moved directions' averaged keys M_p k_n and the values v are compressed together:
c_nope = Yᵀ [diag(w) k̄_nope; G^{1/2} v] with Y the top d_N eigenvectors of that stack's second moment.
G^{1/2} weights values by what the output projection reads (as in MFA); w puts key errors in the same
output units: a score error ε in head i moves its output by about ε·‖W_O,i v‖, so
w²_row = scale² Σ_i E[q_{i,row}²]·E‖W_O,i v_γ(i)‖². Queries read the keys back through diag(w)⁻¹Y_k, values are
read back through G^{-1/2}Y_v; both are per-group maps of the source head's own query and value (`key_up`,
`value_up`), so the model keeps the source's q_proj and o_proj (MLA's factored form). Keys count centred (a
part constant over tokens shifts all of a query's scores equally, which softmax ignores). With every direction
kept rotated (d_R = g·D) and d_N = g·D nothing is moved or dropped: the conversion is exact.
"""

from dataclasses import dataclass

import torch

from .common import input_moment, split_bias_column, top_eigenvectors, with_bias_column
from .mfa import KeyMerge, ValueBasis, merge_queries, output_heads, output_metric, pair_moments, query_maps, rope_key_merge


@dataclass
class KeyReuseInit:
    """Weights of one MFA-KR layer: c = latent·x̃ (x̃ = [x; 1]) and the queries that read it."""

    latent: torch.Tensor  # (d_R + d_N, d'): c_rope rows (first components of each pair, then second), c_nope
    rope_mix: torch.Tensor  # (g, d_R/2): how group j's source query reads rotated pair n (at its frequency)
    key_up: torch.Tensor  # (g, D, d_N): c_nope as an un-rotated key in the source query's coordinates
    value: ValueBasis  # c_nope's rows of the latent and how the source's g·D values are read back from them
    pairs: list[int]  # source frequency pair of each rotated pair of c_rope
    key_error: float  # sqrt of the key energy lost (phase averaging + latent truncation) / total
    value_error: float  # sqrt of the output-weighted value energy lost / total


def phase_average(inv_freq: torch.Tensor, context: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """E_Δ[cos θΔ], E_Δ[sin θΔ] per frequency for causal distances Δ ∈ [0, context), P(Δ) ∝ context − Δ.

    `scaling` is the rotary embedding's attention scaling; q and k both carry it, so scores carry its square.
    """
    distance = torch.arange(context, dtype=torch.float64, device=inv_freq.device)
    weight = (context - distance) / (context - distance).sum()
    angle = inv_freq.double()[:, None] * distance
    return scaling**2 * (angle.cos() @ weight), scaling**2 * (angle.sin() @ weight)


def _row_energy(rows: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[(row·x̃)²] for every row."""
    return ((rows @ sigma) * rows).sum(dim=-1)


def _outer_mean(moment: torch.Tensor | None, in_features: int, size: int) -> torch.Tensor:
    """μμᵀ for μ = E[x̃], read from the constant channel of a (d+1)-square moment; zero when there is none."""
    if moment is None or moment.shape[0] != in_features + 1:
        return torch.zeros(size, size, dtype=torch.float64, device=None if moment is None else moment.device)
    mean = moment[:size, -1].double()
    return torch.outer(mean, mean)


@dataclass
class _LayerSpectra:
    """What every partial-RoPE choice of one layer shares: the moments, the merged key directions, the merged
    queries and the output weights (computed once; the candidates differ only in which directions stay rotated)."""

    sigma: torch.Tensor
    centered: torch.Tensor
    merge: KeyMerge
    keys: torch.Tensor
    queries: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    energy: torch.Tensor
    values: torch.Tensor
    head_output: torch.Tensor
    g_half: torch.Tensor
    g_inv_half: torch.Tensor


def _layer_spectra(
    q: tuple[torch.Tensor, torch.Tensor | None],
    k: tuple[torch.Tensor, torch.Tensor | None],
    v: tuple[torch.Tensor, torch.Tensor | None],
    o_weight: torch.Tensor,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    phase: tuple[torch.Tensor, torch.Tensor],
    moment: torch.Tensor | None,
) -> _LayerSpectra:
    (k_weight, k_bias), (v_weight, v_bias) = k, v
    full, half = num_groups * head_dim, num_groups * head_dim // 2
    sigma = input_moment(k_weight.shape[1], k_bias is not None, moment, k_weight.device)
    centered = sigma - _outer_mean(moment, k_weight.shape[1], sigma.shape[0]).to(sigma.device)
    # Every merged direction (an orthogonal change of basis per pair); the candidates pick which keep RoPE.
    merge = rope_key_merge(k_weight, k_bias, num_groups, head_dim, full, pair_moments(k_weight, k_bias, num_groups, head_dim, moment))
    keys = with_bias_column(merge.weight, merge.bias).double()  # (2·half, d'): first components, then second
    queries = merge_queries(*q, merge, num_heads, head_dim)  # (h, 2·half, d')
    pair = torch.tensor(merge.pairs, device=keys.device)
    energy = _row_energy(keys[:half], sigma) + _row_energy(keys[half:], sigma)  # λ_n
    o_heads = output_heads(o_weight, num_heads, head_dim)
    values = with_bias_column(v_weight, v_bias).double()
    group = torch.arange(num_heads, device=keys.device) // (num_heads // num_groups)
    per_head_values = values.reshape(num_groups, head_dim, -1)[group]  # (h, D, d')
    head_output = _row_energy(o_heads @ per_head_values, centered).sum(dim=1)  # Var‖W_O,i v_γ(i)‖, (h,)
    g_half, g_inv_half = output_metric(o_weight, num_heads, num_groups, head_dim)
    return _LayerSpectra(sigma, centered, merge, keys, queries, phase[0][pair], phase[1][pair], energy, values,
                         head_output, g_half, g_inv_half)


def key_reuse_inits(
    q: tuple[torch.Tensor, torch.Tensor | None],
    k: tuple[torch.Tensor, torch.Tensor | None],
    v: tuple[torch.Tensor, torch.Tensor | None],
    o_weight: torch.Tensor,
    num_heads: int,
    num_groups: int,
    rope_dim: int,
    nope_dim: int,
    phase: tuple[torch.Tensor, torch.Tensor],
    scale: float,
    moment: torch.Tensor | None,
    candidates: list[tuple[bool, float]],
    frequencies: list[int] | None = None,
) -> list[KeyReuseInit]:
    """MFA-KR weights from (weight, bias) of the source q/k/v projections and W_O (see module doc), one per
    (move_slow, key_weight) candidate, sharing the work that does not depend on it.

    `phase` is `phase_average` of the source's frequencies, `scale` the softmax scale, `moment` E[x̃x̃ᵀ]
    (None: identity, weight-only). `move_slow` ranks directions for RoPE by λ(1 − |m|²) (False: by λ, as MFA);
    `key_weight` scales the NoPE keys against the values in the latent (0: directions not kept are dropped,
    the latent holds values only). With `frequencies` (source pairs, rope_dim/2 of them) exactly one direction,
    the strongest, stays rotated per listed pair, in that order, whatever `move_slow` (DeepSeek-V3's RoPE part).
    """
    k_weight, k_bias = k
    head_dim = k_weight.shape[0] // num_groups
    full = num_groups * head_dim
    if rope_dim % 2 or not 2 <= rope_dim <= full:
        raise ValueError(f"rotated width must be even and between 2 and {full}, got {rope_dim}")
    if not 1 <= nope_dim <= 2 * full - rope_dim:
        raise ValueError(f"shared key/value width must be between 1 and {2 * full - rope_dim}, got {nope_dim}")
    if frequencies is not None and len(frequencies) != rope_dim // 2:
        raise ValueError(f"{len(frequencies)} frequencies for a rotated width of {rope_dim}")
    spectra = _layer_spectra(q, k, v, o_weight, num_heads, num_groups, head_dim, phase, moment)
    return [
        _candidate_init(
            spectra, k_weight.dtype, k_bias is not None, head_dim, rope_dim, nope_dim, scale, slow, weight, frequencies
        )
        for slow, weight in candidates
    ]


def _candidate_init(
    spectra: _LayerSpectra,
    dtype: torch.dtype,
    has_bias: bool,
    head_dim: int,
    rope_dim: int,
    nope_dim: int,
    scale: float,
    move_slow: bool,
    key_weight: float,
    frequencies: list[int] | None = None,
) -> KeyReuseInit:
    """One (move_slow, key_weight) choice on top of the layer's shared spectra."""
    sigma, centered, merge, keys, queries = spectra.sigma, spectra.centered, spectra.merge, spectra.keys, spectra.queries
    cos, sin, energy, values = spectra.cos, spectra.sin, spectra.energy, spectra.values
    head_output, g_half, g_inv_half = spectra.head_output, spectra.g_half, spectra.g_inv_half
    half = keys.shape[0] // 2
    if frequencies is not None:  # the full merge orders directions by source pair: n = p·g + j
        groups = half // (head_dim // 2)
        index = torch.tensor(frequencies, device=keys.device)
        kept = index * groups + energy.reshape(-1, groups)[index].argmax(dim=1)
    else:
        rope_value = energy * (1 - cos**2 - sin**2) if move_slow else energy
        kept = rope_value.argsort(descending=True)[: rope_dim // 2].sort().values
    moved = sorted(set(range(half)) - set(kept.tolist())) if key_weight > 0 else []
    moved = torch.tensor(moved, dtype=torch.long, device=keys.device)
    rope_rows = torch.cat([kept, kept + half])

    # Moved directions as NoPE keys, averaged over distance: M_p k = (c̄a + s̄b, −s̄a + c̄b).
    a, b, c_m, s_m = keys[moved], keys[moved + half], cos[moved, None], sin[moved, None]
    nope_keys = torch.cat([c_m * a + s_m * b, c_m * b - s_m * a])
    nope_queries = queries[:, torch.cat([moved, moved + half])]

    # Output-unit weights of the moved key rows (the values' are the output metric G).
    weights = key_weight * (scale**2 * (_row_energy(nope_queries, sigma) * head_output[:, None]).sum(dim=0)).sqrt()
    weights = weights.clamp_min(weights.max().clamp_min(1e-30) * 1e-6) if weights.numel() else weights

    # Second moment of z = [w·k̄(x) − E; G^{1/2}v(x)]: a key part constant over tokens shifts every score of
    # a query equally (softmax ignores it), so keys count centred; values count whole (their mean is output).
    stack = torch.cat([weights[:, None] * nope_keys, g_half @ values])
    rows = len(nope_keys)
    second = stack @ centered @ stack.T
    second[rows:, rows:] = stack[rows:] @ sigma @ stack[rows:].T
    _, basis = top_eigenvectors((second + second.T) / 2, nope_dim)
    key_read, value_read = basis[:rows] / weights[:, None], g_inv_half @ basis[rows:]
    residual = second - basis @ (basis.T @ second @ basis) @ basis.T  # second moment of what c_nope misses

    latent = torch.cat([keys[rope_rows], basis.T @ stack])
    nope_maps = query_maps(merge, head_dim)[:, torch.cat([moved, moved + half])]  # (g, rows, D)
    key_up = nope_maps.transpose(1, 2) @ key_read  # (g, D, d_N)
    rope_mix = merge.query_mixing.T[:, kept]
    nope_key_energy = (residual[:rows].diagonal() / weights**2).sum()
    dropped = torch.ones_like(energy, dtype=torch.bool)
    dropped[kept], dropped[moved] = False, False
    lost = (energy[moved] * (1 - cos[moved] ** 2 - sin[moved] ** 2)).sum() + energy[dropped].sum()
    key_error = float(((lost + nope_key_energy).clamp_min(0) / energy.sum().clamp_min(1e-300)).sqrt())
    value_total = second[rows:, rows:].diagonal().sum()
    value_error = float((residual[rows:, rows:].diagonal().sum().clamp_min(0) / value_total.clamp_min(1e-300)).sqrt())

    weight, bias = split_bias_column(latent, has_bias)
    value = ValueBasis(weight[rope_dim:].to(dtype), None if bias is None else bias[rope_dim:].to(dtype), value_read, value_error)
    pairs = [merge.pairs[n] for n in kept.tolist()]
    return KeyReuseInit(latent.to(dtype), rope_mix.to(dtype), key_up.to(dtype), value, pairs, key_error, value_error)


def latent_norm_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: torch.Tensor | None,
    moment: torch.Tensor | None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The RMSNorm scale w that makes w ⊙ c/rms(c) closest to c = weight·x + bias (DeepSeek-V3's kv_a_layernorm
    in front of a latent built without one).

    On calibration inputs (M, d) the per-dim least-squares fit, w_i = E[c_i²/r] / E[c_i²/r²] with r = rms(c);
    without them √E[r²] from the input moment (identity: weight-only). What remains is each token's
    deviation of r from typical, which refinement and healing then train with the norm in place.
    """
    if inputs is not None:
        c = inputs.double() @ weight.double().T + (0 if bias is None else bias.double())
        r = (c.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
        return ((c.pow(2) / r).mean(dim=0) / (c.pow(2) / r.pow(2)).mean(dim=0).clamp_min(1e-30)).to(weight.dtype)
    rows = with_bias_column(weight, bias).double()
    sigma = input_moment(weight.shape[1], bias is not None, moment, weight.device)
    mean_square = ((rows @ sigma) * rows).sum() / weight.shape[0]
    scale = float(mean_square.clamp_min(eps).sqrt())
    return torch.full((weight.shape[0],), scale, dtype=weight.dtype, device=weight.device)

