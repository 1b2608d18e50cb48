"""Checks of ``dcc-register``'s options: their ranges up front, and once the images are read
(before any registration) the ranges that depend on the images and their overlap.

Every failed check raises :class:`~dcc.data.io.InputError` with one line that names the option
(or file), the value and the valid range.
"""

from __future__ import annotations

import math

from dcc.coreg.checks import check_device
from dcc.coreg.config import STAGES, XCoRegConfig
from dcc.data.io import InputError
from dcc.spatial.grid import Grid
from dcc.spatial.pyramid import pyramid_grids

# option dest: (flag, low, high, low is exclusive); None = unbounded
RANGES = {
    "num_classes": ("-K", 2, 16, False),
    "bins": ("--bins", 8, 256, False),
    "sample_rate": ("--sample-rate", 0.0, 1.0, True),
    "levels": ("--levels", 1, 8, False),
    "iterations": ("--iterations", 1, 100_000, False),
    "lr": ("--lr", 0.0, 10.0, True),  # mm (FFD/offsets) per Adam step
    "ffd_spacing": ("--ffd-spacing", 0.0, None, True),
    "ffd_levels": ("--ffd-levels", 1, 6, False),
    "bending_weight": ("--lambda", 0.0, None, False),
    "reference": ("--reference", 0, None, False),
    "seed": ("--seed", 0, 2**63 - 1, False),
    "threads": ("--threads", 1, 1024, False),
    "min_initial_overlap": ("--min-initial-overlap", 0.0, 1.0, False),
}
MIN_COARSE_VOXELS = 8  # along the two longest axes at the coarsest pyramid level
MIN_SAMPLES = 32  # expected coordinate samples per step at the coarsest level
FFD_MIN_VOXELS = 2  # finest FFD control-point spacing, in voxels of the common grid


def check_options(args) -> None:
    """Ranges of the options given on the command line, the device and the stage names."""
    for dest, (flag, low, high, open_low) in RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (value > low if open_low else value >= low)
        if not ok or (high is not None and value > high):
            raise InputError(f"{flag} {value}: must be {_range_text(value, low, high, open_low)}")
    if args.device is not None:
        check_device(args.device)
    if args.stages is not None:
        names = [s.strip() for s in args.stages.split(",")]
        if not any(names):
            raise InputError(
                f"--stages {args.stages!r}: give one or more of {', '.join(STAGES)}, "
                "comma-separated (e.g. rigid,ffd)"
            )
        for name in names:
            if name not in STAGES:
                raise InputError(
                    f"--stages {args.stages}: unknown stage '{name}'; choose from "
                    f"{', '.join(STAGES)}"
                )


def check_with_images(config: XCoRegConfig, common: Grid, args) -> None:
    """FFD options need an FFD stage; pyramid levels against the grid size, FFD spacing against
    voxel size and extent, sample rate against the number of voxels, for every stage of
    ``config`` (final, possibly picked from the data) on the ``common`` grid."""
    names = [stage.name for stage in config.stages]
    for dest, flag in (("ffd_spacing", "--ffd-spacing"), ("ffd_levels", "--ffd-levels")):
        value = getattr(args, dest, None)
        if value is not None and "ffd" not in names:
            raise InputError(
                f"{flag} {value}: the settings have no ffd stage (stages: {','.join(names)}); "
                f"add one, e.g. --stages {','.join(names)},ffd"
            )
    shape = "x".join(map(str, common.shape))
    for stage in config.stages:
        coarse = pyramid_grids(common, stage.levels)[0]
        if not _big_enough(common, coarse):
            most = max(n for n in range(1, stage.levels)
                       if _big_enough(common, pyramid_grids(common, n)[0]))
            raise InputError(
                f"--levels {stage.levels} (stage {stage.name}): the coarsest level would be "
                f"{'x'.join(map(str, coarse.shape))} voxels (common grid {shape}); use --levels "
                f"<= {most} to keep at least {MIN_COARSE_VOXELS} voxels along the longest axes"
            )
        expected = config.sample_rate * coarse.numel
        if expected < MIN_SAMPLES:
            raise InputError(
                f"--sample-rate {config.sample_rate:g}: samples about {expected:.1f} of the "
                f"{coarse.numel} voxels of the coarsest level (stage {stage.name}) per step; "
                f"need at least {MIN_SAMPLES}, i.e. --sample-rate >= "
                f"{min(1.0, MIN_SAMPLES / coarse.numel):.2g}"
            )
        if stage.name == "ffd":
            finest = stage.ffd_spacing / 2 ** (stage.ffd_levels - 1)
            low = FFD_MIN_VOXELS * min(common.spacing)
            high = max(common.extent)
            if finest < low or stage.ffd_spacing > high:
                levels = ""
                if stage.ffd_levels > 1:
                    levels = f" (finest of {stage.ffd_levels} levels {finest:g} mm)"
                raise InputError(
                    f"--ffd-spacing {stage.ffd_spacing:g} mm{levels}: the control-point spacing "
                    f"must be at least {FFD_MIN_VOXELS} voxels ({low:g} mm on the common grid) "
                    f"and at most the grid's extent ({high:g} mm)"
                )


# ---------------------------------------------------------------------- internals
def _range_text(value, low, high, open_low) -> str:
    if isinstance(low, int) and high is not None:
        return f"an integer in {low}..{high}"
    if isinstance(low, int):
        return f"an integer >= {low}"
    if high is None:
        return f"a finite number {'>' if open_low else '>='} {low:g}"
    return f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"




def _big_enough(fine: Grid, coarse: Grid) -> bool:
    """The two longest axes keep ``MIN_COARSE_VOXELS`` (thin slabs may shrink to one slice)."""
    longest = sorted(zip(fine.shape, coarse.shape, strict=True), reverse=True)[:2]
    return all(c >= min(f, MIN_COARSE_VOXELS) for f, c in longest)
