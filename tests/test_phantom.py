import numpy as np
import pytest
import torch

from dcc.data import phantom as ph
from dcc.data.misalignment import phantom_group
from dcc.data.phantom import CONTRASTS, TISSUES, brain_phantom


@pytest.fixture(scope="module")
def p2d():
    return brain_phantom()


def test_2d_default(p2d):
    assert p2d.images.shape == (3, 233, 197) and p2d.images.dtype == torch.float32
    assert p2d.labels.shape == (233, 197) and p2d.labels.dtype == torch.int64
    assert p2d.names == ["T1", "T2", "PD"]
    assert p2d.grid.shape == (233, 197) and p2d.grid.spacing == (1.0, 1.0)
    assert p2d.grid.origin == (98.0, 134.0)  # MNI RAS (-98, -134) in LPS
    np.testing.assert_array_equal(p2d.grid.direction_matrix, np.diag([-1.0, -1.0]))
    assert set(p2d.labels.unique().tolist()) == {0, 1, 2, 3} and len(TISSUES) == 4
    assert torch.isfinite(p2d.images).all() and (p2d.images >= 0).all()


def tissue_means(images, labels):
    return torch.stack([images[:, labels == k].mean(1) for k in (1, 2, 3)], 1)  # (N, CSF/GM/WM)


def test_contrast_ordering(p2d):
    (t1, t2, pd) = tissue_means(p2d.images, p2d.labels)
    assert t1[2] > t1[1] > t1[0]  # T1: WM > GM > CSF
    assert t2[0] > t2[1] > t2[2]  # T2: CSF > GM > WM
    assert pd[0] > pd[1] > pd[2]
    # the labelled tissue means are close to the nominal ones (partial volume, bias, noise)
    nominal = torch.tensor([CONTRASTS[c] for c in p2d.names])
    torch.testing.assert_close(tissue_means(p2d.images, p2d.labels), nominal, atol=0.12, rtol=0)


def test_skull_stripped_background():
    for noise in (0.0, 0.03):
        p = brain_phantom(noise=noise, downsample=2)
        assert (p.images[:, p.labels == 0] == 0).all()
        assert (p.images[:, p.labels > 0] > 0).all()
    assert brain_phantom(contrasts="T2", downsample=4).names == ["T2"]


def test_3d_downsampled_and_realisations():
    p = brain_phantom(dim=3, contrasts=("T2", "T1"), realisations=3, downsample=4)
    assert p.images.shape == (6, 48, 59, 50) and p.labels.shape == (48, 59, 50)
    assert p.names == ["T2_0", "T1_0", "T2_1", "T1_1", "T2_2", "T1_2"]
    assert p.grid.shape == (48, 59, 50) and p.grid.spacing == (4.0, 4.0, 4.0)
    # voxel (1, 1, 1) of the coarse grid is voxel (4, 4, 4) of the 1 mm grid
    full = ph._mni_maps()[1]
    np.testing.assert_allclose(
        p.grid.index_to_world_matrix() @ [1, 1, 1, 1], full.index_to_world_matrix() @ [4, 4, 4, 1]
    )
    assert not torch.equal(p.images[1], p.images[3])  # independent realisations
    t1_means = tissue_means(p.images[1::2], p.labels)
    assert (t1_means[:, 2] > t1_means[:, 1]).all() and (t1_means[:, 1] > t1_means[:, 0]).all()


def test_2d_is_middle_axial_slice_of_3d():
    kw = {"noise": 0.0, "bias": 0.0, "downsample": 2}
    p2, p3 = brain_phantom(dim=2, **kw), brain_phantom(dim=3, **kw)
    assert p3.labels.shape[0] == 95 and 189 // 2 == 2 * 47
    torch.testing.assert_close(p2.images, p3.images[:, 47])
    torch.testing.assert_close(p2.labels, p3.labels[47])


