"""The misaligned MyoPS groups of the X-CoReg benches (dcc.data.myops_groups): on a synthetic
cardiac phantom (labels carried with the images, seeds, the margin and the box), and on a real
MyoPS patient (skipped with the reason when the data are absent)."""

from __future__ import annotations

import pytest
import torch

from dcc.data.cardiac import data_root
from dcc.data.cardiac_phantom import cardiac_phantom
from dcc.data.io import read_image
from dcc.data.myops_groups import (
    MARGIN,
    TUNE_CASES,
    dense_misalign,
    group_seed,
    make_group,
    misalign_slices,
    roi_mask,
    smooth_truth,
    write_group,
)
from dcc.metrics import pairwise_dice
from dcc.spatial.grid import Grid

ROOT = data_root()
HAS_MYOPS = ROOT is not None and (ROOT / "myops2020").is_dir()
needs_myops = pytest.mark.skipif(
    not HAS_MYOPS, reason="MyoPS data not found: set DCC_DATA_ROOT (CI uses ../shared/data)"
)


def _coded_group(size: int):
    """Three images that code their shared label map (10 + 100 * label) on a 1 mm grid: where a
    bilinear warp of an image is flat, it tells the label that voxel must carry."""
    phantom = cardiac_phantom(image_size=size, fov=float(size), seed=3)
    labels = phantom.labels.unsqueeze(0).repeat(3, 1, 1)
    images = 10.0 + 100.0 * labels.float()
    grid = Grid((size, size), (1.0, 1.0), (-20.0, 5.0), (1.0, 0.0, 0.0, 1.0))
    return images, labels, grid


