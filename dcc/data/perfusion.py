"""A first-pass cardiac perfusion MR series (one mid-ventricular short-axis slice over time) and
its gold-standard masks, for motion correction (paper Sec. 4.3, ``bench/bench_perfusion.py``).

The folder ``<root>/perfusion_cardiac`` (``root``: :func:`dcc.data.cardiac.data_root`, i.e.
``$DCC_DATA_ROOT``) holds

* ``frames/``: one DICOM file per time frame (here ``I01`` ... ``I79``, 256 x 256, 1.406 mm). The
  frames are ordered by their DICOM *InstanceNumber* (0020,0013), not by file name;
* ``gold_standard_masks.mat`` (MATLAB v5): ``MyoMask`` (LV myocardium), ``SXmask`` (LV blood
  pool) and ``DXmask`` (RV blood pool), ``256 x 256`` 0/1 maps drawn on one frame.

:func:`load_perfusion` returns the frames ``(T, H, W)`` float32, the 2D :class:`Grid` of the
slice (its own in-plane frame: identity direction, physical spacing; the slice is oblique) and
the label map 0 background / 1 myocardium / 2 LV / 3 RV (where masks overlap, the myocardium
wins, then the LV: the RV and myocardium masks share a few voxels).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from dcc.data.cardiac import LV, MYOCARDIUM, RV, required_data_root
from dcc.data.io import InputError, slice_grid
from dcc.data.misalignment import MisalignedGroup, random_ffd, random_rigid, warp_images
from dcc.spatial.functional import zscore
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import ComposedTransform

__all__ = ["FOLDER", "MASKS", "MASK_FILE", "perfusion_folder", "frame_files", "read_masks",
           "load_perfusion", "moving_series", "preprocess", "region_of_interest"]

FOLDER = "perfusion_cardiac"
MASK_FILE = "gold_standard_masks.mat"
MASKS = {"DXmask": RV, "SXmask": LV, "MyoMask": MYOCARDIUM}
"""Variables of the mask file and their labels, in the order they are painted (last wins)."""
INSTANCE_NUMBER = "0020|0013"


def perfusion_folder(root: str | os.PathLike | None = None) -> Path:
    """``<root>/perfusion_cardiac`` (default root: :func:`required_data_root`); :class:`InputError`
    (one line) names what is missing."""
    root = required_data_root() if root is None else Path(root)
    folder = root if (root / "frames").is_dir() else root / FOLDER
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (the cardiac perfusion series)")
    if not (folder / "frames").is_dir():
        raise InputError(f"{folder / 'frames'}: no such folder (one DICOM file per frame)")
    if not (folder / MASK_FILE).is_file():
        raise InputError(f"{folder / MASK_FILE}: no such file (the gold-standard masks)")
    return folder


def _read_header(path: Path) -> tuple[int, sitk.ImageFileReader]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: not a readable DICOM file") from None
    if not reader.HasMetaDataKey(INSTANCE_NUMBER):
        raise InputError(f"{path}: DICOM file without an InstanceNumber (0020,0013)")
    try:
        number = int(reader.GetMetaData(INSTANCE_NUMBER).strip())
    except ValueError:
        raise InputError(f"{path}: InstanceNumber (0020,0013) is not an integer") from None
    return number, reader


def frame_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(InstanceNumber, path)`` of every file in ``<folder>/frames``, sorted by the number;
    :class:`InputError` names a file that is not a DICOM image with an InstanceNumber, or two
    files with the same number."""
    frames = Path(folder) / "frames"
    paths = sorted(p for p in frames.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise InputError(f"{frames}: holds no frame files")
    numbered = sorted(((_read_header(p)[0], p) for p in paths), key=lambda x: x[0])
    for (a, pa), (b, pb) in zip(numbered, numbered[1:], strict=False):
        if a == b:
            raise InputError(f"{pb}: InstanceNumber {b} repeats that of {pa.name}")
    return numbered


def read_masks(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The label map (int64 ``(H, W)``: 1 myocardium, 2 LV, 3 RV) of a mask file such as
    ``gold_standard_masks.mat``; :class:`InputError` names the file when it is unreadable, lacks
    a mask, a mask is empty, or its shape is not ``shape``."""
    path = Path(path)
    try:
        data = loadmat(path)
    except (MatReadError, ValueError, OSError, TypeError) as error:
        raise InputError(f"{path}: not a readable MATLAB file ({error})") from None
    labels = None
    for name, value in MASKS.items():
        if name not in data:
            raise InputError(f"{path}: no variable {name} (have "
                             f"{', '.join(k for k in data if not k.startswith('__'))})")
        mask = np.asarray(data[name])
        if mask.ndim != 2 or (shape is not None and mask.shape != tuple(shape)):
            raise InputError(f"{path}: {name} has shape {mask.shape}, expected "
                             f"{tuple(shape) if shape else '2D'}")
        if not mask.any():
            raise InputError(f"{path}: {name} is empty")
        if labels is None:
            labels = np.zeros(mask.shape, np.int64)
        labels[mask != 0] = value
    return torch.from_numpy(labels)


def load_perfusion(
    root: str | os.PathLike | None = None, frames: int | None = None
) -> tuple[torch.Tensor, Grid, torch.Tensor]:
    """The perfusion series ``(T, H, W)`` float32 (raw intensities) ordered by InstanceNumber
    (the first ``frames`` if given), its 2D grid and the gold-standard label map ``(H, W)``
    int64 (0/1 myocardium/2 LV/3 RV). ``root``: a data root holding ``perfusion_cardiac``, or
    that folder itself (default :func:`data_root`). Bad or missing files raise
    :class:`InputError` naming the file."""
    folder = perfusion_folder(root)
    numbered = frame_files(folder)
    if frames is not None:
        if frames < 2:
            raise ValueError(f"load_perfusion: frames must be >= 2, got {frames}")
        numbered = numbered[:frames]
    arrays, grid = [], None
    for _, path in numbered:
        try:
            image = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
        except RuntimeError:
            raise InputError(f"{path}: not a readable DICOM image") from None
        if image.GetDimension() == 3 and image.GetSize()[2] == 1:
            this = slice_grid(Grid.from_sitk(image), 2, 0)
        elif image.GetDimension() == 2:
            this = Grid.from_sitk(image)
        else:
            raise InputError(f"{path}: expected one 2D slice, got size {image.GetSize()}")
        array = sitk.GetArrayFromImage(image).astype(np.float32).reshape(this.shape)
        if not np.isfinite(array).all():
            raise InputError(f"{path}: image contains NaN or infinite voxels")
        if grid is None:
            grid = this
        elif this.shape != grid.shape or not np.allclose(this.spacing, grid.spacing, atol=1e-3):
            raise InputError(f"{path}: grid {this.shape} / {this.spacing} differs from the first "
                             f"frame's {grid.shape} / {grid.spacing}")
        arrays.append(array)
    labels = read_masks(folder / MASK_FILE, grid.shape)
    return torch.from_numpy(np.stack(arrays)), grid, labels


# ---------------------------------------------------------------------- motion-correction trials
def moving_series(
    frames: torch.Tensor,
    labels: torch.Tensor,
    grid: Grid,
    seed: int,
    max_angle: float = 4.0,
    max_offset: float = 4.0,
    ffd_spacing: float = 40.0,
    ffd_std: float = 1.5,
):
    """The series ``frames`` ``(T, H, W)`` under known synthetic motion, one map per frame:
    a rigid motion about the grid centre (:func:`~dcc.data.misalignment.random_rigid`, angles
    uniform in +-``max_angle`` degrees, offsets in +-``max_offset`` mm) after a smooth B-spline
    FFD (:func:`~dcc.data.misalignment.random_ffd`, ``ffd_spacing`` mm, control displacements of
    std ``ffd_std`` mm), ``truth_j = rigid_j o ffd_j``, drawn from ``seed``. Returns a
    :class:`~dcc.data.misalignment.MisalignedGroup` (frames warped linearly, the gold-standard
    ``labels`` ``(H, W)`` carried through each frame's motion by nearest neighbour, names
    ``T01``...) and the fields of view ``(T, H, W)`` (1 where the moved frame has data)."""
    n = frames.shape[0]
    rigid = random_rigid(n, grid, max_angle, max_offset, seed=2 * seed + 1)
    ffd = random_ffd(n, grid, ffd_spacing, ffd_std, seed=2 * seed + 2)
    truth = ComposedTransform(n, grid.ndim, [rigid, ffd]).requires_grad_(False)
    moved = warp_images(frames, grid, truth)
    moved_labels = warp_images(labels.expand(n, *labels.shape), grid, truth, mode="nearest")
    inside = warp_images(torch.ones_like(frames), grid, truth) > 0.999
    names = [f"T{t + 1:02d}" for t in range(n)]
    return MisalignedGroup(moved, moved_labels, grid, names, truth, labels), inside.float()


def preprocess(frames: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The paper's pre-processing of a perfusion series (Sec. 4.3.1): an isotropic Gaussian
    filter of ``sigma`` pixels per frame, then a z-score per frame
    (:func:`dcc.spatial.functional.zscore`)."""
    array = frames.detach().cpu().numpy().astype(np.float32)
    if sigma > 0:  # in-plane only: a sigma of 0 leaves the time axis alone
        array = ndimage.gaussian_filter(array, (0, sigma, sigma))
    return zscore(torch.from_numpy(array), ndim=2)


def region_of_interest(labels: torch.Tensor, radius: int = 10,
                       structures: tuple[int, ...] = (MYOCARDIUM, LV)) -> torch.Tensor:
    """The paper's ROI: the ``structures`` of ``labels`` (default the LV with its myocardium)
    dilated by a disc of ``radius`` pixels, as a bool ``(H, W)`` tensor."""
    mask = np.isin(labels.cpu().numpy(), structures)
    if not mask.any():
        raise ValueError("region_of_interest: no voxel of the structures in the label map")
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = yy**2 + xx**2 <= r * r
    return torch.from_numpy(ndimage.binary_dilation(mask, structure=disc))
