"""Benchmark motion correction of a real first-pass cardiac perfusion series (issue #23,
experiment 3; the paper's Sec. 4.3 and Table 4): X-CoReg against VI, CG and CTE.

The series ``$DCC_DATA_ROOT/perfusion_cardiac`` (:func:`dcc.data.perfusion.load_perfusion`:
frames ordered by DICOM InstanceNumber, 256 x 256, 1.406 mm, and the gold-standard masks drawn on
one frame) has little motion of its own, so each trial adds KNOWN motion to its first
``--frames`` frames (:func:`dcc.data.perfusion.moving_series`: per frame a random rigid motion,
+-``--max-angle`` degrees about the image centre and +-``--max-offset`` mm, after a smooth 40 mm
B-spline FFD of control displacements of std ``--motion-ffd-std`` mm; trial k uses the seed
``--seed + k``) and carries the gold-standard label map through each frame's motion. Then, as
the paper: Gaussian filter of 1 pixel, z-score per frame, ROI = the LV with its myocardium
dilated by 10 pixels (the engine's ``roi``), and unbiased groupwise registration (Eq. 37) with
the schedule translation -> rigid -> FFD (40 mm control spacing, lambda = 0.01): the translation
stage, then the rigid stage from its result, then the FFD from that (an FFD after a rejected
rigid stage is skipped, as the engine does). The three transformation models of Table 4 are the
states after each stage. Every method runs in the same engine with the same settings; only the
objective differs (``XCoRegConfig.method``: X-CoReg with L = 64 bins and K = 6 classes, VI, CG
with sigma 0.05, CTE with L = 64), except lambda for VI (``--vi-bending-weight``: its objective
is about 100x smaller than the others', README; with 0.01 VI's FFD stage was rejected on
seed 0).

Settings were chosen on trial seed 0 only (reported trials start at ``--seed 1``), for X-CoReg,
and applied to every method: the FFD step 0.02 mm (myocardium Dice after the FFD stage on seed 0:
0.837 / 0.833 / 0.828 / 0.823 / 0.813 for lr 0.02 / 0.05 / 0.1 / 0.2 / 0.5, 100 steps; from
0.827 after the rigid stage: larger steps raise X but fit the contrast change, not the motion).

Metric: the myocardium Dice averaged over all pairs of frames of the label maps warped (nearest
neighbour) by each frame's recovered transform, and before registration. Per transformation
model a table (:mod:`dcc.evaluation.comparison`): mean +- std over the trials, paired t-test
against X-CoReg, trials worse than the unregistered Dice, seconds per trial (registration up to
that model), peak resident memory (each method in its own process). Then the real series
WITHOUT added motion (``--real-frames``) is registered with X-CoReg (translation -> rigid ->
FFD) and its temporal cross-sections (a row and a column through the LV over time, the paper's
Figs. 9/12) before and after are drawn.

Output in ``--out``: ``<tag>.json`` (settings, command, records, tables), ``<tag>.md``,
``<tag>_dice.png`` (box plots), ``<tag>_montage.png`` (X-CoReg, first trial, full model),
``<tag>_cross_section.png``. Not part of the test suite. Example::

    python bench/bench_perfusion.py --trials 8 --seed 1 --threads 1 --out results/perfusion_moco
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dcc.coreg import XCoReg  # noqa: E402
from dcc.coreg.config import METHODS, StageConfig, XCoRegConfig  # noqa: E402
from dcc.data.io import InputError  # noqa: E402
from dcc.data.misalignment import warp_images  # noqa: E402
from dcc.data.perfusion import (  # noqa: E402
    load_perfusion,
    moving_series,
    preprocess,
    region_of_interest,
)
from dcc.evaluation.comparison import (  # noqa: E402
    compare_methods,
    comparison_markdown,
    write_experiment,
)
from dcc.evaluation.figures import save_montage  # noqa: E402
from dcc.evaluation.processes import run_method_workers  # noqa: E402
from dcc.evaluation.runs import mean_std, paired_ttest  # noqa: E402
from dcc.metrics import pairwise_dice  # noqa: E402

PROG = "bench_perfusion"
MODELS = ("translation", "rigid", "ffd")
MODEL_NAMES = {"translation": "translation", "rigid": "translation + rigid",
               "ffd": "translation + rigid + FFD"}
NAMES = {"xcoreg": "X-CoReg", "xcoreg-gt": "X-Reg-GT", "vi": "VI", "cg": "CG", "cte": "CTE",
         "ape": "APE", "gmm": "GMM"}
MYOCARDIUM = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=50, help="first frames of the series (50)")
    p.add_argument("--trials", type=int, default=3, help="synthetic motions (trials)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of trial 0, trial k uses seed + k (default 1: seed 0 was used to "
                   "choose the settings)")
    p.add_argument("--methods", nargs="+", default=["xcoreg", "vi", "cg", "cte"],
                   choices=METHODS)
    p.add_argument("--iterations", type=int, nargs=3, default=[100, 100, 100],
                   metavar=("T", "R", "F"), help="Adam steps of translation, rigid, FFD")
    p.add_argument("--levels", type=int, nargs=3, default=[2, 2, 1], metavar=("T", "R", "F"),
                   help="resolution levels of each stage (the steps are shared among them)")
    p.add_argument("--lr", type=float, nargs=3, default=[1.0, 0.5, 0.02],
                   metavar=("T", "R", "F"), help="Adam step (mm) of each stage; rotations: lr x "
                   "--angle-scale radians (FFD 0.02: chosen on seed 0, see the module doc)")
    p.add_argument("--lr-final", type=float, default=0.05,
                   help="final step as a fraction of lr (cosine decay per level)")
    p.add_argument("--angle-scale", type=float, default=0.01)
    p.add_argument("--ffd-spacing", type=float, default=40.0, help="FFD control spacing, mm")
    p.add_argument("--bending-weight", type=float, default=0.01, help="lambda (paper: 0.01)")
    p.add_argument("--vi-bending-weight", type=float, default=1e-4,
                   help="lambda for VI (default 1e-4: its objective is ~100x smaller; with "
                   "0.01 its FFD stage was rejected on seed 0)")
    p.add_argument("--classes", type=int, default=6, help="K of X-CoReg (paper: 6)")
    p.add_argument("--bins", type=int, default=64, help="L (paper: 64)")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--congealing-sigma", type=float, default=0.05)
    p.add_argument("--max-angle", type=float, default=4.0, help="added motion: degrees")
    p.add_argument("--max-offset", type=float, default=4.0, help="added motion: mm per axis")
    p.add_argument("--motion-ffd-spacing", type=float, default=40.0,
                   help="added motion: FFD control spacing, mm")
    p.add_argument("--motion-ffd-std", type=float, default=1.5,
                   help="added motion: std of the FFD control displacements, mm")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian filter, pixels")
    p.add_argument("--roi-radius", type=int, default=10, help="ROI dilation, pixels")
    p.add_argument("--real-frames", type=int, default=50,
                   help="frames of the real series registered without added motion for the "
                   "cross-section figure (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    p.add_argument("--out", type=Path, default=Path("results/perfusion_moco"))
    p.add_argument("--tag", default="perfusion", help="file name stem of the results")
    p.add_argument("--in-process", action="store_true",
                   help="every method in this process (peak memory: the largest so far)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # records of one method
    args = p.parse_args(argv)
    if args.trials < 1 or args.frames < 3 or args.threads < 1:
        p.error("--trials >= 1, --frames >= 3 and --threads >= 1")
    if min(args.iterations) < 1 or min(args.levels) < 1:
        p.error("--iterations and --levels must be >= 1")
    return args


def stage_configs(args) -> list[StageConfig]:
    common = {"lr_final": args.lr_final}
    return [
        StageConfig(name="translation", iterations=args.iterations[0], levels=args.levels[0],
                    lr=args.lr[0], **common),
        StageConfig(name="rigid", iterations=args.iterations[1], levels=args.levels[1],
                    lr=args.lr[1], angle_scale=args.angle_scale, **common),
        StageConfig(name="ffd", iterations=args.iterations[2], levels=args.levels[2],
                    lr=args.lr[2], ffd_spacing=args.ffd_spacing, ffd_levels=1, **common),
    ]


def make_config(args, method: str, stage: StageConfig, seed: int) -> XCoRegConfig:
    weight = args.bending_weight
    if method == "vi" and args.vi_bending_weight is not None:
        weight = args.vi_bending_weight
    return XCoRegConfig(stages=[stage], method=method, num_classes=args.classes, bins=args.bins,
                        sample_rate=args.sample_rate, bending_weight=weight, seed=seed,
                        congealing_sigma=args.congealing_sigma, progress=False)


def dice(labels: torch.Tensor) -> float:
    value = pairwise_dice(labels, [MYOCARDIUM])["mean"]
    return float(value) if math.isfinite(value) else 0.0


def register_schedule(args, method, images, grid, valid, roi, seed, labels=None):
    """translation -> rigid -> FFD, each stage from the previous one's result; per stage the
    transform's Dice (if ``labels``), seconds, X, acceptance. Returns (per-stage dicts, the last
    result)."""
    transform, result, out, rejected = None, None, [], False
    for stage in stage_configs(args):
        if stage.name == "ffd" and rejected:  # as the engine: no FFD after a rejected linear
            out.append({"model": stage.name, "seconds": 0.0, "accepted": False,
                        "skipped": True, "dice": out[-1]["dice"], "x_metric": out[-1][
                            "x_metric"]})
            continue
        result = XCoReg(make_config(args, method, stage, seed)).register(
            images, grid, valid=valid, roi=roi, transform=transform)
        transform = result.transform
        record = result.diagnostics["stages"][-1]
        rejected = not record["accepted"]
        out.append({
            "model": stage.name, "seconds": result.seconds, "accepted": record["accepted"],
            "restarts": record.get("restarts", 0), "x_metric": result.x_metric,
            "dice": None if labels is None else dice(
                warp_images(labels, grid, transform, mode="nearest")),
        })
    return out, result, transform


def run_trial(args, data, trial: int, method: str):
    frames, grid, gold = data
    seed = args.seed + trial
    group, inside = moving_series(frames, gold, grid, seed, args.max_angle, args.max_offset,
                                  args.motion_ffd_spacing, args.motion_ffd_std)
    images = preprocess(group.images, args.sigma)
    roi = region_of_interest(gold, args.roi_radius)
    stages, result, transform = register_schedule(args, method, images, grid, inside, roi, seed,
                                                  labels=group.labels)
    record = {"method": method, "trial": seed, "seed": seed,
              "dice_before": dice(group.labels)}
    total = 0.0
    for s in stages:
        total += s["seconds"]
        record[f"dice_{s['model']}"] = s["dice"]
        record[f"seconds_{s['model']}"] = total  # registration up to and with this model
        record[f"accepted_{s['model']}"] = s["accepted"]
        record[f"x_{s['model']}"] = s["x_metric"]
    record["warnings"] = [f"{s['model']}: " + ("skipped" if s.get("skipped") else "rejected")
                          for s in stages if not s["accepted"]]
    example = None
    if trial == 0:
        labels_after = warp_images(group.labels, grid, transform, mode="nearest")
        example = {"before": images, "after": warp_images(images, grid, transform),
                   "posterior": result.posterior.detach().cpu(), "labels_before": group.labels,
                   "labels_after": labels_after, "roi": roi, "names": group.names}
    return record, example


def run_methods(args, methods, data):
    records, example = [], None
    with tqdm(total=len(methods) * args.trials, desc=PROG) as bar:
        for method in methods:
            for trial in range(args.trials):
                record, ex = run_trial(args, data, trial, method)
                record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                records.append(record)
                if ex is not None and example is None and method == methods[0]:
                    example = ex
                bar.set_postfix(method=method, dice=f"{record['dice_ffd']:.3f}")
                bar.update(1)
    return records, example


# ---------------------------------------------------------------------- tables and figures
def model_tables(records, args) -> tuple[dict, str]:
    reference = "xcoreg" if "xcoreg" in args.methods else args.methods[0]
    tables, parts = {}, []
    before = {r["trial"]: r["dice_before"] for r in records if r["method"] == reference}
    b_mean, b_std, b_n = mean_std(list(before.values()))
    for model in MODELS:
        view = [{"method": r["method"], "trial": r["trial"], "dice": r[f"dice_{model}"],
                 "dice_before": r["dice_before"], "seconds": r[f"seconds_{model}"],
                 "peak_rss_mb": r.get("peak_rss_mb")} for r in records]
        rows = compare_methods(view, "dice", reference=reference, higher_is_better=True,
                               baseline="dice_before")
        ref_after = {r["trial"]: r[f"dice_{model}"] for r in records if r["method"] == reference}
        common = [t for t in ref_after if t in before]
        t, p = paired_ttest([before[c] for c in common], [ref_after[c] for c in common])
        tables[model] = rows
        tables[f"{model}_vs_unregistered"] = {"method": reference, "t": t, "p": p,
                                              "pairs": len(common)}
        parts.append(
            f"### {MODEL_NAMES[model]}: myocardium Dice (all pairs of frames)\n\n"
            f"Unregistered: {b_mean:.3f} ± {b_std:.3f} ({b_n} trials); "
            f"{NAMES.get(reference, reference)} against it: paired t = {_fmt(t)}, "
            f"p = {_fmt(p, 'g')}.\n\n"
            + comparison_markdown(rows, "Dice", names=NAMES, reference=reference))
    tables["unregistered"] = {"mean": b_mean, "std": b_std, "n": b_n}
    return tables, "\n".join(parts)


def table4(tables, methods) -> str:
    """The paper's Table 4 layout: one row per method, one column per model, p-values (FFD)."""
    un = tables["unregistered"]
    p_un = tables["ffd_vs_unregistered"]["p"]
    lines = ["| method | translation | translation + rigid | + FFD | p (FFD, vs X-CoReg) |",
             "| --- | --- | --- | --- | --- |",
             f"| none | {un['mean']:.3f} ± {un['std']:.3f} | — | — | {_fmt(p_un, 'g')} |"]
    for method in methods:
        cells = []
        for model in MODELS:
            row = next(r for r in tables[model] if r["method"] == method)
            star = "*" if row["verdict"] in ("better", "worse") else ""
            cells.append(f"{row['mean']:.3f} ± {row['std']:.3f}{star}")
        ffd = next(r for r in tables["ffd"] if r["method"] == method)
        p = "—" if ffd["verdict"] == "" else _fmt(ffd["p"], "g")  # "": the reference
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + f" | {p} |")
    return "\n".join(lines) + "\n"


