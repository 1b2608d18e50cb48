"""Spatial transforms with a group axis: one map phi_j per image of the group.

Every transform maps physical points of the common space to physical points of image j,
as phi_j does in the paper (Table 1): ``forward(points)`` takes ``(M, d)`` or ``(N, M, d)``
points in mm and returns ``(N, M, d)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from dcc.spatial import functional as SF
from dcc.spatial.grid import Grid, lattice_points

if TYPE_CHECKING:  # SimpleITK only for the conversions (imported there)
    import SimpleITK as sitk

# the mean over the group of per-image values (N, ...) -> (...): x.mean(0) in one process
GroupMean = Callable[[torch.Tensor], torch.Tensor]


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean(0)


class SpatialTransform(nn.Module):
    """Base class: a group of ``groups`` maps in ``ndim`` dimensions."""

    def __init__(self, groups: int, ndim: int):
        super().__init__()
        if groups < 1 or ndim not in (2, 3):
            raise ValueError(
                f"{type(self).__name__}: need groups >= 1 and ndim in (2, 3), got {groups}, {ndim}"
            )
        self.groups, self.ndim = groups, ndim
        # follows .to(device/dtype) like a parameter, so that a transform without parameters
        # (an empty composition) still puts its points on the device it was moved to
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def __init_subclass__(cls, **kwargs):
        """Point maps always run in float32 (see :func:`dcc.spatial.functional.full_precision`):
        under autocast, half-precision coordinates would be off by up to half a millimetre."""
        super().__init_subclass__(**kwargs)
        names = ("forward", "lattice", "lattice_at", "linear", "displacement", "displacement_at")
        for name in (*names, "regularization"):
            if name in cls.__dict__:
                setattr(cls, name, SF.full_precision(cls.__dict__[name]))

    def _expand(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() == 2:
            points = points.unsqueeze(0).expand(self.groups, -1, -1)
        if points.dim() != 3 or points.shape[0] != self.groups or points.shape[-1] != self.ndim:
            raise ValueError(
                f"{type(self).__name__}: expected points of shape (M, {self.ndim}) or "
                f"({self.groups}, M, {self.ndim}), got {tuple(points.shape)}"
            )
        return points

    def lattice(self, grid: Grid) -> torch.Tensor:
        """phi_j at every voxel centre of ``grid``: ``(N, *grid.shape, d)``."""
        points = self._grid_points(grid).reshape(-1, self.ndim)
        return self(points).reshape(self.groups, *grid.shape, self.ndim)

    def _reference(self) -> torch.Tensor:
        """A parameter (or, without any, the anchor buffer) whose device and dtype the
        transform's outputs follow."""
        return next(iter(self.parameters()), self._anchor)

    def _grid_points(self, grid: Grid) -> torch.Tensor:
        """Voxel centres of ``grid`` on the parameters' device and dtype."""
        reference = self._reference()
        return lattice_points(grid, reference.device, reference.dtype)

    def lattice_at(self, grid: Grid, index: torch.Tensor) -> torch.Tensor:
        """phi_j at the voxel centres of ``grid`` with flat indices ``index`` ``(M,)`` (e.g. a
        coordinate sample): ``(N, M, d)``, the same as ``lattice(grid)`` at those voxels."""
        return self(self._grid_points(grid).reshape(-1, self.ndim)[index])

    @torch.no_grad()
    def zero_mean_(self, mean: GroupMean | None = None) -> None:
        """Project the parameters onto the unbiased constraint of Eq. (37).

        ``mean`` maps per-image values ``(N, ...)`` to their mean over the group (default
        ``x.mean(0)``); a group split across processes passes the all-reduced mean over all
        its images (:mod:`dcc.coreg.distributed`), the transform holding a slice of it."""
        raise NotImplementedError(f"{type(self).__name__} has no unbiased projection")

    @torch.no_grad()
    def reset_(self, index: int) -> None:
        """Set member ``index`` back to the identity (group-to-reference mode)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be reset")

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; subclasses scale rates of differently sized parameters."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def regularization(self) -> torch.Tensor:
        """R(phi) of Eq. (15); zero for linear transforms."""
        reference = self._reference()
        return torch.zeros((), device=reference.device, dtype=reference.dtype)


class LinearTransform(SpatialTransform):
    """phi_j(x) = A_j (x - c_j) + c_j + t_j."""

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``A (N, d, d)`` and ``b (N, d)`` with phi_j(x) = A_j x + b_j."""
        raise NotImplementedError

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._expand(points)
        a, b = self.linear()
        return torch.baddbmm(b.unsqueeze(1), points, a.transpose(1, 2))

    def to_sitk(self, index: int) -> sitk.Transform:
        """ITK transform of member ``index`` (maps common-space points to image points)."""
        import SimpleITK as sitk

        a, b = (x[index].detach().double().cpu().numpy() for x in self.linear())
        t = sitk.AffineTransform(self.ndim)
        t.SetMatrix(a.ravel().tolist())
        t.SetTranslation(b.tolist())
        return t


