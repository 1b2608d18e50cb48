"""Real cardiac MR (MyoPS 2020 slices, the cmr_multiparam fixture): loading and registration.

Needs the data folder of ``DCC_DATA_ROOT`` (or ``../shared/data`` beside the repository); the
whole module is skipped with the reason when it is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dcc.coreg import StageConfig, XCoReg, load_preset
from dcc.coreg.config import auto_config
from dcc.data.cardiac import (
    MYOPS_SEQUENCES,
    data_root,
    load_multiparam_fixture,
    load_myops_slices,
    merge_labels,
    myops_cases,
)
from dcc.data.io import InputError, read_image, resample_to_grid
from dcc.data.misalignment import random_rigid, warp_images
from dcc.metrics import pairwise_dice
from dcc.spatial.grid import Grid

ROOT = data_root()
NEEDED = ("myops2020", "cmr_multiparam_sub2092")


def _skip_reason() -> str | None:
    if ROOT is None:
        return "real data not found: set DCC_DATA_ROOT (CI uses ../shared/data)"
    missing = [n for n in NEEDED if not (ROOT / n).is_dir()]
    if missing:
        return f"real data folder {ROOT} lacks {', '.join(missing)}"
    return None


pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]

CASE = "Case3001"


@pytest.fixture(scope="module")
def myops_full():
    return load_myops_slices(ROOT / "myops2020" / CASE, crop=None)


@pytest.fixture(scope="module")
def myops_crop():
    return load_myops_slices(ROOT / "myops2020" / CASE)


def test_myops_slices_shapes_labels_spacing(myops_crop):
    images, labels, grid = myops_crop
    assert images.shape == (3, 160, 160) and images.dtype == torch.float32
    assert labels.shape == (3, 160, 160) and labels.dtype == torch.int64
    assert grid.shape == (160, 160)
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2, 3}
    for value in (1, 2, 3):  # myocardium, LV and RV blood pools all present
        assert (labels[0] == value).sum() > 100
    assert torch.equal(labels[0], labels[1]) and torch.equal(labels[0], labels[2])
    assert all(0.72 <= s <= 0.77 for s in grid.spacing)
    assert all(float(x.std()) > 0 for x in images)


def test_myops_default_is_mid_ventricular_slice(myops_full):
    gd = sitk.GetArrayFromImage(
        sitk.ReadImage(str(ROOT / "myops2020" / CASE / f"{CASE}_gd.nii.gz"))
    )
    merged = merge_labels(gd)
    full = [z for z in range(len(merged)) if all((merged[z] == v).sum() >= 20 for v in (1, 2, 3))]
    z = full[len(full) // 2]
    _, labels, _ = myops_full
    assert torch.equal(labels[0], merged[z])
    images, labels_z, _ = load_myops_slices(ROOT / "myops2020" / CASE, slice_index=z, crop=None)
    assert torch.equal(labels_z, labels)


def test_myops_crop_keeps_physical_positions(myops_full, myops_crop):
    (full_images, full_labels, full_grid), (images, labels, grid) = myops_full, myops_crop
    # the cropped origin is a voxel centre of the full grid, at an integer index
    index = full_grid.world_to_index_matrix() @ np.array([*grid.origin, 1.0])
    assert np.allclose(index[:2], np.round(index[:2]), atol=1e-6)
    x0, y0 = (int(round(v)) for v in index[:2])
    box = (slice(y0, y0 + 160), slice(x0, x0 + 160))
    assert torch.equal(images, full_images[:, box[0], box[1]])
    assert torch.equal(labels, full_labels[:, box[0], box[1]])
    # every voxel has the same world coordinate before and after the crop
    assert torch.allclose(grid.points(), full_grid.points()[box], atol=1e-4)
    # the crop is centred on the heart
    centroid = torch.nonzero(labels[0] > 0).float().mean(0)
    assert torch.all((centroid - 79.5).abs() < 2)


def test_myops_slice_frame_matches_3d_geometry(myops_full, myops_crop):
    """A 2D point (u, v) is the 3D voxel's position along the image's row/column directions."""
    volume = sitk.ReadImage(str(ROOT / "myops2020" / CASE / f"{CASE}_gd.nii.gz"))
    merged = merge_labels(sitk.GetArrayFromImage(volume))
    z = next(k for k in range(len(merged)) if torch.equal(merged[k], myops_full[1][0]))
    in_plane = np.asarray(volume.GetDirection()).reshape(3, 3)[:, :2]
    full_grid, grid = myops_full[2], myops_crop[2]
    x0, y0 = (int(round(v)) for v in (full_grid.world_to_index_matrix() @ [*grid.origin, 1])[:2])
    points = grid.points(dtype=torch.float64).numpy()
    for row, col in ((0, 0), (17, 101), (159, 159)):
        p3 = volume.TransformIndexToPhysicalPoint((x0 + col, y0 + row, z))
        assert np.allclose(points[row, col], in_plane.T @ np.asarray(p3), atol=1e-3)
    # distances in the 2D frame are physical (mm)
    p_a = np.asarray(volume.TransformIndexToPhysicalPoint((x0, y0, z)))
    p_b = np.asarray(volume.TransformIndexToPhysicalPoint((x0 + 159, y0 + 101, z)))
    assert np.isclose(np.linalg.norm(points[101, 159] - points[0, 0]), np.linalg.norm(p_b - p_a))


def test_myops_missing_files_are_reported(tmp_path):
    case = tmp_path / "Case9999"
    case.mkdir()
    with pytest.raises(InputError, match="Case9999_C0.nii.gz"):
        load_myops_slices(case)
    assert len(myops_cases(ROOT)) == 35
    assert MYOPS_SEQUENCES == ("C0", "LGE", "T2")


def test_multiparam_fixture():
    images, labels, grid, names = load_multiparam_fixture(ROOT)
    assert names == ["LGE", "T1", "T2"]
    assert images.shape == labels.shape == (3, 200, 200)
    assert grid.shape == (200, 200) and np.allclose(grid.spacing, 0.78125)
    assert set(torch.unique(labels).tolist()) == {0, 1, 2, 3}
    assert pairwise_dice(labels, [1, 2, 3])["mean"] > 0.8  # the slices correspond voxel-wise


def test_rigid_registration_recovers_known_misalignment():
    images, labels, grid, _ = load_multiparam_fixture(ROOT)
    small = grid.downsample(2)  # 100 x 100 voxels of 1.56 mm
    images = resample_to_grid(images, grid, small)[0]
    labels = resample_to_grid(labels, grid, small, mode="nearest")[0]
    truth = random_rigid(3, small, max_angle=10.0, max_offset=6.0, seed=0)
    moved = warp_images(images, small, truth)
    moved_labels = warp_images(labels, small, truth, mode="nearest")
    valid = warp_images(torch.ones_like(images), small, truth)
    config = load_preset(
        "cardiac2d", num_classes=4, bins=32, sample_rate=0.2, tolerance=1e-5, progress=False
    )
    config.stages = [StageConfig.named("rigid", iterations=150, levels=2)]
    result = XCoReg(config).register(moved, small, valid=valid)
    recovered = warp_images(moved_labels, small, result.transform, mode="nearest")
    before = pairwise_dice(moved_labels, [1, 2, 3])["mean"]
    after = pairwise_dice(recovered, [1, 2, 3])["mean"]
    assert before < 0.7
    assert after > before + 0.12, (before, after)
    assert after > 0.78, (before, after)


# ---------------------------------------------------------------------- aligned groups (issue 6)
ALIGNED = "Case3002"  # C0/LGE/T2 on one grid with one label map: aligned by construction


def _aligned_volumes(down: int):
    """Case3002's C0/LGE/T2 volumes and label map, in-plane downsampled ``down`` times."""
    case = ROOT / "myops2020" / ALIGNED
    volumes = [read_image(case / f"{ALIGNED}_{s}.nii.gz") for s in MYOPS_SEQUENCES]
    grid = volumes[0][1]
    gd = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{ALIGNED}_gd.nii.gz")))
    labels = merge_labels(gd).expand(3, *grid.shape)
    z, y, x = grid.shape
    small = Grid(
        (z, (y - 1) // down + 1, (x - 1) // down + 1),
        (grid.extent[0] / ((x - 1) // down), grid.extent[1] / ((y - 1) // down), grid.spacing[2]),
        grid.origin,
        grid.direction,
    )
    images = torch.stack([resample_to_grid(v, g, small)[0] for v, g in volumes])
    return images, resample_to_grid(labels, grid, small, mode="nearest")[0], small


def _register_aligned(images, labels, grid, config):
    result = XCoReg(config).register(images, grid)
    after = warp_images(labels, grid, result.transform, mode="nearest")
    return pairwise_dice(labels, [1, 2, 3])["mean"], pairwise_dice(after, [1, 2, 3])["mean"]


DRIFT = (
    "the X-metric itself prefers a shifted T2 on Case3002: with Gamma re-estimated on the whole "
    "overlap, X rises monotonically as T2 moves 6 mm along y (K=4, L=32, 224 crop), and the "
    "rigid stage ends 6-12 mm off with a higher X (0.99 -> 1.24 on the full slice). A standard "
    "pairwise Mattes-MI rigid registration (SimpleITK, bench/myops_aligned_itk.py) moves T2 "
    "10.5-13.3 mm on the whole slice (Dice 0.69-0.73) and 8.7-9.8 mm in a heart ROI (0.77-0.78): "
    "the data's T2 is not at the mutual-information optimum"
)


@pytest.mark.xfail(reason=DRIFT, strict=False)
def test_aligned_slice_stays_aligned_rigid():
    """The full 511 x 511 mid-ventricular slice (here at 3 mm) with the settings picked from the
    data, rigid stage only (``--stages rigid``): pairwise Dice must stay >= 0.95."""
    images, labels, grid = load_myops_slices(ROOT / "myops2020" / ALIGNED, crop=None)
    small = grid.downsample(4)
    images = resample_to_grid(images, grid, small)[0]
    labels = resample_to_grid(labels, grid, small, mode="nearest")[0]
    config = auto_config(small, progress=False)
    config.stages = [s for s in config.stages if s.name == "rigid"]
    config.stages[0].iterations = 90
    before, after = _register_aligned(images, labels, small, config)
    assert before == 1.0
    assert after >= 0.95, after


def test_aligned_volumes_stay_aligned_rigid():
    """The 3D C0/LGE/T2 volumes (3 slices of 23 mm; in-plane 3 mm here), rigid stage only.

    Tilting a 3-slice slab empties the overlap region, so the overlap guard rejects the rigid
    tries and the group is left as it was (before the guard: rotations of 12-18 deg, Dice 0.36).
    """
    images, labels, grid = _aligned_volumes(4)
    config = auto_config(grid, progress=False)
    config.stages = [s for s in config.stages if s.name == "rigid"]
    config.stages[0].iterations = 60
    before, after = _register_aligned(images, labels, grid, config)
    assert before == 1.0
    assert after >= 0.95, after
