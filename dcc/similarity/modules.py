"""Thin ``nn.Module`` wrappers over :mod:`dcc.similarity.functional`."""

from __future__ import annotations

import torch
from torch import nn

from dcc.similarity import baselines as B
from dcc.similarity import functional as XF


class XMetric(nn.Module):
    """The X-metric of Eq. (8): sum_j I(U_j o phi_j; Z) with Parzen pmfs (Eqs. 17-21).

    ``forward(values, posterior)`` takes warped intensities ``(*B, N, M)`` in bin units and the
    posterior ``(*B, M, K)`` or ``(*B, N, M, K)`` at the same points; it computes in float32
    under autocast. ``reduction="sum"`` adds the mutual informations over the group and the
    batch, ``"none"`` returns them, ``(*B, N)``.
    """

    def __init__(self, bins: int = 64, reduction: str = "sum", eps: float = XF.EPS):
        super().__init__()
        self.bins, self.reduction, self.eps = bins, reduction, eps

    def forward(self, values: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
        return XF.x_metric(values, posterior, self.bins, self.reduction, self.eps)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, reduction={self.reduction!r}"


class GroupObjective(nn.Module):
    """A groupwise objective on a coordinate sample, to maximise (the engine's interface for
    the competing metrics of :mod:`dcc.similarity.baselines`).

    ``forward(values, bins, state)`` takes the warped intensities ``(N, m)`` in bin units
    ``[1, L - 2]`` and returns a scalar to maximise, differentiable in ``values``; ``init``
    and ``update`` (no gradient) create and refine the state the objective carries from step
    to step (the GMM's parameters; ``None`` for the others). Values are per point (averaged
    over the sample) so that samples of different sizes compare.
    """

    name = ""

    def init(self, values: torch.Tensor, bins: int):
        return None

    def update(self, values: torch.Tensor, bins: int, state):
        return state

    def forward(self, values: torch.Tensor, bins: int, state=None) -> torch.Tensor:
        raise NotImplementedError


class NegativeVariance(GroupObjective):
    """VI: minus the variance of intensities (unit intensities), monomodal groups."""

    name = "vi"

    def forward(self, values, bins, state=None):
        return -B.variance_of_intensities(B.unit_intensities(values, bins))


class NegativeCongealing(GroupObjective):
    """CG: minus the congealing entropy, Gaussian kernel of width ``sigma`` (unit
    intensities)."""

    name = "cg"

    def __init__(self, sigma: float = 0.05):
        super().__init__()
        self.sigma = sigma

    def forward(self, values, bins, state=None):
        return -B.congealing_entropy(B.unit_intensities(values, bins), self.sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class AccumulatedPairwiseMI(GroupObjective):
    """APE: the sum of the pairwise mutual informations."""

    name = "ape"

    def forward(self, values, bins, state=None):
        return B.accumulated_pairwise_mi(values, bins)


class NegativeTemplateEntropy(GroupObjective):
    """CTE: minus the sum of the conditional entropies given the principal template."""

    name = "cte"

    def forward(self, values, bins, state=None):
        return -B.conditional_template_entropy(values, bins)


class GaussianMixture(GroupObjective):
    """GMM: the mixture's log-likelihood per point (unit intensities), its ``k`` components
    fitted by EM (:meth:`update`: one step on the sample, without gradient)."""

    name = "gmm"

    def __init__(self, k: int = 4, ridge: float = B.GMM_RIDGE):
        super().__init__()
        self.k, self.ridge = k, ridge

    def init(self, values, bins):
        return B.gmm_init(B.unit_intensities(values, bins), self.k, self.ridge)

    def update(self, values, bins, state):
        units = B.unit_intensities(values, bins)
        if state is None:
            state = B.gmm_init(units, self.k, self.ridge)
        return B.gmm_em_step(units, state, self.ridge)

    def forward(self, values, bins, state=None):
        return B.gmm_log_likelihood(B.unit_intensities(values, bins), state)

    def extra_repr(self) -> str:
        return f"k={self.k}, ridge={self.ridge}"


def group_objective(method: str, num_classes: int = 4, congealing_sigma: float = 0.05):
    """The objective of a competing ``method`` (``cte``, ``ape``, ``gmm``, ``cg``, ``vi``);
    ``None`` for the X-metric (``xcoreg``, ``xcoreg-gt``), which the engine computes itself."""
    if method in ("xcoreg", "xcoreg-gt"):
        return None
    table = {
        "vi": NegativeVariance,
        "cg": lambda: NegativeCongealing(congealing_sigma),
        "ape": AccumulatedPairwiseMI,
        "cte": NegativeTemplateEntropy,
        "gmm": lambda: GaussianMixture(num_classes),
    }
    if method not in table:
        raise ValueError(f"unknown method '{method}'; choose from xcoreg, xcoreg-gt, "
                         f"{', '.join(table)}")
    return table[method]()
