"""The X-metric and the common-space update of X-CoReg as stateless functions (paper, Sec. 3.2).

Intensities are given in *bin units*: a value ``u`` in ``[1, L - 2]`` for ``L`` intensity levels
(see :func:`normalize_intensities`), so that the cubic B-spline Parzen window beta_3 centred on
the levels ``mu = 0 ... L-1`` is a partition of unity over the four levels it touches.
Posteriors are ``(M, K)`` (shared by the group) or ``(N, M, K)`` (one per image).
All probabilities that multiply are combined in log space.
"""

from __future__ import annotations

import torch

from dcc.spatial.functional import cubic_bspline_weights, reduce

EPS = 1e-10


def normalize_intensities(
    images: torch.Tensor,
    bins: int,
    mask: torch.Tensor | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> torch.Tensor:
    """Map each image ``(N, *shape)`` linearly to bin units ``[1, bins - 2]``.

    The range is given by robust ``percentiles`` of the voxels in ``mask`` (all voxels if
    ``None``); values outside it are clipped.
    """
    if bins < 4:
        raise ValueError(f"normalize_intensities: need at least 4 bins, got {bins}")
    flat = images.reshape(images.shape[0], -1).float()
    valid = None if mask is None else mask.reshape(images.shape[0], -1) > 0.5
    out = torch.empty_like(flat)
    for j in range(flat.shape[0]):
        vals = flat[j] if valid is None else flat[j][valid[j]]
        if vals.numel() == 0:
            raise ValueError(f"normalize_intensities: image {j} has no voxel inside its mask")
        q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], device=vals.device)
        lo, hi = torch.quantile(vals[:: max(1, vals.numel() // 1_000_000)], q).tolist()
        if hi - lo <= 0:
            lo, hi = vals.min().item(), vals.max().item()
        scale = (bins - 3) / max(hi - lo, EPS)
        out[j] = ((flat[j] - lo) * scale).clamp(0, bins - 3) + 1
    return out.reshape(images.shape)


def parzen_window(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(..., 4)`` of the levels touched by beta_3 around ``values`` and their weights.

    The weights sum to one (partition of unity) and are differentiable in ``values``.
    """
    values = values.clamp(1, bins - 2)
    base = torch.floor(values.detach())
    weights = cubic_bspline_weights(values - base)
    offsets = torch.arange(-1, 3, device=values.device)
    index = (base.long().unsqueeze(-1) + offsets).clamp(0, bins - 1)
    return index, weights


def joint_histogram(
    values: torch.Tensor, posterior: torch.Tensor, bins: int, normalize: bool = True
) -> torch.Tensor:
    """Parzen estimate of p_j(mu, k) (Eq. 21), shape ``(N, L, K)``.

    ``values`` ``(N, M)`` in bin units, ``posterior`` ``(M, K)`` or ``(N, M, K)``. Each point adds
    ``beta_3(u - mu) * gamma_k`` to the four levels ``mu`` it touches (one ``index_add`` of
    ``K``-vectors per point and level).
    """
    n, m = values.shape
    k = posterior.shape[-1]
    if posterior.shape[-2] != m:
        raise ValueError(
            f"joint_histogram: posterior must be (M, K) or (N, M, K) with M={m}, got "
            f"{tuple(posterior.shape)}"
        )
    index, weights = parzen_window(values, bins)  # (N, M, 4)
    src = weights.unsqueeze(-1) * posterior.to(weights.dtype).unsqueeze(-2)  # (N, M, 4, K)
    rows = (index + bins * torch.arange(n, device=index.device).view(n, 1, 1)).reshape(-1)
    hist = weights.new_zeros(n * bins, k).index_add(0, rows, src.reshape(-1, k))
    hist = hist.view(n, bins, k)
    if normalize:
        hist = hist / hist.sum((1, 2), keepdim=True).clamp_min(EPS)
    return hist


def mutual_information(joint: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """I(U_j; Z) from normalised joint pmfs ``(N, L, K)`` (Eq. 17), in nats, shape ``(N,)``."""
    p_mu = joint.sum(2)
    p_k = joint.sum(1)

    def plogp(p, dims):
        return (p * torch.log(p.clamp_min(eps))).sum(dims)

    return plogp(joint, (1, 2)) - plogp(p_mu, 1) - plogp(p_k, 1)


def x_metric(
    values: torch.Tensor,
    posterior: torch.Tensor,
    bins: int,
    reduction: str = "sum",
    eps: float = EPS,
) -> torch.Tensor:
    """The X-metric sum_j I(U_j o phi_j; Z) (Eq. 8 with Eqs. 17-21).

    ``values`` ``(N, M)``: warped intensities at the coordinate sample, in bin units;
    ``posterior`` ``(M, K)`` or ``(N, M, K)``: gamma at the same points. ``reduction="none"``
    returns the ``N`` mutual informations.
    """
    return reduce(mutual_information(joint_histogram(values, posterior, bins), eps), reduction)


def appearance_model(
    values: torch.Tensor, posterior: torch.Tensor, bins: int, eps: float = EPS
) -> torch.Tensor:
    """log f_jk(mu), the class-conditional intensity pmfs of Eq. (20), shape ``(N, L, K)``.

    With one-hot label maps as ``posterior`` this is the ground-truth model of Eq. (48).
    """
    hist = joint_histogram(values, posterior, bins, normalize=False)
    return torch.log(hist.clamp_min(eps)) - torch.log(hist.sum(1, keepdim=True).clamp_min(eps))


# Coefficients of the four beta_3 weights of cubic_bspline_weights (offsets -1..2, rows) as
# polynomials in the fractional part t (columns: 1, t, t^2, t^3).
_BSPLINE_BASIS = (
    (1 / 6, -1 / 2, 1 / 2, -1 / 6),
    (2 / 3, 0.0, -1.0, 1 / 2),
    (1 / 6, 1 / 2, 1 / 2, -1 / 2),
    (0.0, 0.0, 0.0, 1 / 6),
)


def log_appearance(values: torch.Tensor, log_f: torch.Tensor) -> torch.Tensor:
    """log f_jk at continuous intensities, ``(N, M, K)``.

    The level of ``u`` is read with the same beta_3 weights as the estimate, in log space:
    ``log f_jk(u) = sum_mu beta_3(u - mu) log f_jk(mu)``. With this reading, Eq. (20) is the exact
    M-step of the E-step in Eq. (12), so the update never lowers Eq. (23).

    On each unit interval the sum is a cubic in the fractional part of ``u``; its coefficients
    are tabulated per level (``(N, L, 4, K)``), so every point costs one table row and a Horner
    evaluation instead of four weights and four look-ups.
    """
    n, m = values.shape
    bins, k = log_f.shape[1:]
    values = values.clamp(1, bins - 2)
    base = torch.floor(values)
    t = (values - base).unsqueeze(-1)
    levels = torch.arange(bins, device=log_f.device)
    neighbours = torch.stack(
        [log_f[:, (levels + o).clamp(0, bins - 1)] for o in range(-1, 3)], 2
    )  # (N, L, 4 offsets, K)
    basis = torch.tensor(_BSPLINE_BASIS, dtype=log_f.dtype, device=log_f.device)
    table = torch.einsum("nlok,op->nlpk", neighbours, basis).reshape(n * bins, 4 * k)
    rows = base.long() + bins * torch.arange(n, device=values.device).unsqueeze(1)
    c = torch.nn.functional.embedding(rows, table).view(n, m, 4, k)
    return ((c[:, :, 3] * t + c[:, :, 2]) * t + c[:, :, 1]) * t + c[:, :, 0]


def posterior(
    values: torch.Tensor, log_f: torch.Tensor, log_prior: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior gamma of the common anatomy (Eq. 12) in log space.

    Returns ``log_gamma`` ``(M, K)`` and the per-point log-likelihood ``(M,)``, the summand of
    Eq. (23). ``log_prior`` is ``log pi`` ``(K,)`` or a spatial prior ``(M, K)`` (Eq. 40).
    """
    joint = log_appearance(values, log_f).sum(0) + log_prior
    peak = joint.amax(-1, keepdim=True)  # log-sum-exp over the K classes
    log_evidence = peak + (joint - peak).exp().sum(-1, keepdim=True).log()
    return joint - log_evidence, log_evidence.squeeze(-1)


def log_likelihood(
    values: torch.Tensor, log_f: torch.Tensor, log_prior: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Eq. (23): sum over points of log sum_k pi_k prod_j f_jk(u_xj)."""
    return reduce(posterior(values, log_f, log_prior)[1], reduction)


def proportions(gamma: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """pi_k of Eq. (14): gamma ``(M, K)`` over the overlap region, normalised."""
    pi = gamma.sum(0)
    return pi / pi.sum().clamp_min(eps)


def random_posterior(
    num_points: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """gamma^[0] of Eq. (22): softmax of standard normal logits, ``(M, K)``."""
    logits = torch.randn(num_points, num_classes, generator=generator, device=device)
    return torch.softmax(logits, dim=-1)


def entropy(p: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim)
