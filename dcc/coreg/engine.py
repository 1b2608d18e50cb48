"""X-CoReg (Algorithm 1): alternate the common-space update with Adam steps on -X + lambda R."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from dcc.coreg.config import StageConfig, XCoRegConfig
from dcc.coreg.distributed import ImageShard, fingerprint, gather_transform, join
from dcc.similarity import functional as XF
from dcc.similarity.modules import group_objective
from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid
from dcc.spatial.pyramid import image_pyramid
from dcc.spatial.transforms import (
    Affine,
    BSplineFFD,
    ComposedTransform,
    LinearTransform,
    MultiLevelFFD,
    Rigid,
    SpatialTransform,
    Translation,
)


class RegistrationError(RuntimeError):
    """The optimisation cannot go on (e.g. the warped images no longer overlap)."""


class _OverlapLost(RuntimeError):
    """The overlap region fell below ``min_overlap`` of its size at the stage start."""


VALID = 0.999  # a warped validity mask above this means "inside the image's field of view"
# EM of the Gamma initialisation and of the stage checks runs on at most this many overlap
# voxels (a fixed subsample)
EM_POINTS = 8192
# The stage checks and overlap references look at every voxel of a grid up to this size and at
# a fixed random subset of this many voxels of a larger one (a 3D volume)
ASSESS_POINTS = 65536
# voxels per pass of the full-resolution update at the end (bounds its memory)
CHUNK = 2**17


@dataclass
class CommonSpace:
    """Common-space parameters alpha = (Gamma, pi) (Sec. 3.2.1).

    Gamma at a voxel follows from its warped intensities, the appearance model f (Eq. 12) and
    pi (Eq. 20), so the engine carries ``(log f, log pi)`` and takes Gamma only on the points
    it needs (:meth:`log_gamma_at`): Algorithm 1 needs it on the coordinate sample only. The
    result also holds Gamma on its grid (``gamma``).
    """

    log_f: torch.Tensor  # (N, L, K)
    log_pi: torch.Tensor  # (K,)
    grid: Grid | None = None
    gamma: torch.Tensor | None = None  # (M, K) on grid

    @property
    def bins(self) -> int:
        return self.log_f.shape[-2]

    def log_gamma_at(self, values: torch.Tensor, bins: int, reduce=None) -> torch.Tensor:
        """log Gamma (Eq. 20) at warped intensities ``(N, m)`` in the bin units of ``bins``
        levels (a stage with other bins than the model's: mapped linearly onto its levels).
        ``reduce``: the sums over a slice of the group -> over the group (a distributed run,
        :func:`XF.posterior`)."""
        return XF.posterior(self._levels(values, bins), self.log_f, self.log_pi, reduce)[0]

    def log_joint_at(self, values: torch.Tensor, bins: int) -> torch.Tensor:
        """``sum_j log f_jk(u_j)`` ``(m, K)`` over the images of ``values`` ``(N, m)`` (those of
        this process in a distributed run): Eq. (12) before the prior and the normalisation."""
        return XF.log_appearance(self._levels(values, bins), self.log_f).sum(-3)

    def _levels(self, values: torch.Tensor, bins: int) -> torch.Tensor:
        if bins != self.bins:
            values = 1 + (values - 1) * ((self.bins - 3) / (bins - 3))
        return values


@dataclass
class StageReport:
    name: str
    iterations: int
    levels: list[dict] = field(default_factory=list)
    x_metric: float = float("nan")
    seconds: float = 0.0


@dataclass
class CoRegResult:
    transform: ComposedTransform
    common: CommonSpace
    stages: list[StageReport]
    x_metric: float
    log_likelihood: float
    seconds: float
    # What the safeguards did (JSON-able): Gamma initialisation, and per stage the tries with
    # their step size, smallest overlap fraction, X before/after and the decision.
    diagnostics: dict = field(default_factory=dict)
    # the slice of the group this process registered (distributed mode; one process: all of it)
    shard: ImageShard | None = None

    def gather_transform(self) -> ComposedTransform:
        """The transforms of the whole group: in a distributed run (a collective: every process
        calls it) ``transform`` holds this process's slice and this gathers all ``N`` images'
        in global order on every process (:func:`dcc.coreg.distributed.gather_transform`);
        in one process, ``transform`` itself."""
        return self.transform if self.shard is None else gather_transform(self.transform,
                                                                         self.shard)

    @property
    def posterior(self) -> torch.Tensor:
        """Gamma as ``(K, *grid.shape)`` (a view of channels-last memory: ``movedim(0, -1)``
        is contiguous, as a vector image is written)."""
        k = self.common.log_pi.numel()
        return self.common.gamma.reshape(*self.common.grid.shape, k).movedim(-1, 0)


class XCoReg:
    """Groupwise registration with the X-metric.

    ``register(images, grid)`` aligns ``N`` images given on one common ``grid`` (tensor
    ``(N, *grid.shape)``); ``valid`` ``(N, *grid.shape)`` marks each image's field of view
    (default: everywhere; multiply in a mask per image to leave out what is not of interest),
    ``roi`` ``grid.shape`` a region of interest of the common space (histograms, posterior
    and coordinate sample are restricted to it; voxels outside change nothing) and ``labels``
    integer maps ``(N, *grid.shape)`` give the ground-truth appearance model of X-Reg-GT
    (Eq. 48), required for ``method="xcoreg-gt"``.

    Beyond Algorithm 1, safeguards keep a registration from making a group worse
    (settings in :class:`XCoRegConfig`, outcome in ``result.diagnostics``):

    * Gamma^[0] is not used raw: ``em_warmup`` EM steps (Eqs. 20, 12, 14) on the initial
      alignment from ``inits`` random draws of Eq. (22), keeping the highest log-likelihood
      (Eq. 23). With a random Gamma the first Adam steps follow noise.
    * Overlap guard: a stage stops as soon as the overlap region Omega^phi (Eq. 14) falls below
      ``min_overlap`` of its size at the stage start (MI rewards cutting away what it cannot
      explain).
    * Objective check: X with Gamma re-estimated on the overlap must not be lower after a stage
      than before it. A rejected stage restarts from its start with half the step size, at most
      ``restarts`` times, and is left at its start if no try is accepted.
    * An FFD stage after a linear stage that no try got past these checks is skipped and the
      group flagged (``skip_ffd_after_rejected_linear``); with ``StageConfig.tries > 1`` the
      medoid of the tries is kept and a disagreement beyond ``spread_warning`` mm is flagged.
      Flags are ``warnings`` in the stage records of ``result.diagnostics``.

    In unbiased mode Eq. (37) holds for the composed phi (all stages), not for each stage alone.

    Distributed mode (``distributed=True``, or a process group; :mod:`dcc.coreg.distributed`):
    each process of an initialised ``torch.distributed`` group (gloo on the CPU, nccl on
    GPUs; e.g. under ``torchrun``) calls ``register`` with its contiguous slice of the group
    (:func:`~dcc.coreg.distributed.shard`; slices in rank order), the same ``grid``, ``roi``
    and settings. The per-point sums of log f_jk over the images (Eq. 12), the overlap
    region (Eq. 14), the means of the transforms for Eq. (37), X and its per-image terms
    (Eqs. 8, 17) and the final Gamma are all-reduced, so every process sees the same common
    space and takes the same decisions; each steps its own transforms (the gradient of
    I(U_j; Z) with Gamma fixed involves image j alone). ``config.reference`` is a global
    index. The result holds this process's transforms (``result.transform``), the whole
    group's diagnostics, X and Gamma; ``result.gather_transform()`` gathers all transforms.
    The result equals the single-process run's up to float rounding (sums in another order).

    Competing metrics (``config.method`` one of ``cte``, ``ape``, ``gmm``, ``cg``, ``vi``;
    :mod:`dcc.similarity.baselines`): the same loop, transforms, coordinate sample, schedule,
    safeguards and Eq. (37) with the method's objective on the sample in place of X
    (:class:`~dcc.similarity.modules.GroupObjective`; its state, the GMM's parameters, takes
    the place of the common space, one EM step per Adam step). The stage checks compare that
    objective (the ``x`` entries of ``result.diagnostics``); ``result.x_metric`` and the
    posterior are X-CoReg's common space fitted on the final alignment (``em_warmup`` EM steps
    from a random Gamma^[0]), to compare methods; ``diagnostics["objective"]`` holds the
    method's final value. Not in distributed mode.
    """

    def __init__(self, config: XCoRegConfig):
        self.config = config
        # a competing metric in place of the X-metric (config.method in BASELINES; None: X)
        self.objective = group_objective(config.method, config.num_classes,
                                         config.congealing_sigma)
        # the images this process holds and the reductions over the group (set by register;
        # until then one process, every reduction the identity)
        self.shard = ImageShard(0)

    # ------------------------------------------------------------------ public
    def register(
        self,
        images: torch.Tensor,
        grid: Grid,
        valid: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        transform: ComposedTransform | None = None,
        roi: torch.Tensor | None = None,
        distributed=False,
    ) -> CoRegResult:
        """Register ``images`` (see the class); with ``distributed`` (``True``: the default
        process group, or a ``torch.distributed`` process group) ``images``, ``valid``,
        ``labels`` and ``transform`` are this process's slice of the group."""
        cuda = torch.device(self.config.device).type == "cuda"
        with deterministic_kernels(self.config.deterministic and cuda):
            return self._register(images, grid, valid, labels, transform, roi, distributed)

    def _register(self, images, grid, valid, labels, transform, roi, distributed) -> CoRegResult:
        cfg = self.config
        n = images.shape[0]
        self.shard = self._join(images, grid, valid, labels, roi, distributed)
        device = torch.device(cfg.device)
        self._roi_source = (None if roi is None else roi.to(device).float(), grid)
        self._roi_cache: dict = {}  # the roi on each level's lattice
        self._assess_cache: dict = {}  # the voxels the checks look at, per grid (_assessment)
        self._sample_cache: dict = {}  # the flat indices of the roi, per grid (_draw)
        torch.manual_seed(cfg.seed)
        # random draws come from a CPU generator and are moved to the device: the same seed
        # gives the same Gamma^[0] and coordinate samples on every device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        valid = torch.ones_like(images) if valid is None else valid.float()
        if cfg.mask_zero_fill:  # zero-filled regions are outside the field of view
            valid = valid * ~padding_mask(images)
        images, valid = images.float().to(device), valid.to(device)
        # the intensity range of each image (its histogram bins) from inside the roi only
        ranges = XF.intensity_range(images, valid if roi is None else valid * roi.to(device))
        # one pyramid of the images and their fields of view for all stages, in bin units per
        # stage (to_bins is linear; clipped after the smoothing)
        levels = max(s.levels for s in cfg.stages)
        raw = image_pyramid(torch.stack([images, valid], 1), grid, levels)
        transform = transform or ComposedTransform(n, grid.ndim)
        transform.to(device)
        start = time.perf_counter()
        common = None
        reports = []
        diagnostics: dict = {"stages": []}
        total = sum(s.iterations for s in cfg.stages)
        quiet = not cfg.progress or self.shard.rank != 0  # one bar for a distributed run
        with tqdm(total=total, disable=quiet, desc="X-CoReg", leave=False) as bar:
            for stage_cfg in cfg.stages:
                linear = [r for r in diagnostics["stages"] if r["name"] != "ffd"]
                if (stage_cfg.name == "ffd" and cfg.skip_ffd_after_rejected_linear
                        and linear and not linear[-1]["accepted"]):
                    diagnostics["stages"].append(skipped_ffd(linear[-1]))
                    reports.append(StageReport("ffd", 0))
                    bar.update(stage_cfg.iterations)
                    continue
                bins = stage_cfg.bins or cfg.bins
                pyramid = stacked = None  # the last stage's levels go before the next are made
                pyramid = [(torch.stack([XF.to_bins(x[:, 0], ranges, bins), x[:, 1]], 1), g)
                           for x, g in raw[levels - stage_cfg.levels:]]
                stacked = pyramid[-1][0]
                log_f_gt = self._label_appearance(stacked, labels, bins)
                if common is None:
                    common, diagnostics["gamma_init"] = self._initial_common(
                        transform, stacked, grid, bins, log_f_gt
                    )
                report, common, record = self._run_stage(
                    stage_cfg, transform, pyramid, bins, common, log_f_gt, bar
                )
                reports.append(report)
                diagnostics["stages"].append(record)
        x_value, loglik, common = self._final_state(
            transform, stacked, grid, bins, common, log_f_gt
        )
        if self.objective is not None:
            diagnostics["objective"] = {"method": cfg.method, "value": self._objective_value}
        if cfg.reference is None:
            diagnostics["mean_displacement_mm"] = mean_displacement(transform, grid, self.shard)
        return CoRegResult(
            transform,
            common,
            reports,
            x_value,
            loglik,
            time.perf_counter() - start,
            diagnostics,
            self.shard if self.shard.distributed else None,
        )

    # ------------------------------------------------------------------ set-up
    def _join(self, images, grid, valid, labels, roi, distributed) -> ImageShard:
        """The slice of the group this process holds, after the input checks: the whole group
        (:class:`ImageShard`), or with ``distributed`` this process's slice of a group spread
        over a process group (:func:`~dcc.coreg.distributed.join`: the checks of every process
        agree before any work; the settings, grid and roi must be the same everywhere)."""
        if not distributed:
            self._check_inputs(images, grid, valid, labels, roi)
            return ImageShard(images.shape[0])
        if self.objective is not None:  # every process raises the same, before any collective
            raise ValueError(
                f"XCoReg: method '{self.config.method}' is not supported in distributed mode "
                "(only xcoreg and xcoreg-gt); run it in one process"
            )
        error = None
        try:
            self._check_inputs(images, grid, valid, labels, roi, group=False)
        except ValueError as failed:
            error = failed
        settings = {k: v for k, v in dataclasses.asdict(self.config).items()
                    if k not in ("device", "progress")}
        digest = fingerprint(settings, grid.to_dict(), None if roi is None else int(roi.sum()))
        group = None if distributed is True else distributed
        shard = join(images.shape[0], self.config.device, group, digest, error)
        self._check_group(shard.total)
        return shard

    def _check_group(self, n: int) -> None:
        """Checks of the group as a whole (``n`` images in all)."""
        if n < 2:
            raise ValueError(f"XCoReg: groupwise registration needs at least 2 images, got {n}")
        ref = self.config.reference
        if ref is not None and not 0 <= ref < n:
            raise ValueError(f"XCoReg: reference index {ref} is outside 0..{n - 1}")

    def _check_inputs(self, images, grid, valid, labels, roi=None, group=True):
        """Shapes and values of the inputs; with ``group`` the group checks as well
        (:meth:`_check_group`; a distributed run makes them once the group's size is known)."""
        n = images.shape[0]
        if roi is not None:
            if tuple(roi.shape) != grid.shape:
                raise ValueError(
                    f"XCoReg: roi must have the grid's shape {grid.shape}, got {tuple(roi.shape)}"
                )
            if not roi.any():
                raise ValueError("XCoReg: the region of interest (roi) is empty")
        if images.dim() != grid.ndim + 1 or tuple(images.shape[1:]) != grid.shape:
            raise ValueError(
                f"XCoReg: expected images of shape (N, {', '.join(map(str, grid.shape))}), got "
                f"{tuple(images.shape)}"
            )
        if group and n < 2:
            raise ValueError(f"XCoReg: groupwise registration needs at least 2 images, got {n}")
        if valid is not None and valid.shape != images.shape:
            raise ValueError(
                f"XCoReg: valid must have shape {tuple(images.shape)}, got {tuple(valid.shape)}"
            )
        ref = self.config.reference
        if group and ref is not None and not 0 <= ref < n:
            raise ValueError(f"XCoReg: reference index {ref} is outside 0..{n - 1}")
        if self.config.method == "xcoreg-gt":
            if labels is None or labels.shape != images.shape:
                raise ValueError(
                    f"XCoReg: method 'xcoreg-gt' needs label maps of shape "
                    f"{tuple(images.shape)}, got {None if labels is None else tuple(labels.shape)}"
                )

    def _roi_on(self, grid: Grid) -> torch.Tensor | None:
        """The region of interest on the lattice of ``grid`` ``(M,)`` (``None``: everywhere);
        on a pyramid level, the voxels whose centre lies inside it (linear interpolation > 0.5)."""
        source, base = self._roi_source
        if source is None:
            return None
        if grid not in self._roi_cache:  # on the roi's own grid this gives the roi exactly
            points = grid.points(device=source.device).reshape(1, -1, grid.ndim)
            inside = sample(source[None, None], base.world_to_normalized(points))
            self._roi_cache[grid] = inside.reshape(-1) > 0.5
        return self._roi_cache[grid]

    def _assessment(self, transform, images, grid):
        """The group ``images`` ``(N, 2, *S)`` warped onto the voxels of ``grid`` that the
        checks look at: all of them, or :data:`ASSESS_POINTS` fixed random ones of a larger
        grid. Returns the intensities ``(N, P)``, the overlap region Omega^phi (Eq. 14) among
        those voxels (within the roi) ``(P,)`` and its fraction of the grid."""
        roi = self._roi_on(grid)
        if grid.numel <= ASSESS_POINTS:
            _, values, overlap = warp_group(transform, images, grid)
            overlap = self.shard.all(overlap)  # every image of the group, on every process
        else:
            if grid not in self._assess_cache:  # the same voxels for every check on this grid
                generator = torch.Generator().manual_seed(self.config.seed + 2)
                drawn = torch.randperm(grid.numel, generator=generator)[:ASSESS_POINTS]
                self._assess_cache[grid] = drawn.sort().values.to(images.device)
            index = self._assess_cache[grid]
            points = grid.world_to_normalized(transform.lattice_at(grid, index))
            warped = sample(images, points)  # (N, 2, P)
            values, overlap = warped[:, 0], self.shard.all((warped[:, 1] > VALID).all(0))
            roi = None if roi is None else roi[index]
        overlap = overlap if roi is None else overlap & roi
        return values, overlap, overlap.float().mean().item()

    def _label_appearance(self, stacked, labels, bins):
        """Ground-truth appearance model f_jk of Eq. (48) from each image's own labels."""
        if self.config.method != "xcoreg-gt":
            return None
        n = stacked.shape[0]
        values = stacked[:, 0].reshape(n, -1)
        inside = stacked[:, 1].reshape(n, -1) > VALID
        classes = self.shard.unique(torch.unique(labels))  # the classes of the whole group
        onehot = labels.reshape(n, -1, 1).to(stacked.device) == classes.to(stacked.device)
        onehot = onehot.float() * inside.unsqueeze(-1)
        return XF.appearance_model(values, onehot, bins)

    def _make_stage(self, cfg: StageConfig, n: int, grid: Grid) -> SpatialTransform:
        if cfg.name == "translation":
            return Translation(n, grid.ndim)
        if cfg.name == "rigid":
            return Rigid(n, grid.ndim, center=grid.center, angle_scale=cfg.angle_scale)
        if cfg.name == "affine":
            return Affine(n, grid.ndim, center=grid.center, matrix_scale=cfg.matrix_scale)
        return MultiLevelFFD(n, grid, cfg.ffd_spacing)

    def _num_classes(self, log_f_gt):
        return self.config.num_classes if log_f_gt is None else log_f_gt.shape[-1]

    @torch.no_grad()
    def _initial_common(self, transform, images, grid, bins, log_f_gt):
        """Gamma^[0] (Eq. 22), then ``em_warmup`` EM steps on the initial alignment; of
        ``inits`` random draws the one with the highest log-likelihood (Eq. 23) is kept."""
        cfg = self.config
        values, overlap, _ = self._assessment(transform, images, grid)
        if not overlap.any():
            raise RegistrationError("the images do not overlap (in the roi) at the start")
        if self.objective is not None:  # a competing metric: its state (GMM: EM from a start)
            fit = self._fit_common(None, values, overlap, bins, log_f_gt, cfg.em_warmup)
            return fit["common"], {"objective": cfg.method, "em_steps": cfg.em_warmup,
                                   "value": fit["x"]}
        draws = cfg.inits if cfg.em_warmup > 0 and log_f_gt is None else 1
        best, scores = None, []
        for _ in range(draws):
            fit = self._fit_common(None, values, overlap, bins, log_f_gt, cfg.em_warmup)
            scores.append(fit["log_likelihood"])
            if best is None or scores[-1] > max(scores[:-1]):
                best = fit["common"]
        return best, {"draws": draws, "em_steps": cfg.em_warmup, "log_likelihood": scores}

    # ------------------------------------------------------------------ algorithm 1
    def _run_stage(self, cfg, transform, pyramid, bins, common, log_f_gt, bar):
        """One stage on its ``pyramid`` (coarsest first) with the overlap guard, the objective
        check, restarts (one try) or ``cfg.tries`` independent tries of which the medoid is
        kept (:meth:`_choose`)."""
        top = self.config
        t0 = time.perf_counter()
        stacked, grid = pyramid[-1]
        n = stacked.shape[0]
        transform.append(self._make_stage(cfg, n, grid).to(stacked.device))
        before = self._assess(transform, stacked, grid, bins, common, log_f_gt)
        record = {"name": cfg.name, "x_before": before["x"], "tries": [], "accepted": False}
        lr, restarts = cfg.lr, 0
        candidates: list = []  # per try: (X, stage, common, report), or None if rejected
        while len(candidates) < cfg.tries:
            stage = self._make_stage(cfg, n, grid).to(stacked.device)
            transform.stages[-1] = stage
            report = StageReport(cfg.name, 0)
            trial = {"lr": lr, "min_overlap_fraction": 1.0}
            try:
                end_common = self._schedule(
                    cfg,
                    lr,
                    stage,
                    transform,
                    pyramid,
                    bins,
                    common,
                    log_f_gt,
                    bar,
                    report,
                    trial,
                )
                # a competing metric is compared on the voxels both overlaps share: its value
                # depends on the region (entropies and mixture likelihoods of a field of view
                # with more or less zero background), and on open-MS its stages found the
                # right alignment and were rejected on the smaller overlap
                # (results/openms_table3). X keeps the check it was tuned with.
                within = None if self.objective is None else before["region"]
                after = self._assess(transform, stacked, grid, bins, end_common, log_f_gt,
                                     within)
                shared = None if within is None else within & after["region"]
                # the start again, with Gamma re-estimated from the same end state: EM has had
                # many more steps during the stage than before it, which favours "after"
                transform.stages[-1] = self._make_stage(cfg, n, grid).to(stacked.device)
                again = self._assess(transform, stacked, grid, bins, end_common, log_f_gt,
                                     shared)
                start = before if shared is None else self._assess(
                    transform, stacked, grid, bins, before["common"], log_f_gt, shared)
                start_terms = again if again["x"] > start["x"] else start
                trial["x_start"] = start_terms["x"]
                trial["x_after"] = after["x"]
                trial["x_images_start"] = [round(v, 4) for v in start_terms["x_images"]]
                trial["x_images_after"] = [round(v, 4) for v in after["x_images"]]
                moved = self.shard.gather(torch.tensor(stage_motion(stage, grid),
                                                       device=stacked.device))
                trial["moved_mm"] = [round(v, 2) for v in moved.tolist()]
                trial["overlap_fraction"] = after["overlap"] / before["overlap"]
                accepted = after["x"] >= trial["x_start"]
                trial["outcome"] = "accepted" if accepted else "objective decreased"
            except _OverlapLost as lost:
                accepted, trial["outcome"] = False, str(lost)
            record["tries"].append(trial)
            if not accepted and cfg.tries == 1 and restarts < top.restarts:
                restarts, lr = restarts + 1, lr * 0.5
                continue
            candidates.append((after["x"], stage, after["common"], report) if accepted else None)
        chosen = self._choose(candidates, record, grid, n, stacked.device, cfg)
        if chosen is None:  # the start was chosen (no try accepted): the stage does nothing
            transform.stages[-1] = self._make_stage(cfg, n, grid).to(stacked.device)
            common = before["common"]
        else:
            record["accepted"] = True
            _, transform.stages[-1], common, report = chosen
            record["chosen_x"] = chosen[0]
        record["restarts"] = restarts
        report.seconds = time.perf_counter() - t0
        return report, common, record

    def _choose(self, candidates, record, grid, n, device, cfg):
        """The try kept: the only one, or of several the medoid, the try whose maps lie closest
        to the others' (mean |S_a(x) - S_b(x)| over the lattice, the largest over the images);
        a rejected try counts as the start (no motion).

        X does not rank tries: on real groups a far-off alignment can score as high as the
        right one (MyoPS, results/myops_bench), while independent tries (fresh coordinate
        samples) that land in the same place agree. When even the medoid lies more than
        ``cfg.spread_warning`` mm from another try, a warning names the image.
        """
        if len(candidates) == 1:
            return candidates[0]
        grid = statistics_grid(grid)
        identity = grid.points(device=device).unsqueeze(0)
        with torch.no_grad():
            maps = [identity.expand(n, *identity.shape[1:]) if c is None else
                    c[1].lattice(grid) for c in candidates]
            # distance[a, b, j]: mean |S_a(x) - S_b(x)| of image j
            distance = torch.stack([torch.stack([
                (a - b).norm(dim=-1).flatten(1).mean(1) for b in maps]) for a in maps])
        total = self.shard.max(distance.amax(-1)).sum(1)  # the largest over all N images
        best = int(total.argmin())
        # per image: the farthest try from the medoid (all N images, in global order)
        spread = self.shard.gather(distance[best].amax(0))
        record["chosen_try"] = best
        record["spread_mm"] = [round(v, 2) for v in spread.tolist()]
        worst = int(spread.argmax())
        if spread[worst] > cfg.spread_warning:
            record.setdefault("warnings", []).append({
                "image": worst,
                "message": f"{cfg.name} tries disagree by {spread[worst]:.1f} mm on this image "
                           "(the alignment is ambiguous for the X-metric); check it",
            })
        return candidates[best]

    def _schedule(
        self,
        cfg,
        lr,
        stage,
        transform,
        pyramid,
        bins,
        common,
        log_f_gt,
        bar,
        report,
        trial,
    ):
        """Resolution levels (and FFD levels) of one try of a stage; fills ``report``."""
        sublevels = max(cfg.levels, cfg.ffd_levels if cfg.name == "ffd" else 1)
        with torch.no_grad():  # overlap at the stage start, per level (the guard's reference)
            start = [self._assessment(transform, x, g)[2] for x, g in pyramid]
        per_level = [
            cfg.iterations // sublevels + (i < cfg.iterations % sublevels) for i in range(sublevels)
        ]
        for sub in range(sublevels):
            level_images, level_grid = pyramid[min(sub, cfg.levels - 1)]
            if sub > 0 and isinstance(stage, MultiLevelFFD) and len(stage.levels) < cfg.ffd_levels:
                stage.add_level()
            if start[min(sub, cfg.levels - 1)] == 0:  # too coarse: the smoothed fields of view
                bar.update(per_level[sub])  # no longer overlap anywhere
                report.levels.append({"grid": list(level_grid.shape), "iterations": 0,
                                      "skipped": "no overlap on this level"})
                continue
            optimizer = torch.optim.Adam(stage.parameter_groups(lr))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
                cosine_factor, steps=per_level[sub], final=cfg.lr_final))
            steps, x_value, common = self._optimize(
                per_level[sub],
                cfg.max_sample,
                stage,
                transform,
                schedule,
                level_images,
                level_grid,
                bins,
                common,
                log_f_gt,
                bar,
                start[min(sub, cfg.levels - 1)],
                trial,
            )
            report.iterations += steps
            report.levels.append(
                {"grid": list(level_grid.shape), "iterations": steps, "x_metric": x_value}
            )
            report.x_metric = x_value
        return common

    @torch.no_grad()
    def _fit_common(self, common, values, overlap, bins, log_f_gt, steps, points=EM_POINTS):
        """The common space (X-CoReg: :meth:`_fit_x`) or a competing metric's state and value
        (:meth:`_fit_objective`) on a fixed subsample of the overlap."""
        if self.objective is not None:
            return self._fit_objective(common, values, overlap, bins, steps, points)
        return self._fit_x(common, values, overlap, bins, log_f_gt, steps, points)

    def _subsample(self, overlap, points):
        """The overlap voxels of a check: all, or ``points`` of them drawn from a generator of
        their own (the same voxels before and after a stage)."""
        idx = overlap.nonzero().squeeze(1)
        if points is not None and idx.numel() > points:
            generator = torch.Generator().manual_seed(self.config.seed + 1)
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:points].to(idx.device)]
        return idx

    @torch.no_grad()
    def _fit_objective(self, state, values, overlap, bins, steps, points=EM_POINTS):
        """A competing metric on the subsample of :meth:`_subsample`: ``steps`` updates of its
        state (GMM: EM steps; from its start when ``state`` is ``None``), then its value, as
        :meth:`_fit_x` gives X."""
        sub = values[:, self._subsample(overlap, points)]
        if state is None:
            state = self.objective.init(sub, bins)
        for _ in range(steps):
            state = self.objective.update(sub, bins, state)
        value = self.objective(sub, bins, state).item()
        return {"common": state, "x": value, "x_images": [], "log_likelihood": None}

    @torch.no_grad()
    def _fit_x(self, common, values, overlap, bins, log_f_gt, steps, points=EM_POINTS):
        """``steps`` EM steps (Eqs. 12, 20, 14) from ``common`` (``None``: from a random
        Gamma^[0], Eq. 22) on a fixed subsample of the ``overlap`` region of the warped
        ``values`` ``(N, P)`` (at most ``points`` voxels, ``None``: all).

        Returns ``{"common"}`` (the fitted f and pi), ``"x"`` (X of Eq. 8 on the subsample) and
        its terms ``"x_images"``, and ``"log_likelihood"`` (Eq. 23 per voxel). The subsample is
        drawn from a generator of its own, so that X before and after a stage is measured on
        the same voxels.
        """
        idx = self._subsample(overlap, points)
        sub = values[:, idx]
        k = self._num_classes(log_f_gt)
        # a distributed run: the per-point sums of log f_jk over this process's images are
        # all-reduced (Eq. 12), so every process has the same Gamma, pi and log-likelihood
        reduce = self.shard.sum if self.shard.distributed else None
        if common is None:
            log_pi = torch.full((k,), -math.log(k), device=values.device)
            log_gamma = torch.log(XF.random_posterior(idx.numel(), k, self.generator, sub.device))
        else:
            log_pi, log_gamma = common.log_pi, common.log_gamma_at(sub, bins, reduce)
        log_f, loglik = log_f_gt, None
        for _ in range(max(1, steps)):
            if log_f_gt is None:
                log_f = XF.appearance_model(sub, log_gamma.exp(), bins)
            log_gamma, log_evidence = XF.posterior(sub, log_f, log_pi, reduce)
            log_pi = torch.log(XF.proportions(log_gamma.exp()).clamp_min(XF.EPS))
            loglik = log_evidence.mean().item()
        # I(U_j; Z) per image, of all N images in global order
        terms = self.shard.gather(XF.x_metric(sub, log_gamma.exp(), bins, reduction="none"))
        return {
            "common": CommonSpace(log_f, log_pi),
            "x": terms.sum().item(),
            "x_images": terms.tolist(),
            "log_likelihood": loglik,
        }

    @torch.no_grad()
    def _assess(self, transform, images, grid, bins, common, log_f_gt, within=None):
        """X (Eq. 8) at full resolution after ``em_warmup`` EM steps from ``common``
        (:meth:`_fit_common`) on the voxels of :meth:`_assessment` in the overlap (and in
        ``within``, a mask of those voxels, if given), the overlap size (voxels; estimated from
        those on a large grid) and the overlap among those voxels (``"region"``)."""
        values, overlap, fraction = self._assessment(transform, images, grid)
        region = overlap if within is None else overlap & within
        if not region.any():
            n = self.shard.total if self.shard.distributed else images.shape[0]
            return {"x": float("-inf"), "x_images": [float("-inf")] * n,
                    "overlap": round(fraction * grid.numel), "common": common, "region": overlap}
        fit = self._fit_common(common, values, region, bins, log_f_gt, self.config.em_warmup)
        return fit | {"overlap": round(fraction * grid.numel), "region": overlap}

    def _optimize(
        self,
        iterations,
        max_sample,
        stage,
        transform,
        schedule,
        images,
        grid,
        bins,
        common,
        log_f_gt,
        bar,
        start_fraction,
        trial,
    ):
        """``iterations`` steps of Algorithm 1 on one level, all on the coordinate sample.

        The posterior of a voxel depends only on its warped intensities, the appearance model
        f and pi (Eq. 20), so the E-step needs no dense Gamma: each step draws Omega_S from the
        lattice, warps the images only there, takes Gamma^[t] there from the previous step's
        (f, pi) (from ``common`` at the first step), steps on -X + lambda R with it (Eqs. 15-17)
        and fits (f, pi) on it for the next step (Eqs. 12, 14); autograd runs over the sample
        only. The overlap guard uses the sampled fraction of the overlap. A sample of more
        than ``max_sample`` voxels (``None``: no bound) is replaced by ``max_sample`` voxels
        drawn uniformly (with replacement).

        The points of the sample outside the overlap Omega^phi are masked (Gamma zero there)
        rather than dropped, so that the step keeps its shape, and the overlap, X and the loss
        come back to the host in one transfer after the step: two host synchronisations per
        step (the coordinate sample's size and that transfer) instead of five. A step that
        lost the overlap is thrown away with its try (:meth:`_run_stage`).
        """
        cfg = self.config
        optimizer = schedule.optimizer  # Adam, its step decayed by cosine_factor
        losses: list[float] = []
        x_value = float("nan")
        intensities = images[:, :1]
        roi = self._roi_on(grid)
        region = grid.numel if roi is None else int(roi.sum())
        rate = min(1.0, max(cfg.sample_rate, cfg.min_sample / region))
        bounded = max_sample is not None and rate * region > max_sample
        shard = self.shard
        # distributed: X and the loss of this process's images per step, summed over the
        # processes once at the end of the level (each step, if the convergence test needs it)
        deferred, last = shard.distributed and cfg.tolerance <= 0, None
        for step in range(1, iterations + 1):
            if bounded:
                drawn = self._draw(roi, grid, max_sample, images.device)
            else:
                drawn = coordinate_sample(roi, rate, self.generator, grid.numel, images.device)
            normalized = grid.world_to_normalized(transform.lattice_at(grid, drawn))  # (N, m, d)
            with torch.no_grad():  # intensities and fields of view (N, 2, m)
                warped_all = sample(images, normalized.detach())
                covers = warped_all[:, 1] > VALID  # (N, m)
                joint = None
                if shard.distributed:  # Omega^phi and the sums of Eq. (12): one all-reduce
                    inside, joint = self._reduce_step(common, warped_all, bins)
                else:
                    inside = covers.all(0)
            # the intensities again, with gradient (the backward of one channel costs half
            # that of both)
            warped = sample(intensities, normalized)[:, 0]  # (N, m)
            if self.objective is not None:  # a competing metric in place of X, on Omega^phi
                keep = inside.nonzero().squeeze(1)
                if keep.numel() == 0:
                    self._overlap_lost(0.0, covers, trial, bar, iterations - step + 1)
                warped = warped[:, keep]  # (N, m')
                with torch.no_grad():  # its state on this sample (GMM: one EM step)
                    common = self.objective.update(warped.detach(), bins, common)
                x = self.objective(warped, bins, common)
            else:
                x, common = self._x_step(warped, inside, joint, bins, common, log_f_gt)
            loss = -x + cfg.bending_weight * stage.regularization()  # Eq. (15)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # Eq. (16) with Adam
            schedule.step()
            if cfg.reference is None:
                project_unbiased(transform, grid.center, shard)  # Eq. (37) on the composed phi
            elif shard.owns(cfg.reference):
                stage.reset_(shard.local(cfg.reference))
            bar.update(1)
            last = torch.stack([x.detach(), loss.detach()])  # deferred: this process's only
            if shard.distributed and not deferred:
                last = shard.sum(last)
            # one transfer to the host: the sampled overlap fraction, X and the loss
            readback = torch.cat([inside.float().mean().view(1), last])
            fraction, x_value, loss_value = readback.tolist()
            # overlap as a fraction of the level grid (or roi), relative to the stage start's
            ratio = fraction * region / grid.numel / start_fraction
            if ratio < cfg.min_overlap or ratio == 0:
                self._overlap_lost(ratio, covers, trial, bar, iterations - step)
            trial["min_overlap_fraction"] = min(trial["min_overlap_fraction"], round(ratio, 4))
            if deferred:
                continue
            losses.append(loss_value)
            if step % 10 == 0:
                bar.set_postfix(stage=type(stage).__name__, X=f"{x_value:.4f}")
            if self._converged(losses):
                bar.update(iterations - step)
                iterations = step
                break
        if deferred and last is not None:  # only the last step's X is reported
            x_value = shard.sum(last).tolist()[0]
        return iterations, x_value, common

    def _overlap_lost(self, ratio, covers, trial, bar, remaining):
        """The overlap guard: the try ends (:class:`_OverlapLost`, naming in ``trial`` the image
        that covers least of the sample, ``covers`` ``(N, m)``), or the registration if the
        guard is off (``min_overlap`` 0) and no point of the sample is left in Omega^phi."""
        trial["min_overlap_fraction"] = min(trial["min_overlap_fraction"], round(ratio, 4))
        if ratio >= self.config.min_overlap:
            raise RegistrationError("the images no longer overlap; lower the step size (--lr)")
        bar.update(remaining)
        trial["image"] = int(self.shard.gather(covers.float().mean(1)).argmin())
        raise _OverlapLost(f"overlap fell to {ratio:.2f} of its size at the stage start")

    def _x_step(self, warped, inside, joint, bins, common, log_f_gt):
        """X (Eqs. 17, 21) on the points of a step's sample (warped intensities ``(N, m)``,
        with gradient) in Omega^phi (``inside``), and the common space for the next step."""
        with torch.no_grad():  # E-step (Eq. 20) with the previous step's f and pi
            if joint is None:
                log_gamma = common.log_gamma_at(warped.detach(), bins)
            else:  # the same on every process: the group's sums of log f_jk
                log_gamma = XF.posterior_from_joint(joint, common.log_pi)[0]
            # Gamma is zero outside Omega^phi: those points weigh nothing in pi and p_j
            gamma = torch.where(inside.unsqueeze(1), log_gamma.exp(), 0.0)
            log_pi = torch.log(XF.proportions(gamma).clamp_min(XF.EPS))  # Eq. (14)
        # one Parzen histogram serves X (Eqs. 17, 21) and, detached, the next step's
        # appearance model (Eq. 12): both are taken on the same sample with the same Gamma
        counts = XF.joint_histogram(warped, gamma, bins, normalize=False)
        pmf = counts / counts.sum((-2, -1), keepdim=True).clamp_min(XF.EPS)
        x = XF.mutual_information(pmf).sum()
        log_f = XF.log_pmf(counts.detach()) if log_f_gt is None else log_f_gt
        return x, CommonSpace(log_f, log_pi)

    def _reduce_step(self, common, warped, bins):
        """Distributed E-step inputs on a coordinate sample of ``m`` points: the points inside
        every image's field of view (Omega^phi, Eq. 14) and the group's sums
        ``sum_j log f_jk(u_j)`` ``(m, K)`` (Eq. 12), from one all-reduce of this process's
        partial sums and image counts, ``m x (K + 1)`` floats."""
        covered = (warped[:, 1] > VALID).sum(0)  # (m,) this process's images covering a point
        joint = common.log_joint_at(warped[:, 0], bins)  # (m, K)
        packed = self.shard.sum(torch.cat([joint, covered.to(joint.dtype).unsqueeze(1)], 1))
        return packed[:, -1] == self.shard.total, packed[:, :-1]

    def _draw(self, roi, grid, size, device):
        """``size`` voxels drawn uniformly with replacement from the roi (the lattice)."""
        if roi is None:
            region = None
        else:
            if grid not in self._sample_cache:
                self._sample_cache[grid] = roi.nonzero().squeeze(1)
            region = self._sample_cache[grid]
        count = grid.numel if region is None else region.numel()
        u = XF.seeded_draw(torch.rand, (size,), self.generator, device)
        index = (u * count).long().clamp_max(count - 1).sort().values  # sorted: memory locality
        return index if region is None else region[index]

    def _converged(self, losses):
        p = self.config.patience
        if self.config.tolerance <= 0 or len(losses) < 2 * p:
            return False
        recent = sum(losses[-p:]) / p
        before = sum(losses[-2 * p : -p]) / p
        return abs(before - recent) < self.config.tolerance * p

    @torch.no_grad()
    def _final_state(self, transform, images, grid, bins, common, log_f_gt):
        """One last common-space update at full resolution: an EM step (Eqs. 12, 20, 14) on
        the voxels of :meth:`_assessment` (every overlap voxel of a grid up to
        :data:`ASSESS_POINTS`), X (Eq. 8) and the log-likelihood (Eq. 23, summed over the
        overlap) there, then Gamma on the whole grid (:meth:`_dense_gamma`)."""
        values, overlap, fraction = self._assessment(transform, images, grid)
        if self.objective is None:
            fit = self._fit_x(common, values, overlap, bins, log_f_gt, 1, points=None)
        else:  # the method's value; X-CoReg's common space fitted afresh on the alignment
            self._objective_value = self._fit_objective(common, values, overlap, bins, 1,
                                                        points=None)["x"]
            fit = self._fit_x(None, values, overlap, bins, log_f_gt,
                              max(1, self.config.em_warmup), points=None)
        final = fit["common"]
        final.grid, final.gamma = grid, self._dense_gamma(final, transform, images, grid)
        return fit["x"], fit["log_likelihood"] * fraction * grid.numel, final

    def _dense_gamma(self, common, transform, images, grid) -> torch.Tensor:
        """Gamma ``(M, K)`` on every voxel of ``grid`` (Eq. 20), in passes of
        :data:`CHUNK` voxels; where not every image covers a voxel, from the images that do
        (pi alone where none does)."""
        out = images.new_empty(grid.numel, common.log_pi.numel())
        for start in range(0, grid.numel, CHUNK):
            index = torch.arange(start, min(start + CHUNK, grid.numel), device=images.device)
            warped = sample(images, grid.world_to_normalized(transform.lattice_at(grid, index)))
            covered = (warped[:, 1] > VALID).unsqueeze(-1)  # (N, m, 1)
            terms = XF.log_appearance(warped[:, 0], common.log_f) * covered
            joint = self.shard.sum(terms.sum(0)) + common.log_pi  # over all N images
            out[index] = (joint - joint.logsumexp(-1, keepdim=True)).exp()
        return out


