"""The paper's Table 5 on MyoPS 2020: the four DCC strategies on the same test groups.

One command gathers the test metrics of the runs ``mscmr_dgr``, ``mscmr_dcc_at``,
``mscmr_dcc_bs`` and ``mscmr_dcc_all`` (``python train.py experiment=mscmr_<strategy>``) into

* ``<out>.md``: Reg DSC (mean +- std over the test groups, per structure too) beside the
  unregistered value ("None"), Seg DSC per sequence (LGE, C0, T2) for the labelled strategies,
  paired t-tests of the per-group Reg DSC between consecutive strategies, the paper's numbers
  beside ours, the time per group, the X-CoReg rows of ``results/mscmr_refine.csv`` when that
  file exists, and the training budget and hardware of every run with the commands that
  regenerate it;
* ``<out>.csv``: one row per method (None, the strategies, X-CoReg), and ``<out>_ttests.csv``;
* ``<out>_median.png``: the test group whose DCC+All Reg DSC is the median (like the paper's
  Fig. 10): the three sequences before and after registration by every strategy, with the
  warped label contours, and the posterior segmentation (Eq. 53).

Each strategy is a run folder (its best checkpoint in ``checkpoints/`` and, after its test,
``metrics/test_groups.csv`` of :class:`dcc.lit.metrics_table.MetricsTable`) or a checkpoint file.
A run without a test table (or a checkpoint, or ``--reevaluate``) is tested here with
:func:`dcc.lit.train.run_evaluation` on data made like its checkpoint's (into
``<run>/table5_eval/``, or ``--eval-dir``). Missing strategies are reported as missing.

    python bench/mscmr_table5.py                        # /work/runs/mscmr_<strategy>
    python bench/mscmr_table5.py --runs outputs/runs --out results/mscmr_table5
    python bench/mscmr_table5.py --run dcc_all=path/to/best.ckpt --run dgr=path/to/run_folder
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcc.evaluation.runs import (
    Run,
    best_checkpoint,
    budget,
    hardware,
    load_yaml,
    mean_std,
    paired_ttest,
    patient,
    read_groups,
    values,
)
from dcc.lit.train import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("dgr", "dcc_at", "dcc_bs", "dcc_all")
NAMES = {
    "none": "None",
    "dgr": "DGR",
    "dcc_at": "DCC+AT",
    "dcc_bs": "DCC+BS",
    "dcc_all": "DCC+All",
    "xcoreg": "X-CoReg",
}
SEQUENCES = ("LGE", "C0", "T2")  # the paper's column order (C0 = bSSFP)
STRUCTURES = ("myocardium", "LV", "RV")
LABELLED = ("dcc_at", "dcc_bs", "dcc_all")  # strategies with a Seg DSC (the paper's rows)
# the paper's Table 5 (45 MS-CMR patients, 100 epochs on a GPU): (mean, std) in %
PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "none": {"reg_dsc": (72.2, 10.1)},
    "dgr": {"reg_dsc": (86.2, 4.1)},
    "dcc_at": {
        "reg_dsc": (88.5, 3.4),
        "seg_dsc/LGE": (82.0, 3.8),
        "seg_dsc/C0": (81.2, 4.5),
        "seg_dsc/T2": (83.4, 4.1),
    },
    "dcc_bs": {
        "reg_dsc": (87.6, 4.0),
        "seg_dsc/LGE": (85.8, 3.9),
        "seg_dsc/C0": (89.9, 2.8),
        "seg_dsc/T2": (86.5, 4.2),
    },
    "dcc_all": {
        "reg_dsc": (89.5, 3.5),
        "seg_dsc/LGE": (92.6, 2.0),
        "seg_dsc/C0": (92.4, 3.1),
        "seg_dsc/T2": (92.7, 3.4),
    },
}
PAIRS = (("none", "dgr"), ("dgr", "dcc_bs"), ("dcc_bs", "dcc_all"), ("dcc_at", "dcc_all"))
METRICS = (
    "reg_dsc",
    *(f"reg_dsc/{s}" for s in STRUCTURES),
    *(f"seg_dsc/{s}" for s in SEQUENCES),
    "seg_dsc",
    "folding",
    "time_s",
)


# ---------------------------------------------------------------------------- runs
def data_settings(checkpoint: Path, data: Sequence[str] = ()) -> dict[str, Any]:
    """The data-module settings a checkpoint was trained with, places left out and ``data``
    (``key=value``) applied (:func:`dcc.lit.checkpoints.data_settings`); the test groups of
    the Table are made from these."""
    from dcc.lit.checkpoints import data_settings as checkpoint_data_settings

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    settings = checkpoint_data_settings(saved, overrides=data)
    if not settings:
        raise ValueError(f"{checkpoint}: no data-module settings saved; cannot rebuild its data")
    return settings


def evaluate_command(checkpoint: Path, data: Sequence[str] = ()) -> str:
    """``python evaluate.py data=myops ckpt_path=...`` with the checkpoint's test-data settings
    that differ from conf/data/myops.yaml (evaluate.py keeps the data group's defaults once
    ``data=myops`` is given; training-only settings left out) and the ``data`` overrides of this
    script."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get(
        "datamodule_hyper_parameters", {}
    )
    defaults = load_yaml(ROOT / "conf" / "data" / "myops.yaml") or {}
    skip = ("root", "with_atlas", "cache_dir", "num_workers", "val_groups_per_slice",
            "augmentation")
    given = [item.partition("=")[0] for item in data]
    extra = [
        f"data.{k}={json.dumps(v).replace(' ', '')}"
        for k, v in saved.items()
        if k in defaults
        and k not in (*skip, *given)
        and defaults[k] != v
        and not _default_split(k, v)
    ]
    extra += [f"data.{item}" for item in data]
    return " ".join(["python evaluate.py data=myops", f"ckpt_path={checkpoint}", *extra])


