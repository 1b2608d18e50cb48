"""Checks of a group's input before registration, shared by ``dcc-register`` and predict mode:
the device asked for, and the overlap of the images on the common grid. Each failure is one
:class:`~dcc.data.io.InputError` line naming the option or the file."""

from __future__ import annotations

import re

import torch

from dcc.coreg.engine import VALID
from dcc.data.io import InputError

__all__ = ["check_device", "overlap_fractions", "check_overlap"]


def check_device(device: str) -> None:
    """``cpu``, or ``cuda``/``cuda:<index>`` of a CUDA device present on this machine."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "cpu" and match is None:
        raise InputError(f"--device {device}: use cpu, cuda or cuda:<index>")
    if match is None:
        return
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use cpu)")
    count = torch.cuda.device_count()
    if int(match.group(1) or 0) >= count:
        raise InputError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )


def overlap_fractions(valid: torch.Tensor) -> tuple[float, list[float]]:
    """Fraction of the common grid inside every image's field of view, and inside each one's
    (``valid`` ``(N, *S)``, 1 inside an image's field of view)."""
    inside = valid.reshape(valid.shape[0], -1) > VALID
    return inside.all(0).float().mean().item(), inside.float().mean(1).tolist()


def check_overlap(
    valid: torch.Tensor,
    paths: list[str],
    reference: int,
    minimum: float,
    option: str = "--min-initial-overlap",
) -> dict:
    """Refuse a group whose common overlap is below ``minimum`` (naming the image that covers
    the least of the common grid, and the ``option`` that sets the minimum); return the
    fractions for ``report.json``."""
    together, each = overlap_fractions(valid)
    if together < minimum:
        j = min(range(len(each)), key=each.__getitem__)
        raise InputError(
            f"{paths[j]}: covers only {each[j]:.0%} of the common grid (the grid of "
            f"{paths[reference]}), all images together {together:.0%}; need at least "
            f"{minimum:.0%} ({option}): check the images' origins and orientations, "
            "or list the image with the smallest field of view first"
        )
    return {"all": round(together, 4), "per_image": [round(f, 4) for f in each]}
