"""Deep combined computing as a LightningModule (paper Sec. 3.5, settings of Sec. 4.4.1).

:class:`DCCModule` wraps :class:`dcc.nets.DCCNet` and :class:`dcc.losses.DCCLoss`. It is
trained with manual optimisation: Adam on (encoder E, segmentation decoder D_s) and Adam on the
registration decoder D_r, alternating every ``alternate_every`` steps (Sec. 3.5.3). The labelled
set J comes from the strategy (``dgr``, ``dcc_at``, ``dcc_bs``, ``dcc_all``).

Every hyper-parameter needed to rebuild the model (net and loss settings, sequence and class
names, spacing, strategy) is saved in the checkpoint as plain values, so
``DCCModule.load_from_checkpoint(path)`` works without the training config.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from dcc.coreg.refine import refine_batch
from dcc.evaluation.figures import save_montage
from dcc.lit.checkpoints import DATAMODULE_CLASS_KEY
from dcc.losses import DCCLossOutput
from dcc.metrics import dice, nanmean, pairwise_dice
from dcc.nets import DCCOutput
from dcc.nets.model import DCCModel
from dcc.spatial.fields import folding_count, warp

__all__ = ["DCCModule", "StepResult", "group_metrics"]

Optimizer = torch.optim.Optimizer
STRATEGIES = ("dgr", "dcc_at", "dcc_bs", "dcc_all")


@dataclass
class StepResult:
    """Everything one forward pass produces (for metrics, figures and prediction)."""

    net: DCCOutput
    seg_probs: torch.Tensor  # (B, N, K, *S), softmax of the segmentation logits (rho-hat)
    loss: DCCLossOutput
    labelled: torch.Tensor  # (B, N) bool, the members of J


def group_metrics(
    labels: torch.Tensor,
    warped_labels: torch.Tensor,
    posterior: torch.Tensor,
    displacement: torch.Tensor,
    members: torch.Tensor,
    num_classes: int,
) -> dict[str, Any]:
    """Paper Sec. 4.4.1 (6) metrics of one group.

    ``labels``/``warped_labels`` ``(N, *S)`` before/after registration, ``posterior`` ``(K,
    *S)`` (gamma^[2]; its argmax is Eq. 53), ``displacement`` ``(N, ndim, *S)``, ``members``
    ``(N,)`` bool (the images that count: an atlas member does not). Returns ``reg`` and
    ``unreg`` (pairwise Dice dicts of :func:`dcc.metrics.pairwise_dice`), ``seg`` (per
    member: mean Dice over structures of the posterior argmax against its warped label, NaN where
    no structure is present) and ``folding`` (folding voxels per member).
    """
    values = list(range(1, num_classes))
    idx = members.nonzero().flatten()
    segmentation = posterior.argmax(0)
    seg = []
    for j in idx.tolist():
        per = dice(segmentation, warped_labels[j], values).values()
        finite = [v for v in per if not math.isnan(v)]
        seg.append(sum(finite) / len(finite) if finite else float("nan"))
    return {
        "reg": pairwise_dice(warped_labels[idx], values),
        "unreg": pairwise_dice(labels[idx], values),
        "seg": seg,
        "folding": folding_count(displacement[idx].unsqueeze(0))[0].tolist(),
    }


class DCCModule(DCCModel, pl.LightningModule):
    """Deep combined computing (Eqs. 38-47) with alternating optimisation: the
    :class:`~dcc.nets.model.DCCModel` (network, loss, strategy) trained by Lightning.

    Args:
        net: keyword arguments of :class:`dcc.nets.DCCNet` other than ``num_classes`` and
            ``num_domains`` (which follow from ``class_names``, ``sequences`` and the strategy).
        loss: keyword arguments of :class:`dcc.losses.DCCLoss` other than ``num_classes``
            (clipping ``zeta`` in training and ``eval_zeta`` at validation/test: 0.05 and
            0.01 in the paper).
        sequences: sequence names in domain order (domain index j is ``sequences[j]``).
        class_names: the K class names, background first.
        spacing: pixel spacing (mm, x-y[-z] order) the model was trained at (metadata).
        strategy: ``{"name", "labelled_sequences", "atlas"}`` (``conf/strategy``).
        optimizer_seg / optimizer_reg: partial optimizers (called with the parameters) for
            (E, D_s) and D_r; ``None`` means Adam with the paper's 1e-3 / 1e-4.
        alternate_every: steps per phase of the alternation (E, D_s) / D_r; 0 steps both
            optimizers at every step on the same gradients (not the paper's schedule: every
            forward/backward then updates the whole network, twice the updates per second;
            Lightning's ``global_step`` and ``trainer.max_steps`` count two steps per batch).
        figure_every: write PNG overlays of the first validation group every this many epochs
            (0: never).
        cascade: stages of a recursive cascade (not in the paper; Zhao et al., ICCV 2019):
            stage ``s + 1`` runs ``D_r`` with the same weights on the group warped by the
            fields of stages ``1..s`` and its fields are composed with them (then made
            zero-mean again, Eq. 37); trained end to end through every stage. 1 = the paper's
            single pass. Each extra stage costs one more encoder and ``D_r`` pass.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        sequences: Sequence[str] = ("C0", "LGE", "T2"),
        class_names: Sequence[str] = ("background", "myocardium", "LV", "RV"),
        spacing: Sequence[float] | None = None,
        strategy: Mapping[str, Any] | None = None,
        optimizer_seg: Callable[..., Optimizer] | None = None,
        optimizer_reg: Callable[..., Optimizer] | None = None,
        alternate_every: int = 5,
        figure_every: int = 5,
        cascade: int = 1,
    ) -> None:
        # the model (its __init__ runs LightningModule's, next in the method order)
        super().__init__(net, loss, sequences, class_names, spacing, strategy, cascade)
        # optimizers are not needed to rebuild the model (and are not plain values)
        self.save_hyperparameters(ignore=["optimizer_seg", "optimizer_reg"], logger=False)
        self.automatic_optimization = False
        self.optimizer_seg = optimizer_seg
        self.optimizer_reg = optimizer_reg
        if alternate_every < 0:
            raise ValueError(f"alternate_every must be >= 0, got {alternate_every}")
        # X-CoReg FFD steps refining the fields at validation/test (dcc.coreg.refine; set by
        # ``evaluate.py refine_iterations=N``, not a hyper-parameter of the model)
        self.refine_iterations = 0

    # ------------------------------------------------------------------ forward
    def step(self, batch: Mapping[str, Any]) -> StepResult:
        """Forward pass and DCC loss of a batch of groups.

        In training, members of J use rho from their labels (Eqs. 39-40). At validation and test
        the sequences' labels are not used: every sequence member uses the network's rho-hat
        (Eq. 53), only an atlas keeps its own rho (the loss clips with its ``eval_zeta``).
        With ``refine_iterations`` > 0, outside training the network's fields are refined by
        X-CoReg (:func:`dcc.coreg.refine.refine_batch`) before the loss and the metrics.
        """
        images, domains = batch["images"], batch["domains"]
        out = self(images, domains)  # validates shapes and domain indices
        if self.refine_iterations and not self.training:  # network start, iterative finish
            fields, _ = refine_batch(
                images, out.displacement, self.refine_iterations, batch.get("spacing")
            )
            out = DCCOutput(out.seg_logits, fields)
        seg_probs = out.seg_logits.float().softmax(dim=2)
        labelled = self.labelled_domain[domains]
        rho = batch.get("rho")
        if not self.training and rho is not None:
            keep = self.is_atlas(domains).view(*domains.shape, *[1] * (rho.dim() - 2))
            rho = torch.where(keep, rho, seg_probs)
        loss = self.loss(images, out.displacement, seg_probs, rho, labelled)
        return StepResult(out, seg_probs, loss, labelled)

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def metrics(self, batch: Mapping[str, Any], result: StepResult) -> dict[str, float]:
        """Batch means (over groups) of Reg DSC (mean and per structure), the unregistered Dice
        beside it, Seg DSC per sequence and mean, and folding voxels per image. NaN entries
        (structures absent from a group) are left out of the means."""
        labels, domains = batch["labels"], batch["domains"]
        displacement = result.net.displacement.detach().float()
        warped = warp(labels.unsqueeze(2).float(), displacement, mode="nearest")[:, :, 0].long()
        members = ~self.is_atlas(domains)
        rows = [
            group_metrics(
                labels[b], warped[b], result.loss.posterior[b].detach(), displacement[b],
                members[b], self.num_classes,
            )
            for b in range(labels.shape[0])
        ]
        out: dict[str, list[float]] = {}
        for b, row in enumerate(rows):
            for key in ("reg", "unreg"):
                name = "reg_dsc" if key == "reg" else "unreg_dsc"
                out.setdefault(name, []).append(row[key]["mean"])
                for k, value in row[key]["per_label"].items():
                    out.setdefault(f"{name}/{self.class_names[k]}", []).append(value)
            seqs = [self._member_name(int(d)) for d in domains[b][members[b]]]
            for name, value in zip(seqs, row["seg"], strict=True):
                out.setdefault(f"seg_dsc/{name}", []).append(value)
            out.setdefault("seg_dsc", []).append(nanmean(row["seg"]))
            out.setdefault("folding", []).extend(float(f) for f in row["folding"])
        return {k: nanmean(v) for k, v in out.items()}

    def _member_name(self, domain: int) -> str:
        return self.sequences[domain] if domain < len(self.sequences) else "atlas"

    def _log_step(self, stage: str, batch: Mapping[str, Any], result: StepResult) -> None:
        size = batch["images"].shape[0]
        on_step = stage == "train"
        loss = result.loss
        terms = {"loss": loss.total, "l1": loss.l1, "l2": loss.l2, "l3": loss.l3}
        self.log_dict(
            {f"{stage}/{k}": v.detach() for k, v in terms.items()},
            on_step=on_step, on_epoch=True, batch_size=size, prog_bar=False,
        )
        values = {f"{stage}/{k}": v for k, v in self.metrics(batch, result).items()}
        values = {k: v for k, v in values.items() if not math.isnan(v)}
        shown = {f"{stage}/reg_dsc", f"{stage}/seg_dsc"}
        for prog_bar in (False, True):
            self.log_dict(
                {k: v for k, v in values.items() if (k in shown) == prog_bar},
                on_step=on_step, on_epoch=True, batch_size=size, prog_bar=prog_bar,
            )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Check the data module's sequences against the model's and record its spacing in
        the hyper-parameters (so the checkpoint carries it) when none was given."""
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None:
            return
        sequences = getattr(data, "sequences", None)
        if sequences is not None and list(sequences) != self.sequences:
            raise ValueError(
                f"the data module's sequences {list(sequences)} differ from the model's "
                f"{self.sequences} (domain j must be the same sequence in both)"
            )
        if getattr(data, "with_atlas", self.atlas) != self.atlas:
            raise ValueError(
                f"strategy {self.strategy_name!r} needs "
                f"with_atlas={self.atlas} in the data module"
            )
        if self.hparams.spacing is None and getattr(data, "spacing", None) is not None:
            self.hparams.spacing = [float(s) for s in data.spacing]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """One step of the active phase: (E, D_s) for ``alternate_every`` steps, then D_r
        (``alternate_every=0``: both at every step)."""
        opt_seg, opt_reg = self.optimizers()
        every = self.hparams.alternate_every
        if every == 0:
            active, frozen = (opt_seg, opt_reg), contextlib.nullcontext()
        else:
            active = (opt_reg if (self.global_step // every) % 2 == 1 else opt_seg,)
            frozen = self.toggled_optimizer(active[0])  # the other half gets no gradient
        with frozen:
            result = self.step(batch)
            self.manual_backward(result.loss.total)
            for opt in active:
                opt.step()
                opt.zero_grad(set_to_none=True)
        self._log_step("train", batch, result)
        return result.loss.total.detach()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        result = self.step(batch)
        self._log_step("val", batch, result)
        every = self.hparams.figure_every
        if batch_idx == 0 and every and self.current_epoch % every == 0:
            self.save_figures(batch, result, f"epoch_{self.current_epoch:03d}")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Test metrics of a batch; returns ``{"result": StepResult, "seconds": time of the
        forward pass, loss and EM}`` for the callbacks (the metrics table reuses them)."""
        start = time.perf_counter()
        result = self.step(batch)
        seconds = time.perf_counter() - start
        self._log_step("test", batch, result)
        if batch_idx == 0:
            self.save_figures(batch, result, "test")
        return {"result": result, "seconds": seconds}

    def configure_optimizers(self) -> list[Optimizer]:
        """[(E, D_s) optimizer, D_r optimizer] (paper: Adam, 1e-3 and 1e-4)."""
        made = []
        for name, make, lr, params in (
            ("optimizer_seg", self.optimizer_seg, 1e-3, self.net.segmentation_parameters()),
            ("optimizer_reg", self.optimizer_reg, 1e-4, self.net.registration_parameters()),
        ):
            try:
                made.append(make(params) if make else torch.optim.Adam(params, lr, fused=True))
            except ValueError as error:  # a bad setting (torch: "Invalid learning rate: -0.1")
                raise ValueError(f"model.{name}: {error}") from None
        return made

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the data module's class beside its settings (a resume of another data set is
        refused: :func:`dcc.lit.checkpoints.check_resume`)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None:
            checkpoint[DATAMODULE_CLASS_KEY] = type(datamodule).__name__

    # ------------------------------------------------------------------ figures
    @property
    def figure_dir(self) -> str | None:
        """``<run folder>/figures`` (None without a trainer)."""
        if self._trainer is None:
            return None
        return os.path.join(self.trainer.default_root_dir, "figures")

    @torch.no_grad()
    def save_figures(
        self, batch: Mapping[str, Any], result: StepResult, tag: str, index: int = 0
    ) -> None:
        """PNG overlays of group ``index`` of ``batch``: a montage (images before/after with
        the warped labels of the first image, posterior argmax) and the deformation grids."""
        folder = self.figure_dir
        if folder is None or not self.trainer.is_global_zero:
            return
        b = index
        members = ~self.is_atlas(batch["domains"][b])
        names = [self._member_name(int(d)) for d in batch["domains"][b][members]]
        displacement = result.net.displacement[b : b + 1].detach().float()
        labels = batch["labels"][b : b + 1].unsqueeze(2).float()
        warped_labels = warp(labels, displacement, "nearest")
        save_montage(
            os.path.join(folder, f"{tag}_montage.png"),
            before=batch["images"][b][members],
            after=result.loss.warped_images[b][members],
            posterior=result.loss.posterior[b],
            names=names,
            labels_after=warped_labels[0, :, 0][members].long(),
        )
        save_deformation_grid(
            os.path.join(folder, f"{tag}_grid.png"),
            batch["images"][b][members],
            displacement[0][members],
            names,
        )


