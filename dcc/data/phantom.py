"""A BrainWeb-like multi-contrast brain phantom built from the MNI ICBM152 2009 maps.

The grey-matter, white-matter and T1 templates ship with nilearn (no download). Tissue
probabilities become T1/T2/PD-like contrasts with BrainWeb-like tissue means, a smooth
multiplicative intensity non-uniformity and Rician noise; the images are skull-stripped (zero
outside the brain mask).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dcc.spatial.grid import Grid

TISSUES = ("background", "CSF", "GM", "WM")
"""Label values are indices into this tuple."""

CONTRASTS: dict[str, tuple[float, float, float]] = {
    "T1": (0.25, 0.55, 0.8),
    "T2": (1.0, 0.55, 0.35),
    "PD": (0.9, 0.8, 0.65),
}
"""Mean intensity of (CSF, GM, WM) per contrast; background is 0."""

_NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MASK_THRESHOLD = 0.2  # as nilearn.datasets.load_mni152_brain_mask


@dataclass
class Phantom:
    """Phantom images ``(N, *shape)``, tissue labels (indices into :data:`TISSUES`), grid, names."""

    images: torch.Tensor
    labels: torch.Tensor
    grid: Grid
    names: list[str]


def brain_phantom(
    dim: int = 2,
    contrasts: Sequence[str] = ("T1", "T2", "PD"),
    realisations: int = 1,
    noise: float = 0.03,
    bias: float = 0.2,
    downsample: int = 1,
    seed: int = 0,
    bias_per_image: bool = False,
) -> Phantom:
    """Build the phantom: the middle axial slice (``dim=2``) or the whole volume (``dim=3``).

    ``noise`` is the Rician noise level relative to the brightest tissue mean of each contrast,
    ``bias`` the total range of the multiplicative field ``1 + bias * s``, ``s`` in
    ``[-0.5, 0.5]``. The field is the receive-coil sensitivity of one session, shared by all
    images, unless ``bias_per_image`` draws one per image. ``downsample`` keeps every k-th
    voxel. Images are ordered ``[T1_0, T2_0, PD_0, T1_1, ...]`` over ``realisations``; all
    randomness derives from ``seed``.
    """
    if isinstance(contrasts, str):
        contrasts = (contrasts,)
    if dim not in (2, 3):
        raise ValueError(f"brain_phantom: dim must be 2 or 3, got {dim}")
    unknown = [c for c in contrasts if c not in CONTRASTS]
    if unknown or not contrasts:
        raise ValueError(
            f"brain_phantom: unknown contrast(s) {unknown}; valid names: {', '.join(CONTRASTS)}"
        )
    if realisations < 1 or downsample < 1:
        raise ValueError("brain_phantom: realisations and downsample must be >= 1")

    maps, grid3 = _mni_maps()
    maps = {k: _select(v, dim, downsample) for k, v in maps.items()}
    grid = _phantom_grid(grid3, dim, downsample)

    mask = maps["mask"]
    gm = np.clip(maps["gm"], 0, 1) * mask
    wm = np.clip(maps["wm"], 0, 1) * mask
    csf = mask * np.clip(1 - gm - wm, 0, 1)
    probs = np.stack([csf, gm, wm])
    labels = np.where(mask > 0, probs.argmax(0) + 1, 0)

    images, names = [], []
    for r in range(realisations):
        for c in contrasts:
            index = len(images)
            means = CONTRASTS[c]
            clean = np.tensordot(np.asarray(means, np.float32), probs, axes=1)
            field_seed = [seed, index, 0] if bias_per_image else [seed, 0, 0]
            field = 1 + bias * _smooth_field(grid.shape, np.random.default_rng(field_seed))
            noisy = _rician(
                clean * field, noise * max(means), np.random.default_rng([seed, index, 1])
            )
            images.append(noisy * mask)  # skull-stripped: zero outside the brain mask
            names.append(f"{c}_{r}" if realisations > 1 else c)
    return Phantom(
        images=torch.from_numpy(np.stack(images).astype(np.float32)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        grid=grid,
        names=names,
    )


def _select(volume: np.ndarray, dim: int, k: int) -> np.ndarray:
    """Torch-order view of a nilearn ``(x, y, z)`` volume: whole, or the middle axial slice."""
    volume = volume.transpose(2, 1, 0)
    if dim == 2:
        volume = volume[volume.shape[0] // 2]
    return np.ascontiguousarray(volume[(slice(None, None, k),) * dim])


def _phantom_grid(grid3: Grid, dim: int, k: int) -> Grid:
    """Grid of ``_select``: the x, y block for 2D, spacing times ``k``."""
    return Grid(
        tuple(-(-n // k) for n in grid3.shape[3 - dim :]),
        tuple(s * k for s in grid3.spacing[:dim]),
        grid3.origin[:dim],
        tuple(grid3.direction_matrix[:dim, :dim].ravel()),
    )


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, degree: int = 3) -> np.ndarray:
    """Random polynomial of total degree ``degree`` on the field of view, spanning [-0.5, 0.5]."""
    d = len(shape)
    coeffs = rng.standard_normal((degree + 1,) * d)
    coeffs[sum(np.ix_(*[np.arange(degree + 1)] * d)) > degree] = 0
    field = coeffs
    for n in shape:  # contract the leading degree axis, append the spatial axis
        powers = np.linspace(-1, 1, n)[:, None] ** np.arange(degree + 1)
        field = np.tensordot(field, powers, axes=([0], [1]))
    span = field.max() - field.min()
    field = (field - field.min()) / span - 0.5 if span > 0 else np.zeros(shape)
    return field.astype(np.float32)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of std ``sigma`` per channel."""
    if sigma == 0:
        return signal
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)


@lru_cache(maxsize=1)
def _mni_maps() -> tuple[dict[str, np.ndarray], Grid]:
    """``{"gm", "wm", "mask"}`` float32 arrays in nilearn ``(x, y, z)`` order, and their 3D grid."""
    try:
        return _read_shipped_maps()
    except FileNotFoundError:  # file layout changed: fall back to nilearn's (slower) loaders
        return _load_nilearn_maps()


def _read_shipped_maps() -> tuple[dict[str, np.ndarray], Grid]:
    """Read nilearn's packaged files directly, as its ``load_mni152_*`` functions do (faster:
    importing ``nilearn.datasets`` alone takes over a second)."""
    folder = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0])
    images = {k: nib.load(folder / "datasets" / "data" / f) for k, f in _NILEARN_FILES.items()}
    maps = {}
    for k, image in images.items():
        data = np.asarray(image.dataobj, dtype=np.float32)
        maps[k] = data / data.max()
    t1 = maps.pop("t1")
    maps["mask"] = (t1 > _MASK_THRESHOLD).astype(np.float32)
    return maps, Grid.from_nibabel(images["t1"])


def _load_nilearn_maps() -> tuple[dict[str, np.ndarray], Grid]:
    from nilearn import datasets

    images = {
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1, threshold=_MASK_THRESHOLD),
    }
    maps = {k: np.asarray(v.get_fdata(), dtype=np.float32) for k, v in images.items()}
    return maps, Grid.from_nibabel(datasets.load_mni152_template(resolution=1))