def _default_split(key: str, value: Any) -> bool:
    return key == "split_file" and Path(str(value)).resolve() == ROOT / "data/splits/myops.json"


def resolve(strategy: str, source: Path) -> Run | None:
    """The run of ``source`` (a run folder or a checkpoint file); None when absent."""
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


def load_runs(
    sources: Mapping[str, Path],
    reevaluate: bool,
    threads: int | None,
    data: Sequence[str],
    eval_dir: Path | None = None,
) -> tuple[dict[str, Run], dict[str, str]]:
    """Runs with their test rows, and why each missing strategy is missing. Tests run here
    write into ``<eval_dir>/<strategy>`` (default ``<run folder>/table5_eval``)."""
    runs, missing = {}, {}
    for strategy in STRATEGIES:
        source = sources.get(strategy)
        run = resolve(strategy, source) if source is not None else None
        if run is None:
            missing[strategy] = f"no run folder or checkpoint at {source}"
            continue
        if run.table is None or reevaluate or run.source.is_file():
            if run.checkpoint is None:
                missing[strategy] = f"{run.folder}: no checkpoint to test"
                continue
            out = eval_dir / strategy if eval_dir is not None else run.folder / "table5_eval"
            earlier = out / "metrics" / "test_groups.csv"
            fresh = earlier.is_file() and earlier.stat().st_mtime > run.checkpoint.stat().st_mtime
            if fresh and not reevaluate and not data:
                print(
                    f"[table5] {strategy}: earlier test of this script, {earlier}", file=sys.stderr
                )
                run.table = earlier
            else:
                print(f"[table5] testing {strategy}: {run.checkpoint} -> {out}", file=sys.stderr)
                table = evaluate_checkpoint(run.checkpoint, out, ROOT / "conf", threads, data)
                run.table = Path(table)
            run.evaluated_here = True
        run.rows = read_groups(run.table)
        runs[strategy] = run
    return runs, missing


