"""The deep combined computing losses of Sec. 3.5 (Eqs. 38-47) as stateless functions.

Layouts: a batch holds ``B`` groups of ``N`` images of spatial shape ``S``; images and bin-unit
intensities are ``(B, N, *S)``, probability maps ``(B, N, K, *S)``, the common-space posterior
``(B, K, *S)``, displacement fields ``(B, N, ndim, *S)`` in voxel units
(:mod:`dcc.spatial.fields`). Every loss returns per-member terms ``(B, N)`` for
``reduction="none"``; ``"sum"`` adds them over the group and the batch (the sums over ``j`` of
Eqs. 41-45), ``"mean"`` averages them.

The X-metric, appearance models, posterior and proportions are those of
:mod:`dcc.similarity.functional` (batched); they run in float32 under autocast.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from dcc.similarity import functional as XF
from dcc.spatial.fields import bending_energy_dense
from dcc.spatial.functional import full_precision, reduce

EPS = XF.EPS

# Slope of Eq. (38) per unit of ``spacing`` (mm, or voxels without spacing). The clipped maps
# (zeta = 0.05) saturate where a class's probability falls below zeta, i.e. where
# |tau (D_k - D_l)| > log((1 - zeta) / zeta) ~ 2.9 on a contour between classes k and l; since
# D_k - D_l ~ 2 s at signed distance s from the contour, they vary over the band |s| < 1.5 / tau:
# 3 units wide for tau = 1. Wide enough that the warped maps give phi a gradient a voxel or two
# away from each contour (L2, Eq. 40), narrow enough that a 3-4 voxel thick myocardium keeps
# its own class as the clear maximum at its centre.
DEFAULT_TAU = 1.0


def distance_probabilities(
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    tau: float = DEFAULT_TAU,
    spacing: tuple[float, ...] | None = None,
) -> np.ndarray | torch.Tensor:
    """rho_jk of Eq. (38): softmax over classes of ``tau * D_jk``, ``(N, *S)`` -> ``(N, K, *S)``.

    ``D_jk`` is the signed Euclidean distance to the contour of class k in label map j, positive
    inside (SciPy EDT; +1 on the first voxel inside, -1 on the first outside), in the units of
    ``spacing`` (``(x, y[, z])`` order, mm) or voxels. A class absent from a map gets ``-diag``
    (the image diagonal), a class filling it ``+diag``. Works on CPU NumPy arrays or tensors of
    integer class indices (returns the same kind, float32); meant as a cached data transform.
    """
    is_tensor = isinstance(labels, torch.Tensor)
    array = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if array.ndim not in (3, 4) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "distance_probabilities: expected integer label maps of shape (N, H, W) or "
            f"(N, D, H, W), got {array.dtype} {array.shape}"
        )
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"distance_probabilities: labels must lie in 0..{num_classes - 1}, got "
            f"{array.min()}..{array.max()}"
        )
    ndim = array.ndim - 1
    sampling = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)[::-1]
    if len(sampling) != ndim:
        raise ValueError(
            f"distance_probabilities: spacing needs {ndim} entries (x, y[, z]), got {spacing}"
        )
    diag = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(array.shape[1:], sampling, strict=True))))
    dist = np.empty((array.shape[0], num_classes, *array.shape[1:]), dtype=np.float64)
    for j in range(array.shape[0]):
        for k in range(num_classes):
            mask = array[j] == k
            if not mask.any() or mask.all():
                dist[j, k] = diag if mask.all() else -diag
                continue
            inside = ndimage.distance_transform_edt(mask, sampling=sampling)
            outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
            dist[j, k] = inside - outside
    logits = tau * dist
    logits -= logits.max(1, keepdims=True)
    prob = np.exp(logits)
    prob = (prob / prob.sum(1, keepdims=True)).astype(np.float32)
    return torch.from_numpy(prob) if is_tensor else prob


def clip_probabilities(
    p: torch.Tensor, zeta: float, dim: int = 2, eps: float = EPS
) -> torch.Tensor:
    """Clip probability vectors into ``[zeta, 1 - (K - 1) zeta]`` along ``dim``, renormalised.

    Entries below ``zeta`` are raised to ``zeta`` and the mass this takes is removed from the
    others in proportion to their excess over ``zeta``:
    ``q_k = zeta + (1 - K zeta) (p_k - zeta)_+ / sum_l (p_l - zeta)_+``. The result sums to one,
    meets both bounds exactly (Sec. 4.4.1) and equals ``p`` where ``p`` already does.
    """
    k = p.shape[dim]
    if not 0 <= zeta < 1 / k:
        raise ValueError(f"clip_probabilities: need 0 <= zeta < 1/K = {1 / k:.4f}, got {zeta}")
    excess = (p - zeta).clamp_min(0)
    return zeta + (1 - k * zeta) * excess / excess.sum(dim, keepdim=True).clamp_min(eps)


def member_probabilities(
    rho: torch.Tensor, seg_probs: torch.Tensor, labelled: torch.Tensor
) -> torch.Tensor:
    """The probability maps of each member, ``(B, N, K, *S)``: rho_j (from the labels, detached)
    for labelled members ``j in J`` and the prediction rho-hat_j for the others (Eqs. 39-44).

    ``labelled`` is ``(B, N)`` bool. Gradients reach ``seg_probs`` only for unlabelled members.
    """
    select = labelled.view(*labelled.shape, *([1] * (seg_probs.dim() - 2)))
    return torch.where(select, rho.detach(), seg_probs)


def _flat(x: torch.Tensor, lead: int) -> torch.Tensor:
    """``(*lead dims, K, *S)`` -> ``(*lead dims, M, K)``."""
    return x.flatten(lead + 1).transpose(-1, -2)


@full_precision
@torch.no_grad()
def common_space_posterior(
    values: torch.Tensor,
    warped_values: torch.Tensor,
    probs: torch.Tensor,
    log_spatial_prior: torch.Tensor,
    mask: torch.Tensor,
    bins: int,
    steps: int = 2,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma^[steps] and log pi^[steps] of the common anatomy (Eqs. 39, 40, 12, 14, 20).

    ``values`` ``(B, N, *S)``: the images in bin units in their own space; ``probs``
    ``(B, N, K, *S)``: their (clipped) probability maps rho_j / rho-hat_j, which give the initial
    appearance models f^[0] (Eq. 39); ``warped_values`` ``(B, N, *S)``: U_j o phi_j in bin units;
    ``log_spatial_prior`` ``(B, K, *S)``: sum over labelled members of log rho_j(phi_j(x))
    (Eq. 40; zeros for none); ``mask`` ``(B, *S)``: the overlap region Omega^phi. From
    pi^[0] = 1/K, each step computes the posterior (Eqs. 12, 40) with the current appearance
    models, pi^[t+1] over the overlap (Eq. 14) and, for the next step, f^[t+1] from the warped
    images and gamma^[t+1] (Eq. 20). Returns ``log_gamma`` ``(B, K, *S)``, ``log_pi`` ``(B, K)``.

    These are the E-step quantities: constants of the losses (no gradient, see ``DCCLoss``).
    """
    b, k = values.shape[0], probs.shape[2]
    spatial = values.shape[2:]
    values = values.flatten(2)
    warped = warped_values.flatten(2)
    inside = mask.flatten(1).unsqueeze(-1).to(values.dtype)  # (B, M, 1)
    prior = _flat(log_spatial_prior, 1)  # (B, M, K)
    log_f = XF.appearance_model(values, _flat(probs, 2), bins, eps)  # Eq. (39)
    log_pi = torch.full((b, k), -float(np.log(k)), device=values.device, dtype=values.dtype)
    for step in range(steps):
        log_gamma, _ = XF.posterior(warped, log_f, log_pi.unsqueeze(1) + prior)  # Eqs. (12), (40)
        gamma = log_gamma.exp() * inside
        log_pi = torch.log(XF.proportions(gamma, eps).clamp_min(eps))  # Eq. (14)
        if step + 1 < steps:
            log_f = XF.appearance_model(warped, gamma, bins, eps)  # Eq. (20)
    return log_gamma.transpose(1, 2).reshape(b, k, *spatial), log_pi


