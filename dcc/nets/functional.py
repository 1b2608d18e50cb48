"""Stateless pieces of the DCC network (paper Sec. 3.5.3, Fig. 5): pure torch.

Images inside the network are flattened to ``(B·N, C, *S)`` (one row per image of a group of
``N``); functions that need the group axis take it back as ``(B, N, C, *S)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def domain_batch_norm(
    x: torch.Tensor,
    counts: Sequence[int],
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Domain-specific batch normalisation (DSBN, ref. [34] of the paper).

    ``x`` is ``(M, C, *S)`` *sorted by domain*: the first ``counts[0]`` images belong to domain
    0, the next ``counts[1]`` to domain 1, and so on (``sum(counts) == M``; see
    :func:`sort_by_domain`). Each domain's images go through their own batch norm — its own
    batch statistics in training mode, its own running statistics ``running_mean/var[d]``
    (updated in place only for the domains present) and its own affine ``weight/bias[d]``
    ``(D, C)`` — exactly as ``D`` separate ``BatchNorm`` layers would, via the native kernel:
    in one call when every domain has the same number of images (a batch of groups with one
    image per sequence: the domains then become channel blocks of one batch norm), else per
    domain.
    """
    d, c = len(counts), x.shape[1]
    if d > 1 and counts[0] > 0 and len(set(counts)) == 1:
        per = counts[0]  # (D·per, C, *S) -> (per, D·C, *S): domain-major channel blocks
        blocks = x.view(d, per, c, *x.shape[2:]).transpose(0, 1).reshape(per, d * c, *x.shape[2:])
        flat = [None if t is None else t.reshape(-1)
                for t in (running_mean, running_var, weight, bias)]
        out = F.batch_norm(blocks, *flat, training or running_mean is None, momentum, eps)
        return out.view(per, d, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
    outputs = []
    for d, chunk in enumerate(x.split(list(counts))):
        if chunk.shape[0] == 0:
            continue
        outputs.append(F.batch_norm(
            chunk,
            None if running_mean is None else running_mean[d],
            None if running_var is None else running_var[d],
            None if weight is None else weight[d],
            None if bias is None else bias[d],
            training or running_mean is None,
            momentum,
            eps,
        ))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def sort_by_domain(domains: torch.Tensor, num_domains: int
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
    """Order that groups the images of a flat batch by domain, for :func:`domain_batch_norm`.

    Returns ``(order, inverse, counts)``: ``x[order]`` is sorted by domain (stable),
    ``y[inverse]`` undoes it, ``counts[d]`` is the number of images of domain ``d``. ``order``
    and ``inverse`` are ``None`` when the batch is already sorted.
    """
    counts = torch.bincount(domains, minlength=num_domains).tolist()
    if bool((domains[1:] >= domains[:-1]).all()):
        return None, None, counts
    order = torch.argsort(domains, stable=True)
    return order, torch.argsort(order), counts


def group_moments(features: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second moments of ``features`` across the group axis ``dim`` (Fig. 5 fusion).

    Returns ``(mean, var)`` with ``dim`` removed; the variance is the biased one (``0`` for a
    group of one). Both are invariant to the order of the group and defined for any size.
    """
    mean = features.mean(dim)
    var = (features - mean.unsqueeze(dim)).square().mean(dim)  # two-pass: no cancellation
    return mean, var


def pad_to_multiple(x: torch.Tensor, ndim: int, multiple: int) -> tuple[torch.Tensor, tuple]:
    """Pad the last ``ndim`` axes of ``x`` (by edge replication, split evenly before/after) up to
    a multiple of ``multiple``. Returns the padded tensor and the slices that crop it back."""
    size = x.shape[-ndim:]
    extra = [(-s) % multiple for s in size]
    crop = tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, size, strict=True))
    if not any(extra):
        return x, crop
    pads = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pads += [e // 2, e - e // 2]
    return F.pad(x, pads, mode="replicate"), crop


def crop(x: torch.Tensor, slices: tuple) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on the last ``len(slices)`` axes."""
    return x[(Ellipsis, *slices)]


def upsample_displacement(displacement: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample a displacement ``(M, ndim, *S)`` in voxel units by an integer ``factor``.

    The field is interpolated (bi/trilinear, half-pixel aligned) and multiplied by ``factor``
    so that it stays in voxel units of the finer grid.
    """
    mode = "bilinear" if displacement.dim() == 4 else "trilinear"
    up = F.interpolate(displacement, scale_factor=factor, mode=mode, align_corners=False)
    return up * factor
