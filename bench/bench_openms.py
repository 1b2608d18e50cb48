"""Benchmark real 3D rigid multimodal groupwise registration on the open-MS studies (issue #22):
the paper's RIRE protocol (Sec. 4.2.1, gRE of Eqs. 51-52) with dcc-register and SimpleITK.

Per study (``$DCC_DATA_ROOT/open_ms/<study>``) and trial: FLAIR, T1W and T2W are brought onto
the FLAIR grid with the data set's reference transforms (:func:`dcc.data.open_ms.load_study`),
each image is misaligned by an independent random rigid map (rotation about the volume centre,
angles uniform in +-15 deg per axis, offsets uniform in +-20 mm per axis; trial ``k`` uses the
seed ``--seed + k`` for every study) and the three misaligned images are written as NIfTI. Then

* X-CoReg: ``dcc-register FLAIR T1W T2W --stages translation,rigid --threads T --seed S`` with
  its defaults otherwise (arguments after ``--`` are passed on), each run in its own process and
  with the trial's seed ``S`` (Gamma^[0] of Eq. 22 and the coordinate samples: the trials do not
  share one random start; ``--engine-seed`` fixes one for all), recording its
  wall seconds and the peak resident memory of that process (``wait4``), and reading the
  recovered maps back from ``transforms/*.tfm``;
* SimpleITK (the external reference, in this process, ``--threads`` threads): pairwise rigid
  registration of T1W and of T2W onto FLAIR (Euler3D, Mattes MI with 50 bins on a random 10 %
  sample drawn with the trial's seed + 1, shrink 4/2/1 with smoothing 2/1/0 mm, regular-step
  gradient descent, geometry-centred initialisation); FLAIR's map is the identity, so the
  pairwise results form a group.

gRE (mm) at the 8 vertices of the FLAIR field of view is reported before and after each method.
``--methods`` adds the competing groupwise metrics of the same engine (``dcc-register --method
cte|ape|gmm``, the same stages and settings otherwise; the paper's Table 3), ``--classes K ...``
X-CoReg runs with ``-K K`` (the paper's Fig. 7: gRE against the number of classes). With more
than one method the Markdown holds the comparison of :mod:`dcc.evaluation.comparison`: gRE mean
± std, a paired t-test of every method against X-CoReg on the same trials, and its time and
memory ratios (SimpleITK runs in the bench's process: no memory of its own).
``--shrink F`` coarsens the FLAIR grid first (spacing at least F times the finest, the field of
view kept; :func:`dcc.data.open_ms.coarse_grid`), for quick runs. Output in ``--out``:
``<tag>.json`` (every row and the settings), ``<tag>.md`` (the table, hardware, command) and
``<tag>.png`` (middle slices before/after and the gRE per study). Not part of the test suite.
Examples::

    python bench/bench_openms.py --out results/openms_bench
    python bench/bench_openms.py --shrink 4 --out /tmp/openms -- --iterations 20
    python bench/bench_openms.py --skip-xcoreg --tag sitk_only --out results/openms_bench
    python bench/bench_openms.py --trials 25 --methods xcoreg cte ape gmm --tag table3 \\
        --out results/openms_table3
    python bench/bench_openms.py --trials 4 --skip-sitk --classes 2 4 6 8 12 16 --tag classes \\
        --out results/openms_table3
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from dcc.data.cardiac import required_data_root
from dcc.data.io import InputError, linear_group, read_linear_transforms, write_image
from dcc.data.open_ms import MAX_ANGLE, MAX_OFFSET, OpenMSStudy, find_studies, load_study
from dcc.evaluation.comparison import compare_methods, comparison_markdown
from dcc.evaluation.processes import run_measured
from dcc.evaluation.runs import hardware
from dcc.metrics import registration_error

PROG = "bench_openms"
STAGES = "translation,rigid"
# the methods that apply to a multimodal group without labels (cg and vi assume one intensity
# scale, xcoreg-gt needs label maps)
METHOD_CHOICES = ("xcoreg", "cte", "ape", "gmm")
NAMES = {"xcoreg": "X-CoReg", "cte": "CTE", "ape": "APE", "gmm": "GMM", "sitk": "SimpleITK"}


def runs(args) -> list[tuple[str, list[str]]]:
    """``(key, dcc-register options)`` of every dcc-register run of a trial."""
    out = [(m, [] if m == "xcoreg" else ["--method", m]) for m in args.methods]
    return out + [(f"xcoreg-K{k}", ["-K", str(k)]) for k in args.classes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to dcc-register (e.g. -- --iterations 20).",
    )
    p.add_argument("--studies", nargs="+", help="study folder names (default: all found)")
    p.add_argument("--trials", type=int, default=1, help="misalignments per study (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of trial 0 (trial k: seed + k)")
    p.add_argument("--engine-seed", type=int, default=None,
                   help="dcc-register --seed of every trial (default: each trial its own, the "
                   "seed of its misalignment)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads of dcc-register (--threads) and of SimpleITK (default 2)")
    p.add_argument("--shrink", type=float, default=1.0,
                   help="coarsen the FLAIR grid by this factor before misaligning (each "
                   "spacing at least F x the finest, same field of view; default 1: native)")
    p.add_argument("--skip-sitk", action="store_true", help="no SimpleITK reference")
    p.add_argument("--methods", nargs="+", default=["xcoreg"], choices=METHOD_CHOICES,
                   help="dcc-register --method of each run (default xcoreg)")
    p.add_argument("--classes", type=int, nargs="+", default=[],
                   help="also X-CoReg with -K K for each K (gRE against K, the paper's Fig. 7)")
    p.add_argument("--skip-xcoreg", action="store_true", help="no dcc-register runs")
    p.add_argument("--sitk-iterations", type=int, default=200,
                   help="SimpleITK: optimiser iterations per resolution level (default 200)")
    p.add_argument("--sitk-sampling", type=float, default=0.1,
                   help="SimpleITK: fraction of the fixed voxels sampled by the metric (0.1)")
    p.add_argument("--out", type=Path, default=Path("results/openms_bench"))
    p.add_argument("--tag", default="openms_bench", help="file name stem of the results")
    p.add_argument("--keep", type=Path,
                   help="keep each trial's misaligned images and dcc-register output here")
    p.add_argument("--rows", type=Path,
                   help="append every finished trial to this JSON-lines file, and take the "
                   "trials it already holds (same study and seed) from it instead of running "
                   "them (read again before each trial): an interrupted run resumes, and runs "
                   "in parallel processes (other studies, or later seeds: --seed S+k) share one "
                   "file that a last run over all studies and trials reports")
    args = p.parse_args(argv)
    args.extra = extra
    if args.trials < 1 or args.threads < 1 or args.shrink < 1 or args.sitk_iterations < 1:
        p.error("--trials, --threads, --sitk-iterations must be >= 1 and --shrink >= 1")
    if not 0 < args.sitk_sampling <= 1:
        p.error("--sitk-sampling must be in (0, 1]")
    if args.skip_sitk and args.skip_xcoreg:
        p.error("--skip-sitk and --skip-xcoreg: nothing left to run")
    if any(k < 2 for k in args.classes):
        p.error("--classes: K must be >= 2")
    return args


def study_folders(names: list[str] | None) -> list[Path]:
    """The study folders to run; :class:`InputError` (one line) names what is missing."""
    root = required_data_root()
    if not (root / "open_ms").is_dir():
        raise InputError(f"{root / 'open_ms'}: no such folder (the open-MS studies)")
    found = find_studies(root)
    if not found:
        raise InputError(f"{root / 'open_ms'}: holds no study folder (*/..._FLAIR.nii.gz)")
    if not names:
        return found
    by_name = {p.name: p for p in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"--studies {' '.join(missing)}: not in {root / 'open_ms'} "
                         f"(found {', '.join(by_name)})")
    return [by_name[n] for n in names]


# ---------------------------------------------------------------------- X-CoReg (a process)
def run_xcoreg(paths: list[Path], work: Path, args, key: str = "xcoreg",
               options: Sequence[str] = (), seed: int = 0) -> dict:
    """``dcc-register --seed seed`` (plus ``options``) on ``paths`` in its own process; its
    transforms, seconds, memory."""
    out = work / key
    log = work / f"dcc-register-{key}.log"
    command = [sys.executable, "-m", "dcc.cli.register", *map(str, paths), "--stages", STAGES,
               "--out", str(out), "--threads", str(args.threads), "--seed", str(seed), "--quiet",
               *options,
               *(["--overwrite"] if args.keep else []), *args.extra]  # --keep: rerun in place
    code, seconds, rss = run_measured(command, log)
    row = {"seconds": round(seconds, 2), "peak_rss_mb": round(rss, 1), "returncode": code}
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]
        return {**row, "error": tail.strip()}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    names = report["names"]
    row.update({
        "registration_s": report["wall_time_s"],
        "x_metric": report["x_metric"],
        "method": report["settings"]["method"],
        "warnings": report.get("warnings", []),
        "settings": report["settings"],
        "estimate": read_linear_transforms([out / "transforms" / f"{n}.tfm" for n in names]),
        "after": [_read_array(out / "warped" / f"{n}.nii.gz") for n in names],
    })
    return row


# ---------------------------------------------------------------------- SimpleITK (in process)
def sitk_rigid(fixed: sitk.Image, moving: sitk.Image, args,
               seed: int) -> tuple[sitk.Transform, dict]:
    """Rigid (Euler3D) registration of ``moving`` onto ``fixed`` with Mattes MI; the transform
    maps fixed points to moving points (ITK's resampling direction)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # a fixed sample: seed 0 would be sitkWallClock (a new sample every run)
    method.SetMetricSamplingPercentage(args.sitk_sampling, seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=args.sitk_iterations,
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)
    return transform, {
        "metric": method.GetMetricValue(),
        "iterations_last_level": method.GetOptimizerIteration(),
        "stop": method.GetOptimizerStopConditionDescription(),
    }


def run_sitk(images: torch.Tensor, study: OpenMSStudy, args, seed: int) -> dict:
    """Each misaligned image after the first onto the first (FLAIR): the group of maps
    ``[identity, T_1, T_2]``, seconds, and the moving images resampled onto FLAIR."""
    volumes = [study.grid.to_sitk(image.numpy()) for image in images]
    transforms, details, seconds = [sitk.Transform(3, sitk.sitkIdentity)], [], 0.0
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    try:
        for moving in volumes[1:]:
            start = time.perf_counter()
            transform, info = sitk_rigid(volumes[0], moving, args, seed)
            info["seconds"] = round(time.perf_counter() - start, 2)
            seconds += info["seconds"]
            transforms.append(transform)
            details.append(info)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    after = [sitk.GetArrayFromImage(sitk.Resample(v, volumes[0], t, sitk.sitkLinear, 0.0))
             for v, t in zip(volumes, transforms, strict=True)]
    return {"seconds": round(seconds, 2), "pairs": details,
            "estimate": linear_group(transforms), "after": after}


# ---------------------------------------------------------------------- one trial
def run_trial(study: OpenMSStudy, trial: int, args, work: Path) -> tuple[dict, dict]:
    """One misalignment of ``study``: the row of the results and the figure's slices."""
    seed = args.seed + trial
    images, truth = study.misalign(seed)
    grid = study.grid
    row = {
        "study": study.name,
        "trial": trial,
        "seed": seed,
        "engine_seed": seed if args.engine_seed is None else args.engine_seed,
        "grid_shape": list(grid.shape),
        "grid_spacing_mm": [round(s, 4) for s in grid.spacing],
        "truth_angles_deg": np.degrees(truth.angles.detach().double().numpy()).round(3).tolist(),
        "truth_offsets_mm": truth.offset.detach().double().numpy().round(3).tolist(),
        "gre_before_mm": registration_error(truth, grid),
    }
    panels = {"before": images.numpy()}
    if not args.skip_xcoreg:
        paths = [work / f"{name}.nii.gz" for name in study.names]
        for path, image in zip(paths, images, strict=True):
            write_image(path, image, grid)
        for key, options in runs(args):
            result = run_xcoreg(paths, work, args, key, options, row["engine_seed"])
            estimate, after = result.pop("estimate", None), result.pop("after", None)
            result["gre_mm"] = math.nan if estimate is None else registration_error(
                truth, grid, estimate)
            row[key] = result
            if after is not None and key in NAMES:
                panels[NAMES[key]] = np.stack(after)
    if not args.skip_sitk:
        result = run_sitk(images, study, args, seed)
        estimate, after = result.pop("estimate"), result.pop("after")
        result["gre_mm"] = registration_error(truth, grid, estimate)
        row["sitk"] = result
        panels["SimpleITK"] = np.stack(after)
    return row, panels


def _read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


# ---------------------------------------------------------------------- outputs
def _value(row: dict, method: str, key: str) -> float:
    return float(row.get(method, {}).get(key, math.nan))


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def method_keys(rows: list[dict]) -> list[str]:
    """The methods the rows hold: dcc-register runs in their order, then SimpleITK."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, dict)
                         and "returncode" in v)
    return [*keys, *(["sitk"] if any("sitk" in r for r in rows) else [])]


def _label(key: str) -> str:
    return NAMES.get(key, key.replace("xcoreg-K", "X-CoReg K="))


def columns(rows: list[dict]) -> list[tuple[str, tuple, int]]:
    """header, (method or None, key), digits of the per-trial table"""
    out = [("gRE before (mm)", (None, "gre_before_mm"), 2)]
    for key in method_keys(rows):
        out += [(f"{_label(key)} gRE (mm)", (key, "gre_mm"), 2),
                (f"{_label(key)} s", (key, "seconds"), 1)]
        if key == "xcoreg":
            out.append(("peak RSS (MB)", (key, "peak_rss_mb"), 0))
    return out


def _column(row: dict, where: tuple) -> float:
    method, key = where
    return float(row[key]) if method is None else _value(row, method, key)


def summary(rows: list[dict]) -> dict:
    """Mean and max over the rows of every column (finite values only; NaN if none)."""
    out = {}
    for header, where, _ in columns(rows):
        values = [v for v in (_column(r, where) for r in rows) if math.isfinite(v)]
        out[header] = {"mean": statistics.fmean(values) if values else math.nan,
                       "max": max(values) if values else math.nan, "n": len(values)}
    return out


def comparison(rows: list[dict], keys: list[str]) -> list[dict]:
    """:func:`compare_methods` of gRE over the trials for ``keys`` (against X-CoReg)."""
    records = [{**r[key], "method": key, "trial": f"{r['study']}/{r['seed']}",
                "gre_before_mm": r["gre_before_mm"]}
               for key in keys for r in rows if key in r]
    return compare_methods(records, "gre_mm", reference="xcoreg", baseline="gre_before_mm")


def markdown(rows: list[dict], stats: dict, settings: dict, tables: dict) -> str:
    cols = columns(rows)
    head = ["study", "trial", *(h for h, _, _ in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["study"], str(r["trial"])]
        for _, (method, key), digits in cols:
            failed = method is not None and r.get(method, {}).get("returncode", 0) != 0
            cells.append("failed" if failed and key == "gre_mm" else
                         _fmt(_column(r, (method, key)), digits))
        lines.append("| " + " | ".join(cells) + " |")
    for kind in ("mean", "max"):
        cells = [f"**{kind}**", ""] + [_fmt(stats[h][kind], d) for h, _, d in cols]
        lines.append("| " + " | ".join(cells) + " |")
    for title, table in tables.items():
        lines += ["", f"### {title}", "", comparison_markdown(
            table, "gRE (mm)", digits=2, names={k: _label(k) for k in method_keys(rows)})]
    xsettings = settings.get("dcc_register_settings")
    stages = "" if not xsettings else " (" + "; ".join(
        f"{s['name']} {s['iterations']} steps over {s['levels']} level(s), {s.get('bins')} bins"
        for s in xsettings["stages"]) + ")"
    if "engine_seed" not in settings:  # runs before the per-trial seeds: the preset's 0
        engine = "0 for every trial"
    elif settings["engine_seed"] is None:
        engine = "each trial its own, its misalignment's"
    else:
        engine = f"{settings['engine_seed']} for every trial"
    methods = []
    if not settings["skip_xcoreg"]:
        call = " ".join(["dcc-register FLAIR T1W T2W --stages", STAGES, "--threads",
                         str(settings["threads"]), *settings["dcc_register_extra"]])
        methods.append(f"X-CoReg: `{call}`{stages}; seconds and peak RSS of its whole process.")
        others = [k for k in method_keys(rows) if k not in ("xcoreg", "sitk")]
        if others:
            methods.append("The others: the same command with " + ", ".join(
                f"`{' '.join(options)}` ({_label(k)})" for k, options in settings["runs"]
                if k != "xcoreg") + " (same stages, sampling and steps; only the objective or "
                "K differs).")
    if not settings["skip_sitk"]:
        methods.append(
            "SimpleITK: pairwise Euler3D onto FLAIR, Mattes MI (50 bins, "
            f"{settings['sitk_sampling']:g} random sample), shrink 4/2/1, smoothing 2/1/0 mm, "
            f"regular-step gradient descent (at most {settings['sitk_iterations']} iterations "
            f"per level), {settings['threads']} thread(s), in the bench's process.")
    text = [
        f"# open-MS rigid groupwise registration ({len(rows)} trial(s))",
        "",
        f"Protocol: FLAIR/T1W/T2W on the FLAIR grid (shrink {settings['shrink']:g}) with the "
        f"reference transforms; each image misaligned by a random rigid map (+-{MAX_ANGLE:g} deg, "
        f"+-{MAX_OFFSET:g} mm per axis, about the volume centre; trial k: seed {settings['seed']}"
        f" + k; registration seed: {engine}); gRE (Eqs. 51-52) at the 8 vertices of the FLAIR "
        "field of view. "
        + " ".join(methods),
        "",
        *lines,
        "",
        f"Hardware: {settings['hardware']}",
        "",
        f"Command: `{settings['command']}`",
        "",
    ]
    return "\n".join(text)


def _normalise(img: np.ndarray) -> np.ndarray:
    hi = np.percentile(img, 99.5)
    return np.clip(img / hi, 0, 1) if hi > 0 else np.zeros_like(img)


def figure(path: Path, examples: list[tuple[str, dict]], rows: list[dict], names) -> None:
    """Middle axial slices (per study, its first trial): the three images and their colour
    overlay (R = FLAIR, G = T1W, B = T2W) before and after each method; below, gRE per study
    (bars: means, dots: trials)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panel_rows = [(study, label, volume) for study, panels in examples
                  for label, volume in panels.items()]
    cols = len(names) + 1
    fig = Figure(figsize=(2.2 * cols, 2.2 * len(panel_rows) + 3.2))
    grid = fig.add_gridspec(len(panel_rows) + 1, cols,
                            height_ratios=[1] * len(panel_rows) + [1.4])
    for i, (study, label, volume) in enumerate(panel_rows):
        slices = [_normalise(v[v.shape[0] // 2]) for v in volume]
        for j, image in enumerate([*slices, np.stack(slices[:3], -1)]):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            title = names[j] if j < len(names) else "overlay (RGB)"
            ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{study}\n{label}", fontsize=8)
    ax = fig.add_subplot(grid[-1, :])
    studies = list(dict.fromkeys(r["study"] for r in rows))
    methods = [(label, method, key, f"C{k}") for k, (label, method, key) in enumerate(
        [("before", None, "gre_before_mm"),
         *((NAMES[m], m, "gre_mm") for m in method_keys(rows) if m in NAMES)])]
    width = 0.8 / len(methods)
    for k, (label, method, key, colour) in enumerate(methods):
        for s, study in enumerate(studies):
            values = [_column(r, (method, key)) for r in rows if r["study"] == study]
            values = [v for v in values if math.isfinite(v)]
            if not values:
                continue
            x = s + (k - (len(methods) - 1) / 2) * width
            ax.bar(x, statistics.fmean(values), width, color=colour,
                   label=label if s == 0 else None)
            ax.plot([x] * len(values), values, "k.", ms=3)
    ax.set_xticks(range(len(studies)), studies, fontsize=8)
    ax.set_ylabel("gRE (mm)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def classes_figure(path: Path, rows: list[dict], classes: Sequence[int],
                   default: int | None) -> None:
    """gRE against K (the paper's Fig. 7): mean ± std over the trials, and every trial; the
    plain X-CoReg runs at their ``default`` K."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    runs = {k: f"xcoreg-K{k}" for k in classes}
    if default is not None and default not in runs and any("xcoreg" in r for r in rows):
        runs[default] = "xcoreg"
    classes = sorted(runs)
    means, stds = [], []
    for k in classes:
        values = [v for v in (_value(r, runs[k], "gre_mm") for r in rows)
                  if math.isfinite(v)]
        ax.plot([k] * len(values), values, "k.", ms=3, alpha=0.5)
        means.append(statistics.fmean(values) if values else math.nan)
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    ax.errorbar(classes, means, yerr=stds, marker="o", capsize=3, label="X-CoReg, mean ± std")
    ax.set_xlabel("K (classes of the common anatomy)")
    ax.set_ylabel("gRE (mm)")
    ax.set_yscale("log")
    ax.set_xticks(list(classes))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"open-MS rigid: gRE against K ({len(rows)} trials)", fontsize=9)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folders = study_folders(args.studies)
    except InputError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    command = " ".join(shlex.quote(a) for a in ["python", "bench/bench_openms.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    rows, examples, names = [], [], None
    done = read_rows(args.rows)
    if args.rows:
        args.rows.parent.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(folders) * args.trials, desc=PROG, unit="trial")
    for folder in folders:
        study = load_study(folder, shrink=args.shrink)
        names = study.names
        for trial in range(args.trials):
            progress.set_postfix_str(f"{study.name} trial {trial}")
            done |= read_rows(args.rows)  # parallel runs may have done it meanwhile
            row = done.get((study.name, args.seed + trial))
            if row is not None:
                row = {**row, "trial": trial}  # its index in this run (the seed is the key)
                slabs = _slabs_path(args.rows, row)
                panels = {} if trial else dict(np.load(slabs)) if slabs.is_file() else {
                    "before": study.misalign(row["seed"])[0].numpy()}  # slices not kept
            elif args.keep:
                work = args.keep / study.name / f"trial{trial:03d}"
                work.mkdir(parents=True, exist_ok=True)
                row, panels = run_trial(study, trial, args, work)
            else:
                with tempfile.TemporaryDirectory(prefix=f"{PROG}.") as tmp:
                    row, panels = run_trial(study, trial, args, Path(tmp))
            rows.append(row)
            if trial == 0:
                panels = {label: _middle(volume) for label, volume in panels.items()}
                examples.append((study.name, panels))
            if args.rows and (study.name, row["seed"]) not in done:
                if trial == 0:
                    np.savez(_slabs_path(args.rows, row), **panels)
                with open(args.rows, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")  # one write: parallel runs append whole rows
            progress.update()
            tqdm.write(_line(row))
    progress.close()
    xsettings = next((r["xcoreg"].pop("settings") for r in rows
                      if "settings" in r.get("xcoreg", {})), None)
    for r in rows:
        for key in method_keys(rows):
            r.get(key, {}).pop("settings", None)
    settings = {
        "studies": [f.name for f in folders],
        "trials": args.trials,
        "seed": args.seed,
        "engine_seed": args.engine_seed,
        "threads": args.threads,
        "shrink": args.shrink,
        "max_angle_deg": MAX_ANGLE,
        "max_offset_mm": MAX_OFFSET,
        "dcc_register_stages": STAGES,
        "dcc_register_extra": args.extra,
        "dcc_register_settings": xsettings,
        "runs": [] if args.skip_xcoreg else runs(args),
        "skip_xcoreg": args.skip_xcoreg,
        "skip_sitk": args.skip_sitk,
        "sitk_iterations": args.sitk_iterations,
        "sitk_sampling": args.sitk_sampling,
        "sitk_version": sitk.Version.VersionString(),
        "hardware": hardware(),
        "command": command,
    }
    stats = summary(rows)
    keys = method_keys(rows)
    tables = {}
    if "xcoreg" in keys and len([k for k in keys if not k.startswith("xcoreg-K")]) > 1:
        tables["Methods on the same trials"] = comparison(
            rows, [k for k in keys if not k.startswith("xcoreg-K")])
    if args.classes and "xcoreg" in keys:
        tables["gRE against K (X-CoReg: K = 8)"] = comparison(
            rows, ["xcoreg", *(f"xcoreg-K{k}" for k in args.classes)])
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "summary": stats, "tables": tables, "rows": rows}
    (args.out / f"{args.tag}.json").write_text(json.dumps(_json_ready(payload), indent=2),
                                               encoding="utf-8")
    table = markdown(rows, stats, settings, tables)
    (args.out / f"{args.tag}.md").write_text(table, encoding="utf-8")
    figure(args.out / f"{args.tag}.png", examples, rows, names)
    if args.classes:
        classes_figure(args.out / f"{args.tag}_gre_vs_K.png", rows, args.classes,
                       (xsettings or {}).get("num_classes"))
    print(table)
    print(f"{PROG}: wrote {args.out / args.tag}.json/.md/.png")
    failed = [r for r in rows if any(r.get(k, {}).get("returncode", 0) != 0 for k in keys)]
    if failed:
        print(f"{PROG}: dcc-register failed on {len(failed)} trial(s); see the JSON",
              file=sys.stderr)
        return 1
    return 0


def read_rows(path: Path | None) -> dict[tuple[str, int], dict]:
    """The trials of a ``--rows`` file by (study, seed); none if there is no file."""
    if path is None or not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {(r["study"], r["seed"]): r for r in rows}


def _slabs_path(rows: Path, row: dict) -> Path:
    """The figure's slices of a study's first trial, beside the ``--rows`` file."""
    return rows.with_name(f"{rows.stem}.{row['study']}.seed{row['seed']}.npz")


def _middle(volume: np.ndarray) -> np.ndarray:
    """The middle axial slice of each image of ``volume`` (N, D, H, W), as (N, 1, H, W)."""
    d = volume.shape[1]
    return volume[:, d // 2 : d // 2 + 1]


def _line(row: dict) -> str:
    parts = [f"{row['study']} trial {row['trial']}: gRE before {row['gre_before_mm']:.2f} mm"]
    for key in method_keys([row]):
        if key == "sitk":
            continue
        x = row[key]
        parts.append(f"{_label(key)} {_fmt(x.get('gre_mm', math.nan))} mm in "
                     f"{x['seconds']:.1f} s, {x['peak_rss_mb']:.0f} MB")
    if "sitk" in row:
        parts.append(f"SimpleITK {row['sitk']['gre_mm']:.2f} mm in {row['sitk']['seconds']:.1f} s")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
