"""The shipped DCC model (or ``--checkpoint``) on whole MyoPS short-axis stacks: every test
patient's C0/LGE/T2 stacks as they are stored (3-5 thick slices, ~0.73 mm in-plane, the full
field of view), registered and segmented by ``dcc-register --method dcc``; the pairwise Dice of
the manual labels before/after over the whole stack, the network time per stack, and the time
of a 10-slice stack (the patient's slices repeated).

    python bench/bench_dcc_stacks.py --out results/dcc_stacks

The stacks of one MyoPS patient share a grid and one label map, so "before" is the Dice of the
stored (aligned up to the acquisitions' own motion) stacks: a network that moves an aligned
group apart lowers it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from dcc.cli.register import main as dcc_register
from dcc.data.cardiac import MYOPS_SEQUENCES, data_root, merge_labels
from dcc.data.datasets import DEFAULT_SPLIT_FILE, read_split
from dcc.evaluation.runs import hardware


def _merged_labels(case: Path, folder: Path) -> str:
    raw = sitk.ReadImage(str(case / f"{case.name}_gd.nii.gz"))
    merged = sitk.GetImageFromArray(merge_labels(sitk.GetArrayFromImage(raw)).numpy()
                                    .astype("int16"))
    merged.CopyInformation(raw)
    path = folder / f"{case.name}_labels.nii.gz"
    sitk.WriteImage(merged, str(path))
    return str(path)


def _repeated(paths: list[str], folder: Path, depth: int) -> list[str]:
    """The stacks with their slices repeated to ``depth`` slices (for the timing)."""
    out = []
    for path in paths:
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
        tiled = array[[k % array.shape[0] for k in range(depth)]]
        repeated = sitk.GetImageFromArray(tiled)
        repeated.SetSpacing(image.GetSpacing())
        repeated.SetOrigin(image.GetOrigin())
        repeated.SetDirection(image.GetDirection())
        out.append(str(folder / f"{depth}_{Path(path).name}"))
        sitk.WriteImage(repeated, out[-1])
    return out


def _run(argv: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = dcc_register(argv)
    if code != 0:
        raise RuntimeError(f"dcc-register {' '.join(argv)} failed: {log.getvalue()}")
    out = Path(argv[argv.index("--out") + 1])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return report, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a DCC checkpoint (default: the shipped model)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/dcc_stacks")
    args = p.parse_args(argv)
    root = data_root()
    if root is None:
        print("bench_dcc_stacks: MyoPS data not found; set DCC_DATA_ROOT", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    extra = ["--method", "dcc", "--threads", str(args.threads), "--quiet"]
    if args.checkpoint:
        extra += ["--checkpoint", args.checkpoint]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dcc_stacks.") as tmp:
        work = Path(tmp)
        for name in read_split(DEFAULT_SPLIT_FILE)[args.split]:
            case = root / "myops2020" / name
            images = [str(case / f"{name}_{s}.nii.gz") for s in MYOPS_SEQUENCES]
            labels = _merged_labels(case, work)
            report, seconds = _run([*images, "--labels", labels, labels, labels,
                                    "--out", str(work / name), *extra])
            depth = sitk.ReadImage(images[0]).GetSize()[2]
            ten, _ = _run([*_repeated(images, work, 10), "--out", str(work / f"{name}_10"),
                           *extra])
            rows.append({
                "case": name, "slices": depth,
                "dice_before": report["dice_before"]["mean"],
                "dice_after": report["dice_after"]["mean"],
                "hd95_before_mm": report["surface_distance_before_mm"]["hd95"]["mean"],
                "hd95_after_mm": report["surface_distance_after_mm"]["hd95"]["mean"],
                "heart_slices": sum(s["heart"] for s in report["slices"]),
                "network_s": report["inference_s"], "program_s": seconds,
                "network_s_10_slices": ten["inference_s"],
                "grid": report["common_grid"]["shape"],
            })
            print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| case | slices (heart) | grid | Dice before | after | HD95 before (mm) | after | "
             "network s | 10-slice network s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['slices']} ({r['heart_slices']}) | "
                     f"{'x'.join(map(str, r['grid']))} | {r['dice_before']:.3f} | "
                     f"{r['dice_after']:.3f} | {r['hd95_before_mm']:.1f} | "
                     f"{r['hd95_after_mm']:.1f} | {r['network_s']:.2f} | "
                     f"{r['network_s_10_slices']:.2f} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in
            ("dice_before", "dice_after", "network_s", "network_s_10_slices")}
    lines.append(f"| mean | | | {mean['dice_before']:.3f} | {mean['dice_after']:.3f} | | | "
                 f"{mean['network_s']:.2f} | {mean['network_s_10_slices']:.2f} |")
    command = "python bench/bench_dcc_stacks.py " + " ".join(argv if argv else sys.argv[1:])
    model = Path(args.checkpoint).name if args.checkpoint else "the shipped dcc_all_myops.pt"
    text = (f"# The DCC model on whole MyoPS stacks ({args.split} patients)\n\nCommand: `{command}`"
            f"\n\nHardware: {hardware()}; {args.threads} torch thread(s).\n\nBudget: one forward "
            f"pass of {model} per stack (all slices in one batch), no X-CoReg refinement; times "
            "are the network and EM posterior alone (`inference_s` of report.json).\n\n"
            + "\n".join(lines) + "\n")
    (out / "dcc_stacks.md").write_text(text)
    (out / "dcc_stacks.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
