"""Methods compared on the same trials, as the paper's registration tables (Tables 2-4): per
method the mean ± std of a metric over the trials, a paired t-test against X-CoReg (SciPy's
``ttest_rel`` on the trials both methods finished) and the ratios of wall time and peak memory
to X-CoReg's, measured in the same run. Every experiment bench (``bench/bench_phantom.py``,
``bench_openms.py``, ``bench_perfusion.py``, ``bench_myops.py``) writes its table with these
functions, so the tables read alike.

A *record* is one method on one trial: a mapping with ``method``, ``trial`` (any hashable that
names the trial), the metric, ``seconds`` and optionally ``peak_rss_mb``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dcc.evaluation.runs import hardware, mean_std, paired_ttest

__all__ = ["ALPHA", "compare_methods", "comparison_markdown", "write_experiment"]

ALPHA = 0.05  # significance level of the paired tests


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _by_trial(records: Sequence[Mapping[str, Any]], method: str, key: str) -> dict:
    return {r["trial"]: float(r[key]) for r in records
            if r["method"] == method and _finite(r.get(key))}


def _ratio(a: float, b: float) -> float:
    return a / b if _finite(a) and _finite(b) and b > 0 else math.nan


def compare_methods(
    records: Sequence[Mapping[str, Any]],
    metric: str,
    *,
    reference: str = "xcoreg",
    higher_is_better: bool = False,
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """One row per method (in order of first appearance) of ``metric`` over its trials.

    Each row: ``n`` (trials with a finite value), ``failed`` (trials without one), ``mean``,
    ``std``, ``max``, ``min``; against ``reference`` on their common trials: ``pairs``,
    ``diff`` (mean of method - reference), ``t``/``p`` (paired t-test), ``verdict``
    (``"better"``/``"worse"`` when p < :data:`ALPHA`, else ``"n.s."``; ``higher_is_better``
    says which direction is better); ``seconds`` (mean per trial), ``time_ratio`` and
    ``memory_ratio`` (mean seconds, and peak ``peak_rss_mb``, divided by the reference's).
    ``baseline`` (a key of the records, e.g. the unregistered value ``"gwi_before"``) adds
    ``below_start``: trials where the method ended worse than that value.
    """
    methods = list(dict.fromkeys(r["method"] for r in records))
    if reference not in methods:
        raise ValueError(f"reference method '{reference}' has no records (have {methods})")
    ref = _by_trial(records, reference, metric)
    ref_seconds = _by_trial(records, reference, "seconds")
    ref_memory = _by_trial(records, reference, "peak_rss_mb")
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        values = _by_trial(records, method, metric)
        mean, std, n = mean_std(list(values.values()))
        common = [t for t in values if t in ref]
        t, p = paired_ttest([ref[c] for c in common], [values[c] for c in common])
        diff = statistics.fmean(values[c] - ref[c] for c in common) if common else math.nan
        verdict = "n.s."
        if _finite(p) and p < ALPHA:
            verdict = "better" if (diff > 0) == higher_is_better else "worse"
        seconds = _by_trial(records, method, "seconds")
        memory = _by_trial(records, method, "peak_rss_mb")
        row = {
            "method": method, "n": n, "failed": len(mine) - n, "mean": mean, "std": std,
            "min": min(values.values(), default=math.nan),
            "max": max(values.values(), default=math.nan),
            "pairs": len(common) if method != reference else math.nan,
            "diff": diff if method != reference else math.nan,
            "t": t, "p": p, "verdict": verdict if method != reference else "",
            "seconds": statistics.fmean(seconds.values()) if seconds else math.nan,
            "peak_rss_mb": max(memory.values(), default=math.nan),
        }
        row["time_ratio"] = _ratio(row["seconds"], statistics.fmean(ref_seconds.values())
                                   if ref_seconds else math.nan)
        row["memory_ratio"] = _ratio(row["peak_rss_mb"], max(ref_memory.values(),
                                                             default=math.nan))
        if baseline is not None:
            start = {r["trial"]: r[baseline] for r in mine if _finite(r.get(baseline))}
            worse = [c for c in values if c in start and (
                values[c] < start[c] if higher_is_better else values[c] > start[c])]
            row["below_start"] = len(worse)
        rows.append(row)
    return rows


def _f(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "—"


def comparison_markdown(
    rows: Sequence[Mapping[str, Any]],
    metric_label: str,
    *,
    digits: int = 3,
    names: Mapping[str, str] | None = None,
    reference: str = "xcoreg",
) -> str:
    """A Markdown table of :func:`compare_methods` rows."""
    names = names or {}
    below = any("below_start" in r for r in rows)
    head = ["method", "trials", f"{metric_label} mean ± std", "max",
            f"diff vs {names.get(reference, reference)}", "t", "p", "",
            "s / trial", "time ratio", "peak MB", "memory ratio"]
    if below:
        head.insert(4, "worse than start")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        trials = str(r["n"]) + (f" (+{r['failed']} failed)" if r["failed"] else "")
        cells = [names.get(r["method"], r["method"]), trials,
                 f"{_f(r['mean'], digits)} ± {_f(r['std'], digits)}", _f(r["max"], digits),
                 _f(r["diff"], digits), _f(r["t"], 2),
                 f"{r['p']:.2g}" if _finite(r["p"]) else "—", r["verdict"],
                 _f(r["seconds"], 2), _f(r["time_ratio"], 2), _f(r["peak_rss_mb"], 0),
                 _f(r["memory_ratio"], 2)]
        if below:
            cells.insert(4, str(r.get("below_start", "—")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_experiment(
    out: Path,
    tag: str,
    *,
    settings: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    markdown: str,
) -> tuple[Path, Path]:
    """``<out>/<tag>.json`` (settings, hardware, every record and table) and ``<out>/<tag>.md``
    (``markdown`` with the hardware line appended); returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"settings": dict(settings), "hardware": hardware(), "tables": dict(tables),
            "records": list(records)}
    json_path, md_path = out / f"{tag}.json", out / f"{tag}.md"
    json_path.write_text(json.dumps(data, indent=1, default=_json_default), encoding="utf-8")
    md_path.write_text(markdown.rstrip() + f"\n\nHardware: {hardware()}.\n", encoding="utf-8")
    return json_path, md_path
