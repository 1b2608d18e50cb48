"""Benchmark: X-CoReg (``dcc-register``) on real multi-sequence cardiac MR groups (MyoPS 2020).

Every shared MyoPS patient, several seeds and two misalignment models, plus the aligned slices
(the ceiling that one label map for three sequences allows):

* ``smooth``: the mid-ventricular C0/LGE/T2 slice in a 224-voxel box, each sequence under its own
  rigid map (+-10 deg, +-6 mm) composed with a 45 mm B-spline FFD (std 4 mm), warped with real
  anatomy around the box (no padding). The model the earlier defaults were tuned on.
* ``dense``: the slice with the most labelled voxels in a 192-voxel box at the native spacing,
  each sequence under a rotation of up to +-10 deg, a shift of up to +-8 voxels and a smooth dense
  deformation of up to 7 voxels from a 5x5 cubic control grid, edges replicated (the model of the
  issue "X-CoReg that holds on groups it has never seen").
* ``aligned``: the ``dense`` slices without misalignment (Dice 1 before; what registration does
  to a group that needs nothing, and the ceiling of the Dice after registration).

Patients are split once: the ``tune`` patients (Case3001-3011 and Case3027, those every default
was chosen on) and the ``test`` patients (the other 23, never used to choose a setting). Each
group is registered by ``dcc-register --stages rigid,ffd --seed S`` with its defaults (plus the
options after ``--``) in a worker process with one torch thread, ``S`` the group's misalignment
seed (Gamma^[0] and the coordinate samples: the seeds do not share one random start;
``--engine-seed`` fixes one for all). Reported per split, model and seed: the
mean pairwise label Dice before/after, the worst group, the groups that end below their start,
the groups flagged by the per-image check, and seconds per group (``wall_time_s`` of
``report.json``, and the whole command).

    python bench/bench_myops.py --split tune --out results/myops_bench --tag main
    python bench/bench_myops.py --split test --seeds 0,1,2,3,4 --workers 2 --out results/myops_bench
    python bench/bench_myops.py --cases Case3012 --models dense --seeds 0 -- --iterations 100

``--methods`` (issue #23, experiment 4) registers the same groups with several methods of
``dcc-register --method``: X-CoReg and the competing groupwise metrics that apply to these
multimodal C0/LGE/T2 groups, ``cte``, ``ape`` and ``gmm`` (the same engine, stages, defaults and
budget; only the objective differs), and ``dcc`` (the trained network). ``cg`` and ``vi`` are
refused: congealing and the variance of intensities assume one intensity scale shared by the
images (monomodal series), which C0, LGE and T2 are not. Per method the table above, and a
paired comparison of the Dice after against X-CoReg on the same groups
(``dcc.evaluation.comparison``; "worse than start": below the unregistered Dice) in
``<tag>.md`` and ``<tag>_comparison.{md,json}``:

    python bench/bench_myops.py --split test --models smooth,dense --seeds 0 \
        --methods xcoreg cte ape gmm --workers 1 --out results/myops_methods --tag methods

Data: ``$DCC_DATA_ROOT/myops2020`` (MyoPS 2020 training set; X. Zhuang, TPAMI 2019).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dcc.cli.register import main as dcc_register
from dcc.data.cardiac import LABEL_NAMES, data_root, myops_cases
from dcc.data.myops_groups import MODELS, TUNE_CASES, write_group
from dcc.evaluation.comparison import compare_methods, comparison_markdown, write_experiment
from dcc.evaluation.runs import cpu_name

# dcc-register --method values that apply to multimodal groups; cg and vi (one intensity scale)
# are refused with MONOMODAL's reason
METHODS = ("xcoreg", "cte", "ape", "gmm", "dcc")
MONOMODAL = ("cg", "vi")
NAMES = {"xcoreg": "X-CoReg", "cte": "CTE", "ape": "APE", "gmm": "GMM", "dcc": "DCC network"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=("tune", "test", "all"), default="all")
    p.add_argument("--cases", help="case names (Case3002,Case3010) instead of --split")
    p.add_argument("--models", default=",".join(MODELS), help=f"from {', '.join(MODELS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="misalignment seeds")
    p.add_argument("--seed", type=int, help="one seed (as --seeds S)")
    p.add_argument("--engine-seed", type=int, default=None,
                   help="dcc-register --seed of every group (default: the group's misalignment "
                   "seed)")
    p.add_argument("--workers", type=int, default=2, help="parallel groups (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--roi", type=float, help="heart ROI: the union of the misaligned labels "
                   "dilated by this many mm, given to dcc-register as --roi")
    p.add_argument("--preset", help="dcc-register preset (default: none, the data's defaults)")
    p.add_argument("--method", choices=("xcoreg", "dcc"), default=None,
                   help="dcc-register --method: X-CoReg (rigid,ffd) or the trained DCC network "
                   "(one method; as --methods M)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"several methods on the same groups, from {', '.join(METHODS)} "
                   "(the first is the reference of the comparison: xcoreg if given); "
                   f"{' and '.join(MONOMODAL)} assume one intensity scale and do not apply")
    p.add_argument("--checkpoint", help="--method dcc: a DCC checkpoint (default: the shipped)")
    p.add_argument("--out", default="results/myops_bench", help="folder for JSON, MD and PNG")
    p.add_argument("--tag", default="bench_myops", help="file name stem of the results")
    p.add_argument("--keep", help="keep each group's inputs and outputs in this folder")
    # the smooth model's parameters (dcc.data.myops_groups; their defaults are the package's)
    p.add_argument("--crop", type=int, default=224, help="smooth: box around the heart (voxels)")
    p.add_argument("--max-angle", type=float, default=10.0, help="smooth: rotation bound (deg)")
    p.add_argument("--max-offset", type=float, default=6.0, help="smooth: offset bound (mm)")
    p.add_argument("--ffd-spacing-truth", type=float, default=45.0, help="smooth: FFD (mm)")
    p.add_argument("--ffd-std-truth", type=float, default=4.0, help="smooth: FFD std (mm)")
    p.add_argument("--dense-crop", type=int, default=192, help="dense/aligned: box (voxels)")
    args, extra = p.parse_known_args(argv)
    args.extra = [a for a in extra if a != "--"]
    args.seed_list = [args.seed] if args.seed is not None else [
        int(s) for s in args.seeds.split(",") if s.strip()]
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.model_list) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    if args.method is not None and args.methods is not None:
        p.error("give --method or --methods, not both")
    methods = [w for m in (args.methods or [args.method or "xcoreg"]) for w in m.split(",") if w]
    mono = [m for m in methods if m in MONOMODAL]
    if mono:
        p.error(f"--methods: {', '.join(mono)} assume one intensity scale shared by the images "
                "(monomodal series) and do not apply to C0/LGE/T2 groups; use "
                f"{', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.methods = list(dict.fromkeys(methods))
    args.method = args.methods[0]
    return args, args.extra


# ---------------------------------------------------------------------- the groups
def group_settings(args) -> dict:
    """The misalignment models' settings (dcc.data.myops_groups.make_group) of the options."""
    return {"crop": args.crop, "dense_crop": args.dense_crop, "max_angle": args.max_angle,
            "max_offset": args.max_offset, "ffd_spacing": args.ffd_spacing_truth,
            "ffd_std": args.ffd_std_truth}


