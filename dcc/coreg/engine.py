"""X-CoReg (Algorithm 1): alternate the common-space update with Adam steps on -X + lambda R."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dcc.coreg.config import StageConfig, XCoRegConfig
from dcc.similarity import functional as XF
from dcc.spatial.functional import sample
from dcc.spatial.grid import Grid
from dcc.spatial.pyramid import image_pyramid
from dcc.spatial.transforms import (
    Affine,
    ComposedTransform,
    MultiLevelFFD,
    Rigid,
    SpatialTransform,
    Translation,
)


class RegistrationError(RuntimeError):
    """The optimisation cannot go on (e.g. the warped images no longer overlap)."""


VALID = 0.999  # a warped validity mask above this means "inside the image's field of view"


@dataclass
class CommonSpace:
    """Common-space parameters alpha = (Gamma, pi) on one grid (Sec. 3.2.1)."""

    grid: Grid
    log_gamma: torch.Tensor  # (M, K)
    log_pi: torch.Tensor  # (K,)

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    def resampled(self, grid: Grid) -> CommonSpace:
        """Gamma interpolated linearly onto another grid (next resolution level)."""
        k = self.log_gamma.shape[-1]
        gamma = self.gamma.T.reshape(1, k, *self.grid.shape)
        points = grid.points(device=gamma.device).unsqueeze(0)
        new = sample(gamma, self.grid.world_to_normalized(points)).reshape(k, -1).T
        new = new / new.sum(-1, keepdim=True).clamp_min(XF.EPS)
        return CommonSpace(grid, torch.log(new.clamp_min(XF.EPS)), self.log_pi)


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

    @property
    def posterior(self) -> torch.Tensor:
        """Gamma as ``(K, *grid.shape)``."""
        k = self.common.log_gamma.shape[-1]
        return self.common.gamma.T.reshape(k, *self.common.grid.shape)


class XCoReg:
    """Groupwise registration with the X-metric.

    ``register(images, grid)`` aligns ``N`` images given on one common ``grid`` (tensor
    ``(N, *grid.shape)``); ``valid`` ``(N, *grid.shape)`` marks each image's field of view
    (default: everywhere) and ``labels`` integer maps ``(N, *grid.shape)`` give the ground-truth
    appearance model of X-Reg-GT (Eq. 48), required for ``method="xcoreg-gt"``.
    """

    def __init__(self, config: XCoRegConfig):
        self.config = config

    # ------------------------------------------------------------------ public
    def register(
        self,
        images: torch.Tensor,
        grid: Grid,
        valid: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        transform: ComposedTransform | None = None,
    ) -> CoRegResult:
        cfg = self.config
        n = images.shape[0]
        self._check_inputs(images, grid, valid, labels)
        device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        valid = torch.ones_like(images) if valid is None else valid.float()
        images, valid = images.float().to(device), valid.to(device)
        transform = transform or ComposedTransform(n, grid.ndim)
        transform.to(device)
        start = time.perf_counter()
        common = None
        reports = []
        total = sum(s.iterations for s in cfg.stages)
        with tqdm(total=total, disable=not cfg.progress, desc="X-CoReg", leave=False) as bar:
            for stage_cfg in cfg.stages:
                bins = stage_cfg.bins or cfg.bins
                stacked = torch.stack([XF.normalize_intensities(images, bins, valid), valid], 1)
                log_f_gt = self._label_appearance(stacked, labels, bins)
                stage = transform.append(self._make_stage(stage_cfg, n, grid).to(device))
                report, common = self._run_stage(
                    stage_cfg, stage, transform, stacked, grid, bins, common, log_f_gt, bar
                )
                reports.append(report)
        x_value, loglik, common = self._final_state(
            transform, stacked, grid, bins, common, log_f_gt
        )
        return CoRegResult(transform, common, reports, x_value, loglik, time.perf_counter() - start)

    # ------------------------------------------------------------------ set-up
    def _check_inputs(self, images, grid, valid, labels):
        n = images.shape[0]
        if images.dim() != grid.ndim + 1 or tuple(images.shape[1:]) != grid.shape:
            raise ValueError(
                f"XCoReg: expected images of shape (N, {', '.join(map(str, grid.shape))}), got "
                f"{tuple(images.shape)}"
            )
        if n < 2:
            raise ValueError(f"XCoReg: groupwise registration needs at least 2 images, got {n}")
        if valid is not None and valid.shape != images.shape:
            raise ValueError(
                f"XCoReg: valid must have shape {tuple(images.shape)}, got {tuple(valid.shape)}"
            )
        ref = self.config.reference
        if ref is not None and not 0 <= ref < n:
            raise ValueError(f"XCoReg: reference index {ref} is outside 0..{n - 1}")
        if self.config.method == "xcoreg-gt":
            if labels is None or labels.shape != images.shape:
                raise ValueError(
                    f"XCoReg: method 'xcoreg-gt' needs label maps of shape "
                    f"{tuple(images.shape)}, got {None if labels is None else tuple(labels.shape)}"
                )

    def _label_appearance(self, stacked, labels, bins):
        """Ground-truth appearance model f_jk of Eq. (48) from each image's own labels."""
        if self.config.method != "xcoreg-gt":
            return None
        n = stacked.shape[0]
        values = stacked[:, 0].reshape(n, -1)
        inside = stacked[:, 1].reshape(n, -1) > VALID
        classes = torch.unique(labels)
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

    # ------------------------------------------------------------------ algorithm 1
    def _run_stage(self, cfg, stage, transform, stacked, grid, bins, common, log_f_gt, bar):
        t0 = time.perf_counter()
        report = StageReport(cfg.name, 0)
        sublevels = max(cfg.levels, cfg.ffd_levels if cfg.name == "ffd" else 1)
        pyramid = image_pyramid(stacked, grid, cfg.levels)
        per_level = [
            cfg.iterations // sublevels + (i < cfg.iterations % sublevels) for i in range(sublevels)
        ]
        for sub in range(sublevels):
            level_images, level_grid = pyramid[min(sub, cfg.levels - 1)]
            if sub > 0 and isinstance(stage, MultiLevelFFD) and len(stage.levels) < cfg.ffd_levels:
                stage.add_level()
            common = self._common_space(common, level_grid, log_f_gt, stacked.device)
            optimizer = torch.optim.Adam(stage.parameter_groups(cfg.lr))
            steps, x_value, common = self._optimize(
                per_level[sub],
                stage,
                transform,
                optimizer,
                level_images,
                level_grid,
                bins,
                common,
                log_f_gt,
                bar,
            )
            report.iterations += steps
            report.levels.append(
                {"grid": list(level_grid.shape), "iterations": steps, "x_metric": x_value}
            )
            report.x_metric = x_value
        report.seconds = time.perf_counter() - t0
        return report, common

    def _common_space(self, common, grid, log_f_gt, device):
        if common is None:
            k = self._num_classes(log_f_gt)
            gamma = XF.random_posterior(grid.numel, k, self.generator, device)  # Eq. (22)
            log_pi = torch.full((k,), -torch.log(torch.tensor(float(k))).item(), device=device)
            return CommonSpace(grid, torch.log(gamma), log_pi)
        return common if common.grid == grid else common.resampled(grid)

    def _warp(self, transform, images, grid):
        """Points phi_j(x) on the lattice (with gradient) and the warped images (without)."""
        points = transform.lattice(grid).reshape(images.shape[0], -1, grid.ndim)
        normalized = grid.world_to_normalized(points)
        with torch.no_grad():
            warped = sample(images, normalized.detach())  # (N, 2, M)
        return normalized, warped[:, 0], (warped[:, 1] > VALID).all(0)

    @torch.no_grad()
    def _update_common(self, common, values, overlap, sample_idx, bins, log_f_gt):
        """Eqs. (20), (12), (14): appearance model from gamma^[t] on the coordinate sample, then
        gamma^[t+1] on the overlap region (unchanged elsewhere) and pi^[t+1].

        Returns the new common space and the log-likelihood of Eq. (23).
        """
        if log_f_gt is None:
            log_f = XF.appearance_model(
                values[:, sample_idx], common.log_gamma[sample_idx].exp(), bins
            )
        else:
            log_f = log_f_gt
        log_gamma, log_evidence = XF.posterior(values, log_f, common.log_pi)
        inside = overlap.unsqueeze(-1)
        log_gamma = torch.where(inside, log_gamma, common.log_gamma)
        pi = XF.proportions(log_gamma.exp() * inside)
        new = CommonSpace(common.grid, log_gamma, torch.log(pi.clamp_min(XF.EPS)))
        return new, log_evidence[overlap].sum().item()

    def _draw_sample(self, overlap):
        """The coordinate sample Omega_S: each overlapping voxel with probability ``rate``."""
        rate = self.config.sample_rate
        if rate >= 1:
            return overlap.nonzero().squeeze(1)
        u = torch.rand(overlap.shape, generator=self.generator, device=overlap.device)
        return ((u < rate) & overlap).nonzero().squeeze(1)

    def _optimize(
        self, iterations, stage, transform, optimizer, images, grid, bins, common, log_f_gt, bar
    ):
        cfg = self.config
        losses: list[float] = []
        x_value = float("nan")
        intensities = images[:, :1]
        for step in range(1, iterations + 1):
            normalized, values, overlap = self._warp(transform, images, grid)
            idx = self._draw_sample(overlap)
            if idx.numel() == 0:
                raise RegistrationError("the images no longer overlap; lower the step size (--lr)")
            common, _ = self._update_common(common, values, overlap, idx, bins, log_f_gt)
            warped = sample(intensities, normalized[:, idx])[:, 0]  # (N, m) with gradient
            x = XF.x_metric(warped, common.log_gamma[idx].exp(), bins)  # Eqs. (17), (21)
            loss = -x + cfg.bending_weight * stage.regularization()  # Eq. (15)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # Eq. (16) with Adam
            if cfg.reference is None:
                stage.zero_mean_()  # Eq. (37)
            else:
                stage.reset_(cfg.reference)
            x_value = x.item()
            losses.append(loss.item())
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(stage=type(stage).__name__, X=f"{x_value:.4f}")
            if self._converged(losses):
                bar.update(iterations - step)
                return step, x_value, common
        return iterations, x_value, common

    def _converged(self, losses):
        p = self.config.patience
        if self.config.tolerance <= 0 or len(losses) < 2 * p:
            return False
        recent = sum(losses[-p:]) / p
        before = sum(losses[-2 * p : -p]) / p
        return abs(before - recent) < self.config.tolerance * p

    @torch.no_grad()
    def _final_state(self, transform, images, grid, bins, common, log_f_gt):
        """One last common-space update at full resolution; X on all overlapping voxels."""
        common = common if common.grid == grid else common.resampled(grid)
        _, values, overlap = self._warp(transform, images, grid)
        idx = overlap.nonzero().squeeze(1)
        common, loglik = self._update_common(common, values, overlap, idx, bins, log_f_gt)
        x = XF.x_metric(values[:, idx], common.log_gamma[idx].exp(), bins).item()
        return x, loglik, common
