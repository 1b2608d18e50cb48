"""Every command the README shows runs (issue #19), at tiny budgets: the README's ``bash`` blocks
are parsed, and each command must have a plan here (how to make it tiny, or why it is not run),
so a new or changed README command fails this test until it is covered. Commands run in README
order in one temporary folder (later ones use the runs of earlier ones, as a reader would);
those on MyoPS skip without the data."""

from __future__ import annotations

import glob
import logging
import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hydra.core.global_hydra import GlobalHydra
from tiny_runs import ROOT, run_script

from dcc.data.cardiac import data_root

SKIP = "skip"  # a plan: (SKIP, reason)

# appended to every train.py command; the MyoPS / phantom sizes below
TRAIN_TINY = [
    "model.net.channels=4", "model.net.levels=2", "model.figure_every=0", "threads=1",
    "data.image_size=32", "data.batch_size=2", "++trainer.max_steps=1",
    "++trainer.limit_train_batches=1", "++trainer.check_val_every_n_epoch=1",
    "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1",
    "~callbacks.rich_progress_bar", "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false", "callbacks.metrics_table.figures=0",
]
PHANTOM_TINY = ["data.num_train=4", "data.num_val=2", "data.num_test=2", "data.atlas_size=4"]
MYOPS_TINY = ["data.spacing=5.0", "data.num_ffds=1", "data.val_groups_per_slice=1"]
EVALUATE_TINY = ["threads=1", "data.batch_size=2", "++trainer.limit_test_batches=1",
                 "+trainer.enable_progress_bar=false", "callbacks.metrics_table.figures=0"]

