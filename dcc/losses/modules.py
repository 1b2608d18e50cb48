"""The DCC loss of Eq. (47) as an ``nn.Module`` over :mod:`dcc.losses.functional`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dcc.losses import functional as LF
from dcc.similarity import functional as XF
from dcc.spatial import fields
from dcc.spatial.functional import full_precision, reduce


@dataclass
class DCCLossOutput:
    """What :class:`DCCLoss` computed for a batch of ``B`` groups of ``N`` images.

    ``total``, ``l1``, ``l2``, ``l3``, ``x_metric`` and ``bending`` are batch-reduced scalars
    (``total`` = ``l1 + l2 + l3``, Eq. 47; ``x_metric`` = sum_j I(U_j o phi_j, Z^[2]);
    ``bending`` = sum_j R(phi_j)). The rest is detached: ``posterior`` gamma^[2]
    ``(B, K, *S)`` (argmax = the posterior segmentation of Eq. 53), ``log_pi`` ``(B, K)``,
    ``warped_images`` ``(B, N, *S)`` in bin units, ``warped_probs`` ``(B, N, K, *S)`` (the
    clipped rho_j / rho-hat_j after warping), ``overlap`` ``(B, *S)`` bool (Omega^phi: every
    phi_j(x) inside image j; the EM statistics and losses use only these voxels).
    """

    total: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    l3: torch.Tensor
    x_metric: torch.Tensor
    bending: torch.Tensor
    posterior: torch.Tensor
    log_pi: torch.Tensor
    warped_images: torch.Tensor
    warped_probs: torch.Tensor
    overlap: torch.Tensor


class DCCLoss(nn.Module):
    """L = L1 + L2 + L3 (Eqs. 41-47) for a batch of groups.

    ``forward(images, displacement, seg_probs, rho=None, labelled=None, labels=None)``:

    * ``images`` ``(B, N, *S)`` raw intensities: each image is mapped to bin units with robust
      percentiles (no gradient), then the *normalised* images are warped, so the X-metric's
      gradient flows through phi only;
    * ``displacement`` ``(B, N, ndim, *S)`` in voxel units (phi_j = id + u_j);
    * ``seg_probs`` ``(B, N, K, *S)`` the network's rho-hat (softmax of its logits);
    * ``rho`` ``(B, N, K, *S)`` the maps of Eq. (38) of the labels, used for the labelled members
      (``None``: the predictions stand in for them, as in the test-time posterior of Eq. 53);
    * ``labelled`` ``(B, N)`` bool, the set J (default: no member labelled);
    * ``labels`` ``(B, N, *S)`` class indices for the CE + Dice of the labelled members (default:
      ``rho.argmax(2)``, which equals the labels for maps of Eq. 38; pass them when at hand, the
      argmax is not free; with neither ``rho`` nor ``labels`` the term is left out).

    The E-step (initial appearance models, Eq. 39, and ``em_steps`` common-space updates,
    Eqs. 40, 12, 14) runs without gradient: in the EM derivation (Eqs. 25-29) the posterior
    q^[t] is fixed while the M-step objective is maximised, and L1 and L2 are the two terms of
    that objective, so gamma^[2] and pi^[2] are constants here, as Gamma^[t+1] is in X-CoReg's
    registration step (Eq. 15). Gradients reach phi through the warped images (L1) and the
    warped maps (L2), and rho-hat through L2 (unlabelled members only, Eq. 44) and L3.

    rho and rho-hat are clipped into ``[zeta, 1 - (K - 1) zeta]`` in the E-step and in L2
    (``zeta`` in training mode, ``eval_zeta`` in eval mode: 0.05 / 0.01 as in Sec. 4.4.1); L3
    uses the raw predictions. Each term is summed over the group's members and reduced over the
    batch by ``reduction`` (``"mean"`` or ``"sum"``). All of it runs in float32 under autocast.

    ``l2_moves_unlabelled=False`` (not in the paper) keeps L2 from moving phi_j of unlabelled
    members: their maps rho-hat_j are warped with a detached field in L2, which then only trains
    rho-hat_j towards gamma^[2]. Without labels (DGR) the unsupervised rho-hat maps otherwise
    drag phi along (``results/mscmr_dgr.md``).
    """

    def __init__(
        self,
        num_classes: int = 4,
        bins: int = 32,
        bending_weight: float = 100.0,
        zeta: float = 0.05,
        eval_zeta: float = 0.01,
        em_steps: int = 2,
        include_background: bool = False,
        reduction: str = "mean",
        eps: float = XF.EPS,
        similarity_weight: float = 1.0,
        l2_moves_unlabelled: bool = True,
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f'DCCLoss: reduction must be "mean" or "sum", got "{reduction}"')
        if em_steps < 1:
            raise ValueError(f"DCCLoss: em_steps must be >= 1, got {em_steps}")
        for z in (zeta, eval_zeta):
            if not 0 <= z < 1 / num_classes:
                raise ValueError(f"DCCLoss: zeta must be in [0, 1/K), got {z}")
        self.num_classes, self.bins, self.bending_weight = num_classes, bins, bending_weight
        self.zeta, self.eval_zeta, self.em_steps = zeta, eval_zeta, em_steps
        self.include_background, self.reduction, self.eps = include_background, reduction, eps
        self.similarity_weight = similarity_weight
        self.l2_moves_unlabelled = l2_moves_unlabelled

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, bins={self.bins}, "
            f"bending_weight={self.bending_weight}, zeta={self.zeta}, "
            f"eval_zeta={self.eval_zeta}, em_steps={self.em_steps}, reduction={self.reduction!r}"
        )

    @torch.no_grad()
    def _x_metric(self, l1, bending, warped_values, gamma, overlap) -> torch.Tensor:
        """X = sum_j I(U_j o phi_j, Z^[2]) per group (logged), from L1 when it holds it."""
        if self.similarity_weight:
            return ((self.bending_weight * bending - l1) / self.similarity_weight).sum(1)
        masked = (gamma * overlap.unsqueeze(1)).flatten(2).transpose(1, 2)
        return XF.x_metric(warped_values.flatten(2), masked, self.bins, "none", self.eps).sum(1)

    def _check(self, images, displacement, seg_probs, rho, labelled, labels):
        if images.dim() not in (4, 5):
            raise ValueError(
                f"DCCLoss: expected images of shape (B, N, H, W) or (B, N, D, H, W), got "
                f"{tuple(images.shape)}"
            )
        (b, n), spatial = images.shape[:2], tuple(images.shape[2:])
        expected = {
            "displacement": (displacement, (b, n, len(spatial), *spatial)),
            "seg_probs": (seg_probs, (b, n, self.num_classes, *spatial)),
            "rho": (rho, (b, n, self.num_classes, *spatial)),
            "labelled": (labelled, (b, n)),
            "labels": (labels, (b, n, *spatial)),
        }
        for name, (tensor, shape) in expected.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"DCCLoss: expected {name} of shape {shape} for images of shape "
                    f"{tuple(images.shape)}, got {tuple(tensor.shape)}"
                )

    @full_precision
    def _common_space(self, images, displacement, seg_probs, rho, labelled):
        """The EM of the common space (Eqs. 38-40, two steps): intensities in bin units before
        and after warping, the members' (clipped) probabilities before and after warping, the
        overlap Omega^phi, log gamma and log pi."""
        zeta = self.zeta if self.training else self.eval_zeta
        bins, eps = self.bins, self.eps
        b, n = images.shape[:2]

        with torch.no_grad():
            values = XF.normalize_intensities(images.flatten(0, 1), bins).view(images.shape)
        warped_values = fields.warp(values.unsqueeze(2), displacement)[:, :, 0]
        clipped_pred = LF.clip_probabilities(seg_probs, zeta, dim=2, eps=eps)
        clipped_rho = clipped_pred if rho is None else LF.clip_probabilities(rho, zeta, 2, eps)
        probs = LF.member_probabilities(clipped_rho, clipped_pred, labelled)
        warped_probs = fields.warp(probs, displacement)
        inside = fields.inside_mask(displacement)
        overlap = inside.all(1)

        with torch.no_grad():  # the spatial prior of Eq. (40): labelled members inside their FOV
            use = (inside & labelled.view(b, n, *([1] * (inside.dim() - 2)))).unsqueeze(2)
            log_prior = torch.where(use, torch.log(warped_probs.clamp_min(eps)), 0).sum(1)
        log_gamma, log_pi = LF.common_space_posterior(
            values,
            warped_values.detach(),
            probs.detach(),
            log_prior,
            overlap,
            bins,
            self.em_steps,
            eps,
        )
        return values, warped_values, probs, warped_probs, overlap, log_gamma, log_pi

    @torch.no_grad()
    def posterior(
        self,
        images: torch.Tensor,
        displacement: torch.Tensor,
        seg_probs: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What prediction needs of :meth:`forward`, without the losses: the common-space
        posterior gamma ``(B, K, *S)`` (Eq. 53 is its argmax) and X per group ``(B,)``; the
        labelled members' rho is their rho-hat (``seg_probs``)."""
        self._check(images, displacement, seg_probs, None, labelled, None)
        if labelled is None:
            labelled = torch.zeros(images.shape[:2], dtype=torch.bool, device=images.device)
        _, warped_values, _, _, overlap, log_gamma, _ = self._common_space(
            images, displacement, seg_probs, None, labelled.bool())
        gamma = log_gamma.exp()
        masked = (gamma * overlap.unsqueeze(1)).flatten(2).transpose(1, 2)
        x_metric = XF.x_metric(warped_values.flatten(2), masked, self.bins, "none", self.eps)
        return gamma, x_metric.sum(1)

    def forward(
        self,
        images: torch.Tensor,
        displacement: torch.Tensor,
        seg_probs: torch.Tensor,
        rho: torch.Tensor | None = None,
        labelled: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> DCCLossOutput:
        self._check(images, displacement, seg_probs, rho, labelled, labels)
        b, n = images.shape[:2]
        if labelled is None:
            labelled = torch.zeros(b, n, dtype=torch.bool, device=images.device)
        labelled = labelled.bool()
        if labels is None and rho is not None:
            labels = rho.argmax(2)
        bins, eps = self.bins, self.eps
        values, warped_values, probs, warped_probs, overlap, log_gamma, log_pi = (
            self._common_space(images, displacement, seg_probs, rho, labelled)
        )
        gamma = log_gamma.exp()

        l1 = LF.registration_loss(
            warped_values, gamma, displacement, bins, self.bending_weight, overlap, "none", eps,
            self.similarity_weight,
        )
        with torch.no_grad():  # logged only (L1 holds the differentiable R)
            bending = fields.bending_energy_dense(displacement, reduction="none")
        l2_probs = warped_probs
        if not self.l2_moves_unlabelled and not bool(labelled.all()):
            still = fields.warp(probs, displacement.detach())
            unlabelled = ~labelled.view(b, n, *([1] * (still.dim() - 2)))
            l2_probs = torch.where(unlabelled, still, warped_probs)
        l2 = LF.hybrid_cross_entropy(gamma, l2_probs, overlap, "none", eps)
        l3 = LF.segmentation_loss(
            values, seg_probs, labelled, labels, bins, "none", self.include_background, eps
        )
        terms = {
            "l1": l1.sum(1),
            "l2": l2.sum(1),
            "l3": l3.sum(1),
            "x_metric": self._x_metric(l1, bending, warped_values, gamma, overlap),
            "bending": bending.detach().sum(1),
        }
        terms = {name: reduce(value, self.reduction) for name, value in terms.items()}
        return DCCLossOutput(
            total=terms["l1"] + terms["l2"] + terms["l3"],
            **terms,
            posterior=gamma,
            log_pi=log_pi,
            warped_images=warped_values.detach(),
            warped_probs=warped_probs.detach(),
            overlap=overlap,
        )
