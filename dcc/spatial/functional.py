"""Stateless spatial functions: B-spline kernels, rotations, warping and bending energy."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

_AUTOCAST_DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def full_precision(fn: Callable) -> Callable:
    """Run ``fn`` outside autocast, with half-precision (fp16/bf16) tensor arguments as float32.

    Histograms, mutual information, EM and coordinate maths lose too much in half precision
    (bf16 resolves 0.5 mm at 100 mm and turns small pmf entries into zeros), so they always run
    in float32 (float64 inputs stay float64), whatever the caller's autocast context.
    """

    def promote(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() < 4:
            return x.float()
        return x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(promote(a) for a in args)
        kwargs = {k: promote(v) for k, v in kwargs.items()}
        with contextlib.ExitStack() as stack:
            for device in _AUTOCAST_DEVICES:
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel beta_3(t), support (-2, 2); integer shifts sum to one."""
    a = t.abs()
    inner = 2.0 / 3.0 - a**2 + 0.5 * a**3
    outer = (2.0 - a).clamp(min=0) ** 3 / 6.0
    return torch.where(a < 1, inner, outer)


def cubic_bspline_weights(frac: torch.Tensor) -> torch.Tensor:
    """Weights of the 4 knots ``floor(u) - 1 ... floor(u) + 2`` for ``frac = u - floor(u)``.

    Returns a tensor of shape ``(*frac.shape, 4)`` summing to one over the last axis.
    """
    offsets = torch.arange(-1, 3, dtype=frac.dtype, device=frac.device)
    return cubic_bspline(frac.unsqueeze(-1) - offsets)


def bspline_axis_matrix(coords: torch.Tensor, num_knots: int) -> torch.Tensor:
    """Dense ``(len(coords), num_knots)`` matrix of beta_3(coords - knot) for 1D knot lattices."""
    knots = torch.arange(num_knots, dtype=coords.dtype, device=coords.device)
    return cubic_bspline(coords.unsqueeze(-1) - knots)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices in ITK's Euler convention.

    ``angles`` is ``(N, 1)`` in 2D (counter-clockwise, as ``Euler2DTransform``) or ``(N, 3)`` in
    3D, ``(angle_x, angle_y, angle_z)`` composed as ``R = Rz @ Rx @ Ry`` (``Euler3DTransform``).
    """
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if angles.shape[-1] == 1:
        return torch.stack([c[:, 0], -s[:, 0], s[:, 0], c[:, 0]], -1).view(-1, 2, 2)
    if angles.shape[-1] != 3:
        raise ValueError(
            f"rotation_matrix: expected angles of shape (N, 1) or (N, 3), got {tuple(angles.shape)}"
        )
    cx, cy, cz, sx, sy, sz = c[:, 0], c[:, 1], c[:, 2], s[:, 0], s[:, 1], s[:, 2]
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ rx @ ry


@full_precision
def sample(
    images: torch.Tensor, normalized: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """Sample images ``(N, C, *shape)`` at ``grid_sample`` coordinates ``(N, *out, d)``.

    Returns ``(N, C, *out)``; outside the field of view the value is zero (``padding="zeros"``)
    or that of the nearest border voxel (``"border"``). Runs in float32 under autocast.
    """
    d = normalized.shape[-1]
    out_shape = normalized.shape[1:-1]
    grid = normalized.reshape(normalized.shape[0], -1, *([1] * (d - 1)), d)
    if images.dim() != d + 2:
        raise ValueError(
            f"sample: expected images of shape (N, C, *spatial) with {d} spatial axes, got "
            f"{tuple(images.shape)}"
        )
    mode = "bilinear" if mode == "linear" else mode
    out = F.grid_sample(
        images, grid.to(images.dtype), mode=mode, padding_mode=padding, align_corners=True
    )
    return out.reshape(*out.shape[:2], *out_shape)


def central_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(x[i + 1] - x[i - 1]) / 2`` along ``axis`` (the axis loses its two end points)."""
    n = x.shape[axis]
    return (x.narrow(axis, 2, n - 2) - x.narrow(axis, 0, n - 2)) / 2


def second_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x[i + 1] - 2 x[i] + x[i - 1]`` along ``axis`` (the axis loses its two end points)."""
    n = x.shape[axis]
    return x.narrow(axis, 2, n - 2) - 2 * x.narrow(axis, 1, n - 2) + x.narrow(axis, 0, n - 2)


def interior(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """``x`` without its first and last entry along each of ``axes``."""
    for axis in axes:
        x = x.narrow(axis, 1, x.shape[axis] - 2)
    return x


def zscore(images: torch.Tensor, ndim: int, eps: float = 1e-6) -> torch.Tensor:
    """Normalise every image to zero mean and unit variance (population std) over its last
    ``ndim`` axes. Statistics in float32; a constant image maps to zeros (the std is guarded by
    ``eps``). The one z-scoring of the package: data sets and the network's input alike."""
    dims = tuple(range(images.dim() - ndim, images.dim()))
    x = images.float()
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return ((x - mean) / (var.sqrt() + eps)).to(images.dtype)


def bending_energy(coefficients: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Bending energy R of B-spline FFDs on their control lattice, in index units (Eq. 15).

    ``coefficients`` is ``(N, d, *lattice)`` (lattice in tensor order; displacements in mm).
    As in the paper's experiments and its authors' code, R is computed on the control mesh with
    derivatives in **control-point index units** (one control spacing = 1), so it depends
    neither on the control spacing nor on the voxel size, and lambda = 0.001 (BrainWeb), 0.01
    (perfusion) and 100 (DCC) weigh it as in Secs. 4.1-4.4. Per transform it is the mean, over
    the d displacement components and the interior control points, of
    ``sum_a (d^2 c / di_a^2)^2 + 2 sum_{a<b} (d^2 c / di_a di_b)^2`` with every derivative a
    central difference of a central difference of the control values (exact for quadratic
    meshes). Interior points lie two knots from every border: a lattice with fewer than 5 knots
    along an axis has none, and R = 0. (The old physical units divided R by the spacing^4,
    1.6e5 at 20 mm, which left the paper's lambda without effect.) ``reduction``: ``"sum"``
    adds the N transforms (R(phi) of Eq. 41, the authors' mean times N), ``"mean"`` averages
    them, ``"none"`` returns ``(N,)``.
    """
    axes = list(range(2, coefficients.dim()))
    total = coefficients.new_zeros(coefficients.shape[0])
    if min(coefficients.shape[2:]) < 5:
        return reduce(total, reduction)
    first = {
        a: interior(central_difference(coefficients, a), [b for b in axes if b != a]) for a in axes
    }
    for a, b in itertools.combinations_with_replacement(axes, 2):
        deriv = interior(central_difference(first[a], b), [o for o in axes if o != b])
        weight = 1.0 if a == b else 2.0
        total = total + weight * deriv.pow(2).flatten(1).mean(1)
    return reduce(total, reduction)


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a MONAI-style ``reduction`` (``"none" | "mean" | "sum"``) over the first axis."""
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f'reduction must be "none", "mean" or "sum", got "{reduction}"')