# README command (comment dropped, continuation lines joined) -> how it runs here:
# {"replace": [(old, new), ...], "add": [extra arguments]} or (SKIP, reason)
PLANS: dict[str, object] = {
    'pip install torch==2.13.0 && pip install -e ".[dev]"':
        (SKIP, "the install itself: .ci/run does it on a clean clone"),
    "python -m pytest -q": (SKIP, "the test run this test is part of"),
    "export DCC_DATA_ROOT=/path/to/data": (SKIP, "sets the data folder of the commands below"),
    "python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2":
        {"process": True, "add": ["data.num_train=8"]},  # two processes: a real launch
    "python train.py experiment=mscmr_dcc_all trainer=gpu": {"gpu": True},
    "python train.py -m strategy=dgr,dcc_bs,dcc_all": {},
    "python train.py": {},
    "python train.py strategy=dcc_bs": {},
    "python train.py ~experiment": {},
    "DCC_DATA_ROOT=../shared/data python train.py data=myops": {},
    "python train.py logger=wandb": {},
    "python train.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt "
    "trainer.max_epochs=40":
        {"replace": [("trainer.max_epochs=40", "trainer.max_epochs=2")],
         "add": ["++trainer.max_steps=2"]},
    "python train.py -m hparams_search=dcc_optuna": {"add": ["hydra.sweeper.n_trials=2"]},
    "python evaluate.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt": {},
    "python evaluate.py mode=predict ckpt_path=C predict.inputs=[a.nii.gz,b.nii.gz,c.nii.gz] "
    "predict.out=DIR": {"replace": [("ckpt_path=C", "ckpt_path=outputs/train/runs/<run>/"
                                     "checkpoints/last.ckpt")]},
    "python train.py experiment=mscmr_dgr hydra.run.dir=runs/mscmr_dgr": {},
    "python train.py experiment=mscmr_dcc_at hydra.run.dir=runs/mscmr_dcc_at": {},
    "python train.py experiment=mscmr_dcc_bs hydra.run.dir=runs/mscmr_dcc_bs": {},
    "python train.py experiment=mscmr_dcc_all hydra.run.dir=runs/mscmr_dcc_all": {},
    "python train.py experiment=mscmr_dcc_all trainer.max_time=00:00:60:00": {},
    "python train.py experiment=phantom_pretrain hydra.run.dir=runs/phantom_pretrain": {},
    "python train.py experiment=mscmr_dcc_all "
    "init_from=runs/phantom_pretrain/checkpoints/last.ckpt": {},
    "python evaluate.py experiment=mscmr_dcc_all "
    "ckpt_path=runs/mscmr_dcc_all/checkpoints/last.ckpt": {},
    "python evaluate.py experiment=mscmr_dcc_all ckpt_path=... refine_iterations=50":
        {"replace": [("ckpt_path=...", "ckpt_path=runs/mscmr_dcc_all/checkpoints/last.ckpt"),
                     ("refine_iterations=50", "refine_iterations=3")]},
    "python train.py -m experiment=mscmr_dcc_all hparams_search=dcc_optuna "
    "hydra.sweeper.n_trials=20 trainer.max_time=00:00:10:00":
        {"replace": [("n_trials=20", "n_trials=2")]},
    "python evaluate.py mode=predict ckpt_path=runs/mscmr_dcc_all/checkpoints/last.ckpt "
    "predict.inputs=[P_C0.nii.gz,P_LGE.nii.gz,P_T2.nii.gz] predict.sequences=[C0,LGE,T2] "
    "predict.slice=5 predict.out=prediction/P predict.refine_iterations=50":
        {"replace": [("refine_iterations=50", "refine_iterations=3")]},
    "python bench/bench_mscmr_refine.py --ckpt runs/mscmr_dcc_all/checkpoints/<best>.ckpt "
    "--stride 41": {"add": ["--max-groups", "2", "--steps", "2", "--threads", "1",
                            "--out", "bench_refine"]},
    "python bench/mscmr_table5.py --runs runs --threads 2":
        {"replace": [("--threads 2", "--threads 1")], "add": ["--out", "table5", "--no-figure"]},
    "python bench/mscmr_curves.py runs/mscmr_* --out results/mscmr_curves": {},
    "dcc-register --phantom 2 --out outputs/phantom": {"add": ["--iterations", "3"]},
    "dcc-register P_C0.nii.gz P_LGE.nii.gz P_T2.nii.gz --method dcc --out P_dcc": {},
    "torchrun --standalone --nproc_per_node 2 -m dcc.cli.register a.nii.gz b.nii.gz c.nii.gz "
    "--out registered_2p": (SKIP, "two processes: tests/test_distributed.py launches "
                                  "dcc.cli.register under torchrun and compares it with one"),
    "dcc-register t1.nii.gz t2.nii.gz flair_dicom_folder/ --out results/ --stages rigid,ffd "
    "--ffd-spacing 20 --labels t1_seg.nii.gz t2_seg.nii.gz flair_seg.nii.gz":
        {"replace": [("--out results/", "--out registered/")],  # results/ holds the curves
         "add": ["--iterations", "2"]},
    "python bench/bench_phantom.py --cases 20 6 3 --groups 3 10 30 --methods xcoreg xcoreg-gt "
    "--preset brain2d --threads 1 --out bench/results":
        {"replace": [("--cases 20 6 3", "--cases 1 1 1"), ("--groups 3 10 30", "--groups 3 4 5"),
                     ("bench/results", "bench_results")], "add": ["--iterations", "2"]},
    "python bench/bench_myops.py --split test --seeds 0,1,2,3,4 --workers 2 "
    "--out results/myops_bench":
        {"replace": [("--split test", "--cases Case3030"), ("--seeds 0,1,2,3,4", "--seeds 0"),
                     ("--workers 2", "--workers 1")], "add": ["--models", "smooth"]},
    "python bench/bench_openms.py --out results/openms_bench":  # one study at ~6 mm, 2 steps
        {"add": ["--studies", "patient12_study1", "--shrink", "8", "--threads", "1",
                 "--sitk-iterations", "3", "--", "--iterations", "2"]},
    # N = 3 and 4, two steps of each stage, no targets; this tree only (no git worktree)
    "python bench/bench_distributed.py --size 64 --processes 1 2 4 --out results/distributed":
        {"replace": [("--size 64", "--size 2"), ("--processes 1 2 4", "--processes 2")],
         "add": ["--iterations", "3", "--warmup", "1"]},  # one torchrun launch, 2 processes
    # the paper's registration experiments: the tables' commands at tiny budgets, or the test
    # that runs the same command end to end
    "python bench/bench_phantom.py --cases 50 --groups 3 --methods xcoreg xcoreg-gt cte ape gmm "
    "--threads 1 --workers 2 --tag table2 --out results/phantom_table2":
        {"replace": [("--cases 50", "--cases 1"), ("xcoreg-gt cte ape gmm", "ape"),
                     ("results/phantom_table2", "phantom_table2")], "add": ["--iterations", "2"]},
    "python bench/bench_openms.py --trials 25 --seed 100 --shrink 4 --threads 1 "
    "--methods xcoreg cte ape gmm --tag table3 --out results/openms_table3":
        {"replace": [("--trials 25", "--trials 1"), ("--shrink 4", "--shrink 8"),
                     ("xcoreg cte ape gmm", "xcoreg gmm"), ("results/", "")],
         "add": ["--studies", "patient12_study1", "--sitk-iterations", "3", "--", "--iterations",
                 "2"]},
    "python bench/bench_openms.py --trials 2 --seed 200 --shrink 4 --threads 1 --skip-sitk "
    "--classes 2 4 6 12 16 --tag classes --out results/openms_table3":
        (SKIP, "tests/test_open_ms.py runs --classes (and --methods, --rows) end to end"),
    "python bench/bench_perfusion.py --trials 10 --seed 1 --threads 1 --out results/perfusion_moco":
        (SKIP, "tests/test_perfusion.py runs the command on 6 frames end to end"),
    "python bench/bench_myops.py --split test --models smooth,dense --seeds 0 "
    "--methods xcoreg cte ape gmm --workers 1 --out results/myops_methods --tag methods_test":
        (SKIP, "tests/test_bench_myops.py runs --methods xcoreg gmm on a real MyoPS case"),
    "python bench/bench_scaling.py --methods xcoreg cte ape gmm cg vi --sizes 3 8 16 32 64 "
    "--stage ffd --iterations 20 --repeats 1 --warmup 2 --target-sizes "
    "--out results/scaling_methods":
        (SKIP, "tests/test_bench_scaling.py runs --methods xcoreg vi at N = 3, 4"),
    "python bench/bench_scaling.py --revision 26c714b --out results/scaling":
        {"replace": [("--revision 26c714b ", "")],
         "add": ["--sizes", "3", "4", "--iterations", "2", "--repeats", "1", "--warmup", "1",
                 "--target-sizes"]},
}


