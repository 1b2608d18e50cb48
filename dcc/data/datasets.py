"""Datasets of misaligned multi-sequence groups for deep combined computing (Sec. 4.4.1).

Every item is the dict of PLAN.md ("dcc data items"), for a group of ``N`` members:

* ``images`` float32 ``(N, *S)``: the misaligned images (each z-scored before misalignment);
* ``labels`` int64 ``(N, *S)``: their labels misaligned alike (0 background, 1 myocardium,
  2 LV, 3 RV);
* ``rho`` float32 ``(N, K, *S)``: Eq. (38) of the labels (signed distances in mm, slope
  ``tau``), computed once on the aligned labels and misaligned with them;
* ``domains`` int64 ``(N,)``: sequence index (C0 0, LGE 1, T2 2; the atlas ``len(sequences)``);
* ``spacing`` float32 ``(ndim,)``: voxel size in mm, ``(x, y[, z])`` order;
* ``case`` str;
* ``aligned_labels`` int64 ``(N, *S)``: the labels before misalignment (for evaluation: the
  sequences share one label map; the atlas member keeps its own).

With an :class:`Atlas`, the atlas (image, labels) joins as the last member, unwarped, with
domain ``len(sequences)`` (the ``dcc_at`` strategy).

Misalignment (:class:`dcc.data.misalignment.RandomFFDMisalignment`): training items draw a fresh
combination of the case's FFD bank at every access (random state from torch's global generator,
which PyTorch's ``DataLoader`` seeds per worker and epoch, so runs under
``lightning.seed_everything`` are reproducible, and every epoch sees new groups); validation and
test items are fixed by ``seed`` and the item index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dcc.data.augmentation import GroupAugmentation
from dcc.data.cardiac import (
    LV,
    MIN_VOXELS,
    MYOCARDIUM,
    MYOPS_SEQUENCES,
    RV,
    data_root,
    load_myops_case,
    myops_cases,
)
from dcc.data.cardiac_phantom import CLASS_NAMES, SEQUENCES, cardiac_phantom
from dcc.data.io import InputError, slice_grid
from dcc.data.misalignment import RandomFFDMisalignment
from dcc.spatial.functional import sample, zscore
from dcc.spatial.grid import Grid

log = logging.getLogger(__name__)

NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "atlas": 3}
DEFAULT_SPLIT_FILE = Path(__file__).resolve().parents[2] / "data" / "splits" / "myops.json"


@dataclass
class Atlas:
    """A labelled template member (``dcc_at``): ``image`` ``(*S)`` (z-scored), ``labels``
    ``(*S)`` int64 and their ``rho`` ``(K, *S)``."""

    image: torch.Tensor
    labels: torch.Tensor
    rho: torch.Tensor


def distance_rho(labels: torch.Tensor, tau: float, spacing: Sequence[float]) -> torch.Tensor:
    """rho of Eq. (38) for label maps ``(N, *S)`` -> ``(N, K, *S)`` float32."""
    from dcc.losses.functional import distance_probabilities  # MONAI import: only when used

    return distance_probabilities(labels, NUM_CLASSES, tau, tuple(spacing)).float()


def centre_shift(labels: torch.Tensor) -> tuple[int, ...]:
    """Integer shift (tensor axes) moving the foreground centroid of ``labels`` to the centre."""
    fg = torch.nonzero(labels > 0).double()
    if not len(fg):
        return (0,) * labels.dim()
    centre = torch.tensor([(n - 1) / 2 for n in labels.shape], dtype=torch.float64)
    return tuple(int(v) for v in torch.round(centre - fg.mean(0)).tolist())


def shift(x: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``x`` translated by whole voxels ``offset`` (tensor axes), zero-filled."""
    out = torch.zeros_like(x)
    src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, x.shape, strict=True))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, x.shape, strict=True))
    if all(s.stop > s.start for s in src):
        out[dst] = x[src]
    return out


