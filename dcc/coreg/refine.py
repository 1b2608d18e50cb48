"""Network start, iterative finish: refine a network's dense fields with X-CoReg's FFD stage.

A DCC network predicts one dense displacement u_j^net per image (voxel units, zero-mean over
the group, Eq. 37). :func:`refine_group` resamples every image by its field (U_j o phi_j^net),
registers that group with the unbiased FFD stage of X-CoReg (Algorithm 1, Eqs. 15-17, 37) for
``iterations`` Adam steps from the identity, and returns the composed field

    u_j(x) = u_j^ffd(x) + u_j^net(x + u_j^ffd(x))     (phi_j = phi_j^net o phi_j^ffd),

re-projected onto sum_j u_j(x) = 0 (Eq. 37). The engine's safeguards hold: a refinement whose
X (Eq. 8) ends lower than it started is retried with half the step and, if still worse, left
out (the network's field comes back unchanged). The common space (Gamma) starts from the
engine's EM warm-up on the network-aligned group, not from the network's posterior, whose
classes (K = 4 labels) differ from the intensity classes of the cardiac preset (K = 6).

:func:`refine_batch` does this for a batch ``(B, N, ...)`` of groups; the DCC evaluation
(``evaluate.py refine_iterations=N``), the predict mode (``predict.refine_iterations=N``) and
``bench/bench_mscmr_refine.py`` all call it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dcc.coreg.config import StageConfig, XCoRegConfig, load_preset
from dcc.coreg.engine import XCoReg
from dcc.spatial.fields import (
    compose_displacements,
    inside_mask,
    points_to_displacement,
    warp,
    zero_mean,
)
from dcc.spatial.grid import Grid

__all__ = ["RefineResult", "check_iterations", "refine_batch", "refine_config", "refine_group"]

# Control spacing of the refining FFD (mm): finer than the cardiac2d preset's 50 mm, which only
# has to undo what a rigid stage leaves; the network has done the coarse part already.
FFD_SPACING = 25.0
# Adam step (mm): the paper's FFD step. Chosen on MyoPS validation groups (3 groups, a DCC+All
# network at Reg DSC 77.2): 0.1 mm gave 75.2 / 74.2 after 20 / 50 steps, 0.5 mm 70.4 / 67.2 (the
# X-metric optimum of these slices is not their label alignment). On 32^2 phantom groups
# shifted by one voxel (4.7 mm) from a zero field, larger steps (0.3-1 mm) are needed.
LR = 0.1


@dataclass
class RefineResult:
    displacement: torch.Tensor  # (N, ndim, *S), voxel units, zero-mean over N
    seconds: float
    accepted: bool  # False: the FFD was rejected by the objective check (network field kept)
    x_before: float
    x_after: float


def check_iterations(value, name: str = "refine_iterations") -> int:
    """``value`` as a non-negative int; :class:`ValueError` naming ``name`` otherwise."""
    try:
        number = int(value)
        whole = not isinstance(value, bool) and float(value) == number
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if number < 0:
        raise ValueError(f"{name} must be >= 0 (0: the network alone), got {number}")
    return number


def refine_config(
    iterations: int,
    ndim: int = 2,
    ffd_spacing: float = FFD_SPACING,
    lr: float = LR,
    **overrides,
) -> XCoRegConfig:
    """X-CoReg settings of the refinement: one unbiased FFD stage of ``iterations`` Adam steps
    (step ``lr`` mm, control spacing ``ffd_spacing`` mm, one resolution level) with the other
    settings (K, bins, sampling, lambda, overlap guard) of the preset for the dimension
    (``cardiac2d`` in 2D, ``brain3d`` in 3D); ``overrides`` replace top-level settings."""
    preset = "cardiac2d" if ndim == 2 else "brain3d"
    stage = StageConfig(name="ffd", iterations=iterations, lr=lr, ffd_spacing=ffd_spacing)
    values = {"progress": False, "reference": None, **overrides, "stages": [stage]}
    return load_preset(preset, **values)


def refine_group(
    images: torch.Tensor,
    displacement: torch.Tensor,
    iterations: int,
    spacing: Sequence[float] | None = None,
    **settings,
) -> RefineResult:
    """Refine one group's network fields (module docstring).

    Args:
        images: ``(N, *S)`` intensities of the group (any scale).
        displacement: ``(N, ndim, *S)`` the network's fields, voxel units (channel 0 along x).
        iterations: Adam steps of the FFD stage; 0 returns ``displacement`` unchanged.
        spacing: voxel size in mm, ``(x, y[, z])`` (1 mm when ``None``); the FFD's control
            spacing and step are in mm.
        settings: keyword arguments of :func:`refine_config` (``ffd_spacing``, ``lr``, top-level
            X-CoReg settings); the engine runs on the fields' device unless ``device`` is given.
    """
    start = time.perf_counter()
    iterations = check_iterations(iterations)
    n, ndim, shape = displacement.shape[0], displacement.shape[1], tuple(displacement.shape[2:])
    if images.shape != (n, *shape) or ndim != len(shape):
        raise ValueError(
            f"refine_group: expected images (N, *S) and a displacement (N, ndim, *S) of the "
            f"same group, got {tuple(images.shape)} and {tuple(displacement.shape)}"
        )
    net = displacement.detach().float()
    if iterations == 0:
        return RefineResult(displacement, time.perf_counter() - start, False, float("nan"),
                            float("nan"))
    spacing = [1.0] * ndim if spacing is None else [float(s) for s in spacing]
    if len(spacing) != ndim:
        raise ValueError(f"refine_group: spacing {spacing} needs {ndim} entries (x, y[, z])")
    grid = Grid.from_shape(shape, spacing)
    config = refine_config(iterations, ndim, **{"device": str(net.device), **settings})
    # the engine needs gradients, also inside a test loop (inference mode, no_grad)
    with torch.inference_mode(False), torch.enable_grad():
        net = net.clone()
        # U_j o phi_j^net and its field of view (outside it the warped image is zero padding)
        warped = warp(images.detach().float().clone().to(net.device)[None, :, None], net[None])
        valid = inside_mask(net[None])[0]
        result = XCoReg(config).register(warped[0, :, 0].cpu(), grid, valid=valid.cpu())
    with torch.no_grad():
        ffd = points_to_displacement(result.transform.lattice(grid).cpu(), grid)
        refined = zero_mean(compose_displacements(net[None], ffd.to(net)[None]))[0]
    stage = result.diagnostics["stages"][0]
    return RefineResult(
        refined.to(displacement.dtype),
        time.perf_counter() - start,
        bool(stage["accepted"]),
        float(stage["x_before"]),
        float(result.x_metric),
    )


def refine_batch(
    images: torch.Tensor,
    displacement: torch.Tensor,
    iterations: int,
    spacing: torch.Tensor | Sequence | None = None,
    **settings,
) -> tuple[torch.Tensor, list[RefineResult]]:
    """:func:`refine_group` for every group of a batch: ``images`` ``(B, N, *S)``,
    ``displacement`` ``(B, N, ndim, *S)``, ``spacing`` ``(B, ndim)`` or one ``(ndim,)`` for all.
    ``settings`` as for :func:`refine_group`. Returns the refined fields ``(B, N, ndim, *S)``
    and the per-group results."""
    if displacement.dim() != images.dim() + 1 or images.shape[:2] != displacement.shape[:2]:
        raise ValueError(
            f"refine_batch: expected images (B, N, *S) and a displacement (B, N, ndim, *S), got "
            f"{tuple(images.shape)} and {tuple(displacement.shape)}"
        )
    spacing = None if spacing is None else torch.as_tensor(spacing, dtype=torch.float64)
    results = []
    for b in range(images.shape[0]):
        sp = None if spacing is None else (spacing if spacing.dim() == 1 else spacing[b]).tolist()
        results.append(refine_group(images[b], displacement[b], iterations, sp, **settings))
    return torch.stack([r.displacement for r in results]), results