def run_group(task: dict) -> dict:
    """Write one group, register it with ``dcc-register`` in this process, read its report."""
    args = task["args"]
    args.seed = task["seed"]
    method = task.get("method", args.method)
    case_dir, model = Path(task["case_dir"]), task["model"]
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep) / f"{model}_seed{args.seed}" / case_dir.name
            if len(args.methods) > 1:
                work = work / method
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_myops.")))
        paths, label_paths, grid, disp = write_group(
            case_dir, task["index"], work, model, args.seed, args.roi, **group_settings(args)
        )
        out = work / "out"
        argv = [*paths, "--labels", *label_paths, "--out", str(out), "--overwrite", "--quiet"]
        engine_seed = args.seed if args.engine_seed is None else args.engine_seed
        argv += ["--threads", str(args.threads), "--seed", str(engine_seed), *args.extra]
        if method == "dcc":
            argv += ["--method", "dcc", *(["--checkpoint", args.checkpoint]
                                          if args.checkpoint else [])]
        else:
            argv += ["--stages", "rigid,ffd"]
            if method != "xcoreg":
                argv += ["--method", method]
        if args.preset:
            argv += ["--preset", args.preset]
        if args.roi:
            argv += ["--roi", str(work / "roi.nii.gz")]
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = dcc_register(argv)
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"{case_dir.name}: dcc-register failed ({code}): {log.getvalue()}")
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    before, after = report["dice_before"], report["dice_after"]
    return {
        "case": case_dir.name,
        "method": method,
        "split": "tune" if case_dir.name in TUNE_CASES else "test",
        "model": model,
        "seed": args.seed,
        "engine_seed": engine_seed,
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing),
        "mean_displacement_mm": disp,
        "dice_before": before["mean"],
        "dice_after": after["mean"],
        "per_label_after": {LABEL_NAMES[int(k)]: v for k, v in after["per_label"].items()},
        "x_metric": report["x_metric"],
        "registration_s": report.get("wall_time_s", report.get("inference_s")),
        "seconds": seconds,
        "warnings": report.get("warnings", []) + report.get("notes", []),
        "diagnostics": report.get("diagnostics"),
        "settings": report.get("settings") or {"method": "dcc", **report["model"],
                                               "checkpoint": report["checkpoint"]},
    }


