"""Training runs on a tiny phantom: every strategy end to end, learning, checkpoints, eval mode."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from test_configs import compose_cfg

from dcc.data.io import InputError
from dcc.lit.datamodules import CardiacPhantomDataModule
from dcc.lit.module import DCCModule
from dcc.lit.train import (
    format_summary,
    prepare_training,
    run_evaluation,
    run_training,
    warm_start,
)

# 32x32 phantoms, C = 4, L_R = 2, batches of 2 groups: seconds per run on one core
TINY = [
    "data.image_size=32",
    "data.num_train=4",
    "data.num_val=2",
    "data.num_test=2",
    "data.batch_size=2",
    "data.atlas_size=4",
    "model.net.channels=4",
    "model.net.levels=2",
    "model.figure_every=1",
    "~callbacks.rich_progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def tiny_cfg(tmp_path: Path, *overrides: str):
    return compose_cfg(tmp_path, [*TINY, *overrides])


@pytest.mark.parametrize("strategy", ["dgr", "dcc_at", "dcc_bs", "dcc_all"])
def test_fast_dev_run(tmp_path, strategy):
    cfg = tiny_cfg(tmp_path, f"strategy={strategy}", "+trainer.fast_dev_run=true")
    result = run_training(cfg)
    m = result["metrics"]
    for key in ("test/loss", "test/reg_dsc", "test/unreg_dsc", "test/seg_dsc", "test/folding"):
        assert math.isfinite(m[key]), key
    assert 0 <= m["test/reg_dsc"] <= 1 and 0 <= m["test/seg_dsc"] <= 1
    # the atlas member of dcc_at is neither a sequence nor part of the Dice
    assert {k for k in m if k.startswith("test/seg_dsc/")} == {
        "test/seg_dsc/C0", "test/seg_dsc/LGE", "test/seg_dsc/T2"
    }
    assert (tmp_path / "figures" / "test_montage.png").is_file()
    assert (tmp_path / "figures" / "test_grid.png").is_file()
    assert "Reg DSC mean" in format_summary(result)


class _Snapshots(pl.Callback):
    """Which parameter groups (E+D_s, D_r) changed at every training step."""

    def __init__(self):
        self.changed: list[tuple[bool, bool]] = []

    @staticmethod
    def _copy(module):
        net = module.net
        return [p.detach().clone() for p in net.segmentation_parameters()], [
            p.detach().clone() for p in net.registration_parameters()
        ]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = self._copy(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = self._copy(module)
        self.changed.append(tuple(
            any(not torch.equal(a, b) for a, b in zip(old, new, strict=True))
            for old, new in zip(self.before, after, strict=True)
        ))


def _tiny_module(**kwargs) -> DCCModule:
    return DCCModule(net={"channels": 4, "levels": 2}, **kwargs)


def _tiny_data(**kwargs) -> CardiacPhantomDataModule:
    args = dict(image_size=32, num_train=4, num_val=2, num_test=2, batch_size=2)
    return CardiacPhantomDataModule(**{**args, **kwargs})


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    args = dict(
        default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    return pl.Trainer(**{**args, **kwargs})


def test_optimisers_alternate(tmp_path):
    """Steps 0-1 update only (E, D_s), steps 2-3 only D_r, then (E, D_s) again."""
    torch.manual_seed(0)
    snapshots = _Snapshots()
    model = _tiny_module(alternate_every=2, figure_every=0)
    trainer = _trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[snapshots])
    trainer.fit(model, datamodule=_tiny_data(num_train=10))
    assert snapshots.changed == [(True, False)] * 2 + [(False, True)] * 2 + [(True, False)]


def test_joint_optimisation_updates_both(tmp_path):
    """``alternate_every=0``: every batch updates (E, D_s) and D_r (two optimizer steps, which
    Lightning's ``global_step`` and ``max_steps`` count)."""
    torch.manual_seed(0)
    snapshots = _Snapshots()
    model = _tiny_module(alternate_every=0, figure_every=0)
    trainer = _trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[snapshots])
    trainer.fit(model, datamodule=_tiny_data(num_train=10))
    assert snapshots.changed and snapshots.changed == [(True, True)] * len(snapshots.changed)
    assert trainer.global_step == 6 and len(snapshots.changed) == 3
    with pytest.raises(ValueError, match="alternate_every"):
        _tiny_module(alternate_every=-1)


