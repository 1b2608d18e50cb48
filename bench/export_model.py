"""Write a training checkpoint's network as a small shipped model (half-precision weights and
hyper-parameters, no optimiser state): ``python bench/export_model.py CKPT OUT [--note TEXT]``.

The shipped cardiac model (``dcc/models/dcc_all_myops.pt``, card in ``dcc/models/README.md``)
was made with it from ``checkpoints/last.ckpt`` of the training run the card names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcc.lit.checkpoints import export_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("out", help="the file to write (e.g. dcc/models/dcc_all_myops.pt)")
    p.add_argument("--note", default="", help="provenance: how the checkpoint was trained")
    args = p.parse_args(argv)
    exported = export_model(args.checkpoint, args.out, note=args.note,
                            checkpoint=Path(args.checkpoint).name)
    size = Path(args.out).stat().st_size / 2**20
    print(f"export_model: wrote {args.out} ({size:.1f} MB, step "
          f"{exported['provenance']['source_global_step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
