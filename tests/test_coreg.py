"""X-CoReg engine: recovery of known misalignments, constraints, determinism."""

import pytest
import torch

from dcc.coreg import StageConfig, XCoReg, XCoRegConfig, load_preset
from dcc.coreg.config import available_presets
from dcc.data.misalign import misaligned_phantom


@pytest.fixture(scope="module")
def ffd_group():
    # 4 mm phantom slice (59 x 50), known FFD misalignment of about 3 mm gWI.
    return misaligned_phantom(dim=2, downsample=4, magnitude=5.5, spacing=40.0, seed=3)


def run(group, iterations=60, **kw):
    stages = kw.pop(
        "stages", [StageConfig(name="ffd", iterations=iterations, lr=0.2, ffd_spacing=40.0)]
    )
    config = XCoRegConfig(
        stages=stages, progress=False, sample_rate=kw.pop("sample_rate", 0.5), tolerance=0, **kw
    )
    return XCoReg(config).register(group.images, group.grid, labels=kw.get("labels"))


def test_recovers_known_ffd_misalignment():
    # 2 mm phantom slice (117 x 99): gWI must drop by more than 80 %.
    group = misaligned_phantom(dim=2, downsample=2, magnitude=5.5, spacing=40.0, seed=3)
    before = group.warping_index()
    result = run(group, iterations=100)
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