def save_deformation_grid(
    path: str | os.PathLike,
    images: torch.Tensor,
    displacement: torch.Tensor,
    names: Sequence[str],
    spacing: int = 4,
) -> None:
    """PNG of each 2D image U_j with the deformed common-space grid phi_j(x) = x + u_j(x)
    (every ``spacing`` voxels) drawn over it. ``images`` ``(N, H, W)``, ``displacement`` ``(N, 2,
    H, W)`` in voxel units (channel 0 along x). 3D fields show their middle slice's in-plane
    components."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = images.detach().float().cpu().numpy()
    field = displacement.detach().float().cpu().numpy()
    if field.ndim == 5:  # (N, 3, D, H, W): middle slice, x/y components
        images = images[:, images.shape[1] // 2]
        field = field[:, :2, field.shape[2] // 2]
    n, height, width = images.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    fig = Figure(figsize=(2.6 * n, 2.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for j, ax in enumerate(axes):
        img = images[j]
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
        px, py = xx + field[j, 0], yy + field[j, 1]
        for r in range(0, height, spacing):
            ax.plot(px[r], py[r], color="#ffd700", lw=0.5)
        for c in range(0, width, spacing):
            ax.plot(px[:, c], py[:, c], color="#ffd700", lw=0.5)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(f"{names[j]}: phi_j grid", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
