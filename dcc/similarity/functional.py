"""The X-metric and the common-space update of X-CoReg as stateless functions (paper, Sec. 3.2).

Intensities are given in *bin units*: a value ``u`` in ``[1, L - 2]`` for ``L`` intensity levels
(see :func:`normalize_intensities`), so that the cubic B-spline Parzen window beta_3 centred on
the levels ``mu = 0 ... L-1`` is a partition of unity over the four levels it touches.
Values are ``(*B, N, M)`` for any leading batch dims ``B`` (``N`` images, ``M`` points);
posteriors are ``(*B, M, K)`` (shared by the group) or ``(*B, N, M, K)`` (one per image).
All probabilities that multiply are combined in log space.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcc.spatial.functional import cubic_bspline_weights, full_precision, reduce

EPS = 1e-10


def _quantiles(values: torch.Tensor, percentiles: tuple[float, ...]) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) of a 1D tensor at ``percentiles`` (in %), the
    same values bit for bit, from order statistics instead of a sort: ``topk`` near either
    end (the robust range's 0.5 / 99.5 %: a few hundred values, about 3x faster than a
    selection), ``kthvalue`` (linear time) in the middle."""
    n = values.numel()
    ranks = torch.tensor([p / 100 for p in percentiles], device=values.device) * (n - 1)
    below = ranks.floor()
    lower, upper = [], []
    for rank, k in zip(ranks.tolist(), below.long().tolist(), strict=True):
        hi = min(k + 1, n - 1)  # a[k] and a[hi] of the sorted values a
        if hi + 1 <= n // 8:  # the hi + 1 smallest, ascending
            smallest = values.topk(hi + 1, largest=False).values
            pair = smallest[k], smallest[hi]
        elif n - k <= n // 8:  # the n - k largest, descending
            largest = values.topk(n - k).values
            pair = largest[n - 1 - k], largest[n - 1 - hi]
        else:
            pair = values.kthvalue(k + 1).values, values.kthvalue(hi + 1).values
        lower.append(pair[0])
        upper.append(pair[1] if rank > k else pair[0])
    return torch.lerp(torch.stack(lower), torch.stack(upper), ranks - below)


