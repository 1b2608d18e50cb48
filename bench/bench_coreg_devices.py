"""X-CoReg on CPU and on CUDA: the same MyoPS groups, the same settings, the same seed (issue #6).

Two steps, so that the groups can travel to a GPU machine without the MyoPS volumes::

    python bench/bench_coreg_devices.py prepare --dir groups --cases Case3001,Case3027 --seed 0
    python bench/bench_coreg_devices.py run --dir groups --devices cpu cuda \
        --save results/coreg_devices

``prepare`` writes each case's misaligned C0/LGE/T2 group with its labels exactly as
``bench/bench_myops.py`` builds it (:func:`dcc.data.myops_groups.write_group`, ``smooth`` model:
same seeds, same crop). ``run`` registers every group with ``dcc-register --stages rigid,ffd
--preset cardiac2d --seed S`` on every device, each run in its own process (CPU runs at one
thread, all runs in parallel up to ``--jobs``), and tabulates the mean pairwise label Dice before
and after, the final X and the registration time per device, with the largest CPU/CUDA Dice
difference. Arguments after ``--`` go to ``dcc-register``.

``run --in-process`` registers each group in this process instead, one run at a time (a first,
untimed registration per device takes CUDA's start-up out of the times), from the
``group.pt`` that ``prepare`` also writes: the images, fields of view and labels on the common
grid and the settings exactly as ``dcc-register`` passes them to ``XCoReg.register``. It needs
neither SimpleITK nor the NIfTI reader (a GPU machine whose image lacks them, issue #22's "2D
cardiac group in under a second"); its Dice warps the common-grid labels (nearest neighbour),
so it can differ from dcc-register's, which warps each label map from its own grid.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = ("C0", "LGE", "T2")


def prepare(args: argparse.Namespace) -> None:
    from dcc.data.cardiac import data_root, myops_cases
    from dcc.data.myops_groups import write_group

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    indexed = {case.name: (i, case) for i, case in enumerate(myops_cases(data_root()))}
    unknown = sorted(set(names) - set(indexed))
    if unknown:
        raise SystemExit(f"bench_coreg_devices: unknown cases {', '.join(unknown)}")
    from dataclasses import asdict

    import torch

    from dcc.cli.register import build_parser, load_group, make_config

    for name in names:
        index, case = indexed[name]
        folder = Path(args.dir) / name
        write_group(case, index, folder, "smooth", args.seed)
        # what dcc-register passes to XCoReg.register (no masks, no roi), for --in-process
        paths = [str(folder / f"{s}.nii.gz") for s in SEQUENCES]
        labels = [str(folder / f"{s}_labels.nii.gz") for s in SEQUENCES]
        cli = build_parser().parse_args([*paths, "--labels", *labels, "--out", "unused",
                                         "--stages", "rigid,ffd", "--preset", "cardiac2d",
                                         "--seed", str(args.seed), "--quiet"])
        _, _, common, images, valid, warped_labels = load_group(paths, labels, None)
        config = make_config(cli, common)
        torch.save({"images": images, "valid": valid, "labels": warped_labels,
                    "grid": common.to_dict(), "config": asdict(config)}, folder / "group.pt")
        print(f"wrote {folder}", flush=True)


def _register(folder: Path, device: str, seed: int, extra: list[str]) -> dict:
    out = folder / f"out_{device.replace(':', '_')}"
    argv = [str(folder / f"{s}.nii.gz") for s in SEQUENCES]
    argv += ["--labels", *(str(folder / f"{s}_labels.nii.gz") for s in SEQUENCES)]
    argv += ["--out", str(out), "--overwrite", "--quiet", "--stages", "rigid,ffd",
             "--preset", "cardiac2d", "--seed", str(seed), "--device", device, "--threads", "1",
             *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = ("import sys; from dcc.cli.register import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-600:]}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"dice_before": report["dice_before"]["mean"],
            "dice_after": report["dice_after"]["mean"], "x_metric": report["x_metric"],
            "seconds": report["wall_time_s"], "restarts": report.get("diagnostics")}


def _register_in_process(folder: Path, device: str, seed: int) -> dict:
    """The group of ``folder/group.pt`` registered in this process on ``device``."""
    import torch

    from dcc.coreg import XCoReg, XCoRegConfig
    from dcc.data.misalignment import warp_images
    from dcc.metrics.functional import pairwise_dice
    from dcc.spatial.grid import Grid

    data = torch.load(folder / "group.pt", weights_only=False)
    config = XCoRegConfig(**data["config"])
    config.device, config.seed, config.progress = device, seed, False
    grid, labels = Grid(**{k: tuple(v) for k, v in data["grid"].items()}), data["labels"]
    result = XCoReg(config).register(data["images"], grid, valid=data["valid"], labels=labels)
    with torch.no_grad():
        after = warp_images(labels.to(device), grid, result.transform, mode="nearest").cpu()
    return {"dice_before": pairwise_dice(labels)["mean"],
            "dice_after": pairwise_dice(after)["mean"], "x_metric": result.x_metric,
            "seconds": result.seconds}


def run(args: argparse.Namespace, extra: list[str]) -> None:
    folders = sorted(p for p in Path(args.dir).iterdir() if (p / "C0.nii.gz").exists()
                     or (args.in_process and (p / "group.pt").exists()))
    jobs = [(folder, device) for device in args.devices for folder in folders]
    if args.in_process:
        import torch

        torch.set_num_threads(1)  # as dcc-register --threads 1 in the other mode
        results = []
        for device in args.devices:  # untimed: CUDA's context, kernels and workspaces
            _register_in_process(folders[0], device, args.seed)
            results += [_register_in_process(f, device, args.seed) for f in folders]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda job: _register(*job, args.seed, extra), jobs))
    table = {(folder.name, device): r for (folder, device), r in zip(jobs, results, strict=True)}
    command = "python bench/bench_coreg_devices.py " + " ".join(sys.argv[1:])
    import torch

    device_names = {d: (torch.cuda.get_device_name(torch.device(d)) if d.startswith("cuda")
                        else f"CPU, {os.cpu_count()} logical, 1 thread per run")
                    for d in args.devices}
    lines = [
        "# X-CoReg on CPU and CUDA: the same groups, settings and seed (issue #6)", "",
        f"Command: `{command}`; torch {torch.__version__}.",
        "Devices: " + "; ".join(f"{d} = {n}" for d, n in device_names.items()) + ".",
        "Groups: MyoPS C0/LGE/T2 slices under the known misalignment of "
        f"`bench/bench_myops.py` (seed {args.seed}); `dcc-register --stages rigid,ffd --preset "
        f"cardiac2d --seed {args.seed}`. Mean pairwise Dice of the labels 1-3; X = final "
        "X-metric; s = registration seconds "
        + ("(one run at a time in the bench's process, after an untimed run per device; Dice "
           "of the common-grid labels warped by nearest neighbour)." if args.in_process else
           "(runs in parallel, so times are indicative)."), "",
        "| case | Dice before | " + " | ".join(f"Dice {d} | X {d} | s {d}" for d in args.devices)
        + " |",
        "|---|---|" + "---|---|---|" * len(args.devices),
    ]
    for folder in folders:
        rows = [table[(folder.name, d)] for d in args.devices]
        before = next((r["dice_before"] for r in rows if "dice_before" in r), float("nan"))
        cells = [f"{r['dice_after']:.3f} | {r['x_metric']:.4f} | {r['seconds']:.1f}"
                 if "dice_after" in r else "failed | | " for r in rows]
        lines.append(f"| {folder.name} | {before:.3f} | " + " | ".join(cells) + " |")
    if len(args.devices) == 2:
        diffs = [abs(table[(f.name, args.devices[0])]["dice_after"]
                     - table[(f.name, args.devices[1])]["dice_after"]) for f in folders
                 if all("dice_after" in table[(f.name, d)] for d in args.devices)]
        if diffs:
            lines += ["", f"Largest |Dice {args.devices[0]} - Dice {args.devices[1]}|: "
                      f"{max(diffs):.4f}; mean {sum(diffs) / len(diffs):.4f} over "
                      f"{len(diffs)} groups."]
    errors = [f"- {case} on {device}: {r['error']}" for (case, device), r in table.items()
              if "error" in r]
    if errors:
        lines += ["", "Failures:", *errors]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        prefix = Path(args.save)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(text, encoding="utf-8")
        payload = {"command": command, "devices": device_names,
                   "runs": [{"case": c, "device": d, **r} for (c, d), r in table.items()]}
        prefix.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n",
                                               encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the misaligned groups as NIfTI")
    p.add_argument("--dir", required=True)
    p.add_argument("--cases", default="Case3001,Case3002,Case3003,Case3007,Case3010,Case3027")
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="register every group on every device")
    r.add_argument("--dir", required=True)
    r.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    r.add_argument("--seed", type=int, default=0, help="dcc-register --seed")
    r.add_argument("--jobs", type=int, default=12, help="runs at a time")
    r.add_argument("--in-process", action="store_true",
                   help="register group.pt in this process, one run at a time (no dcc-register)")
    r.add_argument("--save", metavar="PREFIX", help="write PREFIX.md and PREFIX.json")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.command == "prepare":
        prepare(args)
    else:
        run(args, extra)


if __name__ == "__main__":
    main()
