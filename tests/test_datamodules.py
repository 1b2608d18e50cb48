"""Datasets and LightningDataModules of misaligned multi-sequence groups (PLAN.md data items)."""

import json

import pytest
import torch

from dcc.data.cardiac import data_root, myops_cases
from dcc.data.datasets import (
    CardiacPhantomDataset,
    MyoPSSliceDataset,
    majority_vote_atlas,
    read_split,
    shift,
)
from dcc.data.io import InputError
from dcc.lit.datamodules import CardiacPhantomDataModule, MyoPSDataModule
from dcc.metrics import pairwise_dice

SIZE = 32


def _module(**kwargs):
    args = dict(image_size=SIZE, num_train=4, num_val=3, num_test=3, batch_size=2, seed=3)
    dm = CardiacPhantomDataModule(**{**args, **kwargs})
    dm.setup("fit")
    return dm


def _check_item(item, n, size, ndim=2):
    spatial = (size,) * ndim
    assert item["images"].shape == (n, *spatial) and item["images"].dtype == torch.float32
    assert item["labels"].shape == (n, *spatial) and item["labels"].dtype == torch.int64
    assert item["aligned_labels"].shape == (n, *spatial)
    assert item["aligned_labels"].dtype == torch.int64
    assert item["rho"].shape == (n, 4, *spatial) and item["rho"].dtype == torch.float32
    assert item["domains"].shape == (n,) and item["domains"].dtype == torch.int64
    assert item["spacing"].shape == (ndim,) and item["spacing"].dtype == torch.float32
    assert isinstance(item["case"], str)
    assert torch.isfinite(item["images"]).all()
    assert set(item["labels"].unique().tolist()) <= {0, 1, 2, 3}
    # rho (Eq. 38): a distribution over the K classes, largest on the voxel's own label
    assert torch.allclose(item["rho"].sum(1), torch.ones(n, *spatial), atol=1e-5)
    agree = (item["rho"].argmax(1) == item["labels"]).float().mean()
    assert agree > 0.97


def test_phantom_batches_match_plan():
    dm = _module()
    assert dm.sequences == ["C0", "LGE", "T2"] and dm.spacing == pytest.approx([150 / SIZE] * 2)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["images"].shape == (2, 3, SIZE, SIZE)
        assert batch["rho"].shape == (2, 3, 4, SIZE, SIZE)
        assert batch["domains"].tolist() == [[0, 1, 2]] * 2
        assert len(batch["case"]) == 2
    item = dm.datasets["val"][0]
    _check_item(item, 3, SIZE)
    assert torch.allclose(item["spacing"], torch.tensor([150 / SIZE] * 2))
    # the sequences share one aligned label map; the misalignment moves them apart
    assert (item["aligned_labels"] == item["aligned_labels"][0]).all()
    assert pairwise_dice(item["aligned_labels"], [1, 2, 3])["mean"] == 1.0
    assert pairwise_dice(item["labels"], [1, 2, 3])["mean"] < 0.97


def test_phantom_spacing_argument_and_3d():
    dm = _module(spacing=[2.0, 2.0])
    assert dm.spacing == [2.0, 2.0] and dm.fov == 2.0 * SIZE
    assert torch.equal(dm.datasets["val"][0]["spacing"], torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="spacing"):
        CardiacPhantomDataModule(spacing=[1.0, 2.0])
    ds = CardiacPhantomDataset(2, "val", image_size=24, ndim=3, phantom_kwargs={"depth": 4})
    item = ds[0]
    assert item["images"].shape == (3, 4, 24, 24) and item["rho"].shape == (3, 4, 4, 24, 24)
    assert item["spacing"].tolist() == pytest.approx([150 / 24, 150 / 24, 10.0])


def test_val_test_fixed_by_seed():
    a, b, c = _module(), _module(), _module(seed=4)
    for split in ("val", "test"):
        for i in range(3):
            x, y, z = (m.datasets[split][i] for m in (a, b, c))
            assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
            assert x["case"] == y["case"]
            assert not torch.equal(x["images"], z["images"])
    assert not torch.equal(a.datasets["val"][0]["labels"], a.datasets["test"][0]["labels"])


def test_train_groups_fresh_each_epoch_and_reproducible():
    dm = _module()
    loader = dm.train_dataloader()

    def epoch():
        return torch.cat([b["images"] for b in loader])

    torch.manual_seed(0)
    first, second = epoch(), epoch()
    assert first.shape == (4, 3, SIZE, SIZE)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(epoch(), first)
    ds = dm.datasets["train"]
    draws = [ds[0] for _ in range(4)]  # a fresh FFD combination at every access ...
    assert any(not torch.equal(d["labels"], draws[0]["labels"]) for d in draws[1:])
    for d in draws:  # ... of the same phantom
        assert torch.equal(d["aligned_labels"], draws[0]["aligned_labels"])
    fresh = _module(fresh_phantoms=True).datasets["train"]
    assert not torch.equal(fresh[0]["aligned_labels"], fresh[0]["aligned_labels"])


