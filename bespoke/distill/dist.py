"""This process's place in a ``torchrun`` launch (:class:`DistEnv`): the only module of the
distillation package that touches :mod:`torch.distributed`."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistEnv:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    @classmethod
    def from_env(cls, device: str = "cpu") -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        here = False
        if not dist.is_initialized():
            backend = "nccl" if str(device).startswith("cuda") and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend=backend)
            here = True
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), initialised_here=here)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


__all__ = ["DistEnv"]
