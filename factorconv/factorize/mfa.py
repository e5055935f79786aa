"""MFA initialisation: RoPE-preserving key merge, output-weighted value basis, merged queries (DESIGN §4.2).

Keys. RoPE rotates dims (p, p + D/2) of every head by the same angle θ_p·t, so any mix across KV heads
*within one pair*, applied identically to both components, commutes with it. For each pair p the g heads'
components z_p, z'_p give C_p = E[z_p z_pᵀ + z'_p z'_pᵀ] (g×g); its eigenvectors u become new key pairs
(uᵀz_p, uᵀz'_p) rotating at θ_p. The d_K/2 pairs with the largest eigenvalues over all p are kept; with all
g·D/2 of them the merge is an orthogonal change of basis, hence exact.

Values. With G = blockdiag_j Σ_{i reads j} W_O,iᵀ W_O,i, minimising Σ_i E‖W_O,i(v_γ(i) − v̂_γ(i))‖² is a PCA
of G^{1/2} v: keep the top d_V eigenvectors Y of G^{1/2} C_V G^{1/2}, cache c = Yᵀ G^{1/2} v, read back
v̂ = G^{-1/2} Y c. Exact at d_V = g·D. The model stores this read-back per group (`value_up`) and keeps the
source's o_proj.
"""

from dataclasses import dataclass

import torch

from .common import input_moment, psd_sqrt_and_inverse, split_bias_column, top_eigenvectors, with_bias_column


@dataclass
class KeyMerge:
    """A merged key head: weight/bias of its pre-RoPE projection and where each pair came from."""

    weight: torch.Tensor  # (d_K, d)
    bias: torch.Tensor | None  # (d_K,)
    pairs: list[int]  # source frequency pair of each new pair, length d_K/2
    key_mixing: torch.Tensor  # (d_K/2, g): how new pair n mixes the g heads' components of its pair
    query_mixing: torch.Tensor  # (d_K/2, g): the coefficient query heads of group j put on new pair n
    relative_error: float  # sqrt(dropped / total) of the (query-weighted) key energy


@dataclass
class ValueBasis:
    """A merged value head: c = weight·x + bias, and v̂_all = read·c for the source's g·D values."""

    weight: torch.Tensor  # (d_V, d)
    bias: torch.Tensor | None
    read: torch.Tensor  # (g·D, d_V)
    relative_error: float  # sqrt(dropped / total) of the output-weighted value energy


def _pair_halves(stacked: torch.Tensor, num_groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g·D, d') rows -> first and second components of every pair, each (D/2, g, d')."""
    per_head = stacked.reshape(num_groups, head_dim, -1)
    half = head_dim // 2
    return per_head[:, :half].transpose(0, 1), per_head[:, half:].transpose(0, 1)


def pair_moments(
    k_weight: torch.Tensor, k_bias: torch.Tensor | None, num_groups: int, head_dim: int, moment: torch.Tensor | None
) -> torch.Tensor:
    """C_p for every frequency pair p: (D/2, g, g), from the input moment (identity when weight-only)."""
    stacked = with_bias_column(k_weight, k_bias).double()
    sigma = input_moment(k_weight.shape[1], k_bias is not None, moment, k_weight.device)
    first, second = _pair_halves(stacked, num_groups, head_dim)
    return first @ sigma @ first.transpose(1, 2) + second @ sigma @ second.transpose(1, 2)


def query_pair_energy(
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    moment: torch.Tensor | None,
) -> torch.Tensor:
    """(D/2, g): E‖q_{i,p}‖² summed over the query heads i of each group — how much each key pair is read."""
    stacked = with_bias_column(q_weight, q_bias).double()
    sigma = input_moment(q_weight.shape[1], q_bias is not None, moment, q_weight.device)
    row_energy = ((stacked @ sigma) * stacked).sum(dim=1).reshape(num_groups, num_heads // num_groups, head_dim)
    per_group = row_energy.sum(dim=1)  # (g, D)
    half = head_dim // 2
    return (per_group[:, :half] + per_group[:, half:]).T


def _pair_eigen(
    moments: torch.Tensor, query_energy: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-directions of each pair's key moment, weighted by how strongly queries read each head.

    Returns eigenvalues (D/2, g) and, per direction, the key-side and query-side head mixes (D/2, g, g),
    columns indexed like the eigenvalues. Without query energy both mixes are the orthonormal eigenvectors.
    """
    if query_energy is None:
        values, vectors = torch.linalg.eigh(moments)
        return values.clamp_min(0), vectors, vectors
    weight = query_energy.double().clamp_min(query_energy.max() * 1e-12).sqrt()  # (D/2, g)
    weighted = weight[:, :, None] * moments * weight[:, None, :]
    values, vectors = torch.linalg.eigh(weighted)
    return values.clamp_min(0), vectors * weight[:, :, None], vectors / weight[:, :, None]


