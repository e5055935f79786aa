"""Contextual TPA factors fitted to calibration activations by alternating least squares (DESIGN §4.1, `als`).

Non-contextual TPA mixes the heads with one α for every token; its best rank-R α is the head-mode SVD.
Contextual TPA lets the mix depend on the token, a(x) = α + A x, so each token's h×D key matrix gets its own
rank-R factorization k_i(x) = Σ_r a_{r,i}(x) b_r(x). Starting from the SVD factors (A = 0), the two factors
are refitted in turn to the calibration keys (or values) of the source, each step an exact least-squares
problem, so the error E‖k(x) − k̂(x)‖² on the fitting tokens never increases:
  a-step: b fixed, a_{·,j}(x) = Θ_j x̃ is linear in Θ_j with features b_r(x) ⊗ x̃ (one solve for all groups);
  b-step: a fixed, b_r(x) = B_r x̃_b is linear in B with features a_{r,j}(x) x̃_b (one solve for all D rows).
Heads of one source group share a target, so their a is fitted once per group and copied.
"""

from dataclasses import dataclass

import torch

from .common import with_bias_column
from .tpa import TensorProductInit, group_indicator


@dataclass
class ContextualInit:
    """Initial weights of a contextual TensorProduct: α (R, h), A (R·h, d), B (R·D, d) and β."""

    head_mix: torch.Tensor
    head_proj: torch.Tensor
    basis_weight: torch.Tensor
    basis_bias: torch.Tensor | None


def _gram(features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Σ_t f_t[r,s] x_t x_tᵀ arranged as an (R·n, R·n) matrix, for per-token (R, R) weights f_t."""
    rank = features.shape[1]
    blocks = [[(inputs * features[:, r, s, None]).T @ inputs for s in range(rank)] for r in range(rank)]
    return torch.cat([torch.cat(row, dim=1) for row in blocks])


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean().clamp_min(1e-300) * eye, rhs)


def fit_contextual(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    init: TensorProductInit,
    num_groups: int,
    sweeps: int = 8,
    ridge: float = 1e-6,
    chunk: int = 16384,
) -> tuple[ContextualInit, list[float]]:
    """ALS fit of a(x) = α + A x and b(x) = B x + β to the source's g-group projection on `inputs` (M, d).

    Returns the factors and the relative error ‖K − K̂‖/‖K‖ on `inputs` before the first sweep and after each.
    """
    rank, num_heads = init.head_mix.shape
    head_dim = init.basis_weight.shape[0] // rank
    per_group = num_heads // num_groups
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    x_tilde = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # a always has its constant α
    x_basis = x_tilde if bias is not None else x
    source = with_bias_column(weight, bias).double()
    # Θ (g, R, d+1): a_{r,j}(x) = Θ[j, r]·x̃, from α of the first head of each group (A = 0).
    theta = torch.zeros(num_groups, rank, x_tilde.shape[1], dtype=torch.float64, device=x.device)
    theta[:, :, -1] = init.head_mix.double()[:, ::per_group].T
    basis = with_bias_column(init.basis_weight, init.basis_bias).double().reshape(rank, head_dim, -1)

    def chunks():
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            keys = (x_tilde[rows] if bias is not None else x[rows]) @ source.T
            yield x_tilde[rows], x_basis[rows], keys.reshape(-1, num_groups, head_dim)

    def error() -> float:
        num = den = 0.0
        for xt, xb, keys in chunks():
            a = torch.einsum("jrn,tn->trj", theta, xt)
            b = torch.einsum("rdn,tn->trd", basis, xb)
            num += float((keys - torch.einsum("trj,trd->tjd", a, b)).pow(2).sum())
            den += float(keys.pow(2).sum())
        return (num / max(den, 1e-300)) ** 0.5

    errors = [error()]
    for _ in range(sweeps):
        gram = rhs = None  # a-step
        for xt, xb, keys in chunks():
            b = torch.einsum("rdn,tn->trd", basis, xb)
            g, r = _gram(b @ b.transpose(1, 2), xt), torch.einsum("trd,tjd,tn->jrn", b, keys, xt).flatten(1)
            gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        theta = _solve(gram, rhs.T, ridge).T.reshape(theta.shape)
        gram = rhs = None  # b-step
        for xt, xb, keys in chunks():
            a = torch.einsum("jrn,tn->trj", theta, xt)
            g, r = _gram(a @ a.transpose(1, 2), xb), torch.einsum("trj,tjd,tn->drn", a, keys, xb).flatten(1)
            gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        basis = _solve(gram, rhs.T, ridge).T.reshape(head_dim, rank, -1).transpose(0, 1)
        errors.append(error())

    # a_r·s and b_r/s give the same keys: pick s so both factors have the same size on the calibration tokens
    # (a fine-tune with one learning rate for both then moves them at comparable relative speeds).
    a_energy = b_energy = 0.0
    for xt, xb, _ in chunks():
        a_energy = a_energy + torch.einsum("jrn,tn->rtj", theta, xt).pow(2).mean(dim=(1, 2))
        b_energy = b_energy + torch.einsum("rdn,tn->rtd", basis, xb).pow(2).mean(dim=(1, 2))
    balance = (b_energy / a_energy.clamp_min(1e-300)).pow(0.25)
    theta, basis = theta * balance[None, :, None], basis / balance[:, None, None]

    heads = group_indicator(num_groups, num_heads, x.device).argmax(dim=0)  # group of each head
    per_head = theta[heads]  # (h, R, d+1)
    dtype = init.basis_weight.dtype
    basis = basis.reshape(rank * head_dim, -1)
    return (
        ContextualInit(
            per_head[:, :, -1].T.contiguous().to(dtype),
            per_head[:, :, :-1].transpose(0, 1).reshape(rank * num_heads, -1).to(dtype),
            (basis[:, :-1] if bias is not None else basis).contiguous().to(dtype),
            basis[:, -1].contiguous().to(dtype) if bias is not None else None,
        ),
        errors,
    )
