"""Known random misalignments with their ground-truth transforms (for gWI / gRE)."""

from __future__ import annotations

import math

import torch

from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import BSplineFFD, Rigid, SpatialTransform


def random_ffd(
    groups: int, grid: Grid, spacing: float = 20.0, std: float = 2.0, seed: int = 0
) -> BSplineFFD:
    """B-spline FFD with i.i.d. normal control displacements of ``std`` mm per component."""
    ffd = BSplineFFD(groups, grid, spacing)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ffd.coefficients.copy_(
            torch.randn(ffd.coefficients.shape, generator=generator) * std
        )
    return ffd


def random_rigid(
    groups: int, grid: Grid, max_angle: float = 10.0, max_offset: float = 6.0, seed: int = 0
) -> Rigid:
    """Rigid maps about the grid centre, angles uniform in +-``max_angle`` degrees (about every
    axis in 3D) and offsets uniform in +-``max_offset`` mm."""
    rigid = Rigid(groups, grid.ndim, center=grid.center)
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    with torch.no_grad():
        rigid.angles.copy_(uniform(rigid.angles.shape, math.radians(max_angle)))
        rigid.offset.copy_(uniform(rigid.offset.shape, max_offset))
    return rigid


@torch.no_grad()
def warp_images(
    images: torch.Tensor, grid: Grid, transform: SpatialTransform, mode: str = "bilinear"
) -> torch.Tensor:
    """Resample each image ``(N, *grid.shape)`` at phi_j(x): the misaligned image U_j o phi_j."""
    normalized = grid.world_to_normalized(transform.lattice(grid))
    out = sample(images.unsqueeze(1).float(), normalized, mode=mode)[:, 0]
    return out.to(images.dtype) if mode == "nearest" else out
