"""Benchmark (issue #10, "network start, iterative finish"): a DCC checkpoint alone, refined by
20/50/100 X-CoReg FFD steps (``refine_iterations``), and X-CoReg alone, on the MyoPS test groups.

For every test group (the checkpoint's own data settings: image size, spacing, FFD bank, seed;
640 groups = 32 test slices x 20 fixed FFD combinations) it reports the Reg DSC (mean pairwise
Dice over myocardium/LV/RV of the warped labels of the sequences, as
:func:`dcc.lit.module.group_metrics`) and the time per group of:

* ``unregistered``: the labels as misaligned;
* ``network``: the DCC network's fields (one forward pass);
* ``network + refine N``: the network's fields refined by N steps of X-CoReg's unbiased FFD
  stage (:func:`dcc.coreg.refine.refine_group`; time = network + refinement);
* ``X-CoReg``: rigid + FFD from the identity with the settings ``dcc-register`` picks for a 2D
  slice (:func:`dcc.coreg.config.auto_config`: the ``cardiac2d`` preset, its pyramid fitted to
  the slice size).

    python bench/bench_mscmr_refine.py --ckpt /work/runs/mscmr_dcc_all/checkpoints/best.ckpt
    python bench/bench_mscmr_refine.py --ckpt C --stride 21   # 31 groups: every slice but one,
                                                              # the 20 combinations in turn
    python bench/bench_mscmr_refine.py --ckpt C --max-groups 4 --out /tmp/refine_try
    python bench/bench_mscmr_refine.py --ckpt C --split val --stride 19 --refine-lr 0.2 \
        --no-xcoreg --out /tmp/refine_val   # choose the refinement settings on validation

Writes ``<out>.md`` (summary with the command, hardware and date) and ``<out>.csv`` (one row per
group and method), after every group (an interrupted run keeps what it has), and prints the
summary. Data: ``--root`` or ``$DCC_DATA_ROOT`` (the folder holding ``myops2020/``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcc.coreg import XCoReg
from dcc.coreg.config import auto_config
from dcc.coreg.refine import FFD_SPACING, LR, refine_group
from dcc.evaluation.runs import cpu_name, mean_std
from dcc.evaluation.tables import write_csv
from dcc.lit.checkpoints import data_settings, load_checkpoint
from dcc.lit.datamodules import MyoPSDataModule
from dcc.metrics import pairwise_dice
from dcc.spatial.fields import points_to_displacement, warp
from dcc.spatial.grid import Grid

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = [1, 2, 3]  # myocardium, LV, RV


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="DCC checkpoint trained on MyoPS (train.py)")
    p.add_argument("--root", default=None, help="folder holding myops2020/ (default: "
                   "$DCC_DATA_ROOT, else the checkpoint's saved data root)")
    p.add_argument("--steps", default="20,50,100", help="refinement steps, comma-separated")
    p.add_argument("--stride", type=int, default=1, help="every STRIDE-th test group "
                   "(groups are slice-major, 20 per slice: 21 takes one per slice, cycling "
                   "through the combinations)")
    p.add_argument("--offset", type=int, default=0, help="index of the first group taken")
    p.add_argument("--max-groups", type=int, default=None, help="at most this many groups")
    p.add_argument("--no-xcoreg", action="store_true", help="skip X-CoReg alone")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test groups (the report), or validation groups to choose the "
                   "refinement settings on")
    p.add_argument("--refine-lr", type=float, default=LR, help="Adam step of the refining FFD, "
                   f"mm (default {LR})")
    p.add_argument("--refine-spacing", type=float, default=FFD_SPACING,
                   help=f"control spacing of the refining FFD, mm (default {FFD_SPACING})")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="change a saved data setting, e.g. ffd_magnitude=0: the test slices "
                   "as they are, without misalignment")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "results" / "mscmr_refine"),
                   help="output path without extension (default: results/mscmr_refine)")
    args = p.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--steps: comma-separated whole numbers, got {args.steps!r}")
    if any(s < 1 for s in args.steps):
        p.error("--steps: every count must be >= 1 (the network alone is always reported)")
    if args.stride < 1 or args.offset < 0 or (args.max_groups is not None and args.max_groups < 1):
        p.error("--stride and --max-groups must be >= 1, --offset >= 0")
    return args


def test_groups(model, args):
    """The MyoPS test dataset made with the checkpoint's saved data settings, and the indices
    of the groups taken."""
    saved = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    settings = data_settings(saved, overrides=args.data) if saved.get(
        "datamodule_hyper_parameters") else {}
    if "margin" not in settings:
        raise SystemExit(f"{args.ckpt}: not a checkpoint trained on MyoPS (no MyoPS data settings)")
    settings["with_atlas"] = model.atlas
    root = args.root or os.environ.get("DCC_DATA_ROOT") or settings.get("root")
    settings["root"] = root
    data = MyoPSDataModule(**settings)
    data.setup("test" if args.split == "test" else "fit")
    dataset = data.datasets[args.split]
    indices = list(range(args.offset, len(dataset), args.stride))[: args.max_groups]
    return dataset, indices, settings


def reg_dice(labels, displacement, members) -> float:
    """Mean pairwise Dice (structures 1-3) of the members' labels warped by their fields."""
    warped = warp(labels[None, :, None].float(), displacement[None].float(), "nearest")[0, :, 0]
    return pairwise_dice(warped[members].long(), STRUCTURES)["mean"]


