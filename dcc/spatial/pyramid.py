"""Multi-resolution image pyramids on physical grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from dcc.spatial.functional import full_precision, sample
from dcc.spatial.grid import Grid

# an axis is halved at the next coarser level only while its spacing is within this factor of
# the finest axis: thick slices (e.g. 0.7 x 0.7 x 4 mm) keep their slices until the in-plane
# spacing has caught up, as the shrink factors of ITK/ANTs multi-resolution schedules do
ANISOTROPY = 1.5


def gaussian_blur(images: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` with ``sigma`` voxels, for every
    axis or per axis (tensor order); axes with sigma 0 are left alone. Kernel radius
    round(3 sigma), borders replicated. On the CPU without autograd SciPy's filter does it (an
    order of magnitude faster than a CPU convolution); otherwise a convolution per axis."""
    n, c, *spatial = images.shape
    sigmas = [sigma] * len(spatial) if isinstance(sigma, (int, float)) else list(sigma)
    if len(sigmas) != len(spatial):
        raise ValueError(f"gaussian_blur: expected {len(spatial)} sigmas, got {sigma}")
    if images.device.type == "cpu" and not (torch.is_grad_enabled() and images.requires_grad):
        out = images.detach().numpy()
        for axis, s in enumerate(sigmas):
            if s > 0:
                out = ndimage.gaussian_filter1d(out, s, axis=2 + axis, mode="nearest",
                                                truncate=max(1, round(3 * s)) / s)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=out.dtype))
    conv = torch.nn.functional.conv2d if len(spatial) == 2 else torch.nn.functional.conv3d
    out = images.reshape(n * c, 1, *spatial)
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        radius = max(1, int(round(3 * s)))
        x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (x / s) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = -1
        pad = [0] * (2 * len(spatial))
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        out = conv(torch.nn.functional.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.reshape(n, c, *spatial)


def shrink_factors(grid: Grid) -> list[int]:
    """Per axis (x, y[, z] order) 2 where the next pyramid level halves the axis, else 1: the
    axes whose spacing is within :data:`ANISOTROPY` of the finest one (every axis of an
    isotropic grid)."""
    finest = min(grid.spacing)
    return [2 if s <= ANISOTROPY * finest else 1 for s in grid.spacing]


def pyramid_grids(grid: Grid, levels: int) -> list[Grid]:
    """The grids of :func:`image_pyramid`, coarsest first."""
    if levels < 1:
        raise ValueError(f"image_pyramid: levels must be >= 1, got {levels}")
    grids = [grid]
    for _ in range(levels - 1):
        grids.append(grids[-1].downsample(shrink_factors(grids[-1])))
    return grids[::-1]


@full_precision
def image_pyramid(images: torch.Tensor, grid: Grid, levels: int) -> list[tuple[torch.Tensor, Grid]]:
    """Images ``(N, C, *grid.shape)`` at ``levels`` resolutions, coarsest first.

    Each level halves the number of voxels along the axes of :func:`shrink_factors` (all axes
    of an isotropic grid) after Gaussian smoothing with sigma of one fine voxel along them, and
    resamples in physical space (in float32, also under autocast).
    """
    grids = pyramid_grids(grid, levels)[::-1]
    pyramid = [(images, grid)]
    for coarse_grid in grids[1:]:
        fine, fine_grid = pyramid[-1]
        sigmas = [1.0 if f > 1 else 0.0 for f in reversed(shrink_factors(fine_grid))]
        points = coarse_grid.points(device=images.device, dtype=images.dtype)
        normalized = (
            fine_grid.world_to_normalized(points).unsqueeze(0).expand(fine.shape[0], *points.shape)
        )
        pyramid.append((sample(gaussian_blur(fine, sigmas), normalized), coarse_grid))
    return pyramid[::-1]
