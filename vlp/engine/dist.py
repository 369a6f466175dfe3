"""Processes: who am I, how many are we, and the few collectives the train loop needs.

Launchers (`deepspeed`, `torchrun`, DeepSpeed's multi-node runner) export RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A plain `vlp pretrain` has none of them, and
`deepspeed.initialize` would then try MPI discovery (and ask for mpi4py), so `init()` fills in a
one-process world on a free local port first.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


# What launchers export (and `init` fills in for a launcher-less run). A process started from
# one that holds a world must not inherit them, or it would try to join that world.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "CROSS_SIZE")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} must be an integer "
                           "(set by the launcher: deepspeed, torchrun)") from None


def world_from_env() -> World:
    """The process layout the launcher exported (a one-process world when there is none)."""
    size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    # torchrun exports LOCAL_WORLD_SIZE; DeepSpeed's launcher exports CROSS_SIZE (nodes) too.
    local_size = _env_int("LOCAL_WORLD_SIZE")
    if local_size is None:
        nodes = _env_int("CROSS_SIZE")
        local_size = size // nodes if nodes else size
    if not 0 <= rank < size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank, size, local_rank, max(1, local_size))


def init() -> World:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPUs), once per
    process, and pin this process to its GPU when there is one."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = world_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    # Named, DeepSpeed skips probing (and its "Setting accelerator to CPU" warning).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would drown the progress bar
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return world


def set_threads(world: World, threads: int) -> int:
    """Intra-op threads for this process: `threads`, or the node's cores shared between its
    processes (two processes each using every core thrash; measured in bench/README.md)."""
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // world.local_size)
    torch.set_num_threads(threads)
    return threads


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def all_gather_rows(row: list[float], world: World) -> torch.Tensor:
    """Each rank's `row` of numbers -> (world, len(row)) float64 tensor, same on every rank."""
    mine = torch.tensor(row, dtype=torch.float64)
    if world.size == 1:
        return mine[None]
    mine = _to_comm_device(mine)
    out = [torch.empty_like(mine) for _ in range(world.size)]
    torch_dist.all_gather(out, mine)
    return torch.stack([t.cpu() for t in out])


def all_gather_object(obj, world: World) -> list:
    if world.size == 1:
        return [obj]
    out: list = [None] * world.size
    torch_dist.all_gather_object(out, obj)
    return out


def _to_comm_device(t: torch.Tensor) -> torch.Tensor:
    # NCCL only moves GPU tensors; gloo takes CPU ones.
    if torch_dist.get_backend() == "nccl":
        return t.cuda()
    return t