@full_precision
def registration_loss(
    warped_values: torch.Tensor,
    posterior: torch.Tensor,
    displacement: torch.Tensor,
    bins: int,
    bending_weight: float = 100.0,
    mask: torch.Tensor | None = None,
    reduction: str = "sum",
    eps: float = EPS,
    similarity_weight: float = 1.0,
) -> torch.Tensor:
    """L1 of Eq. (41): -I(U_j o phi_j, Z^[2]) + lambda R(phi_j) per member (summed: -X + lambda R).
    ``similarity_weight`` scales the mutual information (the paper: 1; 0 leaves the bending
    energy alone, e.g. to see what the labels' L2 term does by itself).

    ``warped_values`` ``(B, N, *S)`` in bin units (differentiable in phi), ``posterior``
    ``(B, K, *S)`` (gamma^[2], used as a constant), ``displacement`` ``(B, N, ndim, *S)`` for the
    dense bending energy R; ``mask`` ``(B, *S)`` restricts the Parzen estimates (Eq. 21) to the
    overlap region.
    """
    gamma = _flat(posterior, 1)
    if mask is not None:
        gamma = gamma * mask.flatten(1).unsqueeze(-1).to(gamma.dtype)
    mi = XF.x_metric(warped_values.flatten(2), gamma, bins, reduction="none", eps=eps)
    energy = bending_energy_dense(displacement, reduction="none")
    return reduce(-similarity_weight * mi + bending_weight * energy, reduction)


