"""dcc-register end to end: geometry round trip, ITK-compatible transforms, bad input."""

import dataclasses
import importlib.resources
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dcc.cli.register import main
from dcc.coreg import XCoReg
from dcc.coreg.engine import CoRegResult
from dcc.data.io import write_image
from dcc.data.misalignment import misaligned_phantom
from dcc.evaluation.outdir import MANIFEST
from dcc.spatial.grid import Grid


def oblique(grid: Grid, angle: float = 0.3, origin=(12.5, -30.0)) -> Grid:
    c, s = np.cos(angle), np.sin(angle)
    return Grid(grid.shape, grid.spacing, origin, (c, -s, s, c))


@pytest.fixture(scope="module")
def group_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    group = misaligned_phantom(dim=2, downsample=4, magnitude=4.0, spacing=40.0, seed=2)
    grid = oblique(group.grid)
    paths, labels = [], []
    for name, image, lab in zip(group.names, group.images, group.labels, strict=True):
        paths.append(str(folder / f"{name}.nii.gz"))
        labels.append(str(folder / f"{name}_seg.nii.gz"))
        write_image(paths[-1], image, grid)
        write_image(labels[-1], lab.to(torch.int32), grid)
    return paths, labels, grid


def register(tmp_path, *args, quiet=True):
    out = tmp_path / "out"
    code = main([*map(str, args), "--out", str(out), *["--quiet"] * quiet])
    return code, out


def resample_with(transform, moving_path, reference_path):
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat64)
    reference = sitk.ReadImage(str(reference_path))
    out = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(reference)


