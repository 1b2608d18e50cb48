"""The open MS data set (Lesjak et al., Neuroinformatics 2016/2018, CC-BY) on the FLAIR grid, and
the paper's RIRE protocol (Sec. 4.2.1) on it: known random rigid misalignments to recover.

A study folder ``<root>/open_ms/<study>/`` holds ``<prefix>_FLAIR.nii.gz``, ``<prefix>_T1W.nii.gz``,
``<prefix>_T2W.nii.gz`` (one session, each on its own grid) and the data set's reference transforms
``<prefix>_T1W_intrastudy_to_FLAIR.txt`` / ``<prefix>_T2W_intrastudy_to_FLAIR.txt`` (ITK text files,
``MatrixOffsetTransformBase``, physical LPS millimetres). As ITK writes a registration result,
such a transform maps a *FLAIR* point to the *T1W/T2W* point that corresponds to it (the
resampling direction: T1W sampled at ``T(x)`` for the FLAIR points ``x`` lies on FLAIR). They
are affine, not rigid (scalings up to about 1.6 %); they define the aligned state.

* :func:`load_study`: the three images on the FLAIR grid (``shrink`` > 1: a coarser grid with
  the same field of view, :func:`coarse_grid`), resampled linearly by SimpleITK with the
  reference transforms (FLAIR: identity);
* :meth:`OpenMSStudy.misalign`: independent random rigid maps per image
  (:func:`dcc.data.misalignment.random_rigid`, about the grid centre; the paper's +-15 deg,
  +-20 mm) and the images misaligned by them, ``M_j(x) = I_j(ref_j(truth_j(x)))`` sampled in one
  interpolation from the original image ``I_j``;
* the error of a registration is :func:`dcc.metrics.registration_error` (gRE at the 8 vertices of
  the FLAIR field of view, Eqs. 51-52) of ``truth`` and the recovered transforms, which
  :func:`dcc.data.io.read_linear_transforms` reads from ``dcc-register``'s ``transforms/*.tfm``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dcc.data.io import InputError
from dcc.data.misalignment import random_rigid
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import LinearTransform, Rigid

__all__ = [
    "MODALITIES",
    "OpenMSStudy",
    "find_studies",
    "study_files",
    "read_reference_transform",
    "coarse_grid",
    "load_study",
]

MODALITIES = ("FLAIR", "T1W", "T2W")
"""The images of a study; the first is the reference grid and needs no transform."""
MAX_ANGLE = 15.0
"""Rotation bound per axis of the misalignments (degrees), the paper's RIRE setting."""
MAX_OFFSET = 20.0
"""Translation bound per axis of the misalignments (mm), the paper's RIRE setting."""


def find_studies(root: str | os.PathLike) -> list[Path]:
    """The study folders (sorted) under ``root`` (a data root holding ``open_ms/``, or the
    ``open_ms`` folder itself): every sub-folder with a ``*_FLAIR.nii.gz``."""
    root = Path(root)
    folder = root / "open_ms" if (root / "open_ms").is_dir() else root
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*_FLAIR.nii.gz")))


