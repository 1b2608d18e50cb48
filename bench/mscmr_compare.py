"""Compare DCC training recipes on the same MyoPS test groups, against a reference run.

Reads each run folder's ``metrics/test_groups.csv`` (written by the test at the end of
``python train.py ...``) and its Hydra overrides, and writes a Markdown table: Reg DSC and Seg
DSC per sequence (mean over the test groups), the time per group, and paired t-tests against
the first run of the per-group Reg DSC and Seg DSC (``scipy.stats.ttest_rel``; per group, and
on the per-patient means, the conservative one: a slice's 20 misalignments and a patient's
slices are not independent)::

    python bench/mscmr_compare.py /work/runs/all_warm /work/runs/all_aug_warm --out results/x
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from dcc.evaluation.runs import (
    Run,
    best_checkpoint,
    budget,
    hardware,
    mean_std,
    paired_groups,
    patient,
    read_groups,
    values,
)

COLUMNS = ("reg_dsc", "seg_dsc/C0", "seg_dsc/LGE", "seg_dsc/T2", "seg_dsc")


def load(folder: Path) -> Run:
    table = folder / "metrics" / "test_groups.csv"
    if not table.is_file():
        raise SystemExit(f"{folder}: no metrics/test_groups.csv (train with test=true)")
    return Run("run", folder, folder, best_checkpoint(folder), read_groups(table), table)


def paired(a: Run, b: Run, column: str) -> str:
    """``B - A`` in points with the per-group and per-patient p-values."""
    r = paired_groups(
        {c: row[column] for c, row in a.rows.items()}, {c: row[column] for c, row in b.rows.items()}
    )
    return f"{r['diff_mean']:+.2f} (p {r['p']:.2g}; patients {r['p_patients']:.2g})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the reference")
    p.add_argument("--out", type=Path, help="write <out>.md")
    args = p.parse_args(argv)
    runs = [load(folder) for folder in args.runs]
    cases = set(runs[0].rows)
    for run in runs[1:]:
        if set(run.rows) != cases:
            raise SystemExit(f"{run.folder}: tested on other groups than {runs[0].folder}")
    ref = runs[0]
    lines = [
        "| run | Reg DSC | Seg C0 | Seg LGE | Seg T2 | time per group (s) | "
        f"Reg vs {ref.folder.name} | Seg vs {ref.folder.name} |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in runs:
        means = [100 * mean_std(values(run.rows, c))[0] for c in COLUMNS[:4]]
        time_s = mean_std(values(run.rows, "time_s"))[0]
        versus = ["", ""] if run is ref else [paired(ref, run, c) for c in ("reg_dsc", "seg_dsc")]
        lines.append(
            f"| {run.folder.name} | " + " | ".join(f"{m:.1f}" for m in means)
            + f" | {time_s:.3f} | {versus[0]} | {versus[1]} |"
        )
    unreg = 100 * mean_std(values(ref.rows, "unreg_dsc"))[0]
    lines += [
        "",
        "Commands (Hydra overrides of each run) and budgets (steps: optimizer steps, two per "
        "batch with `model.alternate_every=0`):",
        "",
    ]
    for run in runs:
        info = budget(run)
        lines.append(
            f"- {run.folder.name}: `{info.get('command')}`; {info.get('steps')} steps, "
            f"{info.get('train_minutes', float('nan')):.1f} training minutes at the last "
            f"validation, tested checkpoint {run.checkpoint.name if run.checkpoint else '?'}"
        )
    lines += [
        "",
        f"Test split: {len(cases)} groups of {len({patient(c) for c in cases})} patients "
        f"(unregistered Dice {unreg:.1f}). Dice in %. Hardware: {hardware()}. "
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python bench/mscmr_compare.py {' '.join(map(str, args.runs))}`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
