"""The synthetic misalignment of Sec. 4.4.1: random B-spline FFDs per sequence.

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
:func:`dcc.data.misalign.warp_images`, one lattice for images and labels) rather than TorchIO's
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

from collections.abc import Sequence

import numpy as np
import torch

from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import Affine, BSplineFFD

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


class GroupAugmentation:
    """Training-only augmentation of an aligned group, before its misalignment.

    * ``rotation`` (degrees) and ``scaling`` (fraction): one random in-plane rotation about the
      grid centre, uniform in ``[-rotation, rotation]``, and one isotropic scaling, log-uniform
      in ``[1/(1+scaling), 1+scaling]``, for the whole group (every member alike: the group stays
      aligned, its anatomy varies);
    * ``gamma``: a contrast change per image, ``x -> x**g`` on the image rescaled to [0, 1],
      ``log g`` uniform in ``[-gamma, gamma]``;
    * ``fresh_ffds``: misalign by FFDs drawn afresh (an unbounded bank) instead of the case's
      ``num_ffds`` per mesh spacing (:meth:`RandomFFDMisalignment.random_combination`).

    Not in the paper (its training set is the FFD bank alone): MyoPS has 21 training patients,
    and these widen what the network sees of anatomy, contrast and deformation.
    """

    def __init__(
        self,
        rotation: float = 0.0,
        scaling: float = 0.0,
        gamma: float = 0.0,
        fresh_ffds: bool = False,
    ):
        if rotation < 0 or scaling < 0 or gamma < 0:
            raise ValueError(
                "GroupAugmentation: rotation, scaling and gamma must be >= 0, got "
                f"{rotation}, {scaling}, {gamma}"
            )
        self.rotation, self.scaling, self.gamma = float(rotation), float(scaling), float(gamma)
        self.fresh_ffds = bool(fresh_ffds)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        probabilities: torch.Tensor,
        grid: Grid,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment an aligned group: ``images`` and ``labels`` ``(N, *S)``, ``probabilities``
        ``(N, K, *S)`` on ``grid``; the random state comes from ``rng``."""
        if self.rotation or self.scaling:
            angle = np.deg2rad(self.rotation) * rng.uniform(-1, 1)
            scale = np.exp(np.log1p(self.scaling) * rng.uniform(-1, 1))
            rotation = np.eye(grid.ndim)  # in the slice plane, about the grid centre
            rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
            direction = grid.direction_matrix
            affine = Affine(1, grid.ndim, center=grid.center)  # output x reads the input at phi(x)
            with torch.no_grad():
                affine.matrix.copy_(torch.from_numpy(scale * direction @ rotation @ direction.T))
                normalized = grid.world_to_normalized(affine.lattice(grid))
            images, labels, probabilities = sample_group(
                images, labels, probabilities, normalized.expand(images.shape[0], *grid.shape, -1)
            )
        if self.gamma:
            flat = images.flatten(1)
            low, high = flat.min(1).values, flat.max(1).values
            shape = (-1,) + (1,) * (images.dim() - 1)
            unit = (images - low.view(shape)) / (high - low).clamp_min(1e-6).view(shape)
            g = torch.from_numpy(np.exp(self.gamma * rng.uniform(-1, 1, images.shape[0])))
            images = unit.clamp(0, 1) ** g.float().view(shape)
        return images, labels, probabilities
