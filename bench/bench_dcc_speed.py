"""Speed and memory of the DCC network (issue #8): one training step and inference per group.

One configuration per process (so the peak memory is its own)::

    OMP_WAIT_POLICY=PASSIVE python bench/bench_dcc_speed.py --threads 2

``--sweep`` runs the listed variants each in a fresh process and prints a Markdown table::

    OMP_WAIT_POLICY=PASSIVE python bench/bench_dcc_speed.py --threads 2 --sweep

A training step is forward + loss + backward + Adam step, timed twice: with a surrogate loss
(mean squares of the outputs: the network alone) and, when ``dcc.losses.DCCLoss`` is
importable, with the full DCC loss (Eqs. 41-47, every member labelled); the DCC loss is also
timed alone (forward and backward on fixed network outputs). Inference is a forward pass in
eval/inference mode, per group. Times are the minimum and median wall-clock seconds over
``--repeats`` after ``--warmup`` untimed calls, and the minimum and median process CPU seconds
(all threads: less sensitive to other people's jobs on a shared machine; on idle cores the wall
time is about CPU / threads). Peak memory is the process's maximum resident set size
(``getrusage``), torch's own import included; ``load`` is the 1-minute load average at the start
and at the end.

``--compare REV`` measures the code at git revision ``REV`` ("before": its ``dcc`` package,
extracted with ``git archive``, with this script) against the working tree ("after"), at 1
thread (CPU seconds: the cost, little affected by other jobs) and at 2 threads (wall seconds
with ``OMP_WAIT_POLICY=PASSIVE``: what a user waits for), each in its own process, and saves
``results/dcc_speed.md`` and ``.json`` with the command, the hardware and the load::

    python bench/bench_dcc_speed.py --compare ec1a941 --save results/dcc_speed
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dcc.nets import DCCNet

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "2 convs/block, D_r to full res": ["--block-convs", "2", "--reg-finest-level", "0"],
    "1 conv/block, D_r to full res": ["--reg-finest-level", "0"],
    "1 conv/block, D_r to 1/2 (default)": [],
    "default + channels-last": ["--channels-last"],
    "default with C=8": ["--channels", "8"],
}


def _dcc_loss(num_classes: int):
    """The full DCC loss over the network output, or ``None`` when dcc.losses is unavailable."""
    try:
        from dcc.losses import DCCLoss
    except ImportError:
        return None
    criterion = DCCLoss(num_classes=num_classes)
    takes_labels = "labels" in inspect.signature(criterion.forward).parameters

    def dcc_loss(images, out, rho, labelled, labels):
        extra = {"labels": labels} if takes_labels else {}
        probs = out.seg_logits.softmax(dim=2)
        return criterion(images, out.displacement, probs, rho, labelled, **extra).total

    return dcc_loss


def _surrogate(images, out, rho, labelled, labels):
    """Network only: mean squares of the outputs."""
    return out.seg_logits.square().mean() + out.displacement.square().mean()


def _times(fn, warmup: int, repeats: int, device: torch.device | None = None
           ) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of ``repeats`` calls after ``warmup`` calls (on a
    GPU the device is synchronised before each clock is read)."""
    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def measure(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    ndim = 2
    size = (args.size,) * ndim
    net = DCCNet(ndim=ndim, num_classes=4, num_domains=3, channels=args.channels,
                 levels=args.levels, block_convs=args.block_convs,
                 reg_finest_level=args.reg_finest_level)
    with torch.no_grad():  # non-zero heads, so every D_r layer is on the backward path
        for head in net.reg_heads.values():
            head.weight.normal_(0, 1e-3)
    images = torch.rand(args.batch, args.group, *size) * 100
    domains = torch.arange(args.group).remainder(3).expand(args.batch, -1).contiguous()
    labels = torch.randint(0, 4, (args.batch, args.group, *size))
    rho = torch.nn.functional.one_hot(labels, 4).movedim(-1, 2).float()
    labelled = torch.ones(args.batch, args.group, dtype=torch.bool)
    net, images, domains, labels, rho, labelled = (
        t.to(device) for t in (net, images, domains, labels, rho, labelled))
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if args.compile else net
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)  # as conf/model

    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def mixed():
        return torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)

    def train_step(loss_fn):
        optimiser.zero_grad(set_to_none=True)
        with mixed():
            out = model(images, domains)
            loss = loss_fn(images, out, rho, labelled, labels)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()

    def infer():
        with torch.inference_mode(), mixed():
            model(images, domains)

    result = {"params": net.num_parameters()}
    net.train()
    loss_fn = None if args.net_only else _dcc_loss(4)
    runs = {"net": _surrogate} | ({"step": loss_fn} if loss_fn is not None else {})
    for key, fn in runs.items():
        wall, cpu = _times(lambda fn=fn: train_step(fn), args.warmup, args.repeats, device)
        result |= {f"{key}_min": min(wall), f"{key}_med": statistics.median(wall),
                   f"{key}_cpu": min(cpu), f"{key}_cpu_med": statistics.median(cpu)}
    if loss_fn is not None:  # the loss alone: forward + backward on fixed network outputs
        with mixed():
            out = model(images, domains)
        fixed = type(out)(*(t.detach().requires_grad_() for t in out))

        def loss_step():
            with mixed():
                loss = loss_fn(images, fixed, rho, labelled, labels)
            loss.backward()

        wall, cpu = _times(loss_step, args.warmup, args.repeats, device)
        result |= {"loss_min": min(wall), "loss_med": statistics.median(wall),
                   "loss_cpu": min(cpu), "loss_cpu_med": statistics.median(cpu)}
    net.eval()
    wall, cpu = _times(infer, args.warmup, args.repeats, device)
    result |= {"infer_min": min(wall) / args.batch,
               "infer_med": statistics.median(wall) / args.batch,
               "infer_cpu": min(cpu) / args.batch,
               "infer_cpu_med": statistics.median(cpu) / args.batch}
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["load_start"], result["loadavg"] = load_start, os.getloadavg()[0]
    return result


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--block-convs", type=int, default=1)
    parser.add_argument("--reg-finest-level", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of the forward pass and the loss (the X-metric "
                        "and EM maths stay in float32 inside)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (slow to compile on a busy CPU)")
    parser.add_argument("--net-only", action="store_true", help="surrogate loss, no DCCLoss")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --sweep)")
    parser.add_argument("--sweep", action="store_true", help="run every variant in VARIANTS")
    parser.add_argument("--compare", metavar="REV",
                        help="before (dcc at git revision REV) / after (working tree) table")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--compare: alternate before/after this many times (best kept)")
    parser.add_argument("--save", metavar="PREFIX",
                        help="--compare/--matrix: write PREFIX.md and PREFIX.json (e.g. "
                        "results/dcc_speed)")
    parser.add_argument("--matrix", action="store_true",
                        help="every --batches x --precisions on --device, each in its own "
                        "process: steps per second, inference and peak memory (the GPU table)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=("fp32", "bf16", "fp16"))
    return parser.parse_args(argv)


def _strip(argv: list[str], options: set[str]) -> list[str]:
    """``argv`` without the given options (``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg.split("=", 1)[0] not in options:
            out.append(arg)
    return out


def _run_json(extra: list[str], env: dict | None = None) -> dict:
    """This script with ``extra`` arguments in a fresh process; its JSON line."""
    proc = subprocess.run([sys.executable, __file__, *extra, "--json"], capture_output=True,
                          text=True, check=False, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"bench_dcc_speed {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hardware() -> str:
    from dcc.evaluation.runs import cpu_name  # here: the timed runs import no more than they use

    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} "
            f"(MKL-DNN {torch.backends.mkldnn.is_available()}), Python {platform.python_version()}")


def _fmt(r: dict, key: str, kind: str) -> str:
    """``min / med`` of ``key`` (``kind`` ``cpu`` or ``wall``) in seconds."""
    if f"{key}_min" not in r:
        return "n/a"
    if kind == "cpu":
        return f"{r[f'{key}_cpu']:.3f} / {r.get(f'{key}_cpu_med', float('nan')):.3f}"
    return f"{r[f'{key}_min']:.3f} / {r[f'{key}_med']:.3f}"


def _report(lines: list[str], save: str | None, payload: dict) -> None:
    """Print the Markdown ``lines``; with ``save`` (a path prefix) also write them to
    ``<save>.md`` and ``payload`` to ``<save>.json``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if save:
        prefix = ROOT / save if not Path(save).is_absolute() else Path(save)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(text, encoding="utf-8")
        prefix.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n",
                                               encoding="utf-8")


