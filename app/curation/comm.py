"""The collectives the distributed curation stages use, over torch.distributed (gloo).

With one process (`world == 1`) every call is a local no-op, so the algorithms take a `Comm`
and run unchanged in tests, on a laptop and as a multi-replica PyTorchJob. Rows are split
contiguously: rank r owns rows [round(N*r/W), round(N*(r+1)/W)), so gathering per-rank arrays in
rank order restores the global row order.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


class Comm:
    def __init__(self, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
        self.rank, self.world = rank, world

    @classmethod
    def from_env(cls) -> "Comm":
        """RANK / WORLD_SIZE from torchrun; joins the gloo group when there are several ranks."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
        return cls(rank, world)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows."""
        return slice(round(n * self.rank / self.world), round(n * (self.rank + 1) / self.world))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of t over ranks, in place (t must be a CPU tensor for gloo)."""
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """src's obj on every rank (others pass anything, e.g. None)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def concat(self, a: np.ndarray) -> np.ndarray:
        """Per-rank arrays concatenated along axis 0 in rank order, on every rank."""
        return a if not self.distributed else np.concatenate(self.gather(np.asarray(a)))
