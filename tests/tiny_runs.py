"""Helpers of the #9 tests: tiny command-line overrides and running train.py/evaluate.py in a
subprocess (one thread, a timeout, no W&B network)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# C = 4, L_R = 2, batches of 2 groups, one thread, no progress bar
TINY_RUN = [
    "data.image_size=32",
    "data.batch_size=2",
    "model.net.channels=4",
    "model.net.levels=2",
    "model.figure_every=0",
    "threads=1",
    "~callbacks.rich_progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
# 32x32 phantoms
TINY_CLI = [*TINY_RUN, "data.num_train=4", "data.num_val=2", "data.num_test=2",
            "data.atlas_size=4"]


def run_script(
    script: str, args: list[str], tmp_path: Path, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from the repository root with one thread per process, stdin
    closed, W&B files under ``tmp_path``; ``env`` entries set to ``None`` are unset."""
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    environ = {k: v for k, v in environ.items() if v is not None}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )


_CHECKPOINTS: dict[str, Path] = {}


def tiny_checkpoint(tmp_path_factory, strategy: str = "dcc_all") -> Path:
    """``last.ckpt`` of one tiny training epoch (made once per test session and strategy), with
    the registration heads' weights randomised so that the predicted fields are not zero."""
    if strategy not in _CHECKPOINTS:
        import torch
        from test_configs import compose_cfg

        from dcc.lit.train import run_training

        tmp = tmp_path_factory.mktemp(f"tiny_{strategy}")
        cfg = compose_cfg(
            tmp,
            [
                *TINY_CLI,
                f"strategy={strategy}",
                "data.num_train=2",
                "trainer.max_epochs=1",
                "test=false",
            ],
        )
        last = Path(run_training(cfg)["last_ckpt"])
        checkpoint = torch.load(last, weights_only=True)
        generator = torch.Generator().manual_seed(0)
        for key, value in checkpoint["state_dict"].items():
            if ".reg_heads." in key and key.endswith("weight"):
                value.copy_(0.5 * torch.randn(value.shape, generator=generator))
        path = tmp / "tiny.ckpt"
        torch.save(checkpoint, path)
        _CHECKPOINTS[strategy] = path
    return _CHECKPOINTS[strategy]


def write_myops_case(root: Path, case: str, shape: tuple[int, int, int] = (3, 48, 48)) -> Path:
    """A tiny MyoPS-like case ``root/myops2020/<case>/<case>_{C0,LGE,T2,gd}.nii.gz``: ``shape``
    (slices, rows, columns) at 2 x 2 x 8 mm, LV blood pool (500) in a myocardial ring (200)
    beside an RV (600) on every slice, each sequence with its own intensities and noise."""
    import numpy as np
    import SimpleITK as sitk

    folder = root / "myops2020" / case
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    cy, cx = shape[1] / 2, shape[2] / 2 - 4
    r = np.hypot(y - cy, x - cx)
    labels = np.zeros(shape, np.int16)
    labels[r < 10] = 200
    labels[r < 6] = 500
    labels[(np.hypot(y - cy, x - cx - 15) < 6) & (labels == 0)] = 600
    rng = np.random.default_rng(sum(map(ord, case)))
    means = {"C0": (0.2, 0.4, 1.0, 0.9), "LGE": (0.3, 0.2, 0.8, 0.7), "T2": (0.1, 0.6, 0.5, 0.6)}
    values = {0: 0, 200: 1, 500: 2, 600: 3}
    index = np.vectorize(values.get)(labels)
    for name, mean in {**means, "gd": None}.items():
        array = labels if mean is None else (
            np.asarray(mean)[index] * 500 + rng.normal(0, 10, shape)).astype(np.float32)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 8.0))
        sitk.WriteImage(image, str(folder / f"{case}_{name}.nii.gz"))
    return folder


def write_myops_tree(root: Path, cases: dict[str, list[str]]) -> Path:
    """:func:`write_myops_case` for every case of ``cases`` (``{"train": [...], "val": [...],
    "test": [...]}``) and that split as ``root/split.json``; returns the split file."""
    import json

    for names in cases.values():
        for case in names:
            write_myops_case(root, case)
    split = root / "split.json"
    split.write_text(json.dumps(cases), encoding="utf-8")
    return split


# a tiny MyoPS run on write_myops_tree's data: 32x32 at 3 mm
TINY_MYOPS_CLI = ["data=myops", *TINY_RUN, "data.spacing=3.0", "data.margin=5",
                  "data.num_ffds=1"]


def load_bench(name: str):
    """``bench/<name>.py`` as a fresh module (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