def compare(args: argparse.Namespace, base: list[str]) -> None:
    """Before (``dcc`` at ``args.compare``) / after (working tree), 1 thread and 2 threads."""
    rev = subprocess.run(["git", "rev-parse", "--short", args.compare], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.strip()
    runs: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "dcc"], capture_output=True,
                                 check=True, cwd=ROOT).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        envs = {f"before ({rev})": {"PYTHONPATH": tmp}, "after (working tree)": {}}
        for _ in range(args.rounds):
            for threads in (1, 2):
                for label, extra_env in envs.items():
                    env = os.environ | {"OMP_NUM_THREADS": str(threads),
                                        "OMP_WAIT_POLICY": "PASSIVE"} | extra_env
                    r = _run_json([*base, "--threads", str(threads)], env)
                    old = runs.get((label, threads))
                    if old is not None:  # keep the best of the rounds, per figure
                        r = {k: min(v, old[k]) if k.endswith(("_min", "_cpu")) else v
                             for k, v in r.items()}
                        r["load_start"] = max(r["load_start"], old["load_start"])
                    runs[(label, threads)] = r
                    print(f"{label}, {threads} thread(s): full step CPU {_fmt(r, 'step', 'cpu')}"
                          f" s, wall {_fmt(r, 'step', 'wall')} s", flush=True)
    command = "python bench/bench_dcc_speed.py " + " ".join(sys.argv[1:])
    lines = [
        "# DCC network speed (issue #8): before / after",
        "",
        f"Command: `{command}` (each configuration in its own process).",
        f"Hardware: {_hardware()}.",
        f"Group of {args.group} images {args.size}x{args.size}, batch {args.batch}, DCCNet "
        f"C={args.channels}, L_R={args.levels} "
        f"({next(iter(runs.values()))['params'] / 1e6:.2f} M parameters). Training step = "
        "forward + loss + backward + Adam; *network* uses a surrogate loss (mean squares of the "
        "outputs), *full* the DCC loss (every member labelled). Inference per group, eval mode, "
        "`torch.inference_mode`. Times in seconds, `min / median` over the repeats; CPU = process "
        "CPU time (all threads), wall = `perf_counter`; 2 threads with `OMP_WAIT_POLICY=PASSIVE`. "
        "`load` = 1-minute load average at the start / end of the run (the machine is shared: "
        "wall times above ~1 s of load per core are inflated, compare CPU times; ratios within "
        "about 10 % are run-to-run noise, as a figure whose code did not change shows).",
        "",
        "| code | threads | network step CPU | DCC loss fwd+bwd CPU | full step CPU | inference "
        "CPU | network step wall | full step wall | inference wall | peak RSS (MiB) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, threads), r in sorted(runs.items(), key=lambda item: item[0][1]):
        lines.append(
            f"| {label} | {threads} | {_fmt(r, 'net', 'cpu')} | {_fmt(r, 'loss', 'cpu')} | "
            f"{_fmt(r, 'step', 'cpu')} | "
            f"{_fmt(r, 'infer', 'cpu')} | {_fmt(r, 'net', 'wall')} | {_fmt(r, 'step', 'wall')} | "
            f"{_fmt(r, 'infer', 'wall')} | {r['peak_mib']:.0f} | "
            f"{r['load_start']:.1f} / {r['loadavg']:.1f} |"
        )
    labels = list(dict.fromkeys(label for label, _ in runs))
    lines.append("")
    for threads in (1, 2):
        before, after = (runs[(label, threads)] for label in labels)
        ratios = [f"{name} {before[f'{key}_cpu'] / after[f'{key}_cpu']:.2f}x CPU, "
                  f"{before[f'{key}_min'] / after[f'{key}_min']:.2f}x wall"
                  for name, key in (("network step", "net"), ("DCC loss", "loss"),
                                    ("full step", "step"), ("inference", "infer"))
                  if f"{key}_min" in after and f"{key}_min" in before]
        lines.append(f"Speed-up (before / after, minima) at {threads} thread(s): "
                     + "; ".join(ratios) + ".")
    _report(lines, args.save, {
        "command": command, "hardware": _hardware(), "revision_before": rev,
        "runs": [{"code": label, "threads": threads, **r} for (label, threads), r in runs.items()],
    })


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return _hardware()


def matrix(args: argparse.Namespace, base: list[str]) -> None:
    """Training steps per second and inference per group for every batch size and precision
    on ``args.device`` (one process each), as a Markdown table (``--save``: and JSON)."""
    command = "python bench/bench_dcc_speed.py " + " ".join(sys.argv[1:])
    lines = [
        f"# DCC network speed on {args.device} (issue #8)", "",
        f"Command: `{command}` (each configuration in its own process).",
        f"Device: {_device_name(args.device)}.",
        f"Group of {args.group} images {args.size}x{args.size}, DCCNet C={args.channels}, "
        f"L_R={args.levels}" + (", torch.compile" if args.compile else "")
        + (", channels_last" if args.channels_last else "")
        + ". Training step = forward + full DCC loss (every member labelled) + backward + Adam, "
        "under `torch.autocast` at the given precision (the X-metric and EM "
        "maths run in float32 inside); *network* = the same with a surrogate loss. Seconds are "
        f"the minimum / median of {args.repeats} synchronised repeats after {args.warmup} "
        "warm-ups; steps/s and groups/s from the minimum.", "",
        "| batch | precision | full step (s) | steps/s | groups/s | network step (s) | "
        "DCC loss fwd+bwd (s) | inference per group (s) | peak GPU memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs = []
    for batch in args.batches:
        for precision in args.precisions:
            r = _run_json([*base, "--batch", str(batch), "--precision", precision])
            runs.append({"batch": batch, "precision": precision, **r})
            lines.append(
                f"| {batch} | {precision} | {_fmt(r, 'step', 'wall')} | "
                f"{1 / r['step_min']:.1f} | {batch / r['step_min']:.1f} | "
                f"{_fmt(r, 'net', 'wall')} | {_fmt(r, 'loss', 'wall')} | "
                f"{_fmt(r, 'infer', 'wall')} | {r.get('gpu_peak_mib', float('nan')):.0f} |")
            print(lines[-1], flush=True)
    _report(lines, args.save,
            {"command": command, "device": _device_name(args.device), "runs": runs})


def main(argv=None) -> None:
    args = parse(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.matrix:
        matrix(args, [f"--{key.replace('_', '-')}={getattr(args, key)}"
                      for key in ("device", "threads", "size", "group", "channels", "levels",
                                  "block_convs", "reg_finest_level", "warmup", "repeats")]
               + [f"--{flag.replace('_', '-')}" for flag in ("compile", "channels_last")
                  if getattr(args, flag)])
        return
    if args.compare:
        compare(args, _strip(argv if argv is not None else sys.argv[1:],
                             {"--compare", "--rounds", "--save", "--threads"}))
        return
    if not args.sweep:
        result = measure(args)
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:10s} {value:.4f}" if isinstance(value, float)
                      else f"{key:10s} {value}")
        return
    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--sweep"]
    print("| variant | params | net fwd+bwd+Adam min / med (s) | full step (DCCLoss) min / med "
          "(s) | inference min / med (s) | CPU s: net / step / inference | peak RSS (MiB) "
          "| load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, extra in VARIANTS.items():
        proc = subprocess.run([sys.executable, __file__, *base, *extra, "--json"],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1]} |||||||")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        step = (f"{r['step_min']:.3f} / {r['step_med']:.3f}" if "step_min" in r
                else "n/a (no dcc.losses)")
        print(f"| {name} | {r['params'] / 1e6:.2f} M | {r['net_min']:.3f} / {r['net_med']:.3f} "
              f"| {step} | {r['infer_min']:.3f} / {r['infer_med']:.3f} | {r['net_cpu']:.3f} / "
              f"{r.get('step_cpu', float('nan')):.3f} / {r['infer_cpu']:.3f} | "
              f"{r['peak_mib']:.0f} | {r['loadavg']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
