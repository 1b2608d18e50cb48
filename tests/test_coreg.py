"""X-CoReg engine: recovery of known misalignments, constraints, determinism."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dcc.coreg import StageConfig, XCoReg, XCoRegConfig, load_preset
from dcc.coreg.config import auto_config, available_presets
from dcc.coreg.engine import padding_mask
from dcc.data.misalignment import misaligned_phantom, warp_images
from dcc.metrics import pairwise_dice


@pytest.fixture(scope="module")
def ffd_group():
    # 4 mm phantom slice (59 x 50), known FFD misalignment of about 3 mm gWI.
    return misaligned_phantom(dim=2, downsample=4, magnitude=5.5, spacing=40.0, seed=3)


def run(group, iterations=60, **kw):
    stages = kw.pop(
        "stages", [StageConfig(name="ffd", iterations=iterations, lr=0.2, ffd_spacing=40.0)]
    )
    kw.setdefault("mask_zero_fill", False)  # skull-stripped phantom, as the brain presets
    config = XCoRegConfig(
        stages=stages, progress=False, sample_rate=kw.pop("sample_rate", 0.5), tolerance=0, **kw
    )
    return XCoReg(config).register(group.images, group.grid, labels=kw.get("labels"))


def test_recovers_known_ffd_misalignment():
    # 2 mm phantom slice (117 x 99): gWI must drop by more than 80 %.
    group = misaligned_phantom(dim=2, downsample=2, magnitude=5.5, spacing=40.0, seed=3)
    before = group.warping_index()
    # Adam steps of 0.3 mm as the brain2d preset (0.2 mm: 0.62 mm once lambda counted in
    # control-point index units)
    stages = [StageConfig(name="ffd", iterations=100, lr=0.3, ffd_spacing=40.0)]
    result = run(group, stages=stages)
    after = group.warping_index(result.transform)
    assert before > 2.0
    assert after < 0.2 * before, f"gWI {before:.2f} -> {after:.2f} mm"


def test_ground_truth_appearance_model_recovers(ffd_group):
    config = XCoRegConfig(
        stages=[StageConfig(name="ffd", iterations=60, lr=0.2, ffd_spacing=40.0)],
        method="xcoreg-gt",
        sample_rate=0.5,
        tolerance=0,
        progress=False,
    )
    result = XCoReg(config).register(ffd_group.images, ffd_group.grid, labels=ffd_group.labels)
    assert ffd_group.warping_index(result.transform) < 0.5 * ffd_group.warping_index()
    assert result.posterior.shape[0] == int(ffd_group.labels.max()) + 1


def test_rigid_recovery_and_zero_mean():
    group = misaligned_phantom(dim=2, downsample=4, kind="rigid", magnitude=6.0, seed=1)
    stages = [StageConfig.named("rigid", iterations=80, levels=1)]
    result = run(group, stages=stages)
    assert group.warping_index(result.transform) < 0.3 * group.warping_index()
    rigid = result.transform.stages[0]
    assert rigid.angles.mean().abs() < 1e-6


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_zero_mean_constraint_after_every_step(ffd_group, iterations):
    result = run(ffd_group, iterations=iterations)
    points = ffd_group.grid.points().reshape(-1, 2)
    with torch.no_grad():
        mapped = result.transform(points)
    assert (mapped - points).abs().max() > 1e-4  # it moved
    torch.testing.assert_close(mapped.mean(0), points, atol=1e-4, rtol=0)


def test_group_to_reference_keeps_reference_fixed(ffd_group):
    result = run(ffd_group, iterations=10, reference=1)
    points = ffd_group.grid.points().reshape(-1, 2)
    with torch.no_grad():
        mapped = result.transform(points)
    torch.testing.assert_close(mapped[1], points)
    assert (mapped[0] - points).abs().max() > 1e-3


def test_seeded_runs_are_identical(ffd_group):
    a = run(ffd_group, iterations=5, seed=7)
    b = run(ffd_group, iterations=5, seed=7)
    c = run(ffd_group, iterations=5, seed=8)
    pa, pb, pc = (r.transform.stages[0].levels[0].coefficients for r in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    assert a.x_metric == b.x_metric


def test_result_contents(ffd_group):
    result = run(ffd_group, iterations=4, num_classes=3)
    assert result.posterior.shape == (3, *ffd_group.grid.shape)
    torch.testing.assert_close(result.posterior.sum(0), torch.ones(ffd_group.grid.shape))
    assert result.stages[0].iterations == 4
    assert torch.isfinite(torch.tensor(result.x_metric)) and result.x_metric > 0
    assert torch.isfinite(torch.tensor(result.log_likelihood))


def test_multilevel_schedule(ffd_group):
    stages = [
        StageConfig(name="ffd", iterations=9, lr=0.2, levels=2, ffd_levels=3, ffd_spacing=40.0)
    ]
    result = run(ffd_group, stages=stages)
    report = result.stages[0]
    assert [lvl["iterations"] for lvl in report.levels] == [3, 3, 3]
    assert report.levels[0]["grid"] != report.levels[-1]["grid"]
    ffd = result.transform.stages[0]
    assert [lvl.spacing[0] for lvl in ffd.levels] == [40.0, 20.0, 10.0]


def test_input_validation(ffd_group):
    engine = XCoReg(XCoRegConfig(progress=False))
    with pytest.raises(ValueError, match="at least 2 images"):
        engine.register(ffd_group.images[:1], ffd_group.grid)
    with pytest.raises(ValueError, match="expected images of shape"):
        engine.register(ffd_group.images[..., :-1], ffd_group.grid)
    with pytest.raises(ValueError, match="xcoreg-gt"):
        XCoReg(XCoRegConfig(method="xcoreg-gt")).register(ffd_group.images, ffd_group.grid)
    with pytest.raises(ValueError, match="unknown stage"):
        StageConfig(name="spline")
    with pytest.raises(ValueError, match="sample_rate"):
        XCoRegConfig(sample_rate=0)


@pytest.mark.parametrize("name", available_presets())
def test_presets_load(name):
    config = load_preset(name, seed=3)
    assert config.seed == 3 and config.stages
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("no-such-preset")


def test_finest_level_of_a_coarse_to_fine_stage():
    stage = load_preset("brain2d").stages[0]  # 40 mm then 20 mm, 2 resolution levels
    finest = stage.finest_level()
    assert (finest.levels, finest.ffd_levels, finest.ffd_spacing) == (1, 1, 20.0)
    assert (stage.levels, stage.ffd_levels, stage.ffd_spacing) == (2, 2, 40.0)  # a copy
    assert finest.iterations == stage.iterations and finest.lr == stage.lr
    three = StageConfig(name="ffd", ffd_spacing=80.0, ffd_levels=3).finest_level()
    assert three.ffd_spacing == 20.0


# ---------------------------------------------------------------------- robustness (issue 6)
def test_composed_transform_is_zero_mean(ffd_group):
    """Eq. (37) on the composed phi = rigid o FFD, not per stage: the mean displacement over
    the group is below 1e-4 mm everywhere on the lattice."""
    stages = [
        StageConfig.named("rigid", iterations=15, levels=1),
        StageConfig(name="ffd", iterations=10, lr=0.2, ffd_spacing=40.0),
    ]
    result = run(ffd_group, stages=stages, em_warmup=2, inits=1)
    assert [s["accepted"] for s in result.diagnostics["stages"]] == [True, True]
    rigid = result.transform.stages[0]
    assert rigid.angles.abs().max() > 1e-3  # the rotations alone are not zero-mean exactly
    points = ffd_group.grid.points()
    with torch.no_grad():
        drift = (result.transform.lattice(ffd_group.grid).mean(0) - points).norm(dim=-1)
    assert drift.max() < 1e-4, drift.max()
    assert result.diagnostics["mean_displacement_mm"]["max"] < 1e-4


def test_aligned_group_stays_aligned():
    """A group already in alignment (the phantom, no misalignment) is left in alignment."""
    group = misaligned_phantom(dim=2, downsample=4, magnitude=0.0, spacing=40.0, seed=3)
    assert group.warping_index() < 1e-6
    result = run(group, iterations=40, em_warmup=5, inits=2)
    labels = warp_images(group.labels, group.grid, result.transform, mode="nearest")
    assert pairwise_dice(labels, [1, 2, 3])["mean"] >= 0.95
    assert group.warping_index(result.transform) < 0.6  # a small fraction of a 4 mm voxel


def test_larger_group_registers_without_collapse():
    """N = 12 (four noisy realisations of T1/T2/PD): the X-metric stays positive and gWI falls
    by more than half (at N ~ 50 an empty class used to swallow the posterior, X -> 0)."""
    group = misaligned_phantom(
        dim=2, realisations=4, downsample=4, magnitude=5.5, spacing=40.0, seed=5
    )
    result = run(group, iterations=80, sample_rate=0.3, em_warmup=5, inits=2)
    assert result.x_metric > 0.5
    assert group.warping_index(result.transform) < 0.5 * group.warping_index()


def test_overlap_guard_restarts_then_keeps_the_start(ffd_group):
    """Steps of 40 mm push the images out of each other's view: every try trips the overlap
    guard, the step is halved between tries, and the stage is left at its start (no harm)."""
    stages = [StageConfig.named("translation", iterations=20, lr=40.0)]
    result = run(ffd_group, stages=stages, restarts=2, min_overlap=0.9, em_warmup=2, inits=1)
    record = result.diagnostics["stages"][0]
    assert record["restarts"] == 2 and not record["accepted"]
    assert [t["lr"] for t in record["tries"]] == [40.0, 20.0, 10.0]
    assert all("overlap fell" in t["outcome"] for t in record["tries"])
    assert all(t["min_overlap_fraction"] < 0.9 for t in record["tries"])
    assert torch.count_nonzero(result.transform.stages[0].offset) == 0
    json.dumps(result.diagnostics)  # JSON-able for report.json


def test_objective_check_rejects_a_worse_stage(ffd_group, monkeypatch):
    """A stage that ends with a lower X than it started with is undone (here the optimiser is
    made to ascend the loss, i.e. to descend X)."""
    original = torch.optim.Adam

    def ascent(params, **kw):
        return original(params, maximize=True, **kw)

    monkeypatch.setattr(torch.optim, "Adam", ascent)
    stages = [StageConfig(name="ffd", iterations=15, lr=0.5, ffd_spacing=40.0)]
    result = run(ffd_group, stages=stages, restarts=1, em_warmup=3, inits=1, min_overlap=0.0)
    record = result.diagnostics["stages"][0]
    assert not record["accepted"]
    assert all(t["outcome"] == "objective decreased" for t in record["tries"])
    assert all(t["x_after"] < t["x_start"] for t in record["tries"])
    assert torch.count_nonzero(result.transform.stages[0].levels[0].coefficients) == 0


def test_zero_filled_border_is_outside_the_field_of_view():
    images = torch.rand(2, 12, 10) + 0.1
    images[0, :, :3] = 0  # zero-filled band (beyond the field of view)
    images[1, 4:6, 4:6] = 0  # zeros inside the image: kept
    mask = padding_mask(images)
    assert mask[0, :, :3].all() and not mask[0, :, 3:].any()
    assert not mask[1].any()


def test_auto_config_follows_the_data():
    from dcc.spatial.grid import Grid

    crop = auto_config(Grid.from_shape((224, 224), 0.75), seed=2)
    preset = load_preset("cardiac2d")
    assert [(s.name, s.levels, s.ffd_spacing) for s in crop.stages] == [
        (s.name, s.levels, s.ffd_spacing) for s in preset.stages
    ]
    assert (crop.num_classes, crop.bins, crop.seed) == (preset.num_classes, preset.bins, 2)
    full = auto_config(Grid.from_shape((511, 511), 0.75))
    assert full.stages[0].levels == 4  # coarsest level still 63 voxels wide
    assert full.stages[1].levels == preset.stages[1].levels  # the FFD's pyramid is the preset's
    small = auto_config(Grid.from_shape((60, 60), 1.0))
    assert [s.name for s in small.stages] == ["rigid"] and small.stages[0].levels == 1
    volume = auto_config(Grid.from_shape((40, 64, 64), 2.0))
    assert [s.name for s in volume.stages] == ["translation", "rigid"]
    assert volume.num_classes == load_preset("rire3d").num_classes


def test_independent_tries_draw_fresh_samples(ffd_group):
    """Two tries end apart (fresh coordinate samples); of two, both are the medoid and the first
    is kept (X does not rank tries: see the medoid test below)."""
    stages = [StageConfig(name="ffd", iterations=8, lr=0.2, ffd_spacing=40.0, tries=2)]
    result = run(ffd_group, stages=stages, em_warmup=2, inits=1)
    record = result.diagnostics["stages"][0]
    assert [t["outcome"] for t in record["tries"]] == ["accepted", "accepted"]
    assert record["tries"][0]["x_after"] != record["tries"][1]["x_after"]  # fresh samples
    assert record["chosen_try"] == 0 and record["chosen_x"] == record["tries"][0]["x_after"]
    with pytest.raises(ValueError, match="tries"):
        StageConfig(name="rigid", tries=0)


def _rings(shift=(0.0, 0.0), size=32):
    """Label map of a disk (2) inside a ring (1), centre moved by ``shift`` voxels (x, y)."""
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    r = ((x - 15.5 - shift[0]) ** 2 + (y - 15.5 - shift[1]) ** 2).sqrt()
    return (r < 9).long() + (r < 5).long()


def test_mvmm_registers_known_shifts_to_the_atlas():
    """MvMM (atlas prior + EM + gradient steps): three images of one anatomy in different
    contrasts, each moved by a known shift from the atlas, are mapped back to it (phi_j = id + u
    with u_j = the shift near the structure) and the log-likelihood (Eq. 23) increases."""
    from scipy import ndimage

    from dcc.coreg.mvmm import MvMMConfig, register_mvmm

    shifts = [(2.0, 0.0), (0.0, -2.0), (-1.0, 1.0)]
    contrast = torch.tensor([[0.2, 0.9, 0.5], [0.8, 0.3, 0.1], [0.1, 0.5, 1.0]])
    clean = torch.stack([contrast[j][_rings(s)] for j, s in enumerate(shifts)]).numpy()
    images = torch.from_numpy(ndimage.gaussian_filter(clean, (0, 1.5, 1.5)))
    images += 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    config = MvMMConfig(iterations=60, lr=0.2, ffd_spacing=16.0, bins=16, mask_zero_fill=False)
    result = register_mvmm(images, _rings(), spacing=(1.0, 1.0), config=config)
    assert result.displacement.shape == (3, 2, 32, 32)
    centre = result.displacement[:, :, 12:20, 12:20].mean((-1, -2))
    assert torch.allclose(centre, torch.tensor(shifts), atol=0.6), centre
    assert result.log_likelihood_after > result.log_likelihood_before + 0.1
    assert result.posterior.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="atlas labels"):
        register_mvmm(images, _rings()[:30], config=config)


def test_deterministic_kernels_restores_the_global_setting():
    from dcc.coreg.engine import deterministic_kernels

    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.zeros(3).index_add_(0, torch.tensor([0, 0]), torch.ones(2))[0] == 2
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic_kernels(False):
        assert torch.are_deterministic_algorithms_enabled() == before


def test_coordinate_sample_is_seeded_on_the_cpu_generator():
    from dcc.coreg.engine import coordinate_sample

    overlap = torch.rand(1000, generator=torch.Generator().manual_seed(0)) > 0.2
    a = coordinate_sample(overlap, 0.3, torch.Generator().manual_seed(5))
    b = coordinate_sample(overlap, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and overlap[a].all()
    assert 0.2 < a.numel() / overlap.sum() < 0.4


def test_cosine_step_decay_and_its_validation():
    from dcc.coreg.config import StageConfig
    from dcc.coreg.engine import cosine_factor

    factors = [cosine_factor(s, 10, 0.05) for s in range(11)]
    assert factors[0] == 1 and factors[-1] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert factors[5] == pytest.approx(0.525)
    assert all(cosine_factor(s, 10, 1.0) == 1 for s in range(11))  # lr_final 1: constant
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="lr_final"):
            StageConfig(lr_final=bad)


# ---------------------------------------------------------------------- masks and roi
def _translation_config(**kw):
    stages = [StageConfig(name="translation", iterations=15, lr=0.3, levels=1)]
    return XCoRegConfig(stages=stages, progress=False, mask_zero_fill=False, **kw)


def test_roi_everywhere_is_no_roi(ffd_group):
    config = XCoRegConfig(
        stages=[StageConfig(name="ffd", iterations=10, lr=0.2, ffd_spacing=40.0)],
        progress=False, mask_zero_fill=False, em_warmup=3, inits=1,
    )
    plain = XCoReg(config).register(ffd_group.images, ffd_group.grid)
    everywhere = torch.ones(ffd_group.grid.shape, dtype=torch.bool)
    with_roi = XCoReg(config).register(ffd_group.images, ffd_group.grid, roi=everywhere)
    grid = ffd_group.grid
    assert torch.equal(plain.transform.lattice(grid), with_roi.transform.lattice(grid))
    assert plain.x_metric == with_roi.x_metric


def test_voxels_outside_the_roi_change_nothing(ffd_group):
    """Image content far (> the largest motion) outside a common-space roi is never read."""
    images, grid = ffd_group.images, ffd_group.grid
    roi = torch.zeros(grid.shape, dtype=torch.bool)
    h, w = grid.shape
    roi[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    far = torch.ones(grid.shape, dtype=torch.bool)
    far[h // 4 - 5 : 3 * h // 4 + 5, w // 4 - 5 : 3 * w // 4 + 5] = False
    noisy = images.clone()
    noisy[:, far] = torch.rand(images.shape[0], int(far.sum())) * images.max()
    config = _translation_config()
    a = XCoReg(config).register(images, grid, roi=roi)
    b = XCoReg(config).register(noisy, grid, roi=roi)
    assert a.transform.stages[0].offset.abs().max() < 4.0  # motion well inside the 5-voxel band
    assert torch.equal(a.transform.stages[0].offset, b.transform.stages[0].offset)
    assert a.x_metric == b.x_metric
    c = XCoReg(config).register(noisy, grid)  # without the roi the noise is registered too
    assert not torch.equal(a.transform.stages[0].offset, c.transform.stages[0].offset)


def test_voxels_outside_the_masks_change_nothing(ffd_group):
    """Per-image masks (multiplied into ``valid``): voxels two or more voxels outside image j's
    mask never enter its histograms, posterior or sample, so changing them changes nothing."""
    images, grid = ffd_group.images, ffd_group.grid
    n, (h, w) = images.shape[0], grid.shape
    masks = torch.zeros(images.shape)
    for j in range(n):  # a different box per image
        masks[j, 3 + j : h - 6 + j, 4 : w - 4 - j] = 1
    far = torch.nn.functional.max_pool2d(masks[:, None], 5, stride=1, padding=2)[:, 0] == 0
    noisy = torch.where(far, torch.rand(images.shape) * images.max(), images)
    config = _translation_config()
    a = XCoReg(config).register(images, grid, valid=masks)
    b = XCoReg(config).register(noisy, grid, valid=masks)
    assert torch.equal(a.transform.stages[0].offset, b.transform.stages[0].offset)
    c = XCoReg(config).register(noisy, grid)
    assert not torch.equal(a.transform.stages[0].offset, c.transform.stages[0].offset)


def test_roi_is_checked(ffd_group):
    with pytest.raises(ValueError, match="roi must have the grid's shape"):
        XCoReg(_translation_config()).register(
            ffd_group.images, ffd_group.grid, roi=torch.ones(3, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="roi.*empty"):
        XCoReg(_translation_config()).register(
            ffd_group.images, ffd_group.grid, roi=torch.zeros(ffd_group.grid.shape, dtype=bool)
        )


# ---------------------------------------------------------------------- several tries
def test_tries_keep_the_medoid_and_warn_when_they_disagree(ffd_group):
    """Of several tries the one closest to the others is kept (not the highest X); a rejected
    try votes for the start; a spread above spread_warning names the image."""
    from dcc.spatial.transforms import Translation

    grid, n = ffd_group.grid, 3

    def moved(offsets):
        stage = Translation(n, 2)
        with torch.no_grad():
            stage.offset.copy_(torch.tensor(offsets, dtype=torch.float32))
        return stage

    near = [[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]
    nearer = [[1.2, 0.0], [0.0, 0.0], [-1.2, 0.0]]
    far = [[1.0, 0.0], [0.0, 0.0], [-13.0, 0.0]]
    engine = XCoReg(_translation_config())
    cfg = StageConfig(name="translation", tries=3, spread_warning=5.0)
    # the far try has the highest X but the two near ones agree
    candidates = [(1.0, moved(near), None, None), (9.0, moved(far), None, None),
                  (1.1, moved(nearer), None, None)]
    record = {}
    chosen = engine._choose(candidates, record, grid, n, "cpu", cfg)
    assert chosen is candidates[0] or chosen is candidates[2]
    assert record["chosen_try"] in (0, 2)
    assert record["warnings"][0]["image"] == 2  # 13 mm from the medoid on image 2
    assert record["spread_mm"][2] > 10 and record["spread_mm"][0] < 1
    # two rejected tries (votes for the start) outvote one accepted far try
    record = {}
    assert engine._choose([None, (9.0, moved(far), None, None), None], record, grid, n, "cpu",
                          cfg) is None
    # tries that agree raise no warning
    record = {}
    engine._choose([(1.0, moved(near), None, None), (1.0, moved(nearer), None, None)], record,
                   grid, n, "cpu", cfg)
    assert "warnings" not in record


def test_settings_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("num_classes: 5\nstages:\n  - {name: rigid, iterations: 7, tries: 3}\n")
    config = load_preset(str(path), seed=4)
    assert config.num_classes == 5 and config.seed == 4
    assert config.stages[0].name == "rigid" and config.stages[0].tries == 3
    (tmp_path / "bad.yaml").write_text("num_clases: 5\n")
    with pytest.raises(ValueError, match="unknown settings num_clases"):
        load_preset(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="settings file not found"):
        load_preset(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("skip", [True, False])
def test_ffd_after_a_rejected_linear_stage_is_skipped_and_flagged(ffd_group, skip):
    stages = [
        StageConfig.named("translation", iterations=10, lr=40.0),  # trips the overlap guard
        StageConfig(name="ffd", iterations=10, lr=0.2, ffd_spacing=40.0),
    ]
    result = run(ffd_group, stages=stages, restarts=0, min_overlap=0.9, em_warmup=2, inits=1,
                 skip_ffd_after_rejected_linear=skip)
    translation, ffd = result.diagnostics["stages"]
    assert not translation["accepted"]
    if skip:
        assert ffd["skipped"] and not ffd["accepted"] and len(result.transform.stages) == 1
        warning = ffd["warnings"][0]
        assert "translation stage was rejected" in warning["message"]
        assert "slid out of the overlap" in warning["message"]
        assert warning["image"] in {t["image"] for t in translation["tries"]}
        assert result.stages[1].iterations == 0
    else:
        assert "skipped" not in ffd
        assert result.transform.stages[1].levels[0].coefficients.abs().max() > 0
    json.dumps(result.diagnostics)


HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("stage", ["ffd", "rigid"])
def test_a_step_reads_from_the_device_twice(ffd_group, monkeypatch, stage):
    """Each step of the engine waits for the device twice: for the coordinate sample's size and
    for one transfer of the overlap, X and the loss (issue #22; on CUDA every host read waits
    for all queued kernels). Counted on the engine's own calls, per extra step."""
    calls = []

    def counting(name, read):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}dcc{os.sep}" in caller:
                calls.append(name)
            return read(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    def reads(iterations):
        calls.clear()
        stages = ([StageConfig(name="ffd", iterations=iterations, lr=0.2, ffd_spacing=40.0)]
                  if stage == "ffd" else [StageConfig.named("rigid", iterations=iterations,
                                                            levels=1)])
        run(ffd_group, stages=stages, em_warmup=2, inits=1)
        return len(calls)

    assert (reads(16) - reads(8)) / 8 == 2


def test_the_engine_runs_without_simpleitk(tmp_path):
    """SimpleITK only converts grids and transforms for I/O: the engine, the phantom and the
    networks import and register without it (a GPU image that lacks it, issue #22)."""
    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"
        "import dcc.coreg, dcc.nets, dcc.losses\n"
        "from dcc.coreg import StageConfig, XCoReg, XCoRegConfig\n"
        "from dcc.data.misalignment import misaligned_phantom\n"
        "group = misaligned_phantom(dim=2, downsample=8, magnitude=4.0, spacing=40.0, seed=1)\n"
        "config = XCoRegConfig(stages=[StageConfig(name='ffd', iterations=4, ffd_spacing=40.0)],\n"
        "                      progress=False, em_warmup=1, inits=1)\n"
        "result = XCoReg(config).register(group.images, group.grid)\n"
        "print(result.x_metric)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) > 0
