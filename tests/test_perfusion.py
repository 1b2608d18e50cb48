"""The cardiac perfusion series (dcc.data.perfusion) and its motion-correction bench
(bench/bench_perfusion.py), on the shared data (``$DCC_DATA_ROOT/perfusion_cardiac``; skipped
with the reason when absent) and on small copies of it in ``tmp_path``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_runs import load_bench

from dcc.data.cardiac import data_root
from dcc.data.io import InputError
from dcc.data.perfusion import (
    FOLDER,
    MASK_FILE,
    frame_files,
    load_perfusion,
    moving_series,
    preprocess,
    region_of_interest,
)

ROOT = data_root()
SOURCE = None if ROOT is None else ROOT / FOLDER


def _skip_reason() -> str | None:
    if ROOT is None:
        return "real data not found: set DCC_DATA_ROOT (CI uses ../shared/data)"
    if not (SOURCE / "frames").is_dir() or not (SOURCE / MASK_FILE).is_file():
        return f"real data folder {ROOT} lacks {FOLDER}/frames or {FOLDER}/{MASK_FILE}"
    return None


pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def _instance(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(reader.GetMetaData("0020|0013"))


def _copy(root: Path, names: dict[str, str]) -> Path:
    """A data root holding ``perfusion_cardiac`` with the source frames ``names`` (source name
    -> name of the copy) and the mask file."""
    folder = root / FOLDER
    (folder / "frames").mkdir(parents=True)
    for source, copy in names.items():
        shutil.copyfile(SOURCE / "frames" / source, folder / "frames" / copy)
    shutil.copyfile(SOURCE / MASK_FILE, folder / MASK_FILE)
    return root


@pytest.fixture(scope="module")
def series():
    return load_perfusion()


def test_real_series_is_ordered_by_instance_number_with_its_masks(series):
    frames, grid, labels = series
    assert frames.shape == (79, 256, 256) and frames.dtype == torch.float32
    assert grid.shape == (256, 256)
    np.testing.assert_allclose(grid.spacing, 1.406, atol=1e-3)
    numbers = [n for n, _ in frame_files(SOURCE)]
    assert numbers == list(range(2, 81))
    # frame t is the file with the t-th smallest InstanceNumber
    by_number = sorted((SOURCE / "frames").iterdir(), key=_instance)
    for t in (0, 1, 40, 78):
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(by_number[t]))).reshape(256, 256)
        np.testing.assert_array_equal(frames[t].numpy(), raw.astype(np.float32))
    assert frames[:5].std() > 0 and torch.isfinite(frames).all()
    # labels 0 / 1 myocardium / 2 LV / 3 RV, each structure non-empty; the myocardium rings
    # the LV blood pool (the LV's centre lies inside the myocardium's bounding box)
    values, counts = labels.unique(return_counts=True)
    assert values.tolist() == [0, 1, 2, 3] and (counts[1:] > 300).all()
    lv = torch.nonzero(labels == 2).float().mean(0)
    myo = torch.nonzero(labels == 1).float()
    assert (myo.amin(0) < lv).all() and (lv < myo.amax(0)).all()
    # the contrast passage in InstanceNumber order: the RV brightens first (frame 10), the LV
    # after it (frame 15), as the masks say (a swapped mask or order would fail)
    def mean(t, label):
        return frames[t][labels == label].mean()

    assert mean(10, 3) > 2 * mean(0, 3) and mean(10, 2) < 1.3 * mean(0, 2)
    assert mean(15, 2) > 3 * mean(0, 2) and mean(15, 2) > 2 * mean(15, 1)
    head = load_perfusion(frames=6)[0]
    assert torch.equal(head, frames[:6])


def test_order_comes_from_instance_number_not_file_names(tmp_path):
    # copies named so that their alphabetical order is the reverse of the InstanceNumbers
    names = {"I01": "Z", "I02": "Y", "I03": "X", "I04": "W"}
    root = _copy(tmp_path, names)
    frames, _, _ = load_perfusion(root)
    originals = load_perfusion(frames=4)[0]
    assert torch.equal(frames, originals)
    assert [p.name for _, p in frame_files(root / FOLDER)] == ["Z", "Y", "X", "W"]


def test_missing_or_corrupt_files_raise_input_error_naming_them(tmp_path, monkeypatch):
    root = _copy(tmp_path / "a", {"I01": "I01", "I02": "I02", "I03": "I03"})
    folder = root / FOLDER
    (folder / "frames" / "I02").write_bytes(b"not a dicom file" * 10)
    with pytest.raises(InputError, match="I02"):
        load_perfusion(root)
    shutil.copyfile(SOURCE / "frames" / "I02", folder / "frames" / "I02")
    assert load_perfusion(root)[0].shape == (3, 256, 256)  # repaired
    (folder / MASK_FILE).write_bytes(b"MATLAB 5.0 garbage")
    with pytest.raises(InputError, match=MASK_FILE):
        load_perfusion(root)
    (folder / MASK_FILE).unlink()
    with pytest.raises(InputError, match=MASK_FILE):
        load_perfusion(root)
    # a mask file without the myocardium
    from scipy.io import loadmat, savemat

    masks = {k: v for k, v in loadmat(SOURCE / MASK_FILE).items() if not k.startswith("__")}
    savemat(folder / MASK_FILE, {k: v for k, v in masks.items() if k != "MyoMask"})
    with pytest.raises(InputError, match=f"{MASK_FILE}: no variable MyoMask"):
        load_perfusion(root)
    # two frames with the same InstanceNumber
    shutil.copyfile(SOURCE / MASK_FILE, folder / MASK_FILE)
    shutil.copyfile(SOURCE / "frames" / "I01", folder / "frames" / "I01b")
    with pytest.raises(InputError, match="InstanceNumber 2 repeats"):
        load_perfusion(root)
    # no folder at all: the message names it
    monkeypatch.setenv("DCC_DATA_ROOT", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=FOLDER):
        load_perfusion()


def test_known_motion_preprocessing_and_roi(series):
    frames, grid, labels = series
    group, inside = moving_series(frames[:5], labels, grid, seed=3)
    again, _ = moving_series(frames[:5], labels, grid, seed=3)
    other, _ = moving_series(frames[:5], labels, grid, seed=4)
    assert torch.equal(group.images, again.images)  # seeded
    assert not torch.equal(group.images, other.images)
    # the labels moved with the frames: each moved label map differs from the gold standard,
    # and the gold standard warped by the truth is what the group holds
    from dcc.data.misalignment import warp_images

    assert all((group.labels[j] != labels).any() for j in range(5))
    torch.testing.assert_close(
        group.labels, warp_images(labels.expand(5, 256, 256), grid, group.truth, mode="nearest"))
    assert inside.shape == (5, 256, 256) and 0.9 < inside.mean() < 1.0
    x = preprocess(group.images)
    torch.testing.assert_close(x.mean((1, 2)), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((1, 2), unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    roi = region_of_interest(labels, 10)
    heart = (labels == 1) | (labels == 2)
    assert roi[heart].all() and roi.sum() > heart.sum() + 1000
    assert not roi[0].any()  # far from the heart


# ---------------------------------------------------------------------- the bench


def test_bench_without_data_names_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCC_DATA_ROOT", str(tmp_path))
    assert load_bench("bench_perfusion").main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and FOLDER in err
    assert not (tmp_path / "out").exists()


def test_bench_runs_end_to_end_on_six_frames(tmp_path, monkeypatch):
    root = _copy(tmp_path / "data", {f"I{t:02d}": f"I{t:02d}" for t in range(1, 7)})
    monkeypatch.setenv("DCC_DATA_ROOT", str(root))
    out = tmp_path / "out"
    argv = ["--frames", "6", "--trials", "1", "--seed", "1", "--methods", "xcoreg", "vi",
            "--iterations", "3", "3", "3", "--levels", "1", "1", "1", "--real-frames", "4",
            "--vi-bending-weight", "0.0001", "--threads", "1", "--out", str(out), "--tag", "t"]
    assert load_bench("bench_perfusion").main(argv) == 0
    payload = json.loads((out / "t.json").read_text(encoding="utf-8"))
    records = payload["records"]
    assert [(r["method"], r["seed"]) for r in records] == [("xcoreg", 1), ("vi", 1)]
    for r in records:
        values = [r["dice_before"], r["dice_translation"], r["dice_rigid"], r["dice_ffd"]]
        assert all(0 < v <= 1 for v in values), r
        assert r["seconds_translation"] <= r["seconds_rigid"] <= r["seconds_ffd"]
        assert r["peak_rss_mb"] > 100  # the worker process's own peak
    assert records[0]["dice_before"] == records[1]["dice_before"]  # the same motion
    tables = payload["tables"]
    for model in ("translation", "rigid", "ffd"):
        rows = tables[model]
        assert [row["method"] for row in rows] == ["xcoreg", "vi"]
        assert rows[0]["mean"] == pytest.approx(records[0][f"dice_{model}"])
        assert rows[1]["mean"] == pytest.approx(records[1][f"dice_{model}"])
        assert "below_start" in rows[1]
    assert tables["unregistered"]["mean"] == pytest.approx(records[0]["dice_before"])
    real = tables["real_series"]
    assert real["frames"] == 4 and [s["model"] for s in real["stages"]] == [
        "translation", "rigid", "ffd"]
    assert all(math.isfinite(v) for v in real["temporal_roughness"].values())
    settings = payload["settings"]
    assert "bench_perfusion.py" in settings["command"] and settings["vi_bending_weight"] == 1e-4
    assert settings["configs"]["vi"]["bending_weight"] == 1e-4
    assert settings["configs"]["xcoreg"]["bending_weight"] == 0.01
    assert settings["configs"]["xcoreg"]["num_classes"] == 6
    md = (out / "t.md").read_text(encoding="utf-8")
    assert "| X-CoReg |" in md and "| VI |" in md and "Hardware:" in md and "nan" not in md
    for name in ("t_dice.png", "t_montage.png", "t_cross_section.png"):
        assert (out / name).stat().st_size > 5_000, name


def test_strip_option_drops_the_methods_list_only():
    from dcc.evaluation.processes import strip_option

    argv = ["--frames", "6", "--methods", "xcoreg", "vi", "--trials", "2", "--methods", "cg"]
    assert strip_option(argv, "--methods") == ["--frames", "6", "--trials", "2"]
    assert strip_option(["--out", "x"], "--methods") == ["--out", "x"]
