"""Known misalignments, with their ground truth: where a newcomer looks for "the FFD
misalignment".

* :class:`RandomFFDMisalignment` and :func:`sample_group`: the paper's bank of random B-spline
  FFDs per sequence and mesh spacing (Sec. 4.4.1), used by the DCC data sets (phantom, MyoPS);
* :func:`random_ffd`, :func:`random_rigid`, :func:`misaligned_phantom` (:class:`MisalignedGroup`):
  the brain phantom's misalignments for the X-CoReg benches (gWI / gRE against the truth);
  :func:`phantom_group`: a group of any size N of the phantom's noisy T1/T2/PD images under
  random FFDs (``bench/bench_phantom.py``, ``bench/bench_scaling.py``);
* :func:`random_dense_warp` / :func:`warp_dense`: the dense misalignment model of the MyoPS
  X-CoReg bench (a rigid motion plus a smooth dense deformation per image).

The training augmentation lives in :mod:`dcc.data.augmentation`.

The FFD bank of Sec. 4.4.1.

The paper imposes, on each slice, "five synthetic FFDs ... with four different mesh spacings for
each sequence", combines them across sequences for training (39 x 5^3 x 4 groups) and keeps one
FFD index for all sequences for validation and testing (15 x 5 x 4 groups). This module does
exactly that, for the phantom and for MyoPS alike:

* the FFD *bank* of a case is ``num_ffds`` FFDs per mesh spacing (``spacings``, mm) per
  sequence; FFD ``(sequence j, level s, index k)`` of a case is drawn from
  ``numpy.random.default_rng([*case_seed, j, s, k])``, so it is fixed by the case's seed;
* training draws a fresh *combination*: one level ``s`` for the group and an index ``k_j`` per
  sequence (:meth:`RandomFFDMisalignment.random_combination`);
* validation and test enumerate every ``(s, k)`` with the same ``k`` for every sequence
  (:meth:`RandomFFDMisalignment.fixed_combinations`), so every run sees the same groups.

Why our own :class:`dcc.spatial.transforms.BSplineFFD` (sampled as in
:func:`dcc.data.misalignment.warp_images`, one lattice for images and labels) rather than TorchIO's
``RandomElasticDeformation`` or MONAI's ``Rand2DElastic(d)``:

* the paper's misalignment is a bank of FFDs at given mesh spacings in mm, combined across
  sequences; TorchIO's transform draws control displacements from its own global RNG on a
  control-point *count* (not a spacing in mm), one image at a time, and cannot replay FFD
  ``(j, s, k)`` of a bank; MONAI's ``Rand2DElastic`` is a Gaussian-smoothed dense random field
  (an elastic deformation, not a B-spline FFD at a mesh spacing);
* ``BSplineFFD`` is the transform class of the registration engine, matches ITK's
  ``BSplineTransform`` (tested against SimpleITK), knows the physical grid, warps the whole group
  in one call in 2D and 3D and returns the ground-truth maps;
* importing TorchIO or MONAI transforms costs 3-6 s per process (and per data-loader worker),
  longer than a phantom training epoch.

Control displacements are i.i.d. normal with std ``magnitude * spacing`` per component, clipped
to ``+-0.4 * spacing``: below the bound 1/K ~ 0.40 of Choi and Lee (2000) for cubic B-splines,
so every FFD is a diffeomorphism (no folding). Images are warped linearly, labels by nearest
neighbour; outside the field of view images are zero (background).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from dcc.data.phantom import Phantom, brain_phantom
from dcc.metrics import registration_error, warping_index
from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import BSplineFFD, Rigid, SpatialTransform

DEFAULT_SPACINGS = (25.0, 35.0, 45.0, 60.0)
"""FFD mesh spacings in mm (four levels, as the paper's four mesh spacings)."""
FOLDING_BOUND = 0.4
"""Control displacements are clipped to this fraction of the mesh spacing (no folding)."""


class RandomFFDMisalignment:
    """A bank of random B-spline FFDs per sequence and mesh spacing (Sec. 4.4.1).

    ``spacings`` are the mesh spacings in mm, ``magnitude`` the std of the control displacements
    as a fraction of the spacing, ``num_ffds`` the FFDs per spacing and sequence (paper: 5).
    """

    def __init__(
        self,
        spacings: Sequence[float] = DEFAULT_SPACINGS,
        magnitude: float = 0.16,
        num_ffds: int = 5,
    ):
        spacings = tuple(float(s) for s in spacings)
        if not spacings or any(s <= 0 for s in spacings):
            raise ValueError(f"RandomFFDMisalignment: spacings must be positive, got {spacings}")
        if magnitude < 0 or num_ffds < 1:
            raise ValueError(
                "RandomFFDMisalignment: need magnitude >= 0 and num_ffds >= 1, got "
                f"{magnitude}, {num_ffds}"
            )
        self.spacings, self.magnitude, self.num_ffds = spacings, float(magnitude), int(num_ffds)

    @property
    def num_levels(self) -> int:
        return len(self.spacings)

    def random_combination(
        self, num_sequences: int, rng: np.random.Generator, fresh: bool = False
    ) -> tuple[int, tuple[int, ...]]:
        """Training: a random level and an independent FFD index per sequence; ``fresh``: the
        index from an unbounded bank (FFD ``k`` of a case is fixed by its seed for any ``k``)."""
        level = int(rng.integers(self.num_levels))
        bank = 2**31 - 1 if fresh else self.num_ffds
        return level, tuple(int(k) for k in rng.integers(bank, size=num_sequences))

    def fixed_combinations(self, num_sequences: int) -> list[tuple[int, tuple[int, ...]]]:
        """Validation/test: every ``(level, k)`` with the same index ``k`` for every sequence
        (``num_levels * num_ffds`` groups per case), the levels in turn (so that any prefix
        mixes all mesh spacings)."""
        return [
            (level, (k,) * num_sequences)
            for k in range(self.num_ffds)
            for level in range(self.num_levels)
        ]

    def transform(
        self, grid: Grid, level: int, indices: Sequence[int], case_seed: Sequence[int]
    ) -> BSplineFFD:
        """The FFDs ``(j, level, indices[j])`` of the case's bank as one group transform."""
        if not 0 <= level < self.num_levels:
            raise ValueError(
                f"RandomFFDMisalignment: level {level} not in 0..{self.num_levels - 1}"
            )
        spacing = self.spacings[level]
        ffd = BSplineFFD(len(indices), grid, spacing)
        shape = ffd.coefficients.shape[1:]
        bound = FOLDING_BOUND * spacing
        coefficients = [
            np.clip(
                np.random.default_rng([*case_seed, j, level, int(k)]).standard_normal(shape)
                * (self.magnitude * spacing),
                -bound,
                bound,
            )
            for j, k in enumerate(indices)
        ]
        with torch.no_grad():
            ffd.coefficients.copy_(torch.from_numpy(np.stack(coefficients)))
        return ffd

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        grid: Grid,
        level: int,
        indices: Sequence[int],
        case_seed: Sequence[int],
        probabilities: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Misalign ``images`` ``(N, *S)`` (linear) and ``labels`` ``(N, *S)`` (nearest) by the
        FFDs ``(j, level, indices[j])`` of the case ``case_seed``; ``grid`` is their common grid.

        ``probabilities`` ``(N, K, *S)`` (class maps such as rho of Eq. 38, class 0 the
        background) are warped linearly too, the mass lost outside the field of view going to
        the background (as the labels there): they stay distributions over the K classes.
        Returns the warped images, labels and probabilities (``None`` if not given).
        """
        if images.shape != labels.shape or images.shape[1:] != grid.shape:
            raise ValueError(
                f"RandomFFDMisalignment: images {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)} must both be (N, *{grid.shape})"
            )
        if len(indices) != images.shape[0]:
            raise ValueError(
                f"RandomFFDMisalignment: {len(indices)} FFD indices for {images.shape[0]} images"
            )
        if probabilities is not None and (
            probabilities.dim() != images.dim() + 1
            or probabilities.shape[:1] + probabilities.shape[2:] != images.shape
        ):
            raise ValueError(
                f"RandomFFDMisalignment: probabilities {tuple(probabilities.shape)} must be "
                f"(N, K, *S) for images {tuple(images.shape)}"
            )
        ffd = self.transform(grid, level, indices, case_seed)
        with torch.no_grad():  # one lattice phi_j(x) for images, labels and probabilities
            normalized = grid.world_to_normalized(ffd.lattice(grid))
        return sample_group(images, labels, probabilities, normalized)


def sample_group(
    images: torch.Tensor,
    labels: torch.Tensor,
    probabilities: torch.Tensor | None,
    normalized: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sample ``images`` ``(N, *S)`` (linear), ``labels`` ``(N, *S)`` (nearest) and
    ``probabilities`` ``(N, K, *S)`` (linear, or ``None``) at the ``grid_sample`` coordinates
    ``normalized`` ``(N, *S, d)``; the probability mass lost outside the field of view goes to
    class 0, the background, as the labels there."""
    warped = sample(images.unsqueeze(1).float(), normalized)[:, 0]
    warped_labels = sample(labels.unsqueeze(1).float(), normalized, mode="nearest")[:, 0]
    warped_probs = None
    if probabilities is not None:
        warped_probs = sample(probabilities.float(), normalized)
        warped_probs[:, 0] += (1 - warped_probs.sum(1)).clamp_min(0)
    return warped, warped_labels.to(labels.dtype), warped_probs


def random_ffd(
    groups: int, grid: Grid, spacing: float = 20.0, std: float = 2.0, seed: int = 0
) -> BSplineFFD:
    """B-spline FFD with i.i.d. normal control displacements of ``std`` mm per component."""
    ffd = BSplineFFD(groups, grid, spacing)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ffd.coefficients.copy_(torch.randn(ffd.coefficients.shape, generator=generator) * std)
    return ffd


def random_rigid(
    groups: int, grid: Grid, max_angle: float = 10.0, max_offset: float = 6.0, seed: int = 0
) -> Rigid:
    """Rigid maps about the grid centre, angles uniform in +-``max_angle`` degrees (about every
    axis in 3D) and offsets uniform in +-``max_offset`` mm."""
    rigid = Rigid(groups, grid.ndim, center=grid.center)
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    with torch.no_grad():
        rigid.angles.copy_(uniform(rigid.angles.shape, math.radians(max_angle)))
        rigid.offset.copy_(uniform(rigid.offset.shape, max_offset))
    return rigid


@torch.no_grad()
def warp_images(
    images: torch.Tensor, grid: Grid, transform: SpatialTransform, mode: str = "bilinear"
) -> torch.Tensor:
    """Resample each image ``(N, *grid.shape)`` at phi_j(x): the misaligned image U_j o phi_j."""
    normalized = grid.world_to_normalized(transform.lattice(grid))
    out = sample(images.unsqueeze(1).float(), normalized, mode=mode)[:, 0]
    return out.to(images.dtype) if mode == "nearest" else out


def random_dense_warp(
    groups: int,
    shape: tuple[int, int],
    max_angle: float = 10.0,
    max_shift: float = 8.0,
    max_deformation: float = 7.0,
    control: int = 5,
    seed: int = 0,
) -> torch.Tensor:
    """Voxel-space misalignments of a 2D ``shape``: a rotation about the image centre uniform in
    +-``max_angle`` degrees, a shift uniform in +-``max_shift`` voxels per axis and a smooth
    dense deformation interpolated (cubic splines) from a ``control x control`` grid of uniform
    random displacements, scaled so that its largest magnitude is ``max_deformation`` voxels.

    Returns ``grid_sample`` coordinates ``(groups, H, W, 2)`` (``align_corners=True``): image j
    is misaligned as ``U_j(T_j(x))`` with ``T_j(x) = R_j (x + d_j(x) - c) + c + t_j``. Use
    :func:`warp_dense` to apply them (edges replicated).
    """
    if len(shape) != 2:
        raise ValueError(f"random_dense_warp: expected a 2D shape (H, W), got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    h, w = shape
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    out = []
    for _ in range(groups):
        coarse = rng.uniform(-1, 1, size=(2, control, control))
        field = np.stack([ndimage.zoom(c, (h / control, w / control), order=3) for c in coarse])
        field = field[:, :h, :w]
        field *= max_deformation / max(np.linalg.norm(field, axis=0).max(), 1e-12)
        angle = np.radians(rng.uniform(-max_angle, max_angle))
        shift = rng.uniform(-max_shift, max_shift, size=2)
        y, x = rows + field[0] - centre[0], cols + field[1] - centre[1]
        cos, sin = np.cos(angle), np.sin(angle)
        ys = cos * y - sin * x + centre[0] + shift[0]
        xs = sin * y + cos * x + centre[1] + shift[1]
        out.append(np.stack([2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1], -1))
    return torch.from_numpy(np.stack(out)).float()


@torch.no_grad()
def warp_dense(images: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Images ``(N, H, W)`` sampled at :func:`random_dense_warp` coordinates, edges replicated."""
    out = sample(images.unsqueeze(1).float(), coords, mode=mode, padding="border")[:, 0]
    return out.to(images.dtype) if mode == "nearest" else out


@dataclass
class MisalignedGroup:
    """Phantom images misaligned by known maps ``truth`` (U_j = P_j o truth_j)."""

    images: torch.Tensor  # (N, *shape)
    labels: torch.Tensor  # (N, *shape) phantom labels misaligned like the images
    grid: Grid
    names: list[str]
    truth: SpatialTransform
    foreground: torch.Tensor  # (*shape) labels of the aligned phantom

    def warping_index(self, estimate: SpatialTransform | None = None) -> float:
        """gWI (Eq. 49) of truth_j o estimate_j over the phantom foreground, in mm (the
        estimate stays on its device)."""
        return warping_index(self.truth, self.grid, estimate, self.foreground)

    def registration_error(self, estimate: SpatialTransform | None = None) -> float:
        """gRE (Eq. 51) of truth_j o estimate_j at the vertices of the field of view, in mm."""
        return registration_error(self.truth, self.grid, estimate)


def misaligned_phantom(
    dim: int = 2,
    realisations: int = 1,
    kind: str = "ffd",
    magnitude: float = 5.5,
    spacing: float = 20.0,
    downsample: int = 1,
    seed: int = 0,
) -> MisalignedGroup:
    """The brain phantom (T1/T2/PD x ``realisations``) under random known misalignments.

    ``kind="ffd"``: B-spline FFD of ``spacing`` mm with control displacements of std
    ``magnitude`` mm (5.5 mm gives a gWI of about 3 mm in 2D); ``kind="rigid"``: rotations up to
    ``magnitude`` degrees and offsets up to ``magnitude`` mm.
    """
    phantom = brain_phantom(dim=dim, realisations=realisations, downsample=downsample, seed=seed)
    n, grid = phantom.images.shape[0], phantom.grid
    if kind == "ffd":
        truth = random_ffd(n, grid, spacing, magnitude, seed=seed + 1)
    elif kind == "rigid":
        truth = random_rigid(n, grid, magnitude, magnitude, seed=seed + 1)
    else:
        raise ValueError(f'misaligned_phantom: kind must be "ffd" or "rigid", got "{kind}"')
    return _misaligned(phantom, n, truth)


def phantom_group(
    n: int,
    phantom: Phantom | None = None,
    spacing: float = 40.0,
    std: float = 5.4,
    seed: int = 0,
    dim: int = 2,
) -> MisalignedGroup:
    """A group of ``n`` brain phantom images under random known B-spline misalignments: the
    first ``n`` of T1/T2/PD x ``ceil(n / 3)`` noisy realisations (``[T1_0, T2_0, PD_0, T1_1,
    ...]``), image j warped by its own FFD of ``spacing`` mm with control displacements of std
    ``std`` mm (:func:`random_ffd` from ``seed``; 40 mm and 5.4 mm give a gWI of about 3 mm in
    2D), the tissue labels alike (nearest neighbour). ``phantom``: one already built with at
    least ``n`` images (default: ``brain_phantom(dim, realisations=ceil(n / 3))``), so that
    several groups of one size share its noise. The groups of ``bench/bench_phantom.py``.
    """
    if n < 1:
        raise ValueError(f"phantom_group: n must be >= 1, got {n}")
    if phantom is None:
        phantom = brain_phantom(dim=dim, realisations=math.ceil(n / 3))
    if phantom.images.shape[0] < n:
        raise ValueError(
            f"phantom_group: the phantom has {phantom.images.shape[0]} images, {n} asked for"
        )
    return _misaligned(phantom, n, random_ffd(n, phantom.grid, spacing, std, seed=seed))


def _misaligned(phantom: Phantom, n: int, truth: SpatialTransform) -> MisalignedGroup:
    """The first ``n`` images of ``phantom`` and its labels moved by ``truth`` (U_j o phi_j)."""
    grid = phantom.grid
    labels = phantom.labels.expand(n, *phantom.labels.shape)
    return MisalignedGroup(
        warp_images(phantom.images[:n], grid, truth),
        warp_images(labels, grid, truth, mode="nearest"),
        grid,
        phantom.names[:n],
        truth,
        phantom.labels,
    )
