"""Tests of dcc.evaluation: gWI / gRE (Eqs. (49)-(52)), Dice, and the PNG figures."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from dcc.data.misalignment import misaligned_phantom
from dcc.evaluation.figures import save_montage, save_overlay
from dcc.metrics import (
    dice,
    foreground_mask,
    groupwise_registration_error,
    groupwise_warping_index,
    pairwise_dice,
    registration_error,
    warping_index,
)
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import Rigid, Translation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _points(m: int = 50, d: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, d, generator=g, dtype=torch.float64) * 100.0


# ---------------------------------------------------------------------------- gWI
def test_gwi_identity_is_zero():
    x = _points()
    mapped = x.unsqueeze(0).repeat(4, 1, 1)
    assert groupwise_warping_index(mapped, x).item() == 0.0


def test_gwi_common_translation_is_zero():
    x = _points(d=2)
    shift = torch.tensor([3.0, -7.5], dtype=torch.float64)
    mapped = (x + shift).unsqueeze(0).repeat(5, 1, 1)
    assert groupwise_warping_index(mapped, x).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("a", [0.5, 1.5, 4.0])
def test_gwi_opposite_shifts_gives_a(a):
    x = _points()
    e = torch.tensor([a, 0.0, 0.0], dtype=torch.float64)
    mapped = torch.stack([x + e, x - e])
    assert groupwise_warping_index(mapped, x).item() == a
    # an extra common translation does not change it
    t = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    assert groupwise_warping_index(mapped + t, x).item() == pytest.approx(a, abs=1e-12)


def test_gwi_foreground_restriction():
    # N=2, M=4 points on a line; residuals +-r(x) along y, r = [1, 1, 3, 3].
    x = torch.zeros(4, 2, dtype=torch.float64)
    x[:, 0] = torch.arange(4)
    r = torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64)
    mapped = x.unsqueeze(0).repeat(2, 1, 1)
    mapped[0, :, 1] += r
    mapped[1, :, 1] -= r
    # all points: sqrt(mean(1,1,9,9)) = sqrt(5) for both images
    assert groupwise_warping_index(mapped, x).item() == pytest.approx(math.sqrt(5.0))
    fg = torch.tensor([[True, True, False, False], [False, False, True, True]])
    # image 0 averages over r=1 points -> 1, image 1 over r=3 points -> 3; (1 + 3)/2 = 2
    assert groupwise_warping_index(mapped, x, fg).item() == pytest.approx(2.0)
    # the group mean still uses all images: image 1 excluded at a point doesn't alter r_bar_0
    fg_one = torch.tensor([[True, False, False, False], [True, True, True, True]])
    assert groupwise_warping_index(mapped, x, fg_one).item() == pytest.approx(
        (1.0 + math.sqrt(5.0)) / 2
    )
    # an image with empty foreground drops out of the outer mean
    fg_empty = torch.tensor([[False] * 4, [True, True, True, True]])
    assert groupwise_warping_index(mapped, x, fg_empty).item() == pytest.approx(math.sqrt(5.0))
    assert math.isnan(groupwise_warping_index(mapped, x, torch.zeros(2, 4, dtype=bool)).item())


def test_gwi_is_differentiable_and_checks_shapes():
    x = _points(m=10)
    mapped = (x + 0.1 * torch.randn(3, 10, 3, dtype=torch.float64)).requires_grad_(True)
    groupwise_warping_index(mapped, x).backward()
    assert mapped.grad is not None and torch.isfinite(mapped.grad).all()
    with pytest.raises(ValueError):
        groupwise_warping_index(mapped.detach(), x[:5])


# ---------------------------------------------------------------------------- gRE
def test_gre_identical_corners_is_zero():
    corners = torch.as_tensor(Grid.from_shape((4, 5, 6), spacing=2.0).corners())
    mapped = corners.unsqueeze(0).repeat(3, 1, 1) + torch.tensor([5.0, 0.0, 1.0])
    assert groupwise_registration_error(mapped).item() == pytest.approx(0.0, abs=1e-12)


def test_gre_opposite_rotations_by_hand():
    # Square [-1, 1]^2 corners (distance sqrt(2) from the centre). Image 0 rotated by +t,
    # image 1 by -t: the mean of the two is the corner scaled by cos t, so
    # ||e_bar_j(v)|| = sqrt(2) * sin t at every corner and gRE = sqrt(2) * sin t.
    corners = torch.as_tensor(Grid.from_shape((3, 3), origin=(-1.0, -1.0)).corners())
    t = 0.3

    def rot(a):
        c, s = math.cos(a), math.sin(a)
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)

    mapped = torch.stack([corners @ rot(t).T, corners @ rot(-t).T])
    expected = math.sqrt(2.0) * math.sin(t)
    assert groupwise_registration_error(mapped).item() == pytest.approx(expected, rel=1e-12)


def test_gre_single_outlier_n3():
    # N=3, one image shifted by 3 mm: deviations from the mean are 2, 1, 1 mm.
    corners = torch.as_tensor(Grid.from_shape((2, 2, 2)).corners())
    mapped = corners.unsqueeze(0).repeat(3, 1, 1)
    mapped[0, :, 2] += 3.0
    assert groupwise_registration_error(mapped).item() == pytest.approx((2.0 + 1.0 + 1.0) / 3)


# ---------------------------------------------------------------------------- from transforms
OBLIQUE = (math.cos(0.4), -math.sin(0.4), math.sin(0.4), math.cos(0.4))


def test_grid_vertices_are_the_outer_voxel_edges():
    # x: 10 voxels of 2 mm, y: 8 voxels of 3 mm; centres of the corner voxels at x in {5, 23},
    # y in {-4, 17}; the field of view reaches half a voxel further.
    grid = Grid.from_shape((8, 10), spacing=(2.0, 3.0), origin=(5.0, -4.0))
    expected = {(4.0, -5.5), (4.0, 18.5), (24.0, -5.5), (24.0, 18.5)}
    assert {tuple(v) for v in grid.vertices().round(9).tolist()} == expected
    assert {tuple(v) for v in grid.corners().round(9).tolist()} == {
        (5.0, -4.0), (5.0, 17.0), (23.0, -4.0), (23.0, 17.0)
    }  # fmt: skip


def test_registration_error_of_known_rigid_errors_by_hand():
    """gRE (Eqs. 51-52) from transforms and a grid, at the vertices of the field of view."""
    grid = Grid.from_shape((8, 10), spacing=(2.0, 3.0), origin=(5.0, -4.0), direction=OBLIQUE)
    # opposite shifts of a along x: every vertex is a from the group mean -> gRE = a
    shifts = Translation(2, 2)
    with torch.no_grad():
        shifts.offset.copy_(torch.tensor([[1.5, 0.0], [-1.5, 0.0]]))
    assert registration_error(shifts, grid) == pytest.approx(1.5, rel=1e-6)
    # an estimate that undoes them up to a common shift leaves no error
    undo = Translation(2, 2)
    with torch.no_grad():
        undo.offset.copy_(torch.tensor([[-1.5, 2.0], [1.5, 2.0]]))
    assert registration_error(shifts, grid, undo) == pytest.approx(0.0, abs=1e-5)
    # image 0 rotated by t about the centre, image 1 not: each vertex is sin(t/2) r from the
    # mean, r = half the diagonal of the 20 x 24 mm field of view (not of the voxel centres)
    t = 0.2
    rotation = Rigid(2, 2, center=grid.center)
    with torch.no_grad():
        rotation.angles[0, 0] = t
    expected = math.sin(t / 2) * math.hypot(10.0, 12.0)
    assert registration_error(rotation, grid) == pytest.approx(expected, rel=1e-5)
    assert expected - math.sin(t / 2) * math.hypot(9.0, 10.5) > 0.1  # centres would differ


def test_registration_error_3d_rotation_about_z_by_hand():
    grid = Grid.from_shape((4, 6, 5), spacing=(1.0, 2.0, 3.0), origin=(-7.0, 3.0, 11.0))
    t = 0.15
    rotation = Rigid(3, 3, center=grid.center)
    with torch.no_grad():
        rotation.angles[0] = torch.tensor([0.0, 0.0, t])  # about z: moves x and y only
    # image 0 is 2/3 |R v - v| from the mean, images 1 and 2 1/3 of it; the field of view is
    # 5 x 12 x 12 mm, so |R v - v| = 2 sin(t/2) hypot(2.5, 6) at every vertex
    d = 2 * math.sin(t / 2) * math.hypot(2.5, 6.0)
    expected = (2 / 3 * d + 1 / 3 * d + 1 / 3 * d) / 3
    assert registration_error(rotation, grid) == pytest.approx(expected, rel=1e-5)


def test_metrics_leave_the_estimate_where_it_is(monkeypatch):
    """Issue 6.4: the evaluation moved the caller's transform to the CPU in place
    (``Module.cpu()``); now it is applied where it lives and only points move."""
    group = misaligned_phantom(dim=2, downsample=4, magnitude=3.0, seed=0)
    estimate = Translation(group.images.shape[0], 2).double()
    with torch.no_grad():
        estimate.offset.normal_(generator=torch.Generator().manual_seed(1))

    def refuse(*args, **kwargs):
        raise AssertionError("the estimate was moved or cast")

    points = group.grid.points().reshape(-1, 2)
    mapped = group.truth(estimate(points.double()).float())
    mask = foreground_mask(mapped, group.grid, group.foreground)
    expected = groupwise_warping_index(mapped, points, mask).item()
    monkeypatch.setattr(estimate, "_apply", refuse)  # .cpu(), .to(), .cuda() all go through it
    assert group.warping_index(estimate) == pytest.approx(expected, rel=1e-6)
    assert warping_index(group.truth, group.grid, estimate, group.foreground) == pytest.approx(
        expected, rel=1e-6
    )
    vertices = torch.as_tensor(group.grid.vertices(), dtype=torch.float64)
    expected_gre = groupwise_registration_error(group.truth(estimate(vertices).float())).item()
    assert group.registration_error(estimate) == pytest.approx(expected_gre, rel=1e-6)
    assert estimate.offset.dtype == torch.float64
    # before registration (no estimate) gWI and gRE are those of the truth alone
    assert group.warping_index() > 1.0 and group.registration_error() > 1.0


# ---------------------------------------------------------------------------- foreground mask
def test_foreground_mask_2d():
    grid = Grid.from_shape((4, 5), spacing=(2.0, 3.0), origin=(10.0, 20.0))  # (H, W) = (4, 5)
    labels = torch.zeros(4, 5, dtype=torch.int64)
    labels[1, 3] = 2  # row (y index) 1, column (x index) 3
    # physical point of ITK index (x=3, y=1) is (10 + 2*3, 20 + 3*1) = (16, 23)
    pts = torch.tensor(
        [
            [[16.0, 23.0], [16.9, 23.4], [10.0, 20.0], [100.0, 23.0]],
            [[15.2, 22.0], [18.0, 23.0], [16.0, 26.0], [-50.0, -50.0]],
        ]
    )
    mask = foreground_mask(pts, grid, labels)
    assert mask.dtype == torch.bool and mask.shape == (2, 4)
    expected = torch.tensor([[True, True, False, False], [True, False, False, False]])
    assert torch.equal(mask, expected)


def test_foreground_mask_3d_and_per_image_labels():
    grid = Grid.from_shape((3, 4, 5), spacing=1.0)  # (D, H, W)
    labels = torch.zeros(3, 4, 5, dtype=torch.uint8)
    labels[2, 1, 4] = 1  # z=2, y=1, x=4
    pts = torch.tensor([[[4.0, 1.0, 2.0], [4.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    assert foreground_mask(pts, grid, labels).tolist() == [[True, False, False]]
    per_image = torch.stack([labels, torch.ones_like(labels)])
    both = torch.cat([pts, pts])
    assert foreground_mask(both, grid, per_image).tolist() == [
        [True, False, False],
        [True, True, True],
    ]


# ---------------------------------------------------------------------------- Dice
def test_pairwise_dice_identical_is_one():
    g = torch.Generator().manual_seed(1)
    lab = torch.randint(0, 4, (6, 7), generator=g)
    labels = lab.unsqueeze(0).repeat(5, 1, 1)
    out = pairwise_dice(labels)
    assert out["pairs"] == 10
    assert set(out["per_label"]) == {int(v) for v in lab.unique() if v != 0}
    assert all(v == pytest.approx(1.0) for v in out["per_label"].values())
    assert out["mean"] == pytest.approx(1.0)


def test_pairwise_dice_disjoint_is_zero():
    labels = torch.zeros(2, 4, 4, dtype=torch.int64)
    labels[0, :2] = 1
    labels[1, 2:] = 1
    out = pairwise_dice(labels)
    assert out["per_label"] == {1: 0.0} and out["mean"] == 0.0 and out["pairs"] == 1


def test_pairwise_dice_hand_computed():
    # 1D maps of length 8 (shape (8,)), three images.
    a = torch.tensor([1, 1, 1, 1, 0, 0, 2, 2])
    b = torch.tensor([0, 1, 1, 1, 1, 0, 2, 0])
    c = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0])
    labels = torch.stack([a, b, c])
    # label 1: (a,b) 2*3/(4+4)=0.75; (a,c) 0/(4+0)=0; (b,c) 0/(4+0)=0 -> mean 0.25
    # label 2: (a,b) 2*1/(2+1)=2/3; (a,c) 0; (b,c) 0 -> mean 2/9
    out = pairwise_dice(labels)
    assert out["pairs"] == 3
    assert out["per_label"][1] == pytest.approx(0.25)
    assert out["per_label"][2] == pytest.approx(2.0 / 9.0)
    assert out["mean"] == pytest.approx((0.25 + 2.0 / 9.0) / 2)
    two = dice(a, b)
    assert two[1] == pytest.approx(0.75) and two[2] == pytest.approx(2.0 / 3.0)
    # mask: keep only the first four voxels -> label 1 of (a,b): 2*3/(4+3)
    mask = torch.tensor([True] * 4 + [False] * 4)
    assert dice(a, b, [1], mask=mask)[1] == pytest.approx(6.0 / 7.0)


def test_pairwise_dice_empty_labels_skipped():
    a = torch.tensor([[1, 1], [0, 0]])
    b = torch.tensor([[1, 0], [0, 0]])
    c = torch.tensor([[0, 0], [0, 0]])
    labels = torch.stack([a, b, c])
    # label 3 absent everywhere: every pair skipped -> NaN, ignored in "mean"
    out = pairwise_dice(labels, label_values=[1, 3])
    assert math.isnan(out["per_label"][3])
    assert out["per_label"][1] == pytest.approx((2.0 / 3.0 + 0.0 + 0.0) / 3)
    assert out["mean"] == pytest.approx(out["per_label"][1])
    # label present only in a and b: the pair (c, d) with both empty is skipped
    d = torch.zeros_like(a)
    out = pairwise_dice(torch.stack([a, b, c, d]), label_values=[1])
    # valid pairs: (a,b)=2/3, (a,c)=0, (a,d)=0, (b,c)=0, (b,d)=0; (c,d) skipped
    assert out["per_label"][1] == pytest.approx((2.0 / 3.0) / 5)
    assert out["pairs"] == 6
    assert math.isnan(dice(c, d, [1])[1])


def test_pairwise_dice_n30_3d_matches_loop():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (30, 6, 7, 8), generator=g)
    out = pairwise_dice(labels)
    assert out["pairs"] == 435
    ref = []
    for i in range(30):
        for j in range(i + 1, 30):
            a, b = labels[i] == 2, labels[j] == 2
            ref.append(2.0 * (a & b).sum().item() / (a.sum() + b.sum()).item())
    assert out["per_label"][2] == pytest.approx(float(np.mean(ref)), rel=1e-12)


# ---------------------------------------------------------------------------- figures
def _check_png(path, max_width=3000):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and 100 < img.shape[1] <= max_width
    return img


def _phantom_group(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    axes = [torch.linspace(-1, 1, s) for s in shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    shifts = 0.2 * (torch.rand(n, d, generator=g) - 0.5)
    imgs, labs = [], []
    for k in range(n):
        r = ((coords - shifts[k].view(d, *([1] * d))) ** 2).sum(0).sqrt()
        lab = (r < 0.6).long() + (r < 0.3).long()
        imgs.append(lab.float() * (1.0 + k % 3) + 0.05 * torch.randn(shape, generator=g))
        labs.append(lab)
    return torch.stack(imgs), torch.stack(labs)


@pytest.mark.parametrize(
    "n, shape, with_extras",
    [(3, (32, 40), True), (30, (24, 24), True), (4, (10, 20, 24), True), (3, (16, 16), False)],
)
def test_save_montage(tmp_path, n, shape, with_extras):
    before, labels = _phantom_group(n, shape)
    after = before.roll(1, dims=-1)
    kwargs = {}
    if with_extras:
        post = torch.softmax(torch.randn(3, *shape), dim=0)
        kwargs = dict(posterior=post, names=[f"img{i}" for i in range(n)], labels_after=labels)
    path = tmp_path / "sub" / "montage.png"
    save_montage(path, before, after, **kwargs)
    img = _check_png(path)
    assert img.shape[0] < img.shape[1]  # two rows, many columns


@pytest.mark.parametrize("shape", [(32, 48), (12, 20, 24)])
def test_save_overlay(tmp_path, shape):
    imgs, labs = _phantom_group(1, shape)
    path = tmp_path / "overlay.png"
    save_overlay(path, imgs[0], labs[0], title="phantom")
    _check_png(path)
    # empty label map also works
    save_overlay(tmp_path / "empty.png", imgs[0], torch.zeros_like(labs[0]))
    _check_png(tmp_path / "empty.png")


def test_surface_distances_in_mm_with_the_nan_rule():
    """A square shifted by 3 columns of 2 mm: the Hausdorff distance is 6 mm whatever the rows'
    spacing; identical maps give 0; a missing structure gives NaN, left out of the means."""
    from dcc.metrics import pairwise_surface_distances, surface_distances

    a = torch.zeros(20, 20, dtype=torch.long)
    a[5:15, 5:15] = 1
    b = torch.roll(a, 3, dims=1)
    d = surface_distances(a, b, [1, 2], spacing=(2.0, 0.5))  # (x, y): columns 2 mm
    assert d[1]["hd95"] == pytest.approx(6.0)
    assert 0 < d[1]["asd"] < 6.0
    assert math.isnan(d[2]["hd95"]) and math.isnan(d[2]["asd"])
    same = surface_distances(a, a, [1], spacing=(1.0, 1.0))
    assert same[1] == {"hd95": 0.0, "asd": 0.0}
    pairs = pairwise_surface_distances(torch.stack([a, a, b]), [1, 2], spacing=(2.0, 0.5))
    # pairs (a, a), (a, b), (a, b): 0, 6, 6 mm
    assert pairs["hd95"]["per_label"][1] == pytest.approx(4.0)
    assert pairs["hd95"]["mean"] == pytest.approx(4.0)  # label 2: NaN, left out