def boxplot(records, methods, path: Path):
    fig, axes = plt.subplots(1, len(MODELS), figsize=(3.2 * len(MODELS) + 0.6, 4), sharey=True)
    ref = methods[0]
    before = [r["dice_before"] for r in records if r["method"] == ref]
    for ax, model in zip(axes, MODELS, strict=True):
        data = [before] + [[r[f"dice_{model}"] for r in records if r["method"] == m]
                           for m in methods]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(data) + 1), ["none", *(NAMES.get(m, m) for m in methods)],
                      fontsize=8)
        ax.set_title(MODEL_NAMES[model], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("myocardium Dice, mean over pairs of frames")
    fig.suptitle(f"Perfusion motion correction: {len(before)} trials", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def roi_box(roi: torch.Tensor, margin: int = 8) -> tuple[slice, slice]:
    ys, xs = torch.nonzero(roi, as_tuple=True)
    h, w = roi.shape
    return (slice(max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, h)),
            slice(max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, w)))


def montage(example, path: Path):
    rows, cols = roi_box(example["roi"])
    crop = {k: v[..., rows, cols] for k, v in example.items()
            if isinstance(v, torch.Tensor) and k != "roi"}
    save_montage(path, crop["before"], crop["after"], posterior=crop["posterior"],
                 names=example["names"], labels_after=crop["labels_after"],
                 labels_before=crop["labels_before"])


