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
def sample(images: torch.Tensor, normalized: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample images ``(N, C, *shape)`` at ``grid_sample`` coordinates ``(N, *out, d)``.

    Returns ``(N, C, *out)``; outside the field of view the value is zero. Runs in float32
    under autocast.
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
        images, grid.to(images.dtype), mode=mode, padding_mode="zeros", align_corners=True
    )
    return out.reshape(*out.shape[:2], *out_shape)


# Values, first and second derivatives of beta_3 at the knots -1, 0, 1 (used on control lattices).
_KNOT_KERNELS = {
    0: (1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0),
    1: (-0.5, 0.0, 0.5),
    2: (1.0, -2.0, 1.0),
}


def _filter_axis(x: torch.Tensor, axis: int, order: int) -> torch.Tensor:
    """Valid 3-tap filtering of ``x`` along ``axis`` with the beta_3 derivative of ``order``."""
    k = _KNOT_KERNELS[order]
    n = x.shape[axis]
    if n < 3:
        return x.narrow(axis, 0, 0)
    return (
        k[0] * x.narrow(axis, 0, n - 2)
        + k[1] * x.narrow(axis, 1, n - 2)
        + k[2] * x.narrow(axis, 2, n - 2)
    )


def bending_energy(
    coefficients: torch.Tensor, spacing: tuple[float, ...], reduction: str = "sum"
) -> torch.Tensor:
    """Bending energy of cubic B-spline FFDs (Rueckert et al. 1999) at the control points.

    ``coefficients`` is ``(N, d, *lattice)`` (lattice in tensor order), ``spacing`` the control
    spacing in mm in ``(x, y[, z])`` order. Per transform this is the mean over interior control
    points of ``sum_ab (d^2 u / dx_a dx_b)^2``; ``reduction`` ``"sum"`` adds the N transforms
    (the aggregated R(phi) of Eq. 41), ``"mean"`` averages them, ``"none"`` returns ``(N,)``.
    """
    d = coefficients.shape[1]
    spatial = list(range(2, 2 + d))[::-1]  # tensor axes for x, y, z
    total = coefficients.new_zeros(coefficients.shape[0])
    for a, b in itertools.combinations_with_replacement(range(d), 2):
        orders = [0] * d
        orders[a] += 1
        orders[b] += 1
        deriv = coefficients
        for axis in range(d):
            deriv = _filter_axis(deriv, spatial[axis], orders[axis])
        if deriv.numel() == 0:
            continue
        deriv = deriv / (spacing[a] * spacing[b])
        weight = 1.0 if a == b else 2.0
        total = total + weight * deriv.pow(2).sum(1).flatten(1).mean(1)
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
