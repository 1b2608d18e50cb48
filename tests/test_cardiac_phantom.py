"""The procedural cardiac phantom and the FFD-bank misalignment (Sec. 4.4.1)."""

import numpy as np
import pytest
import torch

from dcc.data.cardiac import LV, MYOCARDIUM, RV
from dcc.data.cardiac_phantom import SEQUENCES, cardiac_phantom
from dcc.data.misalignment import FOLDING_BOUND, RandomFFDMisalignment
from dcc.metrics import pairwise_dice
from dcc.spatial.grid import Grid


def _class_means(phantom):
    return torch.stack(
        [
            torch.stack([image[phantom.labels == k].mean() for k in range(4)])
            for image in phantom.images
        ]
    )  # (sequences, classes)


@pytest.mark.parametrize("size", [32, 64])
def test_phantom_has_all_classes_and_shapes(size):
    for seed in range(5):
        p = cardiac_phantom(size, seed=seed)
        assert p.images.shape == (3, size, size) and p.images.dtype == torch.float32
        assert p.labels.shape == (size, size) and p.labels.dtype == torch.int64
        assert set(p.labels.unique().tolist()) == {0, MYOCARDIUM, LV, RV}
        assert p.names == list(SEQUENCES)
        assert p.spacing == pytest.approx((150.0 / size,) * 2)
        assert torch.isfinite(p.images).all() and (p.images >= 0).all()


def test_phantom_3d():
    p = cardiac_phantom(32, ndim=3, depth=6, seed=1)
    assert p.images.shape == (3, 6, 32, 32) and p.labels.shape == (6, 32, 32)
    assert len(p.spacing) == 3 and p.spacing[2] == 10.0
    assert set(p.labels.unique().tolist()) == {0, 1, 2, 3}
    lv_area = [(p.labels[z] == LV).sum().item() for z in range(6)]
    assert lv_area[0] > lv_area[-1]  # narrows towards the apex


