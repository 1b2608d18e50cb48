"""Cost of X-CoReg against the group size N on the 2D brain phantom (issue #22), one CPU thread.

For every N of ``--sizes`` and every stage of ``--stage``, a fresh process (this script with
``--child``, ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``) registers the same phantom
group: the brain2d preset's settings with a fixed number of ``--iterations`` and the
convergence test off, either its FFD stage as one level of its finest spacing (20 mm) at full
resolution ("ffd"; the preset itself goes coarse to fine) or a rigid stage of the paper's
defaults in its place ("rigid"). The process first runs one untimed warm-up registration
(``--warmup`` iterations), then ``--repeats`` timed ones. Reported per (revision, stage, N):

* seconds per iteration, **step**: the median over the timed iterations of the time between
  two consecutive Adam steps of one optimiser (taken by a global optimiser hook, so the engine
  is timed as it is; the first ``--skip`` steps of each optimiser are left out);
* seconds per iteration, **total**: ``result.seconds / iterations`` (set-up, EM warm-up, checks
  and the final Gamma included), the median over the repeats: the definition of
  ``bench/bench_phantom.py`` and of the README's "per iteration" figures;
* peak resident memory of the process (``ru_maxrss`` of ``os.wait4``) and that memory above the
  process' own after its imports (torch and dcc, before the group is loaded).

Slopes: least squares of log(value) on log(N) (``loglog_slope``). Issue #22's targets are
measured in the same run on the unchanged brain2d preset (200 steps) at N = 3 and 30
(``--target-sizes``) with the total definition: at most 0.015 and 0.08 s per iteration.

``--device cuda`` runs every registration on the GPU instead (the processes still one CPU thread
each; the peak GPU memory is recorded beside the RSS); the default target sizes are then the
issue's CUDA targets, at most 0.002 s per iteration at N = 3 and 0.005 at N = 100. Each step
reads the overlap, X and the loss back to the host once, so the time between two Adam steps is
the device's time, not only the launches'.

The groups are ``dcc.data.misalignment.phantom_group`` (the groups of bench_phantom.py, its
case 0 of each N), built once here and loaded by every process, so the revisions register the
same tensors with the same settings (the current brain2d preset). ``--revision REV`` also times
another git revision of the package: a worktree ``/tmp/dcc_rev_<rev>`` (``git worktree add``;
removed afterwards unless it existed) on the processes' ``PYTHONPATH``; the current tree is
timed from its own folder the same way, uncommitted changes under dcc/ included (named in the
results). Results go to ``--out``: ``scaling.json`` (every number, the settings, the hardware,
the load average and the command), ``scaling.md`` and ``scaling.png``. Not part of the test
suite. Example::

    python bench/bench_scaling.py --revision 26c714b --out results/scaling

``--methods`` (issue #23, experiment 5) times the competing groupwise metrics of
``dcc-register --method`` (cte, ape, gmm, cg, vi; README) in the same run, each in its own
process per (stage, N), with the same phantom groups, preset, transforms, sample and Adam
schedule (only ``XCoRegConfig.method`` differs): one line per method in the tables and the
log-log plot, the slopes per method, and per N each baseline's step time over X-CoReg's. cg and vi
assume one intensity scale (monomodal); on the multimodal phantom they are timed only, their
accuracy is not meaningful. A ``--revision`` is timed with X-CoReg only (older trees may lack
the baselines). Example::

    python bench/bench_scaling.py --methods xcoreg cte ape gmm cg vi --sizes 3 8 16 32 64 \
        --stage ffd --target-sizes --out results/scaling_methods
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dcc.evaluation.processes import run_measured  # standard library only: no torch here

# dcc.coreg.config.METHODS without xcoreg-gt (it times as xcoreg); not imported: that module
# imports torch, which this parent keeps out of its memory (see spawn)
METHODS = ("xcoreg", "cte", "ape", "gmm", "cg", "vi")

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3, 8, 16, 32, 64, 128)
# issue #22: s per iteration on the brain2d preset, one CPU thread or one GPU
TARGETS = {"cpu": {3: 0.015, 30: 0.08}, "cuda": {3: 0.002, 100: 0.005}}
PRESET = "brain2d"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="group sizes N")
    p.add_argument("--stage", choices=["ffd", "rigid", "both"], default="both")
    p.add_argument("--iterations", type=int, default=30,
                   help="timed Adam steps per registration (convergence test off)")
    p.add_argument("--repeats", type=int, default=3, help="timed registrations per process")
    p.add_argument("--warmup", type=int, default=3,
                   help="iterations of the untimed registration before the timed ones")
    p.add_argument("--skip", type=int, default=2,
                   help="first steps of each optimiser left out of the step median")
    p.add_argument("--target-sizes", type=int, nargs="*", default=None,
                   help="N of the issue's targets, on the unchanged preset (default: those of "
                   "the device, 3 and 30 on the CPU, 3 and 100 on CUDA; none: skip)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--revision", default=None,
                   help="also time this git revision (e.g. 26c714b) for a before/after table")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["xcoreg"],
                   help="groupwise metrics timed (dcc-register --method); xcoreg first is the "
                   "reference of the ratios")
    p.add_argument("--seed", type=int, default=0, help="misalignment seed (as bench_phantom)")
    p.add_argument("--out", type=Path, default=Path("results/scaling"))
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-groups", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.kind = args.device.split(":")[0]
    if args.kind not in TARGETS:
        p.error(f"--device must be cpu or cuda[:i], got {args.device}")
    if args.target_sizes is None:
        args.target_sizes = sorted(TARGETS[args.kind])
    if min(args.sizes + args.target_sizes, default=1) < 1:
        p.error("group sizes must be >= 1")
    if args.iterations < 1 or args.repeats < 1 or args.warmup < 1 or args.skip < 0:
        p.error("--iterations, --repeats and --warmup must be >= 1, --skip >= 0")
    args.methods = list(dict.fromkeys(args.methods))
    return args


def loglog_slope(x, y) -> tuple[float, float]:
    """Least-squares fit of ``log y = a log x + b``: ``(a, b)``; NaN for fewer than two points
    (non-positive values are left out). On exact power-law data ``y = c x^a`` it returns
    ``(a, log c)``."""
    pairs = [(math.log(u), math.log(v)) for u, v in zip(x, y, strict=True) if u > 0 and v > 0]
    if len({u for u, _ in pairs}) < 2:
        return math.nan, math.nan
    mx = statistics.fmean(u for u, _ in pairs)
    my = statistics.fmean(v for _, v in pairs)
    slope = sum((u - mx) * (v - my) for u, v in pairs) / sum((u - mx) ** 2 for u, _ in pairs)
    return slope, my - slope * mx


# ------------------------------------------------------------------------------ child process
def _rss_mib() -> float:
    """Peak resident memory of this process so far, MiB: ``VmHWM`` of ``/proc/self/status``
    (this program's own since its ``exec``), else ``ru_maxrss`` (which on Linux starts from the
    parent's resident memory at the fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec_path: Path) -> None:
    """One (revision, stage, N): warm-up, then the timed registrations; JSON to spec["out"]."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(1)
    import dcc
    from dcc.coreg import StageConfig, XCoReg, XCoRegConfig
    from dcc.spatial.grid import Grid

    package = Path(dcc.__file__).resolve().parent
    if package != Path(spec["root"]).resolve() / "dcc":
        raise SystemExit(f"imported {package}, expected {spec['root']}/dcc (PYTHONPATH?)")
    rss_imports = _rss_mib()
    load_start = os.getloadavg()[0]
    data = torch.load(spec["data"], weights_only=True)
    images, grid = data["images"], Grid(**{k: tuple(v) for k, v in spec["grid"].items()})

    def config(iterations: int | None):
        cfg = XCoRegConfig(**json.loads(json.dumps(spec["settings"])))
        cfg.progress, cfg.tolerance = False, 0.0  # a fixed number of steps
        cfg.device = spec["device"]
        if spec.get("method", "xcoreg") != "xcoreg":  # a revision is timed as xcoreg only
            cfg.method = spec["method"]
        if spec["stage"] == "rigid":
            cfg.stages = [StageConfig.named("rigid")]
        if spec["stage"] == "ffd":  # the cost of a step at full resolution: one level
            cfg.stages = [stage.finest_level() for stage in cfg.stages]
        if iterations is not None:  # "preset": the preset's own
            for stage in cfg.stages:
                stage.iterations = iterations
        return cfg

    stamps: list[tuple[int, float, float]] = []  # optimiser, wall clock, process CPU time
    register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: stamps.append(
            (id(optimizer), time.perf_counter(), time.process_time()))
    )
    iterations = None if spec["stage"] == "preset" else spec["iterations"]
    # warm-up, untimed (its seconds recorded: the first registration of a process also pays
    # torch's one-off lazy imports, e.g. torch._dynamo when the first optimiser is built)
    warmup = XCoReg(config(spec["warmup"])).register(images, grid)
    runs, steps, cpu_steps = [], [], []
    for _ in range(spec["repeats"]):
        stamps.clear()
        cfg = config(iterations)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = XCoReg(cfg).register(images, grid)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        done = sum(s.iterations for s in result.stages)
        intervals: dict[int, list[tuple[float, float]]] = {}
        for (a, ta, ca), (b, tb, cb) in zip(stamps, stamps[1:], strict=False):
            if a == b:
                intervals.setdefault(a, []).append((tb - ta, cb - ca))
        # interval i ends at step i + 2 of its optimiser: leave out the first `skip` steps
        # (all of a run too short for that keeps its last)
        kept = [t for ts in intervals.values()
                for t in ts[min(max(spec["skip"] - 1, 0), len(ts) - 1):]]
        timed = [t for t, _ in kept]
        steps += timed
        cpu_steps += [c for _, c in kept]
        stages = result.diagnostics.get("stages", [])
        runs.append({
            "seconds": result.seconds,
            "wall_seconds": wall,
            "iterations": done,
            "optimizer_steps": len(stamps),
            "seconds_per_iteration_total": result.seconds / max(done, 1),
            "cpu_seconds": cpu,
            "cpu_per_iteration_total": cpu / max(done, 1),
            "step_median": statistics.median(timed) if timed else math.nan,
            "restarts": sum(s.get("restarts", 0) for s in stages),
            "accepted": all(s.get("accepted", True) for s in stages),
        })
    out = {
        "N": int(images.shape[0]),
        "stage": spec["stage"],
        "method": spec.get("method", "xcoreg"),
        "package": str(package),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rss_after_imports_mib": rss_imports,
        "rss_peak_vmhwm_mib": _rss_mib(),
        "device": spec["device"],
        "gpu_peak_mib": (torch.cuda.max_memory_allocated() / 2**20
                         if spec["device"].startswith("cuda") else None),
        "load_1min": [load_start, os.getloadavg()[0]],
        "warmup_seconds": warmup.seconds,
        "runs": runs,
        "step_seconds": steps,
        "seconds_per_iteration_step": statistics.median(steps) if steps else math.nan,
        "seconds_per_iteration_total": statistics.median(
            r["seconds_per_iteration_total"] for r in runs
        ),
        # the same in CPU seconds of the process (one thread: less sensitive to other jobs
        # sharing the cores than the wall clock)
        "cpu_per_iteration_step": statistics.median(cpu_steps) if cpu_steps else math.nan,
        "cpu_per_iteration_total": statistics.median(r["cpu_per_iteration_total"] for r in runs),
    }
    Path(spec["out"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- parent process
def git(*words: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *words], check=True, capture_output=True,
                          text=True).stdout.strip()


def worktree(revision: str) -> tuple[Path, str, bool]:
    """``/tmp/dcc_rev_<short>`` at ``revision`` (made with ``git worktree add`` unless there):
    its folder, the short commit and whether it was made here."""
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    short = git("rev-parse", "--short", commit)
    path = Path(tempfile.gettempdir()) / f"dcc_rev_{short}"
    if path.is_dir():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        if head != commit:
            raise SystemExit(f"{path} exists at {head or 'no commit'}, not {commit}")
        return path, short, False
    git("worktree", "add", "--detach", str(path), commit)
    return path, short, True


def spawn(mode: str, spec: dict, root: Path, work: Path, name: str):
    """This script with ``mode`` (``--child``, ``--make-groups``) on ``spec`` in a fresh process
    importing dcc from ``root``, one thread; its JSON answer and its peak RSS in MiB.
    This process imports neither torch nor dcc before the runs: on Linux a child's ``ru_maxrss``
    starts from its parent's resident memory at the fork."""
    spec = {**spec, "root": str(root), "out": str(work / f"{name}.out.json")}
    path = work / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    # root first (the revision timed), then what the caller had (e.g. wheels of a GPU machine)
    imports = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": imports, "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = work / f"{name}.log"
    code, _, peak_mib = run_measured(
        [sys.executable, str(Path(__file__).resolve()), mode, str(path)], log, env, work)
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{name}: exit {code}\n{tail}")
    return json.loads(Path(spec["out"]).read_text(encoding="utf-8")), peak_mib


def run_child(spec: dict, root: Path, work: Path) -> dict:
    """One (revision, stage, N) in its own process (:func:`child`); its record plus the
    process' peak resident memory (``ru_maxrss`` of ``os.wait4``)."""
    start = time.perf_counter()
    name = f"{spec['revision']}_{spec['method']}_{spec['stage']}_{spec['N']}"
    record, peak_mib = spawn("--child", spec, root, work, name)
    record.update(revision=spec["revision"], method=spec["method"],
                  process_seconds=time.perf_counter() - start, peak_rss_mib=peak_mib)
    record["rss_above_imports_mib"] = record["peak_rss_mib"] - record["rss_after_imports_mib"]
    return record


def make_groups(spec_path: Path) -> None:
    """bench_phantom's case-0 group of each N of the spec (``phantom_group``), each saved."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch

    from dcc.data.misalignment import phantom_group
    from dcc.data.phantom import brain_phantom
    from dcc.evaluation.runs import hardware

    sizes, seed, work = spec["sizes"], spec["seed"], Path(spec["work"])
    phantom = brain_phantom(dim=2, realisations=math.ceil(max(sizes) / 3))
    groups = {}
    for n in sorted(set(sizes)):
        group = phantom_group(n, phantom, seed=seed * 100_003 + n * 1_009)
        path = work / f"group_{n}.pt"
        torch.save({"images": group.images.contiguous()}, path)
        g = group.grid
        groups[n] = {"data": str(path), "gwi_mm": group.warping_index(),
                     "grid": {"shape": g.shape, "spacing": g.spacing, "origin": g.origin,
                              "direction": g.direction}}
    Path(spec["out"]).write_text(json.dumps({"groups": groups, "hardware": hardware()}))


def series(records: list[dict], revisions: list[str]) -> list[tuple[str, str]]:
    """The (revision, method) pairs measured, revisions in their order, methods in the order
    of first appearance."""
    methods = list(dict.fromkeys(r.get("method", "xcoreg") for r in records)) or ["xcoreg"]
    return [(rev, m) for rev in revisions for m in methods
            if any(r["revision"] == rev and r.get("method", "xcoreg") == m for r in records)]


def summarise(records: list[dict], revisions: list[str]) -> list[dict]:
    """Log-log slopes in N per (revision, method, stage) of the step and total s/it and the
    memory."""
    fits = []
    for revision, method in series(records, revisions):
        for stage in ("ffd", "rigid"):
            rows = sorted((r for r in records if r["revision"] == revision
                           and r.get("method", "xcoreg") == method and r["stage"] == stage),
                          key=lambda r: r["N"])
            if not rows:
                continue
            n = [r["N"] for r in rows]
            fit = {"revision": revision, "method": method, "stage": stage, "sizes": n}
            for key in ("seconds_per_iteration_step", "seconds_per_iteration_total",
                        "cpu_per_iteration_step", "cpu_per_iteration_total",
                        "peak_rss_mib", "rss_above_imports_mib"):
                fit[f"slope_{key}"] = loglog_slope(n, [r.get(key, math.nan) for r in rows])[0]
            fits.append(fit)
    return fits


def _f(value: float, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _label(revision: str, method: str, pairs: list[tuple[str, str]]) -> str:
    """A column or legend name of a (revision, method) series: the part that varies."""
    if len({m for _, m in pairs}) == 1:
        return revision
    if len({r for r, _ in pairs}) == 1:
        return method
    return f"{revision} {method}"


SLOPE_TARGETS = {"xcoreg": 1.1, "ape": 2.0}  # issue #23: X-CoReg <= 1.1, APE about 2
FASTER_FROM = 16  # issue #23: X-CoReg faster than every baseline at N >= 16
TIMES = ("seconds_per_iteration_step", "seconds_per_iteration_total",
         "cpu_per_iteration_step", "cpu_per_iteration_total")


def method_comparison(records: list[dict], fits: list[dict], revision: str) -> dict:
    """Issue #23 experiment 5 on ``revision``'s records, per stage: every baseline's step and
    total s/it over X-CoReg's at each N (> 1: X-CoReg faster), whether X-CoReg is faster than
    every baseline at each N >= :data:`FASTER_FROM` (both definitions), and the slopes beside
    their targets. Empty without X-CoReg and at least one baseline."""
    out = {}
    for stage in ("ffd", "rigid"):
        rows = [r for r in records if r["revision"] == revision and r["stage"] == stage]
        methods = list(dict.fromkeys(r.get("method", "xcoreg") for r in rows))
        if "xcoreg" not in methods or len(methods) < 2:
            continue
        by = {(r.get("method", "xcoreg"), r["N"]): r for r in rows}
        sizes = sorted({r["N"] for r in rows})
        ratios, faster = {}, {}
        for n in sizes:
            ref = by.get(("xcoreg", n))
            if ref is None:
                continue
            for key in TIMES:
                if not ref.get(key, math.nan) > 0:
                    continue
                cell = {m: by[(m, n)].get(key, math.nan) / ref[key] for m in methods
                        if m != "xcoreg" and (m, n) in by}
                ratios.setdefault(key, {})[str(n)] = cell
                if n >= FASTER_FROM:
                    faster.setdefault(key, {})[str(n)] = all(v > 1 for v in cell.values())
        slopes = {f["method"]: {k: f.get(f"slope_{k}", math.nan) for k in TIMES}
                  for f in fits if f["revision"] == revision and f["stage"] == stage}
        out[stage] = {"methods": methods, "sizes": sizes, "ratio_to_xcoreg": ratios,
                      "xcoreg_faster_than_all": faster, "slopes": slopes}
    return out


def _on(device: str) -> str:
    return "one thread" if device == "cpu" else f"on {device}, one CPU thread"


def markdown(result: dict) -> str:
    s, revisions = result["settings"], result["revisions"]
    records, fits = result["scaling"], result["fits"]
    pairs = series(records, revisions)
    many = len({m for _, m in pairs}) > 1
    loads = [v for r in records + result["targets"] for v in r["load_1min"]]
    on = _on(s.get("device", "cpu"))
    lines = [
        ("# Cost per iteration of X-CoReg and the competing groupwise metrics against the "
         f"group size N (2D brain phantom, {on})" if many else
         f"# X-CoReg cost against the group size N (2D brain phantom, {on})"),
        "",
        f"Gathered on {result['hardware']}; one torch thread per process "
        f"(`OMP_NUM_THREADS=1`); 1-minute load average {min(loads, default=math.nan):.2f}-"
        f"{max(loads, default=math.nan):.2f} during the runs (2 cores shared with other jobs: "
        "times are upper bounds). Phantom 233 × 197 at 1 mm, bench_phantom's case-0 group of "
        f"each N (40 mm FFD misalignments, std 5.4 mm). {s['preset']} preset settings; "
        f"{s['iterations']} steps per registration (convergence off), {s['repeats']} timed "
        f"registrations after a {s['warmup']}-step warm-up in a fresh process per (revision, "
        + ("method, " if many else "") + "stage, N). *step*: median time between two Adam "
        "steps (first "
        f"{s['skip']} of each optimiser left out); *total*: `result.seconds / iterations` "
        "(bench_phantom.py's and the README's definition, set-up and final Gamma included); "
        "RSS: peak resident memory of the process, and above its own after the imports.",
        "",
        "Revisions: " + "; ".join(f"**{k}** = {v}" for k, v in result["revision_notes"].items()),
        "",
    ]
    if many:
        lines += ["Methods (`dcc-register --method`, only the objective on the sample differs): "
                  + ", ".join(f"**{m}**" for m in dict.fromkeys(m for _, m in pairs))
                  + ". cg and vi assume one intensity scale: on this multimodal phantom they "
                  "are timed only.", ""]
    for stage in ("ffd", "rigid"):
        rows = [r for r in records if r["stage"] == stage]
        if not rows:
            continue
        head = ["N"]
        for rev, method in pairs:
            name = _label(rev, method, pairs)
            head += [f"{name} step s/it", f"{name} total s/it", f"{name} RSS MiB (above imports)"]
        if len(revisions) == 2:
            head.append(f"step {revisions[0]} / {revisions[1]}")
        lines += [f"## {stage} stage", "", "| " + " | ".join(head) + " |",
                  "|" + " --- |" * len(head)]
        for n in sorted({r["N"] for r in rows}):
            cells, steps = [str(n)], []
            for rev, method in pairs:
                r = next((x for x in rows if x["N"] == n and x["revision"] == rev
                          and x.get("method", "xcoreg") == method), None)
                if r is None:
                    cells += ["—"] * 3
                    steps.append(math.nan)
                    continue
                steps.append(r["seconds_per_iteration_step"])
                cells += [_f(r["seconds_per_iteration_step"]),
                          _f(r["seconds_per_iteration_total"]),
                          f"{r['peak_rss_mib']:.0f} ({r['rss_above_imports_mib']:.0f})"]
            if len(revisions) == 2:  # X-CoReg of each revision
                xs = [steps[i] for i, (_, m) in enumerate(pairs) if m == "xcoreg"]
                cells.append(_f(xs[0] / xs[1], 2) if len(xs) == 2 and xs[1] else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Log-log slopes in N (least squares)", "",
              "| revision | method | stage | N | step s/it | total s/it | peak RSS "
              "| RSS above imports | CPU step s/it | CPU total s/it |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in fits:
        lines.append(
            f"| {f['revision']} | {f.get('method', 'xcoreg')} | {f['stage']} | "
            f"{min(f['sizes'])}-{max(f['sizes'])} | "
            f"{_f(f['slope_seconds_per_iteration_step'], 2)} | "
            f"{_f(f['slope_seconds_per_iteration_total'], 2)} | "
            f"{_f(f['slope_peak_rss_mib'], 2)} | {_f(f['slope_rss_above_imports_mib'], 2)} | "
            f"{_f(f.get('slope_cpu_per_iteration_step', math.nan), 2)} | "
            f"{_f(f.get('slope_cpu_per_iteration_total', math.nan), 2)} |")
    lines.append("")
    for stage, c in result.get("methods", {}).items():
        others = [m for m in c["methods"] if m != "xcoreg"]
        lines += [f"## Baselines against X-CoReg, {stage} stage ({revisions[-1]})", "",
                  "Seconds per iteration of the baseline / X-CoReg's at the same N, step "
                  "(total in brackets), by the wall clock and by the process' CPU time; > 1: "
                  "X-CoReg is faster.", ""]
        for clock, (k_step, k_total) in (
                ("wall", ("seconds_per_iteration_step", "seconds_per_iteration_total")),
                ("CPU", ("cpu_per_iteration_step", "cpu_per_iteration_total"))):
            step = c["ratio_to_xcoreg"].get(k_step, {})
            total = c["ratio_to_xcoreg"].get(k_total, {})
            if not step:
                continue
            lines += [f"| N ({clock}) | " + " | ".join(others) + " | X-CoReg faster than all "
                      f"(N ≥ {FASTER_FROM}) step / total |", "|" + " --- |" * (len(others) + 2)]
            for n in c["sizes"]:
                cell_s, cell_t = step.get(str(n), {}), total.get(str(n), {})
                fast = [c["xcoreg_faster_than_all"].get(k, {}).get(str(n))
                        for k in (k_step, k_total)]
                lines.append(f"| {n} | " + " | ".join(
                    f"{_f(cell_s.get(m, math.nan), 2)} ({_f(cell_t.get(m, math.nan), 2)})"
                    for m in others) + " | " + " / ".join(
                    "—" if v is None else ("yes" if v else "no") for v in fast) + " |")
            lines.append("")
        lines += ["Slopes against issue #23's targets (X-CoReg ≤ 1.1, APE about 2):", "",
                  "| method | step slope | total slope | CPU step slope | CPU total slope "
                  "| target |", "| --- | --- | --- | --- | --- | --- |"]
        for m, sl in c["slopes"].items():
            target = {"xcoreg": "≤ 1.1", "ape": "≈ 2"}.get(m, "—")
            lines.append(f"| {m} | " + " | ".join(_f(sl.get(k, math.nan), 2) for k in TIMES)
                         + f" | {target} |")
        lines.append("")
    if result["targets"]:
        device = s.get("device", "cpu")
        targets = TARGETS[device.split(":")[0]]
        gpu = device != "cpu"
        lines += [f"## Issue #22 targets (brain2d preset unchanged, 200 steps, {_on(device)})", "",
                  "| N | revision | total s/it | target | met | step s/it | peak RSS MiB |"
                  + (" peak GPU MiB |" if gpu else ""),
                  "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if gpu else "")]
        for r in sorted(result["targets"], key=lambda r: (r["N"], revisions.index(r["revision"]))):
            target = targets.get(r["N"])
            met = "—" if target is None else (
                "yes" if r["seconds_per_iteration_total"] <= target else "no")
            lines.append(
                f"| {r['N']} | {r['revision']} | {_f(r['seconds_per_iteration_total'])} | "
                f"{'—' if target is None else f'≤ {target}'} | {met} | "
                f"{_f(r['seconds_per_iteration_step'])} | {r['peak_rss_mib']:.0f} |"
                + (f" {r['gpu_peak_mib']:.0f} |" if gpu else ""))
        lines.append("")
    lines += ["Command:", "", "```bash", result["command"], "```", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    pairs = series(result["scaling"], result["revisions"])
    many = len({m for _, m in pairs}) > 1
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for _, m in pairs))}
    for f in result["fits"]:
        method = f.get("method", "xcoreg")
        rows = sorted((r for r in result["scaling"] if r["revision"] == f["revision"]
                       and r.get("method", "xcoreg") == method and r["stage"] == f["stage"]),
                      key=lambda r: r["N"])
        style = {"marker": "o" if f["stage"] == "ffd" else "s",
                 "linestyle": "-" if f["revision"] == result["revisions"][0] else "--"}
        if many:
            style["color"] = colours[method]
        name = f"{_label(f['revision'], method, pairs)} {f['stage']}"
        for ax, key in ((left, "seconds_per_iteration_step"), (right, "rss_above_imports_mib")):
            points = [(r["N"], r[key]) for r in rows if r[key] > 0]  # log axes
            if points:
                ax.plot(*zip(*points, strict=True), **style,
                        label=f"{name}: slope {f['slope_' + key]:.2f}")
    for ax, label in ((left, "seconds per iteration (step median)"),
                      (right, "peak RSS above the imports (MiB)")):
        if ax.lines:
            ax.set_xscale("log")
            ax.set_yscale("log")
            sizes = sorted({r["N"] for r in result["scaling"]})  # ticks at the sizes measured
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("group size N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, title="log-log slope", title_fontsize=7)
    left.set_title(("Cost per iteration of each method" if many else "X-CoReg cost per "
                    "iteration") + ", one thread", fontsize=9)
    right.set_title("Peak memory of a fresh process (ru_maxrss) above its imports", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child)
        return
    if args.make_groups is not None:
        make_groups(args.make_groups)
        return
    import yaml  # not torch nor dcc here: see spawn

    command = shlex.join(["python", "bench/bench_scaling.py",
                          *(sys.argv[1:] if argv is None else argv)])
    stages = ["ffd", "rigid"] if args.stage == "both" else [args.stage]
    settings_file = ROOT / "dcc" / "coreg" / "presets" / f"{PRESET}.yaml"
    preset = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    dirty = git("status", "--porcelain", "--", "dcc")
    current = "HEAD" + ("+dirty" if dirty else "")
    notes = {current: f"this tree ({ROOT}) at {git('rev-parse', '--short', 'HEAD')}"
             + (" with uncommitted changes under dcc/" if dirty else "")}
    trees = [(current, ROOT)]
    made = None
    if args.revision:
        path, short, created = worktree(args.revision)
        made = path if created else None
        trees.insert(0, (short, path))
        notes = {short: f"git worktree {path}", **notes}
    revisions = [name for name, _ in trees]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    scaling, targets = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
            work = Path(tmp)
            made_groups, _ = spawn("--make-groups", {
                "sizes": args.sizes + args.target_sizes, "seed": args.seed, "work": str(work)},
                ROOT, work, "groups")
            groups = {int(n): g for n, g in made_groups["groups"].items()}
            parent_rss = _rss_mib()  # its own: ru_maxrss would start from its parent's
            base = {"settings": preset, "iterations": args.iterations, "repeats": args.repeats,
                    "warmup": args.warmup, "skip": args.skip, "device": args.device}
            jobs = [(n, stage, method, scaling) for n in args.sizes for stage in stages
                    for method in args.methods]
            jobs += [(n, "preset", "xcoreg", targets) for n in args.target_sizes]
            for n, stage, method, into in jobs:
                for name, root in trees:  # the revisions in turn for each N: same load
                    if method != "xcoreg" and root != ROOT:
                        continue  # another revision: X-CoReg only
                    spec = {**base, **groups[n], "N": n, "stage": stage, "revision": name,
                            "method": method}
                    record = run_child(spec, root, work)
                    record["gwi_before_mm"] = groups[n]["gwi_mm"]
                    into.append(record)
                    print(f"{name:>10} {method:>6} {stage:>6} N={n:<4} "
                          f"step {record['seconds_per_iteration_step']:.4f} "
                          f"total {record['seconds_per_iteration_total']:.4f} s/it  "
                          f"CPU step {record['cpu_per_iteration_step']:.4f}  "
                          f"peak {record['peak_rss_mib']:.0f} MiB  "
                          f"load {record['load_1min'][0]:.2f}", flush=True)
    finally:
        if made is not None:
            git("worktree", "remove", "--force", str(made))
    result = {
        "command": command,
        "hardware": made_groups["hardware"],
        "parent_rss_mib": parent_rss,
        "cpu_count": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "revisions": revisions,
        "revision_notes": notes,
        "settings": {**base, "preset": PRESET, "preset_file": str(settings_file),
                     "sizes": args.sizes, "stages": stages, "target_sizes": args.target_sizes,
                     "methods": args.methods,
                     "targets_s_per_it": {str(k): v for k, v in TARGETS[args.kind].items()},
                     "misalignment": {"ffd_spacing_mm": 40.0, "std_mm": 5.4,
                                      "seed": "seed * 100003 + N * 1009", "seed_arg": args.seed},
                     "threads": 1, "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
        "fits": summarise(scaling, revisions),
        "scaling": scaling,
        "targets": targets,
    }
    result["methods"] = method_comparison(scaling, result["fits"], revisions[-1])
    (args.out / "scaling.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (args.out / "scaling.md").write_text(markdown(result), encoding="utf-8")
    if result["fits"]:
        plot(result, args.out / "scaling.png")
    print(markdown(result))
    figure = ", scaling.png" if result["fits"] else ""
    print(f"wrote {args.out}/scaling.json, scaling.md{figure}")


if __name__ == "__main__":
    main()