@contextlib.contextmanager
def deterministic_kernels(enabled: bool = True):
    """Deterministic GPU kernels inside the block (``torch.use_deterministic_algorithms``),
    the previous setting restored after it.

    On CUDA the Parzen histogram's ``index_add_`` otherwise sums with atomics in a random order:
    two runs with the same seed then differ by float rounding, and on a group near a tipping
    point of the optimisation that was enough to end at Dice 0.54 in one run and 0.85 in the
    next (``bench/bench_coreg_devices.py``). ``warn_only``: kernels without a deterministic
    version (``grid_sample``'s backward, whose atomics only serve the image gradient that
    X-CoReg never asks for) run as they are, without the warning.
    """
    if not enabled:
        yield
        return
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic")
            yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def skipped_ffd(linear: dict) -> dict:
    """The diagnostics record of an FFD stage skipped after the rejected ``linear`` stage (its
    record), with a warning naming the image that slid out of the overlap most often."""
    name = linear["name"]
    warning = {"message": f"the {name} stage was rejected by the safeguards on every try "
                          f"({linear['tries'][-1]['outcome']}), so the FFD was skipped (it would "
                          f"have had to do the {name} stage's work); the group may be misaligned "
                          "beyond what the safeguards allow: check it, or give a --roi"}
    slid = [t["image"] for t in linear["tries"] if "image" in t]
    if slid:
        warning["image"] = max(set(slid), key=slid.count)
        warning["message"] = "slid out of the overlap; " + warning["message"]
    return {"name": "ffd", "accepted": False, "tries": [], "skipped": True,
            "warnings": [warning]}


