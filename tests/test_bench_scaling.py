"""bench/bench_scaling.py (issue #22): its log-log slope on exact power laws and against
numpy's least squares, and the command end to end at a tiny budget (N = 3 and 4, two FFD steps,
a process per size; the README test runs the rigid stage too)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from tiny_runs import ROOT, run_script

SPEC = importlib.util.spec_from_file_location("bench_scaling", ROOT / "bench/bench_scaling.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.mark.parametrize("power, scale", [(1.0, 0.01), (2.0, 3.0), (0.5, 250.0), (-1.0, 2.0),
                                          (0.0, 7.0), (1.37, 0.004)])
def test_slope_of_an_exact_power_law(power, scale):
    sizes = [3, 8, 16, 32, 64, 128]
    slope, intercept = bench.loglog_slope(sizes, [scale * n**power for n in sizes])
    assert slope == pytest.approx(power, abs=1e-12)
    assert intercept == pytest.approx(math.log(scale), abs=1e-10)


def test_slope_is_least_squares_on_logs():
    sizes = np.array([3, 8, 16, 32, 64, 128])
    values = 0.01 * sizes**1.2 * np.exp(np.random.default_rng(0).normal(0, 0.2, sizes.size))
    expected = np.polyfit(np.log(sizes), np.log(values), 1)
    np.testing.assert_allclose(bench.loglog_slope(sizes.tolist(), values.tolist()), expected)
    assert math.isnan(bench.loglog_slope([3], [0.1])[0])  # one size: no slope
    assert math.isnan(bench.loglog_slope([3, 3], [0.1, 0.2])[0])


def test_command_at_a_tiny_budget(tmp_path):
    tiny = ["--sizes", "3", "4", "--stage", "ffd", "--iterations", "2", "--repeats", "1",
            "--warmup", "1", "--target-sizes", "--out", str(tmp_path)]
    proc = run_script("bench/bench_scaling.py", tiny, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling.json").read_text(encoding="utf-8"))
    assert (tmp_path / "scaling.md").is_file() and (tmp_path / "scaling.png").stat().st_size > 0
    records = result["scaling"]
    assert sorted((r["stage"], r["N"]) for r in records) == [("ffd", 3), ("ffd", 4)]
    for r in records:
        assert r["torch_threads"] == 1 and r["package"] == str(ROOT / "dcc")
        for key in ("seconds_per_iteration_step", "seconds_per_iteration_total", "peak_rss_mib",
                    "rss_after_imports_mib", "rss_above_imports_mib"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["peak_rss_mib"] > result["parent_rss_mib"]  # the child's own memory
        assert all(run["iterations"] == 2 for run in r["runs"])
    for fit in result["fits"]:
        rows = sorted((r for r in records if r["stage"] == fit["stage"]), key=lambda r: r["N"])
        expected = bench.loglog_slope([r["N"] for r in rows],
                                      [r["seconds_per_iteration_step"] for r in rows])[0]
        assert fit["slope_seconds_per_iteration_step"] == pytest.approx(expected)
        assert math.isfinite(fit["slope_peak_rss_mib"])
    assert result["command"].startswith("python bench/bench_scaling.py --sizes 3 4")
    assert result["hardware"] and result["settings"]["threads"] == 1 and not result["targets"]


def _record(method, n, step, total, revision="HEAD"):
    return {"revision": revision, "method": method, "stage": "ffd", "N": n,
            "seconds_per_iteration_step": step, "seconds_per_iteration_total": total,
            "peak_rss_mib": 500.0 + n, "rss_above_imports_mib": 10.0 + n}


def test_methods_slopes_and_ratios_on_power_laws():
    """Issue #23 exp. 5: one fit per method, the baselines' ratios to X-CoReg and the N >= 16
    verdict, on exact power laws (X-CoReg 0.01 N, APE 0.001 N^2: APE slower from N = 10; VI
    always half X-CoReg)."""
    sizes = [3, 8, 16, 32]
    records = [_record("xcoreg", n, 0.01 * n, 0.02 * n) for n in sizes]
    records += [_record("ape", n, 0.001 * n**2, 0.002 * n**2) for n in sizes]
    records += [_record("vi", n, 0.005 * n, 0.03 * n) for n in sizes]
    records += [_record("xcoreg", n, 0.03 * n, 0.05 * n, revision="old") for n in sizes]
    fits = bench.summarise(records, ["old", "HEAD"])
    slopes = {(f["revision"], f["method"]): f["slope_seconds_per_iteration_step"] for f in fits}
    assert slopes == pytest.approx({("old", "xcoreg"): 1.0, ("HEAD", "xcoreg"): 1.0,
                                    ("HEAD", "ape"): 2.0, ("HEAD", "vi"): 1.0})
    c = bench.method_comparison(records, fits, "HEAD")["ffd"]
    assert c["methods"] == ["xcoreg", "ape", "vi"] and c["sizes"] == sizes
    step = c["ratio_to_xcoreg"]["seconds_per_iteration_step"]
    assert step["32"] == pytest.approx({"ape": 3.2, "vi": 0.5})
    assert step["3"]["ape"] == pytest.approx(0.3)
    # VI is faster per step everywhere; by the total definition every baseline is slower
    assert c["xcoreg_faster_than_all"]["seconds_per_iteration_step"] == {"16": False, "32": False}
    assert c["xcoreg_faster_than_all"]["seconds_per_iteration_total"] == {"16": True, "32": True}
    assert c["slopes"]["ape"]["seconds_per_iteration_total"] == pytest.approx(2.0)
    assert bench.method_comparison(records, fits, "old") == {}  # X-CoReg alone: no comparison


def test_command_with_two_methods(tmp_path):
    tiny = ["--sizes", "3", "4", "--stage", "ffd", "--iterations", "2", "--repeats", "1",
            "--warmup", "1", "--target-sizes", "--methods", "xcoreg", "vi", "--out",
            str(tmp_path)]
    proc = run_script("bench/bench_scaling.py", tiny, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling.json").read_text(encoding="utf-8"))
    records = result["scaling"]
    assert sorted((r["method"], r["N"]) for r in records) == [
        ("vi", 3), ("vi", 4), ("xcoreg", 3), ("xcoreg", 4)]
    assert result["settings"]["methods"] == ["xcoreg", "vi"]
    assert {f["method"] for f in result["fits"]} == {"xcoreg", "vi"}
    for fit in result["fits"]:
        rows = sorted((r for r in records if r["method"] == fit["method"]), key=lambda r: r["N"])
        assert fit["slope_seconds_per_iteration_total"] == pytest.approx(bench.loglog_slope(
            [3, 4], [r["seconds_per_iteration_total"] for r in rows])[0])
    for r in records:  # CPU seconds of the one-thread process beside the wall clock
        assert 0 < r["cpu_per_iteration_step"] and 0 < r["cpu_per_iteration_total"]
        assert r["cpu_per_iteration_total"] < 2 * r["seconds_per_iteration_total"]
    by = {(r["method"], r["N"]): r for r in records}
    cpu = result["methods"]["ffd"]["ratio_to_xcoreg"]["cpu_per_iteration_step"]["3"]["vi"]
    assert cpu == pytest.approx(by["vi", 3]["cpu_per_iteration_step"]
                                / by["xcoreg", 3]["cpu_per_iteration_step"])
    ratio = result["methods"]["ffd"]["ratio_to_xcoreg"]["seconds_per_iteration_step"]["4"]["vi"]
    assert ratio == pytest.approx(by["vi", 4]["seconds_per_iteration_step"]
                                  / by["xcoreg", 4]["seconds_per_iteration_step"])
    md = (tmp_path / "scaling.md").read_text(encoding="utf-8")
    assert "| xcoreg step s/it | xcoreg total s/it |" in md and "| vi step s/it |" in md
    assert "| N (CPU) | vi |" in md
    assert "| vi | ffd | 3-4 |" in md and "## Baselines against X-CoReg, ffd stage" in md
    assert (tmp_path / "scaling.png").stat().st_size > 0
