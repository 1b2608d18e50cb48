"""Groupwise registration metrics: gWI, gRE (paper Eqs. (49)-(52)) and pairwise Dice.

All functions are stateless. Points and displacements are physical, in ITK ``(x, y[, z])``
order and millimetres (see :mod:`dcc.spatial.grid`); label maps are in tensor order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dcc.spatial.grid import Grid
from dcc.spatial.transforms import SpatialTransform

__all__ = [
    "groupwise_warping_index",
    "groupwise_registration_error",
    "composed_points",
    "warping_index",
    "registration_error",
    "foreground_mask",
    "pairwise_dice",
    "dice",
    "surface_distances",
    "pairwise_surface_distances",
    "nanmean",
]


# ---------------------------------------------------------------------------- gWI / gRE
def _groupwise_rms(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(1/N') sum_j sqrt(mean_{x in mask_j} ||v_j(x) - mean_j' v_j'(x)||^2)``.

    ``values`` is ``(N, M, d)``; the group mean is over all ``N`` images at every point. Images
    whose mask is empty are left out of the outer average (``N'`` counts the others); the result
    is NaN if every mask is empty.
    """
    if values.ndim != 3:
        raise ValueError(f"expected values of shape (N, M, d), got {tuple(values.shape)}")
    centred = values - values.mean(dim=0, keepdim=True)
    sq = centred.pow(2).sum(dim=-1)  # (N, M)
    if mask is None:
        per_image = sq.mean(dim=1).sqrt()
        return per_image.mean()
    if mask.shape != sq.shape:
        raise ValueError(f"mask must have shape {tuple(sq.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    count = mask.sum(dim=1)
    valid = count > 0
    if not bool(valid.any()):
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    ms = torch.where(mask, sq, torch.zeros_like(sq)).sum(dim=1)[valid] / count[valid]
    return ms.sqrt().mean()


def groupwise_warping_index(
    mapped: torch.Tensor, points: torch.Tensor, foreground: torch.Tensor | None = None
) -> torch.Tensor:
    """Groupwise warping index gWI in mm, Eqs. (49)-(50).

    ``mapped`` ``(N, M, d)`` holds ``phi_dagger_j o phi_hat_j (x)`` for the ``M`` common-space
    points ``points`` ``(M, d)``. With ``r_j(x) = mapped_j(x) - x`` and ``r_bar_j = r_j -
    mean_j' r_j'`` (mean over all ``N`` images), gWI ``= (1/N) sum_j sqrt(mean_{x in
    Omega_j^f} ||r_bar_j(x)||^2)``. ``foreground`` ``(N, M)`` bool restricts the inner mean
    (e.g. from :func:`foreground_mask`); ``None`` uses all points. Images with an empty
    foreground are left out of the outer mean.
    """
    if mapped.ndim != 3 or points.ndim != 2 or mapped.shape[1:] != points.shape:
        raise ValueError(
            f"expected mapped (N, M, d) and points (M, d), got {tuple(mapped.shape)} and "
            f"{tuple(points.shape)}"
        )
    residual = mapped - points.to(mapped.dtype).unsqueeze(0)
    return _groupwise_rms(residual, foreground)


def groupwise_registration_error(mapped_corners: torch.Tensor) -> torch.Tensor:
    """Groupwise registration error gRE in mm, Eqs. (51)-(52).

    ``mapped_corners`` ``(N, C, d)`` holds ``phi_dagger_j o phi_hat_j (v_i)`` at the ``C = 2^d``
    corners ``v_i``. With ``e_bar_j(v_i) = mapped_j(v_i) - mean_j' mapped_j'(v_i)``,
    gRE ``= (1/N) sum_j sqrt((1/C) sum_i ||e_bar_j(v_i)||^2)``.
    """
    return _groupwise_rms(mapped_corners)


def _apply(transform: SpatialTransform, points: torch.Tensor) -> torch.Tensor:
    """``transform(points)`` computed where (and in the precision in which) the transform lives,
    returned like ``points``. The transform itself is never moved (``Module.cpu()`` / ``.to()``
    act in place)."""
    reference = next(iter(transform.parameters()), None)
    if reference is None:
        reference = next(iter(transform.buffers()), points)
    mapped = transform(points.to(reference.device, reference.dtype))
    return mapped.to(points.device, points.dtype)


@torch.no_grad()
def composed_points(
    truth: SpatialTransform, points: torch.Tensor, estimate: SpatialTransform | None = None
) -> torch.Tensor:
    """``phi_dagger_j o phi_hat_j (x)`` ``(N, M, d)`` for common-space points ``(M, d)`` (on
    the device of ``points``): ``truth`` are the known misalignments, ``estimate`` the
    registration result (identity if ``None``); the transforms stay on their devices."""
    return _apply(truth, points if estimate is None else _apply(estimate, points))


def warping_index(
    truth: SpatialTransform,
    grid: Grid,
    estimate: SpatialTransform | None = None,
    foreground: torch.Tensor | None = None,
) -> float:
    """gWI in mm (Eqs. 49-50) of ``truth_j o estimate_j`` at the voxel centres of ``grid``,
    restricted to the points mapped into ``foreground`` (labels of the aligned phantom on
    ``grid``, see :func:`foreground_mask`); all voxels if ``None``."""
    points = grid.points().reshape(-1, grid.ndim)
    mapped = composed_points(truth, points, estimate)
    mask = None if foreground is None else foreground_mask(mapped, grid, foreground.cpu())
    return groupwise_warping_index(mapped, points, mask).item()


def registration_error(
    truth: SpatialTransform, grid: Grid, estimate: SpatialTransform | None = None
) -> float:
    """gRE in mm (Eqs. 51-52) of ``truth_j o estimate_j`` at the ``2**d`` vertices of the
    field of view of ``grid`` (the outer voxel edges, :meth:`Grid.vertices`), as in the
    paper's RIRE experiment (Sec. 4.2)."""
    vertices = torch.as_tensor(grid.vertices(), dtype=torch.float32)
    return groupwise_registration_error(composed_points(truth, vertices, estimate)).item()


def foreground_mask(mapped: torch.Tensor, grid: Grid, labels: torch.Tensor) -> torch.Tensor:
    """``labels > 0`` looked up at the physical points ``mapped`` ``(..., d)`` (nearest
    neighbour, zero outside ``grid``): the sets ``Omega_j^f`` of Eq. (50).

    ``labels`` is a map on ``grid`` (tensor order, shape ``grid.shape``), or one map per image,
    ``(N, *grid.shape)`` with ``mapped`` of shape ``(N, M, d)``. Returns a bool tensor of shape
    ``mapped.shape[:-1]``.
    """
    d = grid.ndim
    if mapped.shape[-1] != d:
        raise ValueError(f"points must have {d} coordinates, got shape {tuple(mapped.shape)}")
    if tuple(labels.shape[-d:]) != grid.shape or labels.ndim not in (d, d + 1):
        raise ValueError(
            f"labels must have shape {grid.shape} or (N, *{grid.shape}), got {tuple(labels.shape)}"
        )
    out_shape = mapped.shape[:-1]
    dtype = mapped.dtype if mapped.is_floating_point() else torch.float32
    coords = grid.world_to_normalized(mapped.to(dtype))
    if labels.ndim == d:
        inp = labels.reshape(1, 1, *grid.shape)
        coords = coords.reshape(1, -1, d)
    else:
        n = labels.shape[0]
        if mapped.ndim != 3 or mapped.shape[0] != n:
            raise ValueError(
                f"per-image labels {tuple(labels.shape)} need mapped of shape ({n}, M, {d}), "
                f"got {tuple(mapped.shape)}"
            )
        inp = labels.reshape(n, 1, *grid.shape)
        coords = coords.reshape(n, -1, d)
    # (B, L, d) -> (B, 1, L, d) in 2D or (B, 1, 1, L, d) in 3D
    coords = coords.reshape(coords.shape[0], *([1] * (d - 1)), coords.shape[1], d)
    inp = (inp > 0).to(dtype)
    sampled = F.grid_sample(inp, coords, mode="nearest", padding_mode="zeros", align_corners=True)
    return (sampled.reshape(out_shape) > 0.5).to(mapped.device)


# ---------------------------------------------------------------------------- Dice
def _label_list(labels: torch.Tensor, label_values: Sequence[int] | None) -> list[int]:
    if label_values is None:
        return [int(v) for v in torch.unique(labels).tolist() if v != 0]
    return [int(v) for v in label_values]


def _overlap_counts(
    labels: torch.Tensor,
    label_values: Sequence[int],
    mask: torch.Tensor | None = None,
    chunk_bytes: int = 1 << 28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersections ``(L, N, N)`` and sizes ``(L, N)`` of the label sets of ``N`` maps."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1)
    if mask is not None:
        mask = mask.to(torch.bool).reshape(-1)
        if mask.numel() != flat.shape[1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match labels {tuple(labels.shape)}"
            )
        flat = flat[:, mask]
    values = torch.as_tensor(list(label_values), dtype=flat.dtype, device=flat.device)
    n_lab = len(values)
    inter = torch.zeros(n_lab, n, n, dtype=torch.float64, device=flat.device)
    if n_lab == 0 or flat.shape[1] == 0:
        return inter, torch.zeros(n_lab, n, dtype=torch.float64, device=flat.device)
    step = max(1, chunk_bytes // (8 * n * n_lab))
    for start in range(0, flat.shape[1], step):
        part = flat[:, start : start + step]
        onehot = (part.unsqueeze(0) == values.view(-1, 1, 1)).to(torch.float64)  # (L, N, V)
        inter += onehot @ onehot.transpose(1, 2)
    sizes = torch.diagonal(inter, dim1=1, dim2=2).clone()
    return inter, sizes


def _dice_matrix(
    labels: torch.Tensor, label_values: Sequence[int], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dice ``(L, N, N)`` between all maps per label; NaN where both sets are empty."""
    inter, sizes = _overlap_counts(labels, label_values, mask)
    denom = sizes.unsqueeze(2) + sizes.unsqueeze(1)
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1.0), float("nan"))


def nanmean(values: Sequence[float]) -> float:
    """The mean of the finite entries of ``values`` (NaN: an undefined metric, left out); NaN
    when none is finite."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def pairwise_dice(
    labels: torch.Tensor,
    label_values: Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
) -> dict:
    """Mean Dice ``2|A n B| / (|A| + |B|)`` over all unordered pairs ``i < j`` of the ``N``
    label maps ``labels`` ``(N, *shape)`` (already in the common space).

    ``label_values`` defaults to every nonzero value present; ``mask`` ``(*shape)`` restricts
    the voxels counted. Pairs where both sets are empty are skipped for that label (a label
    with no valid pair gets NaN and is ignored in ``"mean"``). Returns ``{"per_label": {l:
    float}, "mean": float, "pairs": int}``.
    """
    if labels.ndim < 2:
        raise ValueError(f"expected labels of shape (N, *shape), got {tuple(labels.shape)}")
    values = _label_list(labels, label_values)
    n = labels.shape[0]
    scores = _dice_matrix(labels, values, mask)
    iu = torch.triu_indices(n, n, offset=1, device=scores.device)
    pair_scores = scores[:, iu[0], iu[1]]  # (L, P)
    per_label = {}
    for l_idx, value in enumerate(values):
        s = pair_scores[l_idx]
        s = s[~torch.isnan(s)]
        per_label[value] = float(s.mean()) if s.numel() else float("nan")
    return {
        "per_label": per_label,
        "mean": nanmean(list(per_label.values())),
        "pairs": int(iu.shape[1]),
    }


def dice(
    a: torch.Tensor,
    b: torch.Tensor,
    label_values: Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
) -> dict[int, float]:
    """Dice per label between two label maps of equal shape (NaN where both are empty);
    ``label_values`` defaults to the nonzero values present in either map."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    stacked = torch.stack([a, b.to(a.dtype)])
    values = _label_list(stacked, label_values)
    scores = _dice_matrix(stacked, values, mask)
    return {v: float(scores[i, 0, 1]) for i, v in enumerate(values)}


# ---------------------------------------------------------------------- surface distances
def surface_distances(
    a: torch.Tensor,
    b: torch.Tensor,
    label_values: Sequence[int],
    spacing: Sequence[float],
) -> dict[int, dict[str, float]]:
    """The challenge metrics of MS-CMRSeg and MyoPS between two label maps of equal shape, per
    label: ``hd95`` (the symmetric 95th-percentile Hausdorff distance) and ``asd`` (the
    symmetric average surface distance), in mm, from MONAI's
    ``compute_hausdorff_distance`` / ``compute_average_surface_distance``.

    ``spacing`` is the voxel size in mm in ITK order ``(x, y[, z])``. NaN rule: a label absent
    from either map has no surface to measure from, so both distances are NaN (and left out of
    every mean, as an undefined Dice is).
    """
    import warnings

    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    axes_spacing = [float(s) for s in reversed(list(spacing))]  # tensor-axis order
    out = {}
    for value in label_values:
        pa, pb = a == value, b == value
        if not bool(pa.any()) or not bool(pb.any()):
            out[int(value)] = {"hd95": math.nan, "asd": math.nan}
            continue
        one_hot = [torch.stack([~p, p])[None].float() for p in (pa, pb)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation notices of its own helpers
            hd95 = compute_hausdorff_distance(*one_hot, percentile=95, spacing=axes_spacing)
            asd = compute_average_surface_distance(*one_hot, symmetric=True,
                                                   spacing=axes_spacing)
        out[int(value)] = {"hd95": float(hd95), "asd": float(asd)}
    return out


def pairwise_surface_distances(
    labels: torch.Tensor, label_values: Sequence[int], spacing: Sequence[float]
) -> dict[str, dict]:
    """:func:`surface_distances` averaged over every unordered pair of the ``N`` label maps
    ``labels`` ``(N, *shape)`` (the registration counterpart of :func:`pairwise_dice`):
    ``{"hd95": {"per_label": {l: mm}, "mean": mm}, "asd": {...}}``, NaN pairs left out."""
    n = labels.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    values = {key: {int(v): [] for v in label_values} for key in ("hd95", "asd")}
    for i, j in pairs:
        for value, distances in surface_distances(labels[i], labels[j], label_values,
                                                  spacing).items():
            for key in values:
                values[key][value].append(distances[key])
    out = {}
    for key, by_label in values.items():
        per_label = {v: nanmean(d) for v, d in by_label.items()}
        out[key] = {"per_label": per_label, "mean": nanmean(list(per_label.values()))}
    return out
