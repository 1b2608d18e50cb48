"""Settings of X-CoReg and the named presets shipped in ``dcc/coreg/presets``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from omegaconf import OmegaConf

from dcc.spatial.grid import Grid

STAGES = ("translation", "rigid", "affine", "ffd")
# the X-metric (X-CoReg, X-Reg-GT) and the competing groupwise metrics of the paper's experiments
# in the same engine (dcc.similarity.baselines): conditional template entropy, accumulated
# pairwise estimates, Gaussian mixture, congealing, variance of intensities
BASELINES = ("cte", "ape", "gmm", "cg", "vi")
METHODS = ("xcoreg", "xcoreg-gt", *BASELINES)
# Paper defaults per stage (Sec. 4.1-4.2): Adam steps of 1 mm for translations and centres,
# 0.01 rad for rotations, 0.1 mm for FFD coefficients.
STAGE_DEFAULTS = {
    "translation": {"lr": 1.0, "iterations": 200},
    "rigid": {"lr": 1.0, "iterations": 400},
    "affine": {"lr": 1.0, "iterations": 400},
    "ffd": {"lr": 0.1, "iterations": 200},
}


@dataclass
class StageConfig:
    """One registration stage; its iterations are shared equally among its resolution levels."""

    name: str = "ffd"
    iterations: int = 200
    lr: float = 0.1  # Adam step; mm for offsets, centres and FFD coefficients
    levels: int = 1  # resolution levels of the image pyramid
    bins: int | None = None  # overrides XCoRegConfig.bins for this stage
    angle_scale: float = 0.01  # rigid: rotation step = lr * angle_scale (radians)
    matrix_scale: float = 0.01  # affine: matrix step = lr * matrix_scale
    ffd_spacing: float = 20.0  # control-point spacing of the initial FFD level, mm
    ffd_levels: int = 1  # FFD levels, each halving the spacing (coarse to fine)
    # final Adam step as a fraction of lr: cosine decay over each resolution/FFD level (1: none).
    # With a fresh coordinate sample every step the gradient is noisy; a decaying step lets the
    # last iterations settle instead of jittering at the full step size.
    lr_final: float = 1.0
    # independent tries of the stage from its start (fresh coordinate samples); of several,
    # the medoid is kept (the try closest to the others; a rejected try counts as the start)
    # and a warning names the image on which even the medoid is `spread_warning` mm from
    # another try (XCoReg._choose)
    tries: int = 1
    spread_warning: float = 5.0
    # at most this many voxels in a step's coordinate sample (None: sample_rate alone): a
    # linear stage has at most 12 parameters, and on a 3D volume a 10 % sample is hundreds of
    # thousands of voxels per step that cost time but add no accuracy (bench/bench_openms.py)
    max_sample: int | None = None

    def __post_init__(self):
        if self.name not in STAGES:
            raise ValueError(f"unknown stage '{self.name}'; choose from {', '.join(STAGES)}")
        if self.iterations < 1 or self.levels < 1 or self.ffd_levels < 1 or self.tries < 1:
            raise ValueError(f"stage '{self.name}': iterations, levels and tries must be >= 1")
        if self.lr <= 0 or self.ffd_spacing <= 0:
            raise ValueError(f"stage '{self.name}': lr and ffd_spacing must be positive")
        if self.max_sample is not None and self.max_sample < 1:
            raise ValueError(f"stage '{self.name}': max_sample must be >= 1 or None")
        if not 0 < self.lr_final <= 1:
            raise ValueError(
                f"stage '{self.name}': lr_final must be in (0, 1], got {self.lr_final}"
            )

    @classmethod
    def named(cls, name: str, **overrides) -> StageConfig:
        """A stage with the paper's defaults for ``name``, updated by non-None ``overrides``."""
        if name not in STAGES:
            raise ValueError(f"unknown stage '{name}'; choose from {', '.join(STAGES)}")
        values = {**STAGE_DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(name=name, **values)

    def finest_level(self) -> StageConfig:
        """This stage as its last level alone: one FFD level of its finest control spacing on
        the full-resolution images (what one step costs at the end of a coarse-to-fine stage)."""
        return replace(self, levels=1, ffd_levels=1,
                       ffd_spacing=self.ffd_spacing / 2 ** (self.ffd_levels - 1))


@dataclass
class XCoRegConfig:
    """Algorithm 1 settings; defaults follow the paper's BrainWeb experiment (Sec. 4.1)."""

    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    method: str = "xcoreg"
    num_classes: int = 4  # K
    bins: int = 64  # L
    sample_rate: float = 0.1
    # ... but at least this many voxels per step (all of a smaller level): on a 48^2 pyramid
    # level or a 32^2 image a 10 % sample is 100-230 voxels, too few for the class-conditional
    # histograms of Eq. (21) (L x K cells per image)
    min_sample: int = 2048
    bending_weight: float = 0.001  # lambda
    reference: int | None = None  # None: unbiased (Eq. 37); j: group-to-reference
    # Convergence test: stop when the mean loss of the last `patience` steps differs from the
    # `patience` before by less than `tolerance` per step. Off (0) by default: with a fresh
    # coordinate sample each step the loss is noisy and the test stopped runs that still improved.
    tolerance: float = 0.0
    patience: int = 20
    seed: int = 0
    device: str = "cpu"
    # On CUDA, deterministic kernels (engine.deterministic_kernels): a seed reproduces a run.
    deterministic: bool = True
    progress: bool = True
    # Zero-filled regions connected to an image's border (beyond the acquired field of view)
    # count as outside the image (Omega_j). Off for skull-stripped images such as the brain
    # phantom, whose zero background is part of the image as in the paper's BrainWeb set-up.
    mask_zero_fill: bool = True
    # Robustness (none of this is in Algorithm 1; see XCoReg for the evidence):
    # EM steps on the initial alignment before the first registration step, from `inits` random
    # Gamma^[0] (Eq. 22); the one with the highest log-likelihood (Eq. 23) is kept.
    em_warmup: int = 10
    inits: int = 3
    # A stage is rejected when the overlap region falls below `min_overlap` of its size at the
    # stage start, or when X (Eq. 8, Gamma re-estimated on the whole overlap) ends lower than it
    # started; it is then restarted from its start with the step size halved, at most
    # `restarts` times, and left at its start (no change) if every try is rejected.
    min_overlap: float = 0.7
    restarts: int = 1
    # An FFD stage after a linear stage that no try got past the safeguards is skipped (and the
    # group flagged): on MyoPS groups whose rigid stage was rejected, the FFD then moved the
    # images by 4-6 mm, doing the rigid's work, and ended below the start in 3 of 6 groups
    # (results/myops_bench/README.md)
    skip_ffd_after_rejected_linear: bool = True
    # method "cg": width of the Gaussian kernel of the congealing entropy, in intensities
    # normalised to [0, 1] (the histogram range); 0.05 as the paper's MoCo runs
    congealing_sigma: float = 0.05

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.congealing_sigma <= 0:
            raise ValueError(f"congealing_sigma must be positive, got {self.congealing_sigma}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes (K) must be >= 2, got {self.num_classes}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.min_sample < 0:
            raise ValueError(f"min_sample must be >= 0, got {self.min_sample}")
        if not 0 <= self.min_overlap < 1:
            raise ValueError(f"min_overlap must be in [0, 1), got {self.min_overlap}")
        if self.restarts < 0 or self.inits < 1 or self.em_warmup < 0:
            raise ValueError("restarts and em_warmup must be >= 0 and inits >= 1")
        if self.bins < 8:
            raise ValueError(f"bins (L) must be >= 8, got {self.bins}")
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        if not self.stages:
            raise ValueError("at least one stage is required")


def preset_dir() -> Path:
    """Folder of the named presets, shipped with the package (``dcc/coreg/presets``)."""
    return Path(__file__).resolve().parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_preset(name: str, **overrides) -> XCoRegConfig:
    """Build an :class:`XCoRegConfig` from the preset ``<name>.yaml`` shipped with dcc, or from
    a YAML file of the same keys (``name`` ending in ``.yaml``/``.yml``, like an elastix
    parameter file), plus keyword overrides."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{name}: settings file not found")
    else:
        path = preset_dir() / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown preset '{name}'; available: {', '.join(available_presets()) or 'none'}"
                " (or a path to a .yaml file of settings)"
            )
    try:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:  # a YAML syntax error: name the file, not the parser's frame
        raise ValueError(f"{path}: cannot read the settings: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    unknown = set(values) - {f.name for f in fields(XCoRegConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return XCoRegConfig(**values)


# Coarsest pyramid level of the automatic settings: at least this many voxels along the two
# longest axes (48 for slices; a 32 x 32 x n 3D level holds as many voxels as a 180^2 slice,
# and keeps the paper's 4 levels on a 320 x 320 brain volume)
MIN_LEVEL_SIZE = {2: 48, 3: 32}


def pyramid_levels(grid: Grid, min_size: int | None = None, most: int = 4) -> int:
    """Resolution levels whose coarsest level keeps at least ``min_size`` voxels (default
    :data:`MIN_LEVEL_SIZE` of the dimension) along the two longest axes (thin 3D slabs of a few
    thick slices do not limit it)."""
    min_size = min_size or MIN_LEVEL_SIZE[grid.ndim]
    sizes = sorted(grid.size)[-2:]
    levels = 1
    while levels < most and min(sizes) // 2**levels >= min_size:
        levels += 1
    return levels


def auto_config(grid: Grid, **overrides) -> XCoRegConfig:
    """Settings picked from the data (dimension and size of ``grid``) when no preset is named.

    * 2D (e.g. a multi-sequence cardiac slice): the ``cardiac2d`` preset, tuned on real MyoPS
      groups: rigid over a pyramid, then one 50 mm FFD level over two, K = 8, L = 32. The rigid
      pyramid gets as many levels as keep the coarsest one at least 48 voxels wide (3 for 192
      or 224 voxels, 4 for a 511-voxel slice); the FFD is skipped for images narrower than two
      control spacings.
    * 3D: the ``rire3d`` preset (translation, then rigid with an optimisable centre; K = 8), as
      the paper's RIRE experiment (Sec. 4.2), with the pyramids shortened for small volumes.

    ``overrides`` (non-None values) replace top-level settings, as for :func:`load_preset`.
    """
    config = load_preset("cardiac2d" if grid.ndim == 2 else "rire3d", **overrides)
    levels = pyramid_levels(grid)
    for stage in config.stages:  # a 2D linear stage gets the whole pyramid; others are capped
        if stage.levels > 1:
            whole = grid.ndim == 2 and stage.name != "ffd"
            stage.levels = levels if whole else min(stage.levels, levels)
    if grid.ndim == 2 and min(grid.extent) < 2 * max(
        (s.ffd_spacing for s in config.stages if s.name == "ffd"), default=0
    ):
        config.stages = [s for s in config.stages if s.name != "ffd"] or config.stages
    return config
