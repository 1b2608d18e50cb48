"""X-CoReg on grids larger than the checks look at (3D volumes): bounded coordinate samples,
the checks on a fixed voxel subset, Gamma from the appearance model, the final Gamma."""

import math

import pytest
import torch

from dcc.coreg import StageConfig, XCoReg, XCoRegConfig
from dcc.coreg.engine import ASSESS_POINTS, CommonSpace
from dcc.data.misalignment import misaligned_phantom
from dcc.similarity import functional as XF
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import ComposedTransform


@pytest.fixture(scope="module")
def rigid_3d():
    # 4 mm 3D phantom (46 x 55 x 46 voxels, more than ASSESS_POINTS), rigid misalignment
    return misaligned_phantom(dim=3, downsample=4, kind="rigid", magnitude=6.0, seed=1)


def test_bounded_samples_recover_a_3d_rigid_misalignment(rigid_3d):
    assert rigid_3d.grid.numel > ASSESS_POINTS  # the checks look at a voxel subset
    stage = StageConfig.named("rigid", iterations=80, levels=2, max_sample=4096, lr_final=0.1)
    config = XCoRegConfig(stages=[stage], mask_zero_fill=False, progress=False)
    engine = XCoReg(config)
    drawn = []
    original = engine._draw
    engine._draw = lambda *a: drawn.append(original(*a)) or drawn[-1]
    result = engine.register(rigid_3d.images, rigid_3d.grid)
    before, after = rigid_3d.warping_index(), rigid_3d.warping_index(result.transform)
    assert before > 4.0 and after < 0.15 * before, f"gWI {before:.2f} -> {after:.2f} mm"
    assert result.diagnostics["stages"][0]["accepted"]
    # every step on the finer level drew exactly max_sample voxels, sorted, on the lattice
    assert drawn and all(d.numel() == 4096 for d in drawn)
    assert all(bool((d[1:] >= d[:-1]).all()) and int(d.max()) < rigid_3d.grid.numel
               for d in drawn)


def test_bounded_draw_stays_in_the_roi():
    grid = Grid.from_shape((8, 9, 10), (1.0, 1.0, 2.0))
    engine = XCoReg(XCoRegConfig(progress=False))
    engine.generator = torch.Generator().manual_seed(0)
    engine._sample_cache = {}
    roi = torch.zeros(grid.numel, dtype=torch.bool)
    roi[100:140] = True
    index = engine._draw(roi, grid, 500, "cpu")
    assert index.numel() == 500 and bool(roi[index].all())
    assert len(set(index.tolist())) > 35  # uniform over the 40 roi voxels


def test_gamma_from_the_model_in_other_bins():
    """log_gamma_at reads values binned with other L exactly as the model's own binning."""
    torch.manual_seed(0)
    images = torch.rand(3, 500) * 100
    ranges = XF.intensity_range(images)
    model_values = XF.to_bins(images, ranges, 32)
    gamma = torch.softmax(torch.randn(500, 4), -1)
    log_f = XF.appearance_model(model_values, gamma, 32)
    common = CommonSpace(log_f, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    expected = XF.posterior(model_values, log_f, common.log_pi)[0]
    torch.testing.assert_close(common.log_gamma_at(XF.to_bins(images, ranges, 64), 64), expected,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(common.log_gamma_at(model_values, 32), expected)


def test_final_gamma_comes_from_the_images_that_cover_each_voxel():
    grid = Grid.from_shape((6, 7), 1.0)
    n, bins, k = 2, 16, 3
    torch.manual_seed(1)
    values = 1 + torch.rand(n, *grid.shape) * (bins - 3)
    valid = torch.ones(n, *grid.shape)
    valid[1, :, :3] = 0  # image 1 does not cover the first three columns
    valid[0, :2, :2] = 0  # ... nor does image 0 the top-left corner
    images = torch.stack([values, valid], 1)
    log_f = torch.log_softmax(torch.randn(n, bins, k), 1)
    log_pi = torch.log(torch.tensor([0.2, 0.3, 0.5]))
    engine = XCoReg(XCoRegConfig(progress=False))
    out = engine._dense_gamma(CommonSpace(log_f, log_pi), ComposedTransform(n, 2), images, grid)
    out = out.log().reshape(*grid.shape, k)
    both = XF.posterior(values.reshape(n, -1), log_f, log_pi)[0].reshape(*grid.shape, k)
    only0 = XF.posterior(values[:1].reshape(1, -1), log_f[:1], log_pi)[0].reshape(*grid.shape, k)
    torch.testing.assert_close(out[:, 3:], both[:, 3:])
    torch.testing.assert_close(out[2:, :3], only0[2:, :3])
    torch.testing.assert_close(out[:2, :2], log_pi.expand(2, 2, k))  # no image: pi alone
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(grid.shape))


def test_checks_on_a_voxel_subset_are_fixed_and_estimate_the_overlap(rigid_3d):
    engine = XCoReg(XCoRegConfig(progress=False, seed=4))
    engine._roi_source, engine._roi_cache, engine._assess_cache = (None, None), {}, {}
    grid = rigid_3d.grid
    images = torch.stack([rigid_3d.images, torch.ones_like(rigid_3d.images)], 1)
    images[:, 1, : grid.shape[0] // 4] = 0  # a quarter of the slices outside the fields of view
    transform = ComposedTransform(images.shape[0], 3)
    values, overlap, fraction = engine._assessment(transform, images, grid)
    again = engine._assessment(transform, images, grid)
    assert values.shape == (images.shape[0], ASSESS_POINTS)
    torch.testing.assert_close(again[0], values)  # the same voxels every time
    inside = (grid.shape[0] - grid.shape[0] // 4 - 1) / grid.shape[0]  # interpolated at the edge
    assert math.isclose(fraction, inside, abs_tol=0.03)
