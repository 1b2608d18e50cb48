"""evaluate.py in test mode on a tiny checkpoint: the metrics tables and the overlays."""

from __future__ import annotations

import csv
import math

import pytest
import yaml
from tiny_runs import TINY_CLI, run_script, tiny_checkpoint

from dcc.lit.metrics_table import summarise, write_tables

STRUCTURES = ("myocardium", "LV", "RV")
SEQUENCES = ("C0", "LGE", "T2")


def test_evaluate_command_writes_tables_and_overlays(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory)
    run = tmp_path / "run"
    cli = [o for o in TINY_CLI if o.startswith("threads")]
    proc = run_script(
        "evaluate.py",
        [
            f"ckpt_path={ckpt}",
            *cli,
            "data.num_test=3",
            "data.batch_size=2",
            "callbacks.metrics_table.figures=2",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Reg DSC mean" in proc.stdout and "metrics table:" in proc.stdout
    metrics = run / "metrics"
    assert sorted(p.name for p in metrics.iterdir()) == [
        "test_groups.csv",
        "test_summary.csv",
        "test_summary.md",
    ]
    rows = list(csv.DictReader(open(metrics / "test_groups.csv")))
    assert [r["case"] for r in rows] == ["phantom-test-0", "phantom-test-1", "phantom-test-2"]
    expected = {"case", "reg_dsc", "unreg_dsc", "seg_dsc", "folding", "time_s"}
    expected |= {f"{m}/{s}" for m in ("reg_dsc", "unreg_dsc") for s in STRUCTURES}
    expected |= {f"seg_dsc/{s}" for s in SEQUENCES}
    distances = {f"{m}_{d}" for m in ("reg", "unreg", "seg") for d in ("hd95", "asd")}
    distances |= {f"{m}_{d}/{s}" for m in ("reg", "unreg") for d in ("hd95", "asd")
                  for s in STRUCTURES}
    distances |= {f"seg_{d}/{s}" for d in ("hd95", "asd") for s in SEQUENCES}
    assert set(rows[0]) == expected | distances
    for row in rows:
        for key in expected - {"case", "folding", "time_s"}:
            assert 0.0 <= float(row[key]) <= 1.0, key
        # mm on a 150 mm field of view (NaN: a structure missing from a map)
        assert all(float(row[k]) >= 0 or math.isnan(float(row[k])) for k in distances)
        assert float(row["unreg_hd95"]) < 150
        assert float(row["folding"]) >= 0 and float(row["time_s"]) > 0
    summary = {r["metric"]: r for r in csv.DictReader(open(metrics / "test_summary.csv"))}
    mean = sum(float(r["reg_dsc"]) for r in rows) / 3
    assert float(summary["reg_dsc"]["mean"]) == pytest.approx(mean)
    assert summary["reg_dsc"]["n"] == "3"
    # the test loop's logged mean agrees with the table (batches 2 + 1: weights by group)
    logged = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))[-1]
    assert float(logged["test/unreg_dsc"]) == pytest.approx(
        float(summary["unreg_dsc"]["mean"]), abs=1e-5
    )
    markdown = (metrics / "test_summary.md").read_text(encoding="utf-8").splitlines()
    assert markdown[0] == "| test metric | mean | std | groups |"
    assert any(line.startswith("| Seg DSC LGE (%) |") for line in markdown)
    assert any(line.startswith("| time per group (s) |") for line in markdown)
    assert any(line.startswith("| Reg HD95 mean (mm) |") for line in markdown)
    figures = sorted(p.name for p in (run / "figures").iterdir())
    for tag in ("test_000", "test_001"):
        assert f"{tag}_montage.png" in figures and f"{tag}_grid.png" in figures
    assert "test_002_montage.png" not in figures
    assert (run / ".hydra" / "config.yaml").is_file()  # the composed config in the run folder
    # test data made like the checkpoint's (32x32, not the data group's default 96x96), except
    # what the command line gives (data.num_test=3)
    hparams_file = run / "csv" / "version_0" / "hparams.yaml"
    hparams = yaml.safe_load(hparams_file.read_text(encoding="utf-8"))
    assert (hparams["data"]["image_size"], hparams["data"]["num_test"]) == (32, 3)


def test_summary_leaves_out_nan(tmp_path):
    rows = [
        {"case": "a", "reg_dsc": 0.5, "seg_dsc/C0": math.nan, "time_s": 1.0},
        {"case": "b", "reg_dsc": 0.7, "seg_dsc/C0": 0.9, "time_s": 3.0},
    ]
    summary = {s["metric"]: s for s in summarise(rows)}
    assert summary["reg_dsc"]["mean"] == pytest.approx(0.6)
    assert summary["reg_dsc"]["std"] == pytest.approx(math.sqrt(0.02))
    assert (summary["seg_dsc/C0"]["mean"], summary["seg_dsc/C0"]["n"]) == (0.9, 1)
    paths = write_tables(tmp_path, rows)
    lines = open(paths["summary_md"]).read().splitlines()
    assert "| Reg DSC mean (%) | 60.0 | 14.1 | 2 |" in lines
    assert "| time per group (s) | 2.000 | 1.414 | 2 |" in lines