@full_precision
def hybrid_cross_entropy(
    posterior: torch.Tensor,
    warped_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "sum",
    eps: float = EPS,
) -> torch.Tensor:
    """L2 of Eqs. (42)-(44): -1/|Omega| sum_x sum_k gamma_xk^[2] log rho_jk(phi_j(x)) per member.

    ``posterior`` ``(B, K, *S)`` is gamma^[2]; ``warped_probs`` ``(B, N, K, *S)`` the warped maps
    of each member (rho_j for j in J, rho-hat_j otherwise; see :func:`member_probabilities`,
    which decides where gradients go). ``mask`` ``(B, *S)`` restricts the average to the overlap
    region (outside it the warped maps are zero-padded).
    """
    log_p = torch.log(warped_probs.clamp_min(eps))
    terms = -(posterior.unsqueeze(1) * log_p).sum(2).flatten(2)  # (B, N, M)
    if mask is None:
        return reduce(terms.mean(-1), reduction)
    weight = mask.flatten(1).unsqueeze(1).to(terms.dtype)
    per_member = (terms * weight).sum(-1) / weight.sum(-1).clamp_min(1)
    return reduce(per_member, reduction)


@full_precision
def segmentation_loss(
    values: torch.Tensor,
    seg_probs: torch.Tensor,
    labelled: torch.Tensor,
    labels: torch.Tensor | None,
    bins: int,
    reduction: str = "sum",
    include_background: bool = False,
    eps: float = EPS,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """L3 of Eqs. (45)-(46) per member: -I(U_j, Y-hat_j) + [H(Y-hat_j) if j not in J] +
    [CE(Y_j, Y-hat_j) + 1 - DSC(Y_j, Y-hat_j) if j in J].

    ``values`` ``(B, N, *S)``: the images in bin units in their own space; ``seg_probs``
    ``(B, N, K, *S)``: rho-hat; ``labelled`` ``(B, N)`` bool; ``labels`` ``(B, N, *S)`` class
    indices of the labelled members (``None``: no CE + Dice term, e.g. for the test-time
    posterior of Eq. 53, where the predictions stand in for the labels). I is the Parzen MI of
    the image with its own probability maps (Eqs. 17, 21), H the mean voxel entropy, CE the
    mean voxel cross entropy and DSC the soft Dice ``(2 sum p y + smooth) / (sum p + sum y +
    smooth)`` averaged over the classes (foreground only unless ``include_background``), as
    MONAI's ``DiceCELoss`` computes them (checked in the tests; not imported here, MONAI takes
    seconds to import).
    """
    mi = XF.x_metric(values.flatten(2), _flat(seg_probs, 2), bins, reduction="none", eps=eps)
    entropy = XF.entropy(seg_probs, dim=2, eps=eps).flatten(2).mean(-1)
    loss = -mi + torch.where(labelled, torch.zeros_like(entropy), entropy)
    if labels is not None and bool(labelled.any()):
        target = labels.long().unsqueeze(2)  # (B, N, 1, *S)
        ce = -torch.log(seg_probs.gather(2, target).clamp_min(eps)).flatten(2).mean(-1)
        onehot = torch.zeros_like(seg_probs).scatter_(2, target, 1.0)
        first = 0 if include_background else 1
        p, y = seg_probs[:, :, first:].flatten(3), onehot[:, :, first:].flatten(3)
        dsc = (2 * (p * y).sum(-1) + smooth) / (p.sum(-1) + y.sum(-1) + smooth)
        loss = loss + torch.where(labelled, ce + 1 - dsc.mean(-1), torch.zeros_like(ce))
    return reduce(loss, reduction)
