"""Training and evaluation runs from a composed Hydra config (``conf/train.yaml``,
``conf/evaluate.yaml``); ``train.py`` and ``evaluate.py`` only compose and call these."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dcc.coreg.refine import check_iterations
from dcc.data.io import InputError
from dcc.lit.checkpoints import (
    DATAMODULE_CLASS_KEY,
    check_resume,
    data_settings,
    model_from_checkpoint,
    network_mismatch,
    read_checkpoint,
)
from dcc.lit.module import DCCModule

__all__ = [
    "instantiate_list", "instantiate_setting", "warm_start", "PreparedRun", "prepare_training",
    "run_training", "prepare_evaluation", "run_evaluation", "evaluate_checkpoint", "format_summary",
    "tolerant_console",
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


def instantiate_setting(node: DictConfig, name: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)``, with a bad setting (the class refuses a value or an
    argument) as an :class:`InputError` naming the config group ``name``."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, InputError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise InputError(f"{name}: {cause}") from None
        raise


def warm_start(model: DCCModule, path: str) -> None:
    """Load the network weights of the checkpoint ``path`` into ``model`` (nothing else: the
    optimisers, the timer and the epoch count start fresh, unlike ``ckpt_path``).

    The networks must match, except that ``model`` may have more domains (the DCC+AT atlas
    beside the sequences): their domain-specific norms keep their fresh initialisation and the
    shared ones are copied. Any other difference raises an :class:`InputError` naming the tensors.
    """
    state = read_checkpoint(path, "init_from")["state_dict"]
    own = model.state_dict()
    problems = network_mismatch(own, state, extra_domains=True)
    if problems:
        raise InputError(
            f"init_from={path}: the checkpoint's network does not match model.net (channels, "
            f"levels, classes, sequences): {', '.join(problems[:5])}"
            + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        )
    for key, theirs in state.items():
        if own[key].shape != theirs.shape:  # extra domains: the shared norms, the rest fresh
            state[key] = torch.cat([theirs, own[key][theirs.shape[0]:]])
    model.load_state_dict(state)


@dataclass
class PreparedRun:
    """What a run needs once its input has been checked: the data (set up) and the model."""

    datamodule: pl.LightningDataModule
    model: DCCModule


def prepare_training(cfg: DictConfig) -> PreparedRun:
    """Everything that can be wrong with a training run's input, checked before a trainer, a
    logger or a file exists: the data settings and the data themselves (read and
    preprocessed), the model and optimiser settings, ``init_from`` and the resume checkpoint
    ``ckpt_path`` (:func:`dcc.lit.checkpoints.check_resume`). Raises :class:`InputError`."""
    _setup(cfg)
    datamodule = instantiate_setting(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("test", True):  # a missing test case is named now, not after the training
        datamodule.setup("test")
    model: DCCModule = instantiate_setting(cfg.model, "model")
    try:
        model.configure_optimizers()
    except ValueError as error:
        raise InputError(str(error)) from None
    if cfg.get("init_from"):
        warm_start(model, cfg.init_from)
    if cfg.get("ckpt_path"):
        check_resume(cfg.ckpt_path, model, datamodule)
    return PreparedRun(datamodule, model)


def run_training(cfg: DictConfig, prepared: PreparedRun | None = None) -> dict[str, Any]:
    """Fit the model on the data of ``cfg``, then test the best checkpoint (by ``val/reg_dsc``).

    ``prepared``: the checked input (:func:`prepare_training`, called here when not given).
    Returns ``{"metrics": {name: value}, "best_ckpt": path or None, "last_ckpt": path or None,
    "output_dir": run folder, "interrupted": bool}``; the metrics hold the last validation values
    and, with ``cfg.test``, the test values. A run stopped by SIGTERM is ``interrupted`` and not
    tested.
    """
    prepared = prepared or prepare_training(cfg)
    datamodule, model = prepared.datamodule, prepared.model
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
    best, last = _checkpoint_paths(trainer)
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


def _checkpoint_paths(trainer: pl.Trainer) -> tuple[str, str]:
    """(best, last) checkpoint paths of the run ("" when none): the best by the monitored
    metric, the last from the checkpoint callback without a monitor (``last_checkpoint``) or a
    callback's ``save_last`` copy."""
    best = last = ""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is None:
            last = last or callback.best_model_path
        else:
            best = best or callback.best_model_path
        last = last or callback.last_model_path
    return best, last