# ---------------------------------------------------------------------------- statistics
def unregistered_rows(runs: Mapping[str, Run]) -> dict[str, dict[str, float]]:
    """The unregistered Dice columns of every test group any run tested (case -> column)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs.values():
        for case, row in run.rows.items():
            out.setdefault(case, {k: v for k, v in row.items() if k.startswith("unreg_dsc")})
    return out


def inconsistent_groups(runs: Mapping[str, Run], tol: float = 1e-4) -> list[str]:
    """Test groups whose unregistered Dice differs between runs: the runs were tested on
    different data (image size, spacing, misalignment), so their Reg DSC do not compare."""
    first: dict[str, float] = {}
    bad = []
    for run in runs.values():
        for case, row in run.rows.items():
            value = first.setdefault(case, row["unreg_dsc"])
            if abs(value - row["unreg_dsc"]) > tol and case not in bad:
                bad.append(case)
    return bad


def summary_rows(runs: Mapping[str, Run], xcoreg: Mapping[str, Any] | None) -> list[dict]:
    """One row per method: None (the unregistered groups), each strategy, X-CoReg; Dice in %."""
    out = []
    unregistered = unregistered_rows(runs)
    if unregistered:
        none = {"method": "None", "strategy": "none", "groups": len(unregistered)}
        for metric in ("reg_dsc", *(f"reg_dsc/{s}" for s in STRUCTURES)):
            m, s, _ = mean_std(values(unregistered, "un" + metric))
            none[f"{metric}_mean"], none[f"{metric}_std"] = 100 * m, 100 * s
        out.append(none)
    for strategy in STRATEGIES:
        row: dict[str, Any] = {"method": NAMES[strategy], "strategy": strategy}
        run = runs.get(strategy)
        if run is None:
            row["missing"] = True
            out.append(row)
            continue
        row["groups"] = len(run.rows)
        for metric in METRICS:
            if metric.startswith("seg_dsc") and strategy not in LABELLED:
                continue
            m, s, _ = mean_std(values(run.rows, metric))
            scale = 100 if "dsc" in metric else 1
            row[f"{metric}_mean"], row[f"{metric}_std"] = scale * m, scale * s
        row["latency_s"] = run.latency_s
        out.append(row)
    if xcoreg is not None:
        out.append(
            {
                "method": NAMES["xcoreg"],
                "strategy": "xcoreg",
                "groups": xcoreg.get("groups"),
                "reg_dsc_mean": xcoreg.get("reg_dsc_mean"),
                "reg_dsc_std": xcoreg.get("reg_dsc_std"),
                "time_s_mean": xcoreg.get("time_s"),
            }
        )
    for row in out:
        for metric, (m, s) in PAPER.get(row["strategy"], {}).items():
            row[f"paper_{metric}_mean"], row[f"paper_{metric}_std"] = m, s
    return out


def per_group(
    runs: Mapping[str, Run], method: str, extra: Mapping[str, Mapping[str, float]] | None = None
) -> dict[str, float]:
    """Per-group Reg DSC of a method (``none``: the unregistered Dice of every tested group;
    methods of ``extra``: their ``{case: Reg DSC}``)."""
    if extra and method in extra:
        return dict(extra[method])
    if method == "none":
        return {c: r["unreg_dsc"] for c, r in unregistered_rows(runs).items()}
    return {c: r["reg_dsc"] for c, r in runs[method].rows.items()}


def paired_tests(
    runs: Mapping[str, Run],
    pairs: Sequence[tuple[str, str]] = PAIRS,
    extra: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict]:
    """``scipy.stats.ttest_rel`` on the per-group Reg DSC of the groups both methods tested,
    and (groups of one slice and one patient are not independent: 20 FFD combinations per
    slice) the same test on the per-patient means."""
    out = []
    for a, b in pairs:
        row: dict[str, Any] = {"a": NAMES[a], "b": NAMES[b]}
        known = {"none", *runs, *(extra or {})}
        if not runs or any(m not in known for m in (a, b)):
            row["missing"] = True
            out.append(row)
            continue
        xa, xb = per_group(runs, a, extra), per_group(runs, b, extra)
        common = [c for c in xa if c in xb and not (math.isnan(xa[c]) or math.isnan(xb[c]))]
        row["groups"] = len(common)
        diff = [xb[c] - xa[c] for c in common]
        row["diff_mean"] = 100 * statistics.fmean(diff) if diff else math.nan
        row["t"], row["p"] = paired_ttest([xa[c] for c in common], [xb[c] for c in common])
        patients = sorted({patient(c) for c in common})
        pa = [statistics.fmean(xa[c] for c in common if patient(c) == p) for p in patients]
        pb = [statistics.fmean(xb[c] for c in common if patient(c) == p) for p in patients]
        row["patients"] = len(patients)
        row["t_patients"], row["p_patients"] = paired_ttest(pa, pb)
        out.append(row)
    return out


# ---------------------------------------------------------------------------- X-CoReg rows
REFINE_DSC = ("reg_dsc_mean", "reg_dsc", "mean_reg_dsc", "dice_after")
REFINE_STD = ("reg_dsc_std", "std_reg_dsc", "reg_dsc_sd")
REFINE_TIME = ("time_s_mean", "time_per_group_s", "time_s", "seconds_per_group", "seconds")


def _number(row: Mapping[str, str], *names: str) -> float | None:
    for name in names:
        text = row.get(name)
        if text not in (None, ""):
            try:
                return float(text)
            except ValueError:
                continue
    return None


def read_refine(path: Path) -> list[dict[str, Any]]:
    """Rows of ``results/mscmr_refine.csv`` (bench/bench_mscmr_refine.py: network, network +
    N refinement steps, X-CoReg alone): ``{"method", "reg_dsc_mean", "reg_dsc_std", "time_s",
    "groups"}`` with Dice in %. A per-group file (a ``case`` or ``group`` column) is averaged
    per method and number of refinement steps."""
    with open(path, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    if not raw:
        return []
    key = next((k for k in ("method", "name", "setting", "variant") if k in raw[0]), None)
    if key is None:
        raise ValueError(f"{path}: no method column (method/name/setting/variant)")
    steps = next((k for k in ("refine_iterations", "iterations", "steps") if k in raw[0]), None)
    per_group = any(k in raw[0] for k in ("case", "group"))
    methods: dict[str, list[Mapping[str, str]]] = {}
    for i, row in enumerate(raw):
        label = row[key] + (f" ({row[steps]} steps)" if steps and row.get(steps) else "")
        methods.setdefault(label if per_group else f"{i:06d}{label}", []).append(row)
    out = []
    for label, rows in methods.items():
        regs = [x for x in (_number(r, *REFINE_DSC) for r in rows) if x is not None]
        times = [x for x in (_number(r, *REFINE_TIME) for r in rows) if x is not None]
        if not regs:
            continue
        cases = {}
        if per_group:
            m, s, n = mean_std(regs)
            column = "case" if "case" in rows[0] else "group"
            cases = {r[column]: _number(r, *REFINE_DSC) for r in rows}
            cases = {c: v / 100 if v > 1.5 else v for c, v in cases.items() if v is not None}
        else:
            m, s = regs[0], _number(rows[0], *REFINE_STD)
            n = int(_number(rows[0], "groups", "n") or 0)
            label = label[6:]
        scale = 100.0 if m <= 1.5 else 1.0
        out.append(
            {
                "method": label,
                "reg_dsc_mean": scale * m,
                "reg_dsc_std": None if s is None else scale * s,
                "time_s": statistics.fmean(times) if times else None,
                "groups": n or None,
                "cases": cases,
            }
        )
    return out


def xcoreg_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The X-CoReg-alone row among the refinement rows."""
    for row in rows:
        name = str(row["method"]).lower().replace("-", "").replace("_", "").replace(" ", "")
        if "xcoreg" in name and "net" not in name and "refine" not in name:
            return row
    return None


