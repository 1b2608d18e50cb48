"""Dense displacement fields with a group axis: warping, Eq. (37), bending energy, Jacobians."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from dcc.spatial import fields


def _lattice(shape):
    """Index coordinates ``(ndim, *shape)`` in grid_sample channel order (x first)."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], 0)


def _affine_field(matrix, shift, shape, groups=2):
    """u(x) = (A - I) x + t at every voxel, as a ``(1, groups, ndim, *shape)`` field."""
    ndim = len(shape)
    x = _lattice(shape).reshape(ndim, -1)
    a = torch.as_tensor(matrix, dtype=torch.float64)
    u = (a - torch.eye(ndim, dtype=torch.float64)) @ x + torch.as_tensor(shift).view(ndim, 1)
    return u.reshape(1, 1, ndim, *shape).expand(1, groups, -1, *shape).clone()


@pytest.mark.parametrize(
    "matrix",
    [
        [[1.1, 0.2], [-0.1, 0.9]],
        [[1.05, 0.1, 0.0], [0.0, 0.95, -0.05], [0.02, 0.0, 1.2]],
    ],
)
def test_affine_field_has_no_bending_and_constant_jacobian(matrix):
    shape = (9, 11) if len(matrix) == 2 else (6, 7, 8)
    u = _affine_field(matrix, [0.5] * len(matrix), shape)
    assert fields.bending_energy_dense(u, reduction="none").abs().max() < 1e-10
    det = fields.jacobian_determinant(u)
    assert det.shape == (1, 2, *shape)
    torch.testing.assert_close(det, torch.full_like(det, float(np.linalg.det(matrix))))
    assert fields.folding_count(u).sum() == 0


def test_reflection_folds_every_voxel():
    u = _affine_field([[-1.0, 0.0], [0.0, 1.0]], [10.0, 0.0], (8, 8), groups=3)
    counts = fields.folding_count(u)
    assert counts.shape == (1, 3) and counts.dtype == torch.int64
    assert (counts == 64).all()


def test_quadratic_field_bending_energy_2d():
    # u_x = a x^2, u_y = b x y: d2u_x/dx2 = 2a, d2u_y/dxdy = b (counted twice) -> 4a^2 + 2b^2
    a, b = 0.03, -0.05
    x, y = _lattice((10, 12))
    u = torch.stack([a * x**2, b * x * y]).view(1, 1, 2, 10, 12)
    u = torch.cat([u, 2 * u], 1)  # the second member has 4x the energy
    energy = fields.bending_energy_dense(u, reduction="none")
    expected = 4 * a**2 + 2 * b**2
    torch.testing.assert_close(energy, torch.tensor([[expected, 4 * expected]], dtype=u.dtype))
    torch.testing.assert_close(
        fields.bending_energy_dense(u), torch.tensor(5 * expected, dtype=u.dtype)
    )
    torch.testing.assert_close(
        fields.bending_energy_dense(u, reduction="mean"),
        torch.tensor(2.5 * expected, dtype=u.dtype),
    )


def test_quadratic_field_bending_energy_3d():
    # u_x = a z^2, u_y = 0, u_z = c x z: 4a^2 + 2c^2; the z axis is the first tensor axis
    a, c = 0.02, 0.04
    x, y, z = _lattice((5, 6, 7))
    u = torch.stack([a * z**2, torch.zeros_like(x), c * x * z]).view(1, 1, 3, 5, 6, 7)
    energy = fields.bending_energy_dense(u, reduction="none")
    torch.testing.assert_close(energy, torch.tensor([[4 * a**2 + 2 * c**2]], dtype=u.dtype))


@pytest.mark.parametrize("shape", [(16, 12), (6, 7, 8)])
def test_bending_energy_matches_monai(shape):
    # MONAI's BendingEnergyLoss (same stencils) averages over the ndim channels; we add them
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(4)
    u = torch.randn(1, 3, len(shape), *shape, dtype=torch.float64)
    ours = fields.bending_energy_dense(u, reduction="none")
    theirs = [monai_losses.BendingEnergyLoss()(u[:, j]) * len(shape) for j in range(3)]
    torch.testing.assert_close(ours[0], torch.stack(theirs))