class Translation(LinearTransform):
    """phi_j(x) = x + t_j."""

    def __init__(self, groups: int, ndim: int):
        super().__init__(groups, ndim)
        self.offset = nn.Parameter(torch.zeros(groups, ndim))

    def linear(self):
        eye = torch.eye(self.ndim, device=self.offset.device, dtype=self.offset.dtype)
        eye = eye.expand(self.groups, -1, -1)
        return eye, self.offset

    @torch.no_grad()
    def zero_mean_(self, mean=None):
        mean = mean or _mean
        self.offset -= mean(self.offset)

    @torch.no_grad()
    def reset_(self, index):
        self.offset[index] = 0

    def to_sitk(self, index):
        import SimpleITK as sitk

        return sitk.TranslationTransform(self.ndim, self.offset[index].tolist())


class Rigid(LinearTransform):
    """phi_j(x) = R(theta_j)(x - c_j) + c_j + t_j with optimisable centre, angles and offset.

    5 parameters per image in 2D, 9 in 3D, as ITK's Euler transforms (radians).
    """

    def __init__(
        self,
        groups: int,
        ndim: int,
        center: Sequence[float] | None = None,
        angle_scale: float = 0.01,
    ):
        super().__init__(groups, ndim)
        c = torch.zeros(ndim) if center is None else torch.as_tensor(center, dtype=torch.float32)
        self.center = nn.Parameter(c.expand(groups, ndim).clone())
        self.angles = nn.Parameter(torch.zeros(groups, 1 if ndim == 2 else 3))
        self.offset = nn.Parameter(torch.zeros(groups, ndim))
        self.angle_scale = angle_scale

    def linear(self):
        r = SF.rotation_matrix(self.angles)
        b = self.center + self.offset - (r @ self.center.unsqueeze(-1)).squeeze(-1)
        return r, b

    def parameter_groups(self, lr):
        return [
            {"params": [self.offset, self.center], "lr": lr},
            {"params": [self.angles], "lr": lr * self.angle_scale},
        ]

    @torch.no_grad()
    def zero_mean_(self, mean=None):
        """Zero-mean angles and zero-mean displacement of the mean centre (Eq. 37 to first order
        in the angles; exact for translations)."""
        mean = mean or _mean
        self.angles -= mean(self.angles)
        c = mean(self.center)
        self.offset -= mean(self(c.unsqueeze(0))[:, 0] - c)

    @torch.no_grad()
    def reset_(self, index):
        self.angles[index] = 0
        self.offset[index] = 0

    def to_sitk(self, index):
        import SimpleITK as sitk

        c = self.center[index].tolist()
        t = self.offset[index].tolist()
        a = self.angles[index].tolist()
        if self.ndim == 2:
            return sitk.Euler2DTransform(c, a[0], t)
        out = sitk.Euler3DTransform()
        out.SetCenter(c)
        out.SetRotation(*a)
        out.SetTranslation(t)
        return out


class Affine(LinearTransform):
    """phi_j(x) = A_j (x - c) + c + t_j about a fixed centre c (e.g. the grid centre)."""

    def __init__(
        self,
        groups: int,
        ndim: int,
        center: Sequence[float] | None = None,
        matrix_scale: float = 0.01,
    ):
        super().__init__(groups, ndim)
        c = torch.zeros(ndim) if center is None else torch.as_tensor(center, dtype=torch.float32)
        self.register_buffer("center", c.clone())
        self.matrix = nn.Parameter(torch.eye(ndim).expand(groups, -1, -1).clone())
        self.offset = nn.Parameter(torch.zeros(groups, ndim))
        self.matrix_scale = matrix_scale

    def linear(self):
        b = self.center + self.offset - self.matrix @ self.center
        return self.matrix, b

    def parameter_groups(self, lr):
        return [
            {"params": [self.offset], "lr": lr},
            {"params": [self.matrix], "lr": lr * self.matrix_scale},
        ]

    @torch.no_grad()
    def zero_mean_(self, mean=None):
        mean = mean or _mean
        self.matrix -= mean(self.matrix) - torch.eye(self.ndim, device=self.matrix.device)
        self.offset -= mean(self.offset)

    @torch.no_grad()
    def reset_(self, index):
        self.matrix[index] = torch.eye(self.ndim, device=self.matrix.device)
        self.offset[index] = 0


