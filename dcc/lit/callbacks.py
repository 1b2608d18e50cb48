"""Lightning callbacks for long runs and loggers.

* :class:`RandomState` makes ``python train.py ckpt_path=.../last.ckpt`` reach the same result
  as an uninterrupted run with the same seed: Lightning restores the weights, both optimizers'
  states, the epoch and the global step (which fixes the alternation phase of
  :class:`~dcc.lit.module.DCCModule`), but not the random generators that draw the training
  groups (the phantom's misalignments, the shuffling). This callback saves them in the
  checkpoint and puts them back when training resumes (again after a sanity check, which
  draws from them too).
* :class:`TrainingTime` logs the minutes spent training (validation excluded) at every
  validation, so learning curves can be drawn against time (``val/train_minutes``).
* :class:`LogFigures` sends the PNG overlays that the model writes to ``<run>/figures`` to the
  loggers that show images (W&B, TensorBoard); CSV logs keep the files only.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

__all__ = ["RandomState", "LogFigures", "TrainingTime"]


class RandomState(pl.Callback):
    """Save the torch (CPU and CUDA), NumPy and Python random states in every checkpoint and
    restore them when training resumes from it (module docstring). The states are plain
    tensors and tuples, so the checkpoint still loads with ``torch.load(weights_only=True)``.

    Resuming reproduces an uninterrupted run from checkpoints written at the end of an epoch
    (``last.ckpt``); Lightning restarts an interrupted epoch from its beginning.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # restored before the first training iterator draws its shuffling and worker seeds
        self._pending = state_dict
        self._restore()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()  # a sanity check after restoring drew from the generators again

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = None

    def _restore(self) -> None:
        state = self._pending
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class LogFigures(pl.Callback):
    """After every validation and test epoch, log the PNG files of ``<run>/figures`` that are
    new or changed since the last call as images (key ``figures/<file stem>``) to every W&B and
    TensorBoard logger of the trainer (rank 0 only)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def _log(self, trainer: pl.Trainer) -> None:
        folder = os.path.join(trainer.default_root_dir, "figures")
        if not trainer.is_global_zero or not os.path.isdir(folder):
            return
        new = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".png") and self._seen.get(path) != os.path.getmtime(path):
                self._seen[path] = os.path.getmtime(path)
                new.append(path)
        if not new:
            return
        from matplotlib.image import imread

        step = trainer.global_step
        for logger in trainer.loggers:
            for path in new:
                key = f"figures/{os.path.splitext(os.path.basename(path))[0]}"
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=key, images=[path], step=step)
                elif isinstance(logger, TensorBoardLogger):
                    image = imread(path)[..., :3]
                    logger.experiment.add_image(key, image, step, dataformats="HWC")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)


class TrainingTime(pl.Callback):
    """Log ``val/train_minutes``: wall minutes of training since the fit started, without the
    time spent in validation (and sanity checks), at the end of every validation epoch. A run
    resumed from a checkpoint counts from the resume."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._validating = 0.0
        self._val_start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._validating = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None or self._val_start is None or trainer.sanity_checking:
            return
        now = time.perf_counter()
        minutes = (self._val_start - self._start - self._validating) / 60.0
        self._validating += now - self._val_start
        pl_module.log("val/train_minutes", minutes, on_epoch=True, sync_dist=False)
