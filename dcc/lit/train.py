"""Training and evaluation runs from a composed Hydra config (``conf/train.yaml``,
``conf/evaluate.yaml``); ``train.py`` and ``evaluate.py`` only compose and call these."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dcc.coreg.refine import check_iterations
from dcc.lit.module import DCCModule

__all__ = [
    "instantiate_list", "run_training", "run_evaluation", "format_summary", "tolerant_console"
]

STRUCTURES = ("myocardium", "LV", "RV")


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group that maps names to ``_target_`` configs
    (``callbacks``, ``logger``); entries without ``_target_`` are skipped."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"expected a mapping of name -> config, got {type(cfg).__name__}")
    return [
        hydra.utils.instantiate(value)
        for value in cfg.values()
        if isinstance(value, DictConfig) and "_target_" in value
    ]


def tolerant_console() -> None:
    """Progress bars and tables draw non-ASCII characters: on a terminal (or pipe) whose encoding
    cannot show them, write escapes instead of failing the run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _setup(cfg: DictConfig) -> None:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)


def _log_config(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """The composed config (resolved, without Hydra's own settings) to every logger (W&B
    config, TensorBoard hparams, CSV hparams.yaml)."""
    config = {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in ((k, cfg[k]) for k in cfg if k != "hydra")
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(config)


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def warm_start(model: DCCModule, path: str) -> None:
    """Load the network weights of the checkpoint ``path`` into ``model`` (nothing else: the
    optimisers, the timer and the epoch count start fresh, unlike ``ckpt_path``).

    The networks must match, except that ``model`` may have more domains (the DCC+AT atlas
    beside the sequences): their domain-specific norms keep their fresh initialisation and the
    shared ones are copied. Any other difference raises a ``ValueError`` naming the tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from={path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict")
    if state is None:
        raise ValueError(f"init_from={path}: not a Lightning checkpoint (no state_dict)")
    own = model.state_dict()
    problems = sorted(set(own) ^ set(state))
    for key in sorted(set(own) & set(state)):
        mine, theirs = own[key], state[key]
        if mine.shape == theirs.shape:
            continue
        domain_norm = ".norms." in key and mine.dim() == 2 == theirs.dim()  # (domains, C)
        if domain_norm and mine.shape[1] == theirs.shape[1] and mine.shape[0] > theirs.shape[0]:
            state[key] = torch.cat([theirs, mine[theirs.shape[0]:]])  # extra domains: fresh
            continue
        problems.append(f"{key} {tuple(theirs.shape)} -> {tuple(mine.shape)}")
    if problems:
        raise ValueError(
            f"init_from={path}: the checkpoint's network does not match model.net (channels, "
            f"levels, classes, sequences): {', '.join(problems[:5])}"
            + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        )
    model.load_state_dict(state)


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Fit the model on the data of ``cfg``, then test the best checkpoint (by ``val/reg_dsc``).

    Returns ``{"metrics": {name: value}, "best_ckpt": path or None, "last_ckpt": path or None,
    "output_dir": run folder, "interrupted": bool}``; the metrics hold the last validation values
    and, with ``cfg.test``, the test values. A run stopped by SIGTERM is ``interrupted`` and not
    tested.
    """
    _setup(cfg)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: DCCModule = hydra.utils.instantiate(cfg.model)
    if cfg.get("init_from"):
        warm_start(model, cfg.init_from)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_list(cfg.get("callbacks")),
        logger=instantiate_list(cfg.get("logger")) or False,
    )
    os.makedirs(trainer.default_root_dir, exist_ok=True)
    _log_config(trainer, cfg)
    metrics: dict[str, float] = {}
    interrupted = False
    if cfg.get("train", True):
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException:  # Lightning's clean stop on SIGTERM (a SystemExit with code 0)
            interrupted = True
        metrics.update(_metrics(trainer))
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    last = checkpoint.last_model_path if checkpoint is not None else ""
    if cfg.get("test", True) and not interrupted:  # no test of a run cut short by SIGTERM
        # fast_dev_run and runs without a checkpoint callback test the weights in memory
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update(_metrics(trainer))
    return {
        "metrics": metrics,
        "best_ckpt": best or None,
        "last_ckpt": last or None,
        "output_dir": trainer.default_root_dir,
        "interrupted": interrupted,
    }


def _data_from_checkpoint(cfg: DictConfig, path: str) -> None:
    """Test on data made like the checkpoint's (image size, spacing, misalignment, ...): its
    saved data-module settings replace the data group's defaults, except the keys given on the
    command line (``data.num_test=...``) and unless another data group is chosen
    (``data=myops``)."""
    saved = torch.load(path, map_location="cpu", weights_only=True).get(
        "datamodule_hyper_parameters"
    )
    given = set()
    if HydraConfig.initialized():
        given = {o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    if not saved or "data" in given:
        return
    with open_dict(cfg):
        for key, value in saved.items():
            if key in cfg.data and key != "with_atlas" and f"data.{key}" not in given:
                cfg.data[key] = value


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Test the checkpoint ``cfg.ckpt_path`` on the test split of ``cfg.data``.

    The model is rebuilt from the checkpoint alone; the data module follows the checkpoint's
    sequences and strategy (an atlas member for ``dcc_at``) and its saved data settings
    (:func:`_data_from_checkpoint`). With ``cfg.refine_iterations`` = N > 0 the network's fields
    are refined by N X-CoReg FFD steps before every test metric (:mod:`dcc.coreg.refine`).
    Returns like :func:`run_training`.
    """
    _setup(cfg)
    path = cfg.get("ckpt_path")
    if not path or not os.path.isfile(path):
        raise ValueError(f"ckpt_path: no checkpoint file at {path!r}")
    model = DCCModule.load_from_checkpoint(path, map_location="cpu")
    model.refine_iterations = check_iterations(cfg.get("refine_iterations", 0))
    _data_from_checkpoint(cfg, path)
    datamodule = hydra.utils.instantiate(cfg.data, with_atlas=model.atlas)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_list(cfg.get("callbacks")),
        logger=instantiate_list(cfg.get("logger")) or False,
    )
    _log_config(trainer, cfg)
    trainer.test(model, datamodule=datamodule)
    return {
        "metrics": _metrics(trainer),
        "best_ckpt": path,
        "last_ckpt": None,
        "output_dir": trainer.default_root_dir,
    }


def format_summary(result: Mapping[str, Any], stage: str = "test") -> str:
    """The lines printed at the end of a run: Reg DSC per structure and mean beside the
    unregistered Dice, Seg DSC per sequence, folding voxels, and where the checkpoints and the
    figures are."""
    m = result["metrics"]

    def pct(key: str) -> str:
        value = m.get(f"{stage}/{key}")
        return "   -  " if value is None else f"{100 * value:6.1f}"

    lines = [f"{stage} Dice (%)       unregistered  registered"]
    for name in STRUCTURES:
        before, after = pct(f"unreg_dsc/{name}"), pct(f"reg_dsc/{name}")
        lines.append(f"  Reg DSC {name:<12} {before}      {after}")
    lines.append(f"  Reg DSC {'mean':<12} {pct('unreg_dsc')}      {pct('reg_dsc')}")
    seqs = sorted(k.split("/")[-1] for k in m if k.startswith(f"{stage}/seg_dsc/"))
    for name in seqs:
        lines.append(f"  Seg DSC {name:<12}               {pct(f'seg_dsc/{name}')}")
    if seqs:
        lines.append(f"  Seg DSC {'mean':<12}               {pct('seg_dsc')}")
    folding = m.get(f"{stage}/folding")
    if folding is not None:
        lines.append(f"  folding voxels per image: {folding:.1f}")
    if result.get("best_ckpt"):
        lines.append(f"best checkpoint: {result['best_ckpt']}")
    if result.get("last_ckpt"):
        lines.append(f"last checkpoint: {result['last_ckpt']}")
    table = os.path.join(result["output_dir"], "metrics", f"{stage}_summary.md")
    if os.path.isfile(table):
        lines.append(f"metrics table: {table} (per group: {stage}_groups.csv)")
    figures = os.path.join(result["output_dir"], "figures")
    if os.path.isdir(figures):
        lines.append(f"figures: {figures}")
    return "\n".join(lines)