def normalize_intensities(
    images: torch.Tensor,
    bins: int,
    mask: torch.Tensor | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> torch.Tensor:
    """Map each image ``(N, *shape)`` linearly to bin units ``[1, bins - 2]``.

    The range is given by robust ``percentiles`` of the voxels in ``mask`` (all voxels if
    ``None``); values outside it are clipped.
    """
    return to_bins(images, intensity_range(images, mask, percentiles), bins)


def intensity_range(
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> torch.Tensor:
    """``(N, 2)``: the robust ``percentiles`` of each image ``(N, *shape)`` over the voxels in
    ``mask`` (all if ``None``), or its min and max where they coincide."""
    flat = images.reshape(images.shape[0], -1).float()
    valid = None if mask is None else mask.reshape(images.shape[0], -1) > 0.5
    out = []
    for j in range(flat.shape[0]):
        vals = flat[j] if valid is None else flat[j][valid[j]]
        if vals.numel() == 0:
            raise ValueError(f"normalize_intensities: image {j} has no voxel inside its mask")
        lo, hi = _quantiles(vals[:: max(1, vals.numel() // 1_000_000)], percentiles).tolist()
        if hi - lo <= 0:
            lo, hi = vals.min().item(), vals.max().item()
        out.append((lo, hi))
    return torch.tensor(out, dtype=torch.float32)


def to_bins(images: torch.Tensor, ranges: torch.Tensor, bins: int) -> torch.Tensor:
    """Each image ``(N, *shape)`` mapped linearly from its range ``ranges[j] = (lo, hi)``
    (:func:`intensity_range`) to bin units ``[1, bins - 2]``, clipped."""
    if bins < 4:
        raise ValueError(f"normalize_intensities: need at least 4 bins, got {bins}")
    flat = images.reshape(images.shape[0], -1).float()
    out = torch.empty_like(flat)
    for j, (lo, hi) in enumerate(ranges.tolist()):
        scale = (bins - 3) / max(hi - lo, EPS)
        out[j] = ((flat[j] - lo) * scale).clamp(0, bins - 3) + 1
    return out.reshape(images.shape)


def parzen_window(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(..., 4)`` of the levels touched by beta_3 around ``values`` and their weights.

    The weights sum to one (partition of unity) and are differentiable in ``values``.
    """
    values = values.clamp(1, bins - 2)
    base = torch.floor(values.detach())
    weights = cubic_bspline_weights(values - base)
    offsets = torch.arange(-1, 3, device=values.device)
    index = (base.long().unsqueeze(-1) + offsets).clamp(0, bins - 1)
    return index, weights


def _shared_or_per_image(values: torch.Tensor, posterior: torch.Tensor, name: str) -> torch.Tensor:
    """Posterior ``(*B, M, K)`` (shared by the group) or ``(*B, N, M, K)`` expanded to
    ``(*B, N, M, K)`` for values ``(*B, N, M)``."""
    if posterior.dim() == values.dim():
        posterior = posterior.unsqueeze(-3)
    try:
        return posterior.expand(*values.shape, posterior.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name}: posterior must be (*B, M, K) or (*B, N, M, K) for values (*B, N, M) = "
            f"{tuple(values.shape)}, got {tuple(posterior.shape)}"
        ) from None


def _level_polynomials(per_level: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Coefficients of the cubic that ``sum_mu beta_3(u - mu) a(mu)`` is on the unit interval
    of each point, for a table ``a`` ``(G, L, K)`` and the points' levels ``base = floor(u)``
    ``(G, M)``: ``(4 powers, K, G, M)``, so that the value at ``u = base + t`` is
    ``((c[3] t + c[2]) t + c[1]) t + c[0]``. Points lie last (class-major layout): the per-point
    arithmetic then runs over long contiguous rows instead of 4x4 blocks, several times faster
    on a CPU."""
    g, bins, k = per_level.shape
    padded = torch.nn.functional.pad(per_level, (0, 0, 1, 3))  # row b + o: level b + o - 1
    levels = torch.arange(bins, device=per_level.device)
    neighbours = torch.stack([padded[:, levels + o] for o in range(4)], 2)  # (G, L, 4, K)
    basis = torch.tensor(_BSPLINE_BASIS, dtype=per_level.dtype, device=per_level.device)
    table = torch.einsum("glok,op->pkgl", neighbours, basis).reshape(4 * k, g * bins)
    rows = base.long() + bins * torch.arange(g, device=base.device).unsqueeze(1)
    return table.index_select(1, rows.reshape(-1)).view(4, k, g, base.shape[1])


class _ParzenHistogram(torch.autograd.Function):
    """Unnormalised Parzen joint histogram ``(G, L, K)`` of values ``(G, M)`` in bin units and
    posteriors ``(G, M, K)`` (may be an expanded view), with an analytic backward.

    Forward: the four beta_3 weights of every point times its posterior are accumulated by the
    level ``floor(u)`` of the point (one ``index_add`` of ``4K``-vectors per point, into
    ``L + 3`` levels per group, in class-major layout), then the four offsets are shifted onto
    their levels. Backward: the gradient of the histogram is read back per point with the
    polynomial (Horner) form of the weights (:func:`_level_polynomials`), as
    :func:`log_appearance` reads ``log f``. Both give the same values and gradients as autograd
    through :func:`parzen_window` and an ``index_add`` per point and level (up to float
    rounding), several times faster.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, posterior: torch.Tensor, bins: int) -> torch.Tensor:
        g, m = values.shape
        k = posterior.shape[-1]
        clamped = values.clamp(1, bins - 2)
        base = torch.floor(clamped)
        t = clamped - base
        s = 1 - t
        t2, s2 = t * t, s * s
        # cubic_bspline at t + 1, t, t - 1, t - 2 (offsets -1..2); base is in [1, L - 2], so the
        # levels base - 1 .. base + 2 lie in [0, L] (level L only with weight 0, dropped below)
        weights = torch.stack(
            [s2 * s / 6, 2 / 3 - t2 + 0.5 * t2 * t, 2 / 3 - s2 + 0.5 * s2 * s, t2 * t / 6], 0
        )  # (4, G, M)
        post = posterior.permute(2, 0, 1).contiguous()  # (K, G, M)
        src = (weights.unsqueeze(1) * post.unsqueeze(0)).view(4 * k, g * m)
        rows = base.long() + (bins + 3) * torch.arange(g, device=values.device).view(g, 1)
        acc = src.new_zeros(4 * k, g * (bins + 3)).index_add_(1, rows.reshape(-1), src)
        # acc[:, b, o]: points of level b, offset o - 1
        acc = acc.view(4, k, g, bins + 3).permute(2, 3, 0, 1)
        hist = acc[:, 1 : bins + 1, 0] + acc[:, :bins, 1]
        hist[:, 1:] += acc[:, : bins - 1, 2]
        hist[:, 2:] += acc[:, : bins - 2, 3]
        ctx.save_for_backward(values, post, base, t)
        ctx.bins = bins
        return hist

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, post, base, t = ctx.saved_tensors
        bins = ctx.bins
        c = _level_polynomials(grad, base)  # (4, K, G, M)
        grad_values = grad_posterior = None
        if ctx.needs_input_grad[0]:  # d/dt of the cubic, through the clamp (inclusive bounds)
            slope = (3 * c[3] * t + 2 * c[2]) * t + c[1]
            grad_values = (slope * post).sum(0) * ((values >= 1) & (values <= bins - 2))
        if ctx.needs_input_grad[1]:
            grad_posterior = (((c[3] * t + c[2]) * t + c[1]) * t + c[0]).permute(1, 2, 0)
        return grad_values, grad_posterior, None


@full_precision
def joint_histogram(
    values: torch.Tensor, posterior: torch.Tensor, bins: int, normalize: bool = True
) -> torch.Tensor:
    """Parzen estimate of p_j(mu, k) (Eq. 21), shape ``(*B, N, L, K)``.

    ``values`` ``(*B, N, M)`` in bin units, ``posterior`` ``(*B, M, K)`` (shared by the ``N``
    images) or ``(*B, N, M, K)``. Each point adds ``beta_3(u - mu) * gamma_k`` to the four
    levels ``mu`` it touches (the weights of :func:`parzen_window`; differentiable in both
    inputs, with an analytic backward).
    """
    if values.dim() < 2:
        raise ValueError(f"joint_histogram: values must be (*B, N, M), got {tuple(values.shape)}")
    posterior = _shared_or_per_image(values, posterior, "joint_histogram")
    m, k = values.shape[-1], posterior.shape[-1]
    g = values[..., 0].numel()  # all (batch, image) pairs
    hist = _ParzenHistogram.apply(
        values.reshape(g, m), posterior.reshape(g, m, k).to(values.dtype), bins
    )
    hist = hist.view(*values.shape[:-1], bins, k)
    if normalize:
        hist = hist / hist.sum((-2, -1), keepdim=True).clamp_min(EPS)
    return hist


@full_precision
def mutual_information(joint: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """I(U_j; Z) from normalised joint pmfs ``(*B, N, L, K)`` (Eq. 17), in nats, ``(*B, N)``."""
    p_mu = joint.sum(-1)
    p_k = joint.sum(-2)

    def plogp(p, dims):
        return (p * torch.log(p.clamp_min(eps))).sum(dims)

    return plogp(joint, (-2, -1)) - plogp(p_mu, -1) - plogp(p_k, -1)


def x_metric(
    values: torch.Tensor,
    posterior: torch.Tensor,
    bins: int,
    reduction: str = "sum",
    eps: float = EPS,
) -> torch.Tensor:
    """The X-metric sum_j I(U_j o phi_j; Z) (Eq. 8 with Eqs. 17-21).

    ``values`` ``(*B, N, M)``: warped intensities at the coordinate sample, in bin units;
    ``posterior`` ``(*B, M, K)`` or ``(*B, N, M, K)``: gamma at the same points.
    ``reduction="sum"`` adds the mutual informations over the group (and the batch),
    ``"mean"`` averages them, ``"none"`` returns them, ``(*B, N)``.
    """
    return reduce(mutual_information(joint_histogram(values, posterior, bins), eps), reduction)


@full_precision
def appearance_model(
    values: torch.Tensor, posterior: torch.Tensor, bins: int, eps: float = EPS
) -> torch.Tensor:
    """log f_jk(mu), the class-conditional intensity pmfs of Eq. (20), shape ``(*B, N, L, K)``.

    ``f_jk = (h_jk + eps / L) / (sum_mu h_jk + eps)`` for the Parzen counts ``h_jk(mu)``: a
    normalised pmf for every class; a class without mass in image j gets the uniform pmf
    ``1 / L``, so it carries no evidence in the posterior (Eq. 12) instead of explaining every
    intensity (``f = 1``). With one-hot label maps as ``posterior`` this is the ground-truth
    model of Eq. (48).
    """
    return log_pmf(joint_histogram(values, posterior, bins, normalize=False), eps)


def log_pmf(counts: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """log f_jk(mu) from Parzen counts ``(*B, N, L, K)`` (see :func:`appearance_model`)."""
    bins = counts.shape[-2]
    mass = counts.sum(-2, keepdim=True)
    return torch.log(counts + eps / bins) - torch.log(mass + eps)


# Coefficients of the four beta_3 weights of cubic_bspline_weights (offsets -1..2, rows) as
# polynomials in the fractional part t (columns: 1, t, t^2, t^3).
_BSPLINE_BASIS = (
    (1 / 6, -1 / 2, 1 / 2, -1 / 6),
    (2 / 3, 0.0, -1.0, 1 / 2),
    (1 / 6, 1 / 2, 1 / 2, -1 / 2),
    (0.0, 0.0, 0.0, 1 / 6),
)


@full_precision
def log_appearance(values: torch.Tensor, log_f: torch.Tensor) -> torch.Tensor:
    """log f_jk at continuous intensities: values ``(*B, N, M)``, ``log_f`` ``(*B, N, L, K)``
    -> ``(*B, N, M, K)``.

    The level of ``u`` is read with the same beta_3 weights as the estimate, in log space:
    ``log f_jk(u) = sum_mu beta_3(u - mu) log f_jk(mu)``. With this reading, Eq. (20) is the exact
    M-step of the E-step in Eq. (12), so the update never lowers Eq. (23).

    On each unit interval the sum is a cubic in the fractional part of ``u``; its coefficients
    are tabulated per level (``(G, L, 4, K)``), so every point costs one table row and a Horner
    evaluation instead of four weights and four look-ups.
    """
    if log_f.dim() < 3 or values.dim() < 2:
        raise ValueError(
            f"log_appearance: expected values (*B, N, M) and log_f (*B, N, L, K), got "
            f"{tuple(values.shape)} and {tuple(log_f.shape)}"
        )
    bins, k = log_f.shape[-2:]
    try:
        log_f = log_f.expand(*values.shape[:-1], bins, k)
    except RuntimeError:
        raise ValueError(
            f"log_appearance: log_f {tuple(log_f.shape)} does not match values "
            f"{tuple(values.shape)} (expected (*B, N, L, K))"
        ) from None
    batch, m = values.shape[:-1], values.shape[-1]
    g = values[..., 0].numel()
    values = values.reshape(g, m).clamp(1, bins - 2)
    base = torch.floor(values)
    t = values - base
    c = _level_polynomials(log_f.reshape(g, bins, k), base)  # (4, K, G, M)
    out = ((c[3] * t + c[2]) * t + c[1]) * t + c[0]
    return out.permute(1, 2, 0).reshape(*batch, m, k)


@full_precision
def posterior(
    values: torch.Tensor,
    log_f: torch.Tensor,
    log_prior: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior gamma of the common anatomy (Eq. 12) in log space.

    ``values`` ``(*B, N, M)``, ``log_f`` ``(*B, N, L, K)``; ``log_prior`` is ``log pi``,
    ``(K,)`` or ``(*B, K)``, or a spatial prior ``(*B, M, K)`` (Eq. 40). Returns ``log_gamma``
    ``(*B, M, K)`` and the per-point log-likelihood ``(*B, M)``, the summand of Eq. (23).

    ``reduce`` (optional) turns the per-point sums ``sum_j log f_jk(u_j)`` over the ``N``
    images given into the sums over the whole group, when the group is split across processes
    (an all-reduce, :mod:`dcc.coreg.distributed`): the posterior depends on the images only
    through these sums.
    """
    joint = log_appearance(values, log_f).sum(-3)
    if reduce is not None:
        joint = reduce(joint)
    return posterior_from_joint(joint, log_prior)


@full_precision
def posterior_from_joint(
    joint: torch.Tensor, log_prior: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (12) from the per-point sums ``joint`` ``(*B, M, K)`` of ``log f_jk(u_j)`` over the
    images (:func:`posterior`, e.g. all-reduced across processes) and ``log_prior`` as in
    :func:`posterior`: ``(log_gamma, log_evidence)``."""
    if log_prior.dim() <= joint.dim() - 1:  # log pi per class: (K,) or (*B, K)
        log_prior = log_prior.unsqueeze(-2)
    try:
        joint = joint + log_prior
    except RuntimeError:
        raise ValueError(
            f"posterior: log_prior must be (K,), (*B, K) or (*B, M, K) for points (*B, M) = "
            f"{tuple(joint.shape[:-1])}, got {tuple(log_prior.shape)}"
        ) from None
    peak = joint.amax(-1, keepdim=True)  # log-sum-exp over the K classes
    log_evidence = peak + (joint - peak).exp().sum(-1, keepdim=True).log()
    return joint - log_evidence, log_evidence.squeeze(-1)


def log_likelihood(
    values: torch.Tensor, log_f: torch.Tensor, log_prior: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Eq. (23): sum over points of log sum_k pi_k prod_j f_jk(u_xj) (and over the batch for
    ``reduction="sum"``; ``"none"`` gives the per-point terms ``(*B, M)``)."""
    return reduce(posterior(values, log_f, log_prior)[1], reduction)


@full_precision
def proportions(gamma: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """pi_k of Eq. (14): gamma ``(*B, M, K)`` over the overlap region, normalised, ``(*B, K)``."""
    pi = gamma.sum(-2)
    return pi / pi.sum(-1, keepdim=True).clamp_min(eps)


def random_posterior(
    num_points: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """gamma^[0] of Eq. (22): softmax of standard normal logits, ``(M, K)`` on ``device``
    (drawn by :func:`seeded_draw`: the same gamma^[0] on every device for a seeded CPU
    generator)."""
    logits = seeded_draw(torch.randn, (num_points, num_classes), generator, device)
    return torch.softmax(logits, dim=-1)


def seeded_draw(sampler, shape: tuple[int, ...], generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """``sampler(shape)`` (``torch.rand``, ``torch.randn``) drawn on the generator's device (the
    CPU without one) and moved to ``device``: a seeded CPU generator then gives the same numbers
    whatever device the computation runs on."""
    source = generator.device if generator is not None else torch.device("cpu")
    out = sampler(shape, generator=generator, device=source)
    return out if device is None else out.to(device)


def entropy(p: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim)
