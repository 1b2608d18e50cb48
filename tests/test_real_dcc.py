"""Deployment on real data (issue #10): train DCC+All a few steps on two MyoPS patients through
the Hydra path of ``python train.py``, then register and segment a third patient's own files
with the checkpoint through the predict mode (``python evaluate.py mode=predict``).

Needs ``$DCC_DATA_ROOT/myops2020`` (or ``../shared/data`` beside the repository); skipped with
the reason when it is absent. About 30 s on one core (64 px slices, C = 4, L_R = 2).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_configs import compose_cfg

from dcc.data.cardiac import MYOPS_SEQUENCES, data_root, merge_labels
from dcc.data.io import read_image, write_image
from dcc.lit.predict import run_prediction
from dcc.lit.train import run_training
from dcc.spatial.grid import Grid

ROOT = data_root()
MYOPS = ROOT / "myops2020" if ROOT is not None else None
SPLIT = {"train": ["Case3001", "Case3002"], "val": ["Case3025"], "test": ["Case3005"]}
PREDICT = "Case3006"  # in no split: a user's own patient


def _skip_reason() -> str | None:
    if MYOPS is None or not MYOPS.is_dir():
        return "MyoPS 2020 not found: set DCC_DATA_ROOT to the folder holding myops2020/"
    missing = [c for c in [*sum(SPLIT.values(), []), PREDICT] if not (MYOPS / c).is_dir()]
    return f"{MYOPS} lacks {', '.join(missing)}" if missing else None


pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """DCC+All, 6 steps (both optimisers step) on the slices of two patients, 64 x 64 voxels of
    2.5 mm, validated and tested on one patient each."""
    tmp = tmp_path_factory.mktemp("real_dcc")
    split = tmp / "split.json"
    split.write_text(json.dumps(SPLIT))
    cfg = compose_cfg(
        tmp / "run",
        [
            "~experiment",
            "data=myops",
            "strategy=dcc_all",
            f"data.root={ROOT}",
            f"data.split_file={split}",
            "data.image_size=64",
            "data.spacing=2.5",
            "data.batch_size=2",
            f"data.cache_dir={tmp / 'cache'}",
            "model.net.channels=4",
            "model.net.levels=2",
            "model.alternate_every=3",
            "model.figure_every=0",
            "callbacks.metrics_table.figures=0",
            "trainer.max_steps=6",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=2",
            "~callbacks.rich_progress_bar",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
        ],
    )
    return run_training(cfg)


def test_train_on_two_patients(trained):
    m = trained["metrics"]
    for key in ("test/reg_dsc", "test/unreg_dsc", "test/seg_dsc/C0", "test/seg_dsc/LGE"):
        assert 0 <= m[key] <= 1, key
    assert math.isfinite(m["test/loss"])
    best = Path(trained["best_ckpt"])
    assert best.is_file() and best.parent.name == "checkpoints"
    saved = torch.load(best, map_location="cpu", weights_only=True)
    assert saved["global_step"] >= 1
    assert saved["datamodule_hyper_parameters"]["image_size"] == 64
    # the test groups of the one test patient: 4 groups (2 batches of 2), the gather script's input
    table = Path(trained["output_dir"]) / "metrics" / "test_groups.csv"
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["case"].startswith("Case3005-z") for r in rows)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A third patient's C0 / LGE / T2 stacks as they come, its labels merged to K = 4 (one
    label file per image), and the short-axis slice with the most myocardium, LV and RV."""
    folder = tmp_path_factory.mktemp("user")
    case = MYOPS / PREDICT
    gd, grid = read_image(case / f"{PREDICT}_gd.nii.gz")
    labels = merge_labels(gd.round().to(torch.int64))
    present = torch.stack([(labels == k).flatten(1).sum(1) for k in (1, 2, 3)]).amin(0)
    index = int(present.argmax())  # along ITK's z (the first tensor axis)
    assert present[index] > 0
    label_file = folder / f"{PREDICT}_labels.nii.gz"
    write_image(label_file, labels.to(torch.int32), grid)
    images = [str(case / f"{PREDICT}_{s}.nii.gz") for s in MYOPS_SEQUENCES]
    return images, [str(label_file)] * len(images), index


