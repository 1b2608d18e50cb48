"""Benchmark X-CoReg on the 2D brain phantom (paper Sec. 4.1): gWI, Dice, time and memory.

For every group size N and every method, ``--cases`` seeded random B-spline misalignments of
the phantom (T1/T2/PD, noisy realisations for N > 3) are registered with the named preset.
The misalignments are cubic B-spline FFDs of 40 mm control spacing with control displacements
of std 5.4 mm (gWI about 3 mm); ``--spacing 20 --std 5.5`` gives a rougher field of the same gWI.
Reported per (N, method), as mean +- std over the cases: the groupwise warping index (Eq. 49)
before/after, the mean pairwise Dice of the tissue labels warped with nearest neighbour
before/after, seconds per iteration, and the peak resident memory of the method's process
(each method runs in its own process when several are named, ``--workers`` at a time); and per
N the paper's Table 2
comparison (:mod:`dcc.evaluation.comparison`): every method's gWI against X-CoReg's on the
same misalignments (paired t-test), and its time and memory ratios. Each trial registers with
its own seed (Gamma^[0] of Eq. 22 and the coordinate samples; ``--engine-seed`` fixes one for
all): with one seed for every trial the whole table shares one random start (X-CoReg's mean
gWI over 12 misalignments moved by up to 0.03 mm from one seed to another).
Results go to ``--out``: ``<tag>.json``, ``<tag>.md``, ``<tag>_gwi.png`` (box plot) and
``<tag>_montage.png`` (the first case of the first method).

Not part of the test suite. Examples::

    python bench/bench_phantom.py --cases 20 --groups 3 10 30 --methods xcoreg xcoreg-gt \\
        --preset brain2d --out bench/results
    python bench/bench_phantom.py --cases 50 --groups 3 --methods xcoreg xcoreg-gt cte ape gmm \\
        --threads 1 --workers 2 --tag table2 --out results/phantom_table2
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dcc.coreg import XCoReg, load_preset  # noqa: E402
from dcc.coreg.config import METHODS  # noqa: E402
from dcc.data.misalignment import phantom_group, warp_images  # noqa: E402
from dcc.data.phantom import brain_phantom  # noqa: E402
from dcc.evaluation.comparison import (  # noqa: E402
    compare_methods,
    comparison_markdown,
    write_experiment,
)
from dcc.evaluation.figures import save_montage  # noqa: E402
from dcc.evaluation.processes import run_method_workers  # noqa: E402
from dcc.evaluation.runs import mean_std  # noqa: E402
from dcc.metrics import (  # noqa: E402
    pairwise_dice,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases",
        type=int,
        nargs="+",
        default=[20],
        help="misalignments per group size (one value, or one per --groups entry)",
    )
    p.add_argument("--groups", type=int, nargs="+", default=[3, 10, 30], help="group sizes N")
    p.add_argument(
        "--methods", nargs="+", default=["xcoreg", "xcoreg-gt"], choices=METHODS,
        help="xcoreg, xcoreg-gt, or the competing metrics cte, ape, gmm, cg, vi (README)",
    )
    p.add_argument("--preset", default="brain2d")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="phantom", help="file name stem of the results")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process (peak memory is then the largest "
                   "so far, not per method)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # records of one method
    p.add_argument(
        "--std",
        type=float,
        default=5.4,
        help="std of the misaligning FFD control displacements, mm (5.4 at 40 mm: gWI ~3 mm)",
    )
    p.add_argument(
        "--spacing", type=float, default=40.0, help="control spacing of the misaligning FFD, mm"
    )
    p.add_argument(
        "--iterations", type=int, default=None, help="override the iterations of every preset stage"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the misalignments")
    p.add_argument("--engine-seed", type=int, default=None,
                   help="the registration's seed (Gamma^[0], coordinate samples) for every "
                   "trial (default: each trial its own, its misalignment's seed, so that the "
                   "table averages over the random start as well)")
    p.add_argument("--workers", type=int, default=1,
                   help="methods registered in parallel (one process each)")
    p.add_argument("--bending-weight", type=float, default=None, help="override lambda")
    p.add_argument("--lr", type=float, default=None, help="override the Adam step of every stage")
    p.add_argument("--lr-final", type=float, default=None,
                   help="override the final step fraction (cosine decay) of every preset stage")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 cases, N = 3 and 10, 100 iterations"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.groups, args.iterations = [2], [3, 10], args.iterations or 100
    if len(args.cases) == 1:
        args.cases = args.cases * len(args.groups)
    if len(args.cases) != len(args.groups):
        p.error("--cases needs one value or one per --groups entry")
    return args


def make_config(args, method, seed=None):
    cfg = load_preset(
        args.preset, method=method, progress=False, bending_weight=args.bending_weight
    )
    if seed is not None:
        cfg.seed = seed
    for stage in cfg.stages:
        stage.iterations = args.iterations or stage.iterations
        stage.lr_final = args.lr_final or stage.lr_final
        stage.lr = args.lr or stage.lr
    return cfg


def run_case(args, phantom, n, case, method):
    seed = args.seed * 100_003 + n * 1_009 + case
    group = phantom_group(n, phantom, args.spacing, args.std, seed=seed)
    images, labels, grid = group.images, group.labels, group.grid
    cfg = make_config(args, method, seed if args.engine_seed is None else args.engine_seed)
    result = XCoReg(cfg).register(images, grid, labels=labels)
    iterations = sum(s.iterations for s in result.stages)
    labels_after = warp_images(labels, grid, result.transform, mode="nearest")
    record = {
        "N": n,
        "case": case,
        "method": method,
        "engine_seed": cfg.seed,
        "gwi_before": group.warping_index(),
        "gwi_after": group.warping_index(result.transform),
        "dice_before": pairwise_dice(labels)["mean"],
        "dice_after": pairwise_dice(labels_after)["mean"],
        "iterations": iterations,
        "seconds": result.seconds,
        "seconds_per_iteration": result.seconds / max(iterations, 1),
        "x_metric": result.x_metric,
        "restarts": sum(s["restarts"] for s in result.diagnostics["stages"]),
        "stages_rejected": sum(not s["accepted"] for s in result.diagnostics["stages"]),
        "mean_displacement_mm": result.diagnostics.get("mean_displacement_mm"),
    }
    example = (images, warp_images(images, grid, result.transform), result.posterior, labels_after)
    return record, example


def summarise(records):
    rows = []
    keys = sorted({(r["N"], r["method"]) for r in records})
    for n, method in keys:
        sel = [r for r in records if r["N"] == n and r["method"] == method]

        def stat(field, sel=sel):
            vals = [r[field] for r in sel]
            return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

        row = {"N": n, "method": method, "cases": len(sel)}
        for field in (
            "gwi_before",
            "gwi_after",
            "dice_before",
            "dice_after",
            "seconds_per_iteration",
            "iterations",
        ):
            row[field], row[field + "_std"] = stat(field)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in sel)
        rows.append(row)
    return rows


def print_table(rows):
    head = (
        f"{'N':>3} {'method':<10} {'cases':>5} {'gWI before (mm)':>16} {'gWI after (mm)':>16} "
        f"{'Dice before':>13} {'Dice after':>13} {'s/iter':>7} {'iters':>6} {'RSS MB':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['N']:>3} {r['method']:<10} {r['cases']:>5} "
            f"{r['gwi_before']:>7.3f} ± {r['gwi_before_std']:<6.3f} "
            f"{r['gwi_after']:>7.3f} ± {r['gwi_after_std']:<6.3f} "
            f"{r['dice_before']:>6.3f} ± {r['dice_before_std']:<4.3f} "
            f"{r['dice_after']:>6.3f} ± {r['dice_after_std']:<4.3f} "
            f"{r['seconds_per_iteration']:>7.4f} {r['iterations']:>6.0f} {r['peak_rss_mb']:>7.0f}"
        )


def boxplot(records, rows, path):
    fig, ax = plt.subplots(figsize=(2.4 + 1.1 * len(rows), 4))
    data, ticks = [], []
    for r in rows:
        sel = [x for x in records if x["N"] == r["N"] and x["method"] == r["method"]]
        if not ticks or not ticks[-1].startswith(f"N={r['N']}\n"):  # once per group size
            data.append([x["gwi_before"] for x in sel])
            ticks.append(f"N={r['N']}\nbefore")
        data.append([x["gwi_after"] for x in sel])
        ticks.append(f"N={r['N']}\n{NAMES.get(r['method'], r['method'])}")
    ax.boxplot(data)
    ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("gWI (mm, log scale)")
    ax.set_title("Brain phantom: groupwise warping index before / after registration")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NAMES = {"xcoreg": "X-Reg-UN", "xcoreg-gt": "X-Reg-GT", "cte": "CTE", "ape": "APE",
         "gmm": "GMM", "cg": "CG", "vi": "VI"}


def run_methods(args, methods) -> tuple[list[dict], tuple | None]:
    """Every case of every group size with ``methods``, in this process."""
    records, example = [], None
    total = sum(args.cases) * len(methods)
    with tqdm(total=total, desc="bench", disable=args.worker is not None) as bar:
        for n, cases in zip(args.groups, args.cases, strict=True):
            phantom = brain_phantom(dim=2, realisations=math.ceil(n / 3))
            for method in methods:
                for case in range(cases):
                    record, ex = run_case(args, phantom, n, case, method)
                    record["trial"] = f"N{n}-{case}"
                    record["peak_rss_mb"] = (
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                    records.append(record)
                    if example is None:
                        example = (phantom.names[:n], *ex)
                    bar.set_postfix(N=n, method=method, gwi=f"{record['gwi_after']:.3f}")
                    bar.update(1)
    return records, example


def run_isolated(args, argv) -> list[dict]:
    """Each method in its own process (this script with ``--worker``), so that its peak
    resident memory is its own; records carry that process' peak."""
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_phantom_") as tmp:
        for _, path, _, rss in run_method_workers(__file__, argv, args.methods, tmp,
                                                  name="bench_phantom", workers=args.workers):
            records += [record | {"peak_rss_mb": rss}
                        for record in json.loads(path.read_text(encoding="utf-8"))]
    return records