def test_seeds_reproduce_and_differ():
    a, b, c = (cardiac_phantom(48, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    d, e = (cardiac_phantom(32, seed=[1, 2]) for _ in range(2))
    assert torch.equal(d.images, e.images)


def test_sequences_differ_in_contrast():
    means = torch.stack([_class_means(cardiac_phantom(64, seed=s)) for s in range(4)]).mean(0)
    c0, lge, t2 = means
    bg, myo, lv = 0, MYOCARDIUM, LV
    assert c0[lv] > 2 * c0[myo]  # bSSFP: bright blood, dark myocardium
    assert lge[lv] > 2 * lge[myo]  # LGE: nulled myocardium
    assert t2[myo] > 1.5 * t2[lv]  # T2: the ordering flips (dark blood)
    assert not torch.allclose(c0, t2, atol=0.05) and not torch.allclose(c0, lge, atol=0.05)
    assert c0[bg] != lge[bg]


def test_classes_not_separable_by_intensity_alone():
    """No intensity window of any sequence picks out the myocardium, nor tells LV from RV."""
    p = cardiac_phantom(64, seed=3, lesion_probability=0.0)
    myo = p.labels == MYOCARDIUM
    for image in p.images:
        levels = torch.quantile(image.flatten(), torch.linspace(0, 1, 21))
        best = 0.0
        for i in range(len(levels)):
            for j in range(i + 1, len(levels)):
                window = (image >= levels[i]) & (image <= levels[j])
                best = max(best, (2 * (window & myo).sum() / (window.sum() + myo.sum())).item())
        assert best < 0.65
        lv, rv = image[p.labels == LV], image[p.labels == RV]
        assert abs(lv.mean() - rv.mean()) < 0.5 * (lv.std() + rv.std()) + 0.1 * lv.mean()


def test_phantom_bad_input():
    with pytest.raises(ValueError, match="unknown sequence"):
        cardiac_phantom(32, sequences=("C0", "FLAIR"))
    with pytest.raises(ValueError, match="ndim"):
        cardiac_phantom(32, ndim=4)


# ---------------------------------------------------------------------- misalignment
def _misaligned(size, seed, level, indices=(0, 1, 2), aug=None):
    p = cardiac_phantom(size, seed=seed)
    grid = Grid.from_shape(p.labels.shape, p.spacing)
    labels = p.labels.expand(3, *p.labels.shape)
    aug = aug or RandomFFDMisalignment()
    return p, grid, aug(p.images, labels, grid, level, indices, (seed,))


def test_misalignment_dice_in_paper_range():
    """Unregistered pairwise Dice about the paper's 72 % (Table 5, "None")."""
    scores = []
    for seed in range(8):
        for level in range(4):
            _, _, (images, labels, _) = _misaligned(48, seed, level)
            assert set(labels.unique().tolist()) <= {0, 1, 2, 3}
            scores.append(pairwise_dice(labels, [1, 2, 3])["mean"])
    assert 0.6 <= np.mean(scores) <= 0.8
    assert np.min(scores) < np.mean(scores) < np.max(scores) < 0.98


def test_misalignment_identity_and_interpolation():
    aug = RandomFFDMisalignment(magnitude=0.0)
    p, _, (images, labels, _) = _misaligned(32, 0, 2, aug=aug)
    assert torch.equal(labels, p.labels.expand(3, 32, 32))
    assert torch.allclose(images, p.images, atol=1e-4)
    p, _, (images, labels, _) = _misaligned(32, 0, 2)
    assert labels.dtype == torch.int64 and images.dtype == torch.float32
    # images linear (new values appear), labels nearest (only the original classes)
    assert not torch.isin(images, p.images).all()


def test_ffd_bank_is_fixed_by_seed_and_diffeomorphic():
    aug = RandomFFDMisalignment(magnitude=0.5)  # large: clipping must keep it fold-free
    grid = Grid.from_shape((40, 40), 2.0)
    a = aug.transform(grid, 1, (0, 3, 4), (5, 6))
    b = aug.transform(grid, 1, (0, 3, 4), (5, 6))
    c = aug.transform(grid, 1, (1, 3, 4), (5, 6))
    assert torch.equal(a.coefficients, b.coefficients)
    assert not torch.equal(a.coefficients[0], c.coefficients[0])
    assert torch.equal(a.coefficients[1:], c.coefficients[1:])  # member j depends on k_j only
    assert a.coefficients.abs().max() <= FOLDING_BOUND * aug.spacings[1] + 1e-6
    lattice = a.lattice(grid)  # (N, H, W, 2) mm
    dy = torch.gradient(lattice, dim=1)[0]
    dx = torch.gradient(lattice, dim=2)[0]
    det = dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0]
    assert (det > 0).all()


def test_combinations():
    aug = RandomFFDMisalignment(spacings=(20, 40), num_ffds=3)
    fixed = aug.fixed_combinations(3)
    assert len(fixed) == 6 and len(set(fixed)) == 6
    assert all(len(set(k)) == 1 for _, k in fixed)  # one FFD index for every sequence
    rng = np.random.default_rng(0)
    drawn = {aug.random_combination(3, rng) for _ in range(200)}
    assert any(len(set(k)) > 1 for _, k in drawn)  # training mixes indices across sequences
    assert {level for level, _ in drawn} == {0, 1}
    with pytest.raises(ValueError, match="spacings"):
        RandomFFDMisalignment(spacings=(0, 10))
    with pytest.raises(ValueError, match="level"):
        aug.transform(Grid.from_shape((8, 8)), 2, (0, 0, 0), (0,))


def test_probabilities_warped_with_labels():
    """rho warped with the labels stays a distribution (background fills the outside) and
    agrees with Eq. 38 recomputed from the warped labels."""
    from dcc.data.datasets import distance_rho

    p = cardiac_phantom(48, seed=2)
    grid = Grid.from_shape(p.labels.shape, p.spacing)
    labels = p.labels.expand(3, 48, 48)
    rho = distance_rho(labels, 1.0, p.spacing)
    aug = RandomFFDMisalignment()
    _, warped_labels, warped_rho = aug(p.images, labels, grid, 3, (0, 1, 2), (2,), rho)
    assert torch.allclose(warped_rho.sum(1), torch.ones(3, 48, 48), atol=1e-5)
    assert (warped_rho.argmax(1) == warped_labels).float().mean() > 0.97
    recomputed = distance_rho(warped_labels, 1.0, p.spacing)
    assert (warped_rho - recomputed).abs().mean() < 0.03
    with pytest.raises(ValueError, match="probabilities"):
        aug(p.images, labels, grid, 0, (0, 1, 2), (2,), rho[:, 0])


def _orientation_and_area(mask: torch.Tensor) -> tuple[float, float]:
    """Principal-axis angle (degrees, world x/y of an identity-direction grid) and area."""
    y, x = torch.nonzero(mask).double().T
    x, y = x - x.mean(), y - y.mean()
    angle = 0.5 * torch.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())
    return float(torch.rad2deg(angle)), float(mask.sum())


