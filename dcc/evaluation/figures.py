"""Quick-look figures of a groupwise registration (PNG, matplotlib Agg; never opens windows).

Inputs are tensors in tensor order ``(N, *shape)``; 3D volumes are shown by their middle
slice along the first tensor axis (``D``).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

__all__ = ["save_montage", "save_overlay", "save_group_columns"]

MAX_PER_ROW = 10
PANEL_INCHES = 2.2
DPI = 100
EDGE_COLOUR = "#00ff66"
BRIGHT_COLOURS = [
    "#ff3030",
    "#00e5ff",
    "#ffd700",
    "#ff00ff",
    "#00ff66",
    "#ff8c00",
    "#7b68ee",
    "#adff2f",
    "#ff69b4",
    "#1e90ff",
]


# ---------------------------------------------------------------------------- helpers
def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _middle_slice(x: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """Middle slice along the first spatial axis when there are 3 spatial axes."""
    if spatial_ndim == 3:
        return x[..., x.shape[-3] // 2, :, :]
    return x


def _normalise(img: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the 1st/99th percentiles (constant images give zeros)."""
    img = np.asarray(img, dtype=np.float64)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros_like(img)
    lo, hi = np.percentile(finite, [1.0, 99.0])
    if hi <= lo:
        hi = finite.max()
        lo = finite.min()
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _edges(img: np.ndarray) -> np.ndarray:
    """Binary edge map: Gaussian-smoothed (sigma 1 px) gradient magnitude above 30% of its
    99.5th percentile."""
    mag = ndimage.gaussian_gradient_magnitude(np.asarray(img, dtype=np.float64), sigma=1.0)
    top = np.percentile(mag, 99.5)
    if not top > 0:
        return np.zeros(img.shape, dtype=bool)
    return mag > 0.3 * top


def _label_colours(n: int) -> list[str]:
    """``n`` bright, distinct colours (cycled) that stand out on a grey image."""
    return [BRIGHT_COLOURS[i % len(BRIGHT_COLOURS)] for i in range(max(n, 1))]


def _draw_mask_contour(ax, mask: np.ndarray, colour) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)


def _draw_label_contours(ax, labels: np.ndarray, values: Sequence, colours: list) -> None:
    for value, colour in zip(values, colours, strict=False):
        _draw_mask_contour(ax, labels == value, colour)