def xcoreg_fields(images, grid: Grid, members) -> tuple[torch.Tensor, float]:
    """X-CoReg rigid + FFD (dcc-register's 2D settings) on the members; voxel-unit fields."""
    result = XCoReg(auto_config(grid, progress=False)).register(images[members], grid)
    with torch.no_grad():
        field = points_to_displacement(result.transform.lattice(grid), grid)
    full = torch.zeros(images.shape[0], grid.ndim, *grid.shape)
    full[members] = field.float()
    return full, result.seconds


def evaluate_group(model, item, steps, methods, **settings) -> list[tuple]:
    """``(method, Reg DSC, seconds, refinement kept or "")`` of one group; ``settings`` go to
    :func:`dcc.coreg.refine.refine_group`."""
    images, labels, domains = item["images"], item["labels"], item["domains"]
    members = ~model.is_atlas(domains)
    spacing = [float(s) for s in item["spacing"]]
    out = [("unregistered", pairwise_dice(labels[members], STRUCTURES)["mean"], 0.0, "")]
    with torch.no_grad():
        start = time.perf_counter()
        net = model(images[None], domains[None]).displacement[0]
        t_net = time.perf_counter() - start
    out.append(("network", reg_dice(labels, net, members), t_net, ""))
    for n in steps:
        result = refine_group(images, net, n, spacing, **settings)
        dsc = reg_dice(labels, result.displacement, members)
        out.append((f"network + refine {n}", dsc, t_net + result.seconds, int(result.accepted)))
    if "X-CoReg" in methods:
        grid = Grid.from_shape(tuple(images.shape[1:]), spacing)
        field, seconds = xcoreg_fields(images, grid, members)
        out.append(("X-CoReg", reg_dice(labels, field, members), seconds, ""))
    return out


def hardware() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")


def summarise(rows, methods):
    out = []
    for method in methods:
        picked = [r for r in rows if r["method"] == method]
        dsc = [r["reg_dsc"] for r in picked if not math.isnan(r["reg_dsc"])]
        times = [r["time_s"] for r in picked]
        kept = [r["refine_kept"] for r in picked if r["refine_kept"] != ""]
        mean, std, n = mean_std(dsc)
        out.append({
            "method": method,
            "reg_dsc": mean,
            "std": std if n else 0.0,
            "time_s": statistics.fmean(times) if times else math.nan,
            "groups": len(dsc),
            "kept": f"{sum(kept)}/{len(kept)}" if kept else "",
        })
    return out


def write(out: Path, rows, methods, args, settings, seconds):
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(Path(f"{out}.csv"), rows)
    summary = summarise(rows, methods)
    xcoreg = next((s["time_s"] for s in summary if s["method"] == "X-CoReg"), math.nan)
    lines = [
        f"# MyoPS {args.split} groups: DCC network, network + X-CoReg refinement, X-CoReg alone",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`  ",
        f"Checkpoint: `{args.ckpt}` (strategy {settings.get('strategy', '?')})  ",
        f"Data: MyoPS {args.split} split, {settings['image_size']}^2 voxels of "
        f"{settings['spacing']} mm, groups {args.offset}::{args.stride} (max {args.max_groups}), "
        f"FFD misalignment magnitude {settings.get('ffd_magnitude')}  ",
        f"Refinement: unbiased FFD, {args.refine_spacing} mm control spacing, Adam step "
        f"{args.refine_lr} mm (dcc.coreg.refine)  ",
        f"Hardware: {hardware()}  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{seconds / 60:.1f} min in all",
        "",
        "Reg DSC: mean pairwise Dice over myocardium, LV and RV of the sequences' warped labels "
        "(mean ± std over the groups). Time: seconds per group (network forward pass; "
        "refinement includes it). Kept: refinements that the objective check accepted (the "
        "others return the network's fields).",
        "",
        "| method | Reg DSC (%) | time per group (s) | time / X-CoReg | groups | kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        ratio = s["time_s"] / xcoreg if xcoreg and not math.isnan(xcoreg) else math.nan
        time_s = "" if s["method"] == "unregistered" else f"{s['time_s']:.3f}"
        ratio = "" if s["method"] == "unregistered" or math.isnan(ratio) else f"{ratio:.2f}"
        lines.append(
            f"| {s['method']} | {100 * s['reg_dsc']:.1f} ± {100 * s['std']:.1f} | {time_s} | "
            f"{ratio} | {s['groups']} | {s['kept']} |"
        )
    text = "\n".join(lines) + "\n"
    Path(f"{out}.md").write_text(text, encoding="utf-8")
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.ckpt)
    dataset, indices, settings = test_groups(model, args)
    settings["strategy"] = model.strategy_name
    methods = ["unregistered", "network", *(f"network + refine {n}" for n in args.steps)]
    methods += [] if args.no_xcoreg else ["X-CoReg"]
    out, rows, start = Path(args.out), [], time.perf_counter()
    refine = {"lr": args.refine_lr, "ffd_spacing": args.refine_spacing}
    for index in tqdm(indices, desc="groups"):
        item = dataset[index]
        for method, dsc, seconds, kept in evaluate_group(
            model, item, args.steps, methods, **refine
        ):
            rows.append({"case": item["case"], "index": index, "method": method,
                         "reg_dsc": dsc, "time_s": seconds, "refine_kept": kept})
        text = write(out, rows, methods, args, settings, time.perf_counter() - start)
    print(text)
    print(f"wrote {Path(f'{out}.md')} and {Path(f'{out}.csv')}")


if __name__ == "__main__":
    main()
