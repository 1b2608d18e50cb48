"""Predict mode (``evaluate.py mode=predict``): the user's own files on their own grids, the
dcc-register layout file by file, ITK-convention fields, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_runs import run_script, tiny_checkpoint

from dcc.data.cardiac_phantom import cardiac_phantom
from dcc.data.io import resample_to_grid, write_image
from dcc.evaluation.outdir import MANIFEST
from dcc.lit.predict import main, run_prediction
from dcc.spatial.grid import Grid

NAMES = ("C0", "LGE", "T2")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The phantom's three sequences, each on its own grid (a finer one, a shifted and rotated
    one), with their label maps."""
    folder = tmp_path_factory.mktemp("files")
    phantom = cardiac_phantom(image_size=32, fov=150.0, seed=3)
    grid = Grid.from_shape((32, 32), phantom.spacing)
    c, s = np.cos(0.2), np.sin(0.2)
    grids = [
        grid,
        Grid.from_shape((40, 40), 150.0 / 40, origin=(1.0, -2.0)),
        Grid((32, 32), phantom.spacing, (12.0, -10.0), (c, -s, s, c)),
    ]
    images, labels = [], []
    for name, image, target in zip(phantom.names, phantom.images, grids, strict=True):
        images.append(str(folder / f"{name}.nii.gz"))
        labels.append(str(folder / f"{name}_gt.nii.gz"))
        write_image(images[-1], resample_to_grid(image, grid, target)[0] + 0.01, target)
        lab = resample_to_grid(phantom.labels, grid, target, mode="nearest")[0]
        write_image(labels[-1], lab.to(torch.int32), target)
    volume = folder / "volume.nii.gz"
    write_image(volume, torch.rand(4, 32, 32), Grid.from_shape((4, 32, 32), 2.0))
    # 3-slice stacks (slice k = the 2D image) on a 3D grid, as short-axis volumes come
    stack = Grid.from_shape((3, 32, 32), (*phantom.spacing, 10.0))
    for name, image in zip(phantom.names, phantom.images, strict=True):
        write_image(folder / f"{name}_stack.nii.gz", image.expand(3, -1, -1) + 0.01, stack)
        write_image(
            folder / f"{name}_stack_gt.nii.gz", phantom.labels.expand(3, -1, -1).int(), stack
        )
    return images, labels, volume


def cfg(ckpt, out, inputs, **predict):
    out = None if out is None else str(out)
    return {"ckpt_path": str(ckpt), "predict": {"inputs": list(inputs), "out": out, **predict}}


def layout(names, labels: bool) -> set[str]:
    """The files dcc-register writes for a non-linear registration."""
    files = {MANIFEST, "montage.png", "posterior.nii.gz", "report.json", "segmentation.nii.gz"}
    for n in names:
        files |= {f"warped/{n}.nii.gz", f"transforms/{n}_displacement.nii.gz"}
        if labels:
            files.add(f"labels/{n}.nii.gz")
    return files


