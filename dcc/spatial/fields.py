"""Dense displacement fields with a group axis (the registration output of the DCC network).

Conventions (shared with :mod:`dcc.nets` and :mod:`dcc.losses`):

* a field is ``(B, N, ndim, *S)``: B groups of N images, ``S`` the tensor shape ``(H, W)`` or
  ``(D, H, W)``;
* displacements are in **voxel (index) units**; channel ``c`` is the displacement along the
  ``c``-th ``grid_sample`` axis, i.e. channel 0 along the last tensor axis (W = x), channel 1
  along H (y), channel 2 along D (z);
* phi_j(x) = x + u_j(x) maps a common-space voxel to image j, so the warped image
  U_j o phi_j is U_j sampled at ``x + u_j(x)`` (``align_corners=True``: index 0 and ``n - 1`` are
  the centres of the first and last voxels; zeros outside the field of view).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from dcc.spatial.functional import (
    central_difference,
    interior,
    reduce,
    sample,
    second_difference,
)
from dcc.spatial.grid import Grid, apply_matrix


def _check_field(displacement: torch.Tensor, name: str) -> int:
    """Validate a ``(B, N, ndim, *S)`` field and return ``ndim``."""
    if displacement.dim() not in (5, 6) or displacement.shape[2] != displacement.dim() - 3:
        raise ValueError(
            f"{name}: expected a displacement of shape (B, N, ndim, *spatial) with ndim = 2 or 3 "
            f"spatial axes, got {tuple(displacement.shape)}"
        )
    return displacement.shape[2]


def _index_axes(ndim: int) -> list[int]:
    """Tensor axes (counted from the end) of the x, y[, z] displacement channels."""
    return [-1 - c for c in range(ndim)]


def sampling_grid(displacement: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` coordinates of x + u(x), ``(B * N, *S, ndim)`` (``align_corners=True``)."""
    ndim = _check_field(displacement, "sampling_grid")
    shape = displacement.shape[3:]
    size = [shape[a] for a in _index_axes(ndim)]  # voxels along x, y[, z]
    axes = [torch.arange(n, device=displacement.device, dtype=displacement.dtype) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], 0)  # (ndim, *S), x first
    scale = torch.tensor(
        [2.0 / max(n - 1, 1) for n in size], device=displacement.device, dtype=displacement.dtype
    ).view(ndim, *([1] * ndim))
    points = (identity + displacement) * scale - 1
    return points.flatten(0, 1).movedim(1, -1)


