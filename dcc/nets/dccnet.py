"""The deep combined computing network of the paper (Sec. 3.5.3, Fig. 5). Pure torch.

Encoder ``E`` with domain-specific batch norms, a bottleneck, a segmentation decoder ``D_s`` and
a registration decoder ``D_r`` fed by the moment fusion of the group's features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dcc.nets.blocks import ResidualBlock, conv_class
from dcc.nets.functional import (
    crop,
    group_moments,
    pad_to_multiple,
    sort_by_domain,
    upsample_displacement,
)
from dcc.spatial.functional import zscore


class DCCOutput(NamedTuple):
    """``seg_logits`` ``(B, N, K, *S)`` (softmax over K gives the maps rho-hat of Eq. 39) and
    ``displacement`` ``(B, N, ndim, *S)`` in voxel units, zero-mean over N (Eq. 37)."""

    seg_logits: torch.Tensor
    displacement: torch.Tensor


class DCCNet(nn.Module):
    """Network of Fig. 5 for groups of ``N`` images of ``num_domains`` sequences (any ``N``).

    * Each image is z-scored, padded (edge replication) to a multiple of ``2**(levels-1)``, and
      encoded independently: level ``l = 1..levels`` has ``channels·2**(l-1)`` feature maps at
      ``1/2**(l-1)`` resolution (max pooling between levels); the last level is the bottleneck.
      The convolutions are shared by all sequences; every batch norm of the encoder and the
      bottleneck is domain-specific (DSBN), picked per image by its domain index (the flat
      batch of ``B·N`` images is grouped by domain once, each domain's images go through the
      native batch norm of their domain, and the features are put back in order per level).
    * ``D_s`` is a U-Net decoder with additive (residual) skip connections from the encoder:
      a 1×1 projection of the coarser decoder features, upsampled, plus the encoder features of
      the level, then a residual block; a 1×1 head gives ``K`` logits per image.
    * At every level used by ``D_r`` the ``N`` images' features are fused by their mean and
      variance across the group followed by a residual block (:meth:`fuse`): invariant to the
      order of the images and defined for any ``N`` (the variance of a group of one is zero).
    * ``D_r`` runs per image from the bottleneck up to level ``reg_finest_level + 1``: at each
      level it adds the image's own encoder features, a 1×1 projection of the fused group
      features, and the upsampled coarser ``D_r`` features, then applies a residual block, so
      every image gets its own field (permutation-equivariant) conditioned on the whole group.
      One zero-initialised 1×1 displacement head per level; the coarse fields are upsampled
      (in voxel units) and summed, the sum is upsampled to full resolution, cropped back to the
      input size and made zero-mean over the group (Eq. 37).

    Args:
        ndim: 2 or 3 spatial dimensions.
        num_classes: ``K`` segmentation classes.
        num_domains: number of sequences (DSBN branches); domain indices are ``0..num_domains-1``.
        channels: ``C``, feature maps at the first level.
        levels: ``L_R``, levels including the bottleneck.
        dropout: channel dropout after every residual block in training mode (0 = none).
        block_convs: convolutions per residual block (default 1: 2 gives the classic two-conv
            block at about twice the cost; see ``bench/bench_dcc_speed.py``).
        reg_finest_level: 0-based level at which ``D_r`` stops (0 = full resolution; default 1
            = half resolution, the smooth field being upsampled ×2 bilinearly at the end).
    """

    def __init__(
        self,
        ndim: int = 2,
        num_classes: int = 4,
        num_domains: int = 3,
        channels: int = 16,
        levels: int = 4,
        dropout: float = 0.0,
        block_convs: int = 1,
        reg_finest_level: int = 1,
    ):
        super().__init__()
        conv = conv_class(ndim)
        if levels < 2:
            raise ValueError(f"DCCNet: levels must be >= 2, got {levels}")
        if not 0 <= reg_finest_level < levels:
            raise ValueError(
                f"DCCNet: reg_finest_level must be in [0, {levels - 1}], got {reg_finest_level}"
            )
        if num_classes < 2 or num_domains < 1 or channels < 1:
            raise ValueError(
                f"DCCNet: need num_classes >= 2, num_domains >= 1, channels >= 1, got "
                f"{num_classes}, {num_domains}, {channels}"
            )
        self.ndim, self.num_classes, self.num_domains = ndim, num_classes, num_domains
        self.levels, self.reg_finest_level = levels, reg_finest_level
        widths = [channels * 2**level for level in range(levels)]
        self.widths = widths

        def block(cin, cout, domains=None):
            return ResidualBlock(ndim, cin, cout, block_convs, domains, dropout)

        # Encoder E (levels 0..L-2) and bottleneck (level L-1): shared convs, DSBN.
        self.encoder = nn.ModuleList(
            block(1 if lv == 0 else widths[lv - 1], widths[lv], num_domains)
            for lv in range(levels)
        )
        # Segmentation decoder D_s.
        self.seg_lateral = nn.ModuleList(
            conv(widths[lv + 1], widths[lv], 1) for lv in range(levels - 1)
        )
        self.seg_blocks = nn.ModuleList(block(widths[lv], widths[lv]) for lv in range(levels - 1))
        self.seg_head = conv(widths[0], num_classes, 1)
        # Moment fusion and registration decoder D_r (levels reg_finest_level..L-1).
        reg = range(reg_finest_level, levels)
        self.fusion = nn.ModuleDict({str(lv): block(2 * widths[lv], widths[lv]) for lv in reg})
        self.reg_condition = nn.ModuleDict(
            {str(lv): conv(widths[lv], widths[lv], 1) for lv in reg}
        )
        self.reg_lateral = nn.ModuleDict(
            {str(lv): conv(widths[lv + 1], widths[lv], 1) for lv in reg if lv < levels - 1}
        )
        self.reg_blocks = nn.ModuleDict({str(lv): block(widths[lv], widths[lv]) for lv in reg})
        self.reg_heads = nn.ModuleDict(
            {str(lv): conv(widths[lv], ndim, 1) for lv in reg}
        )
        for head in self.reg_heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    # ------------------------------------------------------------------ parameter groups
    def segmentation_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``(E, D_s)``: encoder, bottleneck and segmentation decoder."""
        mods = [self.encoder, self.seg_lateral, self.seg_blocks, self.seg_head]
        return [p for m in mods for p in m.parameters()]

    def registration_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``D_r``: moment fusion, registration decoder and displacement heads."""
        mods = [self.fusion, self.reg_condition, self.reg_lateral, self.reg_blocks,
                self.reg_heads]
        return [p for m in mods for p in m.parameters()]

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ stages
    def _check(self, images: torch.Tensor, domains: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != self.ndim + 2:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(
                f"DCCNet: images must be (B, N, *S) with {self.ndim} spatial axes, got {shape}"
            )
        if not images.is_floating_point():
            raise ValueError(f"DCCNet: images must be floating point, got {images.dtype}")
        if not isinstance(domains, torch.Tensor) or tuple(domains.shape) != tuple(images.shape[:2]):
            shape = tuple(domains.shape) if isinstance(domains, torch.Tensor) else type(domains)
            raise ValueError(
                f"DCCNet: domains must be (B, N) = {tuple(images.shape[:2])}, got {shape}"
            )
        if domains.is_floating_point() or domains.is_complex() or domains.dtype == torch.bool:
            raise ValueError(f"DCCNet: domains must be integer indices, got {domains.dtype}")
        if domains.numel() and (domains.min() < 0 or domains.max() >= self.num_domains):
            raise ValueError(
                f"DCCNet: domain indices must be in [0, {self.num_domains - 1}], got "
                f"{domains.unique().tolist()}"
            )

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return (F.max_pool2d if self.ndim == 2 else F.max_pool3d)(x, 2)

    @staticmethod
    def _upsample(x: torch.Tensor) -> torch.Tensor:
        # nearest: applied after a 1x1 projection, and 2-3x cheaper than bilinear on CPU
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def _prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """z-score every image, pad to a multiple of ``2**(levels-1)``; also the crop slices."""
        return pad_to_multiple(zscore(images, self.ndim), self.ndim, 2 ** (self.levels - 1))

    def encode(self, images: torch.Tensor, domains: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``(B, N, C_l, *S_l)`` of every level (the last is the bottleneck)
        for raw images ``(B, N, *S)`` (z-scored and padded here)."""
        self._check(images, domains)
        return self._encode(self._prepare(images)[0], domains)

    def _encode(self, x: torch.Tensor, domains: torch.Tensor) -> list[torch.Tensor]:
        b, n = x.shape[:2]
        x = x.reshape(b * n, 1, *x.shape[2:])
        # DSBN: run the encoder on the batch grouped by domain, restore the order per level.
        order, inverse, counts = sort_by_domain(domains.reshape(b * n).long(), self.num_domains)
        if order is not None:
            x = x[order]
        features = []
        for lv, block in enumerate(self.encoder):
            x = block(x if lv == 0 else self._pool(x), counts)
            f = x if inverse is None else x[inverse]
            features.append(f.view(b, n, *f.shape[1:]))
        return features

    def fuse(self, features: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Group features ``(B, C_l, *S_l)`` per registration level: mean and variance across
        the group axis, then a residual block. Invariant to the order of the ``N`` images."""
        fused = {}
        for key, block in self.fusion.items():
            mean, var = group_moments(features[int(key)], dim=1)
            fused[int(key)] = block(torch.cat([mean, var], dim=1))
        return fused

    def segment(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``D_s``: logits ``(B·N, K, *S)`` from the encoder features."""
        flat = [f.flatten(0, 1) for f in features]
        h = flat[-1]
        for lv in reversed(range(self.levels - 1)):
            h = self._upsample(self.seg_lateral[lv](h)) + flat[lv]
            h = self.seg_blocks[lv](h)
        return self.seg_head(h)

    def register(self, features: list[torch.Tensor], fused: dict[int, torch.Tensor]
                 ) -> torch.Tensor:
        """``D_r``: one displacement ``(B·N, ndim, *S_f)`` per image (voxel units of level
        ``reg_finest_level``), from its own features and the fused group features."""
        h = displacement = None
        for lv in reversed(range(self.reg_finest_level, self.levels)):
            key = str(lv)
            own = features[lv]
            x = own + self.reg_condition[key](fused[lv]).unsqueeze(1)
            x = x.flatten(0, 1)
            if h is not None:
                x = x + self._upsample(self.reg_lateral[key](h))
            h = self.reg_blocks[key](x)
            step = self.reg_heads[key](h)
            displacement = (step if displacement is None
                            else upsample_displacement(displacement, 2) + step)
        return displacement

    def _fields(self, features: list[torch.Tensor], slices: tuple, shape: torch.Size
                ) -> torch.Tensor:
        """``D_r`` fields at full resolution, cropped to the input ``shape`` ``(B, N, *S)``,
        zero-mean over the group (Eq. 37): ``(B, N, ndim, *S)``."""
        displacement = self.register(features, self.fuse(features))
        if self.reg_finest_level:
            displacement = upsample_displacement(displacement, 2**self.reg_finest_level)
        displacement = crop(displacement, slices).reshape(*shape[:2], self.ndim, *shape[2:])
        return displacement - displacement.mean(dim=1, keepdim=True)

    def forward(self, images: torch.Tensor, domains: torch.Tensor) -> DCCOutput:
        """Segment and register a batch of groups.

        Args:
            images: ``(B, N, *S)`` raw intensities (z-scored inside).
            domains: ``(B, N)`` integer sequence index of every image (DSBN branch).

        Returns:
            :class:`DCCOutput` with ``seg_logits (B, N, K, *S)`` and ``displacement
            (B, N, ndim, *S)`` (voxel units, zero-mean over ``N``, Eq. 37).
        """
        self._check(images, domains)
        b, n = images.shape[:2]
        padded, slices = self._prepare(images)
        features = self._encode(padded, domains)
        logits = crop(self.segment(features), slices)
        logits = logits.reshape(b, n, self.num_classes, *images.shape[2:])
        return DCCOutput(logits, self._fields(features, slices, images.shape))

    def displacement(self, images: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """The fields of :meth:`forward` alone (``D_s`` is not run): ``(B, N, ndim, *S)``."""
        self._check(images, domains)
        padded, slices = self._prepare(images)
        return self._fields(self._encode(padded, domains), slices, images.shape)
