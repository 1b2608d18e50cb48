"""Reading run folders and comparing runs (dcc.evaluation.runs), against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from dcc.evaluation.runs import best_checkpoint, mean_std, paired_ttest, patient, read_groups


def test_paired_ttest_by_hand():
    # differences 1, 1, 1, 2: mean 1.25, sd 0.5, t = 1.25 / (0.5 / 2) = 5 with 3 degrees
    t, p = paired_ttest([1, 2, 3, 4], [2, 3, 4, 6])
    assert t == pytest.approx(5.0)
    assert p == pytest.approx(0.01539, abs=1e-4)
    assert all(math.isnan(v) for v in paired_ttest([1.0], [2.0]))
    assert all(math.isnan(v) for v in paired_ttest([1, 2], [1, 2]))


def test_mean_std_and_patients():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_std([4.0]) == (4.0, 0.0, 1)
    assert math.isnan(mean_std([])[0])
    assert patient("Case3005-z2-s0-k1.2.3") == "Case3005"


def test_read_groups_and_best_checkpoint(tmp_path):
    table = tmp_path / "groups.csv"
    table.write_text("case,reg_dsc,unreg_dsc,seg_dsc\nA-z0,0.8,0.7,\nB-z1,0.9,0.6,0.5\n")
    rows = read_groups(table)
    assert rows["A-z0"]["reg_dsc"] == 0.8 and math.isnan(rows["A-z0"]["seg_dsc"])
    table.write_text("case,dice\nA,0.8\n")
    with pytest.raises(ValueError, match="reg_dsc"):
        read_groups(table)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("epoch_003.ckpt", "epoch_009.ckpt"):
        torch.save({}, folder / name)
    best = {"monitor": "val/reg_dsc", "best_model_path": "/elsewhere/epoch_003.ckpt"}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/reg_dsc'}": best}},
               folder / "last.ckpt")
    # the monitored best, found in this folder although the run was made elsewhere
    assert best_checkpoint(tmp_path / "run") == folder / "epoch_003.ckpt"
    (folder / "last.ckpt").unlink()
    assert best_checkpoint(tmp_path / "run").name in {"epoch_003.ckpt", "epoch_009.ckpt"}
    assert best_checkpoint(tmp_path / "none") is None


def test_read_curve_joins_resumed_logs(tmp_path):
    """Validation curves from a run's CSV logs: a resumed run's second log continues the
    minutes of the first; the overrides leave out Hydra's and the bookkeeping ones."""
    from dcc.evaluation.runs import read_curve, run_overrides

    for version, rows in ((0, [(1.0, 10, 0.7), (2.0, 20, 0.75)]), (1, [(0.5, 30, 0.8)])):
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        lines = ["step,val/train_minutes,val/reg_dsc,val/seg_dsc,val/unreg_dsc,train/loss"]
        lines += [f"{s},{m},{r},0.5,0.6," for m, s, r in rows] + ["5,,,,,1.0"]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    curve = read_curve(tmp_path)
    assert curve["minutes"] == [1.0, 2.0, 2.5] and curve["step"] == [10, 20, 30]
    assert curve["reg"] == [0.7, 0.75, 0.8]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- experiment=mscmr_dcc_all\n- hydra.run.dir=x\n- threads=1\n- model.cascade=2\n")
    assert run_overrides(tmp_path) == "experiment=mscmr_dcc_all model.cascade=2"
    assert run_overrides(tmp_path / "none") == "?"


