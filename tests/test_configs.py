"""The Hydra config tree (conf/): every group composes and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from dcc.lit.module import DCCModule
from dcc.lit.train import instantiate_list

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(tmp_path: Path, overrides: list[str], name: str = "train.yaml") -> DictConfig:
    """Compose like ``python train.py OVERRIDES`` with the run folder in ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.work_dir = str(tmp_path)
    return cfg


def test_groups_exist():
    for group, expected in {
        "data": {"phantom"},
        "model": {"dcc"},
        "strategy": {"dgr", "dcc_at", "dcc_bs", "dcc_all"},
        "trainer": {"default", "cpu", "gpu", "ddp"},
        "logger": {"csv", "tensorboard", "wandb"},
        "callbacks": {"default", "model_checkpoint", "rich_progress_bar", "lr_monitor"},
        "experiment": {
            "phantom_dcc_all", "mscmr_dgr", "mscmr_dcc_at", "mscmr_dcc_bs", "mscmr_dcc_all"
        },
    }.items():
        assert expected <= set(options(group)), group


def test_default_train_config(tmp_path):
    cfg = compose_cfg(tmp_path, [])
    assert cfg.strategy.name == "dcc_all"
    assert cfg.trainer.accelerator == "cpu"
    assert list(cfg.logger) == ["csv"]
    assert cfg.callbacks.model_checkpoint.monitor == "val/reg_dsc"
    assert cfg.callbacks.model_checkpoint.mode == "max"
    # one callback writes checkpoints/last.ckpt (two used to write the same file)
    writers = [c for c in cfg.callbacks.values()
               if str(c.get("_target_", "")).endswith("ModelCheckpoint")
               and (c.get("save_last") or c.get("filename") == "last")]
    assert len(writers) == 1
    assert cfg.model.optimizer_seg._partial_ and cfg.model.optimizer_reg._partial_


def test_paper_settings_without_experiment(tmp_path):
    """``~experiment``: the model group alone holds the paper's Sec. 4.4.1 settings."""
    m = compose_cfg(tmp_path, ["~experiment"]).model
    assert (m.net.channels, m.net.levels, m.loss.bins, m.loss.bending_weight) == (16, 4, 32, 100)
    assert (m.loss.zeta, m.loss.eval_zeta, m.alternate_every) == (0.05, 0.01, 5)
    assert (m.optimizer_seg.lr, m.optimizer_reg.lr) == (1e-3, 1e-4)


# the paper's strategies (Sec. 4.4.1, Table 5): which members are labelled (J) for C0, LGE, T2
# (and the atlas when there is one)
STRATEGIES = {
    "dgr": [False, False, False],
    "dcc_at": [False, False, False, True],
    "dcc_bs": [True, False, False],
    "dcc_all": [True, True, True],
}


@pytest.mark.parametrize("strategy", options("strategy"))
def test_strategy_builds_model(tmp_path, strategy):
    """Each strategy's labelled set J as the paper defines it, and groups with the atlas as a
    fourth member exactly for DCC+AT."""
    cfg = compose_cfg(tmp_path, [f"strategy={strategy}", "data.image_size=32",
                                 "data.num_train=1", "data.num_val=1", "data.num_test=1",
                                 "data.atlas_size=2"])
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, DCCModule)
    assert model.labelled_domain.tolist() == STRATEGIES[strategy]
    assert model.net.num_domains == len(STRATEGIES[strategy])
    data = hydra.utils.instantiate(cfg.data)
    data.setup("fit")
    assert len(data.datasets["train"][0]["images"]) == len(STRATEGIES[strategy])


