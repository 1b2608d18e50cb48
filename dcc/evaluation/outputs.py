"""The output folder of a registered group, one writer for ``dcc-register`` and for the DCC
network's predict mode (``python evaluate.py mode=predict``).

Layout (every image on the ``common`` grid, geometry kept in the NIfTI headers)::

    warped/<name>.nii.gz                  U_j o phi_j: the original image j sampled at phi_j(x)
    labels/<name>.nii.gz                  its label map, warped (nearest), when labels are given
    transforms/<name>.tfm                 phi_j of a linear result (ITK affine)
    transforms/<name>_displacement.nii.gz phi_j(x) - x in mm of a non-linear result, (x, y[, z])
                                          float32 vectors in ITK's LPS frame: ITK's
                                          displacement-field convention; both map a
                                          common-space point to image j
    posterior.nii.gz                      the common-space posterior, K components per voxel
    segmentation.nii.gz                   its argmax (uint8)
    montage.png                           images before/after, posterior, label contours
    report.json                           settings, timings, Dice before/after, ...
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
from collections.abc import Callable, Sequence
from pathlib import Path

import SimpleITK as sitk
import torch

from dcc.data.io import write_image
from dcc.evaluation.figures import save_montage
from dcc.metrics import pairwise_dice, pairwise_surface_distances
from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid

__all__ = [
    "image_name",
    "unique_names",
    "sample_at_points",
    "write_group",
    "write_report",
    "peak_memory_mb",
]

Volume = tuple[torch.Tensor, Grid]


def image_name(path: str) -> str:
    """File name without its image extension (``a/b/C0.nii.gz`` -> ``C0``)."""
    name = Path(path.rstrip("/")).name
    return re.sub(r"(\.nii\.gz|\.nii|\.mha|\.mhd|\.nrrd|\.dcm)$", "", name, flags=re.I) or "image"


def unique_names(paths: Sequence[str]) -> list[str]:
    """Output names of the inputs; numbered (``00_name``) when two would collide."""
    names = [image_name(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i:02d}_{n}" for i, n in enumerate(names)]
    return names


Points = torch.Tensor | Callable[[int], torch.Tensor]


def _points_of(points: Points, j: int) -> torch.Tensor:
    """Image j's points ``(*S, d)`` on the CPU."""
    return (points(j) if callable(points) else points[j]).cpu()


@torch.no_grad()
def sample_at_points(points: Points, volumes: Sequence[Volume], mode: str) -> list:
    """Each original volume ``j`` (on its own grid) sampled at the world points ``points[j]``
    ``(*S, d)`` (or ``points(j)``); ``mode="nearest"`` keeps the volume's dtype (label maps)."""
    out = []
    for j, (volume, grid) in enumerate(volumes):
        normalized = grid.world_to_normalized(_points_of(points, j).unsqueeze(0))
        warped = sample(volume.float()[None, None], normalized, mode=mode)[0, 0]
        out.append(warped.to(volume.dtype) if mode == "nearest" else warped)
    return out


def write_group(
    folder: Path,
    names: Sequence[str],
    common: Grid,
    points: Points,
    originals: Sequence[Volume],
    posterior: torch.Tensor,
    images: torch.Tensor,
    labels: Sequence[torch.Tensor] | None = None,
    labels_before: torch.Tensor | None = None,
    linear: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Write the layout of the module docstring (all but ``report.json``) into ``folder``.

    Args:
        names: output name of every image.
        common: the common grid.
        points: phi_j(x) at every voxel of ``common``, world coordinates ``(N, *S, d)``, or
            a function of j giving image j's ``(*S, d)`` (one image at a time: a 3D group's
            points at once are N x 3 floats per voxel).
        originals: ``(image, grid)`` of every input on its own grid.
        posterior: ``(K, *S)`` common-space posterior.
        images: ``(N, *S)`` the inputs resampled onto ``common`` (the montage's "before").
        labels: the input label maps, each on its image's grid (optional).
        labels_before: ``(N, *S)`` the label maps resampled onto ``common`` (optional).
        linear: ``(matrices (N, d, d), translations (N, d))`` of an affine part (optional).

    Returns the report entries ``dice_before`` / ``dice_after`` (pairwise Dice of the label
    maps on the common grid, :func:`pairwise_dice`) when labels are given, else ``{}``.
    """
    folder = Path(folder)
    warped = sample_at_points(points, originals, "bilinear")
    for sub in ("warped", "transforms"):
        (folder / sub).mkdir(exist_ok=True)
    for name, image in zip(names, warped, strict=True):
        write_image(folder / "warped" / f"{name}.nii.gz", image, common)
    warped_labels = None
    if labels is not None:
        (folder / "labels").mkdir(exist_ok=True)
        volumes = [(lab, g) for lab, (_, g) in zip(labels, originals, strict=True)]
        warped_labels = sample_at_points(points, volumes, "nearest")
        for name, lab in zip(names, warped_labels, strict=True):
            write_image(folder / "labels" / f"{name}.nii.gz", lab.to(torch.int32), common)
    base = common.points()
    for j, name in enumerate(names):
        if linear is not None:  # the map itself, as ANTs and elastix write a linear result
            affine = sitk.AffineTransform(common.ndim)
            affine.SetMatrix(linear[0][j].double().flatten().tolist())
            affine.SetTranslation(linear[1][j].double().tolist())
            sitk.WriteTransform(affine, str(folder / "transforms" / f"{name}.tfm"))
        else:
            field = (_points_of(points, j).float() - base)  # float32 as ITK writes fields
            path = folder / "transforms" / f"{name}_displacement.nii.gz"
            write_image(path, field, common, is_vector=True)
    posterior = posterior.detach().float().cpu()
    write_image(folder / "posterior.nii.gz", posterior.movedim(0, -1), common, is_vector=True)
    write_image(folder / "segmentation.nii.gz", posterior.argmax(0).to(torch.uint8), common)
    save_montage(
        folder / "montage.png",
        images,
        torch.stack(warped),
        posterior,
        list(names),
        labels_before=labels_before,
        labels_after=None if warped_labels is None else torch.stack(warped_labels),
    )
    if warped_labels is None:
        return {}
    after = torch.stack(warped_labels)
    values = sorted(set(labels_before.unique().tolist()) | set(after.unique().tolist()) - {0})
    return {
        "dice_before": pairwise_dice(labels_before),
        "dice_after": pairwise_dice(after),
        "surface_distance_before_mm": pairwise_surface_distances(
            labels_before, values, common.spacing),
        "surface_distance_after_mm": pairwise_surface_distances(after, values, common.spacing),
    }


def write_report(folder: Path, report: dict) -> None:
    """``folder/report.json`` (dataclasses, tensors, arrays and paths converted)."""
    (Path(folder) / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))


def _json_default(value):
    """JSON for dataclasses, tensors, arrays, paths and numbers that ``json`` does not know."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return float(value)


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process (MiB), plus the peak CUDA allocation on a GPU."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.startswith("cuda") and torch.cuda.is_available():
        return rss_mb + torch.cuda.max_memory_allocated() / 2**20
    return rss_mb
