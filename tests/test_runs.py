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