def key_gains(moments: torch.Tensor, query_energy: torch.Tensor | None) -> torch.Tensor:
    """Share of the (query-weighted) key energy each merged pair would keep, largest first."""
    values = _pair_eigen(moments, query_energy)[0].flatten().sort(descending=True).values
    return values / values.sum().clamp_min(1e-300)


def rope_key_merge(
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    num_groups: int,
    head_dim: int,
    key_dim: int,
    moments: torch.Tensor,
    query_energy: torch.Tensor | None = None,
    frequencies: list[int] | None = None,
) -> KeyMerge:
    """Merge g RoPE'd key heads into one of width `key_dim`, keeping the strongest per-pair directions.

    With `query_energy` (see `query_pair_energy`) the error minimised is the query-weighted one,
    Σ_j E‖q_j‖² E‖k_j − k̂_j‖² per pair, so directions that queries barely read are dropped first.
    With `frequencies` the merge keeps exactly one direction, the strongest, per listed source pair, in that
    order (a stock architecture's RoPE: one pair per frequency of its own sequence).
    """
    total_pairs = num_groups * head_dim // 2
    if key_dim % 2 or not 2 <= key_dim <= 2 * total_pairs:
        raise ValueError(f"key width must be even and between 2 and {2 * total_pairs}, got {key_dim}")
    values, key_vectors, query_vectors = _pair_eigen(moments, query_energy)
    if frequencies is not None:
        if len(frequencies) != key_dim // 2:
            raise ValueError(f"{len(frequencies)} frequencies for a key width of {key_dim}")
        index = torch.tensor(frequencies, device=values.device)
        order = index * num_groups + values[index].argmax(dim=1)
    else:
        order = values.flatten().argsort(descending=True)[: key_dim // 2]
        order = order.sort().values  # group by source pair: pair p's directions stay together
    pairs = (order // num_groups).tolist()
    key_mixing = key_vectors.transpose(1, 2).reshape(-1, num_groups)[order]  # (n, g)
    query_mixing = query_vectors.transpose(1, 2).reshape(-1, num_groups)[order]
    stacked = with_bias_column(k_weight, k_bias).double()
    first, second = _pair_halves(stacked, num_groups, head_dim)
    index = torch.tensor(pairs, device=k_weight.device)
    rows = torch.cat(
        [torch.einsum("ng,ngi->ni", key_mixing, first[index]), torch.einsum("ng,ngi->ni", key_mixing, second[index])]
    )
    weight, bias = split_bias_column(rows, k_bias is not None)
    dropped = values.sum() - values.flatten()[order].sum()
    error = float((dropped.clamp_min(0) / values.sum().clamp_min(1e-300)).sqrt())
    return KeyMerge(weight.to(k_weight.dtype), _cast(bias, k_weight.dtype), pairs, key_mixing, query_mixing, error)


def strided_pairs(head_dim: int, width: int) -> list[int]:
    """The source pairs whose frequencies are the standard RoPE sequence of a `width`-dim head with the same θ.

    Pair n of a w-dim head rotates at θ^(−2n/w) = θ^(−2(n·D/w)/D): source pair n·D/w (every other one for
    w = D/2, e.g. DeepSeek-V3's 64-dim RoPE part from a 128-dim Llama head; all of them for w = D).
    """
    if width % 2 or not 2 <= width <= head_dim or head_dim % width:
        raise ValueError(f"a standard RoPE part must be even and divide the head dim {head_dim}, got {width}")
    return [n * head_dim // width for n in range(width // 2)]


def query_maps(merge: KeyMerge, head_dim: int) -> torch.Tensor:
    """(g, d_K, D): how a source query head of group j reads the merged key, in the source head's coordinates.

    Row n (and n + d_K/2) takes the source query's components of pair p_n, scaled by the group's mix of new pair
    n. It maps each RoPE pair onto a pair of the same frequency, so it commutes with the rotation.
    """
    num_pairs, num_groups = merge.query_mixing.shape
    index = torch.tensor(merge.pairs, device=merge.query_mixing.device)
    maps = torch.zeros(num_groups, 2 * num_pairs, head_dim, dtype=torch.float64, device=index.device)
    rows = torch.arange(num_pairs, device=index.device)
    coeff = merge.query_mixing.T.double()  # (g, n)
    maps[:, rows, index] = coeff
    maps[:, rows + num_pairs, index + head_dim // 2] = coeff
    return maps


def merge_queries(
    q_weight: torch.Tensor, q_bias: torch.Tensor | None, merge: KeyMerge, num_heads: int, head_dim: int
) -> torch.Tensor:
    """Each query head mapped into the merged key space: (h, d_K, d') rows, bias as the last column."""
    maps = query_maps(merge, head_dim)
    per_head = with_bias_column(q_weight, q_bias).double().reshape(num_heads, head_dim, -1)
    group_of_head = torch.arange(num_heads, device=q_weight.device) // (num_heads // maps.shape[0])
    return maps[group_of_head] @ per_head


def output_heads(o_weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """W_O split per query head: (h, d, D), float64."""
    return o_weight.double().reshape(o_weight.shape[0], num_heads, head_dim).transpose(0, 1)


def output_metric(
    o_weight: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """G^{±1/2} for G = blockdiag_j Σ_{i reads j} W_O,iᵀ W_O,i: value errors measured after the output projection."""
    o_heads = output_heads(o_weight, num_heads, head_dim)
    reads = (o_heads.transpose(1, 2) @ o_heads).reshape(num_groups, num_heads // num_groups, head_dim, head_dim)
    return psd_sqrt_and_inverse(torch.block_diag(*reads.sum(dim=1)))


def _value_eigen(
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    num_heads: int,
    num_groups: int,
    moment: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and vectors of G^{1/2} C_V G^{1/2}, with G^{±1/2} and the stacked [W_V | b_V]."""
    g_half, g_inv_half = output_metric(o_weight, num_heads, num_groups, v_weight.shape[0] // num_groups)
    stacked = with_bias_column(v_weight, v_bias).double()
    sigma = input_moment(v_weight.shape[1], v_bias is not None, moment, v_weight.device)
    weighted = g_half @ stacked @ sigma @ stacked.T @ g_half
    values, vectors = top_eigenvectors((weighted + weighted.T) / 2, stacked.shape[0])
    return values, vectors, g_half, g_inv_half, stacked


def value_gains(
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    num_heads: int,
    num_groups: int,
    moment: torch.Tensor | None,
) -> torch.Tensor:
    """Share of the output-weighted value energy each kept value dimension would carry, largest first."""
    values = _value_eigen(v_weight, v_bias, o_weight, num_heads, num_groups, moment)[0]
    return values / values.sum().clamp_min(1e-300)


def output_weighted_value_basis(
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    num_heads: int,
    num_groups: int,
    value_dim: int,
    moment: torch.Tensor | None,
) -> ValueBasis:
    """The `value_dim` value directions that matter most after the output projection (see module doc)."""
    full = v_weight.shape[0]
    if not 1 <= value_dim <= full:
        raise ValueError(f"value width must be between 1 and {full}, got {value_dim}")
    values, vectors, g_half, g_inv_half, stacked = _value_eigen(v_weight, v_bias, o_weight, num_heads, num_groups, moment)
    basis = vectors[:, :value_dim]
    weight, bias = split_bias_column(basis.T @ g_half @ stacked, v_bias is not None)
    error = float(((values.sum() - values[:value_dim].sum()).clamp_min(0) / values.sum().clamp_min(1e-300)).sqrt())
    return ValueBasis(weight.to(v_weight.dtype), _cast(bias, v_weight.dtype), g_inv_half @ basis, error)


def low_rank_queries(
    rows: torch.Tensor, has_bias: bool, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Query projection (out × d', bias last) -> W_down (C × d), W_up (out × C), up bias. Exact at C ≥ rank."""
    weight, bias = split_bias_column(rows.double(), has_bias)
    limit = min(weight.shape)
    if not 1 <= rank <= limit:
        raise ValueError(f"query rank must be between 1 and {limit}, got {rank}")
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return vh[:rank], u[:, :rank] * s[:rank], bias


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)
