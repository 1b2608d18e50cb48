"""Reading, validating, writing and resampling user images.

Images come back as ``float32`` tensors in PyTorch order with their :class:`~dcc.spatial.grid.Grid`
(geometry in ITK's LPS frame, read through SimpleITK). A 3D image with one axis of length 1 (a
single slice) is returned as a 2D image.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dcc.spatial.grid import Grid
from dcc.spatial.transforms import Affine


class InputError(ValueError):
    """A user-supplied file is missing, unreadable or unsuitable; the message names the file."""


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, Grid]:
    """Read a NIfTI/MetaImage/NRRD file or a DICOM series folder as ``(float32 tensor, Grid)``."""
    array, grid = _read_array(path)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: image contains NaN or infinite voxels")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(f"{path}: image is constant (all voxels = {lo:g})")
    return torch.from_numpy(array), grid


def read_labels(path: str | os.PathLike, like: Grid) -> torch.Tensor:
    """Read an integer label map (``int64`` tensor) that must lie on the grid ``like``."""
    array, grid = _read_array(path)
    if not like.same_geometry(grid):
        raise InputError(
            f"{path}: label grid (shape/spacing/origin/direction) differs from its image's grid: "
            + _grid_difference(grid, like)
        )
    if not np.issubdtype(array.dtype, np.integer):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise InputError(
                f"{path}: label map has non-integer values (e.g. {array[bad].flat[0]:g})"
            )
    array = array.astype(np.int64)
    if not array.any():
        raise InputError(f"{path}: label map is empty (no foreground label)")
    return torch.from_numpy(array)


def write_image(
    path: str | os.PathLike,
    array: np.ndarray | torch.Tensor,
    grid: Grid,
    is_vector: bool = False,
) -> None:
    """Write an array in tensor order (plus a trailing vector axis if ``is_vector``) on ``grid``."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    spatial = array.shape[:-1] if is_vector else array.shape
    if tuple(spatial) != grid.shape:
        raise ValueError(f"write_image: array shape {array.shape} does not match grid {grid.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(grid.to_sitk(array, is_vector=is_vector), str(path))


def linear_group(transforms: Sequence[sitk.Transform]) -> Affine:
    """One :class:`~dcc.spatial.transforms.Affine` group of linear SimpleITK transforms (any
    linear kind: affine, Euler, translation, a composite of them), member ``j`` mapping points
    as ``transforms[j].TransformPoint`` does: ``A_j x + b_j`` with ``b_j = T_j(0)`` and the
    columns of ``A_j`` ``T_j(e_k) - b_j``. E.g. the pairwise results of an ITK registration (fixed
    point -> moving point) with the identity for the fixed image, as a group to score with
    :func:`dcc.metrics.registration_error`."""
    if not transforms:
        raise ValueError("linear_group: no transforms")
    d = transforms[0].GetDimension()
    matrices, offsets = [], []
    for j, transform in enumerate(transforms):
        if transform.GetDimension() != d or not transform.IsLinear():
            raise ValueError(
                f"linear_group: transform {j} ({transform.GetName()}) is not a linear {d}D map"
            )
        b = np.asarray(transform.TransformPoint((0.0,) * d))
        columns = [np.asarray(transform.TransformPoint(tuple(e))) - b for e in np.eye(d)]
        matrices.append(np.stack(columns, axis=1))
        offsets.append(b)
    group = Affine(len(transforms), d)
    with torch.no_grad():
        group.matrix.copy_(torch.from_numpy(np.stack(matrices)))
        group.offset.copy_(torch.from_numpy(np.stack(offsets)))
    return group.requires_grad_(False)


def read_linear_transforms(paths: Sequence[str | os.PathLike]) -> Affine:
    """The linear ITK transform files ``paths`` (e.g. ``transforms/<name>.tfm`` of
    ``dcc-register``, which map common-space points to image ``j``) as one group
    (:func:`linear_group`); :class:`InputError` names a file that cannot be read."""
    transforms = []
    for path in paths:
        try:
            transforms.append(sitk.ReadTransform(str(path)))
        except RuntimeError as error:
            raise InputError(f"{path}: not a readable ITK transform ({_short_reason(error)})") \
                from None
    try:
        return linear_group(transforms)
    except ValueError as error:
        raise InputError(f"{', '.join(map(str, paths))}: {error}") from None


def resample_to_grid(
    image: torch.Tensor, grid: Grid, target: Grid, mode: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image`` (``(..., *grid.shape)``) from ``grid`` onto ``target`` in physical space.

    Returns the resampled image ``(..., *target.shape)`` (``float32``, or ``int64`` for
    ``mode="nearest"`` on integer input; the image itself, not a copy, when it is on ``target``
    already) and a ``float32`` validity mask ``target.shape`` that is 1 inside the source field
    of view (zero padding outside).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"resample_to_grid: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if grid.ndim != target.ndim:
        raise ValueError(
            f"resample_to_grid: cannot resample a {grid.ndim}D image to {target.ndim}D"
        )
    d = grid.ndim
    if tuple(image.shape[image.ndim - d :]) != grid.shape:
        raise ValueError(f"resample_to_grid: image shape {tuple(image.shape)} vs grid {grid.shape}")
    integer = not (image.is_floating_point() or image.is_complex())
    if grid.same_geometry(target, tol=1e-6):  # already there: every voxel centre coincides
        out = image.to(torch.int64 if integer and mode == "nearest" else torch.float32)  # no copy
        return out, torch.ones(target.shape, device=image.device)
    dtype = torch.float64 if integer or image.dtype == torch.float64 else torch.float32
    lead = image.shape[: image.ndim - d]
    source = image.reshape(1, -1, *grid.shape).to(dtype)
    points = target.points(device=image.device, dtype=torch.float64)
    coords = grid.world_to_normalized(points).to(dtype).unsqueeze(0)
    ones = torch.ones((1, 1, *grid.shape), dtype=dtype, device=image.device)
    out, mask = (
        F.grid_sample(x, coords, mode=mode, padding_mode="zeros", align_corners=True)
        for x in (source, ones)
    )
    out = out.reshape(*lead, *target.shape)
    out = out.round().long() if integer and mode == "nearest" else out.float()
    return out, mask.reshape(target.shape).clamp(0, 1).float()


def resample_group(
    originals: Sequence[tuple[torch.Tensor, Grid]],
    target: Grid,
    labels: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Resample a group of ``(image, grid)`` pairs (and optionally one label map per image, on
    its image's grid) onto ``target``: ``(images (N, *S), valid (N, *S), labels (N, *S) or
    None)``, labels by nearest neighbour (:func:`resample_to_grid`)."""
    images, valid = zip(*(resample_to_grid(x, g, target) for x, g in originals), strict=True)
    on_target = None
    if labels is not None:
        on_target = torch.stack(
            [
                resample_to_grid(lab, g, target, mode="nearest")[0]
                for lab, (_, g) in zip(labels, originals, strict=True)
            ]
        )
    return torch.stack(images), torch.stack(valid), on_target


# ---------------------------------------------------------------------- internals
def _read_array(path: str | os.PathLike) -> tuple[np.ndarray, Grid]:
    """Read, check dimensionality/components/size, squeeze a singleton slice axis."""
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            f"{path}: multi-component (vector/colour) images are not supported "
            f"({image.GetNumberOfComponentsPerPixel()} components per voxel)"
        )
    size = image.GetSize()
    if 0 in size:
        raise InputError(f"{path}: image is empty (0 voxels, size {size})")
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputError(f"{path}: expected a 2D or 3D image, got {dim}D with size {size}")
    _check_nifti(Path(path))
    array = sitk.GetArrayFromImage(image)
    grid = Grid.from_sitk(image)
    singleton = [a for a, n in enumerate(size) if n == 1]
    if dim == 3 and len(singleton) == 1:
        array, grid = _drop_axis(array, grid, singleton[0])
    elif singleton:
        raise InputError(
            f"{path}: expected a 2D or 3D image, got size {size}, "
            "which has fewer than 2 axes longer than 1"
        )
    return array, grid


def _drop_axis(array: np.ndarray, grid: Grid, axis: int) -> tuple[np.ndarray, Grid]:
    """Drop ITK axis ``axis`` (length 1) of a 3D image, keeping a 2D grid (see `slice_grid`)."""
    return array.squeeze(2 - axis), slice_grid(grid, axis, 0)


def slice_grid(grid3: Grid, axis: int, index: int) -> Grid:
    """2D grid of slice ``index`` along ITK axis ``axis`` of a 3D grid.

    If the slice's axes lie in a coordinate plane of the world frame, the 2D grid keeps the
    world coordinates of that plane. An oblique slice cannot: it gets its own in-plane frame
    (identity direction, origin = the slice corner's coordinates along its two axes), so that
    distances and angles stay physical.
    """
    keep = [a for a in range(3) if a != axis]
    direction = grid3.direction_matrix
    index3 = np.zeros(4)
    index3[axis], index3[3] = index, 1.0
    corner = (grid3.index_to_world_matrix() @ index3)[:3]
    block = direction[np.ix_(keep, keep)]
    if np.allclose(block.T @ block, np.eye(2), atol=1e-6):
        origin, direction2 = corner[keep], block
    else:
        origin, direction2 = direction[:, keep].T @ corner, np.eye(2)
    size = [grid3.size[a] for a in keep]
    return Grid(
        tuple(reversed(size)),
        tuple(grid3.spacing[a] for a in keep),
        tuple(origin),
        tuple(direction2.ravel()),
    )


def _read_sitk(path: str | os.PathLike) -> sitk.Image:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: file not found")
    try:
        if p.is_dir():
            return _read_dicom_series(p, path)
        return sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read image: {_short_reason(e)}") from None


def _read_dicom_series(folder: Path, path) -> sitk.Image:
    """Read the DICOM series with the most files in ``folder``."""
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        files = [
            sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
            for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        ]
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if not files:
        raise InputError(f"{path}: no DICOM series found in this folder")
    names = max(files, key=len)
    _check_one_frame_per_position(names, path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute()


def _check_one_frame_per_position(names: tuple[str, ...], path) -> None:
    """Refuse a DICOM series whose files repeat a slice position: a time series (e.g. perfusion
    or cine frames) is not a volume, and ITK would stack its frames with an invented spacing."""
    if len(names) < 2:
        return
    positions = set()
    for name in names:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        key = "0020|0032"  # Image Position (Patient); a file without it counts as its own
        if reader.HasMetaDataKey(key):
            positions.add(tuple(np.round(_numbers(reader.GetMetaData(key)), 2)))
        else:
            positions.add(name)
    if len(positions) == len(names):
        return
    if len(positions) == 1:
        raise InputError(
            f"{path}: DICOM series of {len(names)} frames at one slice position (a time series, "
            "not a volume); to register its frames as a group, pass the frame files as the "
            f"images, e.g. {os.path.join(str(path), '*')}"
        )
    raise InputError(
        f"{path}: DICOM series of {len(names)} files at only {len(positions)} slice positions "
        "(several frames per position, e.g. cine or perfusion); split it into one folder per "
        "time frame, or pass single-frame files"
    )


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split("\\")]
    except ValueError:
        return [float("nan")]


def _check_nifti(path: Path) -> None:
    """A NIfTI file must hold all its voxels (ITK zero-fills a short file) and, if floating
    point, no NaN/inf (ITK's NIfTI reader silently turns them into 0). Floating-point data are
    read whole (a short gzip stream raises ``EOFError``); integer ones only counted."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    compressed = name.endswith(".gz")
    try:
        image = nib.load(path)
        dtype = image.get_data_dtype()
        voxels = int(np.prod(image.shape, dtype=np.int64))
        expected = int(image.dataobj.offset) + voxels * dtype.itemsize
        floating = dtype.kind in "fc"
        if not compressed:
            found = path.stat().st_size
        else:  # floating point: read whole below, where a short stream raises EOFError
            found = expected if floating else _gzip_length(path)
        finite = found < expected or not floating or np.isfinite(np.asanyarray(image.dataobj)).all()
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        early = isinstance(e, EOFError | nib.filebasedimages.ImageFileError) and compressed
        reason = "its compressed data end early" if early else _short_reason(e)
        raise InputError(f"{path}: file is truncated or damaged ({reason})") from None
    if found < expected:
        unpacked = " after decompression" if compressed else ""
        raise InputError(
            f"{path}: file is truncated (holds {found} of {expected} bytes{unpacked}); "
            "copy or download it again"
        )
    if not finite:
        raise InputError(f"{path}: image contains NaN or infinite voxels")


def _gzip_length(path: Path, chunk: int = 1 << 22) -> int:
    """Bytes a gzip file decompresses to; a stream that ends early raises ``EOFError``."""
    total = 0
    with gzip.open(path, "rb") as stream:
        while block := stream.read(chunk):
            total += len(block)
    return total


def _short_reason(error: Exception) -> str:
    """Last line of an ITK exception without its source-location and class prefixes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    if len(lines) > 1 and "File cannot be read" in lines[-2] and reason.startswith("Reason:"):
        return "its voxel data are missing or incomplete (file truncated or damaged?)"  # MetaIO
    for prefix in ("sitk::ERROR:", "ITK ERROR:"):
        if reason.startswith(prefix):
            reason = reason[len(prefix) :].strip()
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)  # "NiftiImageIO(0x..): msg"


def _grid_difference(grid: Grid, like: Grid, tol: float = 1e-3) -> str:
    """Which of shape/spacing/origin/direction differ, e.g. ``"shape (4, 5) vs (4, 6)"``."""
    parts = []
    for name in ("shape", "spacing", "origin", "direction"):
        a, b = getattr(grid, name), getattr(like, name)
        if (a != b) if name == "shape" else not np.allclose(a, b, atol=tol):
            parts.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
    return "; ".join(parts)


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
