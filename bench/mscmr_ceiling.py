"""What the DCC loss allows on MyoPS, without a network: free fields optimised per group.

Takes ``--groups`` validation groups of ``experiment=mscmr_dcc_all`` (the fixed misalignments),
and optimises one free displacement field per image (``--resolution`` 2: on a half-resolution
lattice, upsampled bilinearly, as the network's D_r) with Adam on L1 + L2 of the DCC loss
(Eqs. 41-44) with every member labelled, exactly as training sees a group, for ``--steps``
steps. The Reg DSC it reaches is a ceiling for a network trained with this loss on these
groups (the network has to predict the fields from the images instead). Labels are used: this
is a diagnostic, not a registration method::

    python bench/mscmr_ceiling.py --groups 16 --steps 150 --out results/mscmr_ceiling
    python bench/mscmr_ceiling.py --similarity-weight 0   # the labels' L2 alone

``--unlabelled`` asks the same of DGR's loss: no member labelled (no spatial prior, Eq. 40),
the predicted maps rho-hat given as ``labels`` (the labels' rho: a perfect segmenter, whose
maps L2 drags along with phi), ``flat`` (uniform maps plus 1 % noise: an untrained one),
``random`` (random per-voxel maps, like X-CoReg's Gamma^[0]) or ``checkpoint`` (a trained
network's, ``--checkpoint``); ``--no-l2`` optimises L1 alone::

    python bench/mscmr_ceiling.py --unlabelled labels --bending-weight 30
    python bench/mscmr_ceiling.py --unlabelled checkpoint --checkpoint last.ckpt --no-l2

``--refine CKPT`` is a test-time method instead (labels used for the Dice only): the fields
start from the network's prediction (the lattice holds a residual added to it) and the
network's own segmentations rho-hat stand in for the labelled maps rho of every member, so
L1 + L2 pull the predicted segmentations of the group into agreement::

    python bench/mscmr_ceiling.py --refine last.ckpt --steps 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

from dcc.lit.module import DCCModule, group_metrics
from dcc.losses import DCCLoss
from dcc.spatial.fields import warp, zero_mean

ROOT = Path(__file__).resolve().parents[1]


def reg_dsc(labels: torch.Tensor, displacement: torch.Tensor) -> float:
    """Mean over the groups of the pairwise Dice of the warped labels (as in training)."""
    warped = warp(labels.unsqueeze(2).float(), displacement, mode="nearest")[:, :, 0].long()
    b, n = labels.shape[:2]
    members = torch.ones(n, dtype=torch.bool)
    empty = torch.zeros(4, *labels.shape[2:])
    dices = [group_metrics(labels[i], warped[i], empty, displacement[i], members, 4)["reg"]
             for i in range(b)]
    return sum(d["mean"] for d in dices) / b


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.1, help="Adam step (voxels of the lattice)")
    p.add_argument("--resolution", type=int, default=2, help="lattice = image size / this")
    p.add_argument("--bending-weight", type=float, default=10.0, help="lambda (mscmr_dcc_all)")
    p.add_argument("--similarity-weight", type=float, default=1.0)
    p.add_argument("--unlabelled", choices=("labels", "flat", "random", "checkpoint"), default=None,
                   help="DGR: no member labelled, rho-hat = the labels' rho, flat maps or a "
                   "network's")
    p.add_argument("--checkpoint", help="DCC checkpoint whose D_s gives rho-hat")
    p.add_argument("--refine", metavar="CKPT", help="start from this network's fields, its "
                   "rho-hat as every member's labelled maps (no labels but for the Dice)")
    p.add_argument("--no-l2", action="store_true", help="optimise L1 alone")
    p.add_argument("--em-steps", type=int, default=2, help="common-space updates (Eqs. 12, 14)")
    p.add_argument("--data-root", default=None, help="default: $DCC_DATA_ROOT")
    p.add_argument("--out", default=None, help="write <out>.md")
    args = p.parse_args(argv)
    if (args.unlabelled == "checkpoint") != bool(args.checkpoint):
        p.error("--checkpoint goes with --unlabelled checkpoint, and only with it")
    if args.refine and args.unlabelled:
        p.error("--refine and --unlabelled exclude each other")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    overrides = ["experiment=mscmr_dcc_all", f"data.batch_size={args.groups}"]
    if args.data_root:
        overrides.append(f"paths.data_dir={args.data_root}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    data = hydra.utils.instantiate(cfg.data)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    images, labels, rho = batch["images"], batch["labels"], batch["rho"]
    b, n = images.shape[:2]
    size = images.shape[2:]
    lattice = torch.zeros(b, n, len(size), *(s // args.resolution for s in size),
                          requires_grad=True)
    optimiser = torch.optim.Adam([lattice], lr=args.lr)
    loss = DCCLoss(num_classes=4, bending_weight=args.bending_weight,
                   similarity_weight=args.similarity_weight, em_steps=args.em_steps)
    labelled = torch.full((b, n), args.unlabelled is None)
    if args.unlabelled == "checkpoint":
        model = DCCModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
        with torch.no_grad():
            seg_probs = model.net(images, batch["domains"]).seg_logits.softmax(2)
    elif args.unlabelled == "random":  # like Gamma^[0] of Eq. (22), logits 3x sharper
        seg_probs = torch.softmax(3 * torch.randn_like(rho), 2)
    elif args.unlabelled == "flat":
        seg_probs = 1 + 0.01 * torch.rand_like(rho)
        seg_probs = seg_probs / seg_probs.sum(2, keepdim=True)
    else:
        seg_probs = rho
    start_field = torch.zeros(b, n, len(size), *size)
    if args.refine:
        model = DCCModule.load_from_checkpoint(args.refine, map_location="cpu").eval()
        with torch.no_grad():
            prediction = model(images, batch["domains"])
        start_field = prediction.displacement.float()
        seg_probs = rho = prediction.seg_logits.softmax(2).float()
        print(f"network: Reg DSC {reg_dsc(labels, start_field):.4f}", flush=True)

    def field() -> torch.Tensor:
        up = torch.nn.functional.interpolate(lattice.flatten(0, 1), size=tuple(size),
                                             mode="bilinear", align_corners=False)
        return zero_mean(start_field + up.view(b, n, len(size), *size) * args.resolution)

    rows = [(0, reg_dsc(labels, field().detach()), 0.0)]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = loss(images, field(), seg_probs, rho, labelled,
                   labels=None if args.refine else labels)
        optimiser.zero_grad()
        (out.l1 if args.no_l2 else out.l1 + out.l2).backward()
        optimiser.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            rows.append((step, reg_dsc(labels, field().detach()), time.perf_counter() - start))
            print(f"step {step}: Reg DSC {rows[-1][1]:.4f}", flush=True)
    lines = [
        "# What the DCC loss allows on MyoPS: free fields per group, no network", "",
        f"Command: `python bench/mscmr_ceiling.py {' '.join(sys.argv[1:])}`; CPU, 1 thread.",
        f"Groups: {b} validation groups of `experiment=mscmr_dcc_all` ({tuple(size)} at "
        f"{cfg.data.spacing} mm); lattice 1/{args.resolution} of the image (bilinear "
        f"upsampling, zero-mean over the group, Eq. 37); Adam {args.lr} voxel; "
        f"{'L1 alone' if args.no_l2 else 'L1 + L2'} with "
        f"lambda = {args.bending_weight}, similarity weight {args.similarity_weight}, "
        + (f"started from the network {args.refine}, its rho-hat as every member's maps "
           "(labels used for the Dice only)." if args.refine else
           ("every member labelled" if args.unlabelled is None else
            f"no member labelled (DGR), rho-hat = {args.unlabelled}")
           + " (labels used: a diagnostic, not a method)."), "",
        "| Adam steps | Reg DSC | seconds |", "|---:|---:|---:|",
        *[f"| {s} | {100 * d:.1f} | {t:.0f} |" for s, d, t in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
