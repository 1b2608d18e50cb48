"""A procedural multi-sequence cardiac MR phantom (short-axis ROI, 2D or 3D) with known labels.

Each call draws one random heart in a torso-like background and renders it in the three
sequences of the MyoPS / MS-CMR data (Sec. 4.4.1): ``"C0"`` (bSSFP: bright blood, dark
myocardium, bright fat), ``"LGE"`` (nulled myocardium with optional bright scar, grey blood) and
``"T2"`` (dark blood, grey myocardium with optional bright edema). Labels follow
:mod:`dcc.data.cardiac`: 0 background, 1 myocardium, 2 LV blood pool, 3 RV blood pool; all
sequences share the one label map (they are aligned; misalignment is added by
:mod:`dcc.data.misalignment`).

Geometry (physical units, mm): an LV blood pool (random radius, elliptic, with a low-order
Fourier wobble), a myocardial ring of random, slowly varying thickness, an RV crescent (an
offset ellipse minus the LV, with its own thin wall) at a random orientation, patches of
epicardial fat, and a torso (body ellipse with subcutaneous fat and chest-wall muscle, two lungs,
a liver). In 3D the heart narrows towards the apex and the RV ends before it.

The task is learnable but not trivially separable by intensity: LV and RV blood share one
intensity in every sequence (only shape and position tell them apart); the myocardium's
intensity overlaps with chest-wall muscle, the RV wall and generic tissue in each sequence;
every class mean is jittered per phantom and sequence, and a smooth texture, a per-sequence
multiplicative bias field, optional blur and Rician noise are added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from dcc.data.cardiac import LV, MYOCARDIUM, RV
from dcc.data.phantom import _rician, _smooth_field

SEQUENCES = ("C0", "LGE", "T2")
"""Sequence names, in the domain order 0, 1, 2 (as :data:`dcc.data.cardiac.MYOPS_SEQUENCES`)."""
CLASS_NAMES = ("background", "myocardium", "LV", "RV")

# tissue indices of the rendered phantom
AIR, TISSUE, FAT, LUNG, LIVER, MUSCLE, MYO, LV_BLOOD, RV_BLOOD, LESION = range(10)
TISSUE_LABELS = np.array([0, 0, 0, 0, 0, 0, MYOCARDIUM, LV, RV, MYOCARDIUM], dtype=np.int64)
"""Label (class index) of each tissue: myocardium and lesion (scar/edema) are myocardium."""

CONTRASTS: dict[str, tuple[float, ...]] = {
    #       air  tissue fat   lung  liver muscle myo   LV    RV    lesion
    "C0": (0.0, 0.34, 0.78, 0.06, 0.40, 0.28, 0.24, 0.90, 0.90, 0.26),
    "LGE": (0.0, 0.30, 0.55, 0.05, 0.32, 0.17, 0.11, 0.55, 0.55, 0.85),
    "T2": (0.0, 0.40, 0.80, 0.05, 0.34, 0.38, 0.45, 0.20, 0.20, 0.68),
}
"""Mean intensity of every tissue per sequence (before jitter, bias and noise)."""


@dataclass
class CardiacPhantom:
    """``images`` ``(N, *S)`` float32 (one per sequence), ``labels`` ``(*S)`` int64 (shared),
    ``spacing`` in mm, ``(x, y[, z])`` order, and the sequence ``names``."""

    images: torch.Tensor
    labels: torch.Tensor
    spacing: tuple[float, ...]
    names: list[str]


def cardiac_phantom(
    image_size: int = 128,
    ndim: int = 2,
    sequences: Sequence[str] = SEQUENCES,
    fov: float = 150.0,
    depth: int | None = None,
    slice_thickness: float = 10.0,
    noise: float = 0.04,
    bias: float = 0.3,
    texture: float = 0.08,
    jitter: float = 0.12,
    blur: float = 0.5,
    lesion_probability: float = 0.5,
    seed: int | Sequence[int] | np.random.Generator = 0,
) -> CardiacPhantom:
    """Draw one random multi-sequence cardiac phantom.

    ``image_size`` voxels per in-plane axis over a field of view of ``fov`` mm; in 3D (``ndim=3``)
    ``depth`` short-axis slices (default ``max(4, image_size // 8)``) of ``slice_thickness`` mm
    from base to apex. ``noise`` is the Rician noise level relative to each sequence's brightest
    mean, ``bias`` the range of the per-sequence multiplicative field ``1 + bias * s``
    (``s`` in [-0.5, 0.5]), ``texture`` the relative std of a smooth within-tissue texture,
    ``jitter`` the relative range of the random per-phantom change of every tissue mean, ``blur``
    the std (voxels) of a Gaussian partial-volume blur (0: none), ``lesion_probability`` the
    chance of a scar/edema patch in the myocardium. ``seed`` (int, sequence of ints or a NumPy
    generator) fixes everything.
    """
    if ndim not in (2, 3):
        raise ValueError(f"cardiac_phantom: ndim must be 2 or 3, got {ndim}")
    if image_size < 8:
        raise ValueError(f"cardiac_phantom: image_size must be >= 8, got {image_size}")
    if isinstance(sequences, str):
        sequences = (sequences,)
    unknown = [s for s in sequences if s not in CONTRASTS]
    if unknown or not sequences:
        raise ValueError(
            f"cardiac_phantom: unknown sequence(s) {unknown}; valid names: {', '.join(CONTRASTS)}"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    spacing = fov / image_size
    shape = (image_size, image_size)
    spacings = (spacing, spacing)
    if ndim == 3:
        depth = max(4, image_size // 8) if depth is None else int(depth)
        shape = (depth, *shape)
        spacings = (spacing, spacing, float(slice_thickness))
    tissue = _anatomy(shape, spacings, rng, lesion_probability)
    labels = TISSUE_LABELS[tissue]

    smooth = rng.standard_normal(shape, dtype=np.float32)
    smooth = gaussian_filter(smooth, [4.0 / s for s in spacings[::-1]])
    smooth = smooth / (smooth.std() + 1e-8)
    sigma_blur = (blur, blur) if ndim == 2 else (0.0, blur, blur)
    images = []
    for name in sequences:
        means = np.asarray(CONTRASTS[name], np.float32)
        means = means * (1 + jitter * (rng.random(len(means), dtype=np.float32) - 0.5))
        clean = means[tissue] * (1 + texture * smooth)
        if blur > 0:
            clean = gaussian_filter(clean, sigma_blur)
        field = 1 + bias * _smooth_field(shape, rng)
        images.append(_rician(clean * field, noise * means.max(), rng))
    return CardiacPhantom(
        images=torch.from_numpy(np.stack(images).astype(np.float32)),
        labels=torch.from_numpy(labels),
        spacing=spacings,
        names=list(sequences),
    )


# ---------------------------------------------------------------------- internals
def _anatomy(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    rng: np.random.Generator,
    lesion_probability: float,
) -> np.ndarray:
    """Tissue index map (``shape``) of one random heart in a torso."""
    u = rng.uniform
    axes = [
        ((np.arange(n) - (n - 1) / 2) * s).astype(np.float32)
        for n, s in zip(shape[::-1], spacing, strict=True)
    ]
    coords = np.meshgrid(*axes[::-1], indexing="ij")[::-1]  # x, y[, z] arrays of tensor shape
    x, y = coords[0], coords[1]
    fov = min(a[-1] - a[0] for a in axes[:2])
    # heart size along the long axis: 1 in the base slices, shrinking towards the apex
    if len(shape) == 3:
        z = coords[2]
        t = (z - z.min()) / max(np.ptp(z), 1e-6)  # 0 base .. 1 apex
        scale = np.sqrt(np.clip(1 - (t / 1.15) ** 2, 0.05, 1))
        rv_scale = np.clip(1 - t / u(0.7, 0.9), 0, 1)
    else:
        scale, rv_scale = 1.0, 1.0

    # float32 arrays throughout (NumPy float64 scalars would promote every map to float64)
    centre = rng.normal(0, 0.04 * fov, 2).astype(np.float32)
    theta = np.deg2rad(u(150, 210))  # direction LV -> RV (RV to the image left, jittered)
    direction = np.array([np.cos(theta), np.sin(theta)], np.float32)
    xh, yh = x - centre[0], y - centre[1]
    along = xh * direction[0] + yh * direction[1]  # towards the RV
    across = -xh * direction[1] + yh * direction[0]

    tissue = np.full(shape, TISSUE, dtype=np.int64)
    # torso: body ellipse behind the heart (posterior = away from the chest wall at the top)
    body_c = centre + np.array([u(-15, 15), u(25, 55)], np.float32)
    body_a, body_b = u(140, 170), u(95, 125)
    rb = np.hypot((x - body_c[0]) / body_a, (y - body_c[1]) / body_b)
    fat_t, muscle_t = u(6, 14), u(6, 12)
    tissue[rb > 1 - (fat_t + muscle_t) / body_b] = MUSCLE
    tissue[rb > 1 - fat_t / body_b] = FAT
    tissue[rb > 1] = AIR
    # lungs beside the heart, liver below
    for side in (-1.0, 1.0):
        lung_c = centre + np.array([side * u(50, 65), u(5, 25)], np.float32)
        a, b = u(25, 40), u(35, 55)
        inside = np.hypot((x - lung_c[0]) / a, (y - lung_c[1]) / b) < 1
        tissue[inside & (rb <= 1 - (fat_t + muscle_t) / body_b)] = LUNG
    liver_c = centre + np.array([u(-50, -20), u(55, 75)], np.float32)
    inside = np.hypot((x - liver_c[0]) / u(45, 60), (y - liver_c[1]) / u(25, 35)) < 1
    tissue[inside & (rb <= 1 - (fat_t + muscle_t) / body_b)] = LIVER

    # LV: elliptic endocardium with a Fourier wobble, myocardium of slowly varying thickness
    phi = np.arctan2(across, along)
    r = np.hypot(along, across)
    r_endo = u(14, 24) * scale
    ecc, ecc_angle = u(0.85, 1.15), u(0, np.pi)
    ell = 1 / np.sqrt((np.cos(phi - ecc_angle) * ecc) ** 2 + (np.sin(phi - ecc_angle) / ecc) ** 2)
    wobble = 1 + sum(u(0, 0.05) * np.cos(k * phi + u(0, 2 * np.pi)) for k in (2, 3, 4))
    endo = r_endo * ell * wobble
    thick = u(6, 11) * (1 + u(0, 0.2) * np.cos(phi + u(0, 2 * np.pi)))
    epi = endo + thick * scale**0.5
    r_epi = float(np.mean(r_endo) + u(6, 11))
    # RV: an offset ellipse minus the LV (a crescent), with a thin wall and epicardial fat
    offset, a_rv, b_rv = r_epi * u(0.5, 0.75), r_epi * u(0.95, 1.2), r_epi * u(1.15, 1.45)
    r_rv = np.hypot((along - offset) / (a_rv * (rv_scale + 1e-6) ** 0.5), across / b_rv)
    wall = u(2, 4)
    rv_outer = (r_rv < 1 + wall / a_rv) & (r >= epi) & (rv_scale > 0.15)
    rv_inner = (r_rv < 1) & (r >= epi + u(0, 1.5)) & (rv_scale > 0.15)
    heart = (r < epi) | rv_outer
    fat_band = u(0, 5)
    if fat_band > 0.5:  # epicardial fat on part of the circumference
        sector = np.cos(phi - u(0, 2 * np.pi)) > u(-0.2, 0.6)
        near = (r < epi + fat_band) | (r_rv < 1 + (wall + fat_band) / a_rv)
        tissue[near & ~heart & sector & (tissue != AIR)] = FAT
    tissue[rv_outer] = MUSCLE
    tissue[rv_inner] = RV_BLOOD
    tissue[(r < epi) & (r >= endo)] = MYO
    tissue[r < endo] = LV_BLOOD
    if rng.random() < lesion_probability:  # scar / edema: a transmural-ish sector of myocardium
        sector = np.cos(phi - u(0, 2 * np.pi)) > u(0.5, 0.85)
        depth = (r - endo) < thick * u(0.5, 1.0)
        tissue[(tissue == MYO) & sector & depth] = LESION
    return tissue
