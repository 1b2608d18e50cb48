"""Training run folders as the benches and comparisons read them (``train.py`` writes them):
the checkpoint a run tested, its per-group test table (:class:`dcc.lit.metrics_table.MetricsTable`),
its training budget, and the paired statistics that compare two runs on the same test groups.
Used by ``bench/mscmr_table5.py`` (with :mod:`dcc.evaluation.tables`), ``bench/mscmr_compare.py``
and ``bench/bench_mscmr_refine.py``.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

__all__ = [
    "Run", "best_checkpoint", "resolve_run", "read_groups", "unregistered_rows",
    "inconsistent_groups", "values", "mean_std", "patient", "paired_ttest", "paired_groups",
    "budget", "cpu_name", "hardware", "load_yaml", "read_curve", "run_overrides",
]


@dataclass
class Run:
    """One strategy's run: its folder, the checkpoint tested and the per-group test rows."""

    strategy: str
    source: Path
    folder: Path
    checkpoint: Path | None
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> column -> value
    table: Path | None = None
    evaluated_here: bool = False
    latency_s: float | None = None


def best_checkpoint(folder: Path) -> Path | None:
    """The best checkpoint of a run folder: the one ``last.ckpt``'s monitored ModelCheckpoint
    names, else the newest ``*.ckpt`` other than ``last.ckpt``, else ``last.ckpt``."""
    folder = folder / "checkpoints"
    if not folder.is_dir():
        return None
    last = folder / "last.ckpt"
    others = sorted(
        (p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=os.path.getmtime
    )
    if last.is_file():
        callbacks = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
        for key, state in callbacks.items():
            if key.startswith("ModelCheckpoint") and state.get("monitor"):
                named = Path(str(state.get("best_model_path") or ""))
                named = folder / named.name if named.name else named
                if named.name and named.is_file():
                    return named
    if others:
        return others[-1]
    return last if last.is_file() else None


def resolve_run(strategy: str, source: Path) -> Run | None:
    """The run of ``source``: a checkpoint file (its run folder is the one holding its
    ``checkpoints/``, else its own folder), or a run folder (its :func:`best_checkpoint` and, when
    tested, ``metrics/test_groups.csv``). None when absent, or a folder with neither."""
    if source.is_file():
        parent = source.parent
        folder = parent.parent if parent.name == "checkpoints" else parent
        return Run(strategy, source, folder, source)
    if source.is_dir():
        table = source / "metrics" / "test_groups.csv"
        run = Run(strategy, source, source, best_checkpoint(source))
        run.table = table if table.is_file() else None
        if run.table is None and run.checkpoint is None:
            return None
        return run
    return None


def read_groups(path: Path) -> dict[str, dict[str, float]]:
    """``test_groups.csv`` of :class:`dcc.lit.metrics_table.MetricsTable`: case -> column -> value
    (empty cells are NaN)."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            case = row.pop("case")
            rows[case] = {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
    if not rows:
        raise ValueError(f"{path}: no test groups")
    for column in ("reg_dsc", "unreg_dsc"):
        if column not in next(iter(rows.values())):
            raise ValueError(f"{path}: no column {column!r} (not a MetricsTable test_groups.csv)")
    return rows


def unregistered_rows(runs: Mapping[str, Run]) -> dict[str, dict[str, float]]:
    """The unregistered Dice columns (``unreg_dsc*``) of every test group any run tested (case ->
    column; the first run that tested a group gives its values)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs.values():
        for case, row in run.rows.items():
            out.setdefault(case, {k: v for k, v in row.items() if k.startswith("unreg_dsc")})
    return out


def inconsistent_groups(runs: Mapping[str, Run], tol: float = 1e-4) -> list[str]:
    """Test groups whose unregistered Dice differs between runs by more than ``tol``: the runs
    were tested on different data (image size, spacing, misalignment), so their Reg DSC do not
    compare."""
    first: dict[str, float] = {}
    bad = []
    for run in runs.values():
        for case, row in run.rows.items():
            value = first.setdefault(case, row["unreg_dsc"])
            if abs(value - row["unreg_dsc"]) > tol and case not in bad:
                bad.append(case)
    return bad


# ---------------------------------------------------------------------------- statistics
def values(rows: Mapping[str, Mapping[str, float]], column: str) -> list[float]:
    return [r[column] for r in rows.values() if column in r and not math.isnan(r[column])]


def mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; NaNs for none."""
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def patient(case: str) -> str:
    """``Case3005-z2-s0-k1.2.3`` -> ``Case3005``."""
    return case.split("-")[0]


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``scipy.stats.ttest_rel(b, a)``: (t, p) of b against a over paired values; NaNs for
    fewer than two pairs or identical samples."""
    if len(a) < 2 or np.allclose(a, b):
        return math.nan, math.nan
    result = stats.ttest_rel(b, a)
    return float(result.statistic), float(result.pvalue)


def paired_groups(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
    """``b`` against ``a`` (case -> value) on the groups both hold, NaNs left out: their number,
    the mean difference ``b - a`` in points (x 100), :func:`paired_ttest` over the groups, and the
    same test on the per-patient means (a slice's misalignments and a patient's slices are not
    independent: the per-patient test is the conservative one)."""
    common = [c for c in a if c in b and not (math.isnan(a[c]) or math.isnan(b[c]))]
    diff = [b[c] - a[c] for c in common]
    out: dict[str, Any] = {"groups": len(common)}
    out["diff_mean"] = 100 * statistics.fmean(diff) if diff else math.nan
    out["t"], out["p"] = paired_ttest([a[c] for c in common], [b[c] for c in common])
    patients = sorted({patient(c) for c in common})
    pa = [statistics.fmean(a[c] for c in common if patient(c) == p) for p in patients]
    pb = [statistics.fmean(b[c] for c in common if patient(c) == p) for p in patients]
    out["patients"] = len(patients)
    out["t_patients"], out["p_patients"] = paired_ttest(pa, pb)
    return out


# ---------------------------------------------------------------------------- budgets
def load_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def budget(run: Run) -> dict[str, Any]:
    """Training budget of a run: config (trainer limits, threads, sizes), steps, epochs and
    training time from its last checkpoint (Lightning's Timer) or logs, the accelerator, and the
    command (Hydra's overrides)."""
    config = load_yaml(run.folder / ".hydra" / "config.yaml") or {}
    overrides = load_yaml(run.folder / ".hydra" / "overrides.yaml") or []
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    net = ((config.get("model") or {}).get("net")) or {}
    info: dict[str, Any] = {
        "max_time": trainer.get("max_time"),
        "max_epochs": trainer.get("max_epochs"),
        "max_steps": trainer.get("max_steps"),
        "accelerator": trainer.get("accelerator"),
        "precision": trainer.get("precision"),
        "threads": config.get("threads"),
        "image_size": data.get("image_size"),
        "batch_size": data.get("batch_size"),
        "channels": net.get("channels"),
        "levels": net.get("levels"),
        "command": "python train.py " + " ".join(overrides) if overrides else None,
    }
    last = run.folder / "checkpoints" / "last.ckpt"
    ckpt = last if last.is_file() else run.checkpoint
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        info["steps"], info["epochs"] = state.get("global_step"), state.get("epoch")
        timer = (state.get("callbacks") or {}).get("Timer", {}).get("time_elapsed", {})
        if timer.get("train"):
            info["fit_minutes"] = timer["train"] / 60.0  # what trainer.max_time counts
    logged = _logged_minutes(run.folder)
    if logged is not None:  # training alone, validation excluded, at the last validation
        info["train_minutes"], step = logged
        if step:
            info["seconds_per_step"] = 60.0 * info["train_minutes"] / step
    elif info.get("fit_minutes") and info.get("steps"):
        info["seconds_per_step"] = 60.0 * info["fit_minutes"] / info["steps"]
    log = next(iter(sorted(run.folder.glob("*.log"))), None)
    if log is not None:
        match = re.search(r"GPU available: (\w+), used: (\w+)", log.read_text(errors="replace"))
        if match:
            info["gpu_used"] = match.group(2)
    return info


def _logged_minutes(folder: Path) -> tuple[float, int | None] | None:
    """The last ``val/train_minutes`` (dcc.lit.callbacks.TrainingTime) in the CSV logs and the
    training step it was logged at."""
    found = None
    for path in sorted(folder.glob("csv/version_*/metrics.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                value = row.get("val/train_minutes")
                if value:
                    step = row.get("step")
                    found = float(value), int(float(step)) if step else None
    return found


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else :func:`platform.processor` or the machine)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return cpu


def hardware() -> str:
    """CPU, logical CPUs, GPU and torch version, for the tables' "Gathered on" lines."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {gpu}; torch {torch.__version__}"


# ---------------------------------------------------------------------------- curves
def read_curve(run: Path) -> dict[str, list[float]]:
    """``{"minutes", "reg", "seg", "unreg", "step"}`` of the validation rows of a run's CSV log
    (versions concatenated in order: a resumed run continues its curve)."""
    curve: dict[str, list[float]] = {k: [] for k in ("minutes", "reg", "seg", "unreg", "step")}
    offset = 0.0
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        last = 0.0
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if not row.get("val/train_minutes"):
                    continue
                last = float(row["val/train_minutes"])
                curve["minutes"].append(offset + last)
                curve["step"].append(float(row["step"]))
                for key, name in (("reg", "val/reg_dsc"), ("seg", "val/seg_dsc"),
                                  ("unreg", "val/unreg_dsc")):
                    value = row.get(name)
                    curve[key].append(float(value) if value else math.nan)
        offset += last
    return curve


def run_overrides(run: Path) -> str:
    """The overrides the run was started with (``.hydra/overrides.yaml``)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return "?"
    overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    skip = ("hydra.", "threads", "tags", "test=", "trainer.max_epochs", "data.cache_dir")
    return " ".join(o for o in overrides if not o.startswith(skip))