# ---------------------------------------------------------------------- summary
def summarise(rows: list[dict]) -> dict:
    before = [r["dice_before"] for r in rows]
    after = [r["dice_after"] for r in rows]
    worse = [r for r in rows if r["dice_after"] < r["dice_before"] - 1e-6]
    flagged = [r for r in rows if r["warnings"]]
    worst = min(rows, key=lambda r: r["dice_after"])
    return {
        "groups": len(rows),
        "dice_before": statistics.fmean(before),
        "dice_after": statistics.fmean(after),
        "worst_after": worst["dice_after"],
        "worst_group": f"{worst['case']} seed {worst['seed']}",
        "below_start": len(worse),
        "below_start_groups": [f"{r['case']} s{r['seed']} {r['dice_before']:.2f}->"
                               f"{r['dice_after']:.2f}" for r in worse],
        "flagged": len(flagged),
        "flagged_below_start": sum(bool(r["warnings"]) for r in worse),
        "registration_s": statistics.fmean(r["registration_s"] for r in rows),
        "seconds": statistics.fmean(r["seconds"] for r in rows),
    }


def table(results: list[dict]) -> tuple[str, dict]:
    """Markdown table per split and model (with the seed-to-seed spread of the mean), and per
    method when there are several (a method column; summaries keyed ``split/model/method``)."""
    methods = list(dict.fromkeys(r.get("method", "xcoreg") for r in results))
    many = len(methods) > 1
    lines = [
        "| split | model | " + ("method | " if many else "") + "groups | Dice before | "
        "Dice after | seed means (spread) | worst group | below start | flagged (of them below "
        "start) | s/group (registration) |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if many else ""),
    ]
    summaries = {}
    groups = [(a, b, c) for a in ("tune", "test") for b in MODELS for c in methods]
    for split, model, method in groups:
        rows = [r for r in results if r["split"] == split and r["model"] == model
                and r.get("method", "xcoreg") == method]
        if not rows:
            continue
        s = summarise(rows)
        seeds = sorted({r["seed"] for r in rows})
        means = [statistics.fmean(r["dice_after"] for r in rows if r["seed"] == k)
                 for k in seeds]
        s["seed_means"] = means
        s["seed_spread"] = max(means) - min(means)
        summaries[f"{split}/{model}" + (f"/{method}" if many else "")] = s
        lines.append(
            f"| {split} | {model} | " + (f"{method} | " if many else "")
            + f"{s['groups']} | {s['dice_before']:.3f} | "
            f"**{s['dice_after']:.3f}** | {' '.join(f'{m:.3f}' for m in means)} "
            f"({s['seed_spread']:.3f}) | {s['worst_after']:.3f} ({s['worst_group']}) | "
            f"{s['below_start']} | {s['flagged']} ({s['flagged_below_start']}) | "
            f"{s['seconds']:.1f} ({s['registration_s']:.2f}) |"
        )
    return "\n".join(lines), summaries


