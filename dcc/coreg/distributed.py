"""X-CoReg across processes (issue #22): a group sharded over ``torch.distributed``.

The X-metric is a sum over the images, X = sum_j I(U_j; Z) (Eqs. 8, 17), and the common-space
update needs from each image only its log-likelihood terms at a point: Gamma at x is
``softmax_k(sum_j log f_jk(u_xj) + log pi_k)`` (Eq. 12 with the appearance model of Eq. 20).
So a group shards naturally. Each process holds a contiguous slice of the images (global
indices ``offset .. offset + size - 1``, :func:`shard`) and their transforms phi_j, and:

* per step, the per-point partial sums ``sum_{j local} log f_jk(u_xj)`` and the number of local
  images that cover each point are all-reduced, one message of ``m x (K + 1)`` floats for a
  coordinate sample of ``m`` points: every process then has the same overlap region
  Omega^phi, the same Gamma (Eq. 12) and the same pi (Eq. 14);
* the gradient of -X with respect to phi_j is local: Gamma is held fixed within a step
  (Eq. 15), so I(U_i; Z) does not depend on phi_j for i != j, and each process steps on its
  own MI terms (Eqs. 16, 17, 21) without exchanging gradients;
* the unbiased constraint (1/N) sum_j phi_j = id (Eq. 37) needs means over *all* images of
  the transforms' parameters: all-reduced sums divided by the global N;
* X and its per-image terms, the stage checks, the medoid of several tries and the final dense
  Gamma are sums, gathers or maxima over the processes, so that every process takes the same
  decisions and draws the same random numbers (seeded CPU generators) in the same order.

:class:`ImageShard` is the single process (every reduction the identity: the engine runs
exactly as before); :class:`DistributedShard` the same interface over a process group.
"""

from __future__ import annotations

import copy
import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn

from dcc.spatial.transforms import SpatialTransform

__all__ = [
    "DistributedShard",
    "ImageShard",
    "PeerError",
    "agree",
    "fingerprint",
    "gather_transform",
    "join",
    "shard",
]


