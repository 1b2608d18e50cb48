"""Trained models that ship with dcc as package data, each with its model card (README.md here):
``dcc_all_myops.pt``, DCC+All trained on MyoPS 2020 short-axis C0/LGE/T2 slices
(``dcc-register --method dcc``, ``evaluate.py mode=predict`` without ``ckpt_path``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SHIPPED_MODEL", "shipped_checkpoint", "model_card"]

SHIPPED_MODEL = "dcc_all_myops.pt"


def shipped_checkpoint() -> Path:
    """The path of the shipped cardiac DCC+All checkpoint (network weights and
    hyper-parameters, no optimiser state), inside the installed package."""
    return Path(str(resources.files(__package__) / SHIPPED_MODEL))


def model_card() -> str:
    """The shipped model's card (data, split, test figures, expected input, limits)."""
    return (resources.files(__package__) / "README.md").read_text(encoding="utf-8")