def plot(results: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    models = [m for m in MODELS if any(r["model"] == m for r in results)]
    fig = Figure(figsize=(4.2 * len(models), 4))
    axes = np.atleast_1d(fig.subplots(1, len(models)))
    methods = list(dict.fromkeys(r.get("method", "xcoreg") for r in results))
    if len(methods) > 1:  # one colour per method
        sets = [(NAMES.get(m, m), f"C{i}", lambda r, m=m: r.get("method") == m)
                for i, m in enumerate(methods)]
    else:  # one per split
        sets = [(s, c, lambda r, s=s: r["split"] == s)
                for s, c in (("tune", "tab:orange"), ("test", "tab:blue"))]
    for ax, model in zip(axes, models, strict=True):
        for name, colour, keep in sets:
            rows = [r for r in results if r["model"] == model and keep(r)]
            ax.scatter([r["dice_before"] for r in rows], [r["dice_after"] for r in rows], s=10,
                       color=colour, alpha=0.7, label=f"{name} ({len(rows)})")
            flagged = [r for r in rows if r["warnings"]]
            ax.scatter([r["dice_before"] for r in flagged], [r["dice_after"] for r in flagged],
                       s=40, facecolors="none", edgecolors="k", lw=0.8)
        ax.plot([0.3, 1], [0.3, 1], color="0.6", lw=0.8, ls="--")
        ax.set_xlim(0.3, 1.01)
        ax.set_ylim(0.3, 1.01)
        ax.set_xlabel("Dice before")
        ax.set_ylabel("Dice after")
        ax.set_title(f"{model} (circled: flagged)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def main(argv=None) -> int:
    args, _ = parse_args(argv)
    root = data_root()
    if root is None or not (root / "myops2020").is_dir():
        print("bench_myops: MyoPS data not found; set DCC_DATA_ROOT", file=sys.stderr)
        return 2
    cases = list(enumerate(myops_cases(root)))  # a case keeps its index: it seeds the warp
    if args.cases:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = set(names) - {c.name for _, c in cases}
        if unknown:
            print(f"bench_myops: unknown cases {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        cases = [(i, c) for i, c in cases if c.name in names]
    elif args.split != "all":
        cases = [(i, c) for i, c in cases if (c.name in TUNE_CASES) == (args.split == "tune")]
    tasks = [  # the methods of one group one after the other: under the same load
        {"args": args, "model": model, "seed": seed, "index": i, "case_dir": str(c),
         "method": method}
        for model in args.model_list
        for seed in (args.seed_list if model != "aligned" else args.seed_list[:1])
        for i, c in cases
        for method in args.methods
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(context.Pool(args.workers, _init_worker, (args.threads,)))
            groups = pool.imap_unordered(run_group, tasks)
        else:  # in this process (no pickling: also when imported from a file path)
            _init_worker(args.threads)
            groups = map(run_group, tasks)
        for r in tqdm(groups, total=len(tasks), desc="MyoPS"):
            results.append(r)
            flag = f"  FLAGGED: {'; '.join(r['warnings'])}" if r["warnings"] else ""
            tqdm.write(f"{r['model']:>7} s{r['seed']} {r['case']}"
                       + (f" {r['method']}" if len(args.methods) > 1 else "")
                       + f": {r['dice_before']:.3f} -> "
                       f"{r['dice_after']:.3f} ({r['registration_s']:.2f} s){flag}")
    order = {m: i for i, m in enumerate(args.methods)}
    results.sort(key=lambda r: (r["model"], r["seed"], r["case"], order[r["method"]]))
    md, summaries = table(results)
    print(md)
    settings_by_method = {}
    for r in results:
        settings_by_method.setdefault(r["method"], r["settings"])
        r.pop("settings")
    settings = settings_by_method.get(args.methods[0], {})
    comparison, tables = "", {}
    if len(args.methods) > 1:
        comparison, tables = compare(results, args.methods)
        print(comparison)
    command = ("python bench/bench_myops.py "
               f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    header = (
        f"# MyoPS bench `{args.tag}`\n\nCommand: `{command}`\n\n"
        f"Hardware: {_hardware()}; {args.workers} worker(s) x {args.threads} torch thread(s); "
        f"{len(results)} groups in {time.perf_counter() - started:.0f} s.\n\n"
        f"Budget per group: {budget(settings)}.\n\n"
        "Registration seed: " + ("each group its misalignment's" if args.engine_seed is None
                                 else f"{args.engine_seed} for every group") + ".\n\n"
        + (f"Methods: {', '.join(args.methods)} (`dcc-register --method`; same stages, "
           "defaults and budget, only the objective differs). cg and vi do not apply: they "
           "assume one intensity scale shared by the images (monomodal), and C0/LGE/T2 have "
           "three.\n\n" if len(args.methods) > 1 else "")
        + f"Splits: tune = {', '.join(TUNE_CASES)}; test = the other shared patients.\n\n"
    )
    (out / f"{args.tag}.md").write_text(header + md + "\n\n" + comparison, encoding="utf-8")
    payload = {"args": {k: v for k, v in vars(args).items()}, "settings": settings,
               "settings_by_method": settings_by_method, "summaries": summaries,
               "groups": results}
    (out / f"{args.tag}.json").write_text(json.dumps(payload, indent=2, default=str),
                                         encoding="utf-8")
    plot(results, out / f"{args.tag}.png", f"MyoPS bench {args.tag}")
    written = f"{out / args.tag}.{{md,json,png}}"
    if comparison:
        write_experiment(out, f"{args.tag}_comparison", records=results, tables=tables,
                         settings={"command": command, "methods": args.methods,
                                   "models": args.model_list, "seeds": args.seed_list,
                                   "workers": args.workers, "threads": args.threads,
                                   "settings_by_method": settings_by_method},
                         markdown=header + comparison)
        written += f", {out / args.tag}_comparison.{{md,json}}"
    print(f"bench_myops: wrote {written}")
    return 0


def compare(results: list[dict], methods: list[str]) -> tuple[str, dict]:
    """Per misalignment model: :func:`compare_methods` of the mean pairwise Dice after against
    X-CoReg (or the first method) on the same groups (trial = case and seed), higher better,
    "worse than start" counted against the Dice before; Markdown and the rows by model."""
    reference = "xcoreg" if "xcoreg" in methods else methods[0]
    tables, parts = {}, ["## Methods against " + NAMES.get(reference, reference), "",
                         "Paired t-test of the mean pairwise label Dice after registration on "
                         "the same groups (SciPy `ttest_rel`; verdict at p < 0.05); worse than "
                         "start: groups that end below their unregistered Dice; s / trial: the "
                         "whole `dcc-register` command per group; time ratio to "
                         f"{NAMES.get(reference, reference)}'s.", ""]
    for model in MODELS:
        sel = [{**r, "trial": f"{r['case']} s{r['seed']}"} for r in results
               if r["model"] == model]
        if not sel:
            continue
        rows = compare_methods(sel, "dice_after", reference=reference, higher_is_better=True,
                               baseline="dice_before")
        for row in rows:
            mine = [r for r in sel if r["method"] == row["method"]]
            worst = min(mine, key=lambda r: r["dice_after"])
            row["worst_group"] = f"{worst['case']} seed {worst['seed']}"
        tables[model] = rows
        before = statistics.fmean(r["dice_before"] for r in sel if r["method"] == reference)
        parts += [f"### {model}: mean pairwise Dice (myocardium, LV, RV), before {before:.3f}",
                  "", comparison_markdown(rows, "Dice after", names=NAMES,
                                          reference=reference).rstrip(), "",
                  "Worst group: " + ", ".join(
                      f"{NAMES.get(r['method'], r['method'])} {r['min']:.3f} ({r['worst_group']})"
                      for r in rows) + ".", ""]
    return "\n".join(parts) + "\n", tables


def budget(settings: dict) -> str:
    """The registration work per group, from the settings in ``report.json``."""
    if settings.get("method") == "dcc":
        net = settings.get("net") or {}
        return (f"one forward pass of the DCC network (C = {net.get('channels')}, "
                f"L_R = {net.get('levels')}) at {settings.get('spacing')} mm, "
                f"{Path(str(settings.get('checkpoint'))).name}")
    stages = ", ".join(
        f"{s['name']} {s['iterations']} steps over {s['levels']} level(s)"
        for s in settings.get("stages", [])
    )
    return f"K = {settings.get('num_classes')}, L = {settings.get('bins')}, {stages}"


def _hardware() -> str:
    return f"{cpu_name()}, {multiprocessing.cpu_count()} logical CPUs, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