def test_predict_on_a_third_patient(trained, user_files, tmp_path):
    images, labels, index = user_files
    out = tmp_path / "prediction"
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "mode=predict",
            f"ckpt_path={trained['best_ckpt']}",
            f"predict.inputs=[{','.join(images)}]",
            f"predict.labels=[{','.join(labels)}]",
            f"predict.sequences=[{','.join(MYOPS_SEQUENCES)}]",
            f"predict.slice={index}",
            f"predict.out={out}",
        ],
        name="evaluate.yaml",
    )
    report = run_prediction(cfg)
    names = [f"{PREDICT}_{s}" for s in MYOPS_SEQUENCES]
    assert report["names"] == names and report["sequences"] == list(MYOPS_SEQUENCES)
    assert 0 < report["inference_s"] < 60
    for key in ("dice_before", "dice_after"):
        assert 0 <= report[key]["mean"] <= 1, key
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["names"] == names
    # the common grid: the C0 slice's field of view at the training spacing (2.5 mm)
    common = Grid(**{k: tuple(v) for k, v in report["common_grid"].items()})
    assert common.ndim == 2 and common.spacing == pytest.approx((2.5, 2.5))
    expected = {"posterior.nii.gz": 4, "segmentation.nii.gz": 1}
    for name in names:
        expected |= {
            f"warped/{name}.nii.gz": 1,
            f"labels/{name}.nii.gz": 1,
            f"transforms/{name}_displacement.nii.gz": 2,
        }
    for rel, components in expected.items():
        image = sitk.ReadImage(str(out / rel))
        assert Grid.from_sitk(image).same_geometry(common), rel
        assert image.GetNumberOfComponentsPerPixel() == components, rel
        array = sitk.GetArrayFromImage(image)
        assert array.shape[:2] == tuple(common.shape), rel
        assert np.isfinite(array).all(), rel
        if rel.startswith("labels/") or rel == "segmentation.nii.gz":
            assert set(np.unique(array)) <= {0, 1, 2, 3}, rel
    posterior = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "posterior.nii.gz")))
    np.testing.assert_allclose(posterior.sum(-1), 1.0, atol=1e-4)
    # the warped labels carry the anatomy: all three structures in every image
    for name in names:
        warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels" / f"{name}.nii.gz")))
        assert {1, 2, 3} <= set(np.unique(warped)), name
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table5_gathers_the_run(trained, tmp_path):
    """bench/mscmr_table5.py on the run (DCC+All) with the other strategies absent: they are
    reported as missing, the run's test groups fill its rows, the median group is drawn."""
    spec = importlib.util.spec_from_file_location(
        "mscmr_table5", Path(__file__).resolve().parents[1] / "bench" / "mscmr_table5.py"
    )
    table5 = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, table5)  # its dataclasses look their module up
    spec.loader.exec_module(table5)
    out = tmp_path / "table5"
    args = ["--runs", str(tmp_path / "none"), "--run", f"dcc_all={trained['output_dir']}"]
    result = table5.main([*args, "--out", str(out), "--refine", "", "--repeats", "2"])
    assert set(result["missing"]) == {"dgr", "dcc_at", "dcc_bs"}
    rows = {r["strategy"]: r for r in result["rows"]}
    assert rows["dcc_bs"]["missing"] and rows["dcc_all"]["groups"] == 4
    assert rows["none"]["reg_dsc_mean"] == pytest.approx(
        100 * trained["metrics"]["test/unreg_dsc"], abs=1e-3
    )
    assert 0 <= rows["dcc_all"]["seg_dsc/LGE_mean"] <= 100 and rows["dcc_all"]["latency_s"] > 0
    assert [t.get("missing", False) for t in result["tests"]] == [True, True, True, True]
    text = (tmp_path / "table5.md").read_text(encoding="utf-8")
    assert "| DCC+BS | missing |" in text and str(trained["best_ckpt"]) in text
    assert (tmp_path / "table5.csv").is_file() and (tmp_path / "table5_ttests.csv").is_file()
    assert (tmp_path / "table5_median.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_command_train_on_myops(tmp_path):
    """`DCC_DATA_ROOT=... python train.py data=myops` as the README shows it (a tiny budget):
    the default experiment's phantom sizes no longer reach the MyoPS module."""
    from tiny_runs import run_script

    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        ["data=myops", "trainer.max_epochs=1", "++trainer.limit_train_batches=2",
         "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1", "threads=1",
         f"hydra.run.dir={run}"],
        tmp_path,
        env={"DCC_DATA_ROOT": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert "Reg DSC mean" in proc.stdout