def written(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_predict_command_writes_the_register_layout(tmp_path, ckpt, files):
    images, labels, _ = files
    out = tmp_path / "out"
    proc = run_script(
        "evaluate.py",
        [
            "mode=predict",
            f"ckpt_path={ckpt}",
            f"predict.inputs=[{','.join(images)}]",
            f"predict.labels=[{','.join(labels)}]",
            f"predict.out={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 images (C0, LGE, T2) registered and segmented" in proc.stdout
    assert "mean Dice of the labels" in proc.stdout
    assert written(out) == layout(NAMES, labels=True)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["sequences"] == list(NAMES) and report["names"] == list(NAMES)
    assert report["images"] == images and report["labels"] == labels
    assert set(report["dice_after"]) == {"per_label", "mean", "pairs"}
    assert report["model"]["sequences"] == list(NAMES)
    # the common grid: the first image's field of view at the checkpoint's spacing
    common = Grid(**{k: tuple(v) for k, v in report["common_grid"].items()})
    assert common.spacing == pytest.approx(report["model"]["spacing"])
    assert common.origin == pytest.approx((0.0, 0.0))
    for rel in written(out):
        if not rel.endswith(".nii.gz"):
            continue
        image = sitk.ReadImage(str(out / rel))
        assert Grid.from_sitk(image).same_geometry(common), rel  # geometry kept in the header
        components = image.GetNumberOfComponentsPerPixel()
        expected = {"posterior.nii.gz": 4}.get(rel, 2 if "displacement" in rel else 1)
        assert components == expected, rel
        array = sitk.GetArrayFromImage(image)
        assert np.isfinite(array).all(), rel
        if rel.startswith("labels/") or rel == "segmentation.nii.gz":
            assert array.dtype.kind in "iu" and set(np.unique(array)) <= {0, 1, 2, 3}, rel
    posterior = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "posterior.nii.gz")))
    np.testing.assert_allclose(posterior.sum(-1), 1.0, atol=1e-4)
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    np.testing.assert_array_equal(segmentation, posterior.argmax(-1))
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fields_follow_itk_convention(tmp_path, ckpt, files):
    """ITK's DisplacementFieldTransform with the written field maps the common grid into each
    original file and reproduces the warped image (phi_j: common space -> image j, mm)."""
    images, _, _ = files
    out = tmp_path / "out"
    report = run_prediction(cfg(ckpt, out, images, grid="image"))
    assert report["common_grid"]["shape"] == [32, 32]
    moved = 0.0
    for path, name in zip(images, NAMES, strict=True):
        field = sitk.ReadImage(
            str(out / "transforms" / f"{name}_displacement.nii.gz"), sitk.sitkVectorFloat64
        )
        moved = max(moved, np.abs(sitk.GetArrayFromImage(field)).max())
        reference = sitk.ReadImage(str(out / "warped" / f"{name}.nii.gz"))
        moving = sitk.ReadImage(path, sitk.sitkFloat64)
        transform = sitk.DisplacementFieldTransform(field)
        expected = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0)
        # compare where phi_j(x) falls between voxels of the file (the two differ at its edge)
        ones = np.pad(np.ones(np.array(moving.GetSize()[::-1]) - 2), 1)
        inner = sitk.GetImageFromArray(ones)
        inner.CopyInformation(moving)
        inside = (
            sitk.GetArrayFromImage(sitk.Resample(inner, reference, transform, sitk.sitkLinear, 0.0))
            > 1 - 1e-9
        )
        assert inside.mean() > 0.5
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(expected)[inside],
            sitk.GetArrayFromImage(reference)[inside],
            atol=1e-3,
        )
    assert moved > 0.1  # mm: the (randomised) network does move the images


def test_sequences_by_name_any_number(tmp_path, ckpt, files):
    images, _, _ = files
    report = run_prediction(
        cfg(ckpt, tmp_path / "a", [images[1], images[0]], sequences=["LGE", "C0"])
    )
    assert report["sequences"] == ["LGE", "C0"] and report["names"] == ["LGE", "C0"]
    four = [images[0], images[0], images[1], images[2]]
    report = run_prediction(cfg(ckpt, tmp_path / "b", four, sequences=["C0", "C0", "LGE", "T2"]))
    assert report["names"] == ["00_C0", "01_C0", "02_LGE", "03_T2"]
    assert written(tmp_path / "b") == layout(report["names"], labels=False)


def _fails(capsys, config, *needles):
    with pytest.raises(SystemExit) as exit_info:
        main(config)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluate.py mode=predict: error: ")
    for needle in needles:
        assert needle in err
    assert config["predict"]["out"] is None or not Path(config["predict"]["out"]).exists()
    return err


