"""Benchmark: X-CoReg on real multi-sequence cardiac MR (MyoPS 2020) under known misalignments.

For each patient the mid-ventricular C0 / LGE / T2 slice (a 224-voxel box around the heart) is
taken with its manual labels merged to myocardium / LV / RV. Each sequence gets its own random
rigid map (+-10 deg, +-6 mm) composed with a smooth B-spline deformation of a few mm; images
(bilinear) and labels (nearest) are warped, written as NIfTI into a temporary folder and
registered with ``dcc-register --stages rigid,ffd``. Reported: mean pairwise Dice of the warped
labels (labels 1-3) before and after registration, per label, and seconds per case.

    python bench/bench_myops.py --out bench/results
    python bench/bench_myops.py --cases 5 --out bench/results/try -- --iterations 300

Arguments after ``--`` (or any unknown option) are passed on to ``dcc-register``, e.g.
``--iterations``, ``--levels``, ``--ffd-spacing``, ``--lr``, ``-K``, ``--sample-rate``.

Data: ``$DCC_DATA_ROOT/myops2020`` (MyoPS 2020 training set; X. Zhuang, TPAMI 2019).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcc.cli.register import main as dcc_register
from dcc.data.cardiac import (
    LABEL_NAMES,
    MYOPS_SEQUENCES,
    crop_grid,
    data_root,
    load_myops_slices,
    myops_cases,
)
from dcc.data.io import write_image
from dcc.data.misalign import random_ffd, random_rigid, warp_images
from dcc.spatial.transforms import ComposedTransform

MARGIN = 48  # voxels of real anatomy around the crop box while warping (> max displacement)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases",
        default="all",
        help="'all', the number of patients (first N), or case names (Case3002,Case3010)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the misalignments")
    p.add_argument(
        "--preset", default="cardiac2d", help="dcc-register preset ('none': picked from the data)"
    )
    p.add_argument("--out", default="bench/results", help="folder for JSON, PNG and montage")
    p.add_argument("--quick", action="store_true", help="3 cases (unless --cases is given)")
    p.add_argument(
        "--crop",
        type=int,
        default=224,
        help="box around the heart (voxels; 224 = about 165 mm). A tight 160 box (117 mm) lets "
        "large hearts fill the view, and the registration then fails more often",
    )
    p.add_argument("--max-angle", type=float, default=10.0, help="rigid rotation bound (deg)")
    p.add_argument("--max-offset", type=float, default=6.0, help="rigid offset bound (mm)")
    p.add_argument("--ffd-spacing-truth", type=float, default=45.0, help="misalignment FFD (mm)")
    p.add_argument(
        "--ffd-std-truth",
        type=float,
        default=4.0,
        help="std of the misalignment FFD coefficients (mm); 4 mm at 45 mm spacing gives "
        "displacements of about 2.3 mm on average, up to about 6 mm",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared CPU, intra-op threads that wait for busy "
        "cores make each step 10-20x slower)",
    )
    p.add_argument("--keep", help="keep the per-case inputs/outputs in this folder")
    p.add_argument("--tag", default="bench_myops", help="file name stem of the results")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    args.names = None
    if args.cases == "all":
        args.n_cases = 3 if args.quick else None
    elif args.cases.lower().startswith("case"):
        args.n_cases, args.names = None, [c.strip() for c in args.cases.split(",") if c.strip()]
    else:
        try:
            args.n_cases = int(args.cases)
        except ValueError:
            p.error(f"--cases: expected 'all' or a number, got {args.cases!r}")
    return args, extra


def misalign(case_dir: Path, seed: int, args):
    """The case's slices under its own rigid o FFD per sequence, on the ``crop`` box.

    The truth maps are defined on the ``crop x crop`` box around the heart, but the images are
    warped on a box ``MARGIN`` voxels larger on each side and then cut to the crop box, so the
    misaligned inputs hold real anatomy everywhere (no zero-padded corners, which would be a
    spurious feature for the registration). Returns images, labels, grid, mean displacement.
    """
    big_images, big_labels, big_grid = load_myops_slices(case_dir, crop=args.crop + 2 * MARGIN)
    h, w = big_grid.shape
    m = MARGIN if min(h, w) >= args.crop + 2 * MARGIN else 0
    grid = crop_grid(big_grid, m, m, min(args.crop, h), min(args.crop, w))
    box = (slice(None), slice(m, m + grid.shape[0]), slice(m, m + grid.shape[1]))
    n = big_images.shape[0]
    rigid = random_rigid(n, grid, args.max_angle, args.max_offset, seed=2 * seed)
    ffd = random_ffd(n, grid, args.ffd_spacing_truth, args.ffd_std_truth, seed=2 * seed + 1)
    truth = ComposedTransform(n, grid.ndim, [rigid, ffd])
    with torch.no_grad():
        displacement = (truth.lattice(grid) - grid.points()).norm(dim=-1)
    return (
        warp_images(big_images, big_grid, truth)[box],
        warp_images(big_labels, big_grid, truth, mode="nearest")[box],
        grid,
        float(displacement.mean()),
    )


def write_group(case_dir: Path, index: int, folder: Path, args):
    """The misaligned group of ``case_dir`` (:func:`misalign`, seeded by ``args.seed`` and the
    case's ``index``) as NIfTI files ``<folder>/<sequence>.nii.gz`` and
    ``<sequence>_labels.nii.gz``. Returns the image paths, the label paths, the grid and the
    mean displacement of the misalignment (mm)."""
    moved, moved_labels, grid, disp = misalign(case_dir, args.seed * 1000 + index, args)
    paths, label_paths = [], []
    for name, image, lab in zip(MYOPS_SEQUENCES, moved, moved_labels, strict=True):
        paths.append(str(folder / f"{name}.nii.gz"))
        label_paths.append(str(folder / f"{name}_labels.nii.gz"))
        write_image(paths[-1], image, grid)
        write_image(label_paths[-1], lab.to(torch.int32), grid)
    return paths, label_paths, grid, disp


def run_case(case_dir: Path, index: int, work: Path, args, extra) -> dict:
    folder = work / case_dir.name
    paths, label_paths, grid, disp = write_group(case_dir, index, folder, args)
    out = folder / "out"
    argv = [*paths, "--labels", *label_paths, "--out", str(out), "--overwrite", "--quiet"]
    argv += ["--stages", "rigid,ffd", *extra]
    if args.preset != "none":  # "none": dcc-register picks the settings from the data
        argv += ["--preset", args.preset]
    start = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = dcc_register(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{case_dir.name}: dcc-register failed ({code}): {log.getvalue()}")
    report = json.loads((out / "report.json").read_text())
    before, after = report["dice_before"], report["dice_after"]
    return {
        "case": case_dir.name,
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing),
        "mean_displacement_mm": disp,
        "dice_before": before["mean"],
        "dice_after": after["mean"],
        "per_label_before": {LABEL_NAMES[int(k)]: v for k, v in before["per_label"].items()},
        "per_label_after": {LABEL_NAMES[int(k)]: v for k, v in after["per_label"].items()},
        "x_metric": report["x_metric"],
        "registration_s": report["wall_time_s"],
        "seconds": seconds,
        "stages": report["stages"],
        "diagnostics": report.get("diagnostics"),
        "settings": report["settings"],
        "montage": str(out / "montage.png"),
    }


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict]) -> dict:
    summary = {"cases": len(results)}
    for key in ("dice_before", "dice_after", "seconds", "registration_s", "mean_displacement_mm"):
        summary[key] = mean_std([r[key] for r in results])
    for name in LABEL_NAMES.values():
        for when in ("before", "after"):
            summary[f"{name}_{when}"] = mean_std([r[f"per_label_{when}"][name] for r in results])
    summary["improved"] = sum(r["dice_after"] > r["dice_before"] for r in results)
    return summary


def table(summary: dict) -> str:
    def fmt(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    rows = [("mean (labels 1-3)", summary["dice_before"], summary["dice_after"])]
    rows += [
        (name, summary[f"{name}_before"], summary[f"{name}_after"]) for name in LABEL_NAMES.values()
    ]
    lines = [f"{'Dice':<20}{'before':>18}{'after':>18}", "-" * 56]
    lines += [f"{name:<20}{fmt(b):>18}{fmt(a):>18}" for name, b, a in rows]
    lines += [
        "-" * 56,
        f"cases {summary['cases']}, improved {summary['improved']}; "
        f"seconds per case {fmt(summary['seconds'], 1)} "
        f"(registration {fmt(summary['registration_s'], 1)}); "
        f"true mean displacement {fmt(summary['mean_displacement_mm'], 2)} mm",
    ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.28 * len(results) + 2), 3.6))
    ax = fig.subplots()
    x = range(len(results))
    before = [r["dice_before"] for r in results]
    after = [r["dice_after"] for r in results]
    ax.vlines(list(x), before, after, color="0.7", lw=1)
    ax.plot(list(x), before, "o", color="tab:red", label="before")
    ax.plot(list(x), after, "o", color="tab:blue", label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["case"].replace("Case", "") for r in results], rotation=90, fontsize=7)
    ax.set_ylabel("mean pairwise Dice (labels 1-3)")
    ax.set_ylim(min(before + after + [0.6]) - 0.02, 1.0)
    ax.axhline(0.82, color="0.5", ls="--", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root()
    if root is None or not (root / "myops2020").is_dir():
        print("bench_myops: MyoPS data not found; set DCC_DATA_ROOT", file=sys.stderr)
        return 2
    # a case keeps its index in the full list (it seeds the case's misalignment)
    cases = list(enumerate(myops_cases(root)))[: args.n_cases]
    if args.names is not None:
        unknown = set(args.names) - {c.name for _, c in cases}
        if unknown:
            print(f"bench_myops: unknown cases {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        cases = [(i, c) for i, c in cases if c.name in args.names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_myops.")))
        for index, case_dir in tqdm(cases, desc="MyoPS", unit="case"):
            r = run_case(case_dir, index, work, args, extra)
            results.append(r)
            partial = [{k: v for k, v in x.items() if k != "montage"} for x in results]
            (out / f"{args.tag}.partial.json").write_text(json.dumps(partial, indent=2))
            tqdm.write(
                f"{r['case']}: Dice {r['dice_before']:.3f} -> {r['dice_after']:.3f} "
                + " ".join(
                    f"{n} {r['per_label_before'][n]:.2f}->{r['per_label_after'][n]:.2f}"
                    for n in LABEL_NAMES.values()
                )
                + f"  ({r['seconds']:.1f} s)"
            )
        # montage of the case closest to the median Dice after registration
        median = sorted(results, key=lambda r: r["dice_after"])[len(results) // 2]
        shutil.copy(median["montage"], out / f"{args.tag}_montage_{median['case']}.png")
    summary = summarise(results)
    print(table(summary))
    for r in results:
        r.pop("montage")
    settings = results[0]["settings"] if results else {}
    payload = {
        "benchmark": "MyoPS 2020 C0/LGE/T2 mid-ventricular slices, known rigid+FFD misalignment",
        "data_root": str(root),
        "preset": args.preset,
        "dcc_register_extra_args": extra,
        "misalignment": {
            "max_angle_deg": args.max_angle,
            "max_offset_mm": args.max_offset,
            "ffd_spacing_mm": args.ffd_spacing_truth,
            "ffd_std_mm": args.ffd_std_truth,
            "seed": args.seed,
        },
        "crop": args.crop,
        "settings": settings,
        "summary": summary,
        "cases": [{k: v for k, v in r.items() if k != "settings"} for r in results],
    }
    (out / f"{args.tag}.json").write_text(json.dumps(payload, indent=2))
    title = (
        f"MyoPS C0/LGE/T2, {len(results)} cases: Dice {summary['dice_before'][0]:.3f} -> "
        f"{summary['dice_after'][0]:.3f} ({args.preset} {' '.join(extra)})"
    )
    plot(results, out / f"{args.tag}_dice.png", title)
    print(f"bench_myops: wrote {out / (args.tag + '.json')} and {args.tag}_dice.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
