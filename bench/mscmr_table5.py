"""The paper's Table 5 on MyoPS 2020: the four DCC strategies on the same test groups.

One command gathers the test metrics of the runs ``mscmr_dgr``, ``mscmr_dcc_at``,
``mscmr_dcc_bs`` and ``mscmr_dcc_all`` (``python train.py experiment=mscmr_<strategy>``) into

* ``<out>.md``: Reg DSC (mean +- std over the test groups, per structure too) beside the
  unregistered value ("None"), Seg DSC per sequence (LGE, C0, T2) for the labelled strategies,
  paired t-tests of the per-group Reg DSC between consecutive strategies, the paper's numbers
  beside ours, the time per group, the X-CoReg rows of ``results/mscmr_refine.csv`` when that
  file exists, and the training budget and hardware of every run with the commands that
  regenerate it;
* ``<out>.csv``: one row per method (None, the strategies, X-CoReg), and ``<out>_ttests.csv``;
* ``<out>_median.png``: the test group whose DCC+All Reg DSC is the median (like the paper's
  Fig. 10): the three sequences before and after registration by every strategy, with the
  warped label contours, and the posterior segmentation (Eq. 53).

Each strategy is a run folder (its best checkpoint in ``checkpoints/`` and, after its test,
``metrics/test_groups.csv`` of :class:`dcc.lit.metrics_table.MetricsTable`) or a checkpoint file.
A run without a test table (or a checkpoint, or ``--reevaluate``) is tested here with
:func:`dcc.lit.train.run_evaluation` on data made like its checkpoint's (into
``<run>/table5_eval/``, or ``--eval-dir``). Missing strategies are reported as missing.

The rows, paired tests, refinement rows, median-case choice, CSV and Markdown are
:mod:`dcc.evaluation.tables` (run folders: :mod:`dcc.evaluation.runs`; the figure:
:func:`dcc.evaluation.figures.save_group_columns`); this command tests the runs that need it
(Lightning) and registers the median group with every strategy's model.

    python bench/mscmr_table5.py                        # /work/runs/mscmr_<strategy>
    python bench/mscmr_table5.py --runs outputs/runs --out results/mscmr_table5
    python bench/mscmr_table5.py --run dcc_all=path/to/best.ckpt --run dgr=path/to/run_folder
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcc.evaluation.runs import (
    Run,
    inconsistent_groups,
    load_yaml,
    patient,
    read_groups,
    resolve_run,
)
from dcc.evaluation.tables import (
    LABELLED,
    NAMES,
    PAIRS,
    SEQUENCES,
    STRATEGIES,
    STRUCTURES,
    markdown,
    median_case,
    paired_tests,
    read_refine,
    summary_rows,
    write_csv,
    xcoreg_row,
)
from dcc.lit.checkpoints import evaluate_command
from dcc.lit.train import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- runs
def data_settings(checkpoint: Path, data: Sequence[str] = ()) -> dict[str, Any]:
    """The data-module settings a checkpoint was trained with, places left out and ``data``
    (``key=value``) applied (:func:`dcc.lit.checkpoints.data_settings`); the test groups of
    the Table are made from these."""
    from dcc.lit.checkpoints import data_settings as checkpoint_data_settings

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    settings = checkpoint_data_settings(saved, overrides=data)
    if not settings:
        raise ValueError(f"{checkpoint}: no data-module settings saved; cannot rebuild its data")
    return settings


def load_runs(
    sources: Mapping[str, Path],
    reevaluate: bool,
    threads: int | None,
    data: Sequence[str],
    eval_dir: Path | None = None,
) -> tuple[dict[str, Run], dict[str, str]]:
    """Runs with their test rows, and why each missing strategy is missing. Tests run here
    write into ``<eval_dir>/<strategy>`` (default ``<run folder>/table5_eval``)."""
    runs, missing = {}, {}
    for strategy in STRATEGIES:
        source = sources.get(strategy)
        run = resolve_run(strategy, source) if source is not None else None
        if run is None:
            missing[strategy] = f"no run folder or checkpoint at {source}"
            continue
        if run.table is None or reevaluate or run.source.is_file():
            if run.checkpoint is None:
                missing[strategy] = f"{run.folder}: no checkpoint to test"
                continue
            out = eval_dir / strategy if eval_dir is not None else run.folder / "table5_eval"
            earlier = out / "metrics" / "test_groups.csv"
            fresh = earlier.is_file() and earlier.stat().st_mtime > run.checkpoint.stat().st_mtime
            if fresh and not reevaluate and not data:
                print(
                    f"[table5] {strategy}: earlier test of this script, {earlier}", file=sys.stderr
                )
                run.table = earlier
            else:
                print(f"[table5] testing {strategy}: {run.checkpoint} -> {out}", file=sys.stderr)
                table = evaluate_checkpoint(run.checkpoint, out, ROOT / "conf", threads, data)
                run.table = Path(table)
            run.evaluated_here = True
        run.rows = read_groups(run.table)
        runs[strategy] = run
    return runs, missing


# ---------------------------------------------------------------------------- median group
def _test_group(checkpoint: Path, model, case: str, cache: dict, data: Sequence[str]) -> dict:
    """The test group named ``case`` from data made like the checkpoint's (a batch of one)."""
    from torch.utils.data import default_collate

    from dcc.lit.datamodules import MyoPSDataModule

    saved = {**data_settings(checkpoint, data), "with_atlas": model.atlas}
    key = repr(sorted(saved.items()))
    if key not in cache:
        data = MyoPSDataModule(**saved)
        data.setup("test")
        cache[key] = data.datasets["test"]
    dataset = cache[key]
    name, z = patient(case), int(case.split("-")[1].lstrip("z"))
    which = [i for i, s in enumerate(dataset.slices) if s.case == name and s.slice_index == z]
    per_slice = len(dataset.combinations)
    for i in which:
        for index in range(i * per_slice, (i + 1) * per_slice):
            item = dataset[index]
            if item["case"] == case:
                return default_collate([item])
    raise ValueError(f"{checkpoint}: test group {case} not in the data made like its training data")


