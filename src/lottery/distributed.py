"""Data-parallel training across processes (``torchrun --nproc-per-node N -m lottery ...``).

Every rank builds the same network from the same seed, sees its own slice of every global batch
(so the iteration count, the LR schedule and the rewind point are the same as in one process), and
averages gradients through DistributedDataParallel. Masks are identical on every rank because they
are computed from identical weights (CS logits are parameters, averaged like the weights; IMP prunes
the same trained weights). Only rank 0 writes files; the others read what it wrote after a barrier.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group that torchrun describes in the environment; False when not under torchrun."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def local_device(device: str) -> str:
    """``cuda`` becomes this rank's own GPU under torchrun."""
    if device == "cuda" and is_distributed():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ShardedLoader:
    """Each rank takes rows ``rank::world`` of every global batch of the wrapped loader.

    The wrapped loader draws the same global batches on every rank (same seed), so together the ranks
    see exactly the batches a single process would, and the batch size in the hparams stays global.
    """

    def __init__(self, loader: Any, rank_: int | None = None, world: int | None = None):
        self.loader = loader
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x[self.rank :: self.world], y[self.rank :: self.world]
