"""Sweeps and clusters: the offline Optuna search (two tiny trials), the W&B sweep file, the
SLURM launcher config."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tiny_runs import ROOT, TINY_CLI, run_script

CONF = ROOT / "conf"


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train.yaml", overrides=overrides, return_hydra_config=True)


def test_optuna_sweep_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hparams_search=dcc_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"hydra.sweep.dir={sweep}",
        *TINY_CLI,
        "data.num_train=2",
        "trainer.max_epochs=1",
    ]
    proc = run_script("train.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text(encoding="utf-8"))
    assert results["name"] == "optuna"
    assert 0.0 <= results["best_value"] <= 1.0  # a Reg DSC
    assert set(results["best_params"]) == {
        "model.optimizer_seg.lr",
        "model.optimizer_reg.lr",
        "model.loss.bending_weight",
        "model.alternate_every",
        "model.cascade",
    }
    # two trials, each a training run with its own folder, checkpoint and composed config
    for trial in ("0", "1"):
        assert (sweep / trial / "checkpoints" / "last.ckpt").is_file()
        overrides = (sweep / trial / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")
        assert "model.optimizer_seg.lr=" in overrides
    assert not (sweep / "2").exists()


def test_optuna_search_space_composes():
    cfg = compose_train(["hparams_search=dcc_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.test is False
    for key in sweeper.params:  # every searched key exists in the training config
        assert OmegaConf.select(cfg, key) is not None, key


def test_wandb_sweep_file_matches_the_training_config():
    sweep = yaml.safe_load((ROOT / "sweeps" / "dcc_wandb.yaml").read_text(encoding="utf-8"))
    assert (ROOT / sweep["program"]).is_file()
    assert sweep["metric"] == {"name": "val/reg_dsc", "goal": "maximize"}
    assert "${args_no_hyphens}" in sweep["command"]  # Hydra's key=value overrides
    overrides = []
    for key, spec in sweep["parameters"].items():
        value = spec.get("value", spec.get("min", (spec.get("values") or [None])[0]))
        overrides.append(f"{key}={value}")
    cfg = compose_train(overrides)  # every swept key is a valid override of train.py
    assert "wandb" in cfg.logger
    assert cfg.model.optimizer_seg.lr == sweep["parameters"]["model.optimizer_seg.lr"]["min"]
    # the Optuna search explores the same keys
    assert set(compose_train(["hparams_search=dcc_optuna"]).hydra.sweeper.params) <= set(
        sweep["parameters"]
    )


def test_slurm_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"
    built = hydra.utils.instantiate(launcher)
    assert built.params["partition"] == "gpu" and built.params["timeout_min"] == 240
    # the multi-node DDP settings documented in the file compose
    cfg = compose_train(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "hydra.launcher.nodes=2",
            "hydra.launcher.tasks_per_node=2",
        ]
    )
    assert (cfg.trainer.num_nodes, cfg.hydra.launcher.nodes) == (2, 2)
    assert Path(CONF / "hydra" / "launcher" / "slurm.yaml").is_file()


def test_wandb_logger_offline_without_network_or_login(tmp_path):
    """``logger=wandb`` with WANDB_MODE unset: offline files, no login, no prompt (stdin is
    closed), no network (an unreachable server), within the timeout."""
    run = tmp_path / "run"
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": None, "WANDB_MODE": None}
    proc = run_script(
        "train.py",
        [
            "logger=wandb",
            f"hydra.run.dir={run}",
            *TINY_CLI,
            "data.num_train=2",
            "trainer.max_epochs=1",
            "model.figure_every=1",
        ],
        tmp_path,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    keys = (b"val/reg_dsc", b"test/seg_dsc/LGE", b"lr-Adam", b"optimizer_seg")
    for _ in range(60):  # W&B's service process may still be flushing the offline file
        data = next(offline[0].glob("run-*.wandb")).read_bytes()
        if all(key in data for key in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key  # metrics, learning rates and the composed config
    images = {
        p.name.split("_")[0]
        for p in (offline[0] / "files" / "media" / "images" / "figures").glob("*.png")
    }
    assert {"epoch", "test"} <= images  # the PNG overlays
