"""Tensor-product (TPA) factors of a multi-head projection, DESIGN §4.1.

A projection W (g·D × d) with g heads read by h ≥ g query heads (head i reads group ⌊i·g/h⌋) is written as
    W_i ≈ Σ_r α_{r,i} B_r,    α ∈ R^{R×h},  B_r ∈ R^{D×d}
which is exact at R = g with α the group indicator (MHA/MQA/GQA are non-contextual TPA). Below g, the
head-mode SVD of the stacked per-group matrices gives the best rank-R mix; an optional whitening factor L
(Cholesky of the input second moment, bias as a constant-1 channel) makes the error the one seen on
real inputs, E‖(W - Ŵ) x‖², instead of the plain weight error.
"""

from dataclasses import dataclass

import torch

from .common import split_bias_column, with_bias_column


@dataclass
class TensorProductInit:
    """Initial weights of one TensorProduct module (see modeling_factorconv.TensorProduct)."""

    head_mix: torch.Tensor  # α, (R, h)
    basis_weight: torch.Tensor  # B, (R·D, d)
    basis_bias: torch.Tensor | None  # β, (R·D,)

    @property
    def rank(self) -> int:
        return self.head_mix.shape[0]


def group_indicator(num_groups: int, num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """(g, h) 0/1 matrix: entry (j, i) is 1 iff query head i reads group j."""
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} heads cannot be split into {num_groups} equal groups")
    heads_per_group = num_heads // num_groups
    return torch.eye(num_groups, device=device).repeat_interleave(heads_per_group, dim=1)


def _head_mode_svd(
    weight: torch.Tensor, bias: torch.Tensor | None, num_groups: int, num_heads: int, whitening: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD across the head mode of G = [√m · W_j L]_j, (g × D·d')."""
    stacked = with_bias_column(weight, bias).double()  # (g·D, d')
    if whitening is not None:
        stacked = stacked @ whitening.double()
    # Each group is read by m heads, so its error counts m times: scale rows by √m before the SVD.
    grouped = stacked.reshape(num_groups, -1) * (num_heads // num_groups) ** 0.5
    return torch.linalg.svd(grouped, full_matrices=False)


def head_mode_gains(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_groups: int,
    num_heads: int,
    whitening: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of the (whitened) projection energy each additional rank keeps, largest first."""
    energy = _head_mode_svd(weight, bias, num_groups, num_heads, whitening)[1] ** 2
    return energy / energy.sum().clamp_min(1e-300)


def tensor_product_init(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_groups: int,
    num_heads: int,
    rank: int,
    whitening: torch.Tensor | None = None,
) -> TensorProductInit:
    """Rank-`rank` tensor-product factors of a g-group projection read by `num_heads` heads.

    `whitening` is a lower-triangular L with LLᵀ = E[x̃x̃ᵀ] over inputs x̃ (x with a trailing 1 when there
    is a bias); None means the plain weight error (L = I).
    """
    if not 1 <= rank <= num_groups:
        raise ValueError(f"rank must be between 1 and {num_groups} (the number of source heads), got {rank}")
    indicator = group_indicator(num_groups, num_heads, weight.device)
    if rank == num_groups:
        return TensorProductInit(indicator.to(weight.dtype), weight.clone(), None if bias is None else bias.clone())

    out_dtype = weight.dtype
    head_dim, heads_per_group = weight.shape[0] // num_groups, num_heads // num_groups
    u, s, vh = _head_mode_svd(weight, bias, num_groups, num_heads, whitening)
    coeff = u[:, :rank]  # (g, R)
    basis = (s[:rank, None] * vh[:rank]).reshape(rank * head_dim, -1) / heads_per_group**0.5
    if whitening is not None:
        basis = torch.linalg.solve_triangular(whitening.double(), basis, upper=False, left=False)
    head_mix = coeff.T @ indicator.double()
    basis, basis_bias = split_bias_column(basis, bias is not None)
    return TensorProductInit(
        head_mix.to(out_dtype),
        basis.to(out_dtype),
        None if basis_bias is None else basis_bias.to(out_dtype),
    )


def per_head_projection(init: TensorProductInit) -> torch.Tensor:
    """The (h·D × d') per-head projection the factors implement (bias as the last column)."""
    rank = init.rank
    basis = with_bias_column(init.basis_weight, init.basis_bias).double()
    basis = basis.reshape(rank, -1, basis.shape[1])  # (R, D, d')
    per_head = torch.einsum("rh,rdi->hdi", init.head_mix.double(), basis)
    return per_head.reshape(-1, basis.shape[2])


def relative_error(
    weight: torch.Tensor, bias: torch.Tensor | None, init: TensorProductInit, num_groups: int, num_heads: int
) -> float:
    """‖W_heads − Ŵ_heads‖_F / ‖W_heads‖_F over all query heads' views of the projection."""
    source = with_bias_column(weight, bias).double()
    head_dim = source.shape[0] // num_groups
    source = source.reshape(num_groups, head_dim, -1).repeat_interleave(num_heads // num_groups, dim=0)
    source = source.reshape(num_heads * head_dim, -1)
    return float(torch.linalg.norm(source - per_head_projection(init)) / torch.linalg.norm(source))
