"""Real multi-sequence cardiac MR: MyoPS 2020 slices and the small multi-parametric fixture.

The data live outside the repository (see the project README, "Real data"): the root folder
comes from ``$DCC_DATA_ROOT``, or ``<repo>/../shared/data`` when that exists.

Label maps are merged to the paper's K = 4 setting (Sec. 4.4): 0 background, 1 LV myocardium
(including edema and scar), 2 LV blood pool, 3 RV blood pool.

Sources: MyoPS 2020 (X. Zhuang, "Multivariate mixture model for myocardial segmentation combining
multi-source images", TPAMI 2019; the MyoPS 2020 challenge).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dcc.data.io import InputError, read_image, read_labels, slice_grid
from dcc.spatial.grid import Grid

MYOCARDIUM, LV, RV = 1, 2, 3
LABEL_NAMES = {MYOCARDIUM: "myocardium", LV: "LV", RV: "RV"}
# raw values -> merged labels (MyoPS and the cmr_multiparam masks)
MERGE = {200: MYOCARDIUM, 1220: MYOCARDIUM, 2221: MYOCARDIUM, 500: LV, 600: RV}
MYOPS_SEQUENCES = ("C0", "LGE", "T2")
MULTIPARAM = {"LGE": "lge", "T1": "nativet1mapt1", "T2": "t2mapt2"}
MIN_VOXELS = 20  # a structure counts as present in a slice with at least this many voxels


def data_root() -> Path | None:
    """The real-data folder: ``$DCC_DATA_ROOT`` if set, else ``<repo>/../shared/data`` if it
    exists, else ``None``."""
    env = os.environ.get("DCC_DATA_ROOT")
    if env:
        path = Path(env).expanduser()
        if not path.is_absolute():
            path = (Path.cwd() / path).resolve()
        return path if path.is_dir() else None
    sibling = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return sibling if sibling.is_dir() else None


def required_data_root() -> Path:
    """:func:`data_root`, or an :class:`InputError` (one line) that says why there is none."""
    root = data_root()
    if root is None:
        env = os.environ.get("DCC_DATA_ROOT")
        where = f"DCC_DATA_ROOT={env} is not a folder" if env else (
            "DCC_DATA_ROOT is unset and there is no ../shared/data beside the repository")
        raise InputError(f"no data root: {where}")
    return root


def merge_labels(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map raw label values (200/1220/2221, 500, 600) to 1/2/3; everything else to 0."""
    raw = torch.as_tensor(np.asarray(labels)).long()
    out = torch.zeros_like(raw)
    for value, merged in MERGE.items():
        out[raw == value] = merged
    return out


def myops_cases(root: str | os.PathLike | None = None) -> list[Path]:
    """The MyoPS case folders ``<root>/myops2020/Case*`` (sorted)."""
    root = Path(root) if root is not None else data_root()
    folder = None if root is None else root / "myops2020"
    if folder is None or not folder.is_dir():
        raise InputError(f"{folder}: MyoPS 2020 folder not found (set DCC_DATA_ROOT)")
    return sorted(p for p in folder.glob("Case*") if p.is_dir())


def load_myops_slices(
    case_dir: str | os.PathLike,
    slice_index: int | None = None,
    crop: int | None = 160,
) -> tuple[torch.Tensor, torch.Tensor, Grid]:
    """One short-axis slice of a MyoPS case: C0, LGE and T2 with the shared manual labels.

    Returns ``images`` ``(3, H, W)`` float32 (C0, LGE, T2; raw intensities), ``labels``
    ``(3, H, W)`` int64 (the ``gd`` map, merged to 0/1/2/3 and repeated for each sequence) and
    the 2D :class:`Grid`.

    ``slice_index`` defaults to the mid-ventricular slice: the middle one among the slices where
    myocardium, LV and RV blood pools are all present. ``crop`` (voxels, or ``None``) cuts a
    ``crop x crop`` box centred on the label centroid of that slice (shifted to stay inside the
    image); the grid origin moves with it, so every voxel keeps its physical position.

    The 2D grid is the slice's own in-plane frame: coordinates in mm along the image's row and
    column directions (identity direction, the original spacing), with the origin at the
    projection of the slice's 3D origin on those directions. Distances and angles in it are
    physical, and a 2D point ``(u, v)`` is the 3D point ``u e_x + v e_y + w e_z`` of the slice
    (``e_*`` the columns of the 3D direction matrix, ``w`` the slice's normal coordinate).
    """
    volumes, merged, grid3, paths = load_myops_case(case_dir)
    if slice_index is None:
        slice_index = mid_ventricular_slice(merged, paths["gd"])
    elif not -merged.shape[0] <= slice_index < merged.shape[0]:
        raise InputError(
            f"{paths['gd']}: slice {slice_index} out of range (0..{merged.shape[0] - 1})"
        )
    slice_index %= merged.shape[0]
    grid = slice_grid(grid3, 2, slice_index)
    images = torch.from_numpy(volumes[:, slice_index].astype(np.float32))
    label = merged[slice_index]
    if crop is not None:
        (y0, x0), grid = crop_box(label, grid, crop)
        images = images[:, y0 : y0 + grid.shape[0], x0 : x0 + grid.shape[1]]
        label = label[y0 : y0 + grid.shape[0], x0 : x0 + grid.shape[1]]
    for s, image in zip(MYOPS_SEQUENCES, images, strict=True):
        if image.min() == image.max():
            raise InputError(f"{paths[s]}: slice {slice_index} is constant")
    labels = label.unsqueeze(0).repeat(len(MYOPS_SEQUENCES), 1, 1)
    return images.contiguous(), labels.contiguous(), grid


