"""The safety of the entry points ``train.py`` and ``evaluate.py``, as ``dcc-register`` has it:
a run never writes into an earlier run's folder, and bad input (a data problem, a bad setting,
a checkpoint that does not fit) ends with one line naming the file or setting, exit status 2,
and no run folder left behind.

:class:`RunFolderGuard` is a Hydra callback (``conf/hydra/default.yaml``): it runs before Hydra
creates the run folder and writes the composed config into it. :func:`exit_on_bad_input` wraps
the part of a run that checks its input (:func:`dcc.lit.train.prepare_training`,
:func:`dcc.lit.train.prepare_evaluation`), before any trainer or logger exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dcc.data.io import InputError

__all__ = ["RunFolderGuard", "run_folder_problem", "remove_run_folder", "exit_on_bad_input"]

# run folders that did not exist before this process: removed again when the input is refused
_NEW_RUN_FOLDERS: set[Path] = set()


def _prog() -> str:
    return Path(sys.argv[0]).name or "dcc"


def _refuse(message: str, prog: str | None = None) -> None:
    print(f"{prog or _prog()}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_folder_problem(folder: Path, resume_from: str | None, setting: str) -> str | None:
    """Why ``folder`` cannot take a new run (``None`` when it can): it holds files, an earlier
    run's or the user's. A training run that resumes from a checkpoint inside the folder's
    ``checkpoints/`` (``resume_from``) continues that run in place."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{setting}={folder}: exists and is not a folder; give a new folder"
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    checkpoints = folder / "checkpoints"
    if resume_from and checkpoints.resolve() in Path(resume_from).resolve().parents:
        return None
    last = checkpoints / "last.ckpt"
    if last.is_file() or (folder / ".hydra").is_dir():
        hint = (f", or continue that run with ckpt_path={last} (and its overrides)"
                if last.is_file() and resume_from is not None else "")
        return (f"{setting}={folder}: holds an earlier run ({', '.join(entries[:4])}); give a "
                f"new folder{hint}")
    return (f"{setting}={folder}: the folder is not empty ({', '.join(entries[:4])}"
            f"{' ...' if len(entries) > 4 else ''}); give a new or empty folder")


class RunFolderGuard(Callback):
    """Refuse, before Hydra writes anything, a run folder (``hydra.run.dir``) or multirun folder
    (``hydra.sweep.dir``) that is not new or empty, and remember which run folders this process
    creates (:func:`exit_on_bad_input` removes them again)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP worker joins rank 0's folder
            return
        folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        resume = None
        if "ckpt_path" in config and config.get("task_name") == "train":
            resume = OmegaConf.select(config, "ckpt_path", throw_on_missing=False) or ""
        problem = run_folder_problem(folder, resume, "hydra.run.dir")
        if problem:
            _refuse(problem)
        if not folder.exists():
            _NEW_RUN_FOLDERS.add(folder)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
        problem = run_folder_problem(folder, None, "hydra.sweep.dir")
        if problem:
            _refuse(problem)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode") and str(config.hydra.mode).endswith("MULTIRUN"):
            _NEW_RUN_FOLDERS.add(Path(config.hydra.runtime.output_dir).absolute())


def remove_run_folder() -> None:
    """Remove this run's folder when this process created it (nothing is left of a refused
    run); an existing folder (a run resumed in place) is kept."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not _NEW_RUN_FOLDERS:
        return
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", throw_on_missing=False)
    folder = Path(str(output_dir)).absolute()
    if output_dir is None or folder not in _NEW_RUN_FOLDERS or not folder.is_dir():
        return
    for handler in list(logging.root.handlers):  # Hydra's log file inside the folder
        if Path(getattr(handler, "baseFilename", "/")).absolute().is_relative_to(folder):
            handler.close()
            logging.root.removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def exit_on_bad_input(prog: str | None = None) -> Iterator[None]:
    """Inside: an :class:`InputError` prints ``<prog>: error: <message>`` on stderr (``prog``:
    the script's name by default), removes the run folder this process created and exits with
    status 2."""
    try:
        yield
    except InputError as error:
        remove_run_folder()
        _refuse(str(error), prog)
