"""train.py and evaluate.py with bad input: one line naming the file or the setting, exit status
2, no run folder left behind, inputs and earlier runs byte-identical (issue #19). Most cases run
the scripts' Hydra entry in-process (the same code path, without the interpreter start-up); one
per script runs as a real process to check the exit status and the whole output."""

from __future__ import annotations

import hashlib
import logging
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from test_configs import compose_cfg
from tiny_runs import ROOT, TINY_CLI, TINY_MYOPS_CLI, run_script, tiny_checkpoint, write_myops_tree

from dcc.data.io import InputError
from dcc.evaluation.runs import read_groups
from dcc.lit.train import evaluate_checkpoint, run_evaluation, run_training

CASES = {"train": ["Case7001"], "val": ["Case7002"], "test": ["Case7003"]}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def run_inprocess(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``python SCRIPT ARGS`` through its Hydra entry in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    GlobalHydra.instance().clear()
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    finally:
        GlobalHydra.instance().clear()
        for handler in list(logging.root.handlers):  # Hydra's, bound to this test's capture
            handler.close()
            logging.root.removeHandler(handler)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def myops(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MyoPS-like data root (one case per split) and its split file."""
    root = tmp_path_factory.mktemp("myops")
    return root, write_myops_tree(root, CASES)


def _refused(code: int, err: str, run: Path, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(("train.py: error: ", "evaluate.py: error: ")), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    assert not run.exists(), f"{run} was left behind"


def _damage(root: Path, how: str) -> str:
    """Damage the test case of the tiny MyoPS tree; returns what the error must name."""
    case = root / "myops2020" / "Case7003"
    lge = case / "Case7003_LGE.nii.gz"
    if how == "truncated":
        lge.write_bytes(lge.read_bytes()[:200])
        return "Case7003_LGE.nii.gz"
    if how == "other grid":
        import SimpleITK as sitk

        image = sitk.ReadImage(str(lge))
        image.SetSpacing((2.5, 2.5, 8.0))
        sitk.WriteImage(image, str(lge))
        return "grid differs"
    if how == "no labels":
        (case / "Case7003_gd.nii.gz").unlink()
        return "Case7003_gd.nii.gz"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "other grid", "no labels"])
def test_train_refuses_a_damaged_case(how, myops, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    shutil.copytree(myops[0], root)
    needle = _damage(root, how)
    before = _snapshot(root)
    run = tmp_path / "run"
    code, err = run_inprocess(
        "train.py",
        [*TINY_MYOPS_CLI, f"data.root={root}", f"data.split_file={root / 'split.json'}",
         f"hydra.run.dir={run}"],
        monkeypatch, capsys,
    )
    _refused(code, err, run, needle)
    assert _snapshot(root) == before


def test_train_refuses_missing_data_and_unknown_cases(myops, tmp_path, monkeypatch, capsys):
    root, split = myops
    run = tmp_path / "run"
    args = [*TINY_MYOPS_CLI, f"hydra.run.dir={run}"]
    code, err = run_inprocess("train.py", [*args, f"data.root={tmp_path / 'nowhere'}"],
                              monkeypatch, capsys)
    _refused(code, err, run, "nowhere", "DCC_DATA_ROOT")
    bad_split = tmp_path / "split.json"
    bad_split.write_text('{"train": ["Case7001"], "val": ["Case7002"], "test": ["Case7999"]}')
    code, err = run_inprocess(
        "train.py", [*args, f"data.root={root}", f"data.split_file={bad_split}"],
        monkeypatch, capsys,
    )
    _refused(code, err, run, "Case7999", "not found")
    code, err = run_inprocess(
        "train.py", [*args, f"data.root={root}", f"data.split_file={tmp_path / 'none.json'}"],
        monkeypatch, capsys,
    )
    _refused(code, err, run, "none.json", "split file not found")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("model.optimizer_reg.lr=-0.001", ["model.optimizer_reg", "learning rate"]),
        ("data.batch_size=0", ["data:", "batch_size"]),
        ("+data.num_slices=3", ["data:", "num_slices"]),
        ("init_from=nowhere.ckpt", ["init_from=nowhere.ckpt", "not found"]),
        ("ckpt_path=nowhere.ckpt", ["ckpt_path=nowhere.ckpt", "not found"]),
    ],
)
def test_train_refuses_bad_settings(override, needles, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, err = run_inprocess(
        "train.py", [*TINY_CLI, override, f"hydra.run.dir={run}"], monkeypatch, capsys
    )
    _refused(code, err, run, *needles)


def test_resume_refuses_another_experiment_or_network(
    myops, tmp_path_factory, tmp_path, monkeypatch, capsys
):
    """A phantom checkpoint resumed on MyoPS with the same network, and on the phantom with
    another network: refused, naming what differs and pointing to init_from=."""
    checkpoint = tiny_checkpoint(tmp_path_factory)
    before = _snapshot(checkpoint.parent)
    root, split = myops
    run = tmp_path / "run"
    code, err = run_inprocess(
        "train.py",
        [*TINY_MYOPS_CLI, f"data.root={root}", f"data.split_file={split}",
         f"ckpt_path={checkpoint}", f"hydra.run.dir={run}"],
        monkeypatch, capsys,
    )
    _refused(code, err, run, "another experiment", "CardiacPhantomDataModule",
             "MyoPSDataModule", f"init_from={checkpoint}")
    code, err = run_inprocess(
        "train.py",
        [*TINY_CLI, "model.net.channels=8", f"ckpt_path={checkpoint}", f"hydra.run.dir={run}"],
        monkeypatch, capsys,
    )
    _refused(code, err, run, "model.net", "network net.", "init_from=")
    assert _snapshot(checkpoint.parent) == before


def test_a_finished_run_is_never_overwritten(tmp_path, monkeypatch, capsys):
    """``hydra.run.dir=<an earlier run>`` is refused before Hydra writes into it; resuming that
    run from its own checkpoints/ continues it in place; a folder of the user's is refused."""
    run = tmp_path / "run"
    first = [*TINY_CLI, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run}"]
    code, err = run_inprocess("train.py", first, monkeypatch, capsys)
    assert code == 0, err
    earlier = _snapshot(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert "checkpoints/last.ckpt" in earlier and ".hydra/config.yaml" in earlier
    code, err = run_inprocess("train.py", first, monkeypatch, capsys)
    assert code == 2 and err.strip().startswith("train.py: error: hydra.run.dir="), err
    assert "earlier run" in err and f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(run) == earlier
    # resumed in place from its own last.ckpt: the run goes on to a second epoch
    last = run / "checkpoints" / "last.ckpt"
    resumed = [*first[:-3], "trainer.max_epochs=2", "test=false", f"ckpt_path={last}",
               f"hydra.run.dir={run}"]
    code, err = run_inprocess("train.py", resumed, monkeypatch, capsys)
    assert code == 0, err
    assert torch.load(last, weights_only=True)["global_step"] == 4  # 2 steps per epoch
    # the user's own folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = run_inprocess("evaluate.py", ["ckpt_path=x.ckpt", f"hydra.run.dir={mine}"],
                              monkeypatch, capsys)
    assert code == 2 and "not empty (notes.txt)" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_evaluate_refuses_bad_checkpoints(tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    run = tmp_path / "run"
    for args, needles in [
        ([], ["ckpt_path: give a checkpoint"]),
        (["ckpt_path=nowhere.ckpt"], ["ckpt_path=nowhere.ckpt", "not found"]),
        ([f"ckpt_path={garbage}"], ["garbage.ckpt", "cannot read"]),
        ([f"ckpt_path={other}"], ["other.ckpt", "not a DCC checkpoint"]),
        (["ckpt_path=x.ckpt", "mode=train"], ["mode=train", "mode=test or mode=predict"]),
        (["ckpt_path=x.ckpt", "refine_iterations=-1"], ["refine_iterations"]),
    ]:
        code, err = run_inprocess("evaluate.py", [*args, f"hydra.run.dir={run}"],
                                  monkeypatch, capsys)
        _refused(code, err, run, *needles)


def test_evaluate_refuses_a_checkpoint_of_another_data_set(
    myops, tmp_path_factory, tmp_path, monkeypatch, capsys
):
    """A phantom checkpoint with the MyoPS data group's defaults and no data group chosen
    would silently test on the wrong data; with ``data=myops`` chosen it is the user's call."""
    checkpoint = tiny_checkpoint(tmp_path_factory)
    run = tmp_path / "run"
    monkeypatch.setenv("DCC_DATA_ROOT", str(myops[0]))
    code, err = run_inprocess(
        "evaluate.py", [f"ckpt_path={checkpoint}", f"hydra.run.dir={run}"],
        monkeypatch, capsys,
    )
    assert code == 0, err  # a phantom checkpoint on the phantom group: fine
    shutil.rmtree(run)
    saved = torch.load(checkpoint, weights_only=True)
    saved["datamodule_class"] = "MyoPSDataModule"
    myops_like = tmp_path / "myops_like.ckpt"
    torch.save(saved, myops_like)
    code, err = run_inprocess(
        "evaluate.py", [f"ckpt_path={myops_like}", f"hydra.run.dir={run}"], monkeypatch, capsys
    )
    _refused(code, err, run, "trained on MyoPSDataModule", "CardiacPhantomDataModule",
             "experiment=")


def test_a_checkpoint_travels(myops, tmp_path, monkeypatch):
    """Trained with its data, split and cache in one folder, evaluated after that folder moved:
    the data settings come from the checkpoint, the places from where it is evaluated."""
    home = tmp_path / "home"
    shutil.copytree(myops[0], home)
    cfg = compose_cfg(
        tmp_path / "train",
        [*TINY_MYOPS_CLI, f"data.root={home}", f"data.split_file={home / 'split.json'}",
         f"data.cache_dir={home / 'cache'}", "trainer.max_steps=2", "test=false",
         "data.image_size=40"],
    )
    last = Path(run_training(cfg)["last_ckpt"])
    saved = torch.load(last, weights_only=True)
    assert saved["datamodule_class"] == "MyoPSDataModule"
    assert saved["datamodule_hyper_parameters"]["root"] == str(home)
    moved = tmp_path / "moved"
    home.rename(moved)
    cfg = compose_cfg(
        tmp_path / "evaluate",
        [f"ckpt_path={last}", "data=myops", f"data.root={moved}",
         f"data.split_file={moved / 'split.json'}", "data.batch_size=4",
         "+trainer.enable_progress_bar=false", "callbacks.metrics_table.figures=0"],
        name="evaluate.yaml",
    )
    metrics = run_evaluation(cfg)["metrics"]
    assert 0 < metrics["test/unreg_dsc"] <= 1
    assert cfg.data.image_size == 40 and cfg.data.root == str(moved)
    assert cfg.data.cache_dir is None  # the evaluation's own place, not the moved cache
    assert not home.exists()
    # the benches' entry to the same evaluation (dcc.lit.train.evaluate_checkpoint)
    table = evaluate_checkpoint(last, tmp_path / "bench", ROOT / "conf", threads=1,
                                overrides=[f"data.root={moved}",
                                           f"data.split_file={moved / 'split.json'}"])
    rows = read_groups(Path(table))
    assert len(rows) == len(run_evaluation_rows(tmp_path / "evaluate"))
    assert all(name.startswith("Case7003") for name in rows)


def test_cache_is_keyed_by_what_it_caches(myops, tmp_path):
    """A case of the same name in another folder, or an edited file, is read afresh."""
    from dcc.data.datasets import MyoPSSliceDataset

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(myops[0], first)
    shutil.copytree(myops[0], second)
    image = second / "myops2020" / "Case7001" / "Case7001_C0.nii.gz"
    import SimpleITK as sitk

    original = sitk.ReadImage(str(image))
    edited = sitk.GetImageFromArray(sitk.GetArrayFromImage(original)[:, :, ::-1].copy())
    edited.CopyInformation(original)
    sitk.WriteImage(edited, str(image))
    cache = tmp_path / "cache"
    settings = dict(image_size=32, pixel_spacing=3.0, margin=5.0, cache_dir=cache)
    a = MyoPSSliceDataset(["Case7001"], root=first, **settings).slices
    b = MyoPSSliceDataset(["Case7001"], root=second, **settings).slices
    assert len(list(cache.glob("myops_Case7001_*.pt"))) == 2
    assert not torch.equal(a[0].images[0], b[0].images[0])
    assert torch.equal(a[0].images[1], b[0].images[1])  # LGE untouched
    again = MyoPSSliceDataset(["Case7001"], root=first, **settings).slices
    assert torch.equal(again[0].images, a[0].images)
    # another setting: another entry
    MyoPSSliceDataset(["Case7001"], root=first, **{**settings, "margin": 6.0})
    assert len(list(cache.glob("myops_Case7001_*.pt"))) == 3


def test_scripts_exit_2_with_one_line(tmp_path):
    """The real processes: exit status 2, one line on stderr, no traceback, no run folder."""
    run = tmp_path / "run"
    proc = run_script("train.py", [*TINY_CLI, "model.optimizer_seg.lr=-1",
                                   f"hydra.run.dir={run}"], tmp_path)
    _refused(proc.returncode, proc.stderr, run, "model.optimizer_seg", "learning rate")
    proc = run_script("evaluate.py", [f"hydra.run.dir={run}"], tmp_path)
    _refused(proc.returncode, proc.stderr, run, "ckpt_path")


def test_prepare_names_the_data_error_before_training(myops, tmp_path):
    """The functions under the scripts raise InputError (what the scripts turn into a line)."""
    root, _ = myops
    cfg = compose_cfg(tmp_path, [*TINY_MYOPS_CLI, f"data.root={root}",
                                 f"data.split_file={tmp_path / 'missing.json'}"])
    with pytest.raises(InputError, match="missing.json: split file not found"):
        run_training(cfg)


def run_evaluation_rows(folder: Path) -> dict:
    """The test table that run_evaluation wrote under ``folder``."""
    return read_groups(next(folder.rglob("test_groups.csv")))
