"""torch.distributed set-up for runs started by torchrun; a plain process is rank 0 of a world of 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_kind: str) -> World:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_kind == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def broadcast_object(value: object, world: World) -> object:
    """Rank 0's value on every rank (e.g. the run directory it chose)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(flag: bool, world: World) -> bool:
    """``flag`` if any rank raises it: ranks that must stop at the same step (a time limit read from each rank's own
    clock) decide together."""
    if not world.distributed:
        return flag
    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    raised = torch.tensor([float(flag)], device=device)
    dist.all_reduce(raised, op=dist.ReduceOp.MAX)
    return bool(raised.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's forward would do: before evaluating the
    unwrapped model, which every rank can do, with or without validation rows, without waiting on the others."""
    if world.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
