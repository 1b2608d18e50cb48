"""The misaligned MyoPS groups of the X-CoReg benches: one C0/LGE/T2 slice of a patient under a
known, seeded misalignment, with the shared label map warped alongside.

Three models (:data:`MODELS`):

* ``smooth``: the mid-ventricular slice in a ``crop``-voxel box, each sequence under its own
  rigid map (+-``max_angle`` deg, +-``max_offset`` mm) composed with a B-spline FFD
  (``ffd_spacing`` mm, std ``ffd_std`` mm), warped with real anatomy around the box (a box
  :data:`MARGIN` voxels larger, cut after warping: no padded corners);
* ``dense``: the slice with the most labelled voxels in a ``dense_crop``-voxel box at the native
  spacing, each sequence under :func:`dcc.data.misalignment.random_dense_warp` (rotation, shift
  and a smooth dense deformation in voxels, edges replicated);
* ``aligned``: the ``dense`` slices without misalignment.

A patient's group is seeded by :func:`group_seed` (the bench seed and the case's index among
:func:`dcc.data.cardiac.myops_cases`), so ``bench/bench_myops.py``, ``bench/myops_sweep.py``,
``bench/myops_objective.py`` and ``bench/bench_coreg_devices.py`` build the same groups.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from dcc.data.cardiac import (
    LABEL_NAMES,
    MIN_VOXELS,
    MYOPS_SEQUENCES,
    crop_box,
    crop_grid,
    load_myops_case,
    load_myops_slices,
)
from dcc.data.io import slice_grid, write_image
from dcc.data.misalignment import (
    random_dense_warp,
    random_ffd,
    random_rigid,
    warp_dense,
    warp_images,
)
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import ComposedTransform

__all__ = [
    "MARGIN", "MODELS", "TUNE_CASES", "group_seed", "smooth_truth", "misalign_slices",
    "misalign", "most_labelled_slices", "dense_misalign", "make_group", "roi_mask", "write_group",
]

MARGIN = 48  # voxels of real anatomy around the crop box while warping (> max displacement)
MODELS = ("smooth", "dense", "aligned")
# The patients every default of dcc-register was chosen on (the benches' ``tune`` split); the
# other shared patients form the ``test`` split and are only reported.
TUNE_CASES = tuple(f"Case30{i:02d}" for i in range(1, 12)) + ("Case3027",)

Group = tuple[torch.Tensor, torch.Tensor, Grid, float]


def group_seed(seed: int | None, index: int) -> int:
    """The misalignment seed of the case at ``index`` (in :func:`myops_cases` order) for the bench
    seed ``seed`` (``None`` counts as 0)."""
    return (seed or 0) * 1000 + index


def smooth_truth(
    n: int,
    grid: Grid,
    seed: int,
    max_angle: float = 10.0,
    max_offset: float = 6.0,
    ffd_spacing: float = 45.0,
    ffd_std: float = 4.0,
) -> ComposedTransform:
    """The ``smooth`` model's known maps ``truth_j = rigid_j o ffd_j`` on ``grid`` (the rigid
    maps seeded by ``2 * seed``, the FFD by ``2 * seed + 1``): image j is ``U_j o truth_j``."""
    rigid = random_rigid(n, grid, max_angle, max_offset, seed=2 * seed)
    ffd = random_ffd(n, grid, ffd_spacing, ffd_std, seed=2 * seed + 1)
    return ComposedTransform(n, grid.ndim, [rigid, ffd])


def misalign_slices(
    images: torch.Tensor,
    labels: torch.Tensor,
    grid: Grid,
    seed: int,
    crop: int = 224,
    max_angle: float = 10.0,
    max_offset: float = 6.0,
    ffd_spacing: float = 45.0,
    ffd_std: float = 4.0,
    margin: int = MARGIN,
) -> Group:
    """The ``smooth`` model on slices ``(N, H, W)`` already cut to a box ``margin`` voxels larger
    than ``crop`` on each side (a smaller image is used whole, without a margin): every image and
    its labels under :func:`smooth_truth` on the central ``crop`` box, warped on the whole input
    and cut. Returns images, labels (nearest), the box's grid and the mean true displacement
    (mm) over the box."""
    h, w = grid.shape
    m = margin if min(h, w) >= crop + 2 * margin else 0
    box_grid = crop_grid(grid, m, m, min(crop, h), min(crop, w))
    box = (slice(None), slice(m, m + box_grid.shape[0]), slice(m, m + box_grid.shape[1]))
    truth = smooth_truth(len(images), box_grid, seed, max_angle, max_offset, ffd_spacing, ffd_std)
    with torch.no_grad():
        displacement = (truth.lattice(box_grid) - box_grid.points()).norm(dim=-1)
    return (
        warp_images(images, grid, truth)[box],
        warp_images(labels, grid, truth, mode="nearest")[box],
        box_grid,
        float(displacement.mean()),
    )


def misalign(
    case_dir: str | os.PathLike,
    seed: int,
    crop: int = 224,
    max_angle: float = 10.0,
    max_offset: float = 6.0,
    ffd_spacing: float = 45.0,
    ffd_std: float = 4.0,
) -> Group:
    """The ``smooth`` group of a MyoPS case (its mid-ventricular slice; :func:`misalign_slices`).
    Returns images, labels ``(3, crop, crop)``, grid and mean displacement (mm)."""
    images, labels, grid = load_myops_slices(case_dir, crop=crop + 2 * MARGIN)
    return misalign_slices(
        images, labels, grid, seed, crop, max_angle, max_offset, ffd_spacing, ffd_std
    )


def most_labelled_slices(
    case_dir: str | os.PathLike, crop: int = 192
) -> tuple[torch.Tensor, torch.Tensor, Grid]:
    """C0/LGE/T2 and labels of the slice with the most labelled voxels (among those holding
    myocardium, LV and RV), in a ``crop`` box around the heart at the native spacing."""
    volumes, merged, grid3, _ = load_myops_case(case_dir)
    counts = torch.stack([(merged == v).flatten(1).sum(1) for v in LABEL_NAMES], 1)
    full = (counts >= MIN_VOXELS).all(1)
    z = int(torch.where(full, counts.sum(1), -1).argmax())
    (y0, x0), grid = crop_box(merged[z], slice_grid(grid3, 2, z), crop)
    box = (slice(y0, y0 + grid.shape[0]), slice(x0, x0 + grid.shape[1]))
    images = torch.from_numpy(volumes[:, z][(slice(None), *box)].astype(np.float32))
    labels = merged[z][box].unsqueeze(0).repeat(len(MYOPS_SEQUENCES), 1, 1)
    return images.contiguous(), labels.contiguous(), grid


def dense_misalign(
    images: torch.Tensor, labels: torch.Tensor, grid: Grid, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The ``dense`` model on slices ``(N, H, W)``: each image and its labels (nearest) under
    :func:`random_dense_warp` with its default bounds, seeded by ``seed``. Returns the warped
    images, labels and the mean displacement (mm)."""
    coords = random_dense_warp(len(images), grid.shape, seed=seed)
    h, w = grid.shape
    scale = torch.tensor([(w - 1) / 2 * grid.spacing[0], (h - 1) / 2 * grid.spacing[1]])
    identity = random_dense_warp(1, grid.shape, 0, 0, 0, seed=0)
    disp = float(((coords - identity) * scale).norm(dim=-1).mean())
    return warp_dense(images, coords), warp_dense(labels, coords, mode="nearest"), disp