def real_series(args) -> dict:
    """The real series without added motion, registered with X-CoReg (translation -> rigid ->
    FFD); the raw frames before/after and the settings' outcome."""
    frames, grid, gold = load_perfusion(frames=args.real_frames)
    images = preprocess(frames, args.sigma)
    roi = region_of_interest(gold, args.roi_radius)
    stages, result, transform = register_schedule(args, "xcoreg", images, grid, None, roi,
                                                  args.seed)
    after = warp_images(frames, grid, transform)
    with torch.no_grad():  # how far the frames moved in the ROI: mean |phi_j(x) - x|, mm
        moved = (transform.lattice(grid) - grid.points()).norm(dim=-1)[:, roi]
    motion = float(moved.mean())
    return {"before": frames, "after": after, "gold": gold, "roi": roi, "stages": stages,
            "mean_displacement_mm": motion}


def temporal_roughness(profile: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames' profiles, over the profile's mean
    absolute value (a profile over time that jumps less is better aligned)."""
    scale = float(np.abs(profile).mean())
    return float(np.abs(np.diff(profile, axis=0)).mean()) / scale if scale > 0 else 0.0


def cross_section(real, path: Path) -> dict:
    gold = real["gold"].numpy()
    ys, xs = np.nonzero(gold == 2)  # the LV blood pool's centre
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    rows, cols = roi_box(real["roi"], margin=4)
    sections = {
        f"row {cy}": lambda x: x[:, cy, cols],
        f"column {cx}": lambda x: x[:, rows, cx],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 6))
    stats = {}
    for r, (name, cut) in enumerate(sections.items()):
        for c, state in enumerate(("before", "after")):
            profile = cut(real[state].numpy())
            stats[f"{name} {state}"] = temporal_roughness(profile)
            ax = axes[r, c]
            ax.imshow(profile.T, cmap="gray", aspect="auto", interpolation="nearest")
            ax.set_title(f"{name}, {state} (temporal roughness "
                         f"{stats[f'{name} {state}']:.3f})", fontsize=9)
            ax.set_xlabel("frame")
            ax.set_ylabel("position (pixels from the ROI box)")
    fig.suptitle(f"Real perfusion series, {real['before'].shape[0]} frames without added motion: "
                 "a line through the LV over time, before and after X-CoReg (rigid + FFD)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats


# ---------------------------------------------------------------------- main
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        data = load_perfusion(frames=args.frames)
    except InputError as error:  # one line naming what is missing, exit code 2
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if args.worker is not None:
        records, example = run_methods(args, args.methods, data)
        args.worker.write_text(json.dumps(records), encoding="utf-8")
        if example is not None:
            torch.save(example, args.worker.with_suffix(".pt"))
        return 0
    start = time.perf_counter()
    example = None
    if len(args.methods) > 1 and not args.in_process:
        records = []
        with tempfile.TemporaryDirectory(prefix=f"{PROG}_") as tmp:
            for _method, path, _, rss in run_method_workers(__file__, argv, args.methods, tmp,
                                                           name=PROG):
                for record in json.loads(path.read_text(encoding="utf-8")):
                    record["peak_rss_mb"] = rss
                    records.append(record)
                if example is None and path.with_suffix(".pt").is_file():
                    example = torch.load(path.with_suffix(".pt"), weights_only=False)
    else:
        records, example = run_methods(args, args.methods, data)
    tables, text = model_tables(records, args)
    summary = table4(tables, args.methods)
    print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    real = None
    if args.real_frames:
        with tqdm(total=1, desc="real series (X-CoReg)") as bar:
            real = real_series(args)
            bar.update(1)
        tables["real_series"] = {
            "frames": real["before"].shape[0], "stages": real["stages"],
            "mean_displacement_mm": real["mean_displacement_mm"],
            "temporal_roughness": cross_section(real, args.out / f"{args.tag}_cross_section.png"),
        }
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["wall_seconds"] = time.perf_counter() - start
    meta["torch_threads"] = torch.get_num_threads()
    meta["command"] = f"python bench/{Path(__file__).name} " + " ".join(argv)
    meta["stages"] = [vars(s) for s in stage_configs(args)]
    meta["configs"] = {m: {k: v for k, v in vars(make_config(args, m, stage_configs(args)[0],
                                                             0)).items() if k != "stages"}
                       for m in args.methods}
    seeds = sorted({r["seed"] for r in records})
    vi_note = ""
    if "vi" in args.methods and args.vi_bending_weight is not None:
        vi_note = (f" VI uses lambda = {args.vi_bending_weight:g} instead of "
                   f"{args.bending_weight:g}: its objective (a variance of intensities in "
                   "[0, 1]) is about 100x smaller than the others', so the paper's lambda "
                   "would freeze its FFD (README).")
    real_text = ""
    if real is not None:
        rough = tables["real_series"]["temporal_roughness"]
        real_text = (
            f"\n### Real series without added motion ({real['before'].shape[0]} frames)\n\n"
            f"X-CoReg translation -> rigid -> FFD, same settings; the frames moved by "
            f"{_fmt(real['mean_displacement_mm'])} mm on average in the ROI. Temporal "
            "roughness of the cross-sections "
            "(mean |profile(t+1) - profile(t)| / mean |profile|; the contrast passage adds "
            "to it): " + ", ".join(f"{k} {v:.3f}" for k, v in rough.items())
            + f". Figure: `{args.tag}_cross_section.png`.\n")
    markdown = (
        "# Cardiac perfusion motion correction (paper Table 4 analogue)\n\n"
        f"`{meta['command']}`\n\n"
        f"Real first-pass perfusion series (`perfusion_cardiac`, first {args.frames} frames, "
        f"256 × 256, 1.41 mm) under known synthetic motion per frame (rigid ±{args.max_angle:g}° "
        f"about the image centre and ±{args.max_offset:g} mm, after a "
        f"{args.motion_ffd_spacing:g} mm B-spline FFD of std {args.motion_ffd_std:g} mm); "
        f"{len(seeds)} trials, seeds {seeds[0]}-{seeds[-1]} (settings chosen on seed 0, which "
        "is not reported). Gaussian filter "
        f"{args.sigma:g} px, z-score, ROI = LV + myocardium dilated by {args.roi_radius} px. "
        f"Unbiased registration translation ({args.iterations[0]} steps, {args.levels[0]} "
        f"levels, lr {args.lr[0]:g} mm) -> rigid ({args.iterations[1]}, {args.levels[1]}, "
        f"{args.lr[1]:g} mm / {args.lr[1] * args.angle_scale:g} rad) -> FFD "
        f"({args.iterations[2]}, {args.levels[2]}, {args.lr[2]:g} mm; {args.ffd_spacing:g} mm "
        f"spacing, lambda = {args.bending_weight:g}), cosine decay to {args.lr_final:g} x lr; "
        f"X-CoReg L = {args.bins}, K = {args.classes}; CG sigma = {args.congealing_sigma:g}; "
        f"CTE L = {args.bins}.{vi_note} Metric: myocardium Dice averaged over all pairs of "
        "frames of the gold-standard label maps carried through the known motion and warped "
        "back by each method (nearest neighbour). Paired t-tests against X-CoReg on the same "
        "trials (\\* in the summary: p < 0.05); seconds = registration up to and with the "
        "model, one torch thread on a shared 2-core VM; peak MB = the method's process "
        f"peak RSS; wall {meta['wall_seconds'] / 60:.1f} min.\n\n"
        "## Summary (mean ± std over the trials)\n\n" + summary + "\n## Per model\n\n" + text
        + real_text)
    write_experiment(args.out, args.tag, settings=meta, records=records, tables=tables,
                     markdown=markdown)
    boxplot(records, args.methods, args.out / f"{args.tag}_dice.png")
    if example is not None:
        montage(example, args.out / f"{args.tag}_montage.png")
    print(f"wrote {args.out}/{args.tag}.json, .md, _dice.png, _montage.png"
          + (", _cross_section.png" if real is not None else ""))
    return 0


def _fmt(value, kind: str = "f") -> str:
    """``value`` with 2 decimals (``kind="f"``) or 2 significant digits (``"g"``); "—" for a
    missing or non-finite value."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{value:.2f}" if kind == "f" else f"{value:.2g}"


if __name__ == "__main__":
    sys.exit(main())