def readme_commands() -> list[str]:
    """The commands of the README's ``bash`` blocks, in order, without comments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_has_a_plan():
    commands = readme_commands()
    missing = [c for c in commands if c not in PLANS]
    assert not missing, f"README commands without a plan in this test: {missing}"
    stale = [c for c in PLANS if c not in commands]
    assert not stale, f"plans for commands the README no longer shows: {stale}"


def _uses_myops(command: str) -> bool:
    return "data=myops" in command or "mscmr" in command or "P_C0" in command


def _inputs(folder: Path) -> None:
    """The files the README's own-data commands name, made from a phantom and a MyoPS-like
    case: 2D a/b/c, 3D P_* stacks, 3D t1/t2 + a DICOM folder with their label maps."""
    from test_io import write_dicom_series
    from tiny_runs import write_myops_case

    from dcc.data.cardiac_phantom import cardiac_phantom
    from dcc.data.io import write_image
    from dcc.spatial.grid import Grid

    phantom = cardiac_phantom(32, seed=0)
    grid = Grid.from_shape((32, 32), (150 / 32,) * 2)
    for name, image in zip("abc", phantom.images, strict=True):
        write_image(folder / f"{name}.nii.gz", image, grid)
    case = write_myops_case(folder / "stack", "P", shape=(8, 48, 48))
    for sequence in ("C0", "LGE", "T2"):
        (case / f"P_{sequence}.nii.gz").rename(folder / f"P_{sequence}.nii.gz")
    z, y, x = np.meshgrid(*(np.arange(16),) * 3, indexing="ij")
    ball = (np.hypot(np.hypot(z - 8, y - 7), x - 8) < 5).astype(np.int16)
    for k, name in enumerate(("t1", "t2")):
        for suffix, array in (("", (ball * (100 + 50 * k) + 20).astype(np.float32)),
                              ("_seg", ball)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(folder / f"{name}{suffix}.nii.gz"))
    (folder / "flair_dicom_folder").mkdir()
    write_dicom_series(folder / "flair_dicom_folder", (ball * 300 + 10).astype(np.int16),
                       (2.0, 2.0, 2.0), (0.0,) * 3, "1.2.826.0.1.3680043.9.12", "F")
    flair = sitk.GetImageFromArray(ball)
    flair.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(flair, str(folder / "flair_seg.nii.gz"))


def _expand(command: str, folder: Path) -> list[str]:
    """The README command's words with its placeholders resolved in ``folder``."""
    runs = sorted((folder / "outputs" / "train" / "runs").glob("*"))
    words = []
    for word in shlex.split(command):
        if "<run>" in word:
            word = word.replace("<run>", runs[0].name)
        if "<best>" in word:
            best = [p for p in (folder / word).parent.glob("epoch_*.ckpt")]
            word = str(best[0].relative_to(folder)) if best else word
        words += sorted(glob.glob(word, root_dir=folder)) if "*" in word else [word]
    return words