def test_missing_file_exits_2_with_one_line(tmp_path, ckpt, files):
    images, _, _ = files
    out = tmp_path / "out"
    missing = str(tmp_path / "nowhere.nii.gz")
    proc = run_script(
        "evaluate.py",
        [
            "mode=predict",
            f"ckpt_path={ckpt}",
            f"predict.inputs=[{images[0]},{missing}]",
            f"predict.out={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"evaluate.py mode=predict: error: {missing}: file not found"
    ]
    assert not out.exists()


def test_bad_inputs(tmp_path, capsys, ckpt, files):
    images, labels, volume = files
    out = tmp_path / "out"
    _fails(capsys, cfg(ckpt, out, [images[0], volume]), str(volume), "3D", "2D model")
    _fails(capsys, cfg(ckpt, out, images[:1]), "at least 2 images")
    _fails(capsys, cfg(ckpt, out, images, labels=labels[:2]), "predict.labels", "2 label maps")
    _fails(capsys, cfg(ckpt, out, images + images[:1]), "4 images", "predict.sequences")
    _fails(
        capsys,
        cfg(ckpt, out, images, sequences=["C0", "FLAIR", "T2"]),
        "['FLAIR']",
        "trained for",
        "['C0', 'LGE', 'T2']",
    )
    _fails(capsys, cfg(ckpt, None, images), "predict.out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit):
        main(cfg(ckpt, tmp_path / "taken", images))
    assert "predict.out=" in capsys.readouterr().err
    assert (tmp_path / "taken" / "mine.txt").read_text(encoding="utf-8") == "user data"


def test_bad_checkpoints(tmp_path, capsys, ckpt, files):
    images, _, _ = files
    out = tmp_path / "out"
    _fails(capsys, cfg(tmp_path / "none.ckpt", out, images), "none.ckpt", "not found")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    _fails(capsys, cfg(garbage, out, images), "garbage.ckpt", "cannot read the checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "epoch": 1}, other)
    _fails(capsys, cfg(other, out, images), "other.ckpt", "not a DCC checkpoint")
    # a checkpoint of another configuration: its weights do not fit its stated network
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["net"] = {**checkpoint["hyper_parameters"]["net"], "channels": 8}
    torch.save(checkpoint, other)
    _fails(capsys, cfg(other, out, images), "other.ckpt", "not a DCC model checkpoint")
    # trained for other sequences
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["sequences"] = ["T1", "T2", "FLAIR"]
    checkpoint["hyper_parameters"]["strategy"]["labelled_sequences"] = ["T1"]
    torch.save(checkpoint, other)
    _fails(
        capsys,
        cfg(other, out, images, sequences=list(NAMES)),
        "['C0', 'LGE']",
        "['T1', 'T2', 'FLAIR']",
    )


def test_slice_of_3d_stacks_with_a_2d_model(tmp_path, capsys, ckpt, files):
    folder = Path(files[2]).parent
    stacks = [str(folder / f"{n}_stack.nii.gz") for n in NAMES]
    labels = [str(folder / f"{n}_stack_gt.nii.gz") for n in NAMES]
    report = run_prediction(cfg(ckpt, tmp_path / "a", stacks, labels=labels, slice=1))
    assert report["names"] == [f"{n}_stack" for n in NAMES]
    assert len(report["common_grid"]["shape"]) == 2
    assert report["dice_before"]["mean"] == 1.0  # the stacks' labels are aligned
    assert written(tmp_path / "a") == layout(report["names"], labels=True)
    _fails(capsys, cfg(ckpt, tmp_path / "b", stacks, slice=3), "predict.slice 3", "3 slices")
    # without a slice the whole stacks (issue #21): 3D results, one entry per slice
    whole = run_prediction(cfg(ckpt, tmp_path / "c", stacks, labels=labels))
    assert len(whole["common_grid"]["shape"]) == 3 and len(whole["slices"]) == 3
    assert whole["dice_before"]["mean"] == 1.0
    # a 2D image among 3D stacks is neither
    images = files[0]
    _fails(capsys, cfg(ckpt, tmp_path / "b", [stacks[0], images[1], stacks[2]]), "3D",
           "give every image as a 3D stack, or pick a slice")


def test_overlap_refusal_names_this_modes_setting(tmp_path, capsys, ckpt, files):
    """A group whose images do not overlap is refused naming predict.min_initial_overlap (the
    setting of this mode), not dcc-register's option."""
    images, _, _ = files
    array = sitk.GetArrayFromImage(sitk.ReadImage(images[1]))
    far = tmp_path / "far.nii.gz"
    write_image(far, array, Grid.from_shape(array.shape, 150.0 / 40, origin=(500.0, 0.0)))
    _fails(capsys, cfg(ckpt, tmp_path / "out", [images[0], str(far)]), str(far),
           "covers only", "(predict.min_initial_overlap)")
