"""Multi-resolution image pyramids on physical grids."""

from __future__ import annotations

import torch

from dcc.spatial.functional import full_precision, sample
from dcc.spatial.grid import Grid


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` with ``sigma`` voxels."""
    if sigma <= 0:
        return images
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, *spatial = images.shape
    out = images.reshape(n * c, 1, *spatial)
    conv = torch.nn.functional.conv2d if len(spatial) == 2 else torch.nn.functional.conv3d
    for axis in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = -1
        pad = [0] * (2 * len(spatial))
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        out = conv(torch.nn.functional.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.reshape(n, c, *spatial)


@full_precision
def image_pyramid(images: torch.Tensor, grid: Grid, levels: int) -> list[tuple[torch.Tensor, Grid]]:
    """Images ``(N, C, *grid.shape)`` at ``levels`` resolutions, coarsest first.

    Each level halves the number of voxels per axis (``Grid.downsample``) after Gaussian
    smoothing with sigma of one fine voxel, and resamples in physical space (in float32, also
    under autocast).
    """
    if levels < 1:
        raise ValueError(f"image_pyramid: levels must be >= 1, got {levels}")
    pyramid = [(images, grid)]
    for _ in range(levels - 1):
        fine, fine_grid = pyramid[-1]
        coarse_grid = fine_grid.downsample(2)
        points = coarse_grid.points(device=images.device, dtype=images.dtype)
        normalized = (
            fine_grid.world_to_normalized(points).unsqueeze(0).expand(fine.shape[0], *points.shape)
        )
        pyramid.append((sample(gaussian_blur(fine, 1.0), normalized), coarse_grid))
    return pyramid[::-1]
