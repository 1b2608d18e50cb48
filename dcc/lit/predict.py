"""Predict mode: register and segment a user's own group of image files with a trained DCC
checkpoint (``python evaluate.py mode=predict ckpt_path=C predict.inputs=[a,b,c] predict.out=D``).

The checkpoint alone rebuilds the model (its hyper-parameters: network, sequences, classes,
spacing, strategy); no training config or data root is needed. Each file is read on its own
grid and resampled onto one common grid, as ``dcc-register`` does (the first image's field of
view, at the checkpoint's training spacing by default); the network predicts one displacement
field and one segmentation per image, the EM of the DCC loss gives the common-space posterior
(Eq. 53), and the results go to ``predict.out`` through the writer that ``dcc-register`` uses
(:mod:`dcc.evaluation.outputs`), with the same safety rules for the output folder.

``predict.refine_iterations=N`` (or ``refine_iterations=N``) refines the network's fields by N
steps of X-CoReg's unbiased FFD stage started from them (:mod:`dcc.coreg.refine`): the
network's start, the iterative method's finish.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dcc.coreg.checks import check_device, check_overlap
from dcc.coreg.refine import check_iterations, refine_group
from dcc.data.io import InputError, read_image, read_labels, resample_group, slice_grid
from dcc.evaluation.outdir import OutputFolder
from dcc.evaluation.outputs import (
    peak_memory_mb,
    unique_names,
    write_group,
    write_report,
)
from dcc.lit.checkpoints import load_checkpoint
from dcc.lit.entry import exit_on_bad_input, remove_run_folder
from dcc.models import shipped_checkpoint
from dcc.nets.model import DCCModel
from dcc.spatial.fields import displacement_to_points, folding_count
from dcc.spatial.grid import Grid

__all__ = ["model_grid", "predict_group", "predict_stack", "run_prediction", "main"]

PROG = "evaluate.py mode=predict"
GRIDS = ("model", "image")
MIN_HEART_VOXELS = 20  # a slice counts as showing the heart with this many myocardium voxels


def model_grid(first: Grid, spacing: Sequence[float] | None) -> Grid:
    """The common grid: the field of view of ``first`` (its origin, direction and extent) at
    the model's ``spacing`` (mm, ``(x, y[, z])``); ``first`` itself without a spacing."""
    if spacing is None:
        return first
    if isinstance(spacing, int | float):  # one number for every axis (data.spacing of MyoPS)
        spacing = [float(spacing)] * first.ndim
    if len(spacing) != first.ndim:
        raise InputError(
            f"the checkpoint's spacing {list(spacing)} has {len(spacing)} axes, the images "
            f"{first.ndim}"
        )
    size = [max(2, int(round(e / s)) + 1) for e, s in zip(first.extent, spacing, strict=True)]
    return Grid(tuple(reversed(size)), tuple(spacing), first.origin, first.direction)


def _domains(model: DCCModel, sequences: Sequence[str] | None, paths: Sequence[str]) -> list[int]:
    """Domain index of every input: its named sequence, or the checkpoint's order."""
    known = model.sequences
    if sequences is None:
        if len(paths) > len(known):
            raise InputError(
                f"predict.inputs: {len(paths)} images but the checkpoint knows {len(known)} "
                f"sequences {known}; name the sequence of each image with predict.sequences=[...]"
            )
        return list(range(len(paths)))
    sequences = list(sequences)
    if len(sequences) != len(paths):
        raise InputError(
            f"predict.sequences: got {len(sequences)} names for {len(paths)} images (need one each)"
        )
    unknown = [s for s in sequences if s not in known]
    if unknown:
        raise InputError(
            f"predict.sequences: {unknown} not among the sequences the checkpoint was trained "
            f"for, {known}"
        )
    return [known.index(s) for s in sequences]


def _slice(path: str, volume: torch.Tensor, grid: Grid, index: int) -> tuple:
    """Short-axis slice ``index`` (along ITK's z) of a 3D volume, with its 2D grid."""
    if not 0 <= index < grid.shape[0]:
        raise InputError(
            f"predict.slice {index}: {path} has {grid.shape[0]} slices (0..{grid.shape[0] - 1})"
        )
    return volume[index], slice_grid(grid, 2, index)