def cosine_factor(step: int, steps: int, final: float) -> float:
    """Step-size factor after ``step`` of ``steps``: a cosine from 1 down to ``final``."""
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def warp_group(transform: SpatialTransform, images: torch.Tensor, grid: Grid):
    """Points phi_j(x) on the lattice of ``grid`` and the group ``images`` ``(N, 2, *S)``
    (channel 0 the intensities, channel 1 the field-of-view mask) warped there.

    Returns the points in ``grid_sample`` coordinates ``(N, M, d)`` (with gradient), the warped
    intensities ``(N, M)`` (without) and the overlap region Omega^phi (Eq. 14) ``(M,)``, where
    every image is inside its field of view.
    """
    points = transform.lattice(grid).reshape(images.shape[0], -1, grid.ndim)
    normalized = grid.world_to_normalized(points)
    with torch.no_grad():
        warped = sample(images, normalized.detach())  # (N, 2, M)
    return normalized, warped[:, 0], (warped[:, 1] > VALID).all(0)


def coordinate_sample(
    overlap: torch.Tensor | None,
    rate: float,
    generator: torch.Generator | None = None,
    size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The coordinate sample Omega_S: indices of the voxels each kept with probability ``rate``
    (all of them for ``rate >= 1``), among the ``overlap`` voxels ``(M,)`` or, with ``overlap``
    ``None``, among all ``size`` voxels of the lattice (on ``device``). The uniforms come from
    :func:`~dcc.similarity.functional.seeded_draw`: a seeded CPU generator selects the same
    voxels whatever the device."""
    if overlap is None:
        overlap = torch.ones(size, dtype=torch.bool, device=device)
    if rate >= 1:
        return overlap.nonzero().squeeze(1)
    u = XF.seeded_draw(torch.rand, tuple(overlap.shape), generator, overlap.device)
    return ((u < rate) & overlap).nonzero().squeeze(1)


def padding_mask(images: torch.Tensor) -> torch.Tensor:
    """``True`` where an image ``(N, *shape)`` is exactly zero and connected to its border.

    Scanners and resampling fill an image beyond its acquired field of view with zeros. Those
    voxels are not observations of the anatomy (not in Omega_j), and the edges of the filled
    region would be a strong spurious feature for the X-metric: on MyoPS Case3002 (C0/LGE/T2
    already aligned, each with its own oblique field-of-view polygon) rigid registration shifted
    T2 by 10 mm to line the polygons up.
    """
    out = []
    for image in images.cpu().numpy():
        zero = image == 0
        components, _ = ndimage.label(zero)
        border = np.zeros_like(zero)
        for axis in range(zero.ndim):
            for end in (0, -1):
                border[(slice(None),) * axis + (end,)] = True
        touching = np.unique(components[border & zero])
        out.append(np.isin(components, touching[touching > 0]))
    return torch.from_numpy(np.stack(out)).to(images.device)


# ---------------------------------------------------------------------- Eq. (37)
def _outer_linear(stages) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` with S_1 o ... o S_k (x) = A_j x + b_j for linear stages."""
    a, b = None, None
    for stage in stages:
        sa, sb = stage.linear()
        if a is None:
            a, b = sa, sb
        else:
            b = b + (a @ sb.unsqueeze(-1)).squeeze(-1)
            a = a @ sa
    return a, b


@torch.no_grad()
def project_unbiased(transform: ComposedTransform, center, group: ImageShard | None = None
                     ) -> None:
    """Eq. (37) on the composed phi_j = P_j o S_j, for the newest (innermost) stage S_j.

    S_j is first made zero-mean on its own. If the outer stages P_j are linear
    (P_j(y) = A_j y + b_j), S_j is then corrected so that (1/N) sum_j phi_j(x) = x:

    * FFD: the coefficients c_j of the first level get
      c_j <- c_j - A_j^T (sum_k A_k A_k^T)^-1 N (mean_k A_k c_k - r), r(x) = x - mean_k P_k(x)
      taken at the knots (cubic B-splines reproduce the affine r exactly), and finer levels the
      same with r = 0; exact on the domain.
    * linear S_j: its offsets get the same correction at ``center`` (e.g. the grid centre); the
      linear part of a mean of rotations is not a rotation, so elsewhere it is first-order.

    With a non-linear P_j (an FFD before another stage) only the per-stage projection is done.

    ``group``: a group split across processes (:mod:`dcc.coreg.distributed`; ``transform``
    holds this process's images): the means and sums over j run over all N images
    (all-reduced), so the constraint holds for the whole group.
    """
    group = group or ImageShard(transform.groups)
    stage = transform.stages[-1]
    stage.zero_mean_(group.mean if group.distributed else None)
    outer = list(transform.stages[:-1])
    if not outer or not all(isinstance(s, LinearTransform) for s in outer):
        return
    a, b = _outer_linear(outer)
    n, d = group.total, a.shape[-1]
    gram_inv = torch.linalg.inv(group.sum((a @ a.transpose(1, 2)).sum(0)))  # (d, d)
    eye = torch.eye(d, dtype=a.dtype, device=a.device)

    def correct(shift: torch.Tensor) -> torch.Tensor:
        """Per-image corrections ``(N, d, ...)`` for mean residuals ``shift`` ``(d, ...)``."""
        lam = torch.einsum("de,e...->d...", gram_inv * n, shift)
        return torch.einsum("jed,e...->jd...", a, lam)

    if isinstance(stage, MultiLevelFFD):
        for i, level in enumerate(stage.levels):
            c = level.coefficients  # (N, d, *knots)
            mean_ac = group.sum(torch.einsum("jde,je...->d...", a, c)) / n
            target = (_knot_residual(level, a, b, eye, group) if i == 0
                      else torch.zeros_like(mean_ac))
            c -= correct(mean_ac - target)
    elif isinstance(stage, LinearTransform):
        centre = torch.as_tensor(center, dtype=a.dtype, device=a.device)
        mapped = transform(centre.unsqueeze(0))[:, 0]  # (N, d)
        stage.offset -= correct(group.mean(mapped) - centre)


def _knot_residual(level: BSplineFFD, a, b, eye, group: ImageShard) -> torch.Tensor:
    """r(x) = x - mean_k (A_k x + b_k) at the knots of ``level``, ``(d, *knots)``."""
    shape = tuple(reversed(level.knots))
    axes = [torch.arange(k, dtype=a.dtype, device=a.device) for k in shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)  # (x, y, z)
    spacing = torch.as_tensor(level.spacing, dtype=a.dtype, device=a.device)
    rot = torch.as_tensor(level.domain.direction_matrix, dtype=a.dtype, device=a.device)
    origin = torch.as_tensor(level.knot_origin(), dtype=a.dtype, device=a.device)
    knots = origin + (index * spacing) @ rot.T  # (*knots, d)
    residual = knots @ (eye - group.mean(a)).T - group.mean(b)
    return residual.movedim(-1, 0)


def statistics_grid(grid: Grid) -> Grid:
    """``grid``, or for a grid of more than :data:`ASSESS_POINTS` voxels a coarser one over the
    same extent with at most that many (means over a 3D lattice need not the whole of it)."""
    if grid.numel <= ASSESS_POINTS:
        return grid
    return grid.downsample(math.ceil((grid.numel / ASSESS_POINTS) ** (1 / grid.ndim)))


@torch.no_grad()
def stage_motion(stage: SpatialTransform, grid: Grid) -> list[float]:
    """Mean |S_j(x) - x| over the lattice of ``grid`` (:func:`statistics_grid`) per image, in
    mm: how far a stage moved each image."""
    grid = statistics_grid(grid)
    points = grid.points(device=next(stage.parameters()).device)
    return (stage.lattice(grid) - points).norm(dim=-1).flatten(1).mean(1).tolist()


@torch.no_grad()
def mean_displacement(transform: SpatialTransform, grid: Grid,
                      group: ImageShard | None = None) -> dict:
    """Largest and average |(1/N) sum_j phi_j(x) - x| over the lattice, in mm (Eq. 37 check;
    over all N images of a ``group`` split across processes; :func:`statistics_grid`)."""
    group = group or ImageShard(transform.groups)
    grid = statistics_grid(grid)
    points = grid.points(device=next(transform.parameters()).device)
    drift = (group.mean(transform.lattice(grid)) - points).norm(dim=-1)
    return {"max": drift.max().item(), "mean": drift.mean().item()}