def test_paired_groups_matches_scipy_on_the_common_groups():
    """B against A on the groups both hold (NaNs and one-sided groups left out): the t-test is
    scipy's ttest_rel over the groups and over the per-patient means."""
    from scipy import stats

    from dcc.evaluation.runs import paired_groups

    a = {"Case3001-z1-s0": 0.70, "Case3001-z1-s1": 0.72, "Case3001-z2-s0": 0.65,
         "Case3002-z1-s0": 0.80, "Case3002-z2-s0": 0.60, "Case3003-z1-s0": 0.50,
         "Case3003-z1-s1": 0.55, "Case3004-z1-s0": math.nan, "Case3005-z1-s0": 0.9}
    b = {"Case3001-z1-s0": 0.78, "Case3001-z1-s1": 0.75, "Case3001-z2-s0": 0.74,
         "Case3002-z1-s0": 0.81, "Case3002-z2-s0": 0.70, "Case3003-z1-s0": 0.62,
         "Case3003-z1-s1": 0.58, "Case3004-z1-s0": 0.7, "Case3006-z1-s0": 0.9}
    common = [c for c in a if c.startswith(("Case3001", "Case3002", "Case3003"))]
    out = paired_groups(a, b)
    assert out["groups"] == 7 and out["patients"] == 3
    expected = stats.ttest_rel([b[c] for c in common], [a[c] for c in common])
    assert out["t"] == pytest.approx(expected.statistic) and out["p"] == pytest.approx(
        expected.pvalue)
    # differences 8, 3, 9, 1, 10, 12, 3 points: mean 46 / 7
    assert out["diff_mean"] == pytest.approx(46 / 7)
    pa = [(0.70 + 0.72 + 0.65) / 3, (0.80 + 0.60) / 2, (0.50 + 0.55) / 2]
    pb = [(0.78 + 0.75 + 0.74) / 3, (0.81 + 0.70) / 2, (0.62 + 0.58) / 2]
    expected = stats.ttest_rel(pb, pa)
    assert out["t_patients"] == pytest.approx(expected.statistic)
    assert out["p_patients"] == pytest.approx(expected.pvalue)
    # a one-patient comparison has no patient-level test; no common group, no numbers at all
    one = paired_groups({"Case3001-z1": 0.5, "Case3001-z2": 0.6}, {"Case3001-z1": 0.6,
                                                                   "Case3001-z2": 0.8})
    assert one["groups"] == 2 and one["t"] == pytest.approx(3.0) and math.isnan(one["p_patients"])
    none = paired_groups({"A": 0.5}, {"B": 0.5})
    assert none["groups"] == 0 and math.isnan(none["diff_mean"]) and math.isnan(none["t"])


def test_resolve_run_and_the_groups_of_several_runs(tmp_path):
    from dcc.evaluation.runs import Run, inconsistent_groups, resolve_run, unregistered_rows

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "epoch_001.ckpt"
    torch.save({}, ckpt)
    # a checkpoint file: its run is the folder above checkpoints/, not yet tested
    found = resolve_run("dgr", ckpt)
    assert (found.folder, found.checkpoint, found.table) == (run, ckpt, None)
    loose = tmp_path / "best.ckpt"
    torch.save({}, loose)
    assert resolve_run("dgr", loose).folder == tmp_path
    # a run folder: its best checkpoint and its test table once tested
    assert resolve_run("dgr", run).checkpoint == ckpt and resolve_run("dgr", run).table is None
    (run / "metrics").mkdir()
    (run / "metrics" / "test_groups.csv").write_text("case,reg_dsc,unreg_dsc\nA,0.8,0.6\n")
    assert resolve_run("dgr", run).table == run / "metrics" / "test_groups.csv"
    (tmp_path / "empty").mkdir()
    assert resolve_run("dgr", tmp_path / "empty") is None
    assert resolve_run("dgr", tmp_path / "absent") is None

    def with_rows(rows):
        return Run("s", tmp_path, tmp_path, None, rows)

    runs = {
        "dgr": with_rows({"A": {"reg_dsc": 0.8, "unreg_dsc": 0.6, "unreg_dsc/LV": 0.7},
                          "B": {"reg_dsc": 0.9, "unreg_dsc": 0.5, "unreg_dsc/LV": 0.4}}),
        "dcc_all": with_rows({"B": {"reg_dsc": 0.7, "unreg_dsc": 0.5 + 1e-3},
                              "C": {"reg_dsc": 0.6, "unreg_dsc": 0.4}}),
    }
    # every tested group once, with the first run's unregistered columns only
    assert unregistered_rows(runs) == {
        "A": {"unreg_dsc": 0.6, "unreg_dsc/LV": 0.7},
        "B": {"unreg_dsc": 0.5, "unreg_dsc/LV": 0.4},
        "C": {"unreg_dsc": 0.4},
    }
    assert inconsistent_groups(runs) == ["B"]
    assert inconsistent_groups(runs, tol=1e-2) == []


def test_hardware_names_the_cpu():
    from pathlib import Path

    from dcc.evaluation.runs import cpu_name, hardware

    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip()
                 for line in info.read_text(encoding="utf-8").splitlines()
                 if line.startswith("model name")]
        if names:
            assert cpu_name() == names[0]
    assert cpu_name() and hardware().startswith(f"{cpu_name()}, ")
    assert f"torch {torch.__version__}" in hardware()
