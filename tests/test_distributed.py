"""Distributed X-CoReg (issue #22): two CPU processes (gloo) register a group sharded between
them and must end where one process ends, up to float rounding.

Why tolerances and not equality: a process sums log f_jk over its own images and the
all-reduce adds the processes' sums, another order of float additions than one process's
(a run "distributed" over one process is bit-identical, checked below). Adam turns such
rounding differences into differences of its steps where a gradient is near zero (the rigid
stage's optimisable centre, whose gradient (I - R) c vanishes at R = I, takes a step of about
the full step size in the direction of a gradient of 1e-4 at the second step): a
single-process run whose images are changed by 1e-6 relative drifts by 1e-4 mm after two
rigid steps, 1e-2 mm after ten and tenths of a millimetre after tens of them. Measured here
(two processes against one, largest difference on the lattice): FFD only 3e-5 to 4e-5 mm,
3 rigid + 8 FFD steps 2e-4 mm, 20 rigid + 20 FFD steps (cosine-decayed) 6e-4 mm; the
tolerances are 1e-4, 1e-3 and 1e-2 mm.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcc.cli.register import main
from dcc.coreg import StageConfig, XCoReg, XCoRegConfig
from dcc.coreg.distributed import ImageShard, PeerError, shard
from dcc.coreg.engine import project_unbiased
from dcc.data.io import write_image
from dcc.data.misalignment import misaligned_phantom
from dcc.spatial.transforms import ComposedTransform, MultiLevelFFD, Rigid

WORLD = 2


def ffd_stage(iterations, **kw):
    return StageConfig(name="ffd", iterations=iterations, lr=0.2, ffd_spacing=40.0, **kw)


# name: (group, images, settings, tolerance in mm on the lattice); N = 3 and 5 shard unevenly
CASES = {
    "rigid_ffd": ("ffd", 3, dict(stages=[StageConfig.named("rigid", iterations=3),
                                         ffd_stage(8)]), 1e-3),
    "reference": ("rigid", 5, dict(reference=3, stages=[ffd_stage(10)]), 1e-4),
    "gt_tries": ("ffd", 3, dict(method="xcoreg-gt", stages=[ffd_stage(6, tries=2)]), 1e-4),
    "long": ("rigid", 6, dict(stages=[StageConfig.named("rigid", iterations=20, lr_final=0.1),
                                      ffd_stage(20, lr_final=0.1)]), 1e-2),
}


def groups():
    return {  # 4 mm phantom slices (59 x 50)
        "ffd": misaligned_phantom(dim=2, downsample=4, magnitude=5.5, spacing=40.0, seed=3),
        "rigid": misaligned_phantom(dim=2, downsample=4, realisations=2, kind="rigid",
                                    magnitude=6.0, seed=1),
    }


def register(case, group, rank=0, world=1, distributed=None):
    """Case ``case`` on the slice of process ``rank`` of ``world`` (distributed if more than
    one process, or if asked)."""
    _, n, settings, _ = CASES[case]
    config = XCoRegConfig(progress=False, sample_rate=0.5, mask_zero_fill=False, **settings)
    part = shard(n, rank, world)
    labels = group.labels[:n][part] if settings.get("method") == "xcoreg-gt" else None
    return XCoReg(config).register(group.images[:n][part], group.grid, labels=labels,
                                   distributed=world > 1 if distributed is None else distributed)


def summary(result, group) -> dict:
    transform = result.gather_transform()
    with torch.no_grad():
        lattice = transform.lattice(group.grid)
    whole = transform.groups == group.images.shape[0]
    return {"lattice": lattice, "posterior": result.posterior, "x": result.x_metric,
            "log_likelihood": result.log_likelihood,
            "gwi": group.warping_index(transform) if whole else None,
            "diagnostics": json.dumps(result.diagnostics, sort_keys=True)}


def worker(rank, world, port, folder):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = groups()
    out = {}
    for case, (name, *_) in CASES.items():
        result = register(case, data[name], rank, world)
        out[case] = summary(result, data[name])
        out[case]["local"] = (result.shard.offset, result.shard.size, result.transform.groups)
    group = data["ffd"]
    config = XCoRegConfig(progress=False, stages=[ffd_stage(2)], mask_zero_fill=False)
    part = shard(3, rank, world)
    errors = {}
    # a bad input in one process: every process stops (no process waits for the other)
    valid = torch.ones_like(group.images[part])
    try:
        XCoReg(config).register(group.images[part], group.grid,
                                valid=valid[:, :-1] if rank == 1 else valid, distributed=True)
    except ValueError as error:
        errors["bad_input"] = (type(error).__name__, str(error))
    # settings that differ between processes
    try:
        XCoReg(XCoRegConfig(**{**vars(config), "seed": rank})).register(
            group.images[part], group.grid, distributed=True)
    except ValueError as error:
        errors["settings"] = (type(error).__name__, str(error))
    out["errors"] = errors
    torch.save(out, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(WORLD, free_port(), folder), nprocs=WORLD)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_shard_slices():
    for n in (2, 3, 5, 64):
        for world in (1, 2, 3):
            if n < world:
                continue
            parts = [shard(n, r, world) for r in range(world)]
            sizes = [p.stop - p.start for p in parts]
            assert parts[0].start == 0 and parts[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="at least 3 images"):
        shard(2, 0, 3)


def test_one_process_reductions_are_the_identity():
    one = ImageShard(4)
    x = torch.randn(4, 3)
    assert one.sum(x) is x and one.gather(x) is x and one.all(x > 0) is not None
    assert torch.equal(one.mean(x), x.mean(0)) and one.owns(3) and not one.owns(4)
    # Eq. (37) with the explicit one-process shard is the projection without one, bit for bit
    grid = groups()["ffd"].grid
    made = []
    for _ in range(2):
        torch.manual_seed(0)
        transform = ComposedTransform(4, 2, [Rigid(4, 2, grid.center), MultiLevelFFD(4, grid, 40)])
        with torch.no_grad():
            for p in transform.parameters():
                p.add_(torch.randn_like(p))
        made.append(transform)
    project_unbiased(made[0], grid.center)
    project_unbiased(made[1], grid.center, ImageShard(4))
    for a, b in zip(made[0].parameters(), made[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_distributed_over_one_process_is_bit_identical(monkeypatch):
    """The distributed code path (all-reduces, fused E-step) in a group of one process."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        group = groups()["ffd"]
        one = summary(register("rigid_ffd", group, distributed=True), group)
    finally:
        dist.destroy_process_group()
    single = summary(register("rigid_ffd", group), group)
    assert torch.equal(one["lattice"], single["lattice"])
    assert torch.equal(one["posterior"], single["posterior"])
    assert one["diagnostics"] == single["diagnostics"] and one["x"] == single["x"]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(two_processes, case):
    name, n, settings, tolerance = CASES[case]
    group = groups()[name]
    single = summary(register(case, group), group)
    first, second = (out[case] for out in two_processes)
    # each process held its slice: 3 images as 2 + 1, 5 as 3 + 2
    sizes = [shard(n, r, WORLD).stop - shard(n, r, WORLD).start for r in range(WORLD)]
    assert [out[case]["local"] for out in two_processes] == [
        (0, sizes[0], sizes[0]), (sizes[0], sizes[1], sizes[1])]
    # both processes gathered the same group and have the same common space and decisions
    assert torch.equal(first["lattice"], second["lattice"])
    assert torch.equal(first["posterior"], second["posterior"])
    assert first["diagnostics"] == second["diagnostics"] and first["x"] == second["x"]
    # ... which are the single process's up to float rounding
    torch.testing.assert_close(first["lattice"], single["lattice"], atol=tolerance, rtol=0)
    assert first["x"] == pytest.approx(single["x"], rel=1e-4)
    assert first["log_likelihood"] == pytest.approx(single["log_likelihood"], rel=1e-4)
    assert (first["posterior"] - single["posterior"]).abs().mean() < 1e-3
    diagnostics = json.loads(first["diagnostics"])
    expected = json.loads(single["diagnostics"])
    for got, want in zip(diagnostics["stages"], expected["stages"], strict=True):
        assert got["accepted"] == want["accepted"] and len(got["tries"]) == len(want["tries"])
        for a, b in zip(got["tries"], want["tries"], strict=True):
            assert len(a["x_images_after"]) == n  # every image's X term, in global order
            assert a["x_images_after"] == pytest.approx(b["x_images_after"], abs=1e-3)
            assert a["moved_mm"] == pytest.approx(b["moved_mm"], abs=0.02)
        if "spread_mm" in want:
            assert got["chosen_try"] == want["chosen_try"] and len(got["spread_mm"]) == n
    if settings.get("reference") is None:  # Eq. (37) over all images of both processes
        assert diagnostics["mean_displacement_mm"]["max"] < 1e-4
        points = group.grid.points()
        torch.testing.assert_close(first["lattice"].mean(0), points, atol=1e-4, rtol=0)
    else:  # the reference, image 3 (the second process's first), did not move
        assert torch.equal(first["lattice"][settings["reference"]], group.grid.points())
    if first["gwi"] is not None:  # gWI (Eq. 49) as in one process
        assert first["gwi"] == pytest.approx(single["gwi"], abs=tolerance)
    if case == "long":  # ... and the registration worked
        assert first["gwi"] < 0.25 * group.warping_index()


