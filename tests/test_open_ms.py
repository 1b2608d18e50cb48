"""The open-MS layer (dcc.data.open_ms, dcc.data.io.read_linear_transforms) and its bench
(bench/bench_openms.py): on a tiny synthetic study written like the real ones (grids that differ,
ITK ``MatrixOffsetTransformBase`` reference files), where every answer is known, and on the
shared studies (skipped with the reason when absent)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_runs import load_bench

from dcc.data.cardiac import data_root
from dcc.data.io import InputError, linear_group, read_linear_transforms
from dcc.data.open_ms import (
    MODALITIES,
    coarse_grid,
    find_studies,
    load_study,
    read_reference_transform,
    study_files,
)
from dcc.metrics import registration_error
from dcc.spatial.grid import Grid
from dcc.spatial.transforms import Rigid

ROOT = data_root()
HAS_OPEN_MS = ROOT is not None and bool(find_studies(ROOT))

# a slightly oblique FLAIR grid, and T1W / T2W grids of other sizes, spacings and origins
DIRECTION = tuple(sitk.VersorTransform((0.1, 0.05, 1.0), 0.05).GetMatrix())
GRIDS = {
    "FLAIR": Grid((12, 24, 24), (2.0, 2.0, 4.0), (-23.0, -25.0, -22.0), DIRECTION),
    "T1W": Grid((16, 20, 22), (2.4, 2.6, 3.0), (-26.0, -24.0, -23.0), DIRECTION),
    "T2W": Grid((12, 30, 28), (1.8, 1.7, 4.0), (-25.0, -26.0, -21.0), DIRECTION),
}
# reference maps FLAIR point -> T1W / T2W point: x -> A (x - c) + c + t (ITK MatrixOffset)
REFERENCES = {
    "T1W": (sitk.Euler3DTransform((0, 0, 0), 0.03, -0.02, 0.04).GetMatrix(), (1.5, -2.0, 1.0),
            (1.0, 2.0, -1.0), 1.01),
    "T2W": (sitk.Euler3DTransform((0, 0, 0), -0.02, 0.03, -0.05).GetMatrix(), (-1.0, 1.0, 2.0),
            (-2.0, 0.5, 1.5), 0.99),
}


def _reference(modality: str) -> sitk.AffineTransform:
    matrix, offset, centre, scale = REFERENCES[modality]
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((np.asarray(matrix) * scale).tolist())
    transform.SetTranslation(offset)
    transform.SetCenter(centre)
    return transform


def _write_reference(path: Path, transform: sitk.AffineTransform) -> None:
    """The transform file as the data set ships it (ITK's MatrixOffsetTransformBase text)."""
    numbers = " ".join(f"{v:.10g}" for v in (*transform.GetMatrix(), *transform.GetTranslation()))
    centre = " ".join(f"{v:.10g}" for v in transform.GetCenter())
    path.write_text("#Insight Transform File V1.0\n#Transform 0\n"
                    "Transform: MatrixOffsetTransformBase_double_3_3\n"
                    f"Parameters: {numbers}\nFixedParameters: {centre}\n")


def linear_content(points: np.ndarray, modality: str) -> np.ndarray:
    """A linear function of the FLAIR-frame point (trilinear interpolation reproduces it)."""
    return 300.0 + points @ np.array([2.0, -1.5, 3.0])


def head_content(points: np.ndarray, modality: str) -> np.ndarray:
    """A soft-edged head: skin, brain and ventricles, each modality its own contrasts."""
    skin, brain, csf = {"FLAIR": (200, 300, 40), "T1W": (500, 250, 60),
                        "T2W": (300, 150, 400)}[modality]

    def inside(semi_axes, centre=(0.0, 0.0, 0.0)):
        r = np.linalg.norm((points - centre) / np.asarray(semi_axes), axis=-1)
        return 1 / (1 + np.exp((r - 1) * 12))

    head, cerebrum = inside((20, 22, 18)), inside((16, 18, 14))
    ventricles = inside((3, 7, 4), (2.0, -1.0, 1.0))
    return skin * (head - cerebrum) + brain * (cerebrum - ventricles) + csf * ventricles


def write_study(folder: Path, content=linear_content, prefix: str = "study1") -> Path:
    """A synthetic open-MS study: image ``m`` on ``GRIDS[m]`` holds ``content(p)`` at the
    FLAIR-frame point ``p = reference_m^-1(q)`` of its voxel centre ``q``, so that the loader's
    ``sources[m]`` sampled at ``reference_m(x)`` gives ``content(x)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for modality, grid in GRIDS.items():
        points = grid.points(dtype=torch.float64).numpy().reshape(-1, 3)
        if modality != "FLAIR":
            reference = _reference(modality)
            _write_reference(folder / f"{prefix}_{modality}_intrastudy_to_FLAIR.txt", reference)
            inverse = reference.GetInverse()
            points = np.array([inverse.TransformPoint(tuple(p)) for p in points])
        values = content(points, modality).reshape(grid.shape).astype(np.float32)
        sitk.WriteImage(grid.to_sitk(values), str(folder / f"{prefix}_{modality}.nii.gz"))
    return folder


def _interior(grid: Grid, points: np.ndarray) -> np.ndarray:
    """Points whose continuous index lies between voxel centres of ``grid`` (with a margin)."""
    index = (np.c_[points, np.ones(len(points))] @ grid.world_to_index_matrix().T)[:, :3]
    return ((index >= 1e-3) & (index <= np.asarray(grid.size) - 1 - 1e-3)).all(1)


def _vertices(grid: Grid) -> np.ndarray:
    """The 8 vertices of the field of view, computed here from the header (not Grid.vertices)."""
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    extent = np.asarray(grid.size) * np.asarray(grid.spacing)
    start = np.asarray(grid.origin) - grid.direction_matrix @ (np.asarray(grid.spacing) / 2)
    return start + (corners * extent) @ grid.direction_matrix.T


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return load_study(write_study(tmp_path_factory.mktemp("open_ms") / "synthetic_study1"))


# ---------------------------------------------------------------------- loader
def test_loader_brings_every_image_onto_the_flair_grid(study):
    grid = GRIDS["FLAIR"]
    assert study.names == MODALITIES and study.grid.same_geometry(grid, tol=1e-5)
    assert study.images.shape == (3, *grid.shape) and study.images.dtype == torch.float32
    points = grid.points(dtype=torch.float64).numpy().reshape(-1, 3)
    truth = linear_content(points, "FLAIR")
    identity = dataclasses.replace(
        study, references=[sitk.Transform(3, sitk.sitkIdentity)] * 3).resample()
    for j, modality in enumerate(MODALITIES):
        got = study.images[j].double().numpy().ravel()
        if modality == "FLAIR":
            inside = np.ones(len(points), bool)
        else:  # where reference(x) lies inside the image (zero beyond its field of view)
            ref = _reference(modality)
            inside = _interior(GRIDS[modality], np.array([ref.TransformPoint(p) for p in points]))
        assert inside.mean() > 0.5, modality
        np.testing.assert_allclose(got[inside], truth[inside], atol=0.05, err_msg=modality)
        if modality != "FLAIR":  # the reference transform matters: without it, far off
            off = identity[j].double().numpy().ravel()[inside] - truth[inside]
            assert np.abs(off).mean() > 2.0, modality


def test_reference_files_read_as_written(tmp_path):
    folder = write_study(tmp_path / "s")
    files = study_files(folder)
    assert set(files) == {*MODALITIES, "T1W_to_FLAIR", "T2W_to_FLAIR"}
    read = read_reference_transform(files["T1W_to_FLAIR"])
    for p in ([0, 0, 0], [10, -5, 7], [-20, 15, 3]):
        np.testing.assert_allclose(read.TransformPoint(p), _reference("T1W").TransformPoint(p),
                                   atol=1e-6)
    assert find_studies(tmp_path) == [folder]
    (folder / "study1_T2W_intrastudy_to_FLAIR.txt").unlink()
    with pytest.raises(InputError, match="study1_T2W_intrastudy_to_FLAIR.txt"):
        study_files(folder)
    bad = tmp_path / "bad.txt"
    bad.write_text("not a transform\n")
    with pytest.raises(InputError, match="bad.txt"):
        read_reference_transform(bad)


def test_coarse_grid_keeps_the_field_of_view():
    grid = Grid((36, 320, 320), (0.71875, 0.71875, 4.0), (-119.2, -99.0, -78.4), DIRECTION)
    coarse = coarse_grid(grid, 4)
    assert coarse.shape == (36, 80, 80)
    np.testing.assert_allclose(coarse.spacing, (2.875, 2.875, 4.0))
    np.testing.assert_allclose(coarse.vertices(), grid.vertices(), atol=1e-6)
    np.testing.assert_allclose(coarse.center, grid.center, atol=1e-6)
    assert coarse_grid(grid, 8).spacing[2] == pytest.approx(144 / 25)  # 5.76 mm: 25 slices
    assert coarse_grid(grid, 1) is grid
    with pytest.raises(ValueError):
        coarse_grid(grid, 0.5)


# ---------------------------------------------------------------------- misalignment and gRE
def test_misalignment_is_seeded_bounded_and_known(study):
    images, truth = study.misalign(seed=3)
    assert isinstance(truth, Rigid) and images.shape == study.images.shape
    angles, offsets = torch.rad2deg(truth.angles.detach()), truth.offset.detach()
    assert angles.abs().max() <= 15 and offsets.abs().max() <= 20
    assert angles.abs().max() > 3 and offsets.abs().max() > 4  # not all tiny
    np.testing.assert_allclose(truth.center.detach()[0], study.grid.center, atol=1e-4)
    again, truth2 = study.misalign(seed=3)
    torch.testing.assert_close(again, images)
    torch.testing.assert_close(truth2.angles, truth.angles)
    assert not torch.equal(study.misalign(seed=4)[1].angles, truth.angles)
    # M_j(x) = I_j(reference_j(truth_j(x))) = content(truth_j(x)), one interpolation
    mapped = truth.lattice(study.grid).detach().double().numpy().reshape(3, -1, 3)
    for j, modality in enumerate(MODALITIES):
        points = mapped[j]
        if modality != "FLAIR":
            ref = _reference(modality)
            inside = _interior(GRIDS[modality], np.array([ref.TransformPoint(p) for p in points]))
        else:
            inside = _interior(GRIDS["FLAIR"], points)
        assert inside.mean() > 0.3, modality
        got = images[j].double().numpy().ravel()[inside]
        np.testing.assert_allclose(got, linear_content(points[inside], modality), atol=0.05)


def test_gre_of_the_identity_recovery_is_the_known_corner_displacement(study):
    grid = study.grid
    # translations only: every vertex moves by t_j, so gRE = mean_j |t_j - mean t|
    truth = Rigid(3, 3, center=grid.center).requires_grad_(False)
    shifts = torch.tensor([[4.0, 0.0, 0.0], [0.0, -6.0, 2.0], [-1.0, 3.0, 5.0]])
    truth.offset.copy_(shifts)
    expected = (shifts - shifts.mean(0)).norm(dim=1).mean().item()
    assert registration_error(truth, grid) == pytest.approx(expected, rel=1e-5)
    # random rigid maps: Eqs. 51-52 by hand at the vertices of the FLAIR field of view
    _, truth = study.misalign(seed=7)
    vertices = _vertices(grid)
    mapped = []
    for j in range(3):
        t = truth.to_sitk(j)
        mapped.append([t.TransformPoint(tuple(v)) for v in vertices])
    mapped = np.asarray(mapped)
    centred = mapped - mapped.mean(0)
    by_hand = np.sqrt((centred**2).sum(-1).mean(1)).mean()
    assert by_hand > 10
    assert registration_error(truth, grid) == pytest.approx(by_hand, rel=1e-4)
    # recovered exactly (up to one common map S, which gRE ignores): zero
    common = sitk.Euler3DTransform((0, 0, 0), 0.1, -0.05, 0.2, (3.0, -2.0, 1.0))
    inverses = [sitk.CompositeTransform([truth.to_sitk(j).GetInverse(), common])
                for j in range(3)]
    assert registration_error(truth, grid, linear_group(inverses)) < 1e-3
    # the pairwise form of an ITK registration onto image 0: [identity, T_1, T_2]
    pairwise = [sitk.Transform(3, sitk.sitkIdentity)] + [
        sitk.CompositeTransform([truth.to_sitk(j).GetInverse(), truth.to_sitk(0)])
        for j in (1, 2)]
    assert registration_error(truth, grid, linear_group(pairwise)) < 1e-3
    # half the way back leaves an error in between
    assert 1 < registration_error(truth, grid, linear_group(inverses[:1] + pairwise[1:])) \
        < by_hand * 3


def test_read_linear_transforms_round_trip(tmp_path):
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.01, -0.03, 0.0, 0.98, 0.02, 0.01, -0.02, 1.01))
    affine.SetTranslation((3.0, -4.0, 5.0))
    euler = sitk.Euler3DTransform((10.0, -5.0, 2.0), 0.2, -0.1, 0.3, (1.0, 2.0, 3.0))
    paths = [tmp_path / "a.tfm", tmp_path / "b.tfm", tmp_path / "c.txt"]
    for path, transform in zip(paths, (affine, euler, sitk.TranslationTransform(3, (1, 2, 3))),
                               strict=True):
        sitk.WriteTransform(transform, str(path))
    group = read_linear_transforms(paths)
    points = torch.tensor([[0.0, 0.0, 0.0], [100.0, -80.0, 40.0], [-50.0, 20.0, -60.0]])
    mapped = group(points)
    for j, path in enumerate(paths):
        expected = [sitk.ReadTransform(str(path)).TransformPoint(p.tolist()) for p in points]
        torch.testing.assert_close(mapped[j], torch.tensor(expected, dtype=torch.float32),
                                   atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="missing.tfm"):
        read_linear_transforms([tmp_path / "missing.tfm"])
    with pytest.raises(ValueError, match="not a linear"):
        linear_group([sitk.BSplineTransform(3)])


# ---------------------------------------------------------------------- the real studies
def _nmi(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    """Normalised mutual information (H(a) + H(b)) / H(a, b) where both are nonzero."""
    inside = (a > 0) & (b > 0)
    joint, _, _ = np.histogram2d(a[inside], b[inside], bins=bins)
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return -(q * np.log(q)).sum()

    return (entropy(p.sum(0)) + entropy(p.sum(1))) / entropy(p.ravel())


@pytest.mark.data
@pytest.mark.skipif(not HAS_OPEN_MS, reason="open-MS studies not found: set DCC_DATA_ROOT "
                    "(CI uses ../shared/data) with open_ms/<study>/")
@pytest.mark.parametrize("name", ["patient01_study1", "patient12_study1"])
def test_real_study_loads_and_its_references_align(name):
    folders = {p.name: p for p in find_studies(ROOT)}
    if name not in folders:
        pytest.skip(f"{name} not in {ROOT / 'open_ms'}")
    study = load_study(folders[name])
    flair = sitk.ReadImage(str(study_files(folders[name])["FLAIR"]))
    assert study.grid.same_geometry(Grid.from_sitk(flair), tol=1e-4)
    assert study.grid.shape[1:] == (320, 320) and study.grid.shape[0] in (36, 48)
    np.testing.assert_allclose(study.grid.spacing[:2], 0.71875, atol=1e-4)
    assert study.images.shape == (3, *study.grid.shape)
    assert (study.images.flatten(1).amax(1) > 100).all()
    assert (study.images > 0).flatten(1).float().mean(1).min() > 0.2  # the head fills the grid
    # reference vs identity vs inverse: NMI of FLAIR with T1W / T2W on the FLAIR grid
    identity = dataclasses.replace(
        study, references=[sitk.Transform(3, sitk.sitkIdentity)] * 3).resample()
    inverse = dataclasses.replace(
        study, references=[r if j == 0 else r.GetInverse()
                           for j, r in enumerate(study.references)]).resample()
    fixed = study.images[0].numpy()
    gains = {}
    for j in (1, 2):
        with_reference = _nmi(fixed, study.images[j].numpy())
        assert with_reference > _nmi(fixed, inverse[j].numpy()), study.names[j]
        gains[study.names[j]] = with_reference - _nmi(fixed, identity[j].numpy())
        # the session's images are nearly aligned by their headers already; the references
        # never make it notably worse...
        assert gains[study.names[j]] > -0.005, gains
    # ...and improve it clearly where the headers are off (patient12's T1W: 1.096 -> 1.126)
    if name == "patient12_study1":
        assert gains["T1W"] > 0.01, gains
    # coarsened: same field of view, anti-aliased images on 2.9 mm in-plane
    coarse = load_study(folders[name], shrink=4)
    assert coarse.grid.shape[1:] == (80, 80)
    np.testing.assert_allclose(coarse.grid.vertices(), study.grid.vertices(), atol=1e-3)


# ---------------------------------------------------------------------- the bench


def test_bench_without_data_names_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCC_DATA_ROOT", str(tmp_path))
    assert load_bench("bench_openms").main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "open_ms" in err
    monkeypatch.setenv("DCC_DATA_ROOT", str(tmp_path / "nowhere"))
    assert load_bench("bench_openms").main(["--out", str(tmp_path / "out")]) == 2
    assert "DCC_DATA_ROOT" in capsys.readouterr().err


def test_bench_runs_end_to_end_on_a_tiny_study(tmp_path, monkeypatch):
    write_study(tmp_path / "data" / "open_ms" / "tiny_study1", head_content)
    monkeypatch.setenv("DCC_DATA_ROOT", str(tmp_path / "data"))
    out = tmp_path / "out"
    argv = ["--trials", "1", "--threads", "1", "--sitk-iterations", "5", "--out", str(out),
            "--methods", "xcoreg", "ape", "--classes", "4", "--rows", str(tmp_path / "rows.jsonl"),
            "--", "--iterations", "3"]
    assert load_bench("bench_openms").main(argv) == 0
    payload = json.loads((out / "openms_bench.json").read_text(encoding="utf-8"))
    (row,) = payload["rows"]
    assert row["study"] == "tiny_study1" and row["seed"] == 0
    numbers = [row["gre_before_mm"], row["xcoreg"]["gre_mm"], row["xcoreg"]["seconds"],
               row["xcoreg"]["peak_rss_mb"], row["sitk"]["gre_mm"], row["sitk"]["seconds"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in numbers), numbers
    assert row["xcoreg"]["peak_rss_mb"] > 50  # the dcc-register process's own peak
    assert payload["settings"]["dcc_register_extra"] == ["--iterations", "3"]
    assert [s["iterations"] for s in payload["settings"]["dcc_register_settings"]["stages"]] \
        == [3, 3]
    table = (out / "openms_bench.md").read_text(encoding="utf-8")
    assert "| tiny_study1 | 0 |" in table and "**mean**" in table and "Hardware:" in table
    assert "bench/bench_openms.py" in table
    assert (out / "openms_bench.png").stat().st_size > 10_000
    # the competing metric and the K curve: their own dcc-register runs, compared to X-CoReg
    assert payload["settings"]["runs"] == [["xcoreg", []], ["ape", ["--method", "ape"]],
                                           ["xcoreg-K4", ["-K", "4"]]]
    assert [row[k]["method"] for k in ("xcoreg", "ape", "xcoreg-K4")] == ["xcoreg", "ape",
                                                                         "xcoreg"]
    assert math.isfinite(row["ape"]["gre_mm"]) and math.isfinite(row["xcoreg-K4"]["gre_mm"])
    methods = payload["tables"]["Methods on the same trials"]
    assert [r["method"] for r in methods] == ["xcoreg", "ape", "sitk"]
    assert methods[1]["mean"] == pytest.approx(row["ape"]["gre_mm"])
    assert methods[1]["time_ratio"] == pytest.approx(
        row["ape"]["seconds"] / row["xcoreg"]["seconds"])
    curve = payload["tables"]["gRE against K (X-CoReg: K = 8)"]
    assert [r["method"] for r in curve] == ["xcoreg", "xcoreg-K4"]
    assert "| APE | 1 |" in table and "| X-CoReg K=4 | 1 |" in table
    assert (out / "openms_bench_gre_vs_K.png").stat().st_size > 5_000
    # --rows: a second run takes the finished trial from the file (nothing is registered again)
    # and writes the same table
    bench = load_bench("bench_openms")
    bench.run_xcoreg = bench.run_sitk = None  # would raise if called
    again = tmp_path / "again"
    assert bench.main([*argv[:argv.index("--out") + 1], str(again), *argv[argv.index(
        "--out") + 2:]]) == 0
    assert (again / "openms_bench.md").read_text(encoding="utf-8") == table.replace(
        str(out), str(again))
    assert (again / "openms_bench.png").stat().st_size > 10_000
