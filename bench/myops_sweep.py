"""Sweep X-CoReg settings on the MyoPS bench groups in process (no files): the tuning tool
behind the ``cardiac2d`` preset (results/myops_bench/README.md).

Every group of ``bench_myops.py`` (:mod:`dcc.data.myops_groups` at its default settings: same
cases, models and seeds, so the same misalignments) is registered through the API with
``auto_config`` plus the overrides, given as JSON: top-level settings by name, stage settings as
``"<stage>.<key>"``, ``"stages"`` to keep only some stages. Prints the mean Dice before, after
the rigid stage and after, the worst group, the groups below their start and seconds per group;
writes the per-group rows (with the diagnostics) as JSON.

    python bench/myops_sweep.py K8 '{"num_classes": 8}' --out /tmp/sweep
    python bench/myops_sweep.py short '{"rigid.iterations": 150, "ffd.iterations": 100}'

Default groups: the tune patients, ``dense`` seeds 0-1 and ``smooth`` seed 0 (36 groups).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

from dcc.coreg import XCoReg
from dcc.coreg.config import auto_config
from dcc.data.cardiac import data_root, myops_cases
from dcc.data.misalignment import warp_images
from dcc.data.myops_groups import MODELS, TUNE_CASES, group_seed, make_group
from dcc.metrics import pairwise_dice
from dcc.spatial.transforms import ComposedTransform


def configure(grid, overrides: dict):
    overrides = dict(overrides)
    config = auto_config(grid, progress=False)
    keep = overrides.pop("stages", None)
    if keep:
        config.stages = [s for s in config.stages if s.name in keep]
    for key, value in overrides.items():
        if "." in key:
            name, field = key.split(".", 1)
            for stage in config.stages:
                if stage.name == name:
                    setattr(stage, field, value)
        else:
            setattr(config, key, value)
    return config


def register(task) -> dict:
    torch.set_num_threads(1)
    case, model, seed, overrides = task
    cases = myops_cases(data_root())
    index = [c.name for c in cases].index(case)
    images, labels, grid, _ = make_group(model, cases[index], group_seed(seed, index))
    start = time.perf_counter()
    result = XCoReg(configure(grid, overrides)).register(images, grid)
    seconds = time.perf_counter() - start

    def dice(transform):
        return pairwise_dice(warp_images(labels, grid, transform, mode="nearest"), [1, 2, 3])

    first = ComposedTransform(3, 2, list(result.transform.stages[:1]))
    return {"case": case, "model": model, "seed": seed,
            "before": pairwise_dice(labels, [1, 2, 3])["mean"],
            "first_stage": dice(first)["mean"], "after": dice(result.transform)["mean"],
            "seconds": seconds, "diagnostics": result.diagnostics["stages"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="name of the run (file stem)")
    p.add_argument("overrides", help="JSON object of settings")
    p.add_argument("--groups", help='JSON list of [case, model, seed] (default: see above)')
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=".", help="folder for <name>.json")
    a = p.parse_args(argv)
    if a.groups:
        groups = json.loads(a.groups)
    else:
        groups = [(c, "dense", s) for s in (0, 1) for c in TUNE_CASES]
        groups += [(c, "smooth", 0) for c in TUNE_CASES]
    tasks = [(c, m, s, json.loads(a.overrides)) for c, m, s in groups]
    with multiprocessing.get_context("spawn").Pool(a.workers) as pool:
        rows = pool.map(register, tasks)
    for model in MODELS:
        r = [x for x in rows if x["model"] == model]
        if r:
            print(f"{a.name} {model:7s} n={len(r)}"
                  f" before {statistics.fmean(x['before'] for x in r):.3f}"
                  f" first stage {statistics.fmean(x['first_stage'] for x in r):.3f}"
                  f" after {statistics.fmean(x['after'] for x in r):.3f}"
                  f" worst {min(x['after'] for x in r):.3f}"
                  f" below {sum(x['after'] < x['before'] for x in r)}"
                  f" s/group {statistics.fmean(x['seconds'] for x in r):.2f}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.name}.json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
