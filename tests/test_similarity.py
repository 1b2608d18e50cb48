"""Tests of dcc.similarity: Parzen pmfs, mutual information, the X-metric (Eqs. 8, 17-21), the
common-space update (Eqs. 12, 14, 20, 22) and the EM property of Eq. (23)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcc.data.misalignment import warp_images
from dcc.similarity import XMetric
from dcc.similarity import functional as XF
from dcc.spatial.grid import Grid
from dcc.spatial.pyramid import gaussian_blur
from dcc.spatial.transforms import Translation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def beta3(t: float) -> float:
    """Independent scalar cubic B-spline."""
    a = abs(t)
    if a < 1:
        return 2 / 3 - a * a + a**3 / 2
    if a < 2:
        return (2 - a) ** 3 / 6
    return 0.0


def structured_values(
    n: int, m: int, k: int, bins: int, seed: int = 0, noise: float = 1.0, dtype=torch.float32
):
    """Values ``(n, m)`` in bin units drawn from ``k`` classes with per-image means, and labels."""
    gen = _gen(seed)
    labels = torch.randint(0, k, (m,), generator=gen)
    means = 2 + torch.rand(n, k, generator=gen, dtype=torch.float64) * (bins - 5)
    values = means[:, labels] + noise * torch.randn(n, m, generator=gen, dtype=torch.float64)
    return values.clamp(1, bins - 2).to(dtype), labels


def dense_joint_histogram(values, posterior, bins):
    """Brute-force Eq. (21): loops over images, points, levels and classes."""
    n, m = values.shape
    post = posterior if posterior.dim() == 3 else posterior.expand(n, *posterior.shape)
    k = post.shape[-1]
    hist = torch.zeros(n, bins, k, dtype=torch.float64)
    for j in range(n):
        for x in range(m):
            u = min(max(float(values[j, x]), 1.0), bins - 2.0)
            for mu in range(bins):
                w = beta3(u - mu)
                if w:
                    for c in range(k):
                        hist[j, mu, c] += w * float(post[j, x, c])
    return hist / hist.sum((1, 2), keepdim=True)


def entropy_of(p: torch.Tensor) -> torch.Tensor:
    """Entropy over all axes but the first, computed independently of dcc."""
    flat = p.flatten(1)
    return -torch.where(flat > 0, flat * torch.log(flat), torch.zeros_like(flat)).sum(1)


# ---------------------------------------------------------------------------- Parzen window
def test_parzen_window_partition_of_unity_and_indices():
    bins = 12
    # random values (some outside [1, L-2]), every level, the edges
    values = torch.cat(
        [
            torch.rand(2000, generator=_gen(0), dtype=torch.float64) * (bins + 4) - 2,
            torch.arange(1, bins - 1, dtype=torch.float64),
            torch.tensor([1.0, bins - 2.0, bins - 2.5, 1.0 + 1e-9], dtype=torch.float64),
        ]
    )
    index, weights = XF.parzen_window(values, bins)
    assert index.shape == weights.shape == (*values.shape, 4)
    assert index.dtype == torch.long
    assert index.min() >= 0 and index.max() <= bins - 1
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(values))
    # summed per level, the weights are beta_3 at the distances to the (clamped) value
    u = values.clamp(1, bins - 2)
    per_level = torch.zeros(len(values), bins, dtype=torch.float64).scatter_add(1, index, weights)
    for i in torch.randint(0, len(values), (50,), generator=_gen(1)).tolist() + [-4, -3, -1]:
        expected = torch.tensor(
            [beta3(float(u[i]) - mu) for mu in range(bins)], dtype=torch.float64
        )
        torch.testing.assert_close(per_level[i], expected, atol=1e-12, rtol=0)


def test_parzen_window_on_a_level():
    bins = 10
    for level in range(1, bins - 1):
        index, weights = XF.parzen_window(torch.tensor([float(level)]), bins)
        on = weights[0][index[0] == level].sum().item()
        assert on == pytest.approx(2 / 3, abs=1e-7)
        for nb in (level - 1, level + 1):
            assert weights[0][index[0] == nb].sum().item() == pytest.approx(1 / 6, abs=1e-7)


def test_parzen_window_differentiable():
    values = (1.2 + torch.rand(40, generator=_gen(2), dtype=torch.float64) * 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: XF.parzen_window(v, 10)[1], (values,))


# ---------------------------------------------------------------------------- joint histogram
def test_joint_histogram_normalised_and_marginals():
    n, m, k, bins = 3, 500, 4, 16
    values, labels = structured_values(n, m, k, bins)
    onehot = torch.nn.functional.one_hot(labels, k).float()
    joint = XF.joint_histogram(values, onehot, bins)
    assert joint.shape == (n, bins, k)
    assert (joint >= 0).all()
    torch.testing.assert_close(joint.sum((1, 2)), torch.ones(n))
    proportions = torch.bincount(labels, minlength=k).float() / m
    torch.testing.assert_close(joint.sum(1), proportions.expand(n, k))
    # the intensity marginal equals the Parzen histogram of the values alone
    ones = torch.ones(m, 1)
    torch.testing.assert_close(joint.sum(2), XF.joint_histogram(values, ones, bins)[..., 0])
    # unnormalised: total mass M (one unit per point)
    raw = XF.joint_histogram(values, onehot, bins, normalize=False)
    torch.testing.assert_close(raw.sum((1, 2)), torch.full((n,), float(m)))


@pytest.mark.parametrize("per_image", [False, True])
def test_joint_histogram_matches_brute_force(per_image):
    n, m, k, bins = 2, 25, 3, 8
    values = torch.rand(n, m, generator=_gen(3), dtype=torch.float64) * (bins + 1) - 0.5
    values[0, :3] = torch.tensor([1.0, 4.0, bins - 2.0], dtype=torch.float64)  # on levels/edges
    shape = (n, m, k) if per_image else (m, k)
    posterior = torch.softmax(torch.randn(*shape, generator=_gen(4), dtype=torch.float64), -1)
    joint = XF.joint_histogram(values, posterior, bins)
    torch.testing.assert_close(joint, dense_joint_histogram(values, posterior, bins))


def test_joint_histogram_differentiable():
    n, m, k, bins = 2, 20, 3, 8
    values = 1.5 + torch.rand(n, m, generator=_gen(5), dtype=torch.float64) * 4.5
    posterior = torch.softmax(torch.randn(m, k, generator=_gen(6), dtype=torch.float64), -1)
    values.requires_grad_()
    posterior.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, p: XF.joint_histogram(v, p, bins), (values, posterior)
    )


@pytest.mark.parametrize("per_image", [False, True])
def test_joint_histogram_analytic_backward_equals_autograd(per_image):
    """The analytic backward equals autograd through parzen_window and a scatter per point and
    level (the direct form of Eq. 21), also for values on and beyond the clamp bounds."""
    b, n, m, k, bins = 2, 3, 60, 4, 10
    gen = _gen(11)
    values = torch.rand(b, n, m, generator=gen, dtype=torch.float64) * (bins + 1) - 0.5
    values[0, 0, :4] = torch.tensor([1.0, 3.0, bins - 2.0, bins - 1.0], dtype=torch.float64)
    shape = (b, n, m, k) if per_image else (b, m, k)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64)
    upstream = torch.randn(b, n, bins, k, generator=gen, dtype=torch.float64)

    def direct(v, p):
        index, weights = XF.parzen_window(v, bins)  # (B, N, M, 4)
        post = p if per_image else p.unsqueeze(1).expand(b, n, m, k)
        src = weights.unsqueeze(-1) * post.unsqueeze(-2)  # (B, N, M, 4, K)
        hist = torch.zeros(b, n, bins, k, dtype=v.dtype)
        return hist.scatter_add(2, index.flatten(2, 3).unsqueeze(-1).expand(-1, -1, -1, k),
                                src.flatten(2, 3))

    grads = []
    for fn in (direct, lambda v, p: XF.joint_histogram(v, p, bins, normalize=False)):
        v, p = values.clone().requires_grad_(), logits.softmax(-1).requires_grad_()
        hist = fn(v, p)
        grads.append((hist.detach(), *torch.autograd.grad((hist * upstream).sum(), (v, p))))
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert grads[1][1][0, 0, 3] == 0  # beyond the clamp: no gradient


def test_joint_histogram_rejects_bad_posterior():
    with pytest.raises(ValueError):
        XF.joint_histogram(torch.full((2, 10), 3.0), torch.ones(9, 2) / 2, 8)


# ---------------------------------------------------------------------------- mutual information
def _self_labelled(levels=(2, 5, 8, 11), bins=14, m=400, seed=0):
    """Integer-level intensities and the one-hot posterior of their own level classes."""
    gen = _gen(seed)
    cls = torch.randint(0, len(levels), (m,), generator=gen)
    values = torch.tensor(levels, dtype=torch.float64)[cls].unsqueeze(0)
    posterior = torch.nn.functional.one_hot(cls, len(levels)).double()
    return values, posterior, cls


def test_mutual_information_of_image_with_its_own_classes_is_entropy():
    # levels 3 apart: the smoothed class-conditional pmfs have disjoint supports, so
    # H(K | U) = 0 and I(U; K) = H(K) exactly, Parzen smoothing notwithstanding
    bins = 14
    values, posterior, cls = _self_labelled(bins=bins)
    joint = XF.joint_histogram(values, posterior, bins)
    mi = XF.mutual_information(joint)
    p_k = torch.bincount(cls, minlength=4).double() / len(cls)
    torch.testing.assert_close(mi, XF.entropy(p_k).unsqueeze(0))
    torch.testing.assert_close(mi, entropy_of(p_k.unsqueeze(0)))
    # and the general identity I = H(mu) + H(k) - H(mu, k), computed independently
    expected = entropy_of(joint.sum(2)) + entropy_of(joint.sum(1)) - entropy_of(joint)
    torch.testing.assert_close(mi, expected)


def test_mutual_information_identity_on_random_joints():
    n, m, k, bins = 3, 300, 4, 12
    values, _ = structured_values(n, m, k, bins, seed=1, dtype=torch.float64)
    posterior = torch.softmax(3 * torch.randn(m, k, generator=_gen(2), dtype=torch.float64), -1)
    joint = XF.joint_histogram(values, posterior, bins)
    mi = XF.mutual_information(joint)
    expected = entropy_of(joint.sum(2)) + entropy_of(joint.sum(1)) - entropy_of(joint)
    torch.testing.assert_close(mi, expected)
    assert (mi >= 0).all()
    # independent posterior -> MI 0
    flat = torch.full((m, k), 1.0 / k, dtype=torch.float64)
    torch.testing.assert_close(
        XF.x_metric(values, flat, bins, reduction="none"),
        torch.zeros(n, dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )


def test_mutual_information_invariant_to_bijective_maps():
    bins = 14
    values, posterior, _ = _self_labelled(bins=bins, seed=3)
    base = XF.x_metric(values, posterior, bins)
    # relabelling the classes
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        torch.testing.assert_close(
            XF.x_metric(values, posterior[:, perm], bins), base, atol=1e-12, rtol=0
        )
    # flipping intensities u -> L-1-u maps levels to levels (and beta_3 is symmetric)
    torch.testing.assert_close(
        XF.x_metric(bins - 1 - values, posterior, bins), base, atol=1e-12, rtol=0
    )
    # the same for continuous intensities and a soft posterior
    n, m, k = 2, 300, 3
    vals, _ = structured_values(n, m, k, bins, seed=4, dtype=torch.float64)
    post = torch.softmax(2 * torch.randn(m, k, generator=_gen(5), dtype=torch.float64), -1)
    ref = XF.x_metric(vals, post, bins, reduction="none")
    torch.testing.assert_close(XF.x_metric(bins - 1 - vals, post, bins, reduction="none"), ref)
    torch.testing.assert_close(XF.x_metric(vals, post[:, [2, 0, 1]], bins, reduction="none"), ref)
    # shifting by a whole number of levels (staying inside [1, L-2]) changes nothing either
    shifted = XF.x_metric(values + 1, posterior, bins)
    torch.testing.assert_close(shifted, base, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- X-metric
def _numpy_mi(joint: np.ndarray) -> float:
    """I(mu; k) of one normalised joint table, written out with numpy."""
    p_mu = joint.sum(1, keepdims=True)
    p_k = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (p_mu @ p_k)[nz])).sum())


def test_mutual_information_of_hand_computed_tables():
    # 2 x 2: I = 0.8 ln(0.4 / 0.25) + 0.2 ln(0.1 / 0.25) = 0.19274... nats
    a = [[0.4, 0.1], [0.1, 0.4]]
    assert 0.8 * math.log(1.6) + 0.2 * math.log(0.4) == pytest.approx(0.1927448, abs=1e-7)
    # 3 levels x 2 classes with an empty cell; and an independent table (I = 0)
    b = [[0.3, 0.0], [0.1, 0.2], [0.0, 0.4]]
    c = np.outer([0.2, 0.5, 0.3], [0.6, 0.4]).tolist()
    expected_b = (
        0.3 * math.log(0.3 / (0.3 * 0.4))
        + 0.1 * math.log(0.1 / (0.3 * 0.4))
        + 0.2 * math.log(0.2 / (0.3 * 0.6))
        + 0.4 * math.log(0.4 / (0.4 * 0.6))
    )
    assert _numpy_mi(np.array(b)) == pytest.approx(expected_b, rel=1e-12)
    joints = torch.tensor([a + [[0.0, 0.0]], b, c], dtype=torch.float64)  # (N=3, L=3, K=2)
    mi = XF.mutual_information(joints)
    torch.testing.assert_close(
        mi, torch.tensor([0.8 * math.log(1.6) + 0.2 * math.log(0.4), expected_b, 0.0]).double()
    )
    # with a leading batch axis, in float32
    mi32 = XF.mutual_information(joints.float().expand(2, 3, 3, 2))
    torch.testing.assert_close(mi32, mi.float().expand(2, 3), atol=1e-6, rtol=0)


def test_x_metric_equals_independently_computed_mutual_informations():
    """X (Eq. 8) against brute-force Parzen tables (Eq. 21) and numpy MIs (Eq. 17)."""
    n, m, k, bins = 3, 60, 3, 10
    values, _ = structured_values(n, m, k, bins, seed=6, dtype=torch.float64)
    posterior = XF.random_posterior(m, k, _gen(7)).double()
    tables = dense_joint_histogram(values, posterior, bins).numpy()
    expected = torch.tensor([_numpy_mi(t) for t in tables], dtype=torch.float64)
    assert (expected > 0).all()
    torch.testing.assert_close(XF.x_metric(values, posterior, bins, reduction="none"), expected)
    torch.testing.assert_close(XF.x_metric(values, posterior, bins), expected.sum())
    torch.testing.assert_close(
        XF.x_metric(values, posterior, bins, reduction="mean"), expected.mean()
    )
    with pytest.raises(ValueError):
        XF.x_metric(values, posterior, bins, reduction="max")
    # the module
    for reduction in ("none", "sum", "mean"):
        module = XMetric(bins=bins, reduction=reduction)
        torch.testing.assert_close(
            module(values, posterior), XF.x_metric(values, posterior, bins, reduction=reduction)
        )
    assert "bins=16" in repr(XMetric(bins=16))


def _phantom(n: int = 48):
    """Three contrasts of a disc/ring/inclusion phantom with 4 tissue classes, smoothed, noisy."""
    grid = Grid.from_shape((n, n), spacing=1.0)
    pts = grid.points()
    centre = pts.reshape(-1, 2).mean(0)
    r = (pts - centre).norm(dim=-1)
    q = (pts - centre - torch.tensor([5.0, -3.0])).norm(dim=-1)
    labels = torch.zeros(n, n, dtype=torch.long)
    labels[r < 18] = 1
    labels[r < 12] = 2
    labels[q < 5] = 3
    means = torch.tensor([[0.0, 0.3, 0.7, 1.0], [0.0, 1.0, 0.5, 0.2], [0.1, 0.6, 1.0, 0.4]])
    images = gaussian_blur(means[:, labels].unsqueeze(1), 0.7)[:, 0]
    images = images + 0.02 * torch.randn(images.shape, generator=_gen(0))
    return images, labels, grid


def _x_after_em(values: torch.Tensor, k: int, bins: int, seed: int, iterations: int = 15):
    """X with the posterior of a few common-space updates (as XCoReg._update_common)."""
    gamma = XF.random_posterior(values.shape[1], k, _gen(seed))
    log_pi = torch.full((k,), -math.log(k))
    for _ in range(iterations):
        log_f = XF.appearance_model(values, gamma, bins)
        log_gamma, _ = XF.posterior(values, log_f, log_pi)
        gamma = log_gamma.exp()
        log_pi = torch.log(XF.proportions(gamma).clamp_min(XF.EPS))
    return XF.x_metric(values, gamma, bins).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_x_metric_rises_as_group_is_aligned(seed):
    images, _, grid = _phantom()
    bins, k = 24, 4
    offsets = torch.tensor([[3.0, -2.0], [-2.5, 1.5], [0.5, 2.5]])
    xs = []
    for s in (1.0, 0.5, 0.0):
        t = Translation(3, 2)
        with torch.no_grad():
            t.offset.copy_(offsets * s)
        warped = warp_images(images, grid, t)
        values = XF.normalize_intensities(warped, bins).reshape(3, -1)
        xs.append(_x_after_em(values, k, bins, seed))
    assert xs[0] < xs[1] < xs[2], xs


# ---------------------------------------------------------------------------- gradients
def test_x_metric_gradcheck():
    n, m, k, bins = 2, 40, 3, 10
    values, labels = structured_values(n, m, k, bins, seed=8, dtype=torch.float64)
    values = values.clamp(1.3, bins - 2.3).requires_grad_()  # inside the un-clamped range
    posterior = (0.7 * torch.nn.functional.one_hot(labels, k).double() + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, p: XF.x_metric(v, p, bins), (values, posterior))
    assert torch.autograd.gradcheck(
        lambda v: XF.x_metric(v, posterior.detach(), bins, reduction="none"), (values,)
    )


def test_x_metric_central_differences_float64():
    n, m, k, bins = 3, 200, 3, 12
    values, labels = structured_values(n, m, k, bins, seed=9, dtype=torch.float64)
    values = values.clamp(1.5, bins - 2.5).requires_grad_()
    posterior = torch.softmax(3 * torch.nn.functional.one_hot(labels, k).double(), -1)
    XF.x_metric(values, posterior, bins).backward()
    eps = 1e-3
    for idx in [(0, 0), (1, 17), (2, 123)]:
        with torch.no_grad():
            plus, minus = values.clone(), values.clone()
            plus[idx] += eps
            minus[idx] -= eps
            fd = XF.x_metric(plus, posterior, bins) - XF.x_metric(minus, posterior, bins)
        assert (fd / (2 * eps)).item() == pytest.approx(values.grad[idx].item(), rel=1e-2, abs=1e-6)


def test_x_metric_finite_under_bf16_autocast():
    n, m, k, bins = 2, 4000, 3, 16
    gen = _gen(10)
    labels = torch.randint(0, k, (m,), generator=gen)
    features = torch.randn(m, 4, generator=gen) + torch.nn.functional.one_hot(labels, 4) * 3
    weight = torch.randn(4, n, generator=gen, requires_grad=True)
    posterior = torch.nn.functional.one_hot(labels, k).float() * 0.9 + 0.1 / k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = features @ weight  # a bf16 op
        assert values.dtype == torch.bfloat16
        values = 1 + (bins - 3) * torch.sigmoid(values.T)  # bin units, still bf16
        x = XF.x_metric(values, posterior, bins, reduction="none")
    assert x.dtype == torch.float32 and (x > 0).all()
    x.sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    # computed in float32 on the (bf16-rounded) values: identical to the float32 call
    ref = XF.x_metric(values.detach().float(), posterior, bins, reduction="none")
    torch.testing.assert_close(x, ref, atol=0, rtol=0)


def test_similarity_maths_is_float32_under_autocast():
    """Every function gives under bf16 autocast exactly what it gives without it (issue 6.5:
    half-precision histograms gave negative MI), for float32 and bf16 inputs."""
    n, m, k, bins = 3, 3000, 4, 32
    values, labels = structured_values(n, m, k, bins, seed=21, noise=0.5)
    gamma = torch.softmax(torch.nn.functional.one_hot(labels, k) * 4.0, -1)
    log_pi = torch.full((k,), -math.log(k))

    def run(v, g):
        log_f = XF.appearance_model(v, g, bins)
        log_gamma, evidence = XF.posterior(v, log_f, log_pi)
        return (
            XF.x_metric(v, g, bins, reduction="none"),
            log_f,
            XF.log_appearance(v, log_f),
            log_gamma,
            evidence,
            XF.proportions(log_gamma.exp()),
        )

    reference = run(values, gamma)
    assert (reference[0] > 0).all()
    for cast in (torch.float32, torch.bfloat16):
        v, g = values.to(cast), gamma.to(cast)
        expected = reference if cast == torch.float32 else run(v.float(), g.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(v, g)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_x_metric_degenerate_inputs_are_finite():
    n, m, k, bins = 2, 50, 3, 10
    # all values identical, posterior with empty columns
    values = torch.full((n, m), 4.0, requires_grad=True)
    posterior = torch.zeros(m, k)
    posterior[:, 1] = 1.0
    posterior.requires_grad_()
    x = XF.x_metric(values, posterior, bins, reduction="none")
    torch.testing.assert_close(x, torch.zeros(n), atol=1e-6, rtol=0)
    x.sum().backward()
    assert torch.isfinite(values.grad).all() and torch.isfinite(posterior.grad).all()
    # values on the clamping edges, an all-zero posterior
    for v in (1.0, bins - 2.0, -5.0, bins + 5.0):
        values = torch.full((n, m), v, requires_grad=True)
        x = XF.x_metric(values, torch.zeros(m, k), bins)
        assert torch.isfinite(x)
        x.backward()
        assert torch.isfinite(values.grad).all()
    # float64 with one image constant and one informative
    vals = torch.stack(
        [
            torch.full((m,), 3.0, dtype=torch.float64),
            torch.linspace(1, bins - 2, m, dtype=torch.float64),
        ]
    ).requires_grad_()
    post = torch.nn.functional.one_hot(torch.arange(m) * k // m, k).double()
    x = XF.x_metric(vals, post, bins, reduction="none")
    assert x[0].abs() < 1e-12 and x[1] > 0.5
    x.sum().backward()
    assert torch.isfinite(vals.grad).all()


# ---------------------------------------------------------------------------- posterior / EM
def test_appearance_model_by_hand_and_empty_class_uniform():
    """Eq. (20) at integer intensities: beta_3 spreads a point over mu - 1, mu, mu + 1 with
    weights 1/6, 2/3, 1/6. A class without mass gets the uniform pmf 1/L (issue 6.1: it was
    f = 1 at every level, which explained every voxel better than any real class)."""
    bins = 10
    values = torch.tensor([[3.0, 3.0, 7.0], [2.0, 5.0, 5.0]], dtype=torch.float64)
    onehot = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)  # class 2 empty
    f = XF.appearance_model(values, onehot, bins).exp()
    assert f.shape == (2, bins, 3)
    spread = {-1: 1 / 6, 0: 2 / 3, 1: 1 / 6}
    expected = torch.zeros(2, bins, 3, dtype=torch.float64)
    for j in range(2):
        for x in range(3):
            c = int(onehot[x].argmax())
            mass = onehot[:, c].sum()
            for o, w in spread.items():
                expected[j, int(values[j, x]) + o, c] += w / mass
    expected[:, :, 2] = 1 / bins
    torch.testing.assert_close(f, expected, atol=1e-9, rtol=0)
    # a class with a vanishing (underflowed) mass is uniform too, in float32
    tiny = onehot.float().clone()
    tiny[:, 2] = 1e-30
    f32 = XF.appearance_model(values.float(), tiny, bins).exp()
    torch.testing.assert_close(f32[:, :, 2], torch.full((2, bins), 1 / bins))
    torch.testing.assert_close(f32.sum(1), torch.ones(2, 3))


def test_class_absent_from_one_image_does_not_swallow_the_posterior():
    """X-Reg-GT (Eq. 48) when a label is missing from one image's segmentation (issue 6.1):
    class 3 looks like class 1 in images 1 and 2 and is absent from image 0's labels. Image 0
    must still decide between them (it was f_03 = 1, so class 3 took all class-1 voxels)."""
    bins, m = 32, 3000
    gen = _gen(30)
    labels = torch.randint(0, 4, (m,), generator=gen)
    means = torch.tensor([[4.0, 12, 20, 12], [5, 15, 25, 15], [25, 10, 5, 10]])
    values = (means[:, labels] + 0.7 * torch.randn(3, m, generator=gen)).clamp(1, bins - 2)
    seg = labels.expand(3, m).clone()
    seg[0][seg[0] == 3] = 1
    log_f = XF.appearance_model(values, torch.nn.functional.one_hot(seg, 4).float(), bins)
    torch.testing.assert_close(log_f[0, :, 3], torch.full((bins,), -math.log(bins)))
    log_gamma, _ = XF.posterior(values, log_f, torch.full((4,), -math.log(4)))
    found = log_gamma.argmax(-1)
    for c in (0, 1, 2):
        assert (found[labels == c] == c).float().mean() > 0.99


@pytest.mark.parametrize("empty_mass", [0.0, 1e-30])
def test_em_with_an_emptied_class_does_not_collapse(empty_mass):
    """K larger than the number of tissues: once a class has lost its mass (gamma underflows
    to 0 at N ~ 50), the next E-step must not hand it every voxel (X fell to 0 in issue 6.1)."""
    n, m, bins = 8, 2000, 32
    values, labels = structured_values(n, m, 3, bins, seed=31, noise=1.0)
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    x_true = XF.x_metric(values, onehot, bins).item()
    gamma = torch.cat([onehot * 0.9 + 0.05, torch.full((m, 1), empty_mass)], 1)
    gamma = gamma / gamma.sum(-1, keepdim=True)
    log_pi = torch.log(XF.proportions(gamma).clamp_min(XF.EPS))
    for _ in range(5):
        log_f = XF.appearance_model(values, gamma, bins)
        log_gamma, _ = XF.posterior(values, log_f, log_pi)
        gamma = log_gamma.exp()
        log_pi = torch.log(XF.proportions(gamma).clamp_min(XF.EPS))
    assert gamma[:, 3].sum() < 1e-3
    assert XF.x_metric(values, gamma, bins).item() == pytest.approx(x_true, rel=0.02)


def _naive_posterior(values, log_f, pi, bins):
    """Eq. (12) in linear space: gamma = pi_k prod_j f_jk(u_j) / sum_l (...), with f_jk read at
    continuous u as prod_mu f_jk(mu) ** beta_3(u - mu) (the reading documented in
    log_appearance)."""
    n, m = values.shape
    k = log_f.shape[-1]
    f = log_f.exp()
    mus = torch.arange(bins, dtype=values.dtype)
    w = _beta3_tensor(values.clamp(1, bins - 2).unsqueeze(-1) - mus)  # (n, m, L)
    like = torch.ones(m, k, dtype=values.dtype)
    for j in range(n):
        f_at = torch.prod(f[j].unsqueeze(0) ** w[j].unsqueeze(-1), dim=1)  # (m, k)
        like = like * f_at
    joint = pi * like
    return joint / joint.sum(-1, keepdim=True), joint.sum(-1)


def _beta3_tensor(t: torch.Tensor) -> torch.Tensor:
    """Independent vectorised beta_3."""
    a = t.abs()
    return torch.where(a < 1, 2 / 3 - a**2 + a**3 / 2, (2 - a).clamp(min=0) ** 3 / 6)


def test_posterior_matches_linear_space_formula():
    n, m, k, bins = 3, 100, 3, 12
    values, _ = structured_values(n, m, k, bins, seed=12, dtype=torch.float64)
    gamma0 = XF.random_posterior(m, k, _gen(2)).double()
    log_f = XF.appearance_model(values, gamma0, bins)
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    log_gamma, ll = XF.posterior(values, log_f, pi.log())
    assert log_gamma.shape == (m, k) and ll.shape == (m,)
    torch.testing.assert_close(log_gamma.exp().sum(-1), torch.ones(m, dtype=torch.float64))
    gamma_lin, evidence = _naive_posterior(values, log_f, pi, bins)
    torch.testing.assert_close(log_gamma.exp(), gamma_lin)
    torch.testing.assert_close(ll, evidence.log())
    torch.testing.assert_close(XF.log_likelihood(values, log_f, pi.log()), ll.sum())
    torch.testing.assert_close(
        XF.log_likelihood(values, log_f, pi.log(), reduction="mean"), ll.mean()
    )
    # on a level the reading is the geometric mean with weights 1/6, 2/3, 1/6
    on_level = torch.full((1, 1), 5.0, dtype=torch.float64)
    got = XF.log_appearance(on_level, log_f[:1])[0, 0]
    expected = (log_f[0, 4] + 4 * log_f[0, 5] + log_f[0, 6]) / 6
    torch.testing.assert_close(got, expected)
    # a spatial prior (M, K) (Eq. 40)
    spatial = torch.softmax(torch.randn(m, k, generator=_gen(3), dtype=torch.float64), -1)
    log_gamma_s, _ = XF.posterior(values, log_f, spatial.log())
    torch.testing.assert_close(log_gamma_s.exp(), _naive_posterior(values, log_f, spatial, bins)[0])


def test_posterior_stays_finite_for_many_images():
    n, m, k, bins = 60, 500, 3, 32
    values, _ = structured_values(n, m, k, bins, seed=13, noise=1.5)
    gamma0 = XF.random_posterior(m, k, _gen(4))
    log_f = XF.appearance_model(values, gamma0, bins)
    pi = torch.full((k,), 1.0 / k)
    naive, _ = _naive_posterior(values, log_f, pi, bins)  # float32 linear space
    assert not torch.isfinite(naive).all()  # 0/0: the product of 60 likelihoods underflows
    log_gamma, ll = XF.posterior(values, log_f, pi.log())
    assert torch.isfinite(log_gamma).all() and torch.isfinite(ll).all()
    torch.testing.assert_close(log_gamma.exp().sum(-1), torch.ones(m))
    # and it agrees with the float64 linear-space computation where that one is still finite
    ref, _ = _naive_posterior(values.double(), log_f.double(), pi.double(), bins)
    finite = torch.isfinite(ref).all(-1)
    assert finite.any()
    torch.testing.assert_close(log_gamma.exp()[finite].double(), ref[finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_em_never_lowers_the_likelihood(dtype):
    """Eq. (23) along the common-space iteration at fixed phi: f^t and pi^t from gamma^t
    (M-step, Eqs. 20 and 14), then gamma^{t+1} = posterior (E-step, Eq. 12). The likelihood is
    evaluated independently, in float64 linear space (``_naive_posterior``)."""
    n, m, k, bins = 3, 1000, 3, 16
    values, _ = structured_values(n, m, k, bins, seed=14, noise=1.2, dtype=dtype)
    gamma = XF.random_posterior(m, k, _gen(5)).to(dtype)
    pi = torch.full((k,), 1.0 / k, dtype=dtype)
    history = []
    for t in range(25):
        log_f = XF.appearance_model(values, gamma, bins)
        if t > 0:
            pi = XF.proportions(gamma)
        _, evidence = _naive_posterior(values.double(), log_f.double(), pi.double(), bins)
        history.append(evidence.log().sum().item())
        gamma = XF.posterior(values, log_f, pi.log())[0].exp()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    steps = [after - before for before, after in zip(history, history[1:], strict=False)]
    assert min(steps) >= -tol * abs(history[0]), history
    assert history[-1] - history[0] > 0.05 * abs(history[0])  # and EM made real progress


# ---------------------------------------------------------------------------- batch axis
def _em_inputs(n=3, m=120, k=3, bins=12, seed=0):
    values, _ = structured_values(n, m, k, bins, seed=seed)
    gamma = XF.random_posterior(m, k, _gen(seed + 1))
    return values, gamma


@pytest.mark.parametrize("batch", [(2,), (2, 3)])
@pytest.mark.parametrize("per_image", [False, True])
def test_batched_functions_equal_a_loop_over_groups(batch, per_image):
    n, m, k, bins = 3, 120, 3, 12
    groups = [_em_inputs(n, m, k, bins, seed=s) for s in range(math.prod(batch))]
    values = torch.stack([v for v, _ in groups]).view(*batch, n, m)
    gammas = [g.expand(n, m, k) if per_image else g for _, g in groups]
    gamma = torch.stack(gammas).view(*batch, *gammas[0].shape)
    log_pi = torch.log_softmax(torch.randn(*batch, k, generator=_gen(9)), -1)

    def flat(x):
        return x.reshape(-1, *x.shape[len(batch) :])

    joint = XF.joint_histogram(values, gamma, bins)
    log_f = XF.appearance_model(values, gamma, bins)
    log_gamma, evidence = XF.posterior(values, log_f, log_pi)
    assert joint.shape == log_f.shape == (*batch, n, bins, k)
    assert log_gamma.shape == (*batch, m, k) and evidence.shape == (*batch, m)
    for i, (v, g) in enumerate(zip(flat(values), flat(gamma), strict=True)):
        torch.testing.assert_close(flat(joint)[i], XF.joint_histogram(v, g, bins))
        torch.testing.assert_close(flat(log_f)[i], XF.appearance_model(v, g, bins))
        torch.testing.assert_close(
            flat(XF.mutual_information(joint))[i], XF.mutual_information(flat(joint)[i])
        )
        torch.testing.assert_close(
            flat(XF.x_metric(values, gamma, bins, reduction="none"))[i],
            XF.x_metric(v, g, bins, reduction="none"),
        )
        torch.testing.assert_close(
            flat(XF.log_appearance(values, log_f))[i], XF.log_appearance(v, flat(log_f)[i])
        )
        lg, ev = XF.posterior(v, flat(log_f)[i], flat(log_pi)[i])
        torch.testing.assert_close(flat(log_gamma)[i], lg)
        torch.testing.assert_close(flat(evidence)[i], ev)
        torch.testing.assert_close(
            flat(XF.proportions(log_gamma.exp()))[i], XF.proportions(lg.exp())
        )
    # reductions run over the group and the batch
    per = XF.x_metric(values, gamma, bins, reduction="none")
    torch.testing.assert_close(XF.x_metric(values, gamma, bins), per.sum())
    torch.testing.assert_close(XF.x_metric(values, gamma, bins, reduction="mean"), per.mean())
    torch.testing.assert_close(XF.log_likelihood(values, log_f, log_pi), evidence.sum())
    # one log pi (K,) for every group, and a spatial prior (*B, M, K)
    shared = log_pi.reshape(-1, k)[0]
    torch.testing.assert_close(
        XF.posterior(values, log_f, shared)[0],
        XF.posterior(values, log_f, shared.expand(*batch, k))[0],
    )
    spatial = torch.log_softmax(torch.randn(*batch, m, k, generator=_gen(10)), -1)
    lg = XF.posterior(values, log_f, spatial)[0]
    torch.testing.assert_close(
        flat(lg)[-1], XF.posterior(flat(values)[-1], flat(log_f)[-1], flat(spatial)[-1])[0]
    )


def test_batched_shapes_are_checked():
    values = torch.full((2, 3, 10), 3.0)
    with pytest.raises(ValueError, match="posterior"):
        XF.joint_histogram(values, torch.ones(2, 9, 4) / 4, 8)
    with pytest.raises(ValueError, match="log_f"):
        XF.log_appearance(values, torch.zeros(5, 3, 8, 4))
    with pytest.raises(ValueError, match="log_prior"):
        XF.posterior(values, torch.zeros(2, 3, 8, 4), torch.zeros(2, 7, 4))


# ---------------------------------------------------------------------------- small helpers
def test_proportions_and_random_posterior():
    gamma = XF.random_posterior(1000, 5, _gen(6))
    assert gamma.shape == (1000, 5)
    assert (gamma > 0).all()
    torch.testing.assert_close(gamma.sum(-1), torch.ones(1000))
    torch.testing.assert_close(XF.random_posterior(1000, 5, _gen(6)), gamma, atol=0, rtol=0)
    assert not torch.equal(XF.random_posterior(1000, 5, _gen(7)), gamma)
    pi = XF.proportions(gamma)
    assert pi.shape == (5,)
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0))
    torch.testing.assert_close(pi, gamma.mean(0))
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 1, 0]), 3).float()
    torch.testing.assert_close(XF.proportions(onehot), torch.tensor([0.6, 0.2, 0.2]))
    assert torch.isfinite(XF.proportions(torch.zeros(4, 3))).all()


def test_entropy():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(XF.entropy(p), torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(XF.entropy(torch.full((4,), 0.25)), torch.tensor(math.log(4)))


def test_normalize_intensities_range_and_mask():
    bins = 32
    gen = _gen(8)
    images = torch.randn(3, 20, 24, generator=gen) * torch.tensor([1.0, 50.0, 0.01]).view(3, 1, 1)
    out = XF.normalize_intensities(images, bins)
    assert out.shape == images.shape
    assert out.min() >= 1 and out.max() <= bins - 2
    for j in range(3):  # each image spans the range (robust percentiles are clipped)
        assert out[j].min() == 1 and out[j].max() == bins - 2
    # monotone per image
    flat, idx = images[1].flatten().sort()
    assert (out[1].flatten()[idx].diff() >= 0).all()
    # exact linear map with (0, 100) percentiles
    ramp = torch.arange(100.0).view(1, 10, 10)
    torch.testing.assert_close(
        XF.normalize_intensities(ramp, bins, percentiles=(0, 100)), 1 + ramp * (bins - 3) / 99
    )
    # the mask decides the range: a huge outlier outside it does not squash the inside
    image = torch.rand(1, 16, 16, generator=gen)
    mask = torch.zeros(1, 16, 16)
    mask[:, 2:14, 2:14] = 1
    spoiled = image.clone()
    spoiled[0, 0, 0] = 1e6
    a = XF.normalize_intensities(image, bins, mask, percentiles=(0, 100))
    b = XF.normalize_intensities(spoiled, bins, mask, percentiles=(0, 100))
    inside = mask > 0.5
    torch.testing.assert_close(a[inside], b[inside])
    assert b[inside].min() == 1 and b[inside].max() == bins - 2
    assert b[0, 0, 0] == bins - 2  # clipped
    torch.testing.assert_close(
        XF.normalize_intensities(spoiled, bins, mask > 0.5, percentiles=(0, 100)), b
    )  # a bool mask
    with pytest.raises(ValueError):
        XF.normalize_intensities(image, bins, torch.zeros_like(image))
    with pytest.raises(ValueError):
        XF.normalize_intensities(image, 3)


def test_quantiles_equal_torch_quantile_bit_for_bit():
    gen = _gen(12)
    for n in (1, 2, 7, 1000, 25600):
        for values in (torch.randn(n, generator=gen) * 100,
                       torch.randint(0, 5, (n,), generator=gen).float()):
            for percentiles in ((0.5, 99.5), (0.0, 100.0), (50.0, 50.0)):
                q = torch.tensor([p / 100 for p in percentiles])
                assert torch.equal(XF._quantiles(values, percentiles),
                                   torch.quantile(values, q))


def test_normalize_intensities_constant_image():
    bins = 16
    out = XF.normalize_intensities(torch.full((2, 8, 8), 7.0), bins)
    assert torch.isfinite(out).all()
    assert ((out >= 1) & (out <= bins - 2)).all()
    zero = XF.normalize_intensities(torch.zeros(1, 5, 5), bins)
    assert torch.isfinite(zero).all()
    x = XF.x_metric(out.reshape(2, -1), XF.random_posterior(64, 3, _gen(0)), bins)
    assert torch.isfinite(x)


def test_random_posterior_same_draw_whatever_the_device():
    """gamma^[0] is drawn on the (CPU) generator and moved: the same seed gives the same values
    on every device, so CPU and CUDA runs start from the same posterior."""
    draw = XF.random_posterior(50, 4, torch.Generator().manual_seed(3))
    again = XF.random_posterior(50, 4, torch.Generator().manual_seed(3), device="meta")
    assert again.device.type == "meta" and again.shape == draw.shape
    assert torch.allclose(draw.sum(-1), torch.ones(50))
    other = XF.random_posterior(50, 4, torch.Generator().manual_seed(4))
    assert not torch.allclose(draw, other)


def test_intensity_bins_are_linear_in_the_number_of_levels():
    """normalize_intensities = to_bins(intensity_range); the map from L to L' levels is the
    linear one CommonSpace.log_gamma_at relies on."""
    torch.manual_seed(0)
    images = torch.randn(2, 40, 30) * 50 + 100
    mask = torch.rand(2, 40, 30) > 0.3
    ranges = XF.intensity_range(images, mask)
    torch.testing.assert_close(XF.to_bins(images, ranges, 64),
                               XF.normalize_intensities(images, 64, mask))
    u32, u64 = XF.to_bins(images, ranges, 32), XF.to_bins(images, ranges, 64)
    torch.testing.assert_close(1 + (u64 - 1) * (29 / 61), u32, atol=1e-5, rtol=0)
    assert float(u64.min()) == 1.0 and float(u64.max()) == 62.0  # clipped to [1, L - 2]