def _apply_data_settings(cfg: DictConfig, checkpoint: dict[str, Any], path: str) -> None:
    """Test on data made like the checkpoint's: its saved settings that describe the data (image
    size, spacing, misalignment, ...) replace the data group's, except the keys given on the
    command line (``data.num_test=...``); the places (root, split file, cache) stay this
    config's (:func:`dcc.lit.checkpoints.data_settings`). A checkpoint of another data set than
    the data group's is tested on the group's own settings when the group was chosen
    (``data=...`` or ``experiment=...``), and refused when it was not."""
    given = set()
    if HydraConfig.initialized():
        given = {o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    chosen = bool({"data", "experiment"} & given)
    saved_class = checkpoint.get(DATAMODULE_CLASS_KEY)
    data_class = str(cfg.data.get("_target_", "")).rsplit(".", 1)[-1]
    if saved_class is None and "data" in given:  # an older checkpoint: the group decides
        return
    if saved_class and saved_class != data_class:
        if chosen:
            return
        raise InputError(
            f"ckpt_path={path}: trained on {saved_class}, the data group is {data_class}; "
            "choose its data with experiment=... (the training experiment) or data=..."
        )
    with open_dict(cfg):
        for key, value in data_settings(checkpoint, set(cfg.data)).items():
            if f"data.{key}" not in given:
                cfg.data[key] = value


def prepare_evaluation(cfg: DictConfig) -> PreparedRun:
    """The checked input of :func:`run_evaluation`: the model rebuilt from the checkpoint
    ``cfg.ckpt_path`` alone, the data module set up for its test split, following the
    checkpoint's sequences and strategy (an atlas member for ``dcc_at``) and its data settings
    (:func:`_apply_data_settings`). Raises :class:`InputError`."""
    _setup(cfg)
    try:
        iterations = check_iterations(cfg.get("refine_iterations", 0))
    except ValueError as error:
        raise InputError(str(error)) from None
    path = OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False)
    checkpoint = read_checkpoint(path)  # read once: the model and the data settings
    model = model_from_checkpoint(checkpoint, path, lightning=True)
    model.refine_iterations = iterations
    _apply_data_settings(cfg, checkpoint, path)
    datamodule = instantiate_setting(cfg.data, "data", with_atlas=model.atlas)
    datamodule.setup("test")
    return PreparedRun(datamodule, model)


def run_evaluation(cfg: DictConfig, prepared: PreparedRun | None = None) -> dict[str, Any]:
    """Test the checkpoint ``cfg.ckpt_path`` on the test split of ``cfg.data``
    (:func:`prepare_evaluation`, called here when ``prepared`` is not given). With
    ``cfg.refine_iterations`` = N > 0 the network's fields are refined by N X-CoReg FFD steps
    before every test metric (:mod:`dcc.coreg.refine`). Returns like :func:`run_training`.
    """
    prepared = prepared or prepare_evaluation(cfg)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_list(cfg.get("callbacks")),
        logger=instantiate_list(cfg.get("logger")) or False,
    )
    _log_config(trainer, cfg)
    trainer.test(prepared.model, datamodule=prepared.datamodule)
    return {
        "metrics": _metrics(trainer),
        "best_ckpt": cfg.ckpt_path,
        "last_ckpt": None,
        "output_dir": trainer.default_root_dir,
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    config_dir: str | os.PathLike,
    threads: int | None = None,
    data: Sequence[str] = (),
    data_group: str = "myops",
    overrides: Sequence[str] = (),
) -> str:
    """``evaluate.py`` on ``checkpoint`` from a bench: the test split of ``data_group`` made
    like the checkpoint's data (its saved settings, places from here, ``data`` overrides
    ``key=value`` applied; :func:`dcc.lit.checkpoints.data_settings`), tables (no figures) in
    ``out``, Hydra ``overrides`` (e.g. ``data.root=...``) last; returns the path of
    ``test_groups.csv``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    saved = data_settings(read_checkpoint(str(checkpoint)), overrides=data)
    overrides = [
        f"ckpt_path={checkpoint}",
        f"data={data_group}",
        "callbacks.metrics_table.figures=0",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        *([f"threads={threads}"] if threads else []),
        *overrides,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # run_evaluation sees `data=...` given: these settings stay
    Path(out).mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(Path(config_dir).resolve().parent)
        cfg.paths.output_dir = cfg.paths.work_dir = str(out)
        for key, value in saved.items():
            if key in cfg.data:
                cfg.data[key] = value
    run_evaluation(cfg)
    return str(Path(out) / "metrics" / "test_groups.csv")


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
