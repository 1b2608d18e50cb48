"""Seconds per X-CoReg iteration against the number of processes (issue #22, distributed mode).

One phantom group of ``--size`` images (``dcc.data.misalignment.phantom_group``: the 2D brain
phantom at 1 mm, 233 x 197, 40 mm FFD misalignments) is registered by P = ``--processes``
processes launched by ``torchrun --standalone`` (gloo, ``OMP_NUM_THREADS=1`` and one torch
thread each): P = 1 is the single-process engine (no process group), P > 1 shards the group
(``dcc.coreg.distributed.shard``). Settings: the brain2d preset's finest level
(``StageConfig.finest_level``: one 20 mm FFD level at full resolution; K, L and the sample
rate of the preset) with ``--iterations`` steps (convergence test off), after an untimed warm-up of
``--warmup`` steps. Per P (process 0's view):

* **step**: median time between two consecutive Adam steps (a global optimiser hook; the first
  two steps left out), the time of one iteration of Algorithm 1 in the slowest process (every
  step waits for the all-reduce); **CPU**: process 0's CPU seconds in that interval (all its
  threads), what a step costs a process when it has a core of its own (less sensitive to other
  jobs on the machine than the wall time);
* **total**: ``result.seconds / iterations`` (set-up, EM warm-up, checks and the final Gamma
  included), as ``bench/bench_phantom.py`` and ``bench/bench_scaling.py`` define it;
* **collectives**: the calls, bytes (per process, sent into each all-reduce / all-gather) and
  seconds (waiting for the slowest process included) of the ``torch.distributed`` collectives
  per step of the timed run, counted by wrapping them;
* X and gWI (Eq. 49) of the gathered transforms: the same registration for every P.

A machine with fewer cores than P processes oversubscribes (the markdown says so). Results go
to ``--out`` (``distributed.json``, ``distributed.md``). Not part of the test suite. Example::

    python bench/bench_distributed.py --size 64 --processes 1 2 4 --out results/distributed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="images in the group (N)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--iterations", type=int, default=30, help="timed Adam steps")
    p.add_argument("--warmup", type=int, default=3, help="steps of the untimed registration")
    p.add_argument("--seed", type=int, default=0, help="misalignment seed")
    p.add_argument("--out", type=Path, default=Path("results/distributed"))
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None and (min(args.processes) < 1 or args.size < max(args.processes)
                               or args.size < 2 or args.iterations < 3 or args.warmup < 1):
        p.error("need 1 <= processes <= size, size >= 2, iterations >= 3, warmup >= 1")
    return args


# ------------------------------------------------------------------------ one process of P
def child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from dcc.coreg import XCoReg, load_preset
    from dcc.coreg.distributed import shard
    from dcc.data.misalignment import phantom_group

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    group = phantom_group(spec["size"], seed=spec["seed"])
    part = shard(spec["size"], rank, world)

    def config(iterations):
        cfg = load_preset("brain2d", progress=False, tolerance=0.0)
        cfg.stages = [stage.finest_level() for stage in cfg.stages]  # one 20 mm level
        for stage in cfg.stages:
            stage.iterations = iterations
        return cfg

    counts = {"calls": 0, "bytes": 0, "seconds": 0.0}

    def counted(collective):
        def wrapper(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            counts["calls"] += 1
            counts["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
            start = time.perf_counter()
            try:
                return collective(*args, **kwargs)
            finally:
                counts["seconds"] += time.perf_counter() - start
        return wrapper

    for name in ("all_reduce", "all_gather", "all_gather_object"):
        setattr(dist, name, counted(getattr(dist, name)))
    stamps: list[tuple] = []  # per Adam step: optimiser, time, CPU time, collectives so far
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stamps.append(
        (id(optimizer), time.perf_counter(), time.process_time(), counts["calls"],
         counts["bytes"], counts["seconds"])))

    def register(iterations):
        return XCoReg(config(iterations)).register(group.images[part], group.grid,
                                                   distributed=world > 1)

    register(spec["warmup"])  # untimed: lazy imports, first-touch allocations
    stamps.clear()
    counts.update(calls=0, bytes=0, seconds=0.0)
    load = os.getloadavg()[0]
    result = register(spec["iterations"])
    transform = result.gather_transform()
    iterations = sum(s.iterations for s in result.stages)
    # between two consecutive steps of one optimiser: seconds, and the collectives' calls, bytes
    # and seconds (the first interval left out)
    steps = [[u - v for u, v in zip(b[1:], a[1:], strict=True)]
             for a, b in zip(stamps, stamps[1:], strict=False) if a[0] == b[0]][1:]
    step = {key: statistics.median(s[i] for s in steps) for i, key in
            enumerate(("seconds", "cpu_seconds", "calls", "bytes", "collective_seconds"))}
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({
            "processes": world,
            "images_per_process": [shard(spec["size"], r, world).stop
                                   - shard(spec["size"], r, world).start for r in range(world)],
            "step_seconds": step["seconds"],
            "step_cpu_seconds": step["cpu_seconds"],
            "step_collectives": step["calls"],
            "step_collective_bytes": step["bytes"],
            "step_collective_seconds": step["collective_seconds"],
            "total_seconds_per_iteration": result.seconds / iterations,
            "seconds": result.seconds,
            "iterations": iterations,
            "collectives": counts["calls"],
            "collective_bytes": counts["bytes"],
            "collective_seconds": counts["seconds"],
            "x_metric": result.x_metric,
            "gwi_mm": group.warping_index(transform),
            "gwi_before_mm": group.warping_index(),
            "load_1min": [load, os.getloadavg()[0]],
            "torch": torch.__version__,
        }))
    if world > 1:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the launches
def launch(processes: int, spec: dict, work: Path) -> dict:
    spec = {**spec, "out": str(work / f"p{processes}.json")}
    path = work / f"p{processes}.spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), str(Path(__file__).resolve()),
               "--child", str(path)]
    proc = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{processes} processes: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(Path(spec["out"]).read_text(encoding="utf-8"))


def markdown(result: dict) -> str:
    s = result["settings"]
    loads = [v for r in result["runs"] for v in r["load_1min"]]
    lines = [
        "# X-CoReg across processes (gloo, one thread each): seconds per iteration",
        "",
        f"Gathered on {result['hardware']}; 1-minute load average {result['load_before']:.2f} "
        f"before the runs, {min(loads):.2f}-{max(loads):.2f} during the timed ones (this "
        f"bench's own processes included). Group: N = {s['size']} "
        "brain phantom images (233 x 197 at 1 mm, 40 mm FFD misalignments), brain2d preset "
        "(its finest level: one 20 mm FFD stage at full resolution; K, L and the sample rate "
        f"of the preset), {s['iterations']} timed steps "
        "after an untimed warm-up. *step*: median interval between Adam steps; *CPU*: process "
        "0's CPU seconds in it; *total*: "
        "result.seconds / iterations; *collectives*: medians per step of process 0's calls, "
        "the bytes it contributed and its seconds inside them (waiting for the slower "
        "processes included).",
        "",
        "| processes | images each | step s | speed-up | CPU s per step | total s/it | "
        "collectives per step | KiB per step | s in collectives per step | X | gWI mm |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = result["runs"][0]["step_seconds"] if result["runs"][0]["processes"] == 1 else None
    for r in result["runs"]:
        speed = "—" if base is None else f"{base / r['step_seconds']:.2f}"
        each = sorted(set(r["images_per_process"]))
        lines.append(
            f"| {r['processes']} | {'/'.join(map(str, each))} | {r['step_seconds']:.4f} | "
            f"{speed} | {r['step_cpu_seconds']:.4f} | {r['total_seconds_per_iteration']:.4f} | "
            f"{r['step_collectives']:g} | {r['step_collective_bytes'] / 1024:.1f} | "
            f"{r['step_collective_seconds']:.4f} | {r['x_metric']:.4f} | "
            f"{r['gwi_mm']:.3f} |")
    over = [r["processes"] for r in result["runs"] if r["processes"] > result["cores"]]
    if over:
        lines += ["", f"P = {', '.join(map(str, over))} run more processes than the "
                      f"{result['cores']} cores: oversubscribed, not a measure of scaling."]
    lines += ["", f"gWI before: {result['runs'][0]['gwi_before_mm']:.3f} mm. Command: "
                  f"`{result['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child)
        return
    from dcc.evaluation.runs import hardware

    spec = {"size": args.size, "iterations": args.iterations, "warmup": args.warmup,
            "seed": args.seed}
    runs, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            start = time.perf_counter()
            runs.append(launch(processes, spec, Path(tmp)))
            print(f"{processes} processes: {runs[-1]['step_seconds']:.4f} s per step "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    result = {"settings": spec, "runs": runs, "cores": os.cpu_count(), "load_before": load_before,
              "hardware": hardware(),
              "command": " ".join(["python", "bench/bench_distributed.py", *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=1))
    (args.out / "distributed.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    if not all(math.isfinite(r["x_metric"]) for r in runs):
        raise SystemExit("a run ended without a finite X")


if __name__ == "__main__":
    main()