class PeerError(ValueError):
    """Another process of the group failed a check; its message is this error's."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous slice of ``n`` images that process ``rank`` of ``world`` holds: the first
    ``n % world`` processes hold one image more than the others (sizes differ by at most one)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} outside 0..{world - 1}")
    if n < world:
        raise ValueError(f"shard: {world} processes need at least {world} images, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class ImageShard:
    """The images of a group that this process holds, and the reductions over the whole group.

    This class is one process holding the whole group (``offset`` 0, ``size == total``): every
    reduction returns its argument (``mean`` is ``tensor.mean(0)``), so the single-process
    engine does exactly the arithmetic it did before, with no copy and no synchronisation.
    """

    distributed = False

    def __init__(self, size: int):
        self.size = self.total = size
        self.offset, self.rank, self.world = 0, 0, 1
        self.sizes = [size]

    def owns(self, index: int) -> bool:
        """Whether global image ``index`` is one of this process's."""
        return self.offset <= index < self.offset + self.size

    def local(self, index: int) -> int:
        """The local index of global image ``index``."""
        return index - self.offset

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Partial sums over this process's images -> sums over the group (in place)."""
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over the processes (in place)."""
        return tensor

    def all(self, mask: torch.Tensor) -> torch.Tensor:
        """Logical AND over the processes of a boolean mask (e.g. Omega^phi of Eq. 14)."""
        return mask

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over all N images of per-image values ``(size, ...)`` -> ``(...)``."""
        return tensor.mean(0)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-image values ``(size, ...)`` of every process, in global order: ``(N, ...)``."""
        return tensor

    def unique(self, values: torch.Tensor) -> torch.Tensor:
        """The sorted union over the processes of sorted unique ``values``."""
        return values


class DistributedShard(ImageShard):
    """This process's slice of a group sharded over a ``torch.distributed`` process group
    (made by :func:`join`): images ``offset .. offset + size - 1`` of ``total``, process ranks
    in the order of the slices. Every method is a collective: all processes call it, in the
    same order, with tensors of the same shape (``gather``: the same trailing shape)."""

    distributed = True

    def __init__(self, sizes: list[int], rank: int, device, process_group=None):
        self.sizes = list(sizes)
        self.rank, self.world = rank, len(sizes)
        self.size, self.total = sizes[rank], sum(sizes)
        self.offset = sum(sizes[:rank])
        self.device = torch.device(device)
        self.group = process_group

    def sum(self, tensor):
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def max(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all(self, mask):
        flags = mask.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        return flags.bool()

    def mean(self, tensor):
        return self.sum(tensor.sum(0)) / self.total

    def gather(self, tensor):
        boolean = tensor.dtype == torch.bool
        local = tensor.to(torch.uint8) if boolean else tensor
        padded = local.new_zeros(max(self.sizes), *local.shape[1:])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        out = torch.cat([p[:s] for p, s in zip(parts, self.sizes, strict=True)])
        return out.bool() if boolean else out

    def unique(self, values):
        parts = [None] * self.world
        dist.all_gather_object(parts, values.tolist(), group=self.group)
        merged = sorted({v for part in parts for v in part})
        return torch.tensor(merged, dtype=values.dtype, device=values.device)


def agree(error: BaseException | None = None, process_group=None) -> None:
    """A collective check point: every process says whether it failed (``error``), and if any
    did, every process raises: the one that failed its own error, the others a
    :class:`PeerError` with the message of the first that failed. Without an initialised
    process group (one process) it raises ``error`` if given."""
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    world = dist.get_world_size(process_group)
    messages = [None] * world
    dist.all_gather_object(messages, None if error is None else str(error), group=process_group)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if error is not None:
        raise error
    if failed:
        raise PeerError(messages[failed[0]], failed[0])


def fingerprint(*values) -> int:
    """A digest of JSON-able ``values`` (settings, grids) that is the same in every process
    (Python's ``hash`` of a string is not)."""
    text = json.dumps(values, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def join(size: int, device="cpu", process_group=None, digest: int = 0,
         error: BaseException | None = None) -> DistributedShard:
    """This process's :class:`DistributedShard` of a group whose processes hold ``size`` images
    each (collective: all processes of ``process_group``, the default group for ``None``, call
    it). ``digest`` (:func:`fingerprint` of the settings) must agree across processes; an
    ``error`` of one process's input checks is raised in every process (:func:`agree`), so that
    no process waits for one that has given up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "XCoReg: distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    entries = [None] * world
    message = None if error is None else str(error)
    dist.all_gather_object(entries, (size, digest, message), group=process_group)
    failed = [r for r, e in enumerate(entries) if e[2] is not None]
    if error is not None:
        raise error
    if failed:
        raise PeerError(entries[failed[0]][2], failed[0])
    if len({e[1] for e in entries}) > 1:
        raise ValueError("XCoReg: the processes were given different settings or grids (each "
                         "process must pass the same config, grid and roi)")
    sizes = [e[0] for e in entries]
    empty = [r for r, s in enumerate(sizes) if s < 1]
    if empty:
        raise ValueError(f"XCoReg: process {empty[0]} holds no image; every process needs at "
                         "least one (see dcc.coreg.distributed.shard)")
    return DistributedShard(sizes, rank, device, process_group)


@torch.no_grad()
def gather_transform(transform: SpatialTransform, group: ImageShard) -> SpatialTransform:
    """The transforms of the whole group from each process's slice ``transform`` (collective):
    a copy whose per-image parameters (dim 0 of every parameter of these transforms) hold all
    ``N`` images in global order, on every process. In one process, ``transform`` itself."""
    if not group.distributed:
        return transform
    full = copy.deepcopy(transform)
    for whole, part in zip(full.modules(), transform.modules(), strict=True):
        if isinstance(whole, SpatialTransform):
            whole.groups = group.total
        for name, param in part.named_parameters(recurse=False):
            gathered = group.gather(param.detach().to(group.device)).to(param.device)
            setattr(whole, name, nn.Parameter(gathered, requires_grad=param.requires_grad))
    return full