def test_group_augmentation_rotates_scales_the_whole_group():
    """One rotation and scaling for every member (the group stays aligned), by the angle and
    scale drawn from ``rng``; rho stays a distribution that follows the labels."""
    from dcc.data.augmentation import GroupAugmentation

    grid = Grid.from_shape((64, 64), (1.5, 1.5))
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    ellipse = (((xx - 32) / 18) ** 2 + ((yy - 32) / 8) ** 2 <= 1).long()  # long axis along x
    labels = ellipse.expand(3, 64, 64)
    rho = torch.stack([1 - ellipse, ellipse, 0 * ellipse, 0 * ellipse], 0).float()
    rho = rho.expand(3, 4, 64, 64)
    images = torch.randn(3, 64, 64)
    aug = GroupAugmentation(rotation=40, scaling=0.2)
    _, out_labels, out_rho = aug(images, labels, rho, grid, np.random.default_rng(5))
    draw = np.random.default_rng(5)
    angle = 40 * draw.uniform(-1, 1)
    scale = np.exp(np.log(1.2) * draw.uniform(-1, 1))
    assert abs(angle) > 10 and abs(np.log(scale)) > 0.02  # the seed draws a real change
    assert torch.equal(out_labels[0], out_labels[1]) and torch.equal(out_labels[0], out_labels[2])
    theta, area = _orientation_and_area(out_labels[0] == 1)
    # the output reads the input at A x: content turns by -angle and shrinks by the scale
    assert abs(theta - (-angle)) < 2.0
    assert abs(area / float(ellipse.sum()) - scale**-2) < 0.03
    assert torch.allclose(out_rho.sum(1), torch.ones(3, 64, 64), atol=1e-5)
    assert (out_rho.argmax(1) == out_labels).float().mean() > 0.99


def test_group_augmentation_gamma_and_identity():
    from dcc.data.augmentation import GroupAugmentation

    grid = Grid.from_shape((32, 32))
    images, labels = torch.randn(3, 32, 32), torch.randint(0, 4, (3, 32, 32))
    rho = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float()
    same = GroupAugmentation()(images, labels, rho, grid, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip(same, (images, labels, rho), strict=True))
    out, out_labels, _ = GroupAugmentation(gamma=0.5)(
        images, labels, rho, grid, np.random.default_rng(0)
    )
    assert torch.equal(out_labels, labels)
    assert out.min() >= 0 and out.max() <= 1
    for before, after in zip(images, out, strict=True):  # monotone: the same intensity order
        assert torch.equal(before.flatten().argsort(), after.flatten().argsort())
    g = np.exp(0.5 * np.random.default_rng(0).uniform(-1, 1, 3))
    unit = (images[0] - images[0].min()) / (images[0].max() - images[0].min())
    assert torch.allclose(out[0], unit ** float(g[0]), atol=1e-5)
    with pytest.raises(ValueError, match="rotation, scaling and gamma"):
        GroupAugmentation(gamma=-1)


def test_fresh_ffds_leave_the_bank():
    aug = RandomFFDMisalignment(num_ffds=5)
    rng = np.random.default_rng(0)
    fresh = [k for _ in range(20) for k in aug.random_combination(3, rng, fresh=True)[1]]
    assert max(fresh) >= 5 and len(set(fresh)) == len(fresh)
    grid = Grid.from_shape((32, 32))
    assert not torch.equal(
        aug.transform(grid, 0, (fresh[0],), (1,)).coefficients,
        aug.transform(grid, 0, (fresh[1],), (1,)).coefficients,
    )
