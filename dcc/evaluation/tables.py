"""The paper's Table 5 (four DCC training strategies on the same MyoPS test groups) from run
folders (:mod:`dcc.evaluation.runs`): the summary row of every method with the paper's numbers
beside, the per-group Reg DSC and the paired t-tests between methods, the refinement rows of
``bench/bench_mscmr_refine.py`` (read from a CSV that may name its columns differently), the
median test group, and the CSV and Markdown files. ``bench/mscmr_table5.py`` tests the runs that
need it and draws the median group; the rest is here.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcc.evaluation.runs import (
    Run,
    budget,
    hardware,
    inconsistent_groups,
    mean_std,
    paired_groups,
    patient,
    unregistered_rows,
    values,
)

__all__ = [
    "STRATEGIES", "NAMES", "SEQUENCES", "STRUCTURES", "LABELLED", "PAPER", "PAIRS", "METRICS",
    "summary_rows", "per_group", "paired_tests", "number", "read_refine", "xcoreg_row",
    "median_case", "plus_minus", "write_csv", "markdown",
]

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


# ---------------------------------------------------------------------------- rows
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
    """For each pair ``(a, b)`` of methods: :func:`dcc.evaluation.runs.paired_groups` of their
    per-group Reg DSC (``scipy.stats.ttest_rel`` on the groups both tested and on the per-patient
    means: groups of one slice and one patient are not independent, 20 FFD combinations per
    slice), with the methods' names; ``missing`` when a method was not run."""
    out = []
    for a, b in pairs:
        row: dict[str, Any] = {"a": NAMES[a], "b": NAMES[b]}
        known = {"none", *runs, *(extra or {})}
        if not runs or any(m not in known for m in (a, b)):
            row["missing"] = True
            out.append(row)
            continue
        row.update(paired_groups(per_group(runs, a, extra), per_group(runs, b, extra)))
        out.append(row)
    return out


# ---------------------------------------------------------------------------- X-CoReg rows
REFINE_DSC = ("reg_dsc_mean", "reg_dsc", "mean_reg_dsc", "dice_after")
REFINE_STD = ("reg_dsc_std", "std_reg_dsc", "reg_dsc_sd")
REFINE_TIME = ("time_s_mean", "time_per_group_s", "time_s", "seconds_per_group", "seconds")


def number(row: Mapping[str, str], *names: str) -> float | None:
    """The first of the columns ``names`` that holds a number, as a float; None if none does."""
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
        regs = [x for x in (number(r, *REFINE_DSC) for r in rows) if x is not None]
        times = [x for x in (number(r, *REFINE_TIME) for r in rows) if x is not None]
        if not regs:
            continue
        cases = {}
        if per_group:
            m, s, n = mean_std(regs)
            column = "case" if "case" in rows[0] else "group"
            cases = {r[column]: number(r, *REFINE_DSC) for r in rows}
            cases = {c: v / 100 if v > 1.5 else v for c, v in cases.items() if v is not None}
        else:
            m, s = regs[0], number(rows[0], *REFINE_STD)
            n = int(number(rows[0], "groups", "n") or 0)
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


# ---------------------------------------------------------------------------- writing
def plus_minus(row: Mapping[str, Any], metric: str, digits: int = 1) -> str:
    """``"mean ± std"`` of ``<metric>_mean`` and ``<metric>_std`` (the mean alone without a std,
    ``—`` without a mean)."""
    m, s = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    return (
        f"{m:.{digits}f} ± {s:.{digits}f}"
        if s is not None and not math.isnan(s)
        else f"{m:.{digits}f}"
    )


def _paper(row: Mapping[str, Any], metric: str) -> str:
    return plus_minus(row, f"paper_{metric}")


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:.1f}"


def _t(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def _p(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2g}"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV, with the columns of all rows in the order they first appear (cells a row
    lacks left empty)."""
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
    evaluate_commands: Sequence[str] = (),
    budgets: Mapping[str, Mapping[str, Any]] | None = None,
    gathered_on: str | None = None,
) -> str:
    """The Markdown of Table 5: the summary ``rows`` (:func:`summary_rows`) beside the paper's,
    Reg DSC per structure, the paired ``tests`` (:func:`paired_tests`), the ``refine`` rows
    (:func:`read_refine`) of ``refine_path``, the ``missing`` strategies and why, the median
    ``figure`` (``{"case", "by", "path"}``), the training ``budgets`` of the runs (default:
    :func:`dcc.evaluation.runs.budget` of each) and the hardware (``gathered_on``, default
    :func:`dcc.evaluation.runs.hardware`), and the commands that regenerate it: the runs'
    training commands, the ``evaluate_commands`` of their checkpoints and ``command``.
    ``threads``: the torch threads of the timings (default: torch's)."""
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
            f"| {row['method']} | {plus_minus(row, 'reg_dsc')} | {_paper(row, 'reg_dsc')} | "
            + " | ".join(plus_minus(row, f"seg_dsc/{s}") for s in SEQUENCES)
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
            + " | ".join(plus_minus(row, f"reg_dsc/{s}") for s in STRUCTURES)
            + f" | {plus_minus(row, 'folding')} |"
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
    if budgets is None:
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
        f"Gathered on: {gathered_on or hardware()}.",
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
    lines += list(evaluate_commands)
    lines += [command, "```", ""]
    return "\n".join(lines)