# ---------------------------------------------------------------------------- budget
# ---------------------------------------------------------------------------- median group
def median_case(runs: Mapping[str, Run]) -> tuple[str, str] | None:
    """``(strategy, case)``: the test group whose Reg DSC is the (lower) median, by DCC+All (else
    the most supervised strategy present)."""
    for strategy in reversed(STRATEGIES):
        if strategy in runs:
            rows = runs[strategy].rows
            ranked = sorted(
                (r["reg_dsc"], c) for c, r in rows.items() if not math.isnan(r["reg_dsc"])
            )
            if ranked:
                return strategy, ranked[(len(ranked) - 1) // 2][1]
    return None


def _test_group(checkpoint: Path, model, case: str, cache: dict, data: Sequence[str]) -> dict:
    """The test group named ``case`` from data made like the checkpoint's (a batch of one)."""
    from torch.utils.data import default_collate

    from dcc.lit.datamodules import MyoPSDataModule

    saved = {**data_settings(checkpoint, data), "with_atlas": model.atlas}
    key = repr(sorted(saved.items()))
    if key not in cache:
        data = MyoPSDataModule(**saved)
        data.setup("test")
        cache[key] = data.datasets["test"]
    dataset = cache[key]
    name, z = patient(case), int(case.split("-")[1].lstrip("z"))
    which = [i for i, s in enumerate(dataset.slices) if s.case == name and s.slice_index == z]
    per_slice = len(dataset.combinations)
    for i in which:
        for index in range(i * per_slice, (i + 1) * per_slice):
            item = dataset[index]
            if item["case"] == case:
                return default_collate([item])
    raise ValueError(f"{checkpoint}: test group {case} not in the data made like its training data")


@torch.no_grad()
def median_figure(
    runs: Mapping[str, Run],
    path: Path,
    repeats: int,
    threads: int | None,
    data: Sequence[str] = (),
) -> dict[str, Any] | None:
    """The median group registered by every strategy (PNG like the paper's Fig. 10), and each
    model's time for one group (median of ``repeats`` forward passes + EM, batch of one)."""
    from dcc.evaluation.figures import _draw_label_contours, _label_colours, _normalise, _save
    from dcc.lit.checkpoints import load_checkpoint
    from dcc.spatial.fields import warp

    chosen = median_case(runs)
    if chosen is None:
        return None
    _, case = chosen
    if threads:
        torch.set_num_threads(threads)
    columns, cache = [], {}
    for strategy in STRATEGIES:
        run = runs.get(strategy)
        if run is None or run.checkpoint is None or case not in run.rows:
            continue
        model = load_checkpoint(str(run.checkpoint), lightning=True)
        batch = _test_group(run.checkpoint, model, case, cache, data)
        result = model.step(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.step(batch)
            times.append(time.perf_counter() - start)
        run.latency_s = statistics.median(times) if times else None
        disp = result.net.displacement.float()
        warped = warp(batch["labels"].unsqueeze(2).float(), disp, mode="nearest")[0, :, 0].long()
        members = ~model.is_atlas(batch["domains"][0])
        if not columns:  # the unregistered group
            columns.append(
                {
                    "title": f"None\nReg DSC {100 * run.rows[case]['unreg_dsc']:.1f}",
                    "images": batch["images"][0][members],
                    "contour": batch["labels"][0][0],
                    "seg": batch["labels"][0][0],
                    "seg_title": "C0 label",
                    "sequences": model.sequences,
                }
            )
        posterior = result.loss.posterior[0].argmax(0)
        title = f"{NAMES[strategy]}\nReg DSC {100 * run.rows[case]['reg_dsc']:.1f}"
        if strategy in LABELLED:
            title += f", Seg {100 * run.rows[case].get('seg_dsc', math.nan):.1f}"
        columns.append(
            {
                "title": title,
                "images": result.loss.warped_images[0][members],
                "contour": posterior if strategy in LABELLED else warped[0],
                "seg": posterior,
                "seg_title": "posterior (Eq. 53)",
                "sequences": model.sequences,
            }
        )
    if not columns:
        return None
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    order = [s for s in SEQUENCES if s in columns[0]["sequences"]]
    colours = _label_colours(len(STRUCTURES))
    cmap = ListedColormap(["black", *colours])
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * (len(order) + 1) + 0.6))
    axes = fig.subplots(len(order) + 1, len(columns), squeeze=False)
    for c, col in enumerate(columns):
        for r, sequence in enumerate(order):
            ax = axes[r, c]
            image = col["images"][col["sequences"].index(sequence)].float().numpy()
            ax.imshow(_normalise(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _draw_label_contours(ax, col["contour"].numpy(), [1, 2, 3], colours)
            ax.set_title(col["title"] if r == 0 else "", fontsize=8)
            ax.set_ylabel(sequence if c == 0 else "", fontsize=8)
        ax = axes[len(order), c]
        ax.imshow(col["seg"].numpy(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_xlabel(col["seg_title"], fontsize=7)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    title = (
        f"median test group {case} (by {NAMES[chosen[0]]} Reg DSC). Contours: warped C0 label "
        "(None, DGR), posterior segmentation (DCC)"
    )
    fig.suptitle(textwrap.fill(title, 40 * len(columns)), fontsize=7)
    handles = [Patch(color=c, label=n) for c, n in zip(colours, STRUCTURES, strict=True)]
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    _save(fig, path)
    return {"case": case, "by": chosen[0], "path": path}


# ---------------------------------------------------------------------------- writing
def _pm(row: Mapping[str, Any], metric: str, digits: int = 1) -> str:
    m, s = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    return (
        f"{m:.{digits}f} ± {s:.{digits}f}"
        if s is not None and not math.isnan(s)
        else f"{m:.{digits}f}"
    )


def _paper(row: Mapping[str, Any], metric: str) -> str:
    return _pm(row, f"paper_{metric}")


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:.1f}"


def _t(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def _p(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2g}"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown(
    runs: Mapping[str, Run],
    missing: Mapping[str, str],
    rows: Sequence[Mapping[str, Any]],
    tests: Sequence[Mapping[str, Any]],
    refine: Sequence[Mapping[str, Any]],
    refine_path: Path,
    figure: Mapping[str, Any] | None,
    command: str,
    threads: int | None,
    data: Sequence[str] = (),
) -> str:
    groups = {len(r.rows) for r in runs.values()}
    patients = sorted({patient(c) for r in runs.values() for c in r.rows})
    lines = [
        "# Table 5 on MyoPS 2020: deep combined computing, four training strategies",
        "",
        f"Test split: {', '.join(str(g) for g in sorted(groups)) or 0} groups of "
        f"{len(patients)} patient(s) ({', '.join(patients)}); every strategy on the same fixed "
        "FFD misalignments. Dice in %, mean ± std over the test groups. Paper: Table 5 "
        "(45 MS-CMR patients, 100 epochs on a GPU). Time per group: the test's network + EM "
        "posterior per group (batched, `time_s` of MetricsTable) and the latency of one group "
        f"alone (batch of one, median of repeats, {threads or torch.get_num_threads()} "
        "thread(s); the machine may have been busy).",
        "",
        "| Strategy | Reg DSC | paper | Seg DSC LGE | Seg DSC C0 | Seg DSC T2 | paper Seg "
        "(LGE / C0 / T2) | time per group (ms, batched) | one group alone (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("missing"):
            lines.append(f"| {row['method']} | missing | {_paper(row, 'reg_dsc')} | | | | | | |")
            continue
        paper_seg = " / ".join(
            f"{row[f'paper_seg_dsc/{s}_mean']:.1f}"
            for s in SEQUENCES
            if f"paper_seg_dsc/{s}_mean" in row
        )
        lines.append(
            f"| {row['method']} | {_pm(row, 'reg_dsc')} | {_paper(row, 'reg_dsc')} | "
            + " | ".join(_pm(row, f"seg_dsc/{s}") for s in SEQUENCES)
            + f" | {paper_seg or '—'} | {_ms(row.get('time_s_mean'))} | "
            + f"{_ms(row.get('latency_s'))} |"
        )
    if len(groups) > 1:
        lines += [
            "",
            "**The runs tested different sets of groups: None is over all of them, the paired "
            "tests over the groups both methods tested.**",
        ]
    bad = inconsistent_groups(runs)
    if bad:
        lines += [
            "",
            f"**Warning: {len(bad)} test groups (e.g. {bad[0]}) have different unregistered "
            "Dice in different runs: the runs were not tested on the same data (image size, "
            "spacing, misalignment); their numbers do not compare.**",
        ]
    lines += [
        "",
        "Reg DSC per structure:",
        "",
        "| Strategy | " + " | ".join(STRUCTURES) + " | folding voxels per group |",
        "|---|" + "---:|" * (len(STRUCTURES) + 1),
    ]
    for row in rows:
        if row.get("missing") or row["strategy"] == "xcoreg":
            continue
        lines.append(
            f"| {row['method']} | "
            + " | ".join(_pm(row, f"reg_dsc/{s}") for s in STRUCTURES)
            + f" | {_pm(row, 'folding')} |"
        )
    lines += [
        "",
        "Paired t-tests of the per-group Reg DSC (`scipy.stats.ttest_rel`, B vs A on the groups "
        "both tested; difference B − A in points). The 20 misalignments of one slice and the "
        "slices of one patient are not independent, so the group-level p-values overstate the "
        "evidence; the per-patient test (means over each patient's groups) is the conservative "
        "one.",
        "",
        "| A | B | groups | B − A | t | p (groups) | patients | t | p (patients) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tests:
        if t.get("missing"):
            lines.append(f"| {t['a']} | {t['b']} | missing | | | | | | |")
            continue
        lines.append(
            f"| {t['a']} | {t['b']} | {t['groups']} | {t['diff_mean']:+.1f} | {_t(t['t'])} | "
            f"{_p(t['p'])} | {t['patients']} | {_t(t['t_patients'])} | {_p(t['p_patients'])} |"
        )
    lines += ["", f"## Network start, iterative finish ({refine_path})", ""]
    if refine:
        lines += ["| method | Reg DSC | groups | time per group (s) |", "|---|---:|---:|---:|"]
        for r in refine:
            std = r.get("reg_dsc_std")
            value = f"{r['reg_dsc_mean']:.1f}" + (f" ± {std:.1f}" if std is not None else "")
            t = r.get("time_s")
            lines.append(
                f"| {r['method']} | {value} | {r.get('groups') or '—'} | "
                f"{'—' if t is None else f'{t:.3f}'} |"
            )
    else:
        lines.append("Not available (run bench/bench_mscmr_refine.py to write it).")
    if missing:
        lines += ["", "## Missing strategies", ""]
        lines += [f"- {NAMES[s]} (`mscmr_{s}`): {why}" for s, why in missing.items()]
    if figure is not None:
        lines += [
            "",
            f"## Median test group ({Path(figure['path']).name})",
            "",
            f"![median group]({Path(figure['path']).name})",
            "",
            f"Group `{figure['case']}`, the median Reg DSC of {NAMES[figure['by']]}: the three "
            "sequences before (None) and after registration by each strategy, with the warped "
            "C0 label (None, DGR) or the posterior segmentation (DCC) as contours, and the "
            "posterior segmentation (Eq. 53) in the last row.",
        ]
    lines += [
        "",
        "## Training budget and hardware",
        "",
        "Fit minutes: wall time of `trainer.fit` (Lightning's Timer, what `trainer.max_time` "
        "counts, validation included); training minutes: without validation, at the last "
        "validation (`val/train_minutes`), and seconds per step from them.",
        "",
        "| Strategy | checkpoint tested | steps | epochs | fit min | training min | s / step | "
        "max_time | max_steps | max_epochs | threads | image | batch | C / L_R | accelerator "
        "(GPU used) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    budgets = {s: budget(r) for s, r in runs.items()}
    for strategy, b in budgets.items():
        run = runs[strategy]
        fit, minutes, per_step = (
            b.get("fit_minutes"),
            b.get("train_minutes"),
            b.get("seconds_per_step"),
        )
        tested = f"{run.checkpoint}" + (
            f" (tested here: {run.table})" if run.evaluated_here else ""
        )
        lines.append(
            f"| {NAMES[strategy]} | {tested} | {b.get('steps', '—')} | "
            f"{b.get('epochs', '—')} | {'—' if fit is None else f'{fit:.1f}'} | "
            f"{'—' if minutes is None else f'{minutes:.1f}'} | "
            f"{'—' if per_step is None else f'{per_step:.2f}'} | {b.get('max_time')} | "
            f"{b.get('max_steps')} | "
            f"{b.get('max_epochs')} | {b.get('threads')} | {b.get('image_size')} | "
            f"{b.get('batch_size')} | {b.get('channels')} / {b.get('levels')} | "
            f"{b.get('accelerator')} ({b.get('gpu_used', '?')}) |"
        )
    lines += [
        "",
        f"Gathered on: {hardware()}.",
        "",
        "## Commands",
        "",
        "```",
    ]
    for strategy, b in budgets.items():
        lines.append(
            b.get("command")
            or f"# {NAMES[strategy]}: no .hydra/overrides.yaml in {runs[strategy].folder}"
        )
    for run in runs.values():
        lines.append(evaluate_command(run.checkpoint, data))
    lines += [command, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="/work/runs", help="folder of the runs mscmr_<strategy>")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="STRATEGY=PATH",
        help="a strategy's run folder or checkpoint (instead of <runs>/mscmr_<strategy>)",
    )
    p.add_argument("--out", default=str(ROOT / "results" / "mscmr_table5"), help="output prefix")
    p.add_argument(
        "--refine",
        default=str(ROOT / "results" / "mscmr_refine.csv"),
        help="refinement table of bench/bench_mscmr_refine.py (its X-CoReg row is added)",
    )
    p.add_argument("--reevaluate", action="store_true", help="test every checkpoint again")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data-module setting for tests run here (e.g. root=/data, num_workers=2)",
    )
    p.add_argument(
        "--eval-dir", default=None, help="tests run here go to DIR/<strategy> (default: the run)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=20, help="timed passes of the median group")
    p.add_argument("--no-figure", action="store_true", help="skip the median-group PNG")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = {s: Path(args.runs) / f"mscmr_{s}" for s in STRATEGIES}
    for item in args.run:
        strategy, _, path = item.partition("=")
        if strategy not in STRATEGIES or not path:
            raise SystemExit(f"--run {item}: use STRATEGY=PATH with STRATEGY one of {STRATEGIES}")
        sources[strategy] = Path(path)
    eval_dir = Path(args.eval_dir) if args.eval_dir else None
    runs, missing = load_runs(sources, args.reevaluate, args.threads, args.data, eval_dir)
    for strategy, why in missing.items():
        print(f"[table5] {NAMES[strategy]} missing: {why}", file=sys.stderr)
    bad = inconsistent_groups(runs)
    if bad:
        print(f"[table5] warning: {len(bad)} test groups differ between runs", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = None
    if runs and not args.no_figure:
        figure = median_figure(
            runs, out.with_name(out.name + "_median.png"), args.repeats, args.threads, args.data
        )
    refine_path = Path(args.refine)
    refine = read_refine(refine_path) if refine_path.is_file() else []
    rows = summary_rows(runs, xcoreg_row(refine))
    xcoreg = xcoreg_row(refine)
    extra = {"xcoreg": xcoreg["cases"]} if xcoreg and xcoreg.get("cases") else {}
    pairs = [*PAIRS, *([("xcoreg", "dcc_all")] if extra and "dcc_all" in runs else [])]
    tests = paired_tests(runs, pairs, extra)
    command = "python bench/mscmr_table5.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_csv(out.with_name(out.name + ".csv"), rows)
    write_csv(out.with_name(out.name + "_ttests.csv"), tests)
    text = markdown(
        runs,
        missing,
        rows,
        tests,
        refine,
        refine_path,
        figure,
        command.strip(),
        args.threads,
        args.data,
    )
    out.with_name(out.name + ".md").write_text(text, encoding="utf-8")
    print(text)
    return {"rows": rows, "tests": tests, "missing": missing, "figure": figure}


if __name__ == "__main__":
    main()
