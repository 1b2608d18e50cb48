import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dcc.data.io import InputError, read_image, read_labels, resample_to_grid, write_image
from dcc.spatial.grid import Grid


def rotation3d(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation2d(a: float) -> np.ndarray:
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


OBLIQUE3D = Grid((6, 7, 8), (0.9, 1.2, 2.5), (10.0, -20.0, 5.0), rotation3d(0.2, -0.3, 0.5).ravel())
OBLIQUE2D = Grid((9, 11), (0.7, 1.3), (-4.0, 12.0), rotation2d(0.4).ravel())


def smooth_image(grid: Grid) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in grid.shape], indexing="ij")
    return (1 + sum((k + 1) * np.sin(3 * a + k) for k, a in enumerate(axes))).astype(np.float32)


def assert_error(path, *fragments):
    with pytest.raises(InputError) as info:
        read_image(path)
    for text in (str(path), *fragments):
        assert text in str(info.value)
    return info.value


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("grid", [OBLIQUE3D, OBLIQUE2D], ids=["3d-oblique", "2d-oblique"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_write_read_round_trip(tmp_path, grid, suffix):
    data = smooth_image(grid)
    path = tmp_path / f"img{suffix}"
    write_image(path, torch.from_numpy(data), grid)
    image, read_grid = read_image(path)
    assert image.dtype == torch.float32 and tuple(image.shape) == grid.shape
    assert read_grid.same_geometry(grid, tol=1e-4)
    np.testing.assert_allclose(
        read_grid.index_to_world_matrix(), grid.index_to_world_matrix(), atol=1e-4
    )
    np.testing.assert_allclose(image.numpy(), data, rtol=1e-6)


def test_write_vector_image(tmp_path):
    field = np.random.default_rng(0).standard_normal((*OBLIQUE3D.shape, 3)).astype(np.float32)
    write_image(tmp_path / "field.nii.gz", field, OBLIQUE3D, is_vector=True)
    image = sitk.ReadImage(str(tmp_path / "field.nii.gz"))
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert Grid.from_sitk(image).same_geometry(OBLIQUE3D, tol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), field, rtol=1e-6)
    with pytest.raises(InputError, match="multi-component"):
        read_image(tmp_path / "field.nii.gz")


def test_write_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "x.nii.gz", np.zeros((3, 4)), OBLIQUE2D)


def test_single_slice_volume_becomes_2d(tmp_path):
    direction = rotation3d(0.0, 0.0, 0.3)  # in-plane rotation only
    grid3 = Grid((1, 9, 11), (0.7, 1.3, 3.0), (-4.0, 12.0, 30.0), direction.ravel())
    data = smooth_image(Grid.from_shape((9, 11)))[None]
    write_image(tmp_path / "slice.nii.gz", data, grid3)
    image, grid = read_image(tmp_path / "slice.nii.gz")
    assert tuple(image.shape) == (9, 11)
    expected = Grid((9, 11), (0.7, 1.3), (-4.0, 12.0), direction[:2, :2].ravel())
    assert grid.same_geometry(expected, tol=1e-4)
    np.testing.assert_allclose(image.numpy(), data[0], rtol=1e-6)


