"""Tests of dcc.spatial: Grid geometry, group transforms (against SimpleITK), B-splines,
bending energy, pyramids and gradients.

Conventions (dcc/spatial/grid.py): tensors in torch order, physical points ITK (x, y[, z]) LPS mm;
transforms map common-space points to image points, so warping samples U_j at phi_j(x) exactly
as ``sitk.Resample(image, reference, transform)`` does.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dcc.data.misalignment import warp_images
from dcc.spatial import functional as SF
from dcc.spatial.grid import Grid
from dcc.spatial.pyramid import gaussian_blur, image_pyramid, pyramid_grids, shrink_factors
from dcc.spatial.transforms import (
    Affine,
    BSplineFFD,
    ComposedTransform,
    DisplacementField,
    MultiLevelFFD,
    Rigid,
    SpatialTransform,
    Translation,
)


# ---------------------------------------------------------------------------- helpers
def _euler3d(ax: float, ay: float, az: float) -> tuple[float, ...]:
    t = sitk.Euler3DTransform()
    t.SetRotation(ax, ay, az)
    return tuple(t.GetMatrix())


def _rot2d(a: float) -> tuple[float, ...]:
    return (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))


OBLIQUE3D = Grid((10, 12, 14), (1.3, 0.9, 1.1), (-12.0, 7.0, 25.0), _euler3d(0.3, -0.2, 0.5))
OBLIQUE2D = Grid((17, 19), (0.8, 1.2), (5.0, -9.0), _rot2d(0.35))
GRIDS = {"2d": OBLIQUE2D, "3d": OBLIQUE3D}
ANISO = {2: (4.0, 6.5), 3: (4.0, 6.5, 5.0)}  # anisotropic control spacing, (x, y[, z]) mm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(shape, low, high, seed) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=_gen(seed))


def blobs(grid: Grid, seed: int = 0, count: int = 6) -> torch.Tensor:
    """A smooth image: sum of Gaussian blobs in physical space, ``grid.shape``, float32."""
    pts = grid.points(dtype=torch.float64)
    flat = pts.reshape(-1, grid.ndim)
    lo, hi = flat.min(0).values, flat.max(0).values
    rng = np.random.default_rng(seed)
    out = torch.zeros(grid.shape, dtype=torch.float64)
    for _ in range(count):
        c = lo + (hi - lo) * torch.as_tensor(rng.uniform(0.2, 0.8, grid.ndim))
        s = float(rng.uniform(2.0, 4.0))
        out += float(rng.uniform(0.5, 1.5)) * torch.exp(-((pts - c) ** 2).sum(-1) / (2 * s * s))
    return out.float()


def interior_points(grid: Grid, m: int, seed: int, margin: float = 0.15) -> torch.Tensor:
    """``m`` random physical points inside the grid, away from its border, float64."""
    idx = _uniform((m, grid.ndim), 0.0, 1.0, seed).double()
    size = torch.tensor(grid.size, dtype=torch.float64) - 1
    idx = (margin + (1 - 2 * margin) * idx) * size
    hom = torch.cat([idx, torch.ones(m, 1, dtype=torch.float64)], 1)
    return (hom @ torch.as_tensor(grid.index_to_world_matrix()).T)[:, : grid.ndim]


def interior_mask(grid: Grid, border: int = 1) -> torch.Tensor:
    mask = torch.zeros(grid.shape, dtype=torch.bool)
    mask[tuple(slice(border, n - border) for n in grid.shape)] = True
    return mask


def random_linear(kind: str, groups: int, grid: Grid, seed: int) -> SpatialTransform:
    d = grid.ndim
    with torch.no_grad():
        if kind == "translation":
            t = Translation(groups, d)
            t.offset.copy_(_uniform((groups, d), -3, 3, seed))
        elif kind == "rigid":
            t = Rigid(groups, d, center=grid.center)
            t.center.add_(_uniform((groups, d), -2, 2, seed + 1))
            t.angles.copy_(_uniform(t.angles.shape, -0.2, 0.2, seed + 2))
            t.offset.copy_(_uniform((groups, d), -3, 3, seed + 3))
        elif kind == "affine":
            t = Affine(groups, d, center=grid.center)
            t.matrix.add_(_uniform((groups, d, d), -0.1, 0.1, seed + 4))
            t.offset.copy_(_uniform((groups, d), -3, 3, seed + 5))
        else:
            raise ValueError(kind)
    return t


def random_ffd(groups: int, grid: Grid, spacing, std: float, seed: int) -> BSplineFFD:
    ffd = BSplineFFD(groups, grid, spacing)
    with torch.no_grad():
        ffd.coefficients.copy_(torch.randn(ffd.coefficients.shape, generator=_gen(seed)) * std)
    return ffd


def sitk_resample(image: torch.Tensor, grid: Grid, transform: sitk.Transform) -> np.ndarray:
    img = grid.to_sitk(image.double())
    out = sitk.Resample(img, img, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out)


def valid_region(lattice: torch.Tensor, grid: Grid, margin: float = 1.0) -> torch.Tensor:
    """Voxels of the (interior of the) reference grid whose phi(x) lies ``margin`` voxels inside
    the image: there both grid_sample (zero padding) and ITK interpolate from real voxels."""
    idx = torch.as_tensor(grid.world_to_index_matrix(), dtype=torch.float64)
    cidx = lattice.double() @ idx[: grid.ndim, : grid.ndim].T + idx[: grid.ndim, grid.ndim]
    size = torch.tensor(grid.size, dtype=torch.float64)
    inside = ((cidx >= margin) & (cidx <= size - 1 - margin)).all(-1)
    return inside & interior_mask(grid)


# ---------------------------------------------------------------------------- Grid
@pytest.mark.parametrize("name", ["2d", "3d"])
def test_grid_index_to_world_matches_sitk(name):
    grid = GRIDS[name]
    img = sitk.Image(list(grid.size), sitk.sitkFloat32)
    grid.apply_to(img)
    rng = np.random.default_rng(0)
    cidx = rng.uniform(0, 1, (20, grid.ndim)) * (np.array(grid.size) - 1)
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in cidx])
    hom = np.c_[cidx, np.ones(len(cidx))]
    np.testing.assert_allclose(
        (hom @ grid.index_to_world_matrix().T)[:, : grid.ndim], expected, atol=1e-9
    )
    # and back
    back = (np.c_[expected, np.ones(len(cidx))] @ grid.world_to_index_matrix().T)[:, : grid.ndim]
    np.testing.assert_allclose(back, cidx, atol=1e-9)
    # Grid.points: tensor order (z, y, x) holds the ITK index (x, y, z)
    pts = grid.points(dtype=torch.float64)
    assert pts.shape == (*grid.shape, grid.ndim)
    for _ in range(5):
        tidx = tuple(int(rng.integers(0, n)) for n in grid.shape)
        itk_idx = tuple(reversed(tidx))
        np.testing.assert_allclose(
            pts[tidx].numpy(), img.TransformIndexToPhysicalPoint(itk_idx), atol=1e-9
        )
    # from_sitk round trip
    assert Grid.from_sitk(img).same_geometry(grid, tol=1e-12)
    assert Grid.from_sitk(grid.to_sitk(np.zeros(grid.shape, np.float32))).same_geometry(grid)


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_world_to_normalized_corners(name):
    grid = GRIDS[name]
    pts = grid.points(dtype=torch.float64)
    norm = grid.world_to_normalized(pts)
    d = grid.ndim
    first = norm[(0,) * d]
    last = norm[tuple(n - 1 for n in grid.shape)]
    torch.testing.assert_close(first, -torch.ones(d, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(last, torch.ones(d, dtype=torch.float64), atol=1e-9, rtol=0)
    # last voxel along x (tensor axis -1) only: normalized x = +1, others -1 (grid_sample order)
    idx = [0] * d
    idx[-1] = grid.shape[-1] - 1
    expected = -torch.ones(d, dtype=torch.float64)
    expected[0] = 1
    torch.testing.assert_close(norm[tuple(idx)], expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_grid_downsample_keeps_extent_and_corners(name):
    grid = GRIDS[name]
    assert len(grid.corners()) == 2**grid.ndim
    for factor in (2, 3):
        coarse = grid.downsample(factor)
        assert coarse.ndim == grid.ndim
        assert all(c < f for c, f in zip(coarse.shape, grid.shape, strict=True))
        np.testing.assert_allclose(coarse.extent, grid.extent, atol=1e-9)
        np.testing.assert_allclose(coarse.corners(), grid.corners(), atol=1e-9)
        np.testing.assert_allclose(coarse.center, grid.center, atol=1e-9)
        assert coarse.direction == grid.direction


def test_grid_corners_are_voxel_centres():
    grid = OBLIQUE3D
    corners = grid.corners()
    pts = grid.points(dtype=torch.float64).numpy()
    expected = [pts[i, j, k] for i in (0, -1) for j in (0, -1) for k in (0, -1)]
    # the same set of points, whatever the order
    dist = np.linalg.norm(corners[:, None] - np.asarray(expected)[None], axis=-1)
    assert np.all(dist.min(1) < 1e-9) and np.all(dist.min(0) < 1e-9)


def test_grid_from_nibabel_matches_from_sitk(tmp_path):
    grid = OBLIQUE3D
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(grid.to_sitk(np.zeros(grid.shape, np.float32)), str(path))
    g_sitk = Grid.from_sitk(sitk.ReadImage(str(path)))
    g_nib = Grid.from_nibabel(nib.load(str(path)))
    assert g_nib.shape == g_sitk.shape == grid.shape
    np.testing.assert_allclose(g_nib.spacing, g_sitk.spacing, atol=1e-5)
    np.testing.assert_allclose(g_nib.origin, g_sitk.origin, atol=1e-4)
    np.testing.assert_allclose(g_nib.direction, g_sitk.direction, atol=1e-5)
    assert g_nib.same_geometry(grid, tol=1e-4)


# ---------------------------------------------------------------------------- identity
def _identity_transforms(grid: Grid, groups: int) -> dict[str, SpatialTransform]:
    d = grid.ndim
    mlffd = MultiLevelFFD(groups, grid, 8.0)
    mlffd.add_level()
    return {
        "translation": Translation(groups, d),
        "rigid": Rigid(groups, d, center=grid.center),
        "affine": Affine(groups, d, center=grid.center),
        "ffd": BSplineFFD(groups, grid, 6.0),
        "multilevel": mlffd,
        "field": DisplacementField(groups, grid),
        "composed": ComposedTransform(
            groups,
            d,
            [
                Rigid(groups, d, center=grid.center),
                Affine(groups, d),
                BSplineFFD(groups, grid, 5.0),
                DisplacementField(groups, grid),
            ],
        ),
        "empty-composed": ComposedTransform(groups, d),
    }


@pytest.mark.parametrize("name", ["2d", "3d"])
@pytest.mark.parametrize(
    "kind",
    ["translation", "rigid", "affine", "ffd", "multilevel", "field", "composed", "empty-composed"],
)
def test_identity_transform_leaves_images_unchanged(name, kind):
    grid = GRIDS[name]
    transform = _identity_transforms(grid, 2)[kind]
    images = torch.stack([blobs(grid, 0), blobs(grid, 1)])
    warped = warp_images(images, grid, transform)
    assert warped.shape == images.shape
    mask = interior_mask(grid)
    torch.testing.assert_close(warped[:, mask], images[:, mask], atol=1e-5, rtol=0)
    pts = interior_points(grid, 30, seed=3).float()
    torch.testing.assert_close(transform(pts), pts.expand(2, -1, -1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- against ITK
def make_transform(kind, groups, grid, std, seed):
    """A random linear transform, or an FFD with isotropic 5 mm or anisotropic control spacing."""
    if kind == "ffd":
        return random_ffd(groups, grid, spacing=5.0, std=std, seed=seed)
    if kind == "ffd-aniso":
        return random_ffd(groups, grid, spacing=ANISO[grid.ndim], std=std, seed=seed + 1)
    return random_linear(kind, groups, grid, seed=seed)


@pytest.mark.parametrize("name", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["translation", "rigid", "affine", "ffd", "ffd-aniso"])
def test_warp_matches_sitk_resample(name, kind):
    grid = GRIDS[name]
    groups = 2
    transform = make_transform(kind, groups, grid, std=1.0, seed=11)
    image = blobs(grid, seed=2)
    warped = warp_images(image.expand(groups, *grid.shape), grid, transform)
    lattice = transform.lattice(grid).detach()
    scale = image.abs().max().item()
    for j in range(groups):
        tx = transform.to_sitk(j)
        expected = torch.as_tensor(sitk_resample(image, grid, tx)).float()
        valid = valid_region(lattice[j], grid)
        assert valid.float().mean() > 0.15, "test set-up: too little overlap"
        torch.testing.assert_close(warped[j][valid], expected[valid], atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("name", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["translation", "rigid", "affine", "ffd", "ffd-aniso"])
def test_point_mapping_matches_sitk(name, kind):
    grid = GRIDS[name]
    groups = 3
    transform = make_transform(kind, groups, grid, std=1.5, seed=5)
    pts = interior_points(grid, 50, seed=9, margin=0.05)
    mapped = transform(pts.float()).detach().double()
    for j in range(groups):
        tx = transform.to_sitk(j)
        expected = torch.tensor([tx.TransformPoint(p) for p in pts.tolist()], dtype=torch.float64)
        torch.testing.assert_close(mapped[j], expected, atol=1e-4, rtol=0)
        if isinstance(transform, Rigid | Affine | Translation):
            # the generic (A, b) form of LinearTransform.to_sitk as well
            generic = sitk.AffineTransform(grid.ndim)
            a, b = (x[j].detach().double().numpy() for x in transform.linear())
            generic.SetMatrix(a.ravel().tolist())
            generic.SetTranslation(b.tolist())
            expected2 = torch.tensor(
                [generic.TransformPoint(p) for p in pts.tolist()], dtype=torch.float64
            )
            torch.testing.assert_close(mapped[j], expected2, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_displacement_field_matches_sitk(name):
    grid = GRIDS[name]
    field = 1.5 * torch.randn(1, *grid.shape, grid.ndim, generator=_gen(4))
    transform = DisplacementField(1, grid, field)
    vec = grid.to_sitk(field[0].double(), is_vector=True)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(vec, sitk.sitkVectorFloat64))
    pts = interior_points(grid, 40, seed=2, margin=0.1)
    expected = torch.tensor([tx.TransformPoint(p) for p in pts.tolist()], dtype=torch.float64)
    torch.testing.assert_close(
        transform(pts.float())[0].detach().double(), expected, atol=1e-4, rtol=0
    )


# ---------------------------------------------------------------------------- FFD internals
@pytest.mark.parametrize("name", ["2d", "3d"])
def test_bspline_lattice_fast_path_equals_forward(name):
    grid = GRIDS[name]
    ffd = random_ffd(2, grid, spacing=4.5, std=1.0, seed=1)
    # the domain grid, a coarser one, and a shifted one with other spacing (same direction,
    # partly outside the control lattice) all use the separable path
    shifted = Grid(
        tuple(n + 3 for n in grid.shape),
        tuple(1.7 * s for s in grid.spacing),
        tuple(o - 6.0 for o in grid.origin),
        grid.direction,
    )
    for g in (grid, grid.downsample(2), shifted):
        fast = ffd.lattice(g)
        slow = ffd(g.points().reshape(-1, g.ndim)).reshape(2, *g.shape, g.ndim)
        torch.testing.assert_close(fast, slow, atol=2e-5, rtol=0)
    # a grid with another direction takes the generic path
    other = Grid.from_shape(grid.shape, 1.0, origin=grid.origin)
    torch.testing.assert_close(
        ffd.lattice(other),
        ffd(other.points().reshape(-1, other.ndim)).reshape(2, *other.shape, other.ndim),
    )


def test_bspline_knots_cover_domain():
    grid = OBLIQUE3D
    ffd = BSplineFFD(1, grid, 4.0)
    u = ffd._knot_coordinates(torch.as_tensor(grid.corners()))
    knots = torch.tensor(ffd.knots, dtype=torch.float64)
    # every domain point has its 4 support knots floor(u)-1 .. floor(u)+2 on the lattice
    assert (u >= 1).all() and (u <= knots - 2).all()
    assert ffd.coefficients.shape == (1, 3, *reversed(ffd.knots))


def test_multilevel_ffd_add_level():
    grid = OBLIQUE2D
    ml = MultiLevelFFD(2, grid, 8.0)
    with torch.no_grad():
        ml.levels[0].coefficients.normal_(generator=_gen(0))
    new = ml.add_level()
    assert len(ml.levels) == 2 and ml.levels[1] is new
    assert new.spacing == tuple(s / 2 for s in ml.levels[0].spacing) == (4.0, 4.0)
    assert not ml.levels[0].coefficients.requires_grad
    assert new.coefficients.requires_grad
    assert [p for p in ml.parameters() if p.requires_grad] == [new.coefficients]
    with torch.no_grad():
        new.coefficients.normal_(generator=_gen(1))
    third = ml.add_level()
    assert third.spacing == (2.0, 2.0)
    assert [p.requires_grad for p in ml.parameters()] == [False, False, True]
    with torch.no_grad():
        third.coefficients.normal_(generator=_gen(2))
    pts = interior_points(grid, 40, seed=1).float()
    expected = pts + sum(level.displacement(pts) for level in ml.levels)
    torch.testing.assert_close(ml(pts), expected)
    torch.testing.assert_close(
        ml.lattice(grid),
        ml(grid.points().reshape(-1, 2)).reshape(2, *grid.shape, 2),
        atol=2e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        ml.regularization(), sum(SF.bending_energy(lv.coefficients) for lv in ml.levels)
    )


@pytest.mark.parametrize("ndim, expected", [(2, 5), (3, 9)])
def test_rigid_parameter_count(ndim, expected):
    groups = 4
    rigid = Rigid(groups, ndim)
    per_image = sum(p.numel() for p in (rigid.center, rigid.angles, rigid.offset)) / groups
    assert per_image == expected
    assert sum(p.numel() for p in rigid.parameters()) == expected * groups


# ---------------------------------------------------------------------------- composition
@pytest.mark.parametrize("name", ["2d", "3d"])
def test_composed_transform_order_and_linear_part(name):
    grid = GRIDS[name]
    n, d = 3, grid.ndim
    s1 = random_linear("rigid", n, grid, seed=1)
    s2 = random_linear("affine", n, grid, seed=2)
    s3 = random_linear("translation", n, grid, seed=3)
    composed = ComposedTransform(n, d, [s1, s2, s3])
    pts = interior_points(grid, 25, seed=0).float()
    manual = s1(s2(s3(pts)))
    torch.testing.assert_close(composed(pts), manual, atol=1e-4, rtol=0)
    assert (composed(pts) - s3(s2(s1(pts)))).abs().max() > 1e-2  # the order matters here
    torch.testing.assert_close(
        composed.lattice(grid),
        composed(grid.points().reshape(-1, d)).reshape(n, *grid.shape, d),
        atol=1e-4,
        rtol=0,
    )
    a, b = composed.linear_part()
    torch.testing.assert_close(
        pts @ a.transpose(1, 2) + b.unsqueeze(1), manual.detach(), atol=1e-4, rtol=0
    )
    a1, b1 = s1.linear()
    a2, b2 = s2.linear()
    a3, b3 = s3.linear()
    torch.testing.assert_close(a, (a1 @ a2 @ a3).detach(), atol=1e-6, rtol=0)

    ffd = random_ffd(n, grid, 5.0, 1.0, seed=4)
    with_ffd = ComposedTransform(n, d, [s1, ffd])
    assert with_ffd.linear_part() is None
    torch.testing.assert_close(with_ffd(pts), s1(ffd(pts)))
    torch.testing.assert_close(
        with_ffd.lattice(grid),
        with_ffd(grid.points().reshape(-1, d)).reshape(n, *grid.shape, d),
        atol=1e-4,
        rtol=0,
    )
    assert ComposedTransform(n, d).linear_part()[0].shape == (n, d, d)
    with pytest.raises(ValueError):
        ComposedTransform(n, d, [Rigid(n + 1, d)])


# ---------------------------------------------------------------------------- unbiased constraint
def _randomised(kind: str, grid: Grid, groups: int) -> SpatialTransform:
    if kind in ("translation", "rigid", "affine"):
        return random_linear(kind, groups, grid, seed=21)
    if kind == "ffd":
        return random_ffd(groups, grid, 5.0, 1.5, seed=22)
    if kind == "multilevel":
        ml = MultiLevelFFD(groups, grid, 8.0)
        ml.add_level()
        with torch.no_grad():
            for level in ml.levels:
                level.coefficients.copy_(torch.randn(level.coefficients.shape, generator=_gen(23)))
        return ml
    field = torch.randn(groups, *grid.shape, grid.ndim, generator=_gen(24))
    return DisplacementField(groups, grid, field)


@pytest.mark.parametrize("name", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["translation", "affine", "ffd", "multilevel", "field"])
def test_zero_mean_gives_unbiased_group(name, kind):
    grid = GRIDS[name]
    transform = _randomised(kind, grid, groups=4)
    pts = interior_points(grid, 60, seed=5, margin=0.02).float()
    assert (transform(pts).mean(0) - pts).abs().max() > 1e-2  # not unbiased before
    transform.zero_mean_()
    torch.testing.assert_close(transform(pts).mean(0), pts, atol=1e-5, rtol=0)
    torch.testing.assert_close(transform.lattice(grid).mean(0), grid.points(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_rigid_zero_mean(name):
    grid = GRIDS[name]
    rigid = random_linear("rigid", 4, grid, seed=31)
    rigid.zero_mean_()
    torch.testing.assert_close(
        rigid.angles.mean(0), torch.zeros(rigid.angles.shape[1]), atol=1e-7, rtol=0
    )
    c = rigid.center.detach().mean(0)
    torch.testing.assert_close(rigid(c.unsqueeze(0)).mean(0)[0], c, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["translation", "rigid", "affine", "ffd", "multilevel", "field"])
def test_reset_makes_member_identity(name, kind):
    grid = GRIDS[name]
    transform = _randomised(kind, grid, groups=3)
    pts = interior_points(grid, 30, seed=6).float()
    before = transform(pts).detach()
    transform.reset_(1)
    after = transform(pts).detach()
    torch.testing.assert_close(after[1], pts, atol=1e-5, rtol=0)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])


# ---------------------------------------------------------------------------- bending energy
def _knot_positions(ffd: BSplineFFD) -> torch.Tensor:
    """Physical positions of all knots, ``(*lattice in tensor order, d)``."""
    d = ffd.ndim
    axes = [torch.arange(k, dtype=torch.float64) for k in reversed(ffd.knots)]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).flip(-1)  # (x, y, z) order
    rot = torch.as_tensor(ffd.domain.direction_matrix)
    sp = torch.tensor(ffd.spacing, dtype=torch.float64)
    assert idx.shape[-1] == d
    return torch.as_tensor(ffd.knot_origin()) + (idx * sp) @ rot.T


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_bending_energy_zero_for_affine_coefficients(name):
    grid = GRIDS[name]
    d = grid.ndim
    ffd = BSplineFFD(2, grid, 4.0)
    knots = _knot_positions(ffd)  # (*lattice, d)
    gen = _gen(0)
    a = torch.randn(2, d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(2, d, generator=gen, dtype=torch.float64)
    coeffs = torch.einsum("nab,...b->n...a", a, knots) + b.view(2, *[1] * d, d)
    coeffs = coeffs.movedim(-1, 1)  # (N, d, *lattice)
    energy = SF.bending_energy(coeffs, reduction="none")
    assert energy.shape == (2,)
    assert energy.abs().max() < 1e-12
    random = torch.randn(coeffs.shape, generator=gen, dtype=torch.float64)
    assert (SF.bending_energy(random, reduction="none") > 0).all()


def test_bending_energy_analytic_values():
    """Quadratic meshes: coefficients q*i^2 (i the control-point index) have d2c/di2 = 2q, and
    q*i_x*i_y has d2c/di_x di_y = q (counted twice); R is the mean over the d components, in
    control-point index units whatever the control spacing (the paper's lambda, issue 6.2)."""
    q = 0.7
    iy, ix = torch.meshgrid(torch.arange(7.0), torch.arange(8.0), indexing="ij")
    coeffs = torch.zeros(1, 2, 7, 8, dtype=torch.float64)
    coeffs[0, 0] = q * ix.double() ** 2
    torch.testing.assert_close(SF.bending_energy(coeffs), torch.tensor((2 * q) ** 2 / 2).double())
    coeffs = torch.zeros(1, 2, 7, 8, dtype=torch.float64)
    coeffs[0, 1] = q * (ix * iy).double()
    torch.testing.assert_close(SF.bending_energy(coeffs), torch.tensor(2 * q**2 / 2).double())
    # 3D, both kinds in two of three components: (4 q^2 + 2 q^2) / 3
    iz, iy, ix = torch.meshgrid(*[torch.arange(5.0, dtype=torch.float64)] * 3, indexing="ij")
    coeffs = torch.stack([q * iz**2, torch.zeros_like(iz), q * ix * iy]).unsqueeze(0)
    torch.testing.assert_close(SF.bending_energy(coeffs), torch.tensor(2 * q**2).double())
    # a lattice with no interior point (fewer than 5 knots) carries no bending energy
    assert SF.bending_energy(torch.randn(2, 2, 4, 9)).item() == 0


@pytest.mark.parametrize("d", [2, 3])
def test_bending_energy_matches_numpy_finite_differences(d):
    """The authors' discretisation written out with numpy: central differences of central
    differences of the control mesh, interior points, mean over components and points."""
    coeffs = torch.randn(3, d, *([7, 6, 8][:d]), generator=_gen(2), dtype=torch.float64)
    c = coeffs.numpy()
    axes = list(range(2, 2 + d))
    inner = (slice(None), slice(None), *[slice(2, -2)] * d)
    expected = np.zeros(3)
    for a in axes:
        for b in axes:
            second = np.gradient(np.gradient(c, axis=a), axis=b)[inner]
            expected += (second**2).reshape(3, -1).mean(1)  # (a, b) and (b, a): 2x mixed terms
    torch.testing.assert_close(
        SF.bending_energy(coeffs, reduction="none"), torch.from_numpy(expected)
    )


def test_bspline_regularization_does_not_depend_on_spacing():
    """The same control coefficients give the same R at any control or voxel spacing."""
    fine = Grid.from_shape((32, 32), spacing=0.75)
    coarse = Grid.from_shape((32, 32), spacing=2.0)
    a = random_ffd(2, fine, 6.0, 1.0, seed=3)
    b = BSplineFFD(2, coarse, 16.0)
    assert a.knots == b.knots
    with torch.no_grad():
        b.coefficients.copy_(a.coefficients)
    torch.testing.assert_close(a.regularization(), b.regularization())


@pytest.mark.parametrize("d", [2, 3])
def test_bending_energy_reduction_and_gradient(d):
    shape = (3, d, *([6] * d))
    coeffs = torch.randn(shape, generator=_gen(1), dtype=torch.float64, requires_grad=True)
    base = SF.bending_energy(coeffs, reduction="none")
    assert base.shape == (3,)
    # linear in each member's energy: scaling a member's coefficients by s scales it by s^2
    scaled = coeffs.detach().clone()
    scaled[1] *= 3.0
    torch.testing.assert_close(
        SF.bending_energy(scaled, reduction="none"), base.detach() * torch.tensor([1, 9, 1.0])
    )
    total = SF.bending_energy(coeffs, reduction="sum")
    torch.testing.assert_close(total, base.sum())
    torch.testing.assert_close(SF.bending_energy(coeffs, reduction="mean"), base.mean())
    torch.testing.assert_close(SF.bending_energy(coeffs), total)  # default: sum
    with pytest.raises(ValueError):
        SF.bending_energy(coeffs, reduction="max")
    total.backward()
    assert torch.isfinite(coeffs.grad).all() and coeffs.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(SF.bending_energy, (coeffs,), fast_mode=True)


def test_bspline_regularization_is_bending_energy():
    ffd = random_ffd(2, OBLIQUE2D, 4.0, 1.0, seed=3)
    torch.testing.assert_close(ffd.regularization(), SF.bending_energy(ffd.coefficients))
    assert Rigid(2, 2).regularization().item() == 0.0


# ---------------------------------------------------------------------------- B-spline kernel
def test_cubic_bspline_values_and_partition_of_unity():
    t = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0, 2.5, -3.0], dtype=torch.float64)
    expected = torch.tensor([2 / 3, 1 / 6, 1 / 6, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(SF.cubic_bspline(t), expected, atol=1e-15, rtol=0)
    frac = torch.rand(1000, generator=_gen(0), dtype=torch.float64)
    w = SF.cubic_bspline_weights(frac)
    assert w.shape == (1000, 4)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1000, dtype=torch.float64))
    # the weights are beta_3 at the distances to knots floor-1 .. floor+2
    torch.testing.assert_close(w[:, 1], SF.cubic_bspline(frac))
    torch.testing.assert_close(w[:, 3], SF.cubic_bspline(frac - 2))
    # first moment: sum_i w_i * knot_i == u (B-splines reproduce linear functions)
    torch.testing.assert_close((w * torch.arange(-1.0, 3.0, dtype=torch.float64)).sum(-1), frac)
    torch.testing.assert_close(
        SF.cubic_bspline_weights(torch.zeros(1, dtype=torch.float64)),
        torch.tensor([[1 / 6, 2 / 3, 1 / 6, 0.0]], dtype=torch.float64),
    )
    x = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    assert abs(torch.trapezoid(SF.cubic_bspline(x), x).item() - 1.0) < 1e-8
    # symmetric
    torch.testing.assert_close(SF.cubic_bspline(x), SF.cubic_bspline(-x))