def test_deterministic_and_seeded():
    a, b = brain_phantom(downsample=2, seed=3), brain_phantom(downsample=2, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = brain_phantom(downsample=2, seed=4)
    assert not torch.equal(a.images, c.images)
    # the first realisation does not depend on how many are drawn
    d = brain_phantom(downsample=2, seed=3, realisations=2)
    assert torch.equal(d.images[:3], a.images)


@pytest.mark.parametrize("noise", [0.03, 0.08])
def test_noise_level(noise):
    noisy = brain_phantom(noise=noise, seed=1)
    clean = brain_phantom(noise=0.0, seed=1)  # same seed: same bias fields
    brain = noisy.labels > 0
    for name, a, b in zip(noisy.names, noisy.images, clean.images, strict=True):
        std = (a - b)[brain].std().item()
        assert std == pytest.approx(noise * max(CONTRASTS[name]), rel=0.1)


def test_bias_field():
    flat = brain_phantom(noise=0.0, bias=0.0, downsample=2)
    biased = brain_phantom(noise=0.0, bias=0.2, downsample=2, seed=5)
    brain = flat.labels > 0
    ratio = biased.images[:, brain] / flat.images[:, brain]
    assert ratio.min() >= 0.9 - 1e-5 and ratio.max() <= 1.1 + 1e-5
    assert (ratio.amax(1) - ratio.amin(1) > 0.05).all()  # a visible non-uniformity per image
    torch.testing.assert_close(ratio[0], ratio[1])  # one coil field for the session
    own = brain_phantom(noise=0.0, bias=0.2, downsample=2, seed=5, bias_per_image=True)
    ratio = own.images[:, brain] / flat.images[:, brain]
    assert not torch.allclose(ratio[0], ratio[1])  # independent fields per image
    field = ph._smooth_field((20, 30), np.random.default_rng(0))
    assert field.min() == pytest.approx(-0.5) and field.max() == pytest.approx(0.5)


def test_phantom_group_of_any_size(p2d):
    """N images for any N: T1/T2/PD of ceil(N / 3) noisy realisations, each under its own FFD."""
    group = phantom_group(5, seed=3)
    assert group.images.shape == group.labels.shape == (5, 233, 197)
    assert group.names == ["T1_0", "T2_0", "PD_0", "T1_1", "T2_1"]
    assert group.grid == p2d.grid and torch.equal(group.foreground, p2d.labels)
    assert 2.0 < group.warping_index() < 4.5  # 40 mm FFDs of 5.4 mm std: gWI about 3 mm
    # no displacement: the phantom's first N images and labels themselves
    still = phantom_group(5, std=0.0)
    plain = brain_phantom(realisations=2)
    torch.testing.assert_close(still.images, plain.images[:5], atol=1e-4, rtol=0)
    assert torch.equal(still.labels, plain.labels.expand(5, -1, -1))
    assert not torch.equal(still.images[0], still.images[3])  # T1 of two noise realisations
    # seeded; an already built phantom gives the same group; each image moves on its own
    same = phantom_group(5, phantom=plain, seed=3)
    assert torch.equal(same.images, group.images) and torch.equal(same.labels, group.labels)
    assert not torch.equal(phantom_group(5, phantom=plain, seed=4).images, group.images)
    ffd = group.truth.coefficients
    assert not torch.equal(ffd[0], ffd[1]) and ffd.std().item() == pytest.approx(5.4, rel=0.2)
    with pytest.raises(ValueError, match="3 images, 4 asked for"):
        phantom_group(4, phantom=p2d)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names: T1, T2, PD"):
        brain_phantom(contrasts=("T1", "FLAIR"))
    with pytest.raises(ValueError, match="dim"):
        brain_phantom(dim=4)
    with pytest.raises(ValueError, match="realisations"):
        brain_phantom(realisations=0)


def test_shipped_files_match_nilearn_loaders():
    fast, grid = ph._read_shipped_maps()
    reference, reference_grid = ph._load_nilearn_maps()
    assert grid == reference_grid
    for key in ("gm", "wm", "mask"):
        np.testing.assert_array_equal(fast[key], reference[key])