@pytest.mark.parametrize("shape", [(12, 14), (6, 7, 8)])
def test_integer_shift_equals_roll_in_the_interior(shape):
    ndim = len(shape)
    torch.manual_seed(0)
    images = torch.rand(1, 2, 1, *shape)
    shift = [2, -1, 1][:ndim]  # voxels along x, y[, z]
    u = torch.tensor(shift, dtype=torch.float32).view(1, 1, ndim, *([1] * ndim))
    u = u.expand(1, 2, ndim, *shape)
    warped = fields.warp(images, u)
    dims = [-1 - c for c in range(ndim)]
    rolled = torch.roll(images, shifts=[-s for s in shift], dims=dims)
    inside = fields.inside_mask(u)
    interior = tuple(
        slice(max(0, -shift[c]), shape[dims[c]] - max(0, shift[c])) for c in reversed(range(ndim))
    )
    torch.testing.assert_close(warped[(..., *interior)], rolled[(..., *interior)])
    assert inside[(..., *interior)].all()
    assert inside.sum() == 2 * np.prod([s - abs(shift[c]) for c, s in enumerate(shape[::-1])])
    assert (warped[:, :, 0][~inside] == 0).all()  # zeros outside the field of view


def test_warp_matches_scipy_map_coordinates():
    torch.manual_seed(1)
    h, w = 20, 24
    image = torch.rand(h, w, dtype=torch.float64)
    coarse = torch.randn(1, 2, 4, 5, dtype=torch.float64) * 2.5
    u = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    warped = fields.warp(image.view(1, 1, 1, h, w), u.view(1, 1, 2, h, w))[0, 0, 0]
    x, y = _lattice((h, w))
    coords = np.stack([(y + u[0, 1]).numpy(), (x + u[0, 0]).numpy()])  # scipy: (row, column)
    expected = ndimage.map_coordinates(image.numpy(), coords, order=1, mode="grid-constant")
    np.testing.assert_allclose(warped.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize(
    ("padding", "scipy_mode"), [("zeros", "grid-constant"), ("border", "nearest")]
)
def test_warp_padding_matches_scipy(padding, scipy_mode):
    """Points up to 3 voxels outside the image: zeros, or the nearest border value."""
    torch.manual_seed(3)
    h, w = 12, 10
    image = torch.rand(h, w, dtype=torch.float64)
    u = (torch.rand(1, 2, h, w, dtype=torch.float64) - 0.5) * 6
    warped = fields.warp(image.view(1, 1, 1, h, w), u.view(1, 1, 2, h, w), padding=padding)
    x, y = _lattice((h, w))
    coords = np.stack([(y + u[0, 1]).numpy(), (x + u[0, 0]).numpy()])
    expected = ndimage.map_coordinates(image.numpy(), coords, order=1, mode=scipy_mode)
    np.testing.assert_allclose(warped[0, 0, 0].numpy(), expected, atol=1e-10)


def test_warp_is_differentiable_in_the_displacement():
    torch.manual_seed(2)
    images = torch.rand(2, 3, 1, 8, 8)
    u = torch.zeros(2, 3, 2, 8, 8, requires_grad=True)
    fields.warp(images, u).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_zero_mean_projection():
    torch.manual_seed(3)
    u = torch.randn(2, 3, 2, 5, 6)
    v = fields.zero_mean(u)
    torch.testing.assert_close(v.mean(1), torch.zeros(2, 2, 5, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(v[:, 0] - v[:, 1], u[:, 0] - u[:, 1])  # relative motion kept
    torch.testing.assert_close(fields.zero_mean(v), v)


def test_bad_shapes_raise_value_errors():
    with pytest.raises(ValueError, match="displacement of shape"):
        fields.warp(torch.zeros(1, 2, 1, 8, 8), torch.zeros(1, 2, 3, 8, 8))
    with pytest.raises(ValueError, match="images of shape"):
        fields.warp(torch.zeros(1, 3, 1, 8, 8), torch.zeros(1, 2, 2, 8, 8))
    with pytest.raises(ValueError, match="at least 3 voxels"):
        fields.bending_energy_dense(torch.zeros(1, 1, 2, 2, 8))


def test_points_and_displacement_round_trip_on_an_oblique_grid():
    """u = index(phi(x)) - x for any grid direction (the old copies divided world offsets by
    the spacing, right only for an axis-aligned grid), and its inverse."""
    import math

    from dcc.spatial.fields import displacement_to_points, points_to_displacement
    from dcc.spatial.grid import Grid

    angle = math.radians(30)
    direction = (math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle))
    grid = Grid((12, 10), (2.0, 3.0), (5.0, -4.0), direction)
    points = (grid.points(dtype=torch.float64) + torch.tensor([4.0, 0.0]))[None]  # 4 mm along x
    u = points_to_displacement(points, grid)
    # 4 mm along world x is (4 cos 30 / 2, -4 sin 30 / 3) voxels along the grid's own axes
    expected = torch.tensor([4 * math.cos(angle) / 2, -4 * math.sin(angle) / 3])
    assert torch.allclose(u[0, :, 3, 4].float(), expected, atol=1e-5)
    assert torch.allclose(displacement_to_points(u, grid), points.double(), atol=1e-9)
    with pytest.raises(ValueError, match="expected points"):
        points_to_displacement(points[..., :1], grid)