def _read_group(model: DCCModel, paths, label_paths, grid_mode: str, index: int | None = None):
    """Originals on their own grids (slice ``index`` of 3D stacks for a 2D model), labels, the
    common grid, resampled images and masks."""
    if len(paths) < 2:
        raise InputError(f"predict.inputs: need a group of at least 2 images, got {len(paths)}")
    if label_paths is not None and len(label_paths) != len(paths):
        raise InputError(
            f"predict.labels: got {len(label_paths)} label maps for {len(paths)} images "
            "(need one each, or none)"
        )
    if grid_mode not in GRIDS:
        raise InputError(f"predict.grid {grid_mode}: use one of {', '.join(GRIDS)}")
    ndim = model.net.ndim
    originals = [read_image(p) for p in paths]
    stacks = [g for _, g in originals]  # the files' own grids (labels must lie on them)
    whole_stacks = index is None and ndim == 2 and all(g.ndim == 3 for g in stacks)
    if index is not None and ndim == 2:
        originals = [
            _slice(p, x, g, index) if g.ndim == 3 else (x, g)
            for p, (x, g) in zip(paths, originals, strict=True)
        ]
    for path, (_, grid) in zip(paths, originals, strict=True):
        if grid.ndim != ndim and not whole_stacks:
            hint = "; give every image as a 3D stack, or pick a slice" if grid.ndim == 3 else ""
            raise InputError(
                f"{path}: image is {grid.ndim}D but the checkpoint is a {ndim}D model (trained "
                f"on {ndim}D images){hint}"
            )
    labels = None
    if label_paths is not None:
        labels = [read_labels(lp, like=g) for lp, g in zip(label_paths, stacks, strict=True)]
        labels = [
            _slice(lp, lab, g, index)[0] if g.ndim == 3 and ndim == 2 and not whole_stacks
            else lab
            for lp, lab, g in zip(label_paths, labels, stacks, strict=True)
        ]
        for lp, lab in zip(label_paths, labels, strict=True):
            if lab.min() < 0 or lab.max() >= model.num_classes:
                raise InputError(
                    f"{lp}: label values {sorted(lab.unique().tolist())} outside the "
                    f"checkpoint's classes 0..{model.num_classes - 1} ({model.class_names})"
                )
    spacing = model.settings.get("spacing")
    first = originals[0][1]
    if whole_stacks and spacing is not None:  # the model's in-plane spacing, the stack's slices
        spacing = [*_in_plane(spacing), first.spacing[2]]
    common = model_grid(first, spacing if grid_mode == "model" else None)
    images, valid, labels_before = resample_group(originals, common, labels)
    return originals, labels, common, images, valid, labels_before


def _in_plane(spacing: float | Sequence[float]) -> list[float]:
    return [float(spacing)] * 2 if isinstance(spacing, int | float) else [float(s) for s in spacing]


def _predict_batch(
    model: DCCModel,
    x: torch.Tensor,
    domains: Sequence[int],
    refine_iterations: int,
    spacing: Sequence[float] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], list]:
    """The network on a batch of groups ``x`` ``(B, N, *S)`` as in the test step (no label is
    used: the labelled members' rho is their rho-hat, Eq. 53), each group's fields refined by
    ``refine_iterations`` X-CoReg FFD steps when asked: (displacements, rho-hat, (the
    common-space posteriors, X per group) of :meth:`DCCLoss.posterior`, one
    :class:`~dcc.coreg.refine.RefineResult` per group)."""
    d = torch.as_tensor(list(domains), device=x.device).expand(x.shape[0], -1)
    out = model(x, d)
    displacement, refined = out.displacement.float(), []
    for b in range(x.shape[0] if refine_iterations else 0):
        refined.append(refine_group(x[b], displacement[b], refine_iterations, spacing))
        displacement[b] = refined[-1].displacement.to(displacement)
    seg_probs = out.seg_logits.float().softmax(dim=2)
    posterior, x_metric = model.loss.posterior(x, displacement, seg_probs,
                                               model.labelled_domain[d])
    return displacement, seg_probs, (posterior, x_metric), refined


