"""Sampling grids with physical geometry.

Conventions used throughout dcc:

* Image tensors are stored in PyTorch order ``(..., D, H, W)`` (3D) or ``(..., H, W)`` (2D),
  i.e. the reverse of ITK's index order ``(x, y[, z])``. ``Grid.shape`` is that tensor shape.
* Physical vectors (points, spacing, origin, displacements) are in ITK order ``(x, y[, z])`` and
  in ITK's LPS world frame, millimetres. ``direction`` is the ``d x d`` ITK direction matrix whose
  columns are the physical directions of the index axes ``x, y, z``.
* A point ``p`` and a continuous ITK index ``i`` (``(x, y, z)`` order) are related by
  ``p = origin + direction @ (spacing * i)``.
* ``grid_sample`` coordinates are ``align_corners=True``: index 0 maps to -1, index n-1 to +1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dcc.spatial.functional import full_precision

if TYPE_CHECKING:  # SimpleITK only for the conversions (imported there)
    import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """A regular lattice in physical space: tensor ``shape`` plus ITK ``spacing``, ``origin``,
    ``direction`` (all physical vectors in ``(x, y[, z])`` order, LPS, mm)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major d*d

    def __post_init__(self):
        d = len(self.shape)
        if d not in (2, 3):
            raise ValueError(f"Grid: expected a 2D or 3D shape, got shape={self.shape}")
        if len(self.spacing) != d or len(self.origin) != d or len(self.direction) != d * d:
            raise ValueError(
                f"Grid: spacing/origin need {d} entries and direction {d * d}, got "
                f"{len(self.spacing)}, {len(self.origin)}, {len(self.direction)}"
            )
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Grid: spacing must be positive, got {self.spacing}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_shape(
        cls,
        shape: Sequence[int],
        spacing: Sequence[float] | float = 1.0,
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | None = None,
    ) -> Grid:
        d = len(shape)
        spacing = (float(spacing),) * d if np.isscalar(spacing) else tuple(spacing)
        origin = (0.0,) * d if origin is None else tuple(origin)
        direction = tuple(np.eye(d).ravel()) if direction is None else tuple(direction)
        return cls(tuple(shape), spacing, origin, direction)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(reversed(image.GetSize())),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
        )

    @classmethod
    def from_nibabel(cls, image) -> Grid:
        """Grid of a nibabel image (RAS affine converted to ITK's LPS frame)."""
        affine = np.asarray(image.affine, dtype=np.float64)
        d = 3
        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        direction = lps / spacing
        origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
        shape = tuple(reversed(image.shape[:d]))
        return cls(shape, tuple(spacing), tuple(origin), tuple(direction.ravel()))

    def to_sitk(self, array: np.ndarray | torch.Tensor, is_vector: bool = False) -> sitk.Image:
        """Wrap an array in tensor order (plus a trailing vector axis if ``is_vector``)."""
        import SimpleITK as sitk

        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    # ------------------------------------------------------------------ properties
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> tuple[int, ...]:
        """Number of voxels per axis in ITK ``(x, y[, z])`` order."""
        return tuple(reversed(self.shape))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def index_to_world_matrix(self) -> np.ndarray:
        """Homogeneous ``(d+1, d+1)`` matrix mapping ITK continuous indices to points."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    def world_to_index_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world_matrix())

    def world_to_normalized_matrix(self) -> np.ndarray:
        """Homogeneous matrix mapping points to ``grid_sample`` coordinates (align_corners)."""
        d = self.ndim
        scale = np.eye(d + 1)
        for a, n in enumerate(self.size):
            scale[a, a] = 2.0 / max(n - 1, 1)
            scale[a, d] = -1.0
        return scale @ self.world_to_index_matrix()

    @property
    def extent(self) -> tuple[float, ...]:
        """Physical length covered by voxel centres per axis, ``(x, y[, z])``."""
        return tuple(s * (n - 1) for s, n in zip(self.spacing, self.size, strict=True))

    @property
    def center(self) -> np.ndarray:
        """Physical point at the centre of the lattice."""
        idx = np.array([(n - 1) / 2.0 for n in self.size] + [1.0])
        return (self.index_to_world_matrix() @ idx)[: self.ndim]

    def corners(self) -> np.ndarray:
        """The ``2**d`` physical corner points (voxel centres), shape ``(2**d, d)``."""
        return self._box([(0.0, n - 1.0) for n in self.size])

    def vertices(self) -> np.ndarray:
        """The ``2**d`` vertices of the field of view, ``(2**d, d)``: the outer voxel edges, half
        a voxel beyond the corner voxel centres (the points of gRE, Eq. 51)."""
        return self._box([(-0.5, n - 0.5) for n in self.size])

    def _box(self, bounds: list[tuple[float, float]]) -> np.ndarray:
        """Physical points of all combinations of the continuous index ``bounds`` per axis."""
        d = self.ndim
        idx = np.array(np.meshgrid(*bounds, indexing="ij")).reshape(d, -1).T
        hom = np.concatenate([idx, np.ones((len(idx), 1))], axis=1)
        return (hom @ self.index_to_world_matrix().T)[:, :d]

    # ------------------------------------------------------------------ points
    def points(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Physical coordinates of all voxel centres, shape ``(*shape, d)`` in ``(x, y[, z])``."""
        axes = [torch.arange(n, dtype=torch.float64, device=device) for n in self.shape]
        idx_tensor_order = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        idx = idx_tensor_order.flip(-1)  # (x, y, z) order
        return apply_matrix(torch.as_tensor(self.index_to_world_matrix(), device=device), idx).to(
            dtype
        )

    def world_to_normalized(self, points: torch.Tensor) -> torch.Tensor:
        """Map physical points ``(..., d)`` to ``grid_sample`` coordinates ``(..., d)``."""
        return apply_matrix(_normalizing_matrix(self, points.device, points.dtype), points)

    # ------------------------------------------------------------------ derived grids
    def downsample(self, factor: int | Sequence[int] = 2) -> Grid:
        """Coarser grid covering the same physical extent (voxel centres at the corners kept);
        ``factor`` for every axis or per axis (x, y[, z] order, as ``size``)."""
        factors = [factor] * self.ndim if isinstance(factor, int) else list(factor)
        if len(factors) != self.ndim or min(factors) < 1:
            raise ValueError(f"Grid.downsample: expected {self.ndim} factors >= 1, got {factor}")
        size = [max(1, (n - 1) // f + 1) for n, f in zip(self.size, factors, strict=True)]
        spacing = [
            e / (m - 1) if m > 1 else s * f
            for e, m, s, f in zip(self.extent, size, self.spacing, factors, strict=True)
        ]
        return Grid(tuple(reversed(size)), tuple(spacing), self.origin, self.direction)

    def same_geometry(self, other: Grid, tol: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


@functools.lru_cache(maxsize=64)
def _normalizing_matrix(grid: Grid, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``grid.world_to_normalized_matrix()`` as a tensor, cached (read-only)."""
    return torch.as_tensor(grid.world_to_normalized_matrix(), dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def lattice_points(grid: Grid, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``grid.points()`` cached per grid, device and dtype (read-only: do not modify); in
    float64 one slab of the first axis at a time (a 3D volume needs no float64 copy)."""
    matrix = torch.as_tensor(grid.index_to_world_matrix(), device=device)
    out = torch.empty(*grid.shape, grid.ndim, dtype=dtype, device=device)
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in grid.shape]
    for i in range(grid.shape[0]):
        first = axes[0][i : i + 1]
        index = torch.stack(torch.meshgrid(first, *axes[1:], indexing="ij"), dim=-1).flip(-1)
        out[i] = apply_matrix(matrix, index)[0].to(dtype)  # (x, y, z) order
    return out


@full_precision
def apply_matrix(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a homogeneous ``(d+1, d+1)`` matrix to points ``(..., d)`` (float32 or float64,
    also under autocast)."""
    d = points.shape[-1]
    matrix = matrix.to(points.dtype)
    return points @ matrix[:d, :d].T + matrix[:d, d]
