"""Is a failed MyoPS bench case the metric's fault or the optimiser's? X at the truth vs the result.

Rebuilds one ``smooth`` group of ``bench/bench_myops.py`` (dcc.data.myops_groups: same case
index and seed, so the same known misalignment), registers it with the ``cardiac2d`` preset
through the API (as ``dcc-register`` does, images on one grid), and evaluates the X-metric
(Eq. 8) with Gamma re-estimated by EM on the whole overlap (the engine's objective check) at three
alignments:

* ``identity``: the misaligned input;
* ``truth``: the exact inverse of the known misalignment (a dense field, fixed-point inverse);
* ``result``: the registration's phi.

Gamma is re-estimated from the result's posterior and from ``--draws`` fresh random draws
(Eq. 22): EM has local optima, so the largest value is the one to compare. ``--from-truth``
starts the registration at the true alignment instead: if it stays near it with a higher X than
a failed run, the metric is right and the optimiser went astray.

    python bench/myops_objective.py --case Case3027 --seed 2
    python bench/myops_objective.py --case Case3027 --seed 2 --rigid-tries 3 --from-truth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dcc.coreg import XCoReg, load_preset
from dcc.coreg.engine import padding_mask
from dcc.data.cardiac import data_root, myops_cases
from dcc.data.misalignment import warp_images
from dcc.data.myops_groups import group_seed, misalign, smooth_truth
from dcc.metrics import pairwise_dice
from dcc.similarity import functional as XF
from dcc.spatial.transforms import ComposedTransform, DisplacementField


@torch.no_grad()
def true_alignment(grid, seed: int, iterations: int = 50) -> ComposedTransform:
    """phi_j = truth_j^-1 on the lattice (fixed point y <- y - (truth(y) - x)) as a field, for
    the ``smooth`` model's maps at its default bounds (dcc.data.myops_groups.smooth_truth)."""
    n = 3
    truth = smooth_truth(n, grid, seed)
    x = grid.points().reshape(1, -1, grid.ndim).expand(n, -1, -1)
    y = x.clone()
    for _ in range(iterations):
        y = y - (truth(y) - x)
    field = (y - x).reshape(n, *grid.shape, grid.ndim)
    return ComposedTransform(n, grid.ndim, [DisplacementField(n, grid, field)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="Case3027")
    p.add_argument("--seed", type=int, default=2, help="bench_myops seed")
    p.add_argument("--rigid-tries", type=int, help="tries of the rigid stage (preset: 1)")
    p.add_argument("--bins", type=int, help="L (preset: 32)")
    p.add_argument("--from-truth", action="store_true", help="start at the true alignment")
    p.add_argument("--em", type=int, default=100, help="EM steps of each X evaluation")
    p.add_argument("--draws", type=int, default=2, help="fresh Gamma draws per evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the figures")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cases = myops_cases(data_root())
    names = [c.name for c in cases]
    if a.case not in names:
        print(f"myops_objective: unknown case {a.case}", file=sys.stderr)
        return 2
    index = names.index(a.case)
    seed = group_seed(a.seed, index)
    images, labels, grid, _ = misalign(cases[index], seed)
    config = load_preset("cardiac2d", progress=False, bins=a.bins)
    if a.rigid_tries:
        config.stages[0].tries = a.rigid_tries
    engine = XCoReg(config)
    start = time.perf_counter()
    initial = true_alignment(grid, seed) if a.from_truth else None
    result = engine.register(images, grid, transform=initial)
    seconds = time.perf_counter() - start

    # X as the engine's objective check computes it (Gamma by EM on the whole overlap)
    engine.config.em_warmup = a.em
    valid = (~padding_mask(images)).float()
    stacked = torch.stack([XF.normalize_intensities(images, config.bins, valid), valid], 1)
    alignments = {
        "identity": ComposedTransform(3, grid.ndim),
        "truth": true_alignment(grid, seed),
        "result": result.transform,
    }
    figures = {}
    for name, transform in alignments.items():
        xs = [
            engine._assess(transform, stacked, grid, config.bins, common, None)
            for common in [result.common] + [None] * a.draws
        ]
        moved = warp_images(labels, grid, transform, mode="nearest")
        figures[name] = {
            "x_max": max(x["x"] for x in xs),
            "x": [round(x["x"], 4) for x in xs],
            "overlap_voxels": xs[0]["overlap"],
            "dice": pairwise_dice(moved, [1, 2, 3])["mean"],
        }
    payload = {
        "case": a.case,
        "seed": a.seed,
        "from_truth": a.from_truth,
        "rigid_tries": config.stages[0].tries,
        "bins": config.bins,
        "seconds": seconds,
        "alignments": figures,
        "tries": [
            [(t["lr"], t["outcome"], t.get("x_after")) for t in stage["tries"]]
            for stage in result.diagnostics["stages"]
        ],
    }
    print(json.dumps(payload, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
