"""The trained network as a registration method (issue #21): ``dcc-register --method dcc``,
whole 3D short-axis stacks slice by slice, sequences by name, and the shipped cardiac model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_runs import tiny_checkpoint, write_myops_case

from dcc.cli.register import main as dcc_register
from dcc.data.cardiac import merge_labels
from dcc.lit import predict
from dcc.models import model_card, shipped_checkpoint


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """C0/LGE/T2 short-axis stacks (5 slices of 48 x 48 at 2 x 2 x 8 mm) and their labels."""
    folder = tmp_path_factory.mktemp("stack")
    case = write_myops_case(folder, "P", shape=(5, 48, 48))
    images = [str(case / f"P_{s}.nii.gz") for s in ("C0", "LGE", "T2")]
    raw = sitk.ReadImage(str(case / "P_gd.nii.gz"))  # MyoPS values -> the model's classes
    merged = sitk.GetImageFromArray(merge_labels(sitk.GetArrayFromImage(raw)).numpy()
                                    .astype(np.int16))
    merged.CopyInformation(raw)
    sitk.WriteImage(merged, str(folder / "P_labels.nii.gz"))
    return images, str(folder / "P_labels.nii.gz")


def _register(capsys, *args) -> tuple[int, str, str]:
    code = dcc_register([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_whole_stacks_give_3d_results_on_the_stack_grid(
    stack, tmp_path_factory, tmp_path, capsys, monkeypatch
):
    """Every slice is a 2D group of one batch; the results are 3D volumes with the stack's
    slices, the through-plane displacement is zero, and slices without a heart are named."""
    images, labels = stack
    ckpt = tiny_checkpoint(tmp_path_factory)
    monkeypatch.setattr(predict, "MIN_HEART_VOXELS", 0)  # the tiny net finds no heart
    out = tmp_path / "out"
    code, stdout, err = _register(capsys, *images, "--method", "dcc", "--checkpoint", ckpt,
                                  "--labels", labels, labels, labels, "--out", out, "--quiet")
    assert code == 0, err
    assert "registered and segmented by the DCC network" in stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["tool"] == "dcc-register" and len(report["slices"]) == 5
    assert all(s["heart"] for s in report["slices"])
    # the challenge metrics beside the Dice: the stacks' labels coincide before registration
    before = report["surface_distance_before_mm"]
    assert before["hd95"]["mean"] == 0.0 and before["asd"]["mean"] == 0.0
    assert report["dice_before"]["mean"] == 1.0
    assert report["surface_distance_after_mm"]["hd95"]["mean"] > 0
    source = sitk.ReadImage(images[0])
    for name in ("segmentation.nii.gz", "warped/P_C0.nii.gz"):
        written = sitk.ReadImage(str(out / name))
        assert written.GetDimension() == 3 and written.GetSize()[2] == source.GetSize()[2]
        assert written.GetSpacing()[2] == pytest.approx(source.GetSpacing()[2])
        assert np.allclose(written.GetOrigin(), source.GetOrigin())
    field = sitk.GetArrayFromImage(
        sitk.ReadImage(str(out / "transforms/P_LGE_displacement.nii.gz")))
    assert field.shape[-1] == 3
    assert np.abs(field[..., 2]).max() < 1e-4  # no through-plane motion
    assert np.abs(field[..., :2]).max() > 0.01  # the (randomised) network moves in-plane
    # a heart threshold no slice reaches: every slice keeps a zero field and is named
    monkeypatch.setattr(predict, "MIN_HEART_VOXELS", 10**9)
    code, _, err = _register(capsys, *images, "--method", "dcc", "--checkpoint", ckpt,
                             "--out", tmp_path / "none", "--quiet")
    assert code == 0 and "no heart found" in err and "[0, 1, 2, 3, 4]" in err
    field = sitk.GetArrayFromImage(
        sitk.ReadImage(str(tmp_path / "none/transforms/P_LGE_displacement.nii.gz")))
    assert np.abs(field).max() < 1e-4


def test_the_stack_batch_equals_slice_by_slice(stack, tmp_path_factory):
    """The batched stack gives each slice what the 2D group of that slice alone gives."""
    from dcc.lit.checkpoints import load_checkpoint

    model = load_checkpoint(str(tiny_checkpoint(tmp_path_factory)))
    torch.manual_seed(0)
    images = torch.randn(3, 4, 32, 32)
    whole = predict.predict_stack(model, images, [0, 1, 2])
    for z in range(4):
        single = predict.predict_group(model, images[:, z], [0, 1, 2])
        if whole["slices"][z]["heart"]:
            torch.testing.assert_close(whole["displacement"][:, :2, z], single["displacement"],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(whole["posterior"][:, z], single["posterior"],
                                       atol=1e-5, rtol=1e-4)


def test_refusals_name_the_option(stack, tmp_path_factory, tmp_path, capsys):
    images, _ = stack
    ckpt = str(tiny_checkpoint(tmp_path_factory))
    common = ["--method", "dcc", "--checkpoint", ckpt, "--out", str(tmp_path / "o")]
    for extra, needle in [
        (["--sequences", "C0", "T1map", "T2"], "--sequences: ['T1map'] not among"),
        (["--sequences", "C0", "LGE"], "--sequences: got 2 names for 3 images"),
        (["--stages", "rigid"], "--stages: an X-CoReg option, not used by --method dcc"),
        (["--refine", "-1"], "--refine -1"),
    ]:
        code, _, err = _register(capsys, *images, *common, *extra)
        assert code == 2 and needle in err, err
        assert not (tmp_path / "o").exists()
    code, _, err = _register(capsys, *images, "--out", str(tmp_path / "o"), "--checkpoint", ckpt)
    assert code == 2 and "--checkpoint: needs --method dcc" in err
    code, _, err = _register(capsys, *images, "--method", "dcc", "--checkpoint",
                             str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "--checkpoint" in err and "not found" in err


def test_sequences_in_another_order(stack, tmp_path_factory, tmp_path, capsys):
    """Images given as T2, C0, LGE with their names: each gets its own sequence's domain."""
    images, _ = stack
    ckpt = str(tiny_checkpoint(tmp_path_factory))
    reordered = [images[2], images[0], images[1]]
    code, _, err = _register(capsys, *reordered, "--method", "dcc", "--checkpoint", ckpt,
                             "--sequences", "T2", "C0", "LGE", "--out", tmp_path / "o",
                             "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text(encoding="utf-8"))
    assert report["sequences"] == ["T2", "C0", "LGE"]


def test_the_shipped_model_is_found_and_described():
    path = shipped_checkpoint()
    assert path.is_file() and path.stat().st_size < 8 * 2**20
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) >= {"state_dict", "hyper_parameters"}
    assert checkpoint["hyper_parameters"]["sequences"] == ["C0", "LGE", "T2"]
    card = model_card()
    for needle in ("MyoPS", "init_from=", "Reg DSC", "python train.py"):
        assert needle in card


