"""The competing groupwise metrics of the paper's experiments (Sec. 4) as stateless functions.

Every function takes the warped intensities of the ``N`` images at ``m`` sampled points,
``values`` ``(N, m)``, and is differentiable in them. The histogram-based metrics (CTE, APE)
take them in *bin units* ``[1, L - 2]`` (as :mod:`dcc.similarity.functional`) and use the same
cubic B-spline Parzen window; the others take them in *unit* intensities ``[0, 1]``
(:func:`unit_intensities`: the bin range mapped linearly), so that a kernel width such as the
congealing ``sigma`` has a fixed meaning whatever ``L``.

* :func:`variance_of_intensities` (VI, Metz et al. 2011): mean over points of the variance of
  the ``N`` intensities; monomodal groups. O(N m).
* :func:`congealing_entropy` (CG, Learned-Miller 2006; Balci et al. 2007): mean over points of
  the leave-one-out Parzen (Gaussian) entropy of the ``N`` intensities. O(N^2 m); needs
  ``N >= 3`` to mean anything (with two images it is the squared difference).
* :func:`accumulated_pairwise_mi` (APE, Wachinger & Navab 2012): sum of the mutual information
  of all ``N (N - 1) / 2`` pairs. O(N^2 m L^2) (dense, as one matrix product).
* :func:`conditional_template_entropy` (CTE, Polfliet et al. 2018): sum over images of
  H(U_j | T) for the template T, the first principal component of the z-scored images.
  O(N m L^2 + N^3).
* :func:`gmm_log_likelihood` with :func:`gmm_init` / :func:`gmm_em_step` (GMM, Orchard & Mann
  2010): a K-component multivariate Gaussian mixture over the N-vectors of intensities,
  full covariances. O(K N^2 m + K N^3).

The metrics that are minimised (VI, CG, CTE) are returned as such; the objects of
:mod:`dcc.similarity.modules` turn each into a value to maximise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dcc.similarity.functional import EPS, entropy, mutual_information, parzen_window
from dcc.spatial.functional import full_precision

# ridge added to every GMM covariance, in unit intensities squared (a std of 0.01)
GMM_RIDGE = 1e-4


def unit_intensities(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin units ``[1, L - 2]`` (:func:`~dcc.similarity.functional.to_bins`) mapped to
    ``[0, 1]``."""
    return (values - 1) / (bins - 3)


def parzen_weights(values: torch.Tensor, bins: int) -> torch.Tensor:
    """The cubic B-spline Parzen weights of every value on the ``L`` levels, dense:
    ``(*values.shape, L)``, each row summing to one; differentiable in ``values``."""
    index, weights = parzen_window(values, bins)
    return weights.new_zeros(*values.shape, bins).scatter_add(-1, index, weights)


@full_precision
def variance_of_intensities(values: torch.Tensor) -> torch.Tensor:
    """VI: the variance of the ``N`` intensities at each point (``1/N``, as ``numpy.var``),
    averaged over the ``m`` points of ``values`` ``(N, m)`` (unit intensities). Minimise."""
    return values.var(0, unbiased=False).mean()


