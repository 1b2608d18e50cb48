"""MvMM: groupwise registration by a multivariate mixture model with an atlas label prior.

Zhuang (TPAMI 2019) models the intensity vector of the group at a common-space point x as a
mixture over the K tissue classes, p(u_x) = sum_k pi_k(x) prod_j f_jk(u_xj), with the class
probabilities pi_k(x) of an atlas label map in that space, and registers each image j into the
atlas space by maximising the log-likelihood: EM on the appearance, gradient steps on the maps.

On the X-CoReg machinery this is Eq. (23) with the spatial prior of Eq. (40) in place of the
global proportions pi: :func:`dcc.similarity.functional.posterior` takes ``log pi_k(x)``
``(M, K)``. The appearance f_jk is the class-conditional pmf of Eq. (20) (X-CoReg's histogram
model, cubic B-spline Parzen window; MvMM's Gaussians would be one more parametric form). Each
Adam step is one generalised-EM step on the coordinate sample:

* E-step (Eq. 12 with the atlas prior): gamma from the previous appearance (from the prior at
  the first step);
* M-step (Eq. 20): f_jk from gamma;
* gradient step (Eq. 16) on ``-(1/|S|) sum_x log p(u_x) + lambda R`` with f fixed.

The common space is the atlas's, so the maps are not made zero-mean (Eq. 37): the atlas anchors
the frame. The paper's MvMM settings in the DCC comparison are the defaults: one FFD level of
40 voxels, lambda = 0.001 (bending energy in control-point index units, as X-CoReg), 400 Adam
steps of 0.1 (mm here, the unit of the FFD coefficients).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy import ndimage

from dcc.coreg.engine import coordinate_sample, padding_mask, warp_group
from dcc.similarity import functional as XF
from dcc.spatial.fields import points_to_displacement
from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import ComposedTransform, MultiLevelFFD


@dataclass
class MvMMConfig:
    """Settings of :func:`register_mvmm` (defaults: the paper's MvMM set-up)."""

    iterations: int = 400
    lr: float = 0.1  # Adam step, mm (FFD coefficients)
    ffd_spacing: float = 40.0  # control-point spacing in voxels of the common grid
    bending_weight: float = 0.001  # lambda, control-point index units
    bins: int = 32  # L of the appearance pmfs (as the cardiac2d preset)
    sample_rate: float = 1.0  # fraction of the overlap in each step's coordinate sample
    prior_sigma: float = 1.0  # Gaussian smoothing of the atlas' one-hot classes, voxels
    prior_floor: float = 0.01  # mass spread evenly over the K classes: no class is impossible
    mask_zero_fill: bool = True  # zero-filled borders are outside the field of view
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.iterations < 0:
            raise ValueError(f"MvMM: iterations must be >= 0, got {self.iterations}")
        if self.lr <= 0 or self.ffd_spacing <= 0 or self.bending_weight < 0:
            raise ValueError("MvMM: lr and ffd_spacing must be positive, bending_weight >= 0")
        if not 0 < self.sample_rate <= 1 or not 0 < self.prior_floor < 1:
            raise ValueError("MvMM: sample_rate must be in (0, 1] and prior_floor in (0, 1)")
        if self.bins < 8 or self.prior_sigma < 0:
            raise ValueError("MvMM: bins must be >= 8 and prior_sigma >= 0")


@dataclass
class MvMMResult:
    displacement: torch.Tensor  # (N, ndim, *S) voxel units, channel 0 along x; phi_j = id + u_j
    transform: ComposedTransform  # phi_j in world coordinates (mm) on ``grid``
    grid: Grid
    log_likelihood: list[float]  # per step, mean over the coordinate sample (Eq. 23)
    log_likelihood_before: float  # mean over the overlap, EM-converged appearance, start
    log_likelihood_after: float  # the same at the end
    posterior: torch.Tensor  # (K, *S) gamma at the end
    seconds: float


def atlas_log_prior(
    labels: torch.Tensor, num_classes: int, sigma: float = 1.0, floor: float = 0.01
) -> torch.Tensor:
    """log pi_k(x) ``(M, K)`` from an atlas label map ``(*S)`` (values 0..K-1): one-hot classes
    smoothed by a Gaussian of ``sigma`` voxels, with ``floor`` of the mass spread evenly."""
    onehot = torch.nn.functional.one_hot(labels.long().cpu(), num_classes).double().numpy()
    if sigma > 0:
        spatial = tuple([sigma] * labels.dim() + [0])
        onehot = ndimage.gaussian_filter(onehot, sigma=spatial, mode="nearest")
    prob = torch.from_numpy(onehot).float().reshape(-1, num_classes)
    prob = prob / prob.sum(-1, keepdim=True).clamp_min(XF.EPS)
    return torch.log((1 - floor) * prob + floor / num_classes)


def _em(values, log_prior, bins, steps=10):
    """``steps`` EM steps (Eqs. 20, 12) at fixed maps from gamma = the atlas prior; the mean
    log-likelihood (Eq. 23) and log gamma of the last E-step."""
    gamma = log_prior.exp()
    for _ in range(steps):
        log_f = XF.appearance_model(values, gamma, bins)
        log_gamma, evidence = XF.posterior(values, log_f, log_prior)
        gamma = log_gamma.exp()
    return evidence.mean().item(), log_gamma


def register_mvmm(
    images: torch.Tensor,
    atlas_labels: torch.Tensor,
    spacing: Sequence[float] | None = None,
    num_classes: int | None = None,
    config: MvMMConfig | None = None,
    valid: torch.Tensor | None = None,
) -> MvMMResult:
    """Register a group ``images`` ``(N, *S)`` to the space of ``atlas_labels`` ``(*S)`` (same
    lattice) with MvMM (module docstring).

    ``spacing`` is the voxel size in mm ``(x, y[, z])`` (1 mm when ``None``), ``num_classes``
    K (default: the atlas' largest label + 1), ``valid`` ``(N, *S)`` each image's field of view.
    Returns the maps as displacement fields in voxel units (``result.displacement``).
    """
    cfg = config or MvMMConfig()
    start = time.perf_counter()
    n, shape = images.shape[0], tuple(images.shape[1:])
    if images.dim() < 3 or tuple(atlas_labels.shape) != shape:
        raise ValueError(
            f"register_mvmm: expected images (N, *S) and atlas labels (*S) on the same lattice, "
            f"got {tuple(images.shape)} and {tuple(atlas_labels.shape)}"
        )
    if valid is not None and valid.shape != images.shape:
        raise ValueError(f"register_mvmm: valid must be {tuple(images.shape)}, got {valid.shape}")
    ndim = len(shape)
    spacing = [1.0] * ndim if spacing is None else [float(s) for s in spacing]
    if len(spacing) != ndim:
        raise ValueError(f"register_mvmm: spacing {spacing} needs {ndim} entries (x, y[, z])")
    k = int(atlas_labels.max()) + 1 if num_classes is None else num_classes
    if atlas_labels.min() < 0 or atlas_labels.max() >= k:
        raise ValueError(f"register_mvmm: atlas labels must be in 0..{k - 1}")
    device = torch.device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)  # CPU draws: the same on every device
    grid = Grid.from_shape(shape, spacing)
    valid = torch.ones_like(images, dtype=torch.float32) if valid is None else valid.float()
    if cfg.mask_zero_fill:
        valid = valid * ~padding_mask(images)
    stacked = torch.stack([XF.normalize_intensities(images, cfg.bins, valid), valid], 1).to(device)
    log_prior = atlas_log_prior(atlas_labels, k, cfg.prior_sigma, cfg.prior_floor).to(device)
    control = tuple(cfg.ffd_spacing * s for s in spacing)
    ffd = MultiLevelFFD(n, grid, control).to(device)
    transform = ComposedTransform(n, ndim, [ffd])
    optimizer = torch.optim.Adam(ffd.parameter_groups(cfg.lr))
    intensities = stacked[:, :1]

    @torch.no_grad()
    def assess():
        """Mean log-likelihood and gamma ``(M, K)`` on the overlap (the prior elsewhere)."""
        _, values, overlap = warp_group(transform, stacked, grid)
        loglik, log_gamma = _em(values[:, overlap], log_prior[overlap], cfg.bins)
        out = log_prior.clone()
        out[overlap] = log_gamma
        return loglik, out

    before, _ = assess()
    trace, log_f = [], None
    for _ in range(cfg.iterations):
        normalized, values, overlap = warp_group(transform, stacked, grid)
        idx = coordinate_sample(overlap, cfg.sample_rate, generator)
        if idx.numel() == 0:
            raise RuntimeError("MvMM: the images no longer overlap; lower the step size (lr)")
        with torch.no_grad():  # E-step (Eq. 12, atlas prior), M-step (Eq. 20)
            prior = log_prior[idx]
            log_gamma = prior if log_f is None else XF.posterior(values[:, idx], log_f, prior)[0]
            log_f = XF.appearance_model(values[:, idx], log_gamma.exp(), cfg.bins)
        warped = sample(intensities, normalized[:, idx])[:, 0]  # (N, m) with gradient
        loglik = XF.posterior(warped, log_f, log_prior[idx])[1].mean()
        loss = -loglik + cfg.bending_weight * ffd.regularization()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trace.append(loglik.item())
    after, log_gamma = assess()
    with torch.no_grad():
        displacement = points_to_displacement(transform.lattice(grid), grid).cpu()
    return MvMMResult(
        displacement,
        transform,
        grid,
        trace,
        before,
        after,
        log_gamma.exp().T.reshape(k, *shape).cpu(),
        time.perf_counter() - start,
    )