def test_exported_model_predicts_like_its_training_checkpoint(tmp_path_factory, tmp_path):
    """export_model keeps the network and drops the optimiser: half the size or less, and the
    same fields and segmentation up to half precision."""
    from dcc.lit.checkpoints import export_model, load_checkpoint

    source = tiny_checkpoint(tmp_path_factory)
    small = tmp_path / "small.pt"
    export_model(str(source), str(small), command="test")
    assert small.stat().st_size < 0.5 * source.stat().st_size
    saved = torch.load(small, weights_only=True)
    assert "optimizer_states" not in saved and saved["provenance"]["command"] == "test"
    assert saved["state_dict"]["net.encoder.0.convs.0.weight"].dtype == torch.float16
    torch.manual_seed(0)
    images = torch.randn(3, 32, 32)
    full = predict.predict_group(load_checkpoint(str(source)), images, [0, 1, 2])
    half = predict.predict_group(load_checkpoint(str(small)), images, [0, 1, 2])
    torch.testing.assert_close(half["displacement"], full["displacement"], atol=2e-2, rtol=0)
    assert (half["posterior"].argmax(0) == full["posterior"].argmax(0)).float().mean() > 0.98


def test_a_wheel_carries_the_shipped_model(tmp_path):
    """``pip install .`` (not editable) installs the model and its card with the package."""
    import subprocess
    import sys
    import zipfile

    from tiny_runs import ROOT

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("dcc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dcc/models/dcc_all_myops.pt", "dcc/models/README.md"} <= names


def test_predict_mode_without_a_checkpoint_uses_the_shipped_model(stack, tmp_path):
    images, labels = stack
    report = predict.run_prediction({"predict": {
        "inputs": images, "labels": [labels] * 3, "out": str(tmp_path / "out")}})
    assert report["checkpoint"] == str(shipped_checkpoint().resolve())
    assert report["model"]["net"]["channels"] == 16 and len(report["slices"]) == 5
    assert (tmp_path / "out" / "segmentation.nii.gz").is_file()
