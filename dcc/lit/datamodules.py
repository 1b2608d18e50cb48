"""LightningDataModules for deep combined computing: the embedded cardiac phantom and MyoPS 2020.

Both yield the dict items of :mod:`dcc.data.datasets` (``images``, ``labels``, ``rho``,
``domains``, ``spacing``, ``case``, ``aligned_labels``), collated with a leading batch axis
(``case`` becomes a list). Constructor arguments are plain scalars / lists for Hydra
(``conf/data/*.yaml``, ``_target_: dcc.lit.datamodules.<Name>``):

``CardiacPhantomDataModule(image_size=96, ndim=2, sequences=[C0, LGE, T2], spacing=None,
num_train=256, num_val=20, num_test=40, batch_size=4, num_workers=0, seed=0, with_atlas=False,
atlas_size=32, tau=1.0, ffd_spacings=[25, 35, 45, 60], ffd_magnitude=0.16, num_ffds=5,
noise=0.04, bias=0.3, fresh_phantoms=False, augmentation=None)``

* ``spacing``: in-plane voxel size in mm (a number or ``[x, y]``); ``None``: a 150 mm field of
  view (``150 / image_size``). In 3D the slices are 10 mm apart.
* ``num_train``: training phantoms (seeds ``(seed, 0, index)``, drawn once at ``setup``), each
  under a fresh FFD combination every epoch; ``fresh_phantoms=True`` draws new phantoms at every
  access as well (unlimited anatomy, ~4x slower loading). ``num_val`` / ``num_test``: fixed
  groups (seeds ``(seed, split, index)``, the FFD levels in turn).
* ``with_atlas``: add the ``dcc_at`` atlas (majority vote of ``atlas_size`` phantom C0 labels)
  as the last member of every group, domain ``len(sequences)``.
* ``tau``: slope of Eq. (38) per mm; ``ffd_*``: the misalignment
  (:class:`dcc.data.misalignment.RandomFFDMisalignment`: mesh spacings in mm, control-point std as a
  fraction of the spacing, FFDs per spacing and sequence); ``noise`` / ``bias``: the phantom's
  Rician noise and bias-field range.
* ``augmentation``: training-only :class:`dcc.data.augmentation.GroupAugmentation` arguments
  (``{rotation: deg, scaling: fraction, gamma: log-range, fresh_ffds: bool}``; ``None``: the
  paper's training set, the FFD bank alone). Validation and test groups are never augmented.

``MyoPSDataModule(root=None, split_file=None, image_size=128, spacing=1.25, margin=15.0,
sequences=[C0, LGE, T2], batch_size=4, num_workers=0, seed=0, with_atlas=False, tau=1.0,
ffd_spacings=[25, 35, 45, 60], ffd_magnitude=0.19, num_ffds=5, cache_dir=None,
val_groups_per_slice=None, augmentation=None)``

* ``root``: the folder holding ``myops2020/`` (``None``: ``$DCC_DATA_ROOT`` or
  ``../shared/data``, :func:`dcc.data.cardiac.data_root`); ``setup`` raises a clear
  :class:`dcc.data.io.InputError` when the data are absent.
* ``split_file``: JSON ``{"train": [...], "val": [...], "test": [...]}`` of case names
  (``None``: ``data/splits/myops.json``, 21/5/9 patients).
* ``image_size`` x ``image_size`` voxels of ``spacing`` mm around the heart (label bounding-box
  centre; ``margin`` mm is the wanted room around the box, a warning when it does not fit).
* Training: one group per slice and epoch, fresh FFD combinations; validation / test:
  ``4 x num_ffds`` fixed groups per slice (the paper's slices x 5 x 4).

``ffd_magnitude`` defaults are calibrated on the unregistered pairwise Dice (myocardium, LV, RV)
against the paper's "None" row of Table 5 (72.2 +- 10.1 on MS-CMR): the phantom at 0.16 gives
0.73 +- 0.11 (200 test groups, 96 px), MyoPS at 0.19 gives 0.73 +- 0.11 (380 validation and 640
test groups of data/splits/myops.json; 0.16 would give 0.76).
* ``val_groups_per_slice``: validate on this many of the slice's fixed groups (spread over
  the FFD mesh spacings; ``None``: all ``4 x num_ffds``). Validation picks the best checkpoint
  and draws learning curves; fewer groups make it cheaper. The test split always keeps all.
* ``with_atlas``: the atlas of the training C0 labels (majority vote after aligning centres)
  joins every group as the last member, domain 3. ``cache_dir``: keep the decoded,
  preprocessed slices on disk between runs (they are always kept in memory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, Subset

from dcc.data.augmentation import GroupAugmentation
from dcc.data.cardiac import MYOPS_SEQUENCES, data_root
from dcc.data.cardiac_phantom import CLASS_NAMES, SEQUENCES
from dcc.data.datasets import (
    DEFAULT_SPLIT_FILE,
    Atlas,
    CardiacPhantomDataset,
    MyoPSSliceDataset,
    phantom_atlas,
    read_split,
)
from dcc.data.io import InputError
from dcc.data.misalignment import DEFAULT_SPACINGS, RandomFFDMisalignment

__all__ = ["CardiacPhantomDataModule", "MyoPSDataModule"]

PHANTOM_FOV = 150.0  # mm, the phantom's default field of view


def _in_plane(spacing: float | Sequence[float] | None, name: str) -> float | None:
    """One in-plane spacing from a number or an ``[x, y(, z)]`` list (x and y must agree)."""
    if spacing is None or isinstance(spacing, int | float):
        return None if spacing is None else float(spacing)
    values = [float(s) for s in spacing]
    if len(values) not in (2, 3) or values[0] != values[1] or values[0] <= 0:
        raise ValueError(f"{name}: spacing must be a positive number or [s, s], got {spacing}")
    return values[0]


def _transform(config: Any, owner: str) -> Any:
    """One entry of ``data.transforms``: a TorchIO transform from its ``_target_`` config."""
    import hydra

    if not (isinstance(config, Mapping) and "_target_" in config):
        raise ValueError(f"{owner}: each of transforms needs a _target_ (e.g. "
                         f"torchio.RandomNoise), got {config!r}")
    try:
        return hydra.utils.instantiate(dict(config))
    except Exception as error:  # an unknown class or a bad argument: name the entry
        reason = str(error.__cause__ or error).strip().splitlines()[0]
        raise ValueError(f"{owner}: transforms entry {dict(config)}: {reason}") from None


class _GroupDataModule(pl.LightningDataModule):
    """Data loaders shared by the phantom and MyoPS modules."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        augmentation: dict | None,
        transforms: Sequence[dict] | None = None,
    ):
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"{type(self).__name__}: need batch_size >= 1 and num_workers >= 0, got "
                f"{batch_size}, {num_workers}"
            )
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        made = [_transform(t, type(self).__name__) for t in transforms or []]
        if augmentation or made:
            self.augmentation = GroupAugmentation(**(augmentation or {}), transforms=made)
        else:
            self.augmentation = None
        self.datasets: dict[str, Dataset] = {}
        self.class_names = list(CLASS_NAMES)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup("fit" if split in ("train", "val") else "test")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=split == "train",
            num_workers=self.num_workers,
            persistent_workers=False,  # fresh worker seeds each epoch: new training groups
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class CardiacPhantomDataModule(_GroupDataModule):
    """The embedded multi-sequence cardiac phantom (see the module docstring for the args)."""

    def __init__(
        self,
        image_size: int = 96,
        ndim: int = 2,
        sequences: Sequence[str] = SEQUENCES,
        spacing: float | Sequence[float] | None = None,
        num_train: int = 256,
        num_val: int = 20,
        num_test: int = 40,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        with_atlas: bool = False,
        atlas_size: int = 32,
        tau: float = 1.0,
        ffd_spacings: Sequence[float] = DEFAULT_SPACINGS,
        ffd_magnitude: float = 0.16,
        num_ffds: int = 5,
        noise: float = 0.04,
        bias: float = 0.3,
        fresh_phantoms: bool = False,
        augmentation: dict | None = None,
        transforms: Sequence[dict] | None = None,
    ):
        super().__init__(batch_size, num_workers, augmentation, transforms)
        self.save_hyperparameters()
        in_plane = _in_plane(spacing, type(self).__name__)
        self.fov = PHANTOM_FOV if in_plane is None else in_plane * image_size
        self.sequences = list(sequences)
        self.image_size, self.ndim, self.seed, self.tau = image_size, ndim, seed, tau
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.with_atlas, self.atlas_size = bool(with_atlas), atlas_size
        self.misalignment = RandomFFDMisalignment(ffd_spacings, ffd_magnitude, num_ffds)
        self.phantom_kwargs = {"fov": self.fov, "noise": noise, "bias": bias}
        s = self.fov / image_size
        self.spacing = [s, s] if ndim == 2 else [s, s, 10.0]
        self.fresh_phantoms = bool(fresh_phantoms)
        self.atlas: Atlas | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.with_atlas and self.atlas is None:
            self.atlas = phantom_atlas(
                self.atlas_size,
                self.image_size,
                self.ndim,
                self.seed,
                self.tau,
                self.phantom_kwargs,
            )
        for split, length in self.sizes.items():
            if split not in self.datasets:
                self.datasets[split] = CardiacPhantomDataset(
                    length,
                    split,
                    self.image_size,
                    self.ndim,
                    self.sequences,
                    self.seed,
                    self.misalignment,
                    self.tau,
                    self.atlas,
                    self.phantom_kwargs,
                    self.fresh_phantoms,
                    self.augmentation,
                )


