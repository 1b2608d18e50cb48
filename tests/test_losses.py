"""DCC losses (Eqs. 38-47) on small 32x32 groups with K = 4 classes."""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from dcc.losses import DCCLoss, clip_probabilities, distance_probabilities
from dcc.losses import functional as LF
from dcc.similarity import functional as XF
from dcc.spatial import fields

K = 4
CONTRASTS = ((0.1, 0.9, 0.5, 0.3), (0.8, 0.2, 0.5, 0.6), (0.3, 0.6, 0.9, 0.1))


def _labels(shifts, size=32):
    """Cardiac-like label maps (background, myocardium ring, LV pool, RV pool), one per shift
    ``(dx, dy)``, ``(len(shifts), size, size)``."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    maps = []
    for dx, dy in shifts:
        r = ((x - 15 - dx) ** 2 + (y - 16 - dy) ** 2).float().sqrt()
        lab = torch.zeros(size, size, dtype=torch.long)
        lab[r < 9] = 1
        lab[r < 5.5] = 2
        lab[((x - 5 - dx).abs() < 3) & ((y - 16 - dy).abs() < 6)] = 3
        maps.append(lab)
    return torch.stack(maps)


def _group(shifts, noise=0.03, seed=0):
    """One group (B = 1): images with a contrast per member, labels and rho (Eq. 38)."""
    g = torch.Generator().manual_seed(seed)
    labels = _labels(shifts)
    table = torch.tensor(CONTRASTS[: len(shifts)])
    images = table.gather(1, labels.flatten(1)).view(labels.shape)
    images = images + noise * torch.randn(images.shape, generator=g)
    rho = distance_probabilities(labels, K)
    return images[None], labels[None], rho[None]


def _smooth_field(n, scale, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 2, 4, 4, generator=g) * scale
    u = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic")
    return fields.zero_mean(u[None])


# ---------------------------------------------------------------- Eq. (38) and clipping


def test_distance_probabilities_signed_distance_and_types():
    labels = np.zeros((1, 6, 20), dtype=np.int64)
    labels[0, :, 10:] = 1  # a vertical contour between x = 9 and x = 10
    p = distance_probabilities(labels, 2, tau=0.5)
    assert isinstance(p, np.ndarray) and p.shape == (1, 2, 6, 20) and p.dtype == np.float32
    # x = 12 is 3 voxels inside class 1 (D_1 = 3) and 3 outside class 0 (D_0 = -3)
    np.testing.assert_allclose(np.log(p[0, 1, :, 12] / p[0, 0, :, 12]), 0.5 * 6, rtol=1e-5)
    np.testing.assert_allclose(np.log(p[0, 0, :, 9] / p[0, 1, :, 9]), 0.5 * 2, rtol=1e-5)
    # physical units: 2 mm along x doubles the distances (spacing is (x, y))
    q = distance_probabilities(torch.from_numpy(labels), 2, tau=0.5, spacing=(2.0, 1.0))
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32
    np.testing.assert_allclose(torch.log(q[0, 1, :, 12] / q[0, 0, :, 12]), 0.5 * 12, rtol=1e-5)


def test_distance_probabilities_of_cardiac_labels():
    labels = _labels([(0, 0), (2, -1), (-1, 1)])
    rho = distance_probabilities(labels, K)
    assert rho.shape == (3, K, 32, 32)
    torch.testing.assert_close(rho.sum(1), torch.ones(3, 32, 32))
    assert (rho.argmax(1) == labels).all()  # the own class has D > 0, all others D < 0
    absent = distance_probabilities(torch.zeros(1, 8, 8, dtype=torch.long), K)
    assert absent[:, 1:].max() < 1e-6  # classes absent from a map get (almost) no mass
    rho3d = distance_probabilities(np.zeros((2, 4, 5, 6), dtype=np.int32), K)
    assert rho3d.shape == (2, K, 4, 5, 6)


def test_distance_probabilities_rejects_bad_input():
    with pytest.raises(ValueError, match="integer label maps"):
        distance_probabilities(np.zeros((8, 8)), K)
    with pytest.raises(ValueError, match="0..3"):
        distance_probabilities(np.full((1, 8, 8), 4), K)
    with pytest.raises(ValueError, match="spacing"):
        distance_probabilities(np.zeros((1, 8, 8), dtype=int), K, spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("zeta", [0.05, 0.01])
def test_clip_probabilities_bounds(zeta):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(4 * torch.randn(2, 3, K, 16, generator=g), 2)
    p[0, 0, :, 0] = torch.tensor([1.0, 0, 0, 0])
    p[0, 0, :, 1] = torch.tensor([0.5, 0.5, 0, 0])
    q = clip_probabilities(p, zeta, dim=2)
    assert q.min() >= zeta - 1e-7 and q.max() <= 1 - (K - 1) * zeta + 1e-7
    torch.testing.assert_close(q.sum(2), torch.ones(2, 3, 16))
    torch.testing.assert_close(q[0, 0, :, 0], torch.tensor([1 - 3 * zeta, zeta, zeta, zeta]))
    torch.testing.assert_close(q[0, 0, :, 1], torch.tensor([0.5 - zeta, 0.5 - zeta, zeta, zeta]))
    inside = torch.tensor([0.4, 0.3, 0.2, 0.1])  # already within the bounds: unchanged
    torch.testing.assert_close(clip_probabilities(inside, zeta, dim=0), inside)
    with pytest.raises(ValueError, match="zeta"):
        clip_probabilities(p, 0.25, dim=2)


# ---------------------------------------------------------------- the three losses


def test_l1_is_minus_x_plus_lambda_times_monais_bending_energy():
    """Eq. 41 against independent values: L1 is linear in lambda with slope R, MONAI's bending
    energy of the fields (its BendingEnergyLoss averages the 2 channels, R sums them, over the
    3 members); and -X is lower for the group that is aligned than for the same group
    misaligned by shifting one member (the MI of each image with Z rises)."""
    from monai.losses import BendingEnergyLoss

    images, labels, rho = _group([(0, 0), (0, 0), (0, 0)])
    u = _smooth_field(3, 1.5, seed=1)
    seg = distance_probabilities(labels[0], K, tau=0.5)[None]
    labelled = torch.tensor([[True, False, False]])
    at = {lam: DCCLoss(reduction="sum", bending_weight=lam)(images, u, seg, rho, labelled).l1
          for lam in (0.0, 10.0)}
    monai_r = sum(2 * BendingEnergyLoss()(u[:, j].double()) for j in range(3))
    torch.testing.assert_close((at[10.0] - at[0.0]) / 10.0, monai_r.float(), rtol=1e-4, atol=1e-6)
    zero = torch.zeros_like(u)
    loss = DCCLoss(reduction="sum", bending_weight=0.0)
    aligned = loss(images, zero, seg, rho, labelled)
    moved, _, _ = _group([(0, 0), (4, 3), (0, 0)])
    misaligned = loss(moved, zero, seg, rho, labelled)
    assert aligned.l1 < misaligned.l1 and aligned.x_metric > misaligned.x_metric
    torch.testing.assert_close(aligned.l1, -aligned.x_metric)  # lambda = 0: L1 = -X


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_similarity_weight_scales_the_mutual_information_only(weight):
    images, labels, rho = _group([(0, 0), (2, 1), (-1, 2)])
    u = _smooth_field(3, 1.5, seed=1)
    seg = distance_probabilities(labels[0], K, tau=0.5)[None]
    labelled = torch.tensor([[True, False, False]])
    full = DCCLoss(reduction="sum")(images, u, seg, rho, labelled)
    part = DCCLoss(reduction="sum", similarity_weight=weight)(images, u, seg, rho, labelled)
    torch.testing.assert_close(part.l1, -weight * full.x_metric + 100.0 * full.bending)
    torch.testing.assert_close(part.x_metric, full.x_metric)  # logged X is the X either way
    torch.testing.assert_close(part.l2, full.l2)


def test_l2_gradients_reach_rho_hat_only_for_unlabelled_members():
    images, labels, rho = _group([(0, 0), (2, 1), (-1, 2)])
    u = _smooth_field(3, 1.0, seed=2).requires_grad_()
    logits = torch.randn(1, 3, K, 32, 32, generator=torch.Generator().manual_seed(3))
    seg = torch.softmax(logits, 2).requires_grad_()
    rho = rho.clone().requires_grad_()
    labelled = torch.tensor([[True, False, True]])
    out = DCCLoss()(images, u, seg, rho, labelled)
    out.l2.backward()
    assert (seg.grad[0, 0] == 0).all() and (seg.grad[0, 2] == 0).all()  # j in J: phi only
    assert seg.grad[0, 1].abs().sum() > 0  # j not in J: phi and rho-hat (Eq. 44)
    assert rho.grad is None  # rho is data
    for j in range(3):
        assert u.grad[0, j].abs().sum() > 0
    # L1 moves phi only; gamma^[2] is an E-step constant
    u.grad, seg.grad = None, None
    DCCLoss()(images, u, seg, rho, labelled).l1.backward()
    assert seg.grad is None and u.grad.abs().sum() > 0



def test_l2_can_leave_phi_of_unlabelled_members_alone():
    """``l2_moves_unlabelled=False``: L2 still trains rho-hat_j of an unlabelled member but no
    longer moves its phi_j; labelled members and L1 are unchanged."""
    images, labels, rho = _group([(0, 0), (2, 1), (-1, 2)])
    u = _smooth_field(3, 1.0, seed=2).requires_grad_()
    logits = torch.randn(1, 3, K, 32, 32, generator=torch.Generator().manual_seed(3))
    seg = torch.softmax(logits, 2).requires_grad_()
    labelled = torch.tensor([[True, False, True]])
    paper, still = DCCLoss(), DCCLoss(l2_moves_unlabelled=False)
    out = still(images, u, seg, rho, labelled)
    out.l2.backward()
    assert (u.grad[0, 1] == 0).all()  # j not in J: rho-hat only
    assert u.grad[0, 0].abs().sum() > 0 and u.grad[0, 2].abs().sum() > 0
    assert seg.grad[0, 1].abs().sum() > 0
    reference = paper(images, u, seg, rho, labelled)
    for term in ("l1", "l2", "l3"):  # the same values, only the gradients differ
        torch.testing.assert_close(getattr(out, term), getattr(reference, term))
def test_hybrid_cross_entropy_matches_eq43():
    g = torch.Generator().manual_seed(4)
    gamma = torch.softmax(torch.randn(2, K, 6, 5, generator=g), 1)
    probs = torch.softmax(torch.randn(2, 3, K, 6, 5, generator=g), 2)
    mask = torch.rand(2, 6, 5, generator=g) > 0.3
    h = LF.hybrid_cross_entropy(gamma, probs, mask, reduction="none")
    for b in range(2):
        for j in range(3):
            terms = -(gamma[b] * probs[b, j].log()).sum(0)[mask[b]]
            torch.testing.assert_close(h[b, j], terms.mean())
    torch.testing.assert_close(LF.hybrid_cross_entropy(gamma, probs, mask), h.sum())


def test_dice_and_cross_entropy_agree_with_monai():
    images, labels, _ = _group([(0, 0), (1, 1)])
    g = torch.Generator().manual_seed(5)
    seg = torch.softmax(torch.randn(1, 2, K, 32, 32, generator=g) + 3 * _onehot(labels), 2)
    values = XF.normalize_intensities(images[0], 32)[None]
    labelled = torch.tensor([[True, True]])
    ours = LF.segmentation_loss(values, seg, labelled, labels, 32, reduction="none")
    mi = XF.x_metric(values.flatten(2), seg.flatten(3).transpose(2, 3), 32, reduction="none")
    monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    for j in range(2):
        theirs = monai(seg[:, j].log(), labels[:, j : j + 1])  # CE of log p = -log p
        torch.testing.assert_close(ours[0, j] + mi[0, j], theirs, rtol=1e-5, atol=1e-6)
    # unlabelled members: -MI + mean voxel entropy instead
    unl = LF.segmentation_loss(values, seg, ~labelled, None, 32, reduction="none")
    entropy = -(seg * seg.log()).sum(2).flatten(2).mean(-1)
    torch.testing.assert_close(unl, -mi + entropy)
    # without labels (test-time posterior, Eq. 53) the labelled members keep -MI only
    torch.testing.assert_close(
        LF.segmentation_loss(values, seg, labelled, None, 32, reduction="none"), -mi
    )


def _onehot(labels):
    return torch.nn.functional.one_hot(labels, K).movedim(-1, 2).float()


# ---------------------------------------------------------------- the E-step (Eq. 40)


def test_labelled_members_enter_the_posterior_as_spatial_prior():
    # constant images carry no evidence, so gamma ~ pi * prod_{j in J} rho_j(phi_j(x)) (Eq. 40)
    labels = _labels([(0, 0), (3, -2), (-2, 2)])[None]
    rho = distance_probabilities(labels[0], K)[None]
    images = torch.ones(1, 3, 32, 32)
    seg = torch.full((1, 3, K, 32, 32), 1.0 / K)
    u = torch.zeros(1, 3, 2, 32, 32)
    loss = DCCLoss()

    def log_gamma(labelled):
        out = loss(images, u, seg, rho, torch.tensor([labelled]))
        return out.posterior[0].log()

    # test time (Eq. 53): without rho the predictions of the labelled members are the prior
    out = loss(images, u, rho, None, torch.tensor([[True, False, False]]))
    assert (out.posterior[0].argmax(0) == labels[0, 0]).all()
    none = log_gamma([False, False, False])
    assert (none - none[:, :1, :1]).abs().max() < 1e-5  # no spatial information at all
    one = log_gamma([True, False, False])
    assert (one.argmax(0) == labels[0, 0]).all()
    two = log_gamma([True, True, False])
    clipped = clip_probabilities(rho, loss.zeta, dim=2)[0]
    residual = two - clipped[0].log() - clipped[1].log()  # = log pi_k - log evidence(x)
    residual = residual - residual[:1]
    torch.testing.assert_close(residual, residual[:, :1, :1].expand_as(residual), atol=1e-4, rtol=0)


def test_posterior_follows_the_images_without_labels():
    # DGR: no labels; good predictions and distinct contrasts give a posterior near the anatomy
    images, labels, rho = _group([(0, 0), (0, 0), (0, 0)])
    out = DCCLoss()(images, torch.zeros(1, 3, 2, 32, 32), rho, None, None)
    assert (out.posterior[0].argmax(0) == labels[0, 0]).float().mean() > 0.97


# ---------------------------------------------------------------- numerics


def test_zero_displacement_identical_images_gives_finite_losses():
    images, labels, rho = _group([(0, 0)] * 3, noise=0.0)
    out = DCCLoss()(images, torch.zeros(1, 3, 2, 32, 32), rho, rho, torch.ones(1, 3, dtype=bool))
    for name in ("total", "l1", "l2", "l3", "x_metric", "bending"):
        assert torch.isfinite(getattr(out, name)), name
    assert out.bending == 0 and out.overlap.all()
    torch.testing.assert_close(out.posterior.sum(1), torch.ones(1, 32, 32))


@pytest.mark.parametrize("autocast", [False, True])
def test_no_nan_in_float32_and_bf16_autocast(autocast):
    images, labels, rho = _group([(0, 0), (2, 1), (-1, 2)])
    images = images * 1e3  # arbitrary intensity range
    u = (_smooth_field(3, 4.0, seed=6) * 3).requires_grad_()  # large, partly outside the FOV
    logits = (20 * torch.randn(1, 3, K, 32, 32)).requires_grad_()  # saturated predictions
    labelled = torch.tensor([[True, False, False]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        seg = torch.softmax(logits.to(torch.bfloat16) if autocast else logits, 2)
        out = DCCLoss()(images, u, seg, rho, labelled)
    assert out.total.dtype == torch.float32 and out.posterior.dtype == torch.float32
    assert torch.isfinite(out.total) and torch.isfinite(out.posterior).all()
    out.total.backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(logits.grad).all()


def test_loss_is_invariant_to_the_order_of_the_members():
    images, labels, rho = _group([(0, 0), (2, 1), (-1, 2)])
    u = _smooth_field(3, 1.0, seed=8)
    seg = distance_probabilities(labels[0], K, tau=0.5)[None]
    labelled = torch.tensor([[True, False, False]])
    order = [2, 0, 1]
    loss = DCCLoss()
    a = loss(images, u, seg, rho, labelled)
    b = loss(images[:, order], u[:, order], seg[:, order], rho[:, order], labelled[:, order])
    for name in ("total", "l1", "l2", "l3"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.posterior, b.posterior, rtol=1e-4, atol=1e-5)


def test_three_dimensional_groups():
    g = torch.Generator().manual_seed(7)
    labels = torch.zeros(1, 2, 8, 10, 12, dtype=torch.long)
    labels[..., 2:6, 3:8, 3:9] = 1
    labels[..., 3:5, 4:7, 4:8] = 2
    rho = distance_probabilities(labels[0], K)[None]
    images = labels.float() + 0.1 * torch.randn(labels.shape, generator=g)
    u = (0.5 * torch.randn(1, 2, 3, 8, 10, 12, generator=g)).requires_grad_()
    seg = torch.softmax(torch.randn(1, 2, K, 8, 10, 12, generator=g), 2).requires_grad_()
    out = DCCLoss()(images, u, seg, rho, torch.tensor([[True, False]]))
    assert out.posterior.shape == (1, K, 8, 10, 12) and torch.isfinite(out.total)
    out.total.backward()
    assert u.grad.abs().sum() > 0 and seg.grad[0, 1].abs().sum() > 0


def test_eval_mode_clips_with_eval_zeta():
    images, labels, rho = _group([(0, 0), (1, 0)])
    loss = DCCLoss(zeta=0.05, eval_zeta=0.01)
    u = torch.zeros(1, 2, 2, 32, 32)
    train = loss(images, u, rho, rho, torch.tensor([[True, False]]))
    assert train.warped_probs.min() >= 0.05 - 1e-6
    ev = loss.eval()(images, u, rho, rho, torch.tensor([[True, False]]))
    assert 0.01 - 1e-6 <= ev.warped_probs.min() < 0.05 - 1e-3


def test_bad_shapes_raise_value_errors():
    images, labels, rho = _group([(0, 0), (1, 0)])
    loss = DCCLoss()
    with pytest.raises(ValueError, match="displacement of shape"):
        loss(images, torch.zeros(1, 2, 3, 32, 32), rho, rho)
    with pytest.raises(ValueError, match="seg_probs of shape"):
        loss(images, torch.zeros(1, 2, 2, 32, 32), rho[:, :, :3], rho)
    with pytest.raises(ValueError, match="labelled of shape"):
        loss(images, torch.zeros(1, 2, 2, 32, 32), rho, rho, torch.ones(1, 3, dtype=bool))
    with pytest.raises(ValueError, match="reduction"):
        DCCLoss(reduction="none")


# ---------------------------------------------------------------- optimisation


def test_optimising_a_free_displacement_aligns_a_shifted_pair():
    # member 1 is member 0 moved by 4 voxels along x, with another contrast
    images, labels, rho = _group([(-2, 0), (2, 0)], noise=0.02)
    labelled = torch.tensor([[True, False]])
    loss = DCCLoss()
    coarse = torch.zeros(1, 2, 2, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([coarse], lr=0.3)

    def field():
        u = torch.nn.functional.interpolate(coarse[0], size=(32, 32), mode="bicubic")
        return fields.zero_mean(u[None])

    def dice(u):
        warped = fields.warp(_onehot(labels), u, mode="nearest")[0]
        inter = (warped[0, 1:] * warped[1, 1:]).sum((1, 2))
        return (2 * inter / (warped[0, 1:].sum((1, 2)) + warped[1, 1:].sum((1, 2)))).mean()

    with torch.no_grad():
        first = loss(images, field(), rho, rho, labelled)
    dice_before = dice(field())
    for _ in range(30):
        out = loss(images, field(), rho, rho, labelled)
        optimizer.zero_grad()
        (out.l1 + out.l2).backward()
        optimizer.step()
    with torch.no_grad():
        last = loss(images, field(), rho, rho, labelled)
    assert last.l1 < first.l1 - 0.1
    assert last.l1 + last.l2 < first.l1 + first.l2
    assert last.x_metric > first.x_metric
    assert dice(field()) > dice_before + 0.15


def test_posterior_alone_equals_the_forward_pass():
    """DCCLoss.posterior (prediction: no losses) gives the forward pass's gamma and X."""
    images, labels, rho = _group([(0, 0), (2, 1), (-1, 2)])
    u = _smooth_field(3, 1.5, seed=1)
    seg = distance_probabilities(labels[0], K, tau=0.5)[None]
    labelled = torch.tensor([[True, False, True]])
    loss = DCCLoss(reduction="sum").eval()
    full = loss(images, u, seg, seg, labelled)
    gamma, x = loss.posterior(images, u, seg, labelled)
    torch.testing.assert_close(gamma, full.posterior)
    torch.testing.assert_close(x.sum(), full.x_metric)