def test_linear_stages_round_trip(tmp_path, group_files, capsys):
    paths, labels, grid = group_files
    code, out = register(
        tmp_path, *paths, "--labels", *labels, "--stages", "translation,rigid", "--iterations", "15"
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    dice = f"{report['dice_before']['mean']:.3f} -> {report['dice_after']['mean']:.3f}"
    assert f"dcc-register: mean Dice of the labels {dice}" in capsys.readouterr().out
    assert (
        report["initial_overlap"]["all"] > 0.5 and len(report["initial_overlap"]["per_image"]) == 3
    )
    assert [s["name"] for s in report["stages"]] == ["translation", "rigid"]
    assert report["wall_time_s"] > 0 and report["peak_memory_mb"] > 0
    assert np.isfinite(report["x_metric"])
    assert report["dice_after"]["mean"] > 0
    for path in paths:
        name = path.split("/")[-1].replace(".nii.gz", "")
        warped_path = out / "warped" / f"{name}.nii.gz"
        # geometry of the common space (the first image's oblique grid) is preserved
        assert Grid.from_sitk(sitk.ReadImage(str(warped_path))).same_geometry(grid, tol=1e-4)
        np.testing.assert_allclose(
            nib.load(warped_path).affine, nib.load(paths[0]).affine, atol=1e-4
        )
        # the ITK transform file and the displacement field reproduce the warped image
        affine = sitk.ReadTransform(str(out / "transforms" / f"{name}.tfm"))
        expected, warped = resample_with(affine, path, warped_path)
        np.testing.assert_allclose(expected[2:-2, 2:-2], warped[2:-2, 2:-2], atol=1e-3)
        assert not (out / "transforms" / f"{name}_displacement.nii.gz").exists()  # linear
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels" / f"{name}.nii.gz")))
        assert np.issubdtype(seg.dtype, np.integer) and set(np.unique(seg)) <= {0, 1, 2, 3}
    posterior = sitk.ReadImage(str(out / "posterior.nii.gz"))
    assert posterior.GetNumberOfComponentsPerPixel() == report["settings"]["num_classes"]
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ffd_displacement_field_reproduces_warp(tmp_path, group_files, capsys):
    paths, _, _ = group_files
    code, out = register(
        tmp_path,
        *paths,
        "--preset",
        "brain2d",  # the group is the brain phantom
        "--stages",
        "ffd",
        "--iterations",
        "10",
        "--ffd-spacing",
        "40",
        "--reference",
        "0",
        quiet=False,
    )
    assert code == 0
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal
    assert not list((out / "transforms").glob("*.tfm"))  # non-linear: field only
    for path in paths[1:]:
        name = path.split("/")[-1].replace(".nii.gz", "")
        field = sitk.ReadImage(
            str(out / "transforms" / f"{name}_displacement.nii.gz"), sitk.sitkVectorFloat64
        )
        assert np.abs(sitk.GetArrayFromImage(field)).max() > 1e-3
        expected, warped = resample_with(
            sitk.DisplacementFieldTransform(field), path, out / "warped" / f"{name}.nii.gz"
        )
        np.testing.assert_allclose(expected[2:-2, 2:-2], warped[2:-2, 2:-2], atol=1e-3)
    # the reference does not move
    field = sitk.ReadImage(str(out / "transforms" / "T1_displacement.nii.gz"))
    assert np.abs(sitk.GetArrayFromImage(field)).max() < 1e-5


def test_3d_images_on_different_grids(tmp_path):
    group = misaligned_phantom(dim=3, downsample=8, kind="rigid", magnitude=4.0, seed=1)
    first = tmp_path / "a.nii.gz"
    write_image(first, group.images[0], group.grid)
    # the second image on a coarser, shifted grid: it is resampled onto the first's grid
    coarse = Grid(
        group.grid.downsample(2).shape,
        group.grid.downsample(2).spacing,
        tuple(o + 3.0 for o in group.grid.origin),
        group.grid.direction,
    )
    from dcc.data.io import resample_to_grid

    second_image, _ = resample_to_grid(group.images[1], group.grid, coarse)
    second = tmp_path / "b.nii.gz"
    write_image(second, second_image, coarse)
    code, out = register(tmp_path, first, second, "--stages", "rigid", "--iterations", "6")
    assert code == 0
    for name in ("a", "b"):
        warped = sitk.ReadImage(str(out / "warped" / f"{name}.nii.gz"))
        assert Grid.from_sitk(warped).same_geometry(group.grid, tol=1e-4)
        transform = sitk.ReadTransform(str(out / "transforms" / f"{name}.tfm"))
        expected, actual = resample_with(
            transform, str(tmp_path / f"{name}.nii.gz"), out / "warped" / f"{name}.nii.gz"
        )
        np.testing.assert_allclose(expected[2:-2, 2:-2, 2:-2], actual[2:-2, 2:-2, 2:-2], atol=1e-3)


def test_phantom_demo(tmp_path):
    code, out = register(tmp_path, "--phantom", "2", "--iterations", "3")
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["gwi_before_mm"] > 2.0 and np.isfinite(report["gwi_after_mm"])
    assert len(list((out / "inputs").glob("*.nii.gz"))) == 6
    # report.json names the inputs where they are now, not in the deleted temporary folder
    for path in report["images"] + report["labels"]:
        assert Path(path).is_file() and Path(path).parent == (out / "inputs").resolve()
    engine_fields = {f.name for f in dataclasses.fields(CoRegResult)}
    assert ("diagnostics" in report) == ("diagnostics" in engine_fields)


# ---------------------------------------------------------------------- bad input
SIZE = 32


def blob(shift: float = 0.0) -> np.ndarray:
    """A smooth 32x32 image: two Gaussian blobs on a ramp (not constant, registrable)."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    blobs = sum(
        np.exp(-((x - cx - shift) ** 2 + (y - cy) ** 2) / 30) for cx, cy in ((10, 12), (21, 19))
    )
    return (100 * blobs + 0.5 * x).astype(np.float32)


def moved_grid(x: float) -> Grid:
    return Grid((SIZE, SIZE), (1.0, 1.0), (x, 0.0), (1.0, 0.0, 0.0, 1.0))


def write(path, array, grid=None):
    array = np.asarray(array)
    write_image(path, array, grid or Grid.from_shape(array.shape))
    return str(path)


@pytest.fixture
def good(tmp_path):
    folder = tmp_path / "inputs"
    return [write(folder / f"ok{i}.nii.gz", blob(1.5 * i)) for i in range(2)]


def snapshot(root: Path) -> dict:
    """Every folder and file under ``root`` with the bytes of each file."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            found[os.path.join(folder, d)] = None
        for f in files:
            found[os.path.join(folder, f)] = Path(folder, f).read_bytes()
    return found


def expect_error(tmp_path, capsys, args, *fragments, out=None):
    """Exit 2 with one line holding every fragment; nothing written or deleted anywhere under
    ``tmp_path`` and every input byte-for-byte unchanged."""
    before = snapshot(tmp_path)
    out = tmp_path / "result" if out is None else out
    code = main([*map(str, args), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert len(err.splitlines()) == 1 and err.startswith("dcc-register: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(tmp_path) == before
    return err


def test_bad_files(tmp_path, capsys, good):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    nan = blob()
    nan[3, 3] = np.nan
    nan_path = write(tmp_path / "nan.mha", nan)
    constant = write(tmp_path / "constant.nii.gz", np.full((16, 16), 5.0, np.float32))
    labels_other_grid = write(tmp_path / "lab.nii.gz", np.ones((12, 16), np.uint8))
    expect_error(tmp_path, capsys, [good[0], garbage], "garbage.nii.gz", "cannot read")
    expect_error(
        tmp_path, capsys, [good[0], tmp_path / "missing.nii.gz"], "missing.nii.gz", "not found"
    )
    expect_error(tmp_path, capsys, [good[0], nan_path], "nan.mha", "NaN")
    expect_error(tmp_path, capsys, [good[0], constant], "constant.nii.gz", "constant")
    expect_error(
        tmp_path,
        capsys,
        [*good, "--labels", labels_other_grid, labels_other_grid],
        "lab.nii.gz",
        "grid",
    )
    volume = write(tmp_path / "volume.nii.gz", np.random.default_rng(1).random((4, 16, 16)))
    expect_error(tmp_path, capsys, [good[0], volume], "volume.nii.gz", "3D")
    expect_error(tmp_path, capsys, [good[0]], "at least 2 images")
    expect_error(tmp_path, capsys, [*good, "--labels", good[0]], "1 label maps for 2 images")


@pytest.mark.parametrize("dtype", [np.int16, np.float32], ids=["int", "float"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_image_in_2d_group_is_named(tmp_path, capsys, good, dtype, suffix):
    path = tmp_path / f"short{suffix}"
    write(path, (blob() * 10).astype(dtype))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    err = expect_error(tmp_path, capsys, [good[0], path, good[1]], f"{path}: file is truncated")
    assert "ok0" not in err and "ok1" not in err


def test_dicom_time_series_folder(tmp_path, capsys, good):
    from test_io import write_dicom_series  # the same DICOM writer as the reader's tests

    folder = tmp_path / "perfusion"
    folder.mkdir()
    frames = np.stack([blob(k).astype(np.int16) for k in range(4)])
    uid = "1.2.826.0.1.3680043.9.11"
    write_dicom_series(folder, frames, (1.4, 1.4, 8.0), (0.0,) * 3, uid, "I", [0] * 4)
    expect_error(
        tmp_path,
        capsys,
        [folder, good[0]],
        f"{folder}: DICOM series of 4 frames at one slice position (a time series",
        f"pass the frame files as the images, e.g. {folder}/*",
    )


@pytest.mark.parametrize("offset, percent", [(28.0, "12%"), (100.0, "0%")], ids=["strip", "apart"])
def test_images_that_barely_overlap(tmp_path, capsys, good, offset, percent):
    """A 4 mm strip (and disjoint images) are refused, naming the image and the fraction."""
    moved = write(tmp_path / "moved.nii.gz", blob(), moved_grid(offset))
    expect_error(
        tmp_path,
        capsys,
        [good[0], moved],
        f"{moved}: covers only {percent} of the common grid (the grid of {good[0]})",
        "need at least 25% (--min-initial-overlap)",
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lambda", "-1000"], "--lambda -1000.0: must be a finite number >= 0"),
        (["--lambda", "nan"], "--lambda nan: must be a finite number >= 0"),
        (["-K", "1000"], "-K 1000: must be an integer in 2..16"),
        (["-K", "1"], "-K 1: must be an integer in 2..16"),
        (["--bins", "100000"], "--bins 100000: must be an integer in 8..256"),
        (["--lr", "nan"], "--lr nan: must be a number in (0, 10]"),
        (["--lr", "1e9"], "--lr 1000000000.0: must be a number in (0, 10]"),
        (["--lr", "0"], "--lr 0.0: must be a number in (0, 10]"),
        (["--sample-rate", "0"], "--sample-rate 0.0: must be a number in (0, 1]"),
        (["--sample-rate", "1.5"], "--sample-rate 1.5: must be a number in (0, 1]"),
        (["--iterations", "0"], "--iterations 0: must be an integer in 1..100000"),
        (["--levels", "0"], "--levels 0: must be an integer in 1..8"),
        (["--ffd-levels", "9"], "--ffd-levels 9: must be an integer in 1..6"),
        (["--ffd-spacing", "-5"], "--ffd-spacing -5.0: must be a finite number > 0"),
        (["--ffd-spacing", "inf"], "--ffd-spacing inf: must be a finite number > 0"),
        (["--seed", "-1"], "--seed -1: must be an integer in 0..9223372036854775807"),
        (["--threads", "0"], "--threads 0: must be an integer in 1..1024"),
        (["--min-initial-overlap", "2"], "--min-initial-overlap 2.0: must be a number in [0, 1]"),
        (["--reference", "5"], "--reference 5: must be an image index in 0..1"),
        (["--device", "cpu:7"], "--device cpu:7: use cpu, cuda or cuda:<index>"),
        (["--device", "tpu"], "--device tpu: use cpu, cuda or cuda:<index>"),
        (["--stages", ""], "--stages '': give one or more of translation, rigid, affine, ffd"),
        (["--stages", " , "], "--stages ' , ': give one or more of"),
        (["--stages", "rigid,warp"], "--stages rigid,warp: unknown stage 'warp'"),
        (["--preset", "nope"], "unknown preset 'nope'; available: brain2d"),
        (["--method", "xcoreg-gt"], "--method xcoreg-gt needs --labels"),
        # ranges that depend on the 32x32 images, checked after reading them
        (
            ["--stages", "ffd", "--levels", "6"],
            "--levels 6 (stage ffd): the coarsest level would be 1x1 voxels",
        ),
        (
            ["--stages", "ffd", "--levels", "6"],
            "use --levels <= 3 to keep at least 8 voxels along the longest axes",
        ),
        (
            ["--stages", "ffd", "--ffd-spacing", "0.1"],
            "--ffd-spacing 0.1 mm: the control-point spacing must be at",
        ),
        (["--stages", "ffd", "--ffd-spacing", "1e6"], "and at most the grid's extent (31 mm)"),
        (
            ["--stages", "ffd", "--ffd-spacing", "8", "--ffd-levels", "4"],
            "(finest of 4 levels 1 mm)",
        ),
        (["--ffd-spacing", "30", "--stages", "rigid"], "--ffd-spacing 30.0: the settings have no"),
        (["--ffd-levels", "2", "--stages", "rigid"], "add one, e.g. --stages rigid,ffd"),
        (["--sample-rate", "0.001"], "--sample-rate 0.001: samples about 1.0 of the 1024 voxels"),
    ],
)
def test_bad_options(tmp_path, capsys, good, options, message):
    expect_error(tmp_path, capsys, [*good, *options], message)


def test_cuda_device_must_exist(tmp_path, capsys, good):
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        expect_error(tmp_path, capsys, [*good, "--device", f"cuda:{count}"], f"has {count} CUDA")
    else:
        expect_error(tmp_path, capsys, [*good, "--device", "cuda"], "CUDA is not available")


def test_phantom_with_files_or_labels(tmp_path, capsys, good):
    expect_error(tmp_path, capsys, [*good, "--phantom", "2"], "either image files or --phantom")
    expect_error(tmp_path, capsys, ["--phantom", "2", "--labels", *good], "takes none of them")


def test_unknown_option(tmp_path, capsys, good):
    with pytest.raises(SystemExit) as exit_info:
        main([*good, "--out", str(tmp_path / "o"), "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------- the output folder
def test_out_is_current_folder_holding_the_inputs(tmp_path, capsys, good, monkeypatch):
    """The reported data loss: `--out . --overwrite` in the inputs' folder."""
    monkeypatch.chdir(Path(good[0]).parent)
    expect_error(
        tmp_path, capsys, [*good, "--overwrite"], "--out .: is the current folder", out="."
    )
    monkeypatch.chdir(tmp_path / "inputs")
    expect_error(tmp_path, capsys, [*good, "--overwrite"], "contains it", out=tmp_path)


def test_out_holding_the_inputs(tmp_path, capsys, good):
    inputs = Path(good[0]).parent
    for out in (inputs, tmp_path):
        expect_error(
            tmp_path, capsys, [*good, "--overwrite"], f"--out {out}: contains the input", out=out
        )
    expect_error(
        tmp_path, capsys, [*good, "--labels", *good], "contains the input", out=inputs / "x" / ".."
    )
    series = tmp_path / "series"  # a DICOM folder is an input: nothing may be written into it
    series.mkdir()
    (series / "IM0001").write_bytes(b"DICM")
    expect_error(
        tmp_path,
        capsys,
        [series, good[0]],
        f"lies inside the input folder {series}",
        out=series / "r",
    )


def test_out_with_foreign_files_or_not_a_folder(tmp_path, capsys, good):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    expect_error(
        tmp_path, capsys, [*good, "--overwrite"], f"--out {mine}: folder was not written", out=mine
    )
    expect_error(tmp_path, capsys, [*good], f"--out {mine}: folder exists", out=mine)
    a_file = tmp_path / "result.txt"
    a_file.write_text("a file")
    expect_error(tmp_path, capsys, [*good, "--overwrite"], "exists and is not a folder", out=a_file)
    expect_error(tmp_path, capsys, [*good], "cannot write there", out=a_file / "sub" / "out")


def test_overwrite_only_what_it_wrote(tmp_path, capsys, good):
    out = tmp_path / "result"
    fast = ["--stages", "translation", "--iterations", "2", "--quiet"]
    assert main([*good, *fast, "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert "report.json" in manifest["files"] and "warped/ok0.nii.gz" in manifest["files"]
    assert sorted(manifest["files"]) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    # a failed run with --overwrite leaves the earlier results as they were
    moved = write(tmp_path / "far.nii.gz", blob(), moved_grid(500.0))
    expect_error(tmp_path, capsys, [good[0], moved, "--overwrite"], "covers only", out=out)
    # a file the tool did not write blocks --overwrite
    (out / "warped" / "mine.txt").write_text("keep me")
    expect_error(
        tmp_path, capsys, [*good, "--overwrite"], "did not write (warped/mine.txt)", out=out
    )
    (out / "warped" / "mine.txt").unlink()
    capsys.readouterr()
    assert main([*good, *fast, "--out", str(out), "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["stages"][0]["name"] == "translation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.nii.gz", "inputs", "result"]


@pytest.mark.parametrize(
    "signum, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_signal_removes_the_temporary_folder(
    tmp_path, capsys, good, monkeypatch, signum, code, word
):
    """SIGTERM / Ctrl-C during the registration: one line, exit 128 + signal, nothing left."""

    def register(self, *args, **kwargs):
        assert list(tmp_path.glob(".result.*"))  # the temporary folder exists by now
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler runs here
        raise AssertionError("signal not handled")

    def leave(status):  # os._exit would end pytest too
        raise SystemExit(status)

    monkeypatch.setattr(XCoReg, "register", register)
    monkeypatch.setattr(os, "_exit", leave)
    # Python's own handlers, also where the job was started with SIGINT ignored (``nohup &``)
    handler = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    previous = signal.signal(signum, handler)
    before = snapshot(tmp_path)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*good, "--out", str(tmp_path / "result"), "--quiet"])
        assert signal.getsignal(signum) == handler  # handlers restored
    finally:
        signal.signal(signum, previous)
    assert exit_info.value.code == code
    assert capsys.readouterr().err == f"dcc-register: {word}; nothing written\n"
    assert snapshot(tmp_path) == before


def test_ignored_signal_stays_ignored(tmp_path, good, monkeypatch):
    """A signal ignored when dcc-register starts (SIGINT in a background job) is not taken over:
    the run goes on as the caller asked, and the handler is SIG_IGN afterwards."""
    seen = []

    def register(self, *args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        raise SystemExit(3)

    monkeypatch.setattr(XCoReg, "register", register)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit):
            main([*good, "--out", str(tmp_path / "result"), "--quiet"])
        assert seen == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not (tmp_path / "result").exists() and not list(tmp_path.glob(".result.*"))


def test_sigterm_in_a_real_process(tmp_path, good):
    out = tmp_path / "result"
    command = [sys.executable, "-m", "dcc.cli.register", *good, "--iterations", "50000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--out", str(out), "--threads", "1"], stderr=subprocess.PIPE, env=env,
        text=True, encoding="utf-8", errors="replace"
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".result.*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1:] == ["dcc-register: terminated; nothing written"], err
    assert "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_presets_ship_with_the_package():
    """A non-editable install finds the presets: they are package data of dcc.coreg."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    patterns = tomllib.loads(pyproject)["tool"]["setuptools"][
        "package-data"
    ]["dcc.coreg"]
    presets = importlib.resources.files("dcc.coreg") / "presets"
    names = sorted(p.name for p in presets.iterdir() if p.name.endswith(".yaml"))
    assert "brain2d.yaml" in names
    folder = Path(str(presets)).parent
    shipped = {
        p.relative_to(folder).as_posix() for pattern in patterns for p in folder.glob(pattern)
    }
    assert {f"presets/{n}" for n in names} <= shipped


# ---------------------------------------------------------------------- masks and roi
def test_masks_and_roi(tmp_path, capsys, good):
    """--masks (one per image, on its grid) and --roi (common space) reach the engine: the
    report names them, and content outside the roi does not change the result."""
    folder = tmp_path / "inputs"
    box = np.zeros((SIZE, SIZE), np.int32)
    box[6:26, 6:26] = 1
    masks = [write(folder / f"mask{i}.nii.gz", box) for i in range(2)]
    roi = write(folder / "roi.nii.gz", box)
    args = ["--stages", "translation", "--iterations", "8", "--lr", "0.2"]
    code, out = register(tmp_path / "a", *good, "--masks", *masks, "--roi", roi, *args)
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["masks"] == masks and report["roi"] == roi
    assert report["warnings"] == []
    # the same group with noise far outside the roi: the same transforms
    noisy = []
    for i, path in enumerate(good):
        image = nib.load(path).get_fdata().T.copy()  # nibabel (x, y) -> tensor (y, x)
        far = np.ones_like(box, dtype=bool)
        far[2:30, 2:30] = False
        image[far] = np.random.default_rng(i).uniform(0, 300, far.sum())
        noisy.append(write(folder / f"noisy{i}.nii.gz", image.astype(np.float32)))
    code, out_noisy = register(tmp_path / "b", *noisy, "--roi", roi, *args)
    assert code == 0
    noisy_report = json.loads((out_noisy / "report.json").read_text(encoding="utf-8"))
    code, out_plain = register(tmp_path / "c", *good, "--roi", roi, *args)
    plain = json.loads((out_plain / "report.json").read_text(encoding="utf-8"))
    assert noisy_report["x_metric"] == plain["x_metric"]


def test_bad_masks_and_roi(tmp_path, capsys, good):
    folder = tmp_path / "inputs"
    box = np.zeros((SIZE, SIZE), np.int32)
    box[6:26, 6:26] = 1
    mask = write(folder / "mask.nii.gz", box)
    empty = write(folder / "empty.nii.gz", np.zeros((SIZE, SIZE), np.int32))
    elsewhere = write(folder / "elsewhere.nii.gz", box, moved_grid(3.0))
    expect_error(tmp_path, capsys, [*good, "--masks", mask], "--masks: got 1 masks for 2 images")
    expect_error(tmp_path, capsys, [*good, "--masks", mask, empty], "empty.nii.gz", "empty")
    expect_error(tmp_path, capsys, [*good, "--roi", empty], "empty.nii.gz", "empty")
    expect_error(tmp_path, capsys, [*good, "--roi", elsewhere], "elsewhere.nii.gz", "differs")


def test_help_states_the_defaults_of_the_presets(capsys):
    """--help prints the step sizes, iterations, K and L of the presets actually used."""
    from dcc.coreg import load_preset

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    cardiac = load_preset("cardiac2d")
    rigid, ffd = cardiac.stages
    assert f"rigid {rigid.lr:g} -> x{rigid.lr_final:g}, ffd {ffd.lr:g} -> x{ffd.lr_final:g}" in text
    assert f"2D: rigid {rigid.iterations}, ffd {ffd.iterations}" in text
    classes_3d = load_preset("rire3d").num_classes
    assert f"(default 2D: {cardiac.num_classes:g}; 3D: {classes_3d:g}" in text
    assert f"(default 2D: {cardiac.bins:g};" in text


def test_a_group_that_may_have_gone_wrong_is_flagged(tmp_path, capsys, good):
    """Rigid steps of 10 mm trip the overlap guard on every try: the FFD is skipped, and the
    screen and report.json name the image and say why."""
    code, out = register(tmp_path, *good, "--stages", "rigid,ffd", "--lr", "10",
                         "--iterations", "10")
    err = capsys.readouterr().err
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert len(report["warnings"]) == 1
    name, message = report["warnings"][0].split(": ", 1)
    assert name in report["names"] and "rigid stage was rejected" in message
    assert f"dcc-register: warning: {report['warnings'][0]}" in err
    assert report["stages"][1]["iterations"] == 0