def test_cascade_composes_the_stages_with_shared_weights():
    """``cascade=2``: the second D_r pass registers the group warped by the first stage's fields
    and the result is their composition, zero-mean over the group (Eq. 37): with stages that
    translate by known constants, the composed fields are the sums (by hand), and the second
    pass sees the images moved by the first. D_r gets gradient through both passes."""
    from dcc.nets import DCCOutput

    model = _tiny_module(cascade=2).eval()
    images = torch.zeros(1, 3, 16, 16)
    images[:, :, 6:10, 6:10] = 1.0  # a square in every image
    domains = torch.arange(3).view(1, 3)
    first = torch.tensor([1.0, -1.0, 3.0])  # voxels along x per image (mean 1)
    second = torch.tensor([0.0, 2.0, 1.0])  # ... along y (mean 1)
    seen = []

    def stage(value, axis):
        field = torch.zeros(1, 3, 2, 16, 16)
        field[:, :, axis] = value.view(1, 3, 1, 1)
        return field

    def second_stage(warped, domains):
        seen.append(warped)
        return stage(second, 1)

    model.net.forward = lambda x, d: DCCOutput(torch.zeros(1, 3, 4, 16, 16), stage(first, 0))
    model.net.displacement = second_stage
    out = model(images, domains)
    expected = torch.zeros(1, 3, 2, 16, 16)
    expected[:, :, 0] = (first - first.mean()).view(1, 3, 1, 1)
    expected[:, :, 1] = (second - second.mean()).view(1, 3, 1, 1)
    torch.testing.assert_close(out.displacement, expected)
    # the second stage saw image 0 read one voxel to the right: its square moved left by one
    assert torch.equal(torch.nonzero(seen[0][0, 0, 7]).flatten(), torch.arange(5, 9))
    torch.manual_seed(0)
    model = _tiny_module(cascade=2)
    with torch.no_grad():
        for head in model.net.reg_heads.values():
            head.weight.normal_(0, 0.3)
    images = torch.rand(1, 3, 16, 16) * 50
    model.train()
    model(images, domains).displacement.square().sum().backward()
    head = next(iter(model.net.reg_heads.values())).weight.grad
    single = _tiny_module(cascade=1)
    single.load_state_dict(model.state_dict())
    single.train()
    single(images, domains).displacement.square().sum().backward()
    assert not torch.allclose(head, next(iter(single.net.reg_heads.values())).weight.grad)
    with pytest.raises(ValueError, match="cascade"):
        _tiny_module(cascade=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """64 steps of DCC+All on 32x32 phantoms (misaligned by 0.3 of the FFD spacing; a weak
    bending penalty so that the zero-initialised fields move within so few steps), with
    validation before and after."""
    tmp = tmp_path_factory.mktemp("trained")
    pl.seed_everything(0)
    cfg = tiny_cfg(
        tmp,
        "model.net.channels=8",
        "model.loss.bending_weight=1",
        "model.optimizer_reg.lr=1e-2",
        "model.alternate_every=3",
        "data.ffd_magnitude=0.3",
        "data.num_train=64",
        "data.num_val=8",
        "data.batch_size=4",
        "trainer.max_epochs=4",
        "model.figure_every=0",
        "test=false",
    )
    model = hydra.utils.instantiate(cfg.model)
    data = hydra.utils.instantiate(cfg.data)
    before = _trainer(tmp).validate(model, datamodule=data, verbose=False)[0]
    prepared = prepare_training(cfg)
    result = run_training(cfg, prepared)
    result["model"] = prepared.model  # the weights in memory at the end (test=false: the last)
    return cfg, before, result


def test_training_lowers_loss_and_improves_registration(trained):
    cfg, before, result = trained
    rows = list(csv.DictReader(open(Path(result["output_dir"]) / "csv/version_0/metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == cfg.trainer.max_epochs
    assert losses[-1] < losses[0]
    after = result["metrics"]
    assert after["val/unreg_dsc"] == pytest.approx(before["val/unreg_dsc"])
    assert before["val/reg_dsc"] == pytest.approx(before["val/unreg_dsc"], abs=1e-6)
    # the registration loss (-X + lambda R, Eq. 41) falls and the Dice of the warped labels
    # rises above the unregistered Dice
    assert after["val/l1"] < before["val/l1"]
    assert after["val/reg_dsc"] > before["val/reg_dsc"]
    assert after["val/seg_dsc"] > before["val/seg_dsc"] + 0.1


def test_checkpoint_rebuilds_model(trained, tmp_path):
    """load_from_checkpoint needs no config and gives back the trained network: the same
    predictions as the model in memory at the end of training."""
    _, _, result = trained
    best, last = Path(result["best_ckpt"]), Path(result["last_ckpt"])
    assert best.is_file() and last.is_file() and best.parent == last.parent
    assert torch.load(last, weights_only=True)["hyper_parameters"]["spacing"] == [150 / 32] * 2
    model = DCCModule.load_from_checkpoint(last).eval()
    assert model.sequences == ["C0", "LGE", "T2"]
    assert model.class_names == ["background", "myocardium", "LV", "RV"]
    assert model.hparams.strategy["name"] == "dcc_all"
    data = _tiny_data(num_test=2)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    out = model(batch["images"], batch["domains"])
    trained_model = result["model"].eval()
    out_ref = trained_model(batch["images"], batch["domains"])
    assert torch.equal(out.seg_logits, out_ref.seg_logits)
    assert torch.equal(out.displacement, out_ref.displacement)


def test_init_from_warm_starts_the_weights_only(trained, tmp_path):
    """init_from loads the network weights (the first validation already has the trained
    Dice) but not the optimisers' learning rates; a mismatched network is named."""
    cfg, before, result = trained
    last = result["last_ckpt"]
    warm = tiny_cfg(tmp_path / "warm", "model.net.channels=8", f"init_from={last}",
                    "model.optimizer_reg.lr=1e-5", "+trainer.fast_dev_run=true", "test=false")
    model = hydra.utils.instantiate(warm.model)
    warm_start(model, last)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    metrics = run_training(warm)["metrics"]
    assert metrics["val/reg_dsc"] > before["val/reg_dsc"]
    assert model.configure_optimizers()[1].param_groups[0]["lr"] == 1e-5
    with pytest.raises(ValueError, match="does not match model.net.*encoder.0.convs.0.weight"):
        warm_start(hydra.utils.instantiate(tiny_cfg(tmp_path / "c4").model), last)
    # DCC+AT adds the atlas as a fourth domain: shared norms copied, the atlas's start fresh
    atlas = hydra.utils.instantiate(
        tiny_cfg(tmp_path / "at", "model.net.channels=8", "strategy=dcc_at").model
    )
    warm_start(atlas, last)
    weight = atlas.state_dict()["net.encoder.0.norms.0.weight"]
    assert weight.shape[0] == state["net.encoder.0.norms.0.weight"].shape[0] + 1
    assert torch.equal(weight[:-1], state["net.encoder.0.norms.0.weight"])
    assert torch.equal(weight[-1], torch.ones_like(weight[-1]))
    assert torch.equal(atlas.state_dict()["net.encoder.0.convs.0.weight"],
                       state["net.encoder.0.convs.0.weight"])
    with pytest.raises(InputError, match="init_from=.*checkpoint file not found"):
        warm_start(model, str(tmp_path / "missing.ckpt"))


def test_evaluate_checkpoint(trained, tmp_path):
    _, _, result = trained
    cfg = compose_cfg(
        tmp_path,
        [f"ckpt_path={result['best_ckpt']}", "data.image_size=32", "data.num_test=2",
         "data.batch_size=2", "+trainer.enable_progress_bar=false"],
        name="evaluate.yaml",
    )
    m = run_evaluation(cfg)["metrics"]
    assert 0 <= m["test/reg_dsc"] <= 1 and math.isfinite(m["test/seg_dsc"])


def test_evaluate_names_missing_checkpoint(tmp_path):
    cfg = compose_cfg(tmp_path, ["ckpt_path=nowhere.ckpt"], name="evaluate.yaml")
    with pytest.raises(ValueError, match="nowhere.ckpt"):
        run_evaluation(cfg)


def test_strategy_data_mismatch_is_named(tmp_path):
    model = _tiny_module(strategy={"name": "dcc_at", "labelled_sequences": [], "atlas": True})
    with pytest.raises(ValueError, match="with_atlas=True"):
        _trainer(tmp_path, fast_dev_run=True).fit(model, datamodule=_tiny_data())


def test_tolerant_console_writes_escapes_on_an_ascii_stream(monkeypatch):
    import io

    from dcc.lit.train import tolerant_console

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr("sys.stdout", stream)
    with pytest.raises(UnicodeEncodeError):
        stream.write("\u2022 epoch")
        stream.flush()
    tolerant_console()
    stream.write("\u2022 epoch")
    stream.flush()
    assert raw.getvalue().endswith(b"\\u2022 epoch")
