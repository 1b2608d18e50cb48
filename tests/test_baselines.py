"""The competing groupwise metrics (CTE, APE, GMM, CG, VI) against direct computations, their
gradients, and registrations with each in the X-CoReg engine."""

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from dcc.cli.register import main
from dcc.coreg import StageConfig, XCoReg, XCoRegConfig
from dcc.coreg.config import BASELINES
from dcc.data.io import write_image
from dcc.data.misalignment import _misaligned, misaligned_phantom, random_rigid
from dcc.data.phantom import brain_phantom
from dcc.similarity import baselines as B
from dcc.similarity import functional as XF
from dcc.similarity.modules import GaussianMixture, group_objective

BINS = 16


def bspline3(x):
    """The cubic B-spline beta_3, NumPy."""
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def np_parzen(u, bins=BINS):
    """Dense Parzen weights (m, L) of values in bin units, NumPy."""
    return bspline3(u[:, None] - np.arange(bins)[None, :])


def np_mi(p):
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())


def np_entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture
def values():
    """4 images x 50 points in bin units [1.5, L - 2.5] (away from the clamp), float64."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(50, generator=g, dtype=torch.float64)
    rows = [base, 1 - base, base**2, torch.rand(50, generator=g, dtype=torch.float64)]
    return 1.5 + (BINS - 4) * torch.stack(rows)


def test_variance_of_intensities_is_numpy_var(values):
    units = B.unit_intensities(values, BINS)
    ends = B.unit_intensities(torch.tensor([1.0, BINS - 2.0]), BINS)  # the bin range -> [0, 1]
    assert ends.tolist() == [0.0, 1.0]
    expected = np.var(units.numpy(), axis=0).mean()
    assert math.isclose(B.variance_of_intensities(units).item(), expected, rel_tol=1e-12)
    assert math.isclose(group_objective("vi")(values, BINS).item(), -expected, rel_tol=1e-12)


def test_congealing_entropy_is_the_leave_one_out_parzen_entropy(values):
    units = B.unit_intensities(values, BINS).numpy()
    sigma = 0.05
    n, m = units.shape
    total = 0.0
    for x in range(m):
        for i in range(n):
            density = np.mean([np.exp(-0.5 * ((units[i, x] - units[j, x]) / sigma) ** 2)
                               / (sigma * np.sqrt(2 * np.pi)) for j in range(n) if j != i])
            total -= np.log(density) / n
    got = B.congealing_entropy(torch.from_numpy(units), sigma).item()
    assert math.isclose(got, total / m, rel_tol=1e-10)
    # concentrated stacks have lower entropy
    same = torch.from_numpy(units[:1]).repeat(4, 1) + 0.01 * torch.arange(4.0).unsqueeze(1)
    assert B.congealing_entropy(same.double(), sigma) < got
    assert group_objective("cg", congealing_sigma=0.1).sigma == 0.1


def test_ape_is_the_sum_of_pairwise_mutual_information(values):
    got = B.accumulated_pairwise_mi(values, BINS).item()
    # the engine's Parzen histogram with image j's Parzen weights as the "posterior"
    engine = sum(
        XF.mutual_information(XF.joint_histogram(
            values[i : i + 1], B.parzen_weights(values[j], BINS), BINS)).item()
        for i, j in combinations(range(4), 2)
    )
    w = [np_parzen(v) for v in values.numpy()]
    numpy = sum(np_mi(w[i].T @ w[j] / values.shape[1]) for i, j in combinations(range(4), 2))
    assert math.isclose(got, engine, rel_tol=1e-9)
    assert math.isclose(got, numpy, rel_tol=1e-9)
    assert got > 0


def test_cte_template_is_the_first_principal_component(values):
    template = B.principal_template(values).numpy()
    v = values.numpy()
    z = (v - v.mean(1, keepdims=True)) / v.std(1, keepdims=True)
    _, _, vt = np.linalg.svd(z.T, full_matrices=False)
    scores = z.T @ vt[0]
    assert np.allclose(template, scores) or np.allclose(template, -scores)
    # and the conditional entropies from NumPy Parzen pmfs of each image and the template
    t = 1 + (BINS - 3) * (template - template.min()) / (template.max() - template.min())
    wt = np_parzen(t)
    expected = 0.0
    for row in v:
        joint = np_parzen(row).T @ wt / v.shape[1]
        expected += np_entropy(joint) - np_entropy(joint.sum(0))
    got = B.conditional_template_entropy(values, BINS).item()
    assert math.isclose(got, expected, rel_tol=1e-9)
    assert math.isclose(group_objective("cte")(values, BINS).item(), -expected, rel_tol=1e-9)


def test_gmm_em_matches_the_closed_forms_and_increases_the_likelihood():
    rng = np.random.default_rng(0)
    a = rng.multivariate_normal([0.2, 0.7], [[0.004, 0.001], [0.001, 0.002]], 300)
    b = rng.multivariate_normal([0.7, 0.3], [[0.003, -0.001], [-0.001, 0.005]], 100)
    x = np.concatenate([a, b])  # (m, N)
    values = torch.from_numpy(x.T.copy())
    state = B.gmm_init(values, 2)
    # the start separates the components: the quantile bands of the mean intensity
    assert not torch.allclose(state.means[0], state.means[1], atol=0.05)
    # the log-likelihood against SciPy's densities
    w = state.log_weights.exp().numpy()
    dens = sum(w[k] * multivariate_normal(state.means[k].numpy(), state.covariances[k].numpy())
               .pdf(x) for k in range(2))
    assert math.isclose(B.gmm_log_likelihood(values, state).item(), np.log(dens).mean(),
                        rel_tol=1e-9)
    # one EM step against the closed forms in NumPy
    comp = np.stack([w[k] * multivariate_normal(state.means[k].numpy(),
                                                state.covariances[k].numpy()).pdf(x)
                     for k in range(2)], 1)
    resp = comp / comp.sum(1, keepdims=True)
    mass = resp.sum(0)
    means = resp.T @ x / mass[:, None]
    covs = [((resp[:, k, None] * (x - means[k])).T @ (x - means[k])) / mass[k]
            + B.GMM_RIDGE * np.eye(2) for k in range(2)]
    step = B.gmm_em_step(values, state)
    assert np.allclose(step.log_weights.exp().numpy(), mass / len(x))
    assert np.allclose(step.means.numpy(), means)
    assert np.allclose(step.covariances.numpy(), np.stack(covs))
    # EM never lowers the likelihood, and finds the two clusters
    lls = [B.gmm_log_likelihood(values, state).item()]
    for _ in range(30):
        state = B.gmm_em_step(values, state)
        lls.append(B.gmm_log_likelihood(values, state).item())
    assert all(b >= a - 1e-9 for a, b in zip(lls, lls[1:], strict=False))
    assert lls[-1] > lls[0] + 0.1
    order = state.means[:, 0].argsort()
    assert np.allclose(state.means[order].numpy(), [[0.2, 0.7], [0.7, 0.3]], atol=0.02)
    assert np.allclose(state.log_weights.exp()[order].numpy(), [0.75, 0.25], atol=0.01)


@pytest.mark.parametrize("method", BASELINES)
def test_gradients(method, values):
    objective = group_objective(method, num_classes=2, congealing_sigma=0.1)
    small = values[:3, :12].clone()
    state = objective.init(small, BINS)
    state = objective.update(small, BINS, state)
    small.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: objective(v, BINS, state), (small,), atol=1e-6)


def monomodal_group():
    """Four noisy T1 images of the 4 mm phantom slice under known rigid maps."""
    phantom = brain_phantom(dim=2, contrasts=("T1",), realisations=4, downsample=4)
    return _misaligned(phantom, 4, random_rigid(4, phantom.grid, 6.0, 6.0, seed=2))


@pytest.fixture(scope="module")
def groups():
    multimodal = misaligned_phantom(dim=2, downsample=4, kind="rigid", magnitude=6.0, seed=1)
    return {"multi": multimodal, "mono": monomodal_group()}


@pytest.mark.parametrize("method", BASELINES)
def test_registration_recovers_a_rigid_misalignment(method, groups):
    group = groups["mono" if method in ("vi", "cg") else "multi"]
    config = XCoRegConfig(stages=[StageConfig.named("rigid", iterations=60, levels=1)],
                          method=method, progress=False, sample_rate=0.5, mask_zero_fill=False)
    result = XCoReg(config).register(group.images, group.grid)
    before, after = group.warping_index(), group.warping_index(result.transform)
    assert before > 2.5
    assert after < 0.5 * before, f"{method}: gWI {before:.2f} -> {after:.2f} mm"
    stage = result.diagnostics["stages"][0]
    assert stage["accepted"] and stage["tries"][0]["x_after"] > stage["tries"][0]["x_start"]
    assert result.diagnostics["objective"]["method"] == method
    assert result.transform.stages[0].angles.mean().abs() < 1e-6  # Eq. (37)
    assert math.isfinite(result.x_metric) and result.posterior.shape[0] == config.num_classes


def test_group_to_reference_with_a_baseline(groups):
    group = groups["mono"]
    config = XCoRegConfig(stages=[StageConfig.named("rigid", iterations=60, levels=1)],
                          method="cg", reference=0, progress=False, sample_rate=0.5,
                          mask_zero_fill=False)
    result = XCoReg(config).register(group.images, group.grid)
    rigid = result.transform.stages[0]
    assert rigid.angles[0].abs().max() == 0 and rigid.offset[0].abs().max() == 0
    assert result.transform.stages[0].angles[1:].abs().max() > 0


def test_gmm_state_is_carried_and_refused_in_distributed_mode(groups):
    group = groups["multi"]
    config = XCoRegConfig(method="gmm", progress=False)
    assert isinstance(XCoReg(config).objective, GaussianMixture)
    assert XCoReg(XCoRegConfig(progress=False)).objective is None
    with pytest.raises(ValueError, match="not supported in distributed mode"):
        XCoReg(config).register(group.images, group.grid, distributed=True)
    with pytest.raises(ValueError, match="congealing_sigma"):
        XCoRegConfig(method="cg", congealing_sigma=0)
    with pytest.raises(ValueError, match="unknown method"):
        XCoRegConfig(method="pca")


def test_cli_variance_of_intensities(tmp_path, capsys):
    group = monomodal_group()
    paths = []
    for j, image in enumerate(group.images):
        paths.append(str(tmp_path / f"t1_{j}.nii.gz"))
        write_image(paths[-1], image, group.grid)
    out = tmp_path / "out"
    code = main([*paths, "--method", "vi", "--stages", "rigid", "--iterations", "40",
                 "--levels", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "vi objective" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["method"] == "vi"
    objective = report["diagnostics"]["objective"]
    assert objective["method"] == "vi" and objective["value"] > report["diagnostics"][
        "stages"][0]["x_before"]
    assert (out / "report.json").is_file()


def test_a_competing_metric_is_checked_on_the_overlap_both_alignments_share():
    """Large translations of a zero-background group: aligning shrinks the field-of-view
    overlap, and CTE compared on the two different regions rejected its stage (as its open-MS
    stages, which had found the alignment); on the shared voxels the stage is kept."""
    phantom = brain_phantom(dim=2, downsample=4)
    group = _misaligned(phantom, 3, random_rigid(3, phantom.grid, 0.0, 25.0, seed=4))
    before = group.warping_index()
    for method, most in (("cte", before - 1.0), ("gmm", 1.5)):
        config = XCoRegConfig(
            stages=[StageConfig.named("translation", iterations=60, levels=1)], method=method,
            progress=False, sample_rate=0.5, mask_zero_fill=False, min_overlap=0.4)
        result = XCoReg(config).register(group.images, group.grid)
        stage = result.diagnostics["stages"][0]
        assert stage["accepted"], (method, stage["tries"])
        assert group.warping_index(result.transform) < most, method