def table2(records, args) -> tuple[dict, str]:
    """Per group size: :func:`compare_methods` of gWI against X-Reg-UN (or the first method)
    and its Markdown."""
    tables, parts = {}, []
    reference = "xcoreg" if "xcoreg" in args.methods else args.methods[0]
    for n in args.groups:
        sel = [r for r in records if r["N"] == n]
        rows = compare_methods(sel, "gwi_after", reference=reference, baseline="gwi_before")
        dice = {r["method"]: r for r in compare_methods(sel, "dice_after", reference=reference,
                                                        higher_is_better=True)}
        for row in rows:
            row["dice_mean"], row["dice_std"] = dice[row["method"]]["mean"], dice[
                row["method"]]["std"]
        tables[f"N={n}"] = rows
        before = mean_std([r["gwi_before"] for r in sel if r["method"] == reference])
        parts.append(
            f"### N = {n}: gWI (mm), {before[2]} misalignments, before {before[0]:.3f} ± "
            f"{before[1]:.3f} mm\n\n" + comparison_markdown(rows, "gWI (mm)", names=NAMES,
                                                         reference=reference)
            + "\nPairwise Dice of the warped tissue labels after: " + ", ".join(
                f"{NAMES.get(r['method'], r['method'])} {r['dice_mean']:.3f} ± "
                f"{r['dice_std']:.3f}" for r in rows) + ".\n")
    return tables, "\n".join(parts)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        records, example = run_methods(args, args.methods)
        args.worker.write_text(json.dumps(records), encoding="utf-8")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    example = None
    if len(args.methods) > 1 and not args.in_process:
        records = run_isolated(args, argv)
    else:
        records, example = run_methods(args, args.methods)
    rows = summarise(records)
    print_table(rows)
    tables, comparison = table2(records, args)
    print(comparison)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["wall_seconds"] = time.perf_counter() - start
    meta["torch_threads"] = torch.get_num_threads()
    meta["command"] = "python bench/bench_phantom.py " + " ".join(argv)
    meta["preset"] = asdict(make_config(args, args.methods[0])) | {"method": "(each)"}
    tables["summary"] = rows
    text = (
        f"# Brain phantom, nonrigid groupwise registration (paper Table 2 analogue)\n\n"
        f"`{meta['command']}`\n\n"
        f"Misalignments: cubic B-spline FFDs, {args.spacing:g} mm control spacing, control "
        f"displacements of std {args.std:g} mm; every method registers the same misalignments "
        f"with the `{args.preset}` preset (only the objective differs; budget: "
        + "; ".join(f"{st['name']} {st['iterations']} Adam steps over {st['levels']} level(s), "
                    f"step {st['lr']:g} -> x{st['lr_final']:g}" for st in meta["preset"]["stages"])
        + f", K = {meta['preset']['num_classes']}, L = {meta['preset']['bins']}, sample rate "
        f"{meta['preset']['sample_rate']:g}, lambda = {meta['preset']['bending_weight']:g}, "
        f"{meta['torch_threads']} torch thread(s); registration seed "
        + ("each trial its own, its misalignment's" if args.engine_seed is None
           else f"{args.engine_seed} for every trial")
        + "). Paired t-tests "
        f"against X-Reg-UN on the same misalignments (SciPy `ttest_rel`; verdict at p < 0.05); "
        f"time ratio = mean registration seconds / X-Reg-UN's; memory = peak RSS of the "
        f"method's process / X-Reg-UN's; wall {meta['wall_seconds'] / 60:.1f} min.\n\n"
        + comparison)
    write_experiment(args.out, args.tag, settings=meta, records=records, tables=tables,
                     markdown=text)
    boxplot(records, rows, args.out / f"{args.tag}_gwi.png")
    if example is None:  # isolated workers: redo the first case of the first method here
        phantom = brain_phantom(dim=2, realisations=math.ceil(args.groups[0] / 3))
        _, ex = run_case(args, phantom, args.groups[0], 0, args.methods[0])
        example = (phantom.names[: args.groups[0]], *ex)
    names, before, after, posterior, labels_after = example
    save_montage(
        args.out / f"{args.tag}_montage.png",
        before,
        after,
        posterior=posterior,
        names=names,
        labels_after=labels_after,
    )
    print(f"wrote {args.out}/{args.tag}.json, .md, _gwi.png, _montage.png")


if __name__ == "__main__":
    main()