def test_unknown_labelled_sequence_is_named(tmp_path):
    cfg = compose_cfg(tmp_path, ["strategy.labelled_sequences=[FLAIR]"])
    with pytest.raises(Exception, match="FLAIR"):
        hydra.utils.instantiate(cfg.model)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_instantiates(tmp_path, trainer):
    cfg = compose_cfg(tmp_path, [f"trainer={trainer}"])
    if trainer == "gpu":
        assert cfg.trainer.precision == "32-true"
        if not torch.cuda.is_available():
            pytest.skip("no GPU")
    if trainer == "ddp":
        # ddp_find_unused_parameters_true: the alternation leaves half the parameters idle
        assert cfg.trainer.strategy.startswith("ddp") and cfg.trainer.devices == 2
    t = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(t, pl.Trainer)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_instantiates(tmp_path, logger, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg(tmp_path, [f"logger={logger}"])
    loggers = instantiate_list(cfg.logger)
    assert len(loggers) == 1 and isinstance(loggers[0], pl.loggers.Logger)
    if logger == "wandb":  # offline unless WANDB_MODE=online: never a login prompt
        assert cfg.logger.wandb.mode == "offline"
        monkeypatch.setenv("WANDB_MODE", "online")
        assert compose_cfg(tmp_path, ["logger=wandb"]).logger.wandb.mode == "online"


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_instantiate(tmp_path, callbacks):
    cfg = compose_cfg(tmp_path, [f"callbacks={callbacks}"])
    made = instantiate_list(cfg.callbacks)
    assert all(isinstance(c, pl.Callback) for c in made)
    if callbacks == "default":
        kinds = {type(c).__name__ for c in made}
        assert {"ModelCheckpoint", "RichProgressBar", "LearningRateMonitor"} <= kinds


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_instantiates(tmp_path, experiment):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}"])
    model = hydra.utils.instantiate(cfg.model)
    data = hydra.utils.instantiate(cfg.data)
    assert isinstance(model, DCCModule) and isinstance(data, pl.LightningDataModule)
    assert model.hparams.strategy["name"] == cfg.strategy.name


def test_evaluate_config(tmp_path):
    cfg = compose_cfg(tmp_path, ["ckpt_path=some.ckpt"], name="evaluate.yaml")
    assert cfg.ckpt_path == "some.ckpt" and cfg.task_name == "evaluate"
    assert isinstance(hydra.utils.instantiate(cfg.data), pl.LightningDataModule)


def test_run_folder_under_outputs():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train.yaml", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith(f"{cfg.paths.root_dir}/outputs/train/runs/")
    assert "outputs/train/multiruns/" in cfg.hydra.sweep.dir


def test_another_data_group_replaces_the_default_experiments_data(tmp_path):
    """`python train.py data=myops` (a README command): the MyoPS module with its own settings,
    none of the default experiment's phantom sizes (they once made it fail with a TypeError)."""
    default = compose_cfg(tmp_path, []).data
    assert default._target_.endswith("CardiacPhantomDataModule")
    assert (default.image_size, default.num_train, default.num_val, default.num_test) == (
        64, 64, 8, 40)
    myops = compose_cfg(tmp_path, ["data=myops"]).data
    assert myops._target_.endswith("MyoPSDataModule")
    assert "num_train" not in myops and myops.image_size == 128
    import inspect

    from dcc.lit.datamodules import MyoPSDataModule

    accepted = set(inspect.signature(MyoPSDataModule.__init__).parameters)
    assert set(myops) - {"_target_", "_convert_", "_recursive_"} <= accepted


def test_mscmr_experiments_share_one_recipe(tmp_path):
    """The paper's lambda = 100 comes from model/dcc.yaml; only DCC+All lowers it. The strategies
    differ from each other only where they say so."""
    paper = compose_cfg(tmp_path, ["~experiment"]).model.loss.bending_weight
    cfgs = {s: compose_cfg(tmp_path, [f"experiment=mscmr_{s}"])
            for s in ("dgr", "dcc_at", "dcc_bs", "dcc_all")}
    weights = {s: c.model.loss.bending_weight for s, c in cfgs.items()}
    assert weights == {"dgr": paper, "dcc_at": paper, "dcc_bs": paper, "dcc_all": 10.0}
    assert cfgs["dgr"].data.augmentation is None
    assert all(c.data.augmentation is not None for s, c in cfgs.items() if s != "dgr")
    base = OmegaConf.to_container(cfgs["dcc_bs"].trainer)
    assert all(OmegaConf.to_container(c.trainer) == base for c in cfgs.values())