def test_atlas_member():
    dm = _module(with_atlas=True, atlas_size=8)
    for split in ("train", "val", "test"):
        item = dm.datasets[split][0]
        _check_item(item, 4, SIZE)
        assert item["domains"].tolist() == [0, 1, 2, 3]
        assert torch.equal(item["labels"][3], dm.atlas.labels)  # the atlas is not misaligned
        assert torch.equal(item["aligned_labels"][3], dm.atlas.labels)
        assert torch.equal(item["images"][3], dm.atlas.image)
    assert set(dm.atlas.labels.unique().tolist()) == {0, 1, 2, 3}
    assert _module().datasets["val"][0]["images"].shape[0] == 3  # no atlas unless asked


def test_majority_vote_atlas_aligns_centres():
    square = torch.zeros(16, 16, dtype=torch.long)
    square[4:8, 4:8] = 2
    square[3, 4:8] = 1
    labels = torch.stack([square, shift(square, (5, 6)), shift(square, (2, 1))])
    atlas = majority_vote_atlas(labels, labels.float() + torch.rand(3, 16, 16), (1.0, 1.0), 1.0)
    assert (atlas.labels == 2).sum() == 16 and (atlas.labels == 1).sum() == 4
    fg = torch.nonzero(atlas.labels > 0).float().mean(0)
    assert torch.allclose(fg, torch.tensor([7.5, 7.5]), atol=1.0)
    assert atlas.rho.shape == (4, 16, 16)
    with pytest.raises(ValueError, match="one shape"):
        majority_vote_atlas(labels, labels[:2].float(), (1.0, 1.0), 1.0)


def test_myops_errors_without_data(tmp_path):
    with pytest.raises(InputError, match="DCC_DATA_ROOT"):
        MyoPSDataModule(root=tmp_path).setup("fit")
    with pytest.raises(ValueError, match="sequences"):
        MyoPSDataModule(sequences=["C0", "T2"])
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["A", "B"], "val": ["B"], "test": []}))
    with pytest.raises(InputError, match="both"):
        read_split(bad)
    bad.write_text("{")
    with pytest.raises(InputError, match="JSON"):
        read_split(bad)
    with pytest.raises(InputError, match="not found"):
        read_split(tmp_path / "missing.json")


def test_committed_myops_split_is_patient_level():
    from dcc.data.datasets import DEFAULT_SPLIT_FILE

    splits = read_split(DEFAULT_SPLIT_FILE)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [21, 5, 9]
    assert len(set(sum(splits.values(), []))) == 35