def test_an_error_in_one_process_stops_both(two_processes):
    first, second = (out["errors"] for out in two_processes)
    assert second["bad_input"][0] == "ValueError" and "valid must have shape" in \
        second["bad_input"][1]
    assert first["bad_input"] == (PeerError.__name__, second["bad_input"][1])
    for errors in (first, second):
        assert "different settings" in errors["settings"][1]


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path):
    group = misaligned_phantom(dim=2, downsample=4, realisations=2, magnitude=4.0,
                               spacing=40.0, seed=2)
    paths = []
    for j in range(5):
        paths.append(str(tmp_path / f"im{j}.nii.gz"))
        write_image(paths[-1], group.images[j], group.grid)
    options = ["--stages", "rigid,ffd", "--iterations", "3", "--levels", "1", "--quiet"]
    assert main([*paths, "--out", str(tmp_path / "one"), *options]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(WORLD), "-m", "dcc.cli.register", *paths, "--out", str(tmp_path / "two"),
         *options],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("dcc-register: 5 images registered") == 1  # process 0 only
    one, two = tmp_path / "one", tmp_path / "two"
    listing = sorted(p.relative_to(one).as_posix() for p in one.rglob("*"))
    assert listing == sorted(p.relative_to(two).as_posix() for p in two.rglob("*"))
    for j in range(5):
        name = f"transforms/im{j}_displacement.nii.gz"
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / name))) for f in (one, two))
        assert abs(a - b).max() < 1e-3
    reports = [json.loads((f / "report.json").read_text(encoding="utf-8")) for f in (one, two)]
    assert [r["world_size"] for r in reports] == [1, WORLD]
    assert reports[0]["x_metric"] == pytest.approx(reports[1]["x_metric"], rel=1e-4)
    assert set(reports[0]) == set(reports[1])