def _show(ax, img: np.ndarray, title: str = "", **kwargs) -> None:
    kwargs.setdefault("cmap", "gray")
    kwargs.setdefault("vmin", 0.0)
    kwargs.setdefault("vmax", 1.0)
    ax.imshow(img, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _subset(n: int, k: int = MAX_PER_ROW) -> list[int]:
    """At most ``k`` evenly spaced indices of ``range(n)`` (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def _save(fig: Figure, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()


# ---------------------------------------------------------------------------- public API
def save_montage(
    path: str | os.PathLike,
    before: torch.Tensor,
    after: torch.Tensor,
    posterior: torch.Tensor | None = None,
    names: list[str] | None = None,
    labels_after: torch.Tensor | None = None,
    labels_before: torch.Tensor | None = None,
) -> None:
    """Write a PNG montage: row 1 the images before registration, row 2 after, and a legend.

    ``before``/``after`` are ``(N, *shape)``; for ``N > 10`` an evenly spaced subset of 10 is
    shown, titled with ``names``. Every panel carries the outline of image 0 in its row's state,
    the same kind on both rows: the label outlines of ``labels_before[0]``/``labels_after[0]``
    if both are given, else the thresholded gradient-magnitude edges of image 0, so
    misalignment shows as image structures leaving it. Extra columns: the group mean of the
    normalised images (before/after), and, if ``posterior`` ``(K, *shape)`` is given, its
    argmax as colour labels (alone, and over the mean after).
    """
    before_np = _to_numpy(before).astype(np.float64)
    after_np = _to_numpy(after).astype(np.float64)
    if before_np.shape != after_np.shape or before_np.ndim not in (3, 4):
        raise ValueError(
            f"before/after must both be (N, H, W) or (N, D, H, W), got {before_np.shape} and "
            f"{after_np.shape}"
        )
    n = before_np.shape[0]
    sd = before_np.ndim - 1
    if names is not None and len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} images")
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]

    before2 = np.stack([_normalise(s) for s in _middle_slice(before_np, sd)])
    after2 = np.stack([_normalise(s) for s in _middle_slice(after_np, sd)])

    labels2 = []  # label slices (before, after) when both are given
    for name, labels in (("labels_before", labels_before), ("labels_after", labels_after)):
        if labels is not None:
            lab_np = _to_numpy(labels)
            if lab_np.shape != after_np.shape:
                raise ValueError(f"{name} shape {lab_np.shape} != after shape {after_np.shape}")
            labels2.append(_middle_slice(lab_np, sd)[0])

    post2 = None
    if posterior is not None:
        post_np = _to_numpy(posterior)
        if post_np.shape[1:] != after_np.shape[1:]:
            raise ValueError(f"posterior must be (K, *{after_np.shape[1:]}), got {post_np.shape}")
        post2 = np.argmax(_middle_slice(post_np, sd), axis=0)
        n_classes = post_np.shape[0]

    shown = _subset(n)
    ncols = len(shown) + 1 + (1 if post2 is not None else 0)
    height, width = before2.shape[1:]
    aspect = height / max(width, 1)
    panel_h = PANEL_INCHES * min(max(aspect, 0.4), 2.5)
    fig = Figure(figsize=(PANEL_INCHES * ncols, panel_h * 2 + 1.3))

    axes = fig.subplots(2, ncols, squeeze=False)
    handles = []
    if len(labels2) == 2:
        lab_values = sorted({v for lab in labels2 for v in np.unique(lab) if v != 0})
        lab_colours = _label_colours(len(lab_values))
        overlays = [
            partial(_draw_label_contours, labels=lab, values=lab_values, colours=lab_colours)
            for lab in labels2
        ]
        handles += [
            Line2D([0], [0], color=c, lw=2, label=f"label {_scalar(v)} of {names[0]}")
            for v, c in zip(lab_values, lab_colours, strict=False)
        ]
    else:
        overlays = [
            partial(_draw_mask_contour, mask=_edges(rows[0]), colour=EDGE_COLOUR)
            for rows in (before2, after2)
        ]
        handles.append(Line2D([0], [0], color=EDGE_COLOUR, lw=2, label=f"edges of {names[0]}"))

    for col, i in enumerate(shown):
        for row, (images, state) in enumerate(((before2, "before"), (after2, "after"))):
            _show(axes[row, col], images[i], f"{names[i]}\n{state}")
            overlays[row](axes[row, col])

    col = len(shown)
    for row, (images, state) in enumerate(((before2, "before"), (after2, "after"))):
        _show(axes[row, col], images.mean(axis=0), f"mean of {n} ({state})")
        overlays[row](axes[row, col])

    if post2 is not None:
        col += 1
        # class 0 dark (usually background), classes 1.. in the bright palette
        colours = ["#202020", *_label_colours(n_classes - 1)][:n_classes]
        _show(
            axes[0, col],
            post2,
            f"posterior argmax (K={n_classes})",
            cmap=ListedColormap(colours),
            vmin=-0.5,
            vmax=n_classes - 0.5,
        )
        _show(axes[1, col], after2.mean(axis=0), "argmax over mean (after)")
        _draw_label_contours(axes[1, col], post2, range(1, n_classes), colours[1:])
        handles += [
            Patch(color=c, label=f"posterior class {k}") for k, c in enumerate(colours) if k
        ]

    shown_text = ", ".join(names[i] for i in shown)
    if len(shown) < n:
        title = f"{n} images, showing {len(shown)}: {shown_text}"
    else:
        title = f"{n} images: {shown_text}"
    if sd == 3:
        title += f"  (middle slice {before_np.shape[1] // 2} of {before_np.shape[1]})"
    max_chars = int(14 * PANEL_INCHES * ncols)
    if len(title) > max_chars:
        title = title[: max_chars - 3] + "..."
    fig.suptitle(title, fontsize=9)
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), max(2, ncols * 2)),
        fontsize=7,
        frameon=False,
    )
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=(0.1 + 0.2 * math.ceil(len(handles) / max(2, ncols * 2))) / fig.get_figheight(),
        top=1 - 0.75 / fig.get_figheight(),
        wspace=0.05,
        hspace=0.25,
    )
    _save(fig, path)


def save_overlay(
    path: str | os.PathLike, image: torch.Tensor, labels: torch.Tensor, title: str = ""
) -> None:
    """Write a PNG of ``image`` (2D or 3D, middle slice) in grey with the outline of every
    nonzero label of ``labels`` (same shape) in its own colour."""
    img = _to_numpy(image).astype(np.float64)
    lab = _to_numpy(labels)
    if img.shape != lab.shape or img.ndim not in (2, 3):
        raise ValueError(
            f"image and labels must be equal 2D/3D shapes, got {img.shape} and {lab.shape}"
        )
    img2 = _normalise(_middle_slice(img, img.ndim))
    lab2 = _middle_slice(lab, lab.ndim)
    values = [v for v in np.unique(lab2) if v != 0]
    colours = _label_colours(len(values))

    height, width = img2.shape
    aspect = height / max(width, 1)
    side = 5.0
    fig = Figure(figsize=(side, side * min(max(aspect, 0.3), 3.0) + 0.5))
    ax = fig.subplots()
    _show(ax, img2, title)
    _draw_label_contours(ax, lab2, values, colours)
    if values:
        handles = [
            Line2D([0], [0], color=c, lw=2, label=str(_scalar(v)))
            for v, c in zip(values, colours, strict=False)
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=math.ceil(len(values) / 8))
    fig.tight_layout()
    _save(fig, path)


def save_group_columns(
    path: str | os.PathLike,
    columns: Sequence[Mapping],
    order: Sequence[str],
    structures: Sequence[str],
    title: str = "",
) -> None:
    """Write a PNG of one group as several methods see it (like the paper's Fig. 10): a column
    per method, a row per sequence of ``order`` and a last row of label maps.

    Each column is a mapping: ``"title"``; ``"images"`` ``(N, H, W)`` and ``"sequences"`` (the
    name of each image); ``"contour"`` ``(H, W)``, the labels outlined on every image of the
    column; ``"seg"`` ``(H, W)``, the label map of the last row, and ``"seg_title"``. Labels
    ``1..len(structures)`` get a colour each, named in a legend."""
    colours = _label_colours(len(structures))
    values = list(range(1, len(structures) + 1))
    cmap = ListedColormap(["black", *colours])
    fig = Figure(figsize=(PANEL_INCHES * len(columns), PANEL_INCHES * (len(order) + 1) + 0.6))
    axes = fig.subplots(len(order) + 1, len(columns), squeeze=False)
    for c, col in enumerate(columns):
        contour = _to_numpy(col["contour"])
        for r, sequence in enumerate(order):
            ax = axes[r, c]
            image = _to_numpy(col["images"][list(col["sequences"]).index(sequence)])
            ax.imshow(_normalise(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _draw_label_contours(ax, contour, values, colours)
            ax.set_title(col["title"] if r == 0 else "", fontsize=8)
            ax.set_ylabel(sequence if c == 0 else "", fontsize=8)
        ax = axes[len(order), c]
        ax.imshow(
            _to_numpy(col["seg"]), cmap=cmap, vmin=0, vmax=len(structures),
            interpolation="nearest",
        )
        ax.set_xlabel(col["seg_title"], fontsize=7)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(textwrap.fill(title, 40 * len(columns)), fontsize=7)
    handles = [Patch(color=c, label=n) for c, n in zip(colours, structures, strict=True)]
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    _save(fig, path)


def _scalar(v) -> int | float:
    v = v.item() if hasattr(v, "item") else v
    return int(v) if float(v).is_integer() else float(v)