def _run(words: list[str], plan: dict, folder: Path, monkeypatch, capsys, count: int) -> None:
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = str(data_root()) if key == "DCC_DATA_ROOT" else value
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    extra = list(plan.get("add", []))
    if words[:2] in (["python", "train.py"], ["python", "evaluate.py"]):
        script = words[1]
        joined = " ".join(words)
        tiny = list(TRAIN_TINY if script == "train.py" else EVALUATE_TINY)
        if script == "train.py":
            tiny += MYOPS_TINY if _uses_myops(joined) else PHANTOM_TINY
        if _uses_myops(joined):
            tiny.append(f"data.cache_dir={folder / 'cache'}")
        if script == "evaluate.py" and "mode=predict" in joined:
            tiny = ["threads=1"]
        if "-m" in words:
            tiny.append(f"hydra.sweep.dir={folder / f'multirun{count}'}")
        elif not any(w.startswith("hydra.run.dir=") for w in words):
            task = "train" if script == "train.py" else "evaluate"
            tiny.append(f"hydra.run.dir={folder / 'outputs' / task / 'runs' / f'r{count:02d}'}")
        given = {a.split("=")[0].lstrip("+~") for a in extra}
        tiny = [a for a in tiny if a.split("=")[0].lstrip("+~") not in given]
        args = [*words[2:], f"paths.log_dir={folder / 'outputs'}", *tiny, *extra]
        if plan.get("process"):
            proc = run_script(script, args, folder, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return
        _hydra_main(script, args, monkeypatch)
    elif words[0] == "python":
        _script_main(words[1], [*words[2:], *extra], monkeypatch)
    elif words[0] == "dcc-register":
        from dcc.cli.register import main

        assert main([*words[1:], *extra, "--quiet"]) == 0
    else:
        raise AssertionError(f"no runner for {words}")


def _hydra_main(script: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{script} {args}: exit {stop.code}"
    finally:
        GlobalHydra.instance().clear()
        for handler in list(logging.root.handlers):
            handler.close()
            logging.root.removeHandler(handler)


def _script_main(script: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{script} {args}: exit {stop.code}"


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    """Each README command in order, at its tiny budget, in one folder (``outputs/``, ``runs/``
    and the input files of the examples live there)."""
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    import torch

    skipped = []
    for count, command in enumerate(readme_commands()):
        plan = PLANS[command]
        if isinstance(plan, tuple):
            continue
        if plan.get("gpu") and not torch.cuda.is_available():
            skipped.append(f"{command} (no GPU)")
            continue
        if (_uses_myops(command) or "bench_myops" in command) and data_root() is None:
            skipped.append(f"{command} (no MyoPS data)")
            continue
        root = data_root()
        if "bench_openms" in command and (
                root is None or not (root / "open_ms" / "patient12_study1").is_dir()):
            skipped.append(f"{command} (no open-MS data)")
            continue
        text = command
        for old, new in plan.get("replace", []):
            text = text.replace(old, new)
        try:
            _run(_expand(text, tmp_path), plan, tmp_path, monkeypatch, capsys, count)
        except BaseException as error:
            raise AssertionError(f"README command failed: {command}\n{error}") from error
    if skipped:
        print("not run here:", *skipped, sep="\n  ")