def write_dicom_series(folder, array, spacing, origin, uid, prefix, positions=None):
    """One file per slice with the tags GDCM needs to group and order a series; file ``k`` lies
    at slice position ``positions[k]`` (default ``k``: a volume; repeats make a time series)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        s = image[:, :, k]
        z = k if positions is None else positions[k]
        tags = {
            "0008|0060": "MR",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))),
            "0020|0013": str(k + 1),
            "0018|0050": str(spacing[2]),
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_folder_takes_largest_series(tmp_path):
    big = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    small = -big[:2]
    write_dicom_series(
        tmp_path, small, (0.7, 0.8, 2.5), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.9.7", "a"
    )
    write_dicom_series(
        tmp_path, big, (0.7, 0.8, 2.5), (1.0, 2.0, 3.0), "1.2.826.0.1.3680043.9.8", "b"
    )
    image, grid = read_image(tmp_path)
    assert image.dtype == torch.float32
    np.testing.assert_array_equal(image.numpy(), big)
    np.testing.assert_allclose(grid.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    np.testing.assert_allclose(grid.origin, (1.0, 2.0, 3.0), atol=1e-6)


@pytest.mark.parametrize(
    "positions, fragment",
    [
        ([0, 0, 0, 0], "DICOM series of 4 frames at one slice position (a time series"),
        ([0, 0, 1, 1], "DICOM series of 4 files at only 2 slice positions"),
    ],
    ids=["one-position", "two-positions"],
)
def test_dicom_time_series_refused(tmp_path, positions, fragment):
    """Frames that repeat a slice position are not stacked into a volume with a made-up
    spacing; the message says how to pass the frames."""
    frames = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    write_dicom_series(
        tmp_path,
        frames,
        (1.4, 1.4, 8.0),
        (0.0, 0.0, 0.0),
        "1.2.826.0.1.3680043.9.9",
        "f",
        positions,
    )
    error = assert_error(tmp_path, fragment)
    if len(set(positions)) == 1:
        assert f"pass the frame files as the images, e.g. {tmp_path}/*" in str(error)
    # each frame alone is a 2D image
    image, grid = read_image(tmp_path / "f001.dcm")
    assert grid.ndim == 2
    np.testing.assert_array_equal(image.numpy(), frames[1])


@pytest.mark.parametrize("dtype", [np.int16, np.float32], ids=["int", "float"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha"])
def test_truncated_file(tmp_path, dtype, suffix):
    """ITK zero-fills a short NIfTI file (and nibabel/gzip raise deep errors): a truncated
    file is refused by name."""
    path = tmp_path / f"short{suffix}"
    write_image(path, (smooth_image(OBLIQUE3D) * 100).astype(dtype), OBLIQUE3D)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    error = assert_error(path, "truncated")
    assert "\n" not in str(error)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_error(tmp_path, "no DICOM series found")


# ---------------------------------------------------------------------- image errors
def test_missing_file(tmp_path):
    assert_error(tmp_path / "scan1.nii.gz", "file not found")


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    error = assert_error(path, "cannot read image: ")
    assert "\n" not in str(error) and "sitk::ERROR" not in str(error)


def test_nan_and_inf(tmp_path):
    data = smooth_image(OBLIQUE2D)
    for name, value in [("nan.nii.gz", np.nan), ("inf.nii.gz", np.inf)]:
        data[2, 3] = value
        write_image(tmp_path / name, data, OBLIQUE2D)
        assert_error(tmp_path / name, "image contains NaN or infinite voxels")


def test_constant(tmp_path):
    write_image(tmp_path / "flat.nii.gz", np.full(OBLIQUE3D.shape, 7, np.int16), OBLIQUE3D)
    assert_error(tmp_path / "flat.nii.gz", "image is constant (all voxels = 7)")


def test_4d(tmp_path):
    volumes = [sitk.GetImageFromArray(smooth_image(OBLIQUE3D) * k) for k in (1, 2)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "series.nii.gz"))
    assert_error(
        tmp_path / "series.nii.gz", "expected a 2D or 3D image, got 4D with size (8, 7, 6, 2)"
    )


def test_empty_image(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 0 5 5\nElementType = MET_FLOAT\n"
        "ElementDataFile = LOCAL\n"
    )
    assert_error(path, "image is empty (0 voxels")


def test_degenerate_line_image(tmp_path):
    write_image(
        tmp_path / "line.mha",
        np.arange(5, dtype=np.float32)[None, :, None],
        Grid.from_shape((1, 5, 1)),
    )
    assert_error(tmp_path / "line.mha", "expected a 2D or 3D image, got size (1, 5, 1)")


# ---------------------------------------------------------------------- labels
def label_map(grid: Grid) -> np.ndarray:
    labels = np.zeros(grid.shape, np.uint8)
    labels[2:5, 3:6] = 1
    labels[5:7, 1:3] = 2
    return labels


def test_read_labels(tmp_path):
    labels = label_map(OBLIQUE2D)
    write_image(tmp_path / "seg.nii.gz", labels, OBLIQUE2D)
    out = read_labels(tmp_path / "seg.nii.gz", like=OBLIQUE2D)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), labels)
    # integer-valued floats are accepted
    write_image(tmp_path / "segf.nii.gz", labels.astype(np.float32), OBLIQUE2D)
    np.testing.assert_array_equal(read_labels(tmp_path / "segf.nii.gz", OBLIQUE2D).numpy(), labels)


def test_labels_grid_mismatch(tmp_path):
    other = Grid((9, 12), OBLIQUE2D.spacing, OBLIQUE2D.origin, OBLIQUE2D.direction)
    write_image(tmp_path / "seg.nii.gz", label_map(other), other)
    with pytest.raises(InputError) as info:
        read_labels(tmp_path / "seg.nii.gz", like=OBLIQUE2D)
    message = str(info.value)
    assert "seg.nii.gz" in message and "differs from its image's grid" in message
    assert "shape (9, 12) vs (9, 11)" in message and "spacing" not in message.split(":", 2)[2]


def test_labels_non_integer_and_empty(tmp_path):
    labels = label_map(OBLIQUE2D).astype(np.float32)
    labels[0, 0] = 0.5
    write_image(tmp_path / "frac.nii.gz", labels, OBLIQUE2D)
    with pytest.raises(InputError, match=r"frac\.nii\.gz: label map has non-integer values"):
        read_labels(tmp_path / "frac.nii.gz", OBLIQUE2D)
    write_image(tmp_path / "zero.nii.gz", np.zeros(OBLIQUE2D.shape, np.uint8), OBLIQUE2D)
    with pytest.raises(InputError, match=r"zero\.nii\.gz: label map is empty"):
        read_labels(tmp_path / "zero.nii.gz", OBLIQUE2D)


# ---------------------------------------------------------------------- resampling
def sitk_resample(data, grid, target, interpolator):
    reference = target.to_sitk(np.zeros(target.shape, np.float32))
    out = sitk.Resample(grid.to_sitk(data), reference, sitk.Transform(), interpolator, 0.0)
    return sitk.GetArrayFromImage(out)


def shifted_oblique(grid: Grid, angle: float, scale: float) -> Grid:
    """A rotated, shifted, finer grid overlapping ``grid`` partially."""
    d = grid.ndim
    rot = rotation3d(angle, -angle / 2, angle) if d == 3 else rotation2d(angle)
    shape = tuple(int(n * 1.3) for n in grid.shape)
    spacing = tuple(s * scale for s in grid.spacing)
    origin = grid.center - rot @ (np.array(spacing) * (np.array(shape[::-1]) - 1) / 2) + 0.37
    return Grid(shape, spacing, tuple(origin), tuple((grid.direction_matrix @ rot).ravel()))


@pytest.mark.parametrize("source", [OBLIQUE3D, OBLIQUE2D], ids=["3d", "2d"])
def test_resample_matches_sitk(source):
    target = shifted_oblique(source, 0.35, 0.8)
    data = np.random.default_rng(1).random(source.shape).astype(np.float32)
    out, mask = resample_to_grid(torch.from_numpy(data), source, target)
    assert out.dtype == torch.float32 and mask.dtype == torch.float32
    assert tuple(out.shape) == target.shape == tuple(mask.shape)
    inside = mask.numpy() > 1 - 1e-6
    assert 0.2 < inside.mean() < 0.9  # partial overlap, so the mask is tested both ways
    assert mask.min() >= 0 and mask.max() <= 1
    expected = sitk_resample(data, source, target, sitk.sitkLinear)
    np.testing.assert_allclose(out.numpy()[inside], expected[inside], atol=1e-4)
    assert (out.numpy()[mask.numpy() == 0] == 0).all()

    labels = torch.from_numpy(label_map(Grid.from_shape(source.shape[-2:])))
    labels = labels.expand(source.shape).contiguous()
    out, mask_nn = resample_to_grid(labels, source, target, mode="nearest")
    assert out.dtype == torch.int64
    inside = mask_nn.numpy() == 1
    expected = sitk_resample(labels.numpy(), source, target, sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(out.numpy()[inside], expected[inside])


def test_resample_identity_and_leading_dims():
    data = torch.from_numpy(np.stack([smooth_image(OBLIQUE3D)] * 2))
    out, mask = resample_to_grid(data, OBLIQUE3D, OBLIQUE3D)
    assert out.shape == data.shape and mask.shape == OBLIQUE3D.shape
    torch.testing.assert_close(out, data, atol=1e-4, rtol=0)
    assert bool((mask > 1 - 1e-4).all())


def test_resample_errors():
    with pytest.raises(ValueError, match="2D"):
        resample_to_grid(torch.zeros(OBLIQUE3D.shape), OBLIQUE3D, OBLIQUE2D)
    with pytest.raises(ValueError, match="mode"):
        resample_to_grid(torch.zeros(OBLIQUE2D.shape), OBLIQUE2D, OBLIQUE2D, mode="cubic")
    with pytest.raises(ValueError, match="shape"):
        resample_to_grid(torch.zeros(3, 4), OBLIQUE2D, OBLIQUE2D)


def test_oblique_single_slice_keeps_physical_distances(tmp_path):
    """An oblique one-slice volume becomes a 2D grid in the slice's own frame."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.4, -0.3, 0.5)
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((1, 6, 7)).astype(np.float32))
    image.SetSpacing((0.8, 1.3, 8.0))
    image.SetOrigin((4.0, -2.0, 9.0))
    image.SetDirection(rotation.GetMatrix())
    path = tmp_path / "oblique_slice.nii.gz"
    sitk.WriteImage(image, str(path))
    _, grid = read_image(path)
    assert grid.shape == (6, 7)
    direction = grid.direction_matrix
    np.testing.assert_allclose(direction.T @ direction, np.eye(2), atol=1e-6)
    # distances between voxel centres equal those in 3D
    points2 = grid.points(dtype=torch.float64).reshape(-1, 2).numpy()
    image3 = sitk.ReadImage(str(path))
    points3 = np.array(
        [image3.TransformIndexToPhysicalPoint((x, y, 0)) for y in range(6) for x in range(7)]
    )
    d2 = np.linalg.norm(points2[:, None] - points2[None], axis=-1)
    d3 = np.linalg.norm(points3[:, None] - points3[None], axis=-1)
    np.testing.assert_allclose(d2, d3, atol=1e-4)