def study_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{modality: image path}`` plus ``{"T1W_to_FLAIR": ..., "T2W_to_FLAIR": ...}`` of a study
    folder; :class:`InputError` names the first missing file."""
    folder = Path(folder)
    flair = sorted(folder.glob("*_FLAIR.nii.gz"))
    if not flair:
        raise InputError(f"{folder}: no *_FLAIR.nii.gz (not an open-MS study folder)")
    prefix = flair[0].name[: -len("_FLAIR.nii.gz")]
    files = {m: folder / f"{prefix}_{m}.nii.gz" for m in MODALITIES}
    for m in MODALITIES[1:]:
        files[f"{m}_to_FLAIR"] = folder / f"{prefix}_{m}_intrastudy_to_FLAIR.txt"
    for path in files.values():
        if not path.is_file():
            raise InputError(f"{path}: missing from the open-MS study {folder.name}")
    return files


def read_reference_transform(path: str | os.PathLike) -> sitk.Transform:
    """A reference transform file (FLAIR point -> the other image's point), as SimpleITK reads
    it; :class:`InputError` if it cannot be read or is not linear."""
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable ITK transform ({error})") from None
    if transform.GetDimension() != 3 or not transform.IsLinear():
        raise InputError(f"{path}: expected a linear 3D transform, got {transform.GetName()}")
    return transform


def coarse_grid(grid: Grid, factor: float) -> Grid:
    """``grid`` coarsened by ``factor`` with the same field of view (the 8 vertices of gRE and the
    centre stay): each axis's spacing becomes at least ``factor`` times the finest spacing of the
    grid and never finer than before (so 0.72 x 0.72 x 4 mm with ``factor`` 4 gives 2.9 x 2.9 x
    4 mm), rounded so that a whole number of voxels fills the field of view."""
    if factor < 1:
        raise ValueError(f"coarse_grid: factor must be >= 1, got {factor}")
    if factor == 1:
        return grid
    target = factor * min(grid.spacing)
    size, spacing = [], []
    for n, s in zip(grid.size, grid.spacing, strict=True):
        fov = n * s
        m = max(1, round(fov / max(s, target)))
        size.append(m)
        spacing.append(fov / m)
    shift = grid.direction_matrix @ ((np.asarray(spacing) - np.asarray(grid.spacing)) / 2)
    origin = np.asarray(grid.origin) + shift
    return Grid(tuple(reversed(size)), tuple(spacing), tuple(origin), grid.direction)


@dataclass
class OpenMSStudy:
    """One open-MS session on the (possibly coarsened) FLAIR grid.

    ``sources`` are the original images (float32, each on its own grid), ``references`` the maps
    from the FLAIR frame into each of them (identity for FLAIR), ``images`` ``(3, *grid.shape)``
    the aligned group: ``sources[j]`` sampled at ``references[j](x)``.
    """

    name: str
    grid: Grid
    names: tuple[str, ...]
    sources: list[sitk.Image]
    references: list[sitk.Transform]
    images: torch.Tensor

    def resample(self, transform: LinearTransform | None = None) -> torch.Tensor:
        """The group ``(3, *grid.shape)`` sampled at ``references[j](transform_j(x))`` (linear,
        zero outside each image's field of view), one interpolation from the originals;
        ``transform=None`` gives the aligned images."""
        reference = self.grid.to_sitk(np.zeros(self.grid.shape, np.float32))
        out = []
        for j, (source, ref) in enumerate(zip(self.sources, self.references, strict=True)):
            if transform is not None:
                ref = sitk.CompositeTransform([ref, transform.to_sitk(j)])
            warped = sitk.Resample(source, reference, ref, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            out.append(torch.from_numpy(sitk.GetArrayFromImage(warped)))
        return torch.stack(out)

    def misalign(
        self, seed: int, max_angle: float = MAX_ANGLE, max_offset: float = MAX_OFFSET
    ) -> tuple[torch.Tensor, Rigid]:
        """Images misaligned by independent random rigid maps ``truth`` (rotation about the grid
        centre, angles uniform in +-``max_angle`` degrees per axis, offsets uniform in
        +-``max_offset`` mm per axis; :func:`dcc.data.misalignment.random_rigid` with ``seed``):
        returns ``(images (3, *grid.shape), truth)``. A registration that recovers ``estimate``
        has the gRE ``dcc.metrics.registration_error(truth, self.grid, estimate)``."""
        truth = random_rigid(len(self.names), self.grid, max_angle, max_offset, seed=seed)
        return self.resample(truth), truth


def load_study(
    folder: str | os.PathLike, shrink: float = 1.0, modalities: Sequence[str] = MODALITIES
) -> OpenMSStudy:
    """Read a study folder (:func:`study_files`) and bring its images onto the FLAIR grid
    (coarsened by ``shrink``, :func:`coarse_grid`) with the reference transforms. With
    ``shrink`` > 1 the originals are first smoothed against aliasing (:func:`_antialias`) and
    kept smoothed in ``sources``, so that misaligned images are sampled from them as well."""
    if not modalities or modalities[0] != "FLAIR" or set(modalities) - set(MODALITIES):
        raise ValueError(f"load_study: modalities must start with FLAIR, from {MODALITIES}")
    files = study_files(folder)
    sources = []
    for m in modalities:
        try:
            sources.append(sitk.ReadImage(str(files[m]), sitk.sitkFloat32))
        except RuntimeError as error:
            raise InputError(f"{files[m]}: not a readable image ({error})") from None
    references = [sitk.Transform(3, sitk.sitkIdentity)]
    references += [read_reference_transform(files[f"{m}_to_FLAIR"]) for m in modalities[1:]]
    grid = coarse_grid(Grid.from_sitk(sources[0]), shrink)
    if shrink > 1:
        sources = [_antialias(image, grid.spacing) for image in sources]
    study = OpenMSStudy(Path(folder).name, grid, tuple(modalities), sources, references,
                        torch.empty(0))
    study.images = study.resample()
    return study


def _antialias(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """``image`` smoothed by a Gaussian of standard deviation ``sqrt(t**2 - s**2) / 2`` mm per
    axis, for its spacing ``s`` and the coarser target spacing ``t`` (``spacing``, along the
    same axes: open-MS images share their direction); unchanged where ``t <= s``."""
    own = np.asarray(image.GetSpacing())
    sigma = np.sqrt(np.clip(np.asarray(spacing) ** 2 - own**2, 0, None)) / 2
    if not sigma.any():
        return image
    return sitk.DiscreteGaussian(image, (sigma**2).tolist(), 32, 0.01, True)
