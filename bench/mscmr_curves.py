"""Learning curves of DCC training runs: validation Reg DSC against training minutes.

Reads the CSV logs of Hydra run folders (``<run>/csv/version_*/metrics.csv``, written with the
``csv`` logger and the ``training_time`` callback) and writes a PNG of ``val/reg_dsc`` (and
``val/seg_dsc``) against ``val/train_minutes`` plus a Markdown table of each run's settings and
best/last values::

    python bench/mscmr_curves.py /work/runs/r_* --out results/mscmr_recipes
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dcc.evaluation.runs import read_curve, run_overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="Hydra run folders")
    parser.add_argument("--out", type=Path, default=Path("results/mscmr_recipes"),
                        help="output stem: writes <out>.png and <out>.md")
    parser.add_argument("--title", default="MyoPS validation Reg DSC against training time")
    args = parser.parse_args(argv)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_reg, ax_seg = fig.subplots(1, 2)
    lines = [
        f"# {args.title}",
        "",
        "| run | settings | steps | minutes | best val Reg DSC (at min) | last val Reg DSC | "
        "last val Seg DSC | unregistered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    unreg = math.nan
    for run in args.runs:
        curve = read_curve(run)
        if not curve["minutes"]:
            print(f"{run}: no validation rows yet, skipped")
            continue
        ax_reg.plot(curve["minutes"], curve["reg"], marker=".", label=run.name)
        ax_seg.plot(curve["minutes"], curve["seg"], marker=".", label=run.name)
        best = max(range(len(curve["reg"])), key=lambda i: curve["reg"][i])
        unreg = curve["unreg"][-1]
        lines.append(
            f"| {run.name} | `{run_overrides(run)}` | {int(curve['step'][-1])} | "
            f"{curve['minutes'][-1]:.1f} | {curve['reg'][best]:.3f} ({curve['minutes'][best]:.1f}) "
            f"| {curve['reg'][-1]:.3f} | {curve['seg'][-1]:.3f} | {unreg:.3f} |"
        )
    if not math.isnan(unreg):
        ax_reg.axhline(unreg, color="gray", ls="--", lw=1, label="unregistered")
    for ax, name in ((ax_reg, "val Reg DSC"), (ax_seg, "val Seg DSC")):
        ax.set_xlabel("training minutes (validation excluded)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_reg.legend(fontsize=7)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