def _labels_follow_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Wherever a warped coded image is flat, the warped label is the one it codes."""
    code = (images - 10.0) / 100.0
    flat = (code - code.round()).abs() < 1e-4
    assert flat.float().mean() > 0.8  # most voxels lie inside one structure
    assert torch.equal(labels[flat], code[flat].round().long())


def test_smooth_model_on_a_phantom():
    crop = 64
    size = crop + 2 * MARGIN
    images, labels, grid = _coded_group(size)
    moved, moved_labels, box, disp = misalign_slices(images, labels, grid, seed=5, crop=crop)
    # the central crop x crop box, cut after warping: its grid sits MARGIN voxels in
    assert moved.shape == moved_labels.shape == (3, crop, crop) and box.shape == (crop, crop)
    assert box.origin == pytest.approx((-20.0 + MARGIN, 5.0 + MARGIN))
    assert moved.dtype == torch.float32 and moved_labels.dtype == torch.int64
    _labels_follow_images(moved, moved_labels)
    # a real misalignment: the sequences' labels no longer agree, displacement of a few mm
    assert pairwise_dice(moved_labels, [1, 2, 3])["mean"] < 0.95
    assert 1.0 < disp < 20.0
    # the displacement is the known maps' mean over the box
    truth = smooth_truth(3, box, 5)
    with torch.no_grad():
        expected = (truth.lattice(box) - box.points()).norm(dim=-1).mean()
    assert disp == pytest.approx(float(expected))
    # seeded: the same seed gives the same group, another seed another group
    again = misalign_slices(images, labels, grid, seed=5, crop=crop)
    assert torch.equal(again[0], moved) and torch.equal(again[1], moved_labels)
    other = misalign_slices(images, labels, grid, seed=6, crop=crop)
    assert not torch.equal(other[1], moved_labels) and other[3] != disp
    # no misalignment: exactly the central box of the input, labels included
    still = misalign_slices(images, labels, grid, 5, crop, max_angle=0, max_offset=0, ffd_std=0)
    centre = (slice(None), slice(MARGIN, MARGIN + crop), slice(MARGIN, MARGIN + crop))
    torch.testing.assert_close(still[0], images[centre], atol=1e-2, rtol=0)  # float32 lattice
    assert torch.equal(still[1], labels[centre]) and still[3] == pytest.approx(0.0, abs=1e-5)


def test_smooth_model_without_room_for_the_margin_uses_the_whole_image():
    images, labels, grid = _coded_group(80)
    moved, moved_labels, box, _ = misalign_slices(images, labels, grid, seed=0, crop=64)
    assert box.shape == (64, 64) and box.origin == grid.origin  # the top-left box, no margin
    _labels_follow_images(moved, moved_labels)


def test_dense_model_on_a_phantom():
    images, labels, grid = _coded_group(96)
    grid = Grid(grid.shape, (0.5, 0.5), grid.origin, grid.direction)
    moved, moved_labels, disp = dense_misalign(images, labels, grid, seed=4)
    assert moved.shape == moved_labels.shape == (3, 96, 96)
    _labels_follow_images(moved, moved_labels)
    assert pairwise_dice(moved_labels, [1, 2, 3])["mean"] < 0.95
    # rotation <= 10 deg, shift <= 8 voxels per axis, deformation <= 7 voxels, at 0.5 mm
    assert 0.5 < disp < 0.5 * (7 + 8 * 2**0.5 + 96 * 0.18)
    again = dense_misalign(images, labels, grid, seed=4)
    assert torch.equal(again[0], moved) and torch.equal(again[1], moved_labels)
    assert not torch.equal(dense_misalign(images, labels, grid, seed=5)[1], moved_labels)


def test_group_seeds_and_roi():
    assert group_seed(0, 11) == 11 and group_seed(3, 11) == 3011 and group_seed(None, 2) == 2
    assert len(TUNE_CASES) == 12 and TUNE_CASES[0] == "Case3001" and "Case3027" in TUNE_CASES
    labels = torch.zeros(3, 21, 21, dtype=torch.long)
    labels[1, 10, 10] = 2
    # 2 mm at x spacing 1 mm and y spacing 0.5 mm: 2 voxels across the columns, 4 along rows
    grid = Grid((21, 21), (1.0, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    roi = roi_mask(labels, grid, 2.0)
    assert roi.dtype == torch.int32 and roi.shape == (21, 21)
    rows, cols = torch.nonzero(roi, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 14, 8, 12)
    assert roi[10, 10] == 1 and roi[6, 12] == 0  # an ellipse, not its bounding box
    with pytest.raises(ValueError, match="unknown model"):
        make_group("rigid", "nowhere", 0)


@pytest.mark.data
@needs_myops
def test_groups_of_a_myops_patient(tmp_path):
    from dcc.data.cardiac import myops_cases

    cases = myops_cases(ROOT)
    index = [c.name for c in cases].index("Case3012")
    case = cases[index]
    aligned, aligned_labels, dense_grid, zero = make_group("aligned", case, 7)
    assert aligned.shape == (3, 192, 192) and zero == 0.0
    assert all(torch.equal(aligned_labels[0], lab) for lab in aligned_labels)
    # the displacements of the published bench groups (seed 0 of bench/bench_myops.py)
    groups = {
        "dense": make_group("dense", case, group_seed(0, index)),
        "smooth": make_group("smooth", case, group_seed(0, index)),
    }
    assert groups["dense"][3] == pytest.approx(7.1671, abs=1e-3)
    assert groups["smooth"][3] == pytest.approx(6.5868, abs=1e-3)
    references = {
        "dense": (aligned, aligned_labels),
        "smooth": make_group("smooth", case, 0, max_angle=0, max_offset=0, ffd_std=0)[:2],
    }
    for model, (images, labels, grid, _) in groups.items():
        size = 192 if model == "dense" else 224
        assert images.shape == labels.shape == (3, size, size) and grid.shape == (size, size)
        assert set(labels.unique().tolist()) == {0, 1, 2, 3}
        assert pairwise_dice(labels, [1, 2, 3])["mean"] < 0.9
        # the labels travel with the images: each structure's mean intensity per sequence is
        # the unmoved group's, which the unmoved labels on the moved images do not keep
        still, still_labels = references[model]
        carried, left = [], []
        for j in range(3):
            for k in (1, 2, 3):
                truth = still[j][still_labels[j] == k].mean()
                carried.append(abs(images[j][labels[j] == k].mean() / truth - 1))
                left.append(abs(images[j][still_labels[j] == k].mean() / truth - 1))
        assert sum(carried) / 9 < 0.05 and sum(carried) < sum(left) / 3, (carried, left)
        again = make_group(model, case, group_seed(0, index))
        assert torch.equal(again[0], images) and torch.equal(again[1], labels)
        other = make_group(model, case, group_seed(1, index))
        assert not torch.equal(other[1], labels)
    # the files of write_group are the group, with a heart ROI around every label
    paths, label_paths, grid, disp = write_group(case, index, tmp_path, "dense", 0, roi=10)
    assert disp == groups["dense"][3] and grid == groups["dense"][2]
    for j, (path, label_path) in enumerate(zip(paths, label_paths, strict=True)):
        image, image_grid = read_image(path)
        assert image_grid.same_geometry(grid)
        torch.testing.assert_close(image.float(), groups["dense"][0][j])
        assert torch.equal(read_image(label_path)[0].long(), groups["dense"][1][j])
    roi = read_image(tmp_path / "roi.nii.gz")[0]
    foreground = (groups["dense"][1] > 0).any(0)
    assert bool(roi[foreground].all()) and roi.sum() > foreground.sum()
    assert torch.equal(roi.int(), roi_mask(groups["dense"][1], grid, 10.0))
