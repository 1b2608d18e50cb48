"""Training-only augmentation of aligned groups (not in the paper): where a newcomer looks for
"the augmentation". The misalignments themselves are in :mod:`dcc.data.misalignment`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dcc.data.misalignment import sample_group
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import Affine


class GroupAugmentation:
    """Training-only augmentation of an aligned group, before its misalignment.

    * ``rotation`` (degrees) and ``scaling`` (fraction): one random in-plane rotation about the
      grid centre, uniform in ``[-rotation, rotation]``, and one isotropic scaling, log-uniform
      in ``[1/(1+scaling), 1+scaling]``, for the whole group (every member alike: the group stays
      aligned, its anatomy varies);
    * ``gamma``: a contrast change per image, ``x -> x**g`` on the image rescaled to [0, 1],
      ``log g`` uniform in ``[-gamma, gamma]``;
    * ``fresh_ffds``: misalign by FFDs drawn afresh (an unbounded bank) instead of the case's
      ``num_ffds`` per mesh spacing (:meth:`RandomFFDMisalignment.random_combination`);
    * ``transforms``: TorchIO transforms (``data.transforms``, e.g. ``torchio.RandomBiasField``,
      ``RandomNoise``, ``RandomMotion``, ``RandomGhosting``: the artefacts of cardiac MR), applied
      in their order after the above: an intensity transform to every image on its own (its own
      random draw), a spatial one to the whole group at once (one draw for the images, the
      labels and rho, so the group stays aligned). TorchIO draws from torch's random generator:
      it is seeded here from ``rng``, so the run's seed fixes the draws.

    ``rotation``/``scaling``/``gamma`` stay our own code rather than ``RandomAffine`` /
    ``RandomGamma``: they are a few tensor operations on the group's grid, where TorchIO wraps
    each image in a SimpleITK resampling (slower per group) and works on 3D volumes only.

    Not in the paper (its training set is the FFD bank alone): MyoPS has 21 training patients,
    and these widen what the network sees of anatomy, contrast and deformation.
    """

    def __init__(
        self,
        rotation: float = 0.0,
        scaling: float = 0.0,
        gamma: float = 0.0,
        fresh_ffds: bool = False,
        transforms: Sequence[Any] = (),
    ):
        if rotation < 0 or scaling < 0 or gamma < 0:
            raise ValueError(
                "GroupAugmentation: rotation, scaling and gamma must be >= 0, got "
                f"{rotation}, {scaling}, {gamma}"
            )
        self.rotation, self.scaling, self.gamma = float(rotation), float(scaling), float(gamma)
        self.fresh_ffds = bool(fresh_ffds)
        self.transforms = list(transforms)

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
        if self.transforms:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**62)))
                images, labels, probabilities = self._torchio(images, labels, probabilities, grid)
        return images, labels, probabilities

    def _torchio(self, images, labels, probabilities, grid: Grid):
        """:attr:`transforms` on the group (class docstring); 2D slices as volumes of depth 1,
        with the grid's spacing."""
        import torchio as tio

        n, flat = images.shape[0], grid.ndim == 2
        spacing = list(reversed(grid.spacing)) + ([1.0] if flat else [])  # tensor-axis order

        def volume(x: torch.Tensor) -> torch.Tensor:  # (C, *S) -> (C, H, W, D)
            return x[..., None] if flat else x

        def back(x: torch.Tensor) -> torch.Tensor:
            return x[..., 0] if flat else x

        affine = np.diag([*spacing, 1.0])
        for transform in self.transforms:
            if isinstance(transform, tio.IntensityTransform):  # every image on its own
                images = torch.stack([
                    back(transform(tio.ScalarImage(tensor=volume(images[j : j + 1].float()),
                                                   affine=affine)).data)[0]
                    for j in range(n)
                ])
                continue
            subject = tio.Subject(  # the whole group: one draw for everything
                **{f"image{j}": tio.ScalarImage(tensor=volume(images[j : j + 1].float()),
                                                affine=affine) for j in range(n)},
                **{f"labels{j}": tio.LabelMap(tensor=volume(labels[j : j + 1]), affine=affine)
                   for j in range(n)},
                **{f"rho{j}": tio.ScalarImage(tensor=volume(probabilities[j].float()),
                                              affine=affine) for j in range(n)},
            )
            moved = transform(subject)
            images = torch.stack([back(moved[f"image{j}"].data)[0] for j in range(n)])
            labels = torch.stack([back(moved[f"labels{j}"].data)[0] for j in range(n)]).to(
                labels.dtype)
            probabilities = torch.stack([back(moved[f"rho{j}"].data) for j in range(n)]).to(
                probabilities.dtype)
        return images, labels, probabilities
