"""Test-mode metrics tables and overlays (``python evaluate.py ckpt_path=...``, and the test at
the end of ``python train.py``).

:class:`MetricsTable` is a Lightning callback. For every test group it records the paper's
metrics (Sec. 4.4.1: Reg DSC per structure and mean, the unregistered Dice beside it, Seg DSC
per sequence of the posterior argmax, Eq. 53, and the folding voxels, Jacobian <= 0) and the
time the model takes per group (network and EM posterior); at the end it writes into
``<run folder>/metrics/``:

* ``test_groups.csv``: one row per group;
* ``test_summary.csv`` and ``test_summary.md``: mean, standard deviation and count of every
  column over the groups (NaN entries, e.g. a structure absent from a group, left out).

and PNG overlays of the first ``figures`` groups into ``<run folder>/figures/`` (montage with
the warped labels and the posterior, deformation grids: :meth:`DCCModule.save_figures`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from dcc.lit.module import DCCModule, StepResult, group_metrics
from dcc.metrics import nanmean, pairwise_surface_distances, surface_distances
from dcc.spatial.fields import warp

__all__ = ["MetricsTable", "group_rows", "summarise", "write_tables"]

Row = dict[str, Any]


def group_rows(
    module: DCCModule, batch: Mapping[str, Any], result: StepResult, seconds: float
) -> list[Row]:
    """One row per group of ``batch``: ``case``, ``reg_dsc`` and ``reg_dsc/<structure>``,
    ``unreg_dsc`` and ``unreg_dsc/<structure>``, ``seg_dsc/<sequence>`` and ``seg_dsc``, the
    challenge metrics in mm (``{reg,unreg}_{hd95,asd}[/<structure>]``: pairwise over the
    members' labels after / before registration; ``seg_{hd95,asd}[/<sequence>]``: the posterior
    argmax against each member's warped label, mean over the structures; NaN where a structure
    is missing from either map, :func:`dcc.metrics.surface_distances`),
    ``folding`` (voxels with Jacobian <= 0, summed over the group's images) and ``time_s``
    (``seconds`` shared equally by the groups). Dice values in [0, 1]; NaN where undefined."""
    labels, domains = batch["labels"], batch["domains"]
    displacement = result.net.displacement.detach().float()
    warped = warp(labels.unsqueeze(2).float(), displacement, mode="nearest")[:, :, 0].long()
    members = ~module.is_atlas(domains)
    cases = batch.get("case") or [str(i) for i in range(labels.shape[0])]
    rows = []
    for b in range(labels.shape[0]):
        m = group_metrics(
            labels[b],
            warped[b],
            result.loss.posterior[b].detach(),
            displacement[b],
            members[b],
            module.num_classes,
        )
        row: Row = {"case": str(cases[b])}
        for key, name in (("reg", "reg_dsc"), ("unreg", "unreg_dsc")):
            row[name] = m[key]["mean"]
            for k in range(1, module.num_classes):
                row[f"{name}/{module.class_names[k]}"] = m[key]["per_label"].get(k, math.nan)
        names = [module.sequences[int(d)] for d in domains[b][members[b]]]
        for name, value in zip(names, m["seg"], strict=True):
            row[f"seg_dsc/{name}"] = value
        finite = [v for v in m["seg"] if not math.isnan(v)]
        row["seg_dsc"] = sum(finite) / len(finite) if finite else math.nan
        spacing = batch["spacing"][b].tolist() if "spacing" in batch else [1.0] * (
            labels.dim() - 2)
        structures = list(range(1, module.num_classes))
        for key, maps in (("reg", warped[b][members[b]]), ("unreg", labels[b][members[b]])):
            distances = pairwise_surface_distances(maps, structures, spacing)
            for metric in ("hd95", "asd"):
                row[f"{key}_{metric}"] = distances[metric]["mean"]
                for k in structures:
                    row[f"{key}_{metric}/{module.class_names[k]}"] = \
                        distances[metric]["per_label"][k]
        segmentation = result.loss.posterior[b].detach().argmax(0)
        seg = [surface_distances(segmentation, warped[b][j], structures, spacing)
               for j in members[b].nonzero().flatten().tolist()]
        for metric in ("hd95", "asd"):
            per_member = [nanmean([d[k][metric] for k in structures]) for d in seg]
            for name, value in zip(names, per_member, strict=True):
                row[f"seg_{metric}/{name}"] = value
            row[f"seg_{metric}"] = nanmean(per_member)
        row["folding"] = float(sum(m["folding"]))
        row["time_s"] = seconds / labels.shape[0]
        rows.append(row)
    return rows


def summarise(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """``[{"metric", "mean", "std", "n"}]`` over the groups for every numeric column (NaN left
    out; std is the sample standard deviation, 0 for one value)."""
    columns = [k for k in rows[0] if k != "case"] if rows else []
    for row in rows:  # columns present in some groups only (e.g. sequences)
        columns += [k for k in row if k != "case" and k not in columns]
    out = []
    for column in columns:
        values = [float(r[column]) for r in rows if column in r and not math.isnan(r[column])]
        n = len(values)
        mean = sum(values) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        out.append({"metric": column, "mean": mean, "std": std if n else math.nan, "n": n})
    return out


def _label(metric: str) -> str:
    names = {"reg_dsc": "Reg DSC", "unreg_dsc": "Unregistered Dice", "seg_dsc": "Seg DSC",
             "reg_hd95": "Reg HD95", "unreg_hd95": "Unregistered HD95", "seg_hd95": "Seg HD95",
             "reg_asd": "Reg ASD", "unreg_asd": "Unregistered ASD", "seg_asd": "Seg ASD"}
    if metric == "folding":
        return "folding voxels per group"
    if metric == "time_s":
        return "time per group (s)"
    head, _, tail = metric.partition("/")
    unit = "%" if head.endswith("dsc") else "mm"
    return f"{names.get(head, head)} {tail or 'mean'} ({unit})"


def write_tables(folder: str | os.PathLike, rows: Sequence[Row], stage: str = "test") -> dict:
    """Write ``<stage>_groups.csv``, ``<stage>_summary.csv`` and ``<stage>_summary.md`` into
    ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {
        "groups": os.path.join(folder, f"{stage}_groups.csv"),
        "summary_csv": os.path.join(folder, f"{stage}_summary.csv"),
        "summary_md": os.path.join(folder, f"{stage}_summary.md"),
    }
    summary = summarise(rows)
    columns = ["case"] + [s["metric"] for s in summary]
    with open(paths["groups"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["summary_csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["metric", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(summary)
    lines = [
        f"| {stage} metric | mean | std | groups |",
        "|---|---:|---:|---:|",
    ]
    for s in summary:
        scale = 100.0 if "dsc" in s["metric"] else 1.0
        digits = 3 if s["metric"] == "time_s" else 1
        lines.append(
            f"| {_label(s['metric'])} | {scale * s['mean']:.{digits}f} | "
            f"{scale * s['std']:.{digits}f} | {s['n']} |"
        )
    with open(paths["summary_md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return paths


class MetricsTable(pl.Callback):
    """Per-group test metrics as CSV/Markdown tables and PNG overlays (module docstring).

    Args:
        dirname: sub-folder of the run folder for the tables.
        figures: overlays of the first this many test groups (0: none).
    """

    def __init__(self, dirname: str = "metrics", figures: int = 4):
        super().__init__()
        if figures < 0:
            raise ValueError(f"MetricsTable: figures must be >= 0, got {figures}")
        self.dirname, self.figures = dirname, figures
        self.rows: list[Row] = []
        self.paths: dict[str, str] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    @torch.no_grad()
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: DCCModule,
        outputs: Any,
        batch: Mapping[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        result, seconds = outputs["result"], outputs["seconds"]  # DCCModule.test_step
        first = len(self.rows)
        self.rows += group_rows(pl_module, batch, result, seconds)
        for b in range(max(0, min(self.figures - first, batch["images"].shape[0]))):
            pl_module.save_figures(batch, result, f"test_{first + b:03d}", index=b)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            folder = os.path.join(trainer.default_root_dir, self.dirname)
            self.paths = write_tables(folder, self.rows, "test")
