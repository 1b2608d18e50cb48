"""The DCC network (dcc.nets, paper Sec. 3.5.3, Fig. 5) on tiny inputs."""

import pytest
import torch
from torch import nn

from dcc.nets import DCCNet, DomainBatchNorm
from dcc.nets.functional import (
    crop,
    domain_batch_norm,
    group_moments,
    pad_to_multiple,
    sort_by_domain,
    upsample_displacement,
)


def tiny_net(ndim=2, **kwargs):
    torch.manual_seed(0)
    options = dict(ndim=ndim, num_classes=3, num_domains=3, channels=4, levels=3) | kwargs
    return DCCNet(**options)


def activate_heads(net, std=0.5):
    """Zero-initialised heads give zero fields; make them non-zero to test the field path."""
    with torch.no_grad():
        for head in net.reg_heads.values():
            head.weight.normal_(0, std)
            head.bias.normal_(0, std)


def group(b=1, n=3, size=(32, 32), seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, n, *size, generator=gen) * 50 + 10
    domains = torch.arange(n).remainder(3).expand(b, n).contiguous()
    return images, domains


@pytest.mark.parametrize(
    ("ndim", "size", "block_convs", "reg_finest_level"),
    [(2, (32, 32), 2, 0), (2, (32, 32), 1, 1), (3, (16, 16, 8), 2, 0), (3, (16, 8, 16), 1, 1)],
)
def test_output_shapes(ndim, size, block_convs, reg_finest_level):
    net = tiny_net(ndim, block_convs=block_convs, reg_finest_level=reg_finest_level)
    images, domains = group(2, 3, size)
    out = net(images, domains)
    assert out.seg_logits.shape == (2, 3, 3, *size)
    assert out.displacement.shape == (2, 3, ndim, *size)
    assert torch.isfinite(out.seg_logits).all() and torch.isfinite(out.displacement).all()


def test_displacement_alone_equals_the_forward_fields():
    net = tiny_net()
    activate_heads(net)
    net.eval()
    images, domains = group(2, 3)
    out = net(images, domains)
    fields = net.displacement(images, domains)
    torch.testing.assert_close(fields, out.displacement)
    assert fields.abs().max() > 0


def test_zero_init_heads_give_identity():
    out = tiny_net()(*group())
    assert torch.count_nonzero(out.displacement) == 0


@pytest.mark.parametrize("size", [(33, 29), (7, 30), (31, 31)])
def test_odd_sizes_are_padded_and_cropped_back(size):
    net = tiny_net()
    activate_heads(net)
    images, domains = group(1, 3, size)
    out = net(images, domains)
    assert out.seg_logits.shape[-2:] == size and out.displacement.shape[-2:] == size
    # The crop keeps the input's own voxels: padding then cropping is the identity.
    padded, slices = pad_to_multiple(images, 2, 4)
    assert all(s % 4 == 0 for s in padded.shape[-2:])
    torch.testing.assert_close(crop(padded, slices), images, rtol=0, atol=0)


