"""dcc.evaluation.comparison: the methods table of the registration experiments, against SciPy
and hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from dcc.evaluation.comparison import compare_methods, comparison_markdown, write_experiment

X = [1.0, 2.0, 3.0, 4.0]
A = [1.5, 2.4, 3.7, 4.4]  # worse (higher error) on every trial
B = [0.9, 2.2, 2.8, 4.1]  # no consistent difference


def records():
    out = []
    for method, values, seconds, memory in (("xcoreg", X, 2.0, 500.0), ("ape", A, 6.0, 750.0),
                                            ("gmm", B, 3.0, 400.0)):
        for trial, value in enumerate(values):
            out.append({"method": method, "trial": trial, "gre": value, "before": 3.5,
                        "seconds": seconds + trial, "peak_rss_mb": memory})
    out.append({"method": "gmm", "trial": 4, "gre": math.nan, "before": 3.5, "seconds": 1.0,
                "peak_rss_mb": 400.0})  # a failed trial: counted, left out of the statistics
    return out


def test_rows_against_scipy_and_by_hand():
    rows = {r["method"]: r for r in compare_methods(records(), "gre", baseline="before")}
    assert list(rows) == ["xcoreg", "ape", "gmm"]
    ape, gmm, ref = rows["ape"], rows["gmm"], rows["xcoreg"]
    assert ape["mean"] == pytest.approx(sum(A) / 4)
    assert ape["std"] == pytest.approx(stats.tstd(A))
    expected = stats.ttest_rel(A, X)
    assert ape["t"] == pytest.approx(expected.statistic)
    assert ape["p"] == pytest.approx(expected.pvalue)
    assert ape["p"] < 0.05 and ape["verdict"] == "worse"  # lower error is better
    assert ape["diff"] == pytest.approx(sum(a - x for a, x in zip(A, X, strict=True)) / 4)
    assert gmm["verdict"] == "n.s." and gmm["n"] == 4 and gmm["failed"] == 1
    assert gmm["pairs"] == 4 and gmm["max"] == pytest.approx(4.1)
    # time: mean seconds per trial over the mean of the reference (2, 3, 4, 5 -> 3.5)
    assert ape["time_ratio"] == pytest.approx(7.5 / 3.5)
    assert gmm["time_ratio"] == pytest.approx((3 + 4 + 5 + 6 + 1) / 5 / 3.5)
    assert ape["memory_ratio"] == pytest.approx(1.5) and gmm["memory_ratio"] == pytest.approx(0.8)
    # trials that end above the start value 3.5 (errors: lower is better)
    assert ape["below_start"] == 2 and ref["below_start"] == 1
    assert math.isnan(ref["t"]) and ref["verdict"] == "" and ref["time_ratio"] == 1.0


def test_direction_of_better():
    flipped = [{**r, "gre": -r["gre"]} for r in records()]
    rows = {r["method"]: r for r in compare_methods(flipped, "gre", higher_is_better=True)}
    assert rows["ape"]["verdict"] == "worse" and rows["ape"]["diff"] < 0
    better = [{**r, "method": {"xcoreg": "ape", "ape": "xcoreg"}.get(r["method"], r["method"])}
              for r in records()]
    rows = {r["method"]: r for r in compare_methods(better, "gre")}
    assert rows["ape"]["verdict"] == "better"  # X now has the higher error everywhere


def test_reference_must_have_records():
    with pytest.raises(ValueError, match="reference method 'xcoreg'"):
        compare_methods([r for r in records() if r["method"] != "xcoreg"], "gre")


def test_markdown_and_files(tmp_path):
    rows = compare_methods(records(), "gre", baseline="before")
    text = comparison_markdown(rows, "gRE (mm)", digits=2, names={"xcoreg": "X-CoReg"})
    lines = text.strip().splitlines()
    assert lines[0].startswith("| method | trials | gRE (mm) mean ± std | max | worse than start")
    assert lines[3].startswith("| ape | 4 | 3.00 ± 1.30 | 4.40 | 2 | 0.50 |")
    assert "| worse | 7.50 | 2.14 | 750 | 1.50 |" in lines[3]
    assert lines[4].startswith("| gmm | 4 (+1 failed) |")
    json_path, md_path = write_experiment(tmp_path / "out", "exp", settings={"trials": 4},
                                          records=records(), tables={"all": rows},
                                          markdown=text)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["settings"] == {"trials": 4} and len(data["records"]) == 13
    assert data["tables"]["all"][1]["method"] == "ape"
    assert md_path.read_text(encoding="utf-8").startswith(text.strip())
    assert "Hardware:" in md_path.read_text(encoding="utf-8")
