"""dcc-register end to end: geometry round trip, ITK-compatible transforms, bad input."""

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dcc.cli.register import main
from dcc.data.io import write_image
from dcc.data.misalign import misaligned_phantom
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


def register(tmp_path, *args):
    out = tmp_path / "out"
    code = main([*map(str, args), "--out", str(out), "--quiet"])
    return code, out


def resample_with(transform, moving_path, reference_path):
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat64)
    reference = sitk.ReadImage(str(reference_path))
    out = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(reference)


def test_linear_stages_round_trip(tmp_path, group_files):
    paths, labels, grid = group_files
    code, out = register(
        tmp_path, *paths, "--labels", *labels, "--stages", "translation,rigid", "--iterations", "15"
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
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
        field = sitk.ReadImage(
            str(out / "transforms" / f"{name}_displacement.nii.gz"), sitk.sitkVectorFloat64
        )
        expected, _ = resample_with(sitk.DisplacementFieldTransform(field), path, warped_path)
        np.testing.assert_allclose(expected[2:-2, 2:-2], warped[2:-2, 2:-2], atol=1e-3)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels" / f"{name}.nii.gz")))
        assert np.issubdtype(seg.dtype, np.integer) and set(np.unique(seg)) <= {0, 1, 2, 3}
    posterior = sitk.ReadImage(str(out / "posterior.nii.gz"))
    assert posterior.GetNumberOfComponentsPerPixel() == 4
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ffd_displacement_field_reproduces_warp(tmp_path, group_files):
    paths, _, _ = group_files
    code, out = register(
        tmp_path,
        *paths,
        "--stages",
        "ffd",
        "--iterations",
        "10",
        "--ffd-spacing",
        "40",
        "--reference",
        "0",
    )
    assert code == 0
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
    report = json.loads((out / "report.json").read_text())
    assert report["gwi_before_mm"] > 2.0 and np.isfinite(report["gwi_after_mm"])
    assert len(list((out / "inputs").glob("*.nii.gz"))) == 6


def write(path, array, grid=None):
    array = np.asarray(array, dtype=np.float32)
    write_image(path, array, grid or Grid.from_shape(array.shape))
    return str(path)


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    return [write(tmp_path / f"ok{i}.nii.gz", rng.random((16, 16))) for i in range(2)]


def expect_error(tmp_path, capsys, args, *fragments):
    out = tmp_path / "result"
    code = main([*map(str, args), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result")]


def test_bad_inputs(tmp_path, capsys, good):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    nan = np.ones((16, 16))
    nan[3, 3] = np.nan
    nan_path = tmp_path / "nan.mha"
    write_image(nan_path, nan.astype(np.float32), Grid.from_shape((16, 16)))
    constant = write(tmp_path / "constant.nii.gz", np.full((16, 16), 5.0))
    labels_other_grid = write(tmp_path / "lab.nii.gz", np.ones((12, 16)))
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
    expect_error(tmp_path, capsys, [*good, "--method", "xcoreg-gt"], "--labels")
    expect_error(tmp_path, capsys, [*good, "--preset", "nope"], "unknown preset")
    expect_error(tmp_path, capsys, [*good, "--stages", "rigid,warp"], "unknown stage")


def test_unknown_option_and_existing_output(tmp_path, capsys, good):
    with pytest.raises(SystemExit) as exit_info:
        main([*good, "--out", str(tmp_path / "o"), "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    code = main([*good, "--out", str(tmp_path / "taken"), "--quiet"])
    assert code == 2 and "exists" in capsys.readouterr().err
