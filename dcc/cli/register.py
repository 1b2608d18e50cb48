"""``dcc-register``: groupwise registration of NIfTI / DICOM images with X-CoReg."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dcc.cli.checks import check_options, check_with_images
from dcc.coreg import StageConfig, XCoReg, XCoRegConfig, load_preset
from dcc.coreg.checks import check_device, check_overlap
from dcc.coreg.config import METHODS, STAGES, auto_config, available_presets
from dcc.coreg.distributed import PeerError, agree, shard
from dcc.coreg.engine import RegistrationError
from dcc.data.io import InputError, read_image, read_labels, resample_group, write_image
from dcc.data.misalignment import MisalignedGroup, misaligned_phantom
from dcc.evaluation.outdir import OutputFolder
from dcc.evaluation.outputs import peak_memory_mb, unique_names, write_group, write_report
from dcc.spatial.grid import Grid, lattice_points

PROG = "dcc-register"


# the presets dcc-register picks by itself: 2D groups, 3D groups, the --phantom 2 demo
AUTO_PRESETS = {"2D": "cardiac2d", "3D": "rire3d", "phantom": "brain2d"}


@functools.cache
def _auto_presets() -> dict:
    """The presets of :data:`AUTO_PRESETS`, read once (``--help`` asks for nine settings)."""
    return {label: load_preset(name) for label, name in AUTO_PRESETS.items()}


def preset_defaults(key: str) -> str:
    """What ``key`` is in each preset that ``dcc-register`` picks by itself, for ``--help``:
    a top-level setting (e.g. ``bins``), or a stage setting per stage (e.g. ``lr``, with its
    cosine decay factor)."""
    parts = []
    for label, config in _auto_presets().items():
        if hasattr(config, key):
            parts.append(f"{label}: {getattr(config, key):g}")
            continue
        values = []
        for stage in config.stages:
            if key.startswith("ffd_") and stage.name != "ffd":
                continue
            value = f"{getattr(stage, key):g}"
            if key == "lr" and stage.lr_final < 1:
                value += f" -> x{stage.lr_final:g}"
            values.append(f"{stage.name} {value}")
        if values:
            parts.append(f"{label}: {', '.join(values)}")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Groupwise registration with the X-metric (X-CoReg). Images are brought onto "
        "one common grid (the reference's, or the first image's) and registered unbiasedly "
        "(mean deformation zero, Eq. 37) unless --reference is given.",
    )
    p.add_argument("images", nargs="*", help="NIfTI/MHA/NRRD files or DICOM series folders")
    p.add_argument(
        "--phantom",
        type=int,
        choices=(2, 3),
        help="demo: register the built-in brain phantom (2D slice or 3D) under a known random "
        "FFD misalignment; its inputs go to OUT/inputs and gWI before/after to report.json",
    )
    p.add_argument(
        "--out",
        required=True,
        help="new output folder; must not hold (or be) the inputs or the current folder. "
        "Results appear only after success",
    )
    p.add_argument("--labels", nargs="+", help="one label map per image, on its image's grid")
    p.add_argument(
        "--masks",
        nargs="+",
        help="one mask per image, on its image's grid (nonzero = use): voxels outside it count "
        "as outside that image (histograms, posterior and sample), as elastix/ANTs masks",
    )
    p.add_argument(
        "--roi",
        help="a region of interest in the common space (a mask on the grid of the first image, "
        "or of --reference): X-CoReg measures the group only there (e.g. a dilated heart)",
    )
    p.add_argument(
        "--preset",
        help=f"named settings shipped with dcc ({', '.join(available_presets())}). Without one "
        "the settings are picked from the data: a 2D group gets cardiac2d (rigid on a pyramid "
        "of as many levels as keep 48 voxels, then a 50 mm FFD), a 3D group rire3d "
        "(translation then rigid); the phantom demo uses brain2d / brain3d",
    )
    p.add_argument(
        "--stages",
        help=f"comma-separated stages from {', '.join(STAGES)} (default: the preset's; "
        "2D: rigid,ffd; 3D: translation,rigid)",
    )
    p.add_argument(
        "--method",
        choices=(*METHODS, "dcc"),
        help="xcoreg (default), xcoreg-gt (needs --labels), the competing groupwise metrics "
        "in the same engine: cte (conditional template entropy), ape (accumulated pairwise MI), "
        "gmm (Gaussian mixture, K components), cg (congealing, N >= 3), vi (variance of "
        "intensities, one modality); or dcc: the trained DCC network "
        "(cardiac C0/LGE/T2 short-axis slices or stacks; the shipped model unless --checkpoint), "
        "which also segments",
    )
    p.add_argument(
        "--congealing-sigma",
        type=float,
        help="--method cg: width of the Gaussian kernel, intensities normalised to [0, 1] "
        f"(default {XCoRegConfig.congealing_sigma})",
    )
    dcc = p.add_argument_group("the DCC network (--method dcc)")
    dcc.add_argument(
        "--checkpoint", help="a DCC checkpoint of train.py (default: the model shipped with dcc)"
    )
    dcc.add_argument(
        "--sequences",
        nargs="+",
        help="the sequence of each image, e.g. LGE C0 T2 (default: the model's order, C0 LGE T2)",
    )
    dcc.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="refine the network's fields by N steps of X-CoReg's unbiased FFD stage (default 0)",
    )
    dcc.add_argument(
        "--slice", type=int, help="register only this slice (ITK z index) of 3D stacks"
    )
    p.add_argument(
        "-K",
        "--classes",
        type=int,
        dest="num_classes",
        help="K, the number of tissue classes of the common anatomy (default "
        f"{preset_defaults('num_classes')})",
    )
    p.add_argument(
        "--bins",
        type=int,
        help=f"L, intensity levels of the histograms (default {preset_defaults('bins')})",
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        help="fraction of the overlap region sampled at each step, Omega_S, at least "
        f"{XCoRegConfig.min_sample} voxels (default {preset_defaults('sample_rate')})",
    )
    p.add_argument(
        "--levels",
        type=int,
        help="resolution levels (image pyramid) per stage (default "
        f"{preset_defaults('levels')}; a 2D pyramid is cut to the levels that keep 48 voxels "
        "per axis)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        help=f"T, Adam steps per stage (default {preset_defaults('iterations')})",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="eta, Adam step size for every stage, in mm per step (rotations: 0.01 rad per mm), "
        "decayed by a cosine to the factor after 'x' (default "
        f"{preset_defaults('lr')})",
    )
    p.add_argument(
        "--ffd-spacing",
        type=float,
        help="control-point spacing of the first FFD level in mm (default "
        f"{preset_defaults('ffd_spacing')})",
    )
    p.add_argument(
        "--ffd-levels",
        type=int,
        help=f"FFD levels, each halving the spacing (default {preset_defaults('ffd_levels')})",
    )
    p.add_argument(
        "--lambda",
        type=float,
        dest="bending_weight",
        help="lambda, weight of the bending energy R of the FFD, in control-point index units "
        f"(default {preset_defaults('bending_weight')})",
    )
    p.add_argument("--reference", type=int, help="index of the fixed image (group-to-reference)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--threads", type=int, help="CPU threads for torch (1 is fastest for small 2D groups)"
    )
    p.add_argument(
        "--min-initial-overlap",
        type=float,
        default=0.25,
        help="refuse groups whose images overlap on less than this fraction of the common grid "
        "(default 0.25)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder, only if every file in it was written by "
        "dcc-register (listed in its .dcc-register-manifest.json)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (none either when not a terminal)"
    )
    return p


def make_config(args: argparse.Namespace, grid: Grid | None = None) -> XCoRegConfig:
    """Preset (``brain2d``/``brain3d`` for the phantom demo; without one, settings picked from
    ``grid`` by :func:`auto_config`, or the paper's defaults) updated by the options given on the
    command line."""
    top = {
        k: getattr(args, k)
        for k in (
            "method",
            "num_classes",
            "bins",
            "sample_rate",
            "bending_weight",
            "reference",
            "seed",
            "device",
            "congealing_sigma",
        )
    }
    top["progress"] = not args.quiet and sys.stderr.isatty()
    preset = args.preset or {2: "brain2d", 3: "brain3d"}.get(args.phantom)
    if preset:
        config = load_preset(preset, **top)
    elif grid is not None:
        config = auto_config(grid, **top)
    else:
        config = XCoRegConfig(**{k: v for k, v in top.items() if v is not None})
    stage_options = {
        "iterations": args.iterations,
        "levels": args.levels,
        "lr": args.lr,
        "ffd_spacing": args.ffd_spacing,
        "ffd_levels": args.ffd_levels,
    }
    if args.stages:
        names = [s.strip() for s in args.stages.split(",") if s.strip()]
        by_name = {s.name: s for s in config.stages}
        stages = [
            StageConfig(**{**vars(by_name[n]), **_given(stage_options)})
            if n in by_name
            else StageConfig.named(n, **stage_options)
            for n in names
        ]
    else:
        stages = [StageConfig(**{**vars(s), **_given(stage_options)}) for s in config.stages]
    config.stages = stages
    return config


def _given(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def load_group(paths, label_paths, reference):
    """Read the images (and labels) and resample them onto the common grid."""
    if len(paths) < 2:
        raise InputError(f"groupwise registration needs at least 2 images, got {len(paths)}")
    if label_paths is not None and len(label_paths) != len(paths):
        raise InputError(
            f"--labels: got {len(label_paths)} label maps for {len(paths)} images (need one each)"
        )
    if reference is not None and not 0 <= reference < len(paths):
        raise InputError(f"--reference {reference}: must be an image index in 0..{len(paths) - 1}")
    originals = [read_image(p) for p in paths]
    for path, (_, grid) in zip(paths, originals, strict=True):
        if grid.ndim != originals[0][1].ndim:
            raise InputError(
                f"{path}: image is {grid.ndim}D but {paths[0]} is {originals[0][1].ndim}D; "
                "a group must have one dimensionality"
            )
    labels = None
    if label_paths is not None:
        labels = [
            read_labels(lp, like=g) for lp, (_, g) in zip(label_paths, originals, strict=True)
        ]
    common = originals[reference or 0][1]
    images, valid, warped_labels = resample_group(originals, common, labels)
    return originals, labels, common, images, valid, warped_labels


def apply_masks(args, paths, originals, common: Grid, valid: torch.Tensor):
    """``valid`` times the ``--masks`` (each read on its image's grid, carried onto the common
    grid by nearest neighbour) and the ``--roi`` on the common grid (``None`` without one)."""
    if args.masks is not None:
        if len(args.masks) != len(paths):
            raise InputError(
                f"--masks: got {len(args.masks)} masks for {len(paths)} images (need one each)"
            )
        masks = [read_labels(m, like=g) for m, (_, g) in zip(args.masks, originals, strict=True)]
        _, _, on_common = resample_group(originals, common, masks)
        valid = valid * (on_common > 0)
        for mask, path, inside in zip(args.masks, paths, valid, strict=True):
            if not inside.any():
                raise InputError(f"{mask}: the mask of {path} lies outside the common grid")
    roi = None
    if args.roi is not None:
        roi = read_labels(args.roi, like=common) > 0
        if not (roi & (valid > 0).all(0)).any():
            raise InputError(f"{args.roi}: the region of interest holds no voxel where the "
                             "images (and masks) overlap")
    return valid, roi


def write_outputs(
    tmp: Path,
    args,
    names,
    result,
    config,
    originals,
    labels,
    common,
    images,
    warped_labels_before,
    seconds,
    extra: dict,
):
    """Write every output into ``tmp`` (the layout of :mod:`dcc.evaluation.outputs`, shared
    with the DCC network's predict mode); ``extra`` entries are added to ``report.json`` (whose
    ``images``/``labels`` are the paths given in ``extra`` if any, else those on the command
    line)."""
    transform = result.transform.cpu()
    linear = transform.linear_part()
    if linear is None:
        with torch.no_grad():
            points = transform.lattice(common).cpu()
    else:  # A_j x + b_j, one image at a time
        base = lattice_points(common, torch.device("cpu"), torch.float32)

        def points(j):
            return base @ linear[0][j].float().T + linear[1][j].float()
    dice = write_group(
        tmp,
        names,
        common,
        points,
        originals,
        result.posterior.cpu(),
        images,
        labels=labels,
        labels_before=warped_labels_before,
        linear=linear,
    )
    report = {
        "images": [str(p) for p in args.images],
        "names": names,
        "labels": args.labels,
        "common_grid": common.to_dict(),
        "mode": "unbiased" if config.reference is None else f"reference {config.reference}",
        "settings": dataclasses.asdict(config),
        "stages": [
            {
                "name": s.name,
                "iterations": s.iterations,
                "levels": s.levels,
                "x_metric": s.x_metric,
                "seconds": round(s.seconds, 3),
            }
            for s in result.stages
        ],
        "x_metric": result.x_metric,
        "log_likelihood": result.log_likelihood,
        "world_size": 1 if result.shard is None else result.shard.world,  # processes
        "wall_time_s": round(seconds, 3),
        "peak_memory_mb": round(peak_memory_mb(config.device), 1),
        **dice,
    }
    diagnostics = getattr(result, "diagnostics", None)  # engine diagnostics, if it gives any
    if diagnostics is not None:
        report["diagnostics"] = diagnostics
        report["warnings"] = [
            f"{names[w['image']] if 'image' in w else 'group'}: {w['message']}"
            for stage in diagnostics.get("stages", [])
            for w in stage.get("warnings", [])
        ]
    report.update(extra)
    write_report(tmp, report)
    return report


def write_phantom_inputs(folder: Path, dim: int, seed: int) -> MisalignedGroup:
    """Write the misaligned phantom (3D at 2 mm) as NIfTI images and labels into ``folder``."""
    # the misalignment family of bench/bench_phantom.py (40 mm FFD, std 5.4 mm: gWI ~3 mm)
    group = misaligned_phantom(
        dim=dim, downsample=1 if dim == 2 else 2, magnitude=5.4, spacing=40.0, seed=seed
    )
    for name, image, labels in zip(group.names, group.images, group.labels, strict=True):
        write_image(folder / f"{name}.nii.gz", image, group.grid)
        write_image(folder / f"{name}_labels.nii.gz", labels.to(torch.int32), group.grid)
    return group


# X-CoReg options that the DCC network does not take
XCOREG_ONLY = ("preset", "stages", "num_classes", "bins", "sample_rate", "levels", "iterations",
               "lr", "ffd_spacing", "ffd_levels", "bending_weight", "reference", "masks", "roi",
               "phantom", "congealing_sigma")
# predict mode's settings -> this command's options, in the messages of run_prediction
PREDICT_OPTIONS = {"predict.inputs": "the images", "predict.labels": "--labels",
                   "predict.sequences": "--sequences", "predict.slice": "--slice",
                   "predict.refine_iterations": "--refine", "predict.out=": "--out ",
                   "predict.out": "--out", "predict.overwrite=true": "--overwrite",
                   "predict.min_initial_overlap": "--min-initial-overlap",
                   "predict.device": "--device", "ckpt_path=": "--checkpoint ",
                   "ckpt_path": "--checkpoint"}


def run_dcc(args: argparse.Namespace) -> dict:
    """``--method dcc``: register and segment the group with a trained DCC network
    (:func:`dcc.lit.predict.run_prediction`, the writer and output-folder rules of the other
    methods); 3D short-axis stacks slice by slice. Options of X-CoReg alone are refused."""
    given = [name for name in XCOREG_ONLY if getattr(args, name, None) not in (None, False)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise InputError(f"{flag}: an X-CoReg option, not used by --method dcc")
    if args.refine < 0:
        raise InputError(f"--refine {args.refine}: must be an integer >= 0")
    from dcc.lit.predict import run_prediction

    cfg = {
        "ckpt_path": args.checkpoint,
        "threads": args.threads,
        "predict": {
            "inputs": args.images, "labels": args.labels, "sequences": args.sequences,
            "out": args.out, "overwrite": args.overwrite, "grid": "model", "slice": args.slice,
            "min_initial_overlap": args.min_initial_overlap, "device": args.device or "cpu",
            "refine_iterations": args.refine,
        },
    }
    try:
        return run_prediction(cfg, prog=PROG)
    except (InputError, ValueError) as error:
        text = str(error)
        for setting, option in PREDICT_OPTIONS.items():
            text = text.replace(setting, option)
        raise InputError(text) from None


def launched_world() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(args: argparse.Namespace) -> dict | None:
    """Check every option and ``--out`` before any work, register, then move the results in.
    Under ``torchrun`` with several processes: :func:`run_distributed` (``None`` on all but
    the first process)."""
    world = launched_world()
    if world > 1 and (args.method == "dcc" or args.phantom):
        flag = "--method dcc" if args.method == "dcc" else "--phantom"
        raise InputError(f"{flag}: runs in one process; start it without torchrun")
    if args.method == "dcc":
        return run_dcc(args)
    dcc_only = [f for f in ("checkpoint", "sequences", "slice") if getattr(args, f) is not None]
    if dcc_only or args.refine:
        raise InputError(f"--{(dcc_only or ['refine'])[0]}: needs --method dcc")
    check_options(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.phantom and args.images:
        raise InputError("give either image files or --phantom, not both")
    if args.phantom and (args.labels or args.masks or args.roi):
        raise InputError("--labels/--masks/--roi: the phantom demo takes none of them")
    config = make_config(args)
    check_device(config.device)
    if config.method == "xcoreg-gt" and args.labels is None and not args.phantom:
        raise InputError("--method xcoreg-gt needs --labels (one label map per image)")
    if world > 1:
        return run_distributed(args, config, world)
    output = OutputFolder(args.out, _inputs(args), args.overwrite, PROG)
    with output as tmp:
        report = _register_into(tmp, args, config)
        output.commit()
    return report


def _inputs(args) -> list[str]:
    return [*args.images, *(args.labels or []), *(args.masks or []), *filter(None, [args.roi])]


def run_distributed(args: argparse.Namespace, config: XCoRegConfig, world: int) -> dict | None:
    """``torchrun --nproc_per_node P -m dcc.cli.register ...``: the group registered by ``P``
    processes (:mod:`dcc.coreg.distributed`), each holding a contiguous slice of the images
    (:func:`~dcc.coreg.distributed.shard`); gloo on the CPU, nccl on GPUs (``--device cuda``:
    ``cuda:LOCAL_RANK``). Process 0 reads every input and writes the output folder as one
    process does (``report.json``: ``world_size``); the others read the reference image and
    their slice. The checks before the registration are agreed by all processes (a failure in
    one stops all, with its message, :func:`~dcc.coreg.distributed.agree`)."""
    if len(args.images) < world:
        raise InputError(f"{len(args.images)} images for {world} processes: every process needs "
                         f"at least one image (torchrun --nproc_per_node {len(args.images)} or "
                         "fewer)")
    if config.reference is not None and not 0 <= config.reference < len(args.images):
        raise InputError(f"--reference {config.reference}: must be an image index in "
                         f"0..{len(args.images) - 1}")
    device = torch.device(config.device)
    if device.type == "cuda":
        if device.index is None:  # one GPU per process of a node
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    try:
        rank = dist.get_rank()
        output, error = None, None
        try:
            if rank == 0:
                output = OutputFolder(args.out, _inputs(args), args.overwrite, PROG)
        except InputError as failed:
            error = failed
        agree(error)
        with output if output is not None else contextlib.nullcontext() as tmp:
            report = _register_shard(tmp, args, config, str(device), rank, world)
            if output is not None:
                output.commit()
        return report
    except (InputError, ValueError, RegistrationError):
        raise  # every process has it (agreed): main says it once, then they leave together
    except BaseException:
        dist.destroy_process_group()  # the others' next collective fails instead of waiting
        raise


def leave_group() -> None:
    """The end of a distributed run (nothing in one process): the processes wait for each
    other, so that none exits before the first has said how the run ended (``torchrun`` stops
    the others as soon as one process exits with an error), then close the process group."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _register_shard(tmp, args, config, device: str, rank: int, world: int) -> dict | None:
    """One process of :func:`run_distributed`: load (all on process 0, else the reference and
    this process's slice), agree on the checks, register the slice, gather the transforms;
    process 0 writes the outputs and returns the report."""
    part = shard(len(args.images), rank, world)
    error = None
    try:
        loaded = _load_for(args, config, device, rank, part)
    except (InputError, ValueError) as failed:
        error = failed
    agree(error)
    config, local, everything = loaded
    start = time.perf_counter()
    result = XCoReg(config).register(*local, distributed=True)
    seconds = time.perf_counter() - start
    full = dataclasses.replace(result, transform=result.gather_transform())
    if rank != 0:
        return None
    names, originals, labels, common, images, warped_labels, extra = everything
    return write_outputs(tmp, args, names, full, config, originals, labels, common, images,
                         warped_labels, seconds, extra)


def _load_for(args, config, device: str, rank: int, part: slice):
    """What one process needs: the settings (picked from the common grid as
    :func:`_register_into` does), the arguments of ``XCoReg.register`` for its slice and, on
    process 0, those of :func:`write_outputs` (the whole group, checked as one process does)."""
    paths, label_paths, ref = args.images, args.labels, config.reference or 0
    index = list(range(len(paths)))[part]
    if rank != 0:  # the reference image first: its grid is the common grid
        index = [ref, *index]
        paths = [args.images[i] for i in index]
        label_paths = None if args.labels is None else [args.labels[i] for i in index]
        args = argparse.Namespace(**{**vars(args), "masks": None if args.masks is None else
                                     [args.masks[i] for i in index]})
    originals, labels, common, images, valid, warped_labels = load_group(
        paths, label_paths, ref if rank == 0 else 0
    )
    if not args.preset:  # settings picked from the data
        config = make_config(args, common)
    config.device = device
    check_with_images(config, common, args)
    extra = {}
    if rank == 0:
        extra["initial_overlap"] = check_overlap(valid, paths, ref, args.min_initial_overlap)
    valid, roi = apply_masks(args, paths, originals, common, valid)
    extra.update({"masks": args.masks, "roi": args.roi})
    mine = part if rank == 0 else slice(1, None)
    local = (images[mine], common, valid[mine],
             None if warped_labels is None else warped_labels[mine], None, roi)
    everything = None
    if rank == 0:
        everything = (unique_names(paths), originals, labels, common, images, warped_labels,
                      extra)
    return config, local, everything


def _register_into(tmp: Path, args: argparse.Namespace, config: XCoRegConfig) -> dict:
    phantom, extra = None, {}
    paths, label_paths = args.images, args.labels
    if args.phantom:
        (tmp / "inputs").mkdir()
        phantom = write_phantom_inputs(tmp / "inputs", args.phantom, args.seed or 0)
        paths = [str(tmp / "inputs" / f"{n}.nii.gz") for n in phantom.names]
        label_paths = [str(tmp / "inputs" / f"{n}_labels.nii.gz") for n in phantom.names]
        # report.json names the inputs where they end up, not in the temporary folder
        final = Path(args.out).resolve() / "inputs"
        extra["images"] = [str(final / Path(p).name) for p in paths]
        extra["labels"] = [str(final / Path(p).name) for p in label_paths]
    originals, labels, common, images, valid, warped_labels = load_group(
        paths, label_paths, config.reference
    )
    if not args.preset and not args.phantom:  # settings picked from the data
        config = make_config(args, common)
    check_with_images(config, common, args)
    extra["initial_overlap"] = check_overlap(
        valid, paths, config.reference or 0, args.min_initial_overlap
    )
    valid, roi = apply_masks(args, paths, originals, common, valid)
    extra.update({"masks": args.masks, "roi": args.roi})
    names = unique_names(paths)
    start = time.perf_counter()
    result = XCoReg(config).register(
        images, common, valid=valid, labels=warped_labels, roi=roi
    )
    seconds = time.perf_counter() - start
    if phantom is not None:
        extra["gwi_before_mm"] = phantom.warping_index()
        extra["gwi_after_mm"] = phantom.warping_index(result.transform)
    return write_outputs(
        tmp,
        args,
        names,
        result,
        config,
        originals,
        labels,
        common,
        images,
        warped_labels,
        seconds,
        extra,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.images and not args.phantom:
        parser.error("give the images to register (at least 2), or --phantom 2|3 for the demo")
    try:
        report = run(args)
    except (InputError, ValueError, RegistrationError) as error:
        # under torchrun every process knows the error (the same options, or agreed checks):
        # the first one says it
        if launched_world() == 1 or int(os.environ.get("RANK", "0")) == 0:
            where = f" (process {error.rank})" if isinstance(error, PeerError) else ""
            print(f"{PROG}: error{where}: {error}", file=sys.stderr)
        leave_group()
        return 2
    except KeyboardInterrupt:  # while the output folder is open, it handles Ctrl-C itself
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    leave_group()
    if report is None:  # a process of a distributed run other than the first
        return 0
    if args.method == "dcc":
        print(
            f"{PROG}: {len(report['names'])} images ({', '.join(report['sequences'])}) registered "
            f"and segmented by the DCC network in {report['inference_s']:.2f} s; wrote {args.out}"
        )
    else:
        stages = ", ".join(f"{s['name']} {s['iterations']} it" for s in report["stages"])
        objective = report.get("diagnostics", {}).get("objective")
        method = "" if objective is None else (
            f"{objective['method']} objective {objective['value']:.4f}; ")
        print(
            f"{PROG}: {len(report['names'])} images registered ({stages}); {method}"
            f"X = {report['x_metric']:.4f}; {report['wall_time_s']:.1f} s; wrote {args.out}"
        )
    if "dice_after" in report:
        print(
            f"{PROG}: mean Dice of the labels {report['dice_before']['mean']:.3f} -> "
            f"{report['dice_after']['mean']:.3f}"
        )
    for warning in report.get("warnings", []) + report.get("notes", []):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if "gwi_after_mm" in report:
        print(
            f"{PROG}: phantom gWI {report['gwi_before_mm']:.3f} mm -> "
            f"{report['gwi_after_mm']:.3f} mm"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