def load_myops_case(
    case_dir: str | os.PathLike,
) -> tuple[np.ndarray, torch.Tensor, Grid, dict[str, Path]]:
    """Read a whole MyoPS case once: ``volumes`` ``(3, Z, H, W)`` (C0, LGE, T2; raw values),
    the merged labels ``(Z, H, W)`` int64, the 3D grid and the file paths (keys: sequences and
    ``"gd"``)."""
    case_dir = Path(case_dir)
    case = case_dir.name
    paths = {s: case_dir / f"{case}_{s}.nii.gz" for s in (*MYOPS_SEQUENCES, "gd")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"{case_dir}: MyoPS case is missing {', '.join(missing)}")
    gd, grid3 = _read_volume(paths["gd"])
    if grid3.ndim != 3:
        raise InputError(f"{paths['gd']}: expected a 3D stack of slices, got {grid3.ndim}D")
    volumes = []
    for s in MYOPS_SEQUENCES:
        array, grid = read_image(paths[s])
        if not grid.same_geometry(grid3):
            raise InputError(f"{paths[s]}: grid differs from the label map {paths['gd']}")
        volumes.append(np.asarray(array.numpy()))
    return np.stack(volumes), merge_labels(gd), grid3, paths


def mid_ventricular_slice(merged: torch.Tensor, path: str | os.PathLike = "labels") -> int:
    """Middle slice among those of ``merged`` ``(Z, H, W)`` containing labels 1, 2 and 3."""
    counts = torch.stack([(merged == v).flatten(1).sum(1) for v in (MYOCARDIUM, LV, RV)], 1)
    full = torch.nonzero((counts >= MIN_VOXELS).all(1)).flatten().tolist()
    if not full:
        raise InputError(f"{path}: no slice contains myocardium, LV and RV labels together")
    return full[len(full) // 2]


def crop_box(label: torch.Tensor, grid: Grid, size: int) -> tuple[tuple[int, int], Grid]:
    """A ``size x size`` box (at most the image) centred on the foreground centroid of the 2D
    ``label`` map, shifted to lie inside the image. Returns its corner ``(row, col)`` and the
    cropped grid (origin moved so that voxels keep their physical positions)."""
    if grid.ndim != 2:
        raise ValueError(f"crop_box: expected a 2D grid, got {grid.ndim}D")
    fg = torch.nonzero(label > 0).double()
    h, w = grid.shape
    centre = fg.mean(0) if len(fg) else torch.tensor([(h - 1) / 2, (w - 1) / 2])
    corner = []
    for c, n in zip(centre.tolist(), (h, w), strict=True):
        m = min(size, n)
        corner.append(int(min(max(round(c - (m - 1) / 2), 0), n - m)))
    y0, x0 = corner
    return (y0, x0), crop_grid(grid, y0, x0, min(size, h), min(size, w))


def crop_grid(grid: Grid, row: int, col: int, height: int, width: int) -> Grid:
    """The grid of ``array[row:row + height, col:col + width]`` (same physical voxel centres)."""
    index = np.array([col, row, 1.0])  # ITK (x, y) order
    origin = (grid.index_to_world_matrix() @ index)[:2]
    return Grid((height, width), grid.spacing, tuple(origin), grid.direction)


def load_multiparam_fixture(
    root: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Grid, list[str]]:
    """The ``cmr_multiparam_sub2092`` slice: LGE, native T1 map and T2 map with their own masks.

    Returns ``images`` ``(3, 200, 200)`` float32, ``labels`` ``(3, 200, 200)`` int64 (merged to
    0/1/2/3), the LGE's 2D grid and the names ``["LGE", "T1", "T2"]``.

    The three slices share shape, spacing and direction, and their anatomy corresponds voxel by
    voxel, but their origins differ by up to ~22 mm (they come from separate acquisitions, and
    the fixture was prepared in voxel space). They are therefore stacked by voxel index on the
    LGE's grid rather than resampled in physical space.
    """
    root = Path(root) if root is not None else data_root()
    folder = None if root is None else root / "cmr_multiparam_sub2092"
    if folder is None or not folder.is_dir():
        raise InputError(f"{folder}: cmr_multiparam fixture not found (set DCC_DATA_ROOT)")
    images, labels, grids = [], [], []
    for name, stem in MULTIPARAM.items():
        image_path = folder / f"sub2092_{stem}.nii.gz"
        mask_path = folder / f"sub2092_{stem}_mask.nii.gz"
        for p in (image_path, mask_path):
            if not p.is_file():
                raise InputError(f"{p}: file not found ({name} of the cmr_multiparam fixture)")
        image, grid = read_image(image_path)
        if grid.ndim != 2:
            raise InputError(f"{image_path}: expected a single 2D slice, got shape {grid.shape}")
        labels.append(merge_labels(read_labels(mask_path, like=grid)))
        images.append(image)
        grids.append(grid)
    first = grids[0]
    for name, grid in zip(MULTIPARAM, grids, strict=True):
        if grid.shape != first.shape or not (
            np.allclose(grid.spacing, first.spacing, atol=1e-4)
            and np.allclose(grid.direction, first.direction, atol=1e-4)
        ):
            raise InputError(
                f"{folder}: {name} slice has shape/spacing/direction {grid.shape}, "
                f"{grid.spacing}, {grid.direction}; expected those of the LGE {first.shape}, "
                f"{first.spacing}, {first.direction}"
            )
    return torch.stack(images), torch.stack(labels), first, list(MULTIPARAM)


# ---------------------------------------------------------------------- internals
def _read_volume(path: Path) -> tuple[np.ndarray, Grid]:
    """Read a (label) volume without the constant/empty checks of ``read_image``."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read image: {str(e).splitlines()[-1]}") from None
    return sitk.GetArrayFromImage(image), Grid.from_sitk(image)