def test_bspline_axis_matrix():
    coords = torch.tensor([1.0, 1.5, 2.25, 3.0], dtype=torch.float64)
    mat = SF.bspline_axis_matrix(coords, 6)
    assert mat.shape == (4, 6)
    torch.testing.assert_close(mat.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(mat[0, :3], torch.tensor([1 / 6, 2 / 3, 1 / 6], dtype=torch.float64))


# ---------------------------------------------------------------------------- rotations
def test_rotation_matrix_orthonormal_and_matches_sitk():
    angles3 = _uniform((6, 3), -math.pi, math.pi, 0).double()
    r = SF.rotation_matrix(angles3)
    eye = torch.eye(3, dtype=torch.float64).expand(6, 3, 3)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(6, dtype=torch.float64))
    for a, m in zip(angles3.tolist(), r, strict=True):
        e = sitk.Euler3DTransform()
        e.SetRotation(*a)
        np.testing.assert_allclose(m.numpy(), np.reshape(e.GetMatrix(), (3, 3)), atol=1e-12)
    angles2 = _uniform((5, 1), -math.pi, math.pi, 1).double()
    r2 = SF.rotation_matrix(angles2)
    torch.testing.assert_close(torch.linalg.det(r2), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(
        r2 @ r2.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(5, 2, 2)
    )
    for a, m in zip(angles2.tolist(), r2, strict=True):
        e = sitk.Euler2DTransform()
        e.SetAngle(a[0])
        np.testing.assert_allclose(m.numpy(), np.reshape(e.GetMatrix(), (2, 2)), atol=1e-12)
    with pytest.raises(ValueError):
        SF.rotation_matrix(torch.zeros(2, 2))


# ---------------------------------------------------------------------------- pyramid
@pytest.mark.parametrize("name", ["2d", "3d"])
def test_image_pyramid(name):
    grid = GRIDS[name]
    images = torch.full((2, 1, *grid.shape), 3.5)
    pyramid = image_pyramid(images, grid, 3)
    assert len(pyramid) == 3
    assert pyramid[-1][0] is images and pyramid[-1][1] == grid
    expected_grids = [grid.downsample(2).downsample(2), grid.downsample(2), grid]
    for (imgs, g), eg in zip(pyramid, expected_grids, strict=True):
        assert g == eg
        assert imgs.shape == (2, 1, *g.shape)
        np.testing.assert_allclose(g.corners(), grid.corners(), atol=1e-9)
        inner = imgs[(slice(None), slice(None), *[slice(1, n - 1) for n in g.shape])]
        torch.testing.assert_close(inner, torch.full_like(inner, 3.5))
    shapes = [np.prod(g.shape) for _, g in pyramid]
    assert shapes == sorted(shapes)  # coarsest first
    assert len(image_pyramid(images, grid, 1)) == 1
    with pytest.raises(ValueError):
        image_pyramid(images, grid, 0)


# ---------------------------------------------------------------------------- gradients
def _warp_loss(transform, params, grid, image, points, weights):
    mapped = torch.func.functional_call(transform, params, (points,))
    normalized = grid.world_to_normalized(mapped)
    values = SF.sample(image.expand(transform.groups, 1, *grid.shape), normalized)
    return (values[:, 0] * weights).sum()


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_rigid_warp_gradcheck(name):
    grid = (
        Grid((7, 8, 9), (1.2, 1.0, 0.9), (1.0, -2.0, 3.0), OBLIQUE3D.direction)
        if name == "3d"
        else Grid((9, 11), (1.1, 0.9), (2.0, -1.0), OBLIQUE2D.direction)
    )
    image = blobs(grid, seed=4).double().unsqueeze(0).unsqueeze(0)
    rigid = random_linear("rigid", 2, grid, seed=8).double()
    points = grid.points(dtype=torch.float64).reshape(-1, grid.ndim)
    weights = torch.rand(2, points.shape[0], generator=_gen(2), dtype=torch.float64)
    params = tuple(
        p.detach().clone().requires_grad_() for p in (rigid.angles, rigid.offset, rigid.center)
    )

    def loss(angles, offset, center):
        return _warp_loss(
            rigid,
            {"angles": angles, "offset": offset, "center": center},
            grid,
            image,
            points,
            weights,
        )

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_ffd_warp_gradcheck(name):
    grid = (
        Grid((7, 8, 9), (1.2, 1.0, 0.9), (1.0, -2.0, 3.0), OBLIQUE3D.direction)
        if name == "3d"
        else Grid((9, 11), (1.1, 0.9), (2.0, -1.0), OBLIQUE2D.direction)
    )
    image = blobs(grid, seed=4).double().unsqueeze(0).unsqueeze(0)
    ffd = random_ffd(2, grid, spacing=4.0, std=0.7, seed=9).double()
    points = grid.points(dtype=torch.float64).reshape(-1, grid.ndim)
    weights = torch.rand(2, points.shape[0], generator=_gen(3), dtype=torch.float64)
    coeffs = ffd.coefficients.detach().clone().requires_grad_()

    def loss(c):
        return _warp_loss(ffd, {"coefficients": c}, grid, image, points, weights)

    # full Jacobian in 2D; random projections in 3D (1,000+ coefficients) to stay fast
    assert torch.autograd.gradcheck(
        loss, (coeffs,), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=name == "3d"
    )


@pytest.mark.parametrize("kind", ["rigid", "ffd", "composed"])
def test_warp_gradients_float32_lattice_path(kind):
    """The float32 lattice path used by the engine gives finite, non-zero gradients equal to the
    float64 point path checked by gradcheck above."""
    grid = OBLIQUE2D
    image = blobs(grid, seed=5).unsqueeze(0).unsqueeze(0)
    if kind == "rigid":
        transform = random_linear("rigid", 2, grid, seed=4)
    elif kind == "ffd":
        transform = random_ffd(2, grid, 5.0, 0.5, seed=6)
    else:
        transform = ComposedTransform(
            2, 2, [random_linear("rigid", 2, grid, seed=4), random_ffd(2, grid, 5.0, 0.5, seed=6)]
        )
    normalized = grid.world_to_normalized(transform.lattice(grid))
    loss = SF.sample(image.expand(2, 1, *grid.shape), normalized).pow(2).mean()
    loss.backward()
    names = [n for n, p in transform.named_parameters() if p.requires_grad]
    grads = {n: p.grad for n, p in transform.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0

    params = {n: p.detach().double().requires_grad_() for n, p in transform.named_parameters()}
    points = grid.points(dtype=torch.float64).reshape(-1, 2)
    mapped = torch.func.functional_call(transform, params, (points,))
    ref = SF.sample(image.double().expand(2, 1, *grid.shape), grid.world_to_normalized(mapped))
    ref.pow(2).mean().backward()
    for n in names:
        scale = params[n].grad.abs().max().item()
        torch.testing.assert_close(grads[n].double(), params[n].grad, atol=1e-3 * scale, rtol=1e-2)


@pytest.mark.parametrize("kind", ["rigid", "ffd"])
def test_lattice_follows_parameter_dtype(kind):
    grid = OBLIQUE2D
    transform = (
        random_linear("rigid", 2, grid, seed=1)
        if kind == "rigid"
        else random_ffd(2, grid, 5.0, 1.0, seed=1)
    ).double()
    lattice = transform.lattice(grid)
    assert lattice.dtype == torch.float64
    torch.testing.assert_close(
        lattice, transform(grid.points(dtype=torch.float64).reshape(-1, 2)).reshape(lattice.shape)
    )


@pytest.mark.parametrize("kind", ["rigid", "ffd", "multilevel", "composed", "field"])
def test_transforms_run_in_float32_under_autocast(kind):
    """Issue 6.5: under autocast the FFD lattice crashed (bf16 tensordot against float32
    matrices); every map now gives exactly its float32 result, with float32 gradients."""
    grid = OBLIQUE2D
    if kind == "rigid":
        transform = random_linear("rigid", 2, grid, seed=4)
    elif kind == "composed":
        transform = ComposedTransform(
            2, 2, [random_linear("rigid", 2, grid, seed=4), random_ffd(2, grid, 5.0, 0.5, seed=6)]
        )
    else:
        transform = _randomised(kind, grid, groups=2)
    image = blobs(grid, seed=5).expand(2, 1, *grid.shape)
    points = interior_points(grid, 20, seed=7).float()

    def run(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lattice = transform.lattice(grid)
            warped = SF.sample(image, grid.world_to_normalized(lattice))
            loss = warped.pow(2).mean() + transform.regularization()
            mapped = transform(points)
        # backward outside the autocast region, as in torch.amp's recipe
        grads = torch.autograd.grad(loss, [p for p in transform.parameters() if p.requires_grad])
        return [lattice, mapped, warped, loss, *grads]

    for a, b in zip(run(True), run(False), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_paper_lambda_changes_the_smoothness_of_a_registration():
    """Issue 6.2: with R in control-point index units the paper's lambda acts as in the paper.
    A 32^2 pair (two contrasts of one image, known FFD misalignment) registered by X-CoReg:
    lambda = 0.001 (BrainWeb) already smooths the result; lambda = 100 (DCC) nearly removes
    the bending (in physical units both were ~1e-4 times weaker at 8 mm spacing)."""
    from dcc.coreg import StageConfig, XCoReg, XCoRegConfig

    grid = Grid.from_shape((32, 32), spacing=1.0)
    image = blobs(grid, seed=1, count=8)
    truth = random_ffd(2, grid, 8.0, 1.0, seed=2)
    truth.zero_mean_()
    images = warp_images(torch.stack([image, 2.0 - image]), grid, truth)
    energy = {}
    for lam in (0.0, 0.001, 100.0):
        stage = StageConfig(name="ffd", iterations=30, lr=0.2, ffd_spacing=8.0)
        config = XCoRegConfig(
            stages=[stage], num_classes=3, bins=16, sample_rate=1.0, bending_weight=lam,
            progress=False,
        )  # fmt: skip
        result = XCoReg(config).register(images, grid)
        energy[lam] = result.transform.regularization().item()
    assert energy[0.0] > 0.1
    assert energy[0.001] < 0.7 * energy[0.0], energy
    assert energy[100.0] < 0.01 * energy[0.0], energy


@pytest.mark.parametrize("make", [
    lambda: ComposedTransform(3, 2),
    lambda: ComposedTransform(3, 2, [Translation(3, 2)]),
])
def test_transform_points_follow_the_device_it_was_moved_to(make):
    """An empty composition has no parameter to follow: its points must still land on the
    device it was moved to (``dcc-register --device cuda`` crashed on exactly this)."""
    transform = make().to("meta")
    assert transform.lattice(OBLIQUE2D).device.type == "meta"
    assert transform(torch.zeros(7, 2, device="meta")).device.type == "meta"
    assert "_anchor" not in transform.state_dict()


@pytest.mark.parametrize("ndim", [2, 3])
def test_lattice_at_equals_the_lattice_at_those_voxels(ndim):
    """lattice_at (the engine's per-step warp of the coordinate sample) is lattice() indexed."""
    shape = (7, 9, 8)[-ndim:]
    grid = Grid(shape, (1.5, 2.0, 2.5)[:ndim], (3.0, -4.0, 1.0)[:ndim], tuple(np.eye(ndim).ravel()))
    n = 3
    torch.manual_seed(0)
    ffd = MultiLevelFFD(n, grid, 6.0)
    ffd.add_level()
    rigid = Rigid(n, ndim, center=grid.center)
    field = DisplacementField(n, grid, torch.randn(n, *shape, ndim))
    with torch.no_grad():
        for level in ffd.levels:
            level.coefficients.normal_()
        rigid.angles.normal_(std=0.2)
        rigid.offset.normal_()
    index = torch.randperm(grid.numel)[:25]
    transforms = [ffd, ffd.levels[0], rigid, field, ComposedTransform(n, ndim, [rigid, ffd])]
    for transform in transforms:
        dense = transform.lattice(grid).reshape(n, -1, ndim)[:, index]
        torch.testing.assert_close(transform.lattice_at(grid, index), dense, atol=1e-4, rtol=0)


def test_pyramid_keeps_thick_slices_until_the_plane_catches_up():
    grid = Grid.from_shape((36, 64, 64), (0.7, 0.7, 4.0))  # (x, y, z) spacing: thick slices
    shapes = [g.shape for g in pyramid_grids(grid, 4)][::-1]  # finest first
    assert shapes == [(36, 64, 64), (36, 32, 32), (36, 16, 16), (18, 8, 8)]
    iso = GRIDS["3d"]
    assert pyramid_grids(iso, 2)[0] == iso.downsample(2)  # isotropic: every axis halved
    assert shrink_factors(grid) == [2, 2, 1]


@pytest.mark.parametrize("shape", [(20, 22), (9, 20, 22)])
def test_gaussian_blur_scipy_path_matches_the_convolution(shape):
    torch.manual_seed(0)
    x = torch.rand(2, 1, *shape)
    sigmas = [0.7, 1.0] if len(shape) == 2 else [0.0, 1.0, 0.7]
    fast = gaussian_blur(x, sigmas)  # SciPy (CPU, no autograd)
    conv = gaussian_blur(x.clone().requires_grad_(True), sigmas)  # convolutions
    torch.testing.assert_close(fast, conv.detach(), atol=1e-6, rtol=0)
    if len(shape) == 3:  # sigma 0 leaves that axis alone: a profile along z survives
        profile = torch.linspace(0, 1, shape[0]).view(1, 1, -1, 1, 1).expand(1, 1, *shape)
        torch.testing.assert_close(gaussian_blur(profile, sigmas), profile)