class BSplineFFD(SpatialTransform):
    """Cubic B-spline free-form deformation phi_j(x) = x + sum_i c_ji beta_3(u(x) - i).

    The control lattice is aligned with ``domain`` (same direction), has ``spacing`` mm between
    control points and covers the domain with one extra knot on each side, centred, exactly as an
    ITK ``BSplineTransform`` with the fixed parameters returned by :meth:`to_sitk`.
    Coefficients are displacements in mm, stored ``(N, d, *lattice)`` in tensor order.
    """

    def __init__(self, groups: int, domain: Grid, spacing: float | Sequence[float]):
        super().__init__(groups, domain.ndim)
        d = domain.ndim
        spacing = (float(spacing),) * d if np.isscalar(spacing) else tuple(map(float, spacing))
        if any(s <= 0 for s in spacing):
            raise ValueError(f"BSplineFFD: control spacing must be positive, got {spacing} mm")
        mesh = [
            max(1, math.ceil(e / s - 1e-6)) for e, s in zip(domain.extent, spacing, strict=True)
        ]
        self.knots = tuple(m + 3 for m in mesh)  # (x, y, z) order
        self.spacing = spacing
        self.domain = domain
        # Physical position of knot 0 along each index axis (in the domain's index frame, mm).
        self._start = tuple(
            -(m * s - e) / 2.0 - s for m, s, e in zip(mesh, spacing, domain.extent, strict=True)
        )
        self.coefficients = nn.Parameter(torch.zeros(groups, d, *reversed(self.knots)))
        self._axis_cache: dict = {}

    # -- geometry ---------------------------------------------------------------------------
    def knot_origin(self) -> np.ndarray:
        """Physical position of knot (0, ..., 0)."""
        return np.asarray(self.domain.origin) + self.domain.direction_matrix @ np.asarray(
            self._start
        )

    def _knot_coordinates(self, points: torch.Tensor) -> torch.Tensor:
        """Continuous knot indices ``(..., d)`` in ``(x, y, z)`` order of physical points."""
        rot = torch.as_tensor(
            self.domain.direction_matrix, dtype=points.dtype, device=points.device
        )
        origin = torch.as_tensor(self.knot_origin(), dtype=points.dtype, device=points.device)
        spacing = torch.as_tensor(self.spacing, dtype=points.dtype, device=points.device)
        return ((points - origin) @ rot) / spacing

    # -- evaluation ---------------------------------------------------------------------------
    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        """Displacements ``(N, M, d)`` at points ``(M, d)`` or ``(N, M, d)``; zero off-lattice."""
        points = self._expand(points)
        n, m, d = points.shape
        u = self._knot_coordinates(points)
        base = torch.floor(u)
        weights = SF.cubic_bspline_weights(u - base)  # (N, M, d, 4)
        base = base.long() - 1
        flat = self.coefficients.reshape(n, d, -1)
        strides = [int(np.prod(self.knots[:a])) for a in range(d)]  # x fastest in tensor order
        out = points.new_zeros(n, d, m)
        for combo in itertools.product(range(4), repeat=d):
            idx = torch.zeros_like(base[..., 0])
            w = torch.ones_like(weights[..., 0, 0])
            inside = torch.ones_like(idx, dtype=torch.bool)
            for a, o in enumerate(combo):
                i = base[..., a] + o
                inside &= (i >= 0) & (i < self.knots[a])
                idx = idx + i.clamp(0, self.knots[a] - 1) * strides[a]
                w = w * weights[..., a, o]
            w = w * inside
            out = out + torch.gather(flat, 2, idx.unsqueeze(1).expand(-1, d, -1)) * w.unsqueeze(1)
        return out.transpose(1, 2)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._expand(points)
        return points + self.displacement(points)

    def lattice(self, grid: Grid) -> torch.Tensor:
        """Separable evaluation on a grid with the domain's direction (fast path)."""
        if not np.allclose(grid.direction, self.domain.direction, atol=1e-6):
            return super().lattice(grid)
        mats = self._axis_matrices(grid)  # per tensor axis
        disp = self.coefficients
        for k, mat in enumerate(mats):
            disp = torch.tensordot(disp, mat, dims=([2 + k], [1])).movedim(-1, 2 + k)
        disp = disp.movedim(1, -1)
        return self._grid_points(grid).unsqueeze(0) + disp

    def displacement_at(self, grid: Grid, index: torch.Tensor) -> torch.Tensor:
        """Displacements ``(N, M, d)`` at the voxels ``index`` of a 2D ``grid`` with the
        domain's direction, from the rows of the separable B-spline matrices: one matrix
        product along y, then a contraction along x (forward and backward 3x faster than one
        einsum over both, less memory); other grids through :meth:`displacement`."""
        if grid.ndim != 2 or not np.allclose(grid.direction, self.domain.direction, atol=1e-6):
            return self.displacement(self._grid_points(grid).reshape(-1, self.ndim)[index])
        rows_matrix, cols_matrix = self._axis_matrices(grid)  # tensor axes y, x
        width = grid.shape[1]
        rows, cols = rows_matrix[index // width], cols_matrix[index % width]
        n, d, knots_y, knots_x = self.coefficients.shape
        along_y = rows @ self.coefficients.reshape(n * d, knots_y, knots_x)  # (N d, M, Kx)
        return torch.einsum("bmx,mx->bm", along_y, cols).reshape(n, d, -1).transpose(1, 2)

    def lattice_at(self, grid: Grid, index: torch.Tensor) -> torch.Tensor:
        points = self._grid_points(grid).reshape(-1, self.ndim)[index]
        return points.unsqueeze(0) + self.displacement_at(grid, index)

    def _axis_matrices(self, grid: Grid) -> list[torch.Tensor]:
        key = (grid, self.coefficients.device, self.coefficients.dtype)
        if key not in self._axis_cache:
            origin = torch.as_tensor(grid.origin, dtype=torch.float64).unsqueeze(0)
            u0 = self._knot_coordinates(origin)[0]
            mats = []
            for a in reversed(range(grid.ndim)):  # tensor axis order z, y, x
                step = grid.spacing[a] / self.spacing[a]
                coords = u0[a] + step * torch.arange(grid.size[a], dtype=torch.float64)
                matrix = SF.bspline_axis_matrix(coords, self.knots[a])
                mats.append(matrix.to(self.coefficients.device, self.coefficients.dtype))
            self._axis_cache[key] = mats
        return self._axis_cache[key]

    def regularization(self) -> torch.Tensor:
        """Bending energy summed over the group, in control-point index units (the paper's
        convention for lambda; see :func:`dcc.spatial.functional.bending_energy`)."""
        return SF.bending_energy(self.coefficients)

    @torch.no_grad()
    def zero_mean_(self, mean=None):
        mean = mean or _mean
        self.coefficients -= mean(self.coefficients)

    @torch.no_grad()
    def reset_(self, index):
        self.coefficients[index] = 0

    def to_sitk(self, index: int) -> sitk.BSplineTransform:
        """ITK ``BSplineTransform`` (order 3) equal to member ``index``."""
        import SimpleITK as sitk

        t = sitk.BSplineTransform(self.ndim, 3)
        t.SetFixedParameters(
            [*self.knots, *self.knot_origin().tolist(), *self.spacing, *self.domain.direction]
        )
        coeffs = self.coefficients[index].detach().double().cpu().numpy()
        t.SetParameters(np.concatenate([c.ravel() for c in coeffs]).tolist())
        return t


class MultiLevelFFD(SpatialTransform):
    """Sum of B-spline FFD levels, each level halving the control spacing (coarse to fine).

    Only the newest level is optimised; earlier levels are frozen when a level is added.
    """

    def __init__(self, groups: int, domain: Grid, spacing: float | Sequence[float]):
        super().__init__(groups, domain.ndim)
        self.domain = domain
        self.levels = nn.ModuleList([BSplineFFD(groups, domain, spacing)])

    def add_level(self) -> BSplineFFD:
        for p in self.parameters():
            p.requires_grad_(False)
        coarse = self.levels[-1]
        level = BSplineFFD(self.groups, self.domain, tuple(s / 2 for s in coarse.spacing))
        self.levels.append(level.to(coarse.coefficients.device))
        return level

    def forward(self, points):
        points = self._expand(points)
        return points + sum(level.displacement(points) for level in self.levels)

    def lattice(self, grid):
        base = self._grid_points(grid).unsqueeze(0)
        return base + sum(level.lattice(grid) - base for level in self.levels)

    def lattice_at(self, grid, index):
        points = self._grid_points(grid).reshape(-1, self.ndim)[index].unsqueeze(0)
        return points + sum(level.displacement_at(grid, index) for level in self.levels)

    def regularization(self):
        return sum(level.regularization() for level in self.levels)

    @torch.no_grad()
    def zero_mean_(self, mean=None):
        for level in self.levels:
            level.zero_mean_(mean)

    @torch.no_grad()
    def reset_(self, index):
        for level in self.levels:
            level.reset_(index)


class DisplacementField(SpatialTransform):
    """Dense displacement field ``(N, *grid.shape, d)`` in mm, linearly interpolated."""

    def __init__(self, groups: int, grid: Grid, field: torch.Tensor | None = None):
        super().__init__(groups, grid.ndim)
        self.grid = grid
        shape = (groups, *grid.shape, grid.ndim)
        if field is not None and tuple(field.shape) != shape:
            raise ValueError(
                f"DisplacementField: expected a field of shape {shape}, got {tuple(field.shape)}"
            )
        self.field = nn.Parameter(torch.zeros(shape) if field is None else field.clone().float())

    def forward(self, points):
        points = self._expand(points)
        normalized = self.grid.world_to_normalized(points)
        disp = SF.sample(self.field.movedim(-1, 1), normalized)  # (N, d, M)
        return points + disp.transpose(1, 2)

    def lattice(self, grid):
        if grid.same_geometry(self.grid, tol=1e-6):
            return self._grid_points(grid).unsqueeze(0) + self.field
        return super().lattice(grid)

    def lattice_at(self, grid, index):
        if grid.same_geometry(self.grid, tol=1e-6):
            points = self._grid_points(grid).reshape(-1, self.ndim)[index]
            return points.unsqueeze(0) + self.field.reshape(self.groups, -1, self.ndim)[:, index]
        return super().lattice_at(grid, index)

    @torch.no_grad()
    def zero_mean_(self, mean=None):
        mean = mean or _mean
        self.field -= mean(self.field)

    @torch.no_grad()
    def reset_(self, index):
        self.field[index] = 0


class ComposedTransform(SpatialTransform):
    """phi_j = S_1 o S_2 o ... o S_n for stages added in registration order.

    A later stage (e.g. the FFD after a rigid stage) acts first on common-space points, so each
    new stage refines the alignment reached by the previous ones.
    """

    def __init__(self, groups: int, ndim: int, stages: Sequence[SpatialTransform] = ()):
        super().__init__(groups, ndim)
        self.stages = nn.ModuleList()
        for stage in stages:
            self.append(stage)

    def append(self, stage: SpatialTransform) -> SpatialTransform:
        if stage.groups != self.groups or stage.ndim != self.ndim:
            raise ValueError(
                f"ComposedTransform: stage {type(stage).__name__} has groups={stage.groups}, "
                f"ndim={stage.ndim}; expected {self.groups}, {self.ndim}"
            )
        self.stages.append(stage)
        return stage

    def forward(self, points):
        points = self._expand(points)
        for stage in reversed(self.stages):
            points = stage(points)
        return points

    def lattice(self, grid):
        if not self.stages:
            pts = self._grid_points(grid)
            return pts.expand(self.groups, *pts.shape)
        points = self.stages[-1].lattice(grid).reshape(self.groups, -1, self.ndim)
        for stage in reversed(self.stages[:-1]):
            points = stage(points)
        return points.reshape(self.groups, *grid.shape, self.ndim)

    def lattice_at(self, grid, index):
        if not self.stages:
            return super().lattice_at(grid, index)
        points = self.stages[-1].lattice_at(grid, index)
        for stage in reversed(self.stages[:-1]):
            points = stage(points)
        return points

    def regularization(self):
        return sum((s.regularization() for s in self.stages), super().regularization())

    def linear_part(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Composite ``(A, b)`` if every stage is linear, else ``None``."""
        if not all(isinstance(s, LinearTransform) for s in self.stages):
            return None
        d = self.ndim
        a = torch.eye(d).expand(self.groups, d, d)
        b = torch.zeros(self.groups, d)
        for stage in self.stages:  # phi = S1 o S2 ...: A = A1 A2 ..., b = A1 b2 + b1
            sa, sb = (x.detach().cpu() for x in stage.linear())
            b = b + (a @ sb.unsqueeze(-1)).squeeze(-1)
            a = a @ sa
        return a, b
