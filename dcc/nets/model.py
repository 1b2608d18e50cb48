"""The DCC model without Lightning: the network, the loss and the strategy's labelled domains,
built from the hyper-parameters a checkpoint keeps (paper Sec. 3.5).

:class:`DCCModel` is what prediction needs (``dcc-register --method dcc``, predict mode): a
checkpoint's weights load into it directly, without importing Lightning (seconds saved per
command). The LightningModule :class:`dcc.lit.module.DCCModule` is this model plus training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dcc.losses import DCCLoss
from dcc.nets.dccnet import DCCNet, DCCOutput
from dcc.spatial.fields import compose_displacements, warp, zero_mean

__all__ = ["DCCModel", "MODEL_SETTINGS"]

# the hyper-parameters that define the model (a training run's checkpoint keeps more)
MODEL_SETTINGS = ("net", "loss", "sequences", "class_names", "spacing", "strategy", "cascade")


class DCCModel(nn.Module):
    """Network (:class:`DCCNet`), loss (:class:`DCCLoss`) and labelled domains of a strategy.

    Args:
        net: keyword arguments of :class:`DCCNet` other than ``num_classes`` and
            ``num_domains`` (which follow from ``class_names``, ``sequences`` and the strategy).
        loss: keyword arguments of :class:`DCCLoss` other than ``num_classes``.
        sequences: sequence names in domain order (domain index j is ``sequences[j]``).
        class_names: the K class names, background first.
        spacing: pixel spacing (mm, x-y[-z] order) the model was trained at (metadata).
        strategy: ``{"name", "labelled_sequences", "atlas"}`` (``conf/strategy``).
        cascade: stages of a recursive cascade of the registration decoder (1: the paper's).
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        sequences: Sequence[str] = ("C0", "LGE", "T2"),
        class_names: Sequence[str] = ("background", "myocardium", "LV", "RV"),
        spacing: Sequence[float] | None = None,
        strategy: Mapping[str, Any] | None = None,
        cascade: int = 1,
    ) -> None:
        super().__init__()
        strategy = dict(strategy or {"name": "dcc_all", "labelled_sequences": list(sequences)})
        unknown = [s for s in strategy.get("labelled_sequences", []) if s not in sequences]
        if unknown:
            raise ValueError(
                f"strategy {strategy.get('name')!r}: labelled sequences {unknown} are not among "
                f"the model's sequences {list(sequences)}"
            )
        if cascade < 1:
            raise ValueError(f"cascade must be >= 1 (stages), got {cascade}")
        self.settings = {"net": dict(net or {}), "loss": dict(loss or {}),
                         "sequences": list(sequences), "class_names": list(class_names),
                         "spacing": spacing, "strategy": strategy, "cascade": int(cascade)}
        self.sequences = list(sequences)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.atlas = bool(strategy.get("atlas", False))
        self.strategy_name = str(strategy.get("name", "custom"))
        self.cascade = int(cascade)
        num_domains = len(self.sequences) + int(self.atlas)
        # labelled_domain[d]: whether domain d belongs to J (the atlas domain always does)
        labelled_domain = [s in strategy.get("labelled_sequences", []) for s in self.sequences]
        self.register_buffer(
            "labelled_domain", torch.tensor(labelled_domain + [True] * int(self.atlas)),
            persistent=False,
        )
        self.net = DCCNet(num_classes=self.num_classes, num_domains=num_domains, **dict(net or {}))
        # clips rho/rho-hat with its ``zeta`` in training, ``eval_zeta`` at validation/test
        self.loss = DCCLoss(num_classes=self.num_classes, **dict(loss or {}))

    @classmethod
    def from_hyperparameters(cls, hparams: Mapping[str, Any]) -> DCCModel:
        """The model of a checkpoint's ``hyper_parameters`` (training-only ones ignored)."""
        return cls(**{k: v for k, v in hparams.items() if k in MODEL_SETTINGS})

    def forward(self, images: torch.Tensor, domains: torch.Tensor) -> DCCOutput:
        """Segmentation logits ``(B, N, K, *S)`` and displacements ``(B, N, ndim, *S)`` (the
        composition of the ``cascade`` stages' fields)."""
        out = self.net(images, domains)
        displacement = out.displacement
        for _ in range(self.cascade - 1):
            # border padding: the next stage sees no artificial zero band at the edges
            warped = warp(images.unsqueeze(2), displacement, padding="border")[:, :, 0]
            step = self.net.displacement(warped, domains)
            displacement = zero_mean(compose_displacements(displacement, step))
        return DCCOutput(out.seg_logits, displacement)

    def is_atlas(self, domains: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool: members that are the atlas (domain index ``len(sequences)``)."""
        return domains >= len(self.sequences)