class MyoPSDataModule(_GroupDataModule):
    """MyoPS 2020 short-axis slices, misaligned (see the module docstring for the args)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split_file: str | os.PathLike | None = None,
        image_size: int = 128,
        spacing: float | Sequence[float] = 1.25,
        margin: float = 15.0,
        sequences: Sequence[str] = MYOPS_SEQUENCES,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        with_atlas: bool = False,
        tau: float = 1.0,
        ffd_spacings: Sequence[float] = DEFAULT_SPACINGS,
        ffd_magnitude: float = 0.19,
        num_ffds: int = 5,
        cache_dir: str | os.PathLike | None = None,
        val_groups_per_slice: int | None = None,
        augmentation: dict | None = None,
        transforms: Sequence[dict] | None = None,
    ):
        super().__init__(batch_size, num_workers, augmentation, transforms)
        self.save_hyperparameters()
        per_slice = len(ffd_spacings) * num_ffds
        if val_groups_per_slice is not None and not 1 <= val_groups_per_slice <= per_slice:
            raise ValueError(
                f"MyoPSDataModule: val_groups_per_slice must be in 1..{per_slice} (the fixed "
                f"groups per slice), got {val_groups_per_slice}"
            )
        self.val_groups_per_slice = val_groups_per_slice
        if list(sequences) != list(MYOPS_SEQUENCES):
            raise ValueError(
                f"MyoPSDataModule: sequences must be {list(MYOPS_SEQUENCES)} (the MyoPS files), "
                f"got {list(sequences)}"
            )
        self.sequences = list(MYOPS_SEQUENCES)
        self.root = root
        self.split_file = Path(split_file) if split_file is not None else DEFAULT_SPLIT_FILE
        self.pixel_spacing = _in_plane(spacing, type(self).__name__)
        self.spacing = [self.pixel_spacing] * 2
        self.image_size, self.margin, self.seed, self.tau = image_size, margin, seed, tau
        self.with_atlas, self.cache_dir = bool(with_atlas), cache_dir
        self.misalignment = RandomFFDMisalignment(ffd_spacings, ffd_magnitude, num_ffds)
        self.atlas: Atlas | None = None

    def data_folder(self) -> Path:
        """The folder holding ``myops2020/``; a clear error when it is absent."""
        root = Path(self.root).expanduser() if self.root is not None else data_root()
        if root is None or not (root / "myops2020").is_dir():
            raise InputError(
                f"MyoPS 2020 data not found (looked for {root if root else '$DCC_DATA_ROOT'}"
                "/myops2020): set DCC_DATA_ROOT (or data.root) to the folder that holds "
                "myops2020/Case*/Case*_{C0,LGE,T2,gd}.nii.gz (see data/README.md)"
            )
        return root

    def setup(self, stage: str | None = None) -> None:
        """Read the cases of the splits ``stage`` needs (``fit``: train and val, ``test``: test;
        ``None``: all), and the training cases also for the ``dcc_at`` atlas."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "", ("train", "val", "test"))
        if self.with_atlas:
            wanted = ("train", *wanted)
        wanted = [split for split in dict.fromkeys(wanted) if split not in self.datasets]
        if not wanted:
            return
        root, splits = self.data_folder(), read_split(self.split_file)
        kwargs = dict(
            root=root,
            image_size=self.image_size,
            pixel_spacing=self.pixel_spacing,
            margin=self.margin,
            seed=self.seed,
            misalignment=self.misalignment,
            tau=self.tau,
            cache_dir=self.cache_dir,
        )
        if "train" in wanted:
            train = MyoPSSliceDataset(
                splits["train"], "train", augmentation=self.augmentation, **kwargs
            )
            if self.with_atlas:
                self.atlas = train.atlas_from_c0()
                train.atlas = self.atlas
            self.datasets["train"] = train
        for split in ("val", "test"):
            if split in wanted:
                self.datasets[split] = MyoPSSliceDataset(
                    splits[split], split, atlas=self.atlas, **kwargs
                )
        if "val" in wanted and self.val_groups_per_slice is not None:
            val = self.datasets["val"]
            per_slice = len(val.combinations)
            picks = [round(i * per_slice / self.val_groups_per_slice)
                     for i in range(self.val_groups_per_slice)]
            self.datasets["val"] = Subset(
                val, [s * per_slice + p for s in range(len(val) // per_slice) for p in picks]
            )