def make_group(
    model: str,
    case_dir: str | os.PathLike,
    seed: int,
    crop: int = 224,
    dense_crop: int = 192,
    max_angle: float = 10.0,
    max_offset: float = 6.0,
    ffd_spacing: float = 45.0,
    ffd_std: float = 4.0,
) -> Group:
    """Images, labels ``(3, H, W)``, grid and mean true displacement (mm) of one group of
    ``case_dir`` under ``model`` (one of :data:`MODELS`), seeded by ``seed`` (see
    :func:`group_seed`). ``crop`` and the rigid/FFD bounds are the ``smooth`` model's,
    ``dense_crop`` the box of ``dense`` and ``aligned``."""
    if model not in MODELS:
        raise ValueError(f"make_group: unknown model {model!r}; choose from {', '.join(MODELS)}")
    if model == "smooth":
        return misalign(case_dir, seed, crop, max_angle, max_offset, ffd_spacing, ffd_std)
    images, labels, grid = most_labelled_slices(case_dir, dense_crop)
    if model == "aligned":
        return images, labels, grid, 0.0
    images, labels, disp = dense_misalign(images, labels, grid, seed)
    return images, labels, grid, disp


def roi_mask(labels: torch.Tensor, grid: Grid, radius: float) -> torch.Tensor:
    """The union of the foreground of ``labels`` ``(N, H, W)`` dilated by an ellipse of ``radius``
    mm (in voxels per axis from the grid's spacing), as an int32 ``(H, W)`` mask."""
    radii = [radius / s for s in reversed(grid.spacing)]  # (rows, cols) in voxels
    yy, xx = np.ogrid[tuple(slice(-math.ceil(r), math.ceil(r) + 1) for r in radii)]
    ball = (yy / radii[0]) ** 2 + (xx / radii[1]) ** 2 <= 1
    roi = ndimage.binary_dilation((labels > 0).any(0).numpy(), structure=ball)
    return torch.from_numpy(roi.astype(np.int32))


def write_group(
    case_dir: str | os.PathLike,
    index: int,
    folder: str | os.PathLike,
    model: str = "smooth",
    seed: int | None = 0,
    roi: float | None = None,
    **settings,
) -> tuple[list[str], list[str], Grid, float]:
    """The group of ``case_dir`` under ``model`` (seeded by :func:`group_seed` of ``seed`` and
    the case's ``index``; ``settings`` as :func:`make_group`) written as
    ``<folder>/<sequence>.nii.gz`` and ``<sequence>_labels.nii.gz``, and with ``roi`` (mm) its
    :func:`roi_mask` as ``roi.nii.gz``. Returns image paths, label paths, grid, displacement."""
    images, labels, grid, disp = make_group(model, case_dir, group_seed(seed, index), **settings)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, label_paths = [], []
    for name, image, lab in zip(MYOPS_SEQUENCES, images, labels, strict=True):
        paths.append(str(folder / f"{name}.nii.gz"))
        label_paths.append(str(folder / f"{name}_labels.nii.gz"))
        write_image(paths[-1], image, grid)
        write_image(label_paths[-1], lab.to(torch.int32), grid)
    if roi:
        write_image(folder / "roi.nii.gz", roi_mask(labels, grid, roi), grid)
    return paths, label_paths, grid, disp
