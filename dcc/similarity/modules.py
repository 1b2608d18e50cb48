"""Thin ``nn.Module`` wrappers over :mod:`dcc.similarity.functional`."""

from __future__ import annotations

import torch
from torch import nn

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