@pytest.mark.data
@pytest.mark.skipif(data_root() is None, reason="real data absent (set DCC_DATA_ROOT)")
def test_myops_datamodule(tmp_path):
    cases = [c.name for c in myops_cases()[:3]]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": cases[:1], "val": cases[1:2], "test": cases[2:]}))
    dm = MyoPSDataModule(
        split_file=split, image_size=48, spacing=3.0, batch_size=2, with_atlas=True, num_ffds=2
    )
    dm.setup("fit")
    assert "test" not in dm.datasets  # read when a stage needs it
    dm.setup("test")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(val) == len(val.slices) * 4 * 2  # 4 FFD levels x num_ffds fixed groups per slice
    assert {s.case for s in train.slices} == {cases[0]}
    item = val[0]
    _check_item(item, 4, 48)
    assert item["domains"].tolist() == [0, 1, 2, 3]
    assert item["case"].startswith(cases[1])
    assert torch.equal(val[5]["images"], val[5]["images"])  # fixed groups
    for piece in train.slices:  # ROI around the heart, all three structures, z-scored
        assert set(piece.labels.unique().tolist()) == {0, 1, 2, 3}
        assert torch.allclose(piece.images.flatten(1).mean(1), torch.zeros(3), atol=1e-4)
        std = piece.images.flatten(1).std(1, correction=0)
        assert torch.allclose(std, torch.ones(3), atol=1e-4)
        fg = torch.nonzero(piece.labels > 0).float()
        centre = (fg.min(0).values + fg.max(0).values) / 2
        assert torch.allclose(centre, torch.tensor([23.5, 23.5]), atol=1.5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[1:] == (4, 48, 48)
    assert set(dm.atlas.labels.unique().tolist()) == {0, 1, 2, 3}
    # the disk cache returns the same slices
    cached = MyoPSSliceDataset(cases[:1], image_size=48, pixel_spacing=3.0, cache_dir=tmp_path)
    again = MyoPSSliceDataset(cases[:1], image_size=48, pixel_spacing=3.0, cache_dir=tmp_path)
    assert any(tmp_path.glob("myops_*.pt"))
    for p, q in zip(cached.slices, again.slices, strict=True):
        assert torch.equal(p.images, q.images) and torch.equal(p.labels, q.labels)
    # a validation subset: 2 of the 8 groups of every slice, one per half of the bank; test intact
    sub = MyoPSDataModule(split_file=split, image_size=48, spacing=3.0, num_ffds=2,
                          val_groups_per_slice=2)
    sub.setup()  # every split
    names = [sub.datasets["val"][i]["case"] for i in range(len(sub.datasets["val"]))]
    assert len(names) == 2 * len(val.slices)
    assert names[:2] == [val[0]["case"], val[4]["case"]]
    assert len(sub.datasets["test"]) == len(dm.datasets["test"])
    with pytest.raises(ValueError, match="val_groups_per_slice"):
        MyoPSDataModule(val_groups_per_slice=21)


def test_augmentation_on_training_groups_only():
    aug = {"rotation": 20, "scaling": 0.1, "gamma": 0.3, "fresh_ffds": True}
    dm, plain = _module(augmentation=aug), _module()
    assert dm.datasets["val"].augmentation is None and dm.datasets["test"].augmentation is None
    for split in ("val", "test"):  # identical fixed groups with and without augmentation
        assert torch.equal(dm.datasets[split][1]["images"], plain.datasets[split][1]["images"])
    torch.manual_seed(2)  # draws 17.6 degrees (seed 0: 1.6, too little to move 32^2 labels)
    item = dm.datasets["train"][0]
    _check_item(item, 3, SIZE)
    torch.manual_seed(2)
    reference = plain.datasets["train"][0]
    # the augmented group's aligned labels differ (rotated/scaled) but stay one map
    assert not torch.equal(item["aligned_labels"], reference["aligned_labels"])
    assert all(torch.equal(a, item["aligned_labels"][0]) for a in item["aligned_labels"])
    with pytest.raises(TypeError):
        _module(augmentation={"rotate": 10})


# 2D in-plane settings: rotation about the slice normal only, no through-plane scaling
AFFINE_2D = {"_target_": "torchio.RandomAffine", "degrees": [0, 0, 0, 0, 25, 25],
             "scales": [1, 1, 1, 1, 1, 1], "isotropic": False}


def test_torchio_transforms_on_training_groups_only():
    """data.transforms: a spatial TorchIO transform moves the whole group at once (the aligned
    labels stay one map and rho follows them), an intensity one each image on its own; the
    validation and test groups are untouched, and the run's seed fixes the draws."""
    transforms = [AFFINE_2D, {"_target_": "torchio.RandomNoise", "std": [0.2, 0.2]}]
    dm, plain = _module(transforms=transforms), _module()
    for split in ("val", "test"):
        assert torch.equal(dm.datasets[split][1]["images"], plain.datasets[split][1]["images"])
    torch.manual_seed(123)  # training items draw from torch's generator, seeded by the run
    item = dm.datasets["train"][0]
    torch.manual_seed(123)
    reference = plain.datasets["train"][0]
    assert item["images"].shape == (3, SIZE, SIZE) and item["rho"].shape == (3, 4, SIZE, SIZE)
    assert torch.allclose(item["rho"].sum(1), torch.ones(3, SIZE, SIZE), atol=1e-5)
    # rho resampled linearly, the labels by nearest neighbour: they agree but at the contours
    assert (item["rho"].argmax(1) == item["labels"]).float().mean() > 0.95
    aligned = item["aligned_labels"]
    assert not torch.equal(aligned, reference["aligned_labels"])  # rotated by 25 degrees
    assert all(torch.equal(a, aligned[0]) for a in aligned)  # one draw for the whole group
    # the same item under the same seed: the same TorchIO draws too
    torch.manual_seed(123)
    again = dm.datasets["train"][0]
    assert torch.equal(again["images"], item["images"])
    torch.manual_seed(124)
    assert not torch.equal(dm.datasets["train"][0]["images"], item["images"])
    # noise alone: labels untouched, every image changed by its own draw
    noise_only = _module(transforms=transforms[1:])
    torch.manual_seed(123)
    noisy = noise_only.datasets["train"][0]
    assert torch.equal(noisy["aligned_labels"], reference["aligned_labels"])
    difference = (noisy["images"] - reference["images"]).flatten(1)
    assert difference.abs().mean(1).min() > 0.05
    assert not torch.allclose(difference[0], difference[1])
    with pytest.raises(ValueError, match="transforms entry"):
        _module(transforms=[{"_target_": "torchio.RandomNoise", "sd": 1}])
    with pytest.raises(ValueError, match="needs a _target_"):
        _module(transforms=["RandomNoise"])
