"""Resume: ``python train.py ckpt_path=.../last.ckpt`` continues from the saved step and epoch
(optimizer states, alternation phase, random generators) and ends where an uninterrupted run
with the same seed ends."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_configs import compose_cfg
from tiny_runs import ROOT, TINY_CLI

from dcc.lit.train import run_training

# 2 steps per epoch, alternation every 3 steps: the resumed epoch starts mid-phase
RUN = [*TINY_CLI, "test=false", "model.alternate_every=3", "data.num_train=4"]


def train(folder: Path, *overrides: str) -> dict:
    return run_training(compose_cfg(folder, [*RUN, *overrides]))


def test_resume_reaches_the_uninterrupted_result(tmp_path):
    full = train(tmp_path / "full", "trainer.max_epochs=2")
    half = train(tmp_path / "half", "trainer.max_epochs=1")
    resumed = train(tmp_path / "resumed", "trainer.max_epochs=2", f"ckpt_path={half['last_ckpt']}")
    first = torch.load(half["last_ckpt"], weights_only=True)
    a = torch.load(full["last_ckpt"], weights_only=True)
    b = torch.load(resumed["last_ckpt"], weights_only=True)
    assert (first["global_step"], first["epoch"]) == (2, 0)
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (4, 1)
    # the resumed run trained only the second epoch (steps 2 and 3)
    rows = list(csv.DictReader(open(Path(resumed["output_dir"]) / "csv/version_0/metrics.csv")))
    assert {r["epoch"] for r in rows if r.get("train/loss_epoch")} == {"1"}
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # both optimizers' states (Adam moments and step counts)
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for index, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert full["metrics"]["val/reg_dsc"] == resumed["metrics"]["val/reg_dsc"]


def test_without_saved_random_state_the_data_differ(tmp_path):
    """The random state is what makes the runs agree: drop it and the second epoch draws other
    training groups (so the test above is not trivially true)."""
    full = train(tmp_path / "full", "trainer.max_epochs=2")
    half = train(tmp_path / "half", "trainer.max_epochs=1")
    checkpoint = torch.load(half["last_ckpt"], weights_only=True)
    checkpoint["callbacks"] = {
        k: v for k, v in checkpoint["callbacks"].items() if "RandomState" not in k
    }
    stripped = tmp_path / "stripped.ckpt"
    torch.save(checkpoint, stripped)
    resumed = train(tmp_path / "resumed", "trainer.max_epochs=2", f"ckpt_path={stripped}")
    a = torch.load(full["last_ckpt"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_ckpt"], weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sigterm_exits_143_with_the_resume_line(tmp_path):
    """A scheduler's SIGTERM: training stops, no test of the cut-short run, exit 143 (not 0) and
    one line that says how to resume from last.ckpt."""
    run = tmp_path / "run"
    args = [*TINY_CLI, "trainer.max_epochs=1000", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, encoding="utf-8",
                               errors="replace")
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), "no epoch finished in time"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line == f"train.py: terminated (SIGTERM); resume with ckpt_path={last} (and the same " \
                   "overrides)"
    assert not (run / "metrics" / "test_groups.csv").exists()  # the cut-short run is not tested