def majority_vote_atlas(
    labels: torch.Tensor, images: torch.Tensor, spacing: Sequence[float], tau: float
) -> Atlas:
    """The ``dcc_at`` atlas (Sec. 4.4.1): majority vote of the label maps ``(M, *S)`` after
    aligning their foreground centroids on the grid centre; its image is the mean of the
    z-scored ``images`` ``(M, *S)`` shifted alike."""
    if labels.shape != images.shape or labels.shape[0] < 1:
        raise ValueError(
            f"majority_vote_atlas: need labels and images of one shape (M, *S), M >= 1, got "
            f"{tuple(labels.shape)} and {tuple(images.shape)}"
        )
    votes = torch.zeros(NUM_CLASSES, *labels.shape[1:])
    mean = torch.zeros(labels.shape[1:])
    for lab, image in zip(labels, zscore(images, images.dim() - 1), strict=True):
        offset = centre_shift(lab)
        votes += torch.nn.functional.one_hot(shift(lab, offset), NUM_CLASSES).movedim(-1, 0)
        mean += shift(image, offset)
    atlas = votes.argmax(0)
    return Atlas(mean / labels.shape[0], atlas, distance_rho(atlas[None], tau, spacing)[0])


def misaligned_item(
    images: torch.Tensor,
    labels: torch.Tensor,
    rho: torch.Tensor,
    grid: Grid,
    misalignment: RandomFFDMisalignment,
    combination: tuple[int, tuple[int, ...]],
    case_seed: Sequence[int],
    case: str,
    atlas: Atlas | None = None,
    augmentation: GroupAugmentation | None = None,
    rng: np.random.Generator | None = None,
) -> dict:
    """One data item from aligned ``images`` ``(N, *S)`` (z-scored here), their ``labels``
    ``(N, *S)`` and ``rho`` ``(N, K, *S)`` (Eq. 38 of ``labels``): all three misaligned by the
    FFD ``combination`` (level, indices) of the case's bank, after the training
    ``augmentation`` (random state ``rng``) when one is given.

    rho is warped with the labels rather than recomputed from the warped labels: the same up to
    the FFD's local stretch of distances near the contours (a few per cent for these smooth
    FFDs), and it can be computed once per case (2K distance transforms for a label map shared
    by the sequences instead of 2K per member and access)."""
    if augmentation is not None:
        images, labels, rho = augmentation(images, labels, rho, grid, rng)
    level, indices = combination
    moved, moved_labels, moved_rho = misalignment(
        zscore(images, images.dim() - 1), labels, grid, level, indices, case_seed, rho
    )
    n = images.shape[0]
    item = {
        "images": moved,
        "labels": moved_labels,
        "rho": moved_rho,
        "domains": torch.arange(n),
        "spacing": torch.tensor(grid.spacing, dtype=torch.float32),
        "case": case,
        "aligned_labels": labels.clone(memory_format=torch.contiguous_format),
    }
    if atlas is not None:
        for key, value in (
            ("images", atlas.image),
            ("labels", atlas.labels),
            ("rho", atlas.rho),
            ("domains", torch.tensor(n)),
            ("aligned_labels", atlas.labels),
        ):
            item[key] = torch.cat([item[key], value[None].to(item[key].dtype)])
    return item


def _training_rng(seed: int, index: int) -> np.random.Generator:
    """Fresh random state for a training item (torch's global generator: seeded per worker and
    epoch by the ``DataLoader``, and by ``seed_everything``)."""
    draw = int(torch.randint(0, 2**31 - 1, ()).item())
    return np.random.default_rng([seed, _SPLIT_CODE["train"], index, draw])


def _training_combination(dataset, n: int, rng: np.random.Generator) -> tuple:
    """A training group's FFD combination (fresh FFDs when the augmentation asks for them)."""
    fresh = dataset.augmentation is not None and dataset.augmentation.fresh_ffds
    return dataset.misalignment.random_combination(n, rng, fresh)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------------- phantom