@torch.no_grad()
def median_figure(
    runs: Mapping[str, Run],
    path: Path,
    repeats: int,
    threads: int | None,
    data: Sequence[str] = (),
) -> dict[str, Any] | None:
    """The median group registered by every strategy (PNG like the paper's Fig. 10), and each
    model's time for one group (median of ``repeats`` forward passes + EM, batch of one)."""
    from dcc.evaluation.figures import save_group_columns
    from dcc.lit.checkpoints import load_checkpoint
    from dcc.spatial.fields import warp

    chosen = median_case(runs)
    if chosen is None:
        return None
    _, case = chosen
    if threads:
        torch.set_num_threads(threads)
    columns, cache = [], {}
    for strategy in STRATEGIES:
        run = runs.get(strategy)
        if run is None or run.checkpoint is None or case not in run.rows:
            continue
        model = load_checkpoint(str(run.checkpoint), lightning=True)
        batch = _test_group(run.checkpoint, model, case, cache, data)
        result = model.step(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.step(batch)
            times.append(time.perf_counter() - start)
        run.latency_s = statistics.median(times) if times else None
        disp = result.net.displacement.float()
        warped = warp(batch["labels"].unsqueeze(2).float(), disp, mode="nearest")[0, :, 0].long()
        members = ~model.is_atlas(batch["domains"][0])
        if not columns:  # the unregistered group
            columns.append(
                {
                    "title": f"None\nReg DSC {100 * run.rows[case]['unreg_dsc']:.1f}",
                    "images": batch["images"][0][members],
                    "contour": batch["labels"][0][0],
                    "seg": batch["labels"][0][0],
                    "seg_title": "C0 label",
                    "sequences": model.sequences,
                }
            )
        posterior = result.loss.posterior[0].argmax(0)
        title = f"{NAMES[strategy]}\nReg DSC {100 * run.rows[case]['reg_dsc']:.1f}"
        if strategy in LABELLED:
            title += f", Seg {100 * run.rows[case].get('seg_dsc', math.nan):.1f}"
        columns.append(
            {
                "title": title,
                "images": result.loss.warped_images[0][members],
                "contour": posterior if strategy in LABELLED else warped[0],
                "seg": posterior,
                "seg_title": "posterior (Eq. 53)",
                "sequences": model.sequences,
            }
        )
    if not columns:
        return None
    title = (
        f"median test group {case} (by {NAMES[chosen[0]]} Reg DSC). Contours: warped C0 label "
        "(None, DGR), posterior segmentation (DCC)"
    )
    order = [s for s in SEQUENCES if s in columns[0]["sequences"]]
    save_group_columns(path, columns, order, STRUCTURES, title)
    return {"case": case, "by": chosen[0], "path": path}


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="/work/runs", help="folder of the runs mscmr_<strategy>")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="STRATEGY=PATH",
        help="a strategy's run folder or checkpoint (instead of <runs>/mscmr_<strategy>)",
    )
    p.add_argument("--out", default=str(ROOT / "results" / "mscmr_table5"), help="output prefix")
    p.add_argument(
        "--refine",
        default=str(ROOT / "results" / "mscmr_refine.csv"),
        help="refinement table of bench/bench_mscmr_refine.py (its X-CoReg row is added)",
    )
    p.add_argument("--reevaluate", action="store_true", help="test every checkpoint again")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data-module setting for tests run here (e.g. root=/data, num_workers=2)",
    )
    p.add_argument(
        "--eval-dir", default=None, help="tests run here go to DIR/<strategy> (default: the run)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=20, help="timed passes of the median group")
    p.add_argument("--no-figure", action="store_true", help="skip the median-group PNG")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = {s: Path(args.runs) / f"mscmr_{s}" for s in STRATEGIES}
    for item in args.run:
        strategy, _, path = item.partition("=")
        if strategy not in STRATEGIES or not path:
            raise SystemExit(f"--run {item}: use STRATEGY=PATH with STRATEGY one of {STRATEGIES}")
        sources[strategy] = Path(path)
    eval_dir = Path(args.eval_dir) if args.eval_dir else None
    runs, missing = load_runs(sources, args.reevaluate, args.threads, args.data, eval_dir)
    for strategy, why in missing.items():
        print(f"[table5] {NAMES[strategy]} missing: {why}", file=sys.stderr)
    bad = inconsistent_groups(runs)
    if bad:
        print(f"[table5] warning: {len(bad)} test groups differ between runs", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = None
    if runs and not args.no_figure:
        figure = median_figure(
            runs, out.with_name(out.name + "_median.png"), args.repeats, args.threads, args.data
        )
    refine_path = Path(args.refine)
    refine = read_refine(refine_path) if refine_path.is_file() else []
    rows = summary_rows(runs, xcoreg_row(refine))
    xcoreg = xcoreg_row(refine)
    extra = {"xcoreg": xcoreg["cases"]} if xcoreg and xcoreg.get("cases") else {}
    pairs = [*PAIRS, *([("xcoreg", "dcc_all")] if extra and "dcc_all" in runs else [])]
    tests = paired_tests(runs, pairs, extra)
    command = "python bench/mscmr_table5.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_csv(out.with_name(out.name + ".csv"), rows)
    write_csv(out.with_name(out.name + "_ttests.csv"), tests)
    defaults = load_yaml(ROOT / "conf" / "data" / "myops.yaml") or {}
    commands = [evaluate_command(r.checkpoint, defaults, args.data) for r in runs.values()]
    text = markdown(
        runs, missing, rows, tests, refine, refine_path, figure, command.strip(), args.threads,
        commands,
    )
    out.with_name(out.name + ".md").write_text(text, encoding="utf-8")
    print(text)
    return {"rows": rows, "tests": tests, "missing": missing, "figure": figure}


if __name__ == "__main__":
    main()