def test_zscore_makes_the_net_invariant_to_intensity_scale_and_offset():
    net = tiny_net().eval()
    activate_heads(net)
    images, domains = group()
    a, b = net(images, domains), net(images * 7.5 + 300.0, domains)
    torch.testing.assert_close(a.seg_logits, b.seg_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(a.displacement, b.displacement, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------- DSBN
@pytest.mark.parametrize("counts", [[3, 0, 4], [2, 2, 2]], ids=["per-domain", "one-call"])
def test_domain_batch_norm_equals_one_batch_norm_per_domain(counts):
    """Both paths (a call per domain; one call when every domain has as many images) give
    what separate batch norms give: outputs, gradients and running statistics."""
    torch.manual_seed(0)
    x = (torch.randn(sum(counts), 5, 6, 6) * 3 + 1).requires_grad_()
    dsbn = DomainBatchNorm(5, 3)
    with torch.no_grad():
        dsbn.weight.uniform_(0.5, 2)
        dsbn.bias.normal_()
    refs = [nn.BatchNorm2d(5) for _ in range(3)]
    for d, ref in enumerate(refs):
        ref.weight.data.copy_(dsbn.weight[d])
        ref.bias.data.copy_(dsbn.bias[d])
    present = [d for d, c in enumerate(counts) if c]
    chunks = x.split(counts)
    for training in (True, False):
        dsbn.train(training)
        expected = torch.cat([refs[d].train(training)(chunks[d]) for d in present])
        got = dsbn(x, counts)
        torch.testing.assert_close(got, expected)
        weights = torch.randn_like(got)
        grad = torch.autograd.grad((got * weights).sum(), x)[0]
        torch.testing.assert_close(grad, torch.autograd.grad((expected * weights).sum(), x)[0])
    for d in present:
        torch.testing.assert_close(dsbn.running_mean[d], refs[d].running_mean)
        torch.testing.assert_close(dsbn.running_var[d], refs[d].running_var)
    for d in set(range(3)) - set(present):  # an absent domain keeps its initial statistics
        assert torch.equal(dsbn.running_mean[d], torch.zeros(5))
        assert torch.equal(dsbn.running_var[d], torch.ones(5))


def test_sort_by_domain_round_trip():
    domains = torch.tensor([2, 0, 1, 0, 2])
    order, inverse, counts = sort_by_domain(domains, 4)
    assert counts == [2, 1, 2, 0]
    assert domains[order].tolist() == [0, 0, 1, 2, 2] and order[inverse].tolist() == [0, 1, 2, 3, 4]
    assert sort_by_domain(torch.tensor([0, 0, 2]), 3)[0] is None  # already sorted: no gather


def dsbn_layers(net):
    return [m for m in net.modules() if isinstance(m, DomainBatchNorm)]


def test_running_stats_change_only_for_present_domains():
    net = tiny_net().train()
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in dsbn_layers(net)]
    images, _ = group(2, 2)
    net(images, torch.tensor([[2, 0], [0, 2]]))  # domain 1 absent
    for (mean0, var0), m in zip(before, dsbn_layers(net), strict=True):
        assert torch.equal(m.running_mean[1], mean0[1]) and torch.equal(m.running_var[1], var0[1])
        for d in (0, 2):
            assert not torch.equal(m.running_mean[d], mean0[d])
            assert not torch.equal(m.running_var[d], var0[d])


def test_mixed_domain_batch_matches_separate_domain_batches():
    """An image's train-mode features depend only on the images of its own domain in the batch,
    whatever the order and mix of domains."""
    net = tiny_net().train()
    images, _ = group(1, 5)
    mixed = net.encode(images, torch.tensor([[2, 0, 1, 0, 2]]))
    only0 = net.encode(images[:, [1, 3]], torch.tensor([[0, 0]]))
    only2 = net.encode(images[:, [0, 4]], torch.tensor([[2, 2]]))
    for lv in range(net.levels):
        torch.testing.assert_close(mixed[lv][:, [1, 3]], only0[lv], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mixed[lv][:, [0, 4]], only2[lv], rtol=1e-4, atol=1e-5)


def test_same_pixels_different_domains_get_different_features():
    net = tiny_net().train()
    images, _ = group(1, 4)
    images[0, 2] = images[0, 0]  # image 2 = image 0, in another domain
    features = net.encode(images, torch.tensor([[0, 0, 1, 1]]))
    for f in features:
        assert (f[0, 0] - f[0, 2]).abs().max() > 1e-3
    # A fresh net in eval mode has the same running statistics and affine maps in every
    # domain, and then the features agree: the difference came from the domains' own statistics.
    net = tiny_net().eval()
    features = net.encode(images, torch.tensor([[0, 0, 1, 1]]))
    torch.testing.assert_close(features[-1][0, 0], features[-1][0, 2])


# ---------------------------------------------------------------- group symmetry, any N
@pytest.mark.parametrize(("training", "reg_finest_level"), [(True, 0), (False, 1), (True, 1)])
def test_fusion_invariant_and_fields_equivariant_to_group_order(training, reg_finest_level):
    net = tiny_net(reg_finest_level=reg_finest_level).train(training)
    activate_heads(net)
    images, _ = group(2, 4)
    domains = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    perm = [2, 0, 3, 1]
    out = net(images, domains)
    out_p = net(images[:, perm], domains[:, perm])
    torch.testing.assert_close(out_p.displacement, out.displacement[:, perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_p.seg_logits, out.seg_logits[:, perm], rtol=1e-4, atol=1e-5)
    fused = net.fuse(net.encode(images, domains))
    fused_p = net.fuse(net.encode(images[:, perm], domains[:, perm]))
    assert fused.keys() == fused_p.keys() == set(range(reg_finest_level, net.levels))
    for lv in fused:
        torch.testing.assert_close(fused_p[lv], fused[lv], rtol=1e-4, atol=1e-5)
    # Each image gets its own field (equivariant, not merely invariant).
    assert (out.displacement[:, 0] - out.displacement[:, 1]).abs().max() > 1e-3


def test_group_moments():
    x = torch.randn(2, 5, 3, 4)
    mean, var = group_moments(x, dim=1)
    torch.testing.assert_close(mean, x.mean(1))
    torch.testing.assert_close(var, x.var(1, correction=0))
    assert torch.equal(group_moments(x[:, :1], dim=1)[1], torch.zeros(2, 3, 4))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_any_group_size_with_the_same_weights_and_zero_mean_fields(n):
    net = tiny_net()
    activate_heads(net)
    images, domains = group(2, n)
    out = net(images, domains)
    assert out.displacement.shape == (2, n, 2, 32, 32)
    torch.testing.assert_close(out.displacement.mean(1), torch.zeros(2, 2, 32, 32),
                               rtol=0, atol=1e-5)  # Eq. 37
    if n == 1:  # a group of one has nothing to align to: its zero-mean field is zero
        assert torch.equal(out.displacement, torch.zeros_like(out.displacement))
    else:
        assert out.displacement.abs().max() > 1e-3


def test_upsample_displacement_keeps_voxel_units():
    field = torch.ones(1, 2, 4, 4)
    up = upsample_displacement(field, 2)
    assert up.shape == (1, 2, 8, 8)
    torch.testing.assert_close(up, torch.full((1, 2, 8, 8), 2.0))


# ------------------------------------------------------------------- modes and gradients
def test_eval_mode_is_deterministic_and_switches_every_submodule():
    net = tiny_net(dropout=0.5)
    activate_heads(net)
    images, domains = group()
    net.train()
    a, b = net(images, domains), net(images, domains)
    assert not torch.equal(a.seg_logits, b.seg_logits)  # dropout is active in training
    net.eval()
    assert all(not m.training for m in net.modules())
    a, b = net(images, domains), net(images, domains)
    assert torch.equal(a.seg_logits, b.seg_logits)
    assert torch.equal(a.displacement, b.displacement)
    # An image's eval output does not depend on the rest of the batch's statistics.
    images2 = images.clone()
    images2[0, 1:] = torch.rand_like(images2[0, 1:]) * 100
    c = net(images2, domains)
    features, features2 = net.encode(images, domains), net.encode(images2, domains)
    torch.testing.assert_close(features[0][:, 0], features2[0][:, 0])
    assert not torch.allclose(c.displacement, a.displacement)


def test_gradient_reaches_every_parameter():
    net = tiny_net(dropout=0.1).train()
    activate_heads(net, std=0.1)
    images, _ = group(1, 3)
    out = net(images, torch.tensor([[0, 1, 2]]))
    gen = torch.Generator().manual_seed(0)
    loss = (out.seg_logits * torch.randn(out.seg_logits.shape, generator=gen)).sum() + (
        out.displacement * torch.randn(out.displacement.shape, generator=gen)
    ).sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


def test_parameter_groups_partition_the_parameters():
    net = tiny_net()
    seg = {id(p) for p in net.segmentation_parameters()}
    reg = {id(p) for p in net.registration_parameters()}
    assert not seg & reg
    assert seg | reg == {id(p) for p in net.parameters()}
    assert net.num_parameters() == sum(p.numel() for p in net.parameters())


def test_default_widths_double_per_level():
    """The paper's encoder: C channels at the finest level, doubling at each of L_R levels; the
    count of parameters follows (a 3x3 convolution has 9 C_in C_out + C_out of them)."""
    for channels, levels in ((16, 4), (8, 3)):
        net = DCCNet(channels=channels, levels=levels)
        assert net.widths == [channels * 2**k for k in range(levels)]
    assert (DCCNet().ndim, DCCNet().num_classes) == (2, 4)


@pytest.mark.parametrize(
    ("images", "domains", "match"),
    [
        (torch.rand(3, 32, 32), torch.zeros(3, dtype=torch.long), "spatial axes"),
        (torch.rand(1, 3, 32, 32), torch.zeros(1, 2, dtype=torch.long), r"domains must be"),
        (torch.rand(1, 3, 32, 32), torch.zeros(1, 3), "integer"),
        (torch.rand(1, 3, 32, 32), torch.tensor([[0, 1, 3]]), r"\[0, 2\]"),
        (torch.randint(0, 5, (1, 3, 32, 32)), torch.zeros(1, 3, dtype=torch.long), "floating"),
    ],
)
def test_bad_input_raises_value_error(images, domains, match):
    with pytest.raises(ValueError, match=match):
        tiny_net()(images, domains)


def test_bad_construction_raises_value_error():
    with pytest.raises(ValueError, match="ndim"):
        DCCNet(ndim=4)
    with pytest.raises(ValueError, match="reg_finest_level"):
        DCCNet(levels=3, reg_finest_level=3)


def test_domain_batch_norm_functional_without_running_stats():
    x = torch.randn(4, 2, 5, 5)
    y = domain_batch_norm(x, [2, 2], None, None, None, None, training=False)
    ref = torch.cat([nn.functional.batch_norm(x[:2], None, None, training=True),
                     nn.functional.batch_norm(x[2:], None, None, training=True)])
    torch.testing.assert_close(y, ref)


def test_channels_last_model_gives_the_same_output():
    """Channels-last weights (faster CPU inference, see bench/bench_dcc_speed.py) change only
    the memory layout."""
    net = tiny_net().eval()
    activate_heads(net)
    images, domains = group()
    expected = net(images, domains)
    out = net.to(memory_format=torch.channels_last)(images, domains)
    torch.testing.assert_close(out.seg_logits, expected.seg_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.displacement, expected.displacement, rtol=1e-4, atol=1e-4)