@full_precision
def congealing_entropy(values: torch.Tensor, sigma: float = 0.05) -> torch.Tensor:
    """CG: the entropy of the ``N`` intensities at each point by the leave-one-out Parzen
    estimate with a Gaussian kernel of width ``sigma`` (Balci et al. 2007),

        H(x) = -1/N sum_i log( 1/(N-1) sum_{j != i} G_sigma(u_i(x) - u_j(x)) ),

    averaged over the ``m`` points of ``values`` ``(N, m)`` (unit intensities). Minimise."""
    n = values.shape[0]
    if n < 2:
        raise ValueError(f"congealing_entropy: needs at least 2 images, got {n}")
    diff = values.unsqueeze(0) - values.unsqueeze(1)  # (N, N, m)
    log_kernel = -0.5 * (diff / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
    self_pairs = torch.eye(n, dtype=torch.bool, device=values.device).unsqueeze(-1)
    log_kernel = log_kernel.masked_fill(self_pairs, float("-inf"))
    log_density = log_kernel.logsumexp(1) - math.log(n - 1)  # (N, m): leave-one-out
    return -log_density.mean(0).mean()


@full_precision
def pairwise_joint_histograms(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Normalised Parzen joint pmfs of every pair ``i < j`` of the images, ``(P, L, L)``
    (``P = N (N - 1) / 2``, rows ``U_i``, columns ``U_j``) from ``values`` ``(N, m)`` in bin
    units: ``p_ij(a, b) = 1/m sum_x beta_3(u_i(x) - a) beta_3(u_j(x) - b)``."""
    n, m = values.shape
    # all pairs (and each image with itself) in one (N L) x (N L) matrix product of the dense
    # Parzen weights: no per-pair copies of the weights (a batched product over the pairs
    # gathered P x m x L floats, 0.9 GB for N = 30 and m = 8192) and faster on a CPU
    flat = parzen_weights(values, bins).permute(1, 0, 2).reshape(m, n * bins)
    joint = (flat.T @ flat / m).view(n, bins, n, bins)
    first, second = torch.triu_indices(n, n, 1, device=values.device)
    return joint[first, :, second, :]


@full_precision
def accumulated_pairwise_mi(values: torch.Tensor, bins: int) -> torch.Tensor:
    """APE: the sum over all pairs ``i < j`` of I(U_i; U_j) (nats) from the Parzen joint pmfs
    of :func:`pairwise_joint_histograms`. Maximise."""
    return mutual_information(pairwise_joint_histograms(values, bins)).sum()


@full_precision
def principal_template(values: torch.Tensor) -> torch.Tensor:
    """The CTE template ``(m,)``: the scores of the first principal component of the points'
    intensity vectors, with each image of ``values`` ``(N, m)`` z-scored over the points (so
    the vectors are centred). The component's sign is chosen so that its loadings sum to a
    non-negative number (the template is bright where the images are)."""
    spread = values.std(1, unbiased=False, keepdim=True).clamp_min(EPS)
    z = (values - values.mean(1, keepdim=True)) / spread
    covariance = z @ z.T / z.shape[1]  # (N, N)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    loading = vectors[:, -1]
    sign = torch.where(loading.sum() < 0, -1.0, 1.0).to(loading.dtype)
    return (sign * loading) @ z


@full_precision
def conditional_template_entropy(
    values: torch.Tensor, bins: int, reduction: str = "sum"
) -> torch.Tensor:
    """CTE: sum over the images of H(U_j | T) = H(U_j, T) - H(T) (nats) for the template T of
    :func:`principal_template`, mapped linearly onto the bin range ``[1, L - 2]`` over the
    sample; Parzen joint pmfs of ``values`` ``(N, m)`` (bin units) and T. Minimise.
    ``reduction="none"``: the ``N`` terms."""
    template = principal_template(values)
    low, high = template.min(), template.max()
    template = 1 + (bins - 3) * (template - low) / (high - low).clamp_min(EPS)
    w_u = parzen_weights(values, bins)  # (N, m, L)
    w_t = parzen_weights(template, bins)  # (m, L)
    joint = torch.einsum("nma,mb->nab", w_u, w_t) / values.shape[1]  # (N, L_u, L_t)
    terms = entropy(joint.flatten(1)) - entropy(joint.sum(1))
    return terms.sum() if reduction == "sum" else terms


@dataclass
class GMMState:
    """Parameters of a K-component Gaussian mixture over N-vectors (unit intensities)."""

    log_weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, N)
    covariances: torch.Tensor  # (K, N, N)


def _ridge(n: int, like: torch.Tensor, ridge: float) -> torch.Tensor:
    return ridge * torch.eye(n, dtype=like.dtype, device=like.device)


@torch.no_grad()
def gmm_init(values: torch.Tensor, k: int, ridge: float = GMM_RIDGE) -> GMMState:
    """A start that separates the components, deterministic: the points of ``values``
    ``(N, m)`` sorted by their mean intensity over the images and cut into ``k`` bands of equal
    size (the quantiles of the mean intensity); the means are the bands' mean vectors, every
    covariance the whole sample's (plus ``ridge``), the weights equal."""
    n, m = values.shape
    x = values.T
    order = x.mean(1).argsort()
    bands = torch.tensor_split(order, k)
    means = torch.stack([x[b].mean(0) if b.numel() else x.mean(0) for b in bands])
    centred = x - x.mean(0)
    covariance = centred.T @ centred / max(m, 1) + _ridge(n, x, ridge)
    return GMMState(
        torch.full((k,), -math.log(k), dtype=x.dtype, device=x.device),
        means,
        covariance.expand(k, n, n).clone(),
    )


@full_precision
def gmm_component_log_densities(values: torch.Tensor, state: GMMState) -> torch.Tensor:
    """log w_k + log N(u(x); mu_k, Sigma_k) ``(m, K)`` for ``values`` ``(N, m)``
    (differentiable in ``values``; Cholesky factors of the covariances)."""
    n = values.shape[0]
    chol = torch.linalg.cholesky(state.covariances)  # (K, N, N)
    diff = values.T.unsqueeze(0) - state.means.unsqueeze(1)  # (K, m, N)
    z = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # (K, N, m)
    mahalanobis = (z * z).sum(1)  # (K, m)
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (K,)
    log_normal = -0.5 * (mahalanobis + n * math.log(2 * math.pi) + log_det.unsqueeze(1))
    return (log_normal + state.log_weights.unsqueeze(1)).T


def gmm_log_likelihood(values: torch.Tensor, state: GMMState) -> torch.Tensor:
    """GMM: the mixture's log-likelihood per point, averaged over the points of ``values``
    ``(N, m)``; differentiable in ``values`` (the parameters are constants). Maximise."""
    return gmm_component_log_densities(values, state).logsumexp(1).mean()


@torch.no_grad()
def gmm_em_step(values: torch.Tensor, state: GMMState, ridge: float = GMM_RIDGE) -> GMMState:
    """One EM step of the mixture on ``values`` ``(N, m)``: responsibilities in log space (E),
    then the closed-form weights, means and covariances (M; ``ridge`` on the diagonal; a
    component without mass keeps its mean and covariance)."""
    n, m = values.shape
    x = values.T  # (m, N)
    log_joint = gmm_component_log_densities(values, state)
    resp = (log_joint - log_joint.logsumexp(1, keepdim=True)).exp()  # (m, K)
    mass = resp.sum(0)  # (K,)
    empty = mass < 1e-6
    safe = mass.clamp_min(1e-6)
    means = (resp.T @ x) / safe.unsqueeze(1)
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, m, N)
    covariances = torch.einsum("mk,kma,kmb->kab", resp, diff, diff) / safe.view(-1, 1, 1)
    covariances = covariances + _ridge(n, x, ridge)
    means = torch.where(empty.unsqueeze(1), state.means, means)
    covariances = torch.where(empty.view(-1, 1, 1), state.covariances, covariances)
    log_weights = torch.log((mass / m).clamp_min(EPS))
    return GMMState(log_weights - log_weights.logsumexp(0), means, covariances)