@torch.no_grad()
def predict_group(
    model: DCCModel,
    images: torch.Tensor,
    domains: Sequence[int],
    refine_iterations: int = 0,
    spacing: Sequence[float] | None = None,
) -> dict:
    """Displacements ``(N, ndim, *S)`` (voxel units), segmentation probabilities ``(N, K, *S)``
    (rho-hat) and the common-space posterior ``(K, *S)`` of one group ``(N, *S)``, as in the
    test step (:func:`_predict_batch`).

    With ``refine_iterations`` N > 0 the network's fields are refined by N X-CoReg FFD steps
    (:func:`dcc.coreg.refine.refine_group`; ``spacing`` the voxel size in mm, ``(x, y[, z])``)
    and the posterior is that of the refined fields; ``refine`` then reports whether the
    refinement was kept, X before/after and its seconds."""
    x = images[None].to(next(model.parameters()).device)
    displacement, seg_probs, (posterior, x_metric), refined = _predict_batch(
        model, x, domains, refine_iterations, spacing)
    refine = None
    if refined:
        result = refined[0]
        refine = {"iterations": refine_iterations, "accepted": result.accepted,
                  "x_before": result.x_before, "x_after": result.x_after,
                  "seconds": round(result.seconds, 4)}
    return {
        "displacement": displacement[0].cpu(),
        "seg_probs": seg_probs[0].cpu(),
        "posterior": posterior[0].float().cpu(),
        "x_metric": float(x_metric[0]),
        "refine": refine,
    }


@torch.no_grad()
def predict_stack(
    model: DCCModel,
    images: torch.Tensor,
    domains: Sequence[int],
    refine_iterations: int = 0,
    spacing: Sequence[float] | None = None,
) -> dict:
    """:func:`predict_group` for a group of 3D short-axis stacks ``(N, Z, H, W)`` with a 2D
    model: every slice is a 2D group, all slices in one batch. Returns 3D results on the stack's
    grid: displacements ``(N, 3, Z, H, W)`` (voxel units, a zero through-plane component),
    ``seg_probs`` ``(N, K, Z, H, W)``, ``posterior`` ``(K, Z, H, W)`` and per slice whether the
    network found a heart (at least :data:`MIN_HEART_VOXELS` myocardium voxels in the
    posterior's segmentation). Slices without a heart keep a zero field and a background
    posterior rather than the network's guess; ``slices`` names them."""
    n, depth = images.shape[:2]
    x = images.transpose(0, 1).to(next(model.parameters()).device)  # one group per slice
    displacement, seg_probs, (posterior, x_metric), refined = _predict_batch(
        model, x, domains, refine_iterations, spacing)
    posterior = posterior.float()  # (Z, K, H, W)
    myocardium = model.class_names.index("myocardium") if "myocardium" in model.class_names else 1
    heart = (posterior.argmax(1) == myocardium).flatten(1).sum(1) >= MIN_HEART_VOXELS
    displacement[~heart] = 0
    background = torch.zeros_like(posterior[0])
    background[0] = 1
    posterior[~heart] = background
    field = torch.zeros(n, 3, depth, *images.shape[2:])
    field[:, :2] = displacement.permute(1, 2, 0, 3, 4).cpu()
    slices = [
        {"index": z, "heart": bool(heart[z]),
         **({"refine_accepted": refined[z].accepted} if refined else {})}
        for z in range(depth)
    ]
    return {
        "displacement": field,
        "seg_probs": seg_probs.permute(1, 2, 0, 3, 4).cpu(),
        "posterior": posterior.transpose(0, 1).cpu(),
        "x_metric": float(x_metric[heart].mean()) if bool(heart.any()) else 0.0,
        "refine": {"iterations": refine_iterations,
                   "slices": sum(r.accepted for r in refined)} if refined else None,
        "slices": slices,
    }


