"""Data-parallel training through Lightning: ``trainer=ddp`` with two CPU processes (gloo)."""

from __future__ import annotations

import torch
import yaml
from tiny_runs import TINY_CLI, run_script


def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=2",
            "trainer.max_epochs=1",
            "test=false",
            f"hydra.run.dir={run}",
            *TINY_CLI,
            "data.num_train=8",
        ],
        tmp_path,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # the second process joined
    assert "distributed_backend=gloo" in output
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 groups, batches of 2 on each of 2 processes: 2 steps, each on 4 groups
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (2, 0)
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text(encoding="utf-8"))
    assert config["trainer"]["strategy"] == "ddp_find_unused_parameters_true"
    # per-sequence batch-norm statistics were updated (rank 0's, broadcast by DDP)
    means = [v for k, v in checkpoint["state_dict"].items() if k.endswith("running_mean")]
    assert means and all(torch.isfinite(m).all() for m in means)
    assert any(m.abs().sum() > 0 for m in means)
