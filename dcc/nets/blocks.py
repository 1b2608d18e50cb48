"""Building blocks of the DCC network: DSBN and residual convolutional blocks (Fig. 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dcc.nets.functional import domain_batch_norm


def conv_class(ndim: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    if ndim not in (2, 3):
        raise ValueError(f"DCC network: ndim must be 2 or 3, got {ndim}")
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def batch_norm_class(ndim: int) -> type[nn.Module]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


def dropout_class(ndim: int) -> type[nn.Module]:
    """Channel dropout for 2D or 3D feature maps."""
    return nn.Dropout2d if ndim == 2 else nn.Dropout3d


class DomainBatchNorm(nn.Module):
    """One batch norm per domain (DSBN), chosen per image: see
    :func:`dcc.nets.functional.domain_batch_norm`. Works for 2D and 3D maps alike."""

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"DomainBatchNorm: num_domains must be >= 1, got {num_domains}")
        self.num_features, self.num_domains = num_features, num_domains
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_domains, num_features))
        self.bias = nn.Parameter(torch.zeros(num_domains, num_features))
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """``x`` ``(M, C, *S)`` sorted by domain, ``counts[d]`` images of domain ``d``."""
        return domain_batch_norm(
            x, counts, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}"


class ResidualBlock(nn.Module):
    """Residual convolutional block (RCB): ``act(norm(conv(...)) + skip(x))``.

    ``convs`` 3×3(×3) convolutions, each followed by a norm (the activation sits between them);
    the skip is the identity, or a 1×1 convolution where the channel count changes. With
    ``num_domains`` the norms are :class:`DomainBatchNorm` (the encoder's DSBN) and ``forward``
    takes the batch sorted by domain with the ``counts`` of images per domain; otherwise plain
    batch norms. Optional channel dropout (``dropout > 0``) on the output, only active in
    training mode.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, convs: int = 2,
                 num_domains: int | None = None, dropout: float = 0.0):
        super().__init__()
        if convs < 1:
            raise ValueError(f"ResidualBlock: convs must be >= 1, got {convs}")
        conv = conv_class(ndim)
        self.convs = nn.ModuleList(
            conv(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False)
            for i in range(convs)
        )
        self.norms = nn.ModuleList(
            DomainBatchNorm(out_channels, num_domains) if num_domains
            else batch_norm_class(ndim)(out_channels)
            for _ in range(convs)
        )
        self.domain_specific = bool(num_domains)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else conv(in_channels, out_channels, 1, bias=False))
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.dropout = dropout_class(ndim)(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            if i:
                h = self.act(h)
            h = conv(h)
            h = norm(h, counts) if self.domain_specific else norm(h)
        return self.dropout(self.act(h.add_(self.skip(x))))  # in place: no extra full map