def run_prediction(cfg: Mapping[str, Any], prog: str = PROG) -> dict:
    """Predict on ``cfg.predict`` with ``cfg.ckpt_path`` (``None``: the shipped cardiac model,
    :func:`dcc.models.shipped_checkpoint`); returns the report written to ``report.json``
    (``tool``: ``prog``). Every check (files, sequences, dimensionality, ``predict.out``)
    happens before the output folder is touched; results appear there only after success.
    A 2D model given 3D short-axis stacks without ``predict.slice`` registers and segments
    every slice (:func:`predict_stack`) and writes 3D results on the stacks' grid."""
    cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    p = cfg["predict"]
    paths = [str(x) for x in (p.get("inputs") or [])]
    label_paths = None if p.get("labels") is None else [str(x) for x in p["labels"]]
    if not p.get("out"):
        raise InputError("predict.out: give a new output folder (predict.out=DIR)")
    device = str(p.get("device") or "cpu")
    check_device(device)
    refine_iterations = check_iterations(p.get("refine_iterations", 0), "predict.refine_iterations")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    ckpt_path = OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False) or str(
        shipped_checkpoint()
    )
    model = load_checkpoint(ckpt_path, device)
    domains = _domains(model, p.get("sequences"), paths)
    try:
        output = OutputFolder(
            p["out"], [*paths, *(label_paths or [])], bool(p.get("overwrite")), prog
        )
    except InputError as error:  # dcc-register's option names -> this mode's config keys
        text = str(error).replace("--out ", "predict.out=")
        raise InputError(text.replace("--overwrite", "predict.overwrite=true")) from None
    originals, labels, common, images, valid, labels_before = _read_group(
        model, paths, label_paths, str(p.get("grid", "model")), p.get("slice")
    )
    overlap = check_overlap(valid, paths, 0, float(p.get("min_initial_overlap", 0.25)),
                            option="predict.min_initial_overlap")
    start = time.perf_counter()
    stacks = model.net.ndim == 2 and common.ndim == 3
    predict = predict_stack if stacks else predict_group
    spacing = common.spacing[:2] if stacks else common.spacing
    result = predict(model, images, domains, refine_iterations, spacing)
    seconds = time.perf_counter() - start
    names = unique_names(paths)
    points = displacement_to_points(result["displacement"], common)
    with output as tmp:
        dice = write_group(
            tmp,
            names,
            common,
            points,
            originals,
            result["posterior"],
            images,
            labels=labels,
            labels_before=labels_before,
        )
        folding = folding_count(result["displacement"][None])[0]
        report = {
            "tool": prog,
            "checkpoint": str(Path(ckpt_path).resolve()),
            "images": paths,
            "names": names,
            "labels": label_paths,
            "sequences": [model.sequences[j] for j in domains],
            "common_grid": common.to_dict(),
            "model": {
                "strategy": model.settings.get("strategy"),
                "sequences": model.sequences,
                "class_names": model.class_names,
                "spacing": model.settings.get("spacing"),
                "net": model.settings.get("net"),
            },
            "initial_overlap": overlap,
            "x_metric": result["x_metric"],
            "refine": result["refine"],
            "folding_voxels": folding.tolist(),
            "inference_s": round(seconds, 4),
            "device": device,
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            **dice,
        }
        if stacks:
            report["slices"] = result["slices"]
            empty = [s["index"] for s in result["slices"] if not s["heart"]]
            if empty:
                report["notes"] = [
                    f"slices {empty} (ITK z index): no heart found by the network "
                    f"(fewer than {MIN_HEART_VOXELS} myocardium voxels); left unregistered "
                    "(zero field) and labelled background"
                ]
        write_report(tmp, report)
        output.commit()
    return report


def main(cfg: Mapping[str, Any]) -> dict:
    """``evaluate.py mode=predict``: one clear line and exit status 2 on bad input."""
    try:
        with exit_on_bad_input(PROG):
            try:
                report = run_prediction(cfg)
            except ValueError as error:
                raise InputError(str(error)) from None
    except KeyboardInterrupt:  # while the output folder is open, it handles Ctrl-C itself
        remove_run_folder()
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        raise SystemExit(130) from None
    out = cfg["predict"]["out"]
    line = (
        f"{PROG}: {len(report['names'])} images ({', '.join(report['sequences'])}) registered "
        f"and segmented in {report['inference_s']:.2f} s; wrote {out}"
    )
    print(line)
    refine = report.get("refine")
    if refine:
        kept = "kept" if refine["accepted"] else "left out: X did not improve"
        print(
            f"{PROG}: refined by {refine['iterations']} X-CoReg FFD steps in "
            f"{refine['seconds']:.2f} s ({kept}; X {refine['x_before']:.4f} -> "
            f"{refine['x_after']:.4f})"
        )
    if "dice_after" in report:
        before, after = report["dice_before"]["mean"], report["dice_after"]["mean"]
        if not (math.isnan(before) or math.isnan(after)):
            print(f"{PROG}: mean Dice of the labels {before:.3f} -> {after:.3f}")
    return report