def warp(
    images: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """U_j o phi_j: images ``(B, N, C, *S)`` sampled at ``x + u_j(x)``, zeros outside
    (``padding="border"``: the nearest border value).

    ``displacement`` is ``(B, N, ndim, *S)`` in voxel units (module docstring). Returns
    ``(B, N, C, *S)``; differentiable in both the images and the displacement (``mode``
    ``"bilinear"``; ``"nearest"`` for label maps).
    """
    ndim = _check_field(displacement, "warp")
    (b, n), spatial = displacement.shape[:2], displacement.shape[3:]
    if images.dim() != ndim + 3 or images.shape[:2] != (b, n) or images.shape[3:] != spatial:
        raise ValueError(
            f"warp: expected images of shape ({b}, {n}, C, "
            f"{', '.join(map(str, spatial))}) for a displacement of shape "
            f"{tuple(displacement.shape)}, got {tuple(images.shape)}"
        )
    out = sample(images.flatten(0, 1), sampling_grid(displacement), mode, padding)
    return out.view(b, n, *out.shape[1:])


def inside_mask(displacement: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Whether phi_j(x) = x + u_j(x) lies in image j's field of view, ``(B, N, *S)`` bool.

    Inside means every coordinate is within ``[0, n - 1]`` (``tol`` voxels of slack), where
    :func:`warp` interpolates between voxels of the image only (no zero padding mixed in).
    """
    ndim = _check_field(displacement, "inside_mask")
    points = sampling_grid(displacement.detach())  # normalised: inside is [-1, 1]
    size = [displacement.shape[3:][a] for a in _index_axes(ndim)]
    slack = torch.tensor([2.0 * tol / max(s - 1, 1) for s in size], device=points.device)
    inside = (points.abs() <= 1 + slack).all(-1)
    return inside.view(displacement.shape[:2] + displacement.shape[3:])


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of phi_outer o phi_inner: u(x) = u_inner(x) + u_outer(x + u_inner(x)).

    Both fields are ``(B, N, ndim, *S)`` in voxel units on the same lattice (module docstring);
    ``inner`` acts first on common-space points (e.g. an FFD refinement), ``outer`` maps its
    result on to the image (e.g. the network's field), so warping by the result equals warping
    ``U_j o phi_outer`` by ``inner``. ``outer`` is interpolated linearly and extended beyond the
    lattice by its border values (a displacement has no natural zero outside the field of view).
    Differentiable in both fields.
    """
    _check_field(outer, "compose_displacements")
    if outer.shape != inner.shape:
        raise ValueError(
            f"compose_displacements: fields must have the same shape, got {tuple(outer.shape)} "
            f"and {tuple(inner.shape)}"
        )
    grid = sampling_grid(inner)
    values = F.grid_sample(
        outer.flatten(0, 1).to(grid.dtype), grid, mode="bilinear", padding_mode="border",
        align_corners=True,
    )
    return inner + values.view(outer.shape).to(inner.dtype)


def zero_mean(displacement: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Project a group of fields onto the unbiased constraint of Eq. (37): sum_j u_j(x) = 0."""
    return displacement - displacement.mean(dim, keepdim=True)


def bending_energy_dense(displacement: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Bending energy of dense fields, R of Eq. (41), by finite differences in index units.

    Per image: the mean over interior voxels of
    ``sum_c [sum_a (d^2 u_c / dx_a^2)^2 + 2 sum_{a<b} (d^2 u_c / dx_a dx_b)^2]`` (central
    differences, exact for quadratic fields). ``reduction``: ``"none"`` -> ``(B, N)``,
    ``"sum"`` -> the sum over the group and the batch (the aggregated R of Eq. 41 for B = 1),
    ``"mean"`` -> the mean over both.
    """
    ndim = _check_field(displacement, "bending_energy_dense")
    if min(displacement.shape[3:]) < 3:
        raise ValueError(
            "bending_energy_dense: need at least 3 voxels per spatial axis, got a field of shape "
            f"{tuple(displacement.shape)}"
        )
    axes = [displacement.dim() + a for a in _index_axes(ndim)]
    energy = displacement.new_zeros(displacement.shape[:2])
    for a, b in itertools.combinations_with_replacement(range(ndim), 2):
        if a == b:
            deriv = second_difference(displacement, axes[a])
        else:
            deriv = central_difference(central_difference(displacement, axes[a]), axes[b])
        deriv = interior(deriv, [x for x in axes if x not in (axes[a], axes[b])])
        weight = 1.0 if a == b else 2.0
        energy = energy + weight * deriv.pow(2).sum(2).flatten(2).mean(2)
    return reduce(energy, reduction)


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of phi = id + u at every voxel, ``(B, N, *S)``.

    Derivatives are central differences in index units (one-sided at the border), so the value
    is the local volume ratio of phi in voxels.
    """
    ndim = _check_field(displacement, "jacobian_determinant")
    axes = [displacement.dim() - 1 + a for a in _index_axes(ndim)]  # per channel, no channel axis
    rows = []
    for c in range(ndim):
        grads = torch.gradient(displacement[:, :, c], dim=axes)  # d u_c / d x_a, a = 0..ndim-1
        rows.append(torch.stack(grads, -1))
    jac = torch.stack(rows, -2) + torch.eye(ndim, device=displacement.device)
    return torch.linalg.det(jac.to(torch.promote_types(jac.dtype, torch.float32)))


def folding_count(displacement: torch.Tensor) -> torch.Tensor:
    """Number of folding voxels (Jacobian determinant <= 0) per image, ``(B, N)`` int64."""
    return (jacobian_determinant(displacement) <= 0).flatten(2).sum(-1)


def displacement_to_points(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """phi_j(x) in world coordinates ``(N, *S, d)`` (mm, ``(x, y[, z])``) from a dense field
    ``(N, d, *S)`` in voxel units of ``grid`` (float64, on the CPU); the inverse of
    :func:`points_to_displacement`."""
    if displacement.dim() != grid.ndim + 2 or tuple(displacement.shape[1:]) != (
        grid.ndim, *grid.shape
    ):
        raise ValueError(
            f"displacement_to_points: expected a field (N, {grid.ndim}, "
            f"{', '.join(map(str, grid.shape))}), got {tuple(displacement.shape)}"
        )
    moved = _voxel_indices(grid) + displacement.detach().double().cpu().movedim(1, -1)
    return apply_matrix(torch.as_tensor(grid.index_to_world_matrix()), moved)


def points_to_displacement(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The dense field ``(N, d, *S)`` in voxel units of ``grid`` (channel 0 along x) of the maps
    phi_j given at every voxel of ``grid`` as world points ``(N, *S, d)``, e.g.
    ``transform.lattice(grid)``: u_j(x) = index(phi_j(x)) - x (any grid direction). Same dtype
    and device as ``points``."""
    if points.dim() != grid.ndim + 2 or tuple(points.shape[1:]) != (*grid.shape, grid.ndim):
        raise ValueError(
            f"points_to_displacement: expected points (N, {', '.join(map(str, grid.shape))}, "
            f"{grid.ndim}), got {tuple(points.shape)}"
        )
    matrix = torch.as_tensor(grid.world_to_index_matrix(), device=points.device)
    index = apply_matrix(matrix, points.detach().double()) - _voxel_indices(grid).to(points.device)
    return index.to(points.dtype).movedim(-1, 1)


def _voxel_indices(grid: Grid) -> torch.Tensor:
    """The voxel indices of ``grid`` ``(*S, d)`` in ``(x, y[, z])`` order, float64."""
    axes = [torch.arange(n, dtype=torch.float64) for n in grid.shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)
