"""Learning curves of DCC training runs: validation Reg DSC against training minutes.

Reads the CSV logs of Hydra run folders (``<run>/csv/version_*/metrics.csv``, written with the
``csv`` logger and the ``training_time`` callback) and writes a PNG of ``val/reg_dsc`` (and
``val/seg_dsc``) against ``val/train_minutes`` plus a Markdown table of each run's settings and
best/last values::

    python bench/mscmr_curves.py /work/runs/r_* --out results/mscmr_recipes
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import yaml


def read_curve(run: Path) -> dict[str, list[float]]:
    """``{"minutes", "reg", "seg", "unreg", "step"}`` of the validation rows of a run's CSV log
    (versions concatenated in order: a resumed run continues its curve)."""
    curve: dict[str, list[float]] = {k: [] for k in ("minutes", "reg", "seg", "unreg", "step")}
    offset = 0.0
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        last = 0.0
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if not row.get("val/train_minutes"):
                    continue
                last = float(row["val/train_minutes"])
                curve["minutes"].append(offset + last)
                curve["step"].append(float(row["step"]))
                for key, name in (("reg", "val/reg_dsc"), ("seg", "val/seg_dsc"),
                                  ("unreg", "val/unreg_dsc")):
                    value = row.get(name)
                    curve[key].append(float(value) if value else math.nan)
        offset += last
    return curve


def run_settings(run: Path) -> str:
    """The overrides the run was started with (``.hydra/overrides.yaml``)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return "?"
    overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    skip = ("hydra.", "threads", "tags", "test=", "trainer.max_epochs", "data.cache_dir")
    return " ".join(o for o in overrides if not o.startswith(skip))


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
            f"| {run.name} | `{run_settings(run)}` | {int(curve['step'][-1])} | "
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