class CardiacPhantomDataset(Dataset):
    """Groups of the procedural cardiac phantom (:func:`cardiac_phantom`), misaligned.

    Item ``i`` is the phantom of seed ``(seed, split, i)`` (drawn once, with its rho, at
    construction) misaligned by its FFD bank: for ``split="train"`` under a fresh random
    combination at every access (new groups every epoch, as the paper's training set of slices
    x 5^3 x 4 combinations); for ``"val"``/``"test"`` under the fixed combination
    ``i mod (levels * num_ffds)`` (the levels in turn), identical across runs.
    ``fresh_phantoms=True`` (training only) draws a new phantom at every access too: unlimited
    anatomy, at the cost of generating it (and its distance maps) on the fly.
    ``phantom_kwargs`` go to :func:`cardiac_phantom`.
    """

    def __init__(
        self,
        length: int,
        split: str = "train",
        image_size: int = 96,
        ndim: int = 2,
        sequences: Sequence[str] = SEQUENCES,
        seed: int = 0,
        misalignment: RandomFFDMisalignment | None = None,
        tau: float = 1.0,
        atlas: Atlas | None = None,
        phantom_kwargs: dict | None = None,
        fresh_phantoms: bool = False,
        augmentation: GroupAugmentation | None = None,
    ):
        _check_split(split)
        if length < 1:
            raise ValueError(f"CardiacPhantomDataset: length must be >= 1, got {length}")
        self.length, self.split, self.seed, self.tau, self.atlas = length, split, seed, tau, atlas
        self.sequences = tuple(sequences)
        self.misalignment = misalignment or RandomFFDMisalignment()
        self.phantom_kwargs = dict(
            image_size=image_size, ndim=ndim, sequences=self.sequences, **(phantom_kwargs or {})
        )
        self.fresh = bool(fresh_phantoms) and split == "train"
        self.augmentation = augmentation if split == "train" else None
        self.cases = [] if self.fresh else [self._case(self._seed(i)) for i in range(length)]

    def __len__(self) -> int:
        return self.length

    def _seed(self, index: int) -> tuple[int, ...]:
        return (self.seed, _SPLIT_CODE[self.split], index)

    def _case(self, case_seed: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``(N, *S)``, labels ``(*S)`` and rho ``(K, *S)`` of one phantom."""
        phantom = cardiac_phantom(seed=list(case_seed), **self.phantom_kwargs)
        self.grid = Grid.from_shape(phantom.labels.shape, phantom.spacing)
        rho = distance_rho(phantom.labels[None], self.tau, phantom.spacing)[0]
        return phantom.images, phantom.labels, rho

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} groups")
        n = len(self.sequences)
        case_seed, rng = self._seed(index), None
        if self.split == "train":
            rng = _training_rng(self.seed, index)
            combination = _training_combination(self, n, rng)
            if self.fresh:
                case_seed = tuple(int(v) for v in rng.integers(0, 2**31 - 1, size=2))
        else:
            combos = self.misalignment.fixed_combinations(n)
            combination = combos[index % len(combos)]
        images, labels, rho = self._case(case_seed) if self.fresh else self.cases[index]
        return misaligned_item(
            images,
            labels.expand(n, *labels.shape),
            rho.expand(n, *rho.shape),
            self.grid,
            self.misalignment,
            combination,
            case_seed,
            f"phantom-{self.split}-{index}",
            self.atlas,
            self.augmentation,
            rng,
        )


def phantom_atlas(
    num: int = 32,
    image_size: int = 96,
    ndim: int = 2,
    seed: int = 0,
    tau: float = 1.0,
    phantom_kwargs: dict | None = None,
) -> Atlas:
    """The ``dcc_at`` atlas of the phantom: majority vote of ``num`` phantoms' C0 labels
    (seeds disjoint from the training, validation and test groups)."""
    phantoms = [
        cardiac_phantom(
            image_size,
            ndim,
            ("C0",),
            seed=[seed, _SPLIT_CODE["atlas"], i],
            **(phantom_kwargs or {}),
        )
        for i in range(num)
    ]
    labels = torch.stack([p.labels for p in phantoms])
    images = torch.stack([p.images[0] for p in phantoms])
    return majority_vote_atlas(labels, images, phantoms[0].spacing, tau)


# ---------------------------------------------------------------------- MyoPS 2020
@dataclass
class MyoPSSlice:
    """A preprocessed short-axis slice: ``images`` ``(3, S, S)`` z-scored (C0, LGE, T2),
    ``labels`` ``(S, S)`` int64, ``case`` name and ``slice_index`` in its volume."""

    images: torch.Tensor
    labels: torch.Tensor
    case: str
    slice_index: int


def read_split(split_file: str | os.PathLike) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` case names from a JSON split file."""
    path = Path(split_file)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    missing = [s for s in SPLITS if not isinstance(splits.get(s), list)]
    if missing:
        raise InputError(f"{path}: split file needs case lists {missing}")
    seen: dict[str, str] = {}
    for split in SPLITS:
        for case in splits[split]:
            if case in seen:
                raise InputError(f"{path}: case {case} is in both {seen[case]} and {split}")
            seen[case] = split
    return {s: [str(c) for c in splits[s]] for s in SPLITS}


def myops_roi_slices(
    case_dir: str | os.PathLike,
    image_size: int = 128,
    pixel_spacing: float = 1.25,
    margin: float = 15.0,
    label_sequence: str = "C0",
) -> list[MyoPSSlice]:
    """Every short-axis slice of a MyoPS case with myocardium, LV and RV present, cropped and
    resampled to ``image_size`` x ``image_size`` voxels of ``pixel_spacing`` mm around the
    centre of the bounding box of the labels of ``label_sequence`` (MyoPS has one label map for
    all sequences; the box comes from one sequence's labels, as when only it is labelled).
    Images linear, labels nearest neighbour; each image z-scored over the ROI. A warning is
    logged when the box plus ``margin`` mm on each side does not fit the ROI."""
    if label_sequence not in MYOPS_SEQUENCES:
        raise ValueError(f"label_sequence must be one of {MYOPS_SEQUENCES}, got {label_sequence!r}")
    volumes, merged, grid3, _ = load_myops_case(case_dir)
    out = []
    for z in range(merged.shape[0]):
        label = merged[z]
        if any(int((label == v).sum()) < MIN_VOXELS for v in (MYOCARDIUM, LV, RV)):
            continue
        grid = slice_grid(grid3, 2, z)
        fg = torch.nonzero(label > 0).double()
        lo, hi = fg.min(0).values, fg.max(0).values
        box = ((hi - lo + 1) * torch.tensor(grid.spacing[::-1])).max().item()
        if box + 2 * margin > image_size * pixel_spacing:
            log.warning(
                "%s slice %d: heart box %.0f mm + 2 x %.0f mm margin exceeds the ROI of %.0f mm",
                Path(case_dir).name,
                z,
                box,
                margin,
                image_size * pixel_spacing,
            )
        centre_index = np.array([*((lo + hi) / 2).tolist()[::-1], 1.0])  # (x, y, 1)
        centre = (grid.index_to_world_matrix() @ centre_index)[:2]
        half = pixel_spacing * (image_size - 1) / 2
        roi = Grid(
            (image_size, image_size),
            (pixel_spacing, pixel_spacing),
            tuple(centre - grid.direction_matrix @ np.array([half, half])),
            grid.direction,
        )
        coords = grid.world_to_normalized(roi.points(dtype=torch.float64)).float()[None]
        images = torch.from_numpy(volumes[:, z].astype(np.float32))[:, None]
        images = sample(images, coords.expand(3, -1, -1, -1))[:, 0]
        labels = sample(label[None, None].float(), coords, mode="nearest")[0, 0].long()
        out.append(MyoPSSlice(zscore(images, images.dim() - 1), labels, Path(case_dir).name, z))
    return out


class MyoPSSliceDataset(Dataset):
    """MyoPS 2020 short-axis slices (C0, LGE, T2) of the cases ``cases``, misaligned (Sec. 4.4.1).

    All slices are read and preprocessed once at construction (:func:`myops_roi_slices`) and kept
    in memory (about 0.2 MB per slice); ``cache_dir`` also keeps them on disk between runs.
    ``split="train"``: one item per slice, a fresh FFD combination at every access;
    ``"val"``/``"test"``: ``levels x num_ffds`` fixed groups per slice (the paper's
    15 x 5 x 4). The FFD bank of a slice is fixed by ``(seed, case number, slice index)``.
    """

    def __init__(
        self,
        cases: Sequence[str],
        split: str = "train",
        root: str | os.PathLike | None = None,
        image_size: int = 128,
        pixel_spacing: float = 1.25,
        margin: float = 15.0,
        seed: int = 0,
        misalignment: RandomFFDMisalignment | None = None,
        tau: float = 1.0,
        atlas: Atlas | None = None,
        cache_dir: str | os.PathLike | None = None,
        augmentation: GroupAugmentation | None = None,
    ):
        _check_split(split)
        root = Path(root) if root is not None else data_root()
        available = {p.name: p for p in myops_cases(root)}
        unknown = [c for c in cases if c not in available]
        if unknown:
            raise InputError(f"{root}/myops2020: cases not found: {', '.join(unknown)}")
        self.split, self.seed, self.tau, self.atlas = split, seed, tau, atlas
        self.augmentation = augmentation if split == "train" else None
        self.sequences = MYOPS_SEQUENCES
        self.spacing = (float(pixel_spacing),) * 2
        self.grid = Grid.from_shape((image_size, image_size), self.spacing)
        self.misalignment = misalignment or RandomFFDMisalignment()
        self.slices: list[MyoPSSlice] = []
        for case in cases:
            self.slices += _cached_slices(
                available[case],
                cache_dir,
                image_size=image_size,
                pixel_spacing=pixel_spacing,
                margin=margin,
            )
        if not self.slices:
            raise InputError(f"{root}/myops2020: no slice with myocardium, LV and RV in {cases}")
        self.combinations = self.misalignment.fixed_combinations(len(self.sequences))
        labels = torch.stack([s.labels for s in self.slices])  # rho of Eq. 38, once per slice
        self.rho = list(distance_rho(labels, tau, self.spacing))

    def __len__(self) -> int:
        per_slice = 1 if self.split == "train" else len(self.combinations)
        return len(self.slices) * per_slice

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} groups")
        n, rng = len(self.sequences), None
        if self.split == "train":
            which, rng = index, _training_rng(self.seed, index)
            combination = _training_combination(self, n, rng)
        else:
            which, fixed = divmod(index, len(self.combinations))
            combination = self.combinations[fixed]
        piece, rho = self.slices[which], self.rho[which]
        case_seed = (
            self.seed,
            int("".join(filter(str.isdigit, piece.case)) or 0),
            piece.slice_index,
        )
        level, indices = combination
        return misaligned_item(
            piece.images,
            piece.labels.expand(n, *piece.labels.shape),
            rho.expand(n, *rho.shape),
            self.grid,
            self.misalignment,
            combination,
            case_seed,
            f"{piece.case}-z{piece.slice_index}-s{level}-k{'.'.join(map(str, indices))}",
            self.atlas,
            self.augmentation,
            rng,
        )

    def atlas_from_c0(self) -> Atlas:
        """The ``dcc_at`` atlas from these slices' C0 labels and images (use on training)."""
        labels = torch.stack([s.labels for s in self.slices])
        images = torch.stack([s.images[0] for s in self.slices])
        return majority_vote_atlas(labels, images, self.spacing, self.tau)


def _cached_slices(case_dir: Path, cache_dir: str | os.PathLike | None, **kwargs) -> list:
    """:func:`myops_roi_slices`, kept in ``cache_dir``: one ``.pt`` file per case, keyed by what
    it was made from (the case folder's absolute path, the name, size and modification time of
    each of its files) and the settings ``kwargs``, so that another folder with a case of the
    same name, an edited file or another setting is read afresh, never served from the cache."""
    if cache_dir is None:
        return myops_roi_slices(case_dir, **kwargs)
    folder = Path(case_dir).resolve()
    files = [(p.name, s.st_size, s.st_mtime_ns)
             for p in sorted(folder.iterdir()) if p.is_file() for s in [p.stat()]]
    source = json.dumps([str(folder), files, sorted(kwargs.items())], default=str)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"myops_{folder.name}_{key}.pt"
    if path.is_file():
        return [MyoPSSlice(**d) for d in torch.load(path)]
    slices = myops_roi_slices(case_dir, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save([vars(s) for s in slices], tmp)
    tmp.replace(path)
    return slices
