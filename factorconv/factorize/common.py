"""Small linear-algebra helpers shared by the factorizations."""

import torch


def with_bias_column(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b]: a bias is a weight on a constant-1 input channel, so one factorization covers both."""
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def split_bias_column(augmented: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not has_bias:
        return augmented.contiguous(), None
    return augmented[:, :-1].contiguous(), augmented[:, -1].contiguous()


def input_moment(
    in_features: int, has_bias: bool, moment: torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """E[x̃x̃ᵀ] over inputs x̃ = [x; 1] (just E[xxᵀ] without a bias); the identity when weight-only.

    `moment` may be given with the constant channel (d+1 square) and is cut to what the projection reads.
    """
    size = in_features + int(has_bias)
    if moment is None:
        return torch.eye(size, dtype=torch.float64, device=device)
    if moment.shape[0] not in (in_features, in_features + 1) or moment.shape[0] < size:
        raise ValueError(f"input moment must be {size}x{size}, got {tuple(moment.shape)}")
    return moment[:size, :size].to(device=device, dtype=torch.float64)


def psd_sqrt_and_inverse(matrix: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """M^{1/2} and M^{-1/2} of a symmetric PSD matrix, eigenvalues floored relative to the largest."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(values.max().clamp_min(1e-300) * floor)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def top_eigenvectors(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and the `count` leading eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    order = values.argsort(descending=True)
    return values[order].clamp_min(0), vectors[:, order[:count]]


def cholesky_whitening(moment: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower-triangular L with LLᵀ = Σ + λI (λ relative to Σ's mean diagonal, so rank-deficient Σ works)."""
    moment = moment.double()
    eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    return torch.linalg.cholesky(moment + damping * moment.diagonal().mean().clamp_min(1e-300) * eye)
