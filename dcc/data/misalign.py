"""Known random misalignments with their ground-truth transforms (for gWI / gRE)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from dcc.data.phantom import brain_phantom
from dcc.evaluation.metrics import registration_error, warping_index
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
        ffd.coefficients.copy_(torch.randn(ffd.coefficients.shape, generator=generator) * std)
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


def random_dense_warp(
    groups: int,
    shape: tuple[int, int],
    max_angle: float = 10.0,
    max_shift: float = 8.0,
    max_deformation: float = 7.0,
    control: int = 5,
    seed: int = 0,
) -> torch.Tensor:
    """Voxel-space misalignments of a 2D ``shape``: a rotation about the image centre uniform in
    +-``max_angle`` degrees, a shift uniform in +-``max_shift`` voxels per axis and a smooth
    dense deformation interpolated (cubic splines) from a ``control x control`` grid of uniform
    random displacements, scaled so that its largest magnitude is ``max_deformation`` voxels.

    Returns ``grid_sample`` coordinates ``(groups, H, W, 2)`` (``align_corners=True``): image j
    is misaligned as ``U_j(T_j(x))`` with ``T_j(x) = R_j (x + d_j(x) - c) + c + t_j``. Use
    :func:`warp_dense` to apply them (edges replicated).
    """
    if len(shape) != 2:
        raise ValueError(f"random_dense_warp: expected a 2D shape (H, W), got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    h, w = shape
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    out = []
    for _ in range(groups):
        coarse = rng.uniform(-1, 1, size=(2, control, control))
        field = np.stack([ndimage.zoom(c, (h / control, w / control), order=3) for c in coarse])
        field = field[:, :h, :w]
        field *= max_deformation / max(np.linalg.norm(field, axis=0).max(), 1e-12)
        angle = np.radians(rng.uniform(-max_angle, max_angle))
        shift = rng.uniform(-max_shift, max_shift, size=2)
        y, x = rows + field[0] - centre[0], cols + field[1] - centre[1]
        cos, sin = np.cos(angle), np.sin(angle)
        ys = cos * y - sin * x + centre[0] + shift[0]
        xs = sin * y + cos * x + centre[1] + shift[1]
        out.append(np.stack([2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1], -1))
    return torch.from_numpy(np.stack(out)).float()


@torch.no_grad()
def warp_dense(images: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Images ``(N, H, W)`` sampled at :func:`random_dense_warp` coordinates, edges replicated."""
    out = sample(images.unsqueeze(1).float(), coords, mode=mode, padding="border")[:, 0]
    return out.to(images.dtype) if mode == "nearest" else out


@dataclass
class MisalignedGroup:
    """Phantom images misaligned by known maps ``truth`` (U_j = P_j o truth_j)."""

    images: torch.Tensor  # (N, *shape)
    labels: torch.Tensor  # (N, *shape) phantom labels misaligned like the images
    grid: Grid
    names: list[str]
    truth: SpatialTransform
    foreground: torch.Tensor  # (*shape) labels of the aligned phantom

    def warping_index(self, estimate: SpatialTransform | None = None) -> float:
        """gWI (Eq. 49) of truth_j o estimate_j over the phantom foreground, in mm (the
        estimate stays on its device)."""
        return warping_index(self.truth, self.grid, estimate, self.foreground)

    def registration_error(self, estimate: SpatialTransform | None = None) -> float:
        """gRE (Eq. 51) of truth_j o estimate_j at the vertices of the field of view, in mm."""
        return registration_error(self.truth, self.grid, estimate)


def misaligned_phantom(
    dim: int = 2,
    realisations: int = 1,
    kind: str = "ffd",
    magnitude: float = 5.5,
    spacing: float = 20.0,
    downsample: int = 1,
    seed: int = 0,
) -> MisalignedGroup:
    """The brain phantom (T1/T2/PD x ``realisations``) under random known misalignments.

    ``kind="ffd"``: B-spline FFD of ``spacing`` mm with control displacements of std
    ``magnitude`` mm (5.5 mm gives a gWI of about 3 mm in 2D); ``kind="rigid"``: rotations up to
    ``magnitude`` degrees and offsets up to ``magnitude`` mm.
    """
    phantom = brain_phantom(dim=dim, realisations=realisations, downsample=downsample, seed=seed)
    n, grid = phantom.images.shape[0], phantom.grid
    if kind == "ffd":
        truth = random_ffd(n, grid, spacing, magnitude, seed=seed + 1)
    elif kind == "rigid":
        truth = random_rigid(n, grid, magnitude, magnitude, seed=seed + 1)
    else:
        raise ValueError(f'misaligned_phantom: kind must be "ffd" or "rigid", got "{kind}"')
    labels = phantom.labels.expand(n, *phantom.labels.shape)
    return MisalignedGroup(
        warp_images(phantom.images, grid, truth),
        warp_images(labels, grid, truth, mode="nearest"),
        grid,
        phantom.names,
        truth,
        phantom.labels,
    )
