"""Processes: who am I, how many are we, and the few collectives the train loop needs.

Launchers say it in environment variables. `deepspeed`, `torchrun` and DeepSpeed's multi-node
runner export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. MPI launchers
(`mpirun`, `deepspeed --launcher openmpi|mvapich`) and Slurm's `srun` export only their own
(OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*, PMI_*, SLURM_*); `init()` translates those, since without it
every process would believe it is rank 0 of 1 and N separate runs would share one --out. A plain
`vlp pretrain` has none of them and gets a one-process world on a free local port (without one,
`deepspeed.initialize` would try MPI discovery and ask for mpi4py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import socket
import sys
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as torch_dist

from vlp.config import ConfigError

# What launchers export (and `init` fills in for a launcher-less run). A process started from
# one that holds a world must not inherit them, or it would try to join that world.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "CROSS_SIZE")

# MPI launchers: (name, rank, size, local rank, local size) variables.
MPI_FAMILIES = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Intel MPI (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
# Every variable a launcher family above (or Slurm) exports: a process that must be a world of
# its own (a test run inside an `srun` step, a child of a launched rank) drops them all.
LAUNCHER_PREFIXES = ("OMPI_", "MV2_", "PMI_", "MPI_LOCAL", "SLURM_")
DEFAULT_PORT = 29500  # torch's and DeepSpeed's default rendezvous port
_FIX = ("launch with deepspeed or torchrun, or export RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR and MASTER_PORT yourself")


class LaunchError(ConfigError):
    """The launcher's environment does not describe a world this process can join."""


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launched: bool = False  # started by a launcher (deepspeed, torchrun, mpirun, srun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def without_launcher_vars(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less every launcher's variables (LAUNCH_VARS and LAUNCHER_PREFIXES)."""
    return {k: v for k, v in env.items()
            if k not in LAUNCH_VARS and not k.startswith(LAUNCHER_PREFIXES)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} must be an integer (set by "
                          "the launcher)") from None


def _shown(env: Mapping[str, str], names) -> str:
    return ", ".join(f"{n}={env[n]}" for n in names if n in env)


@dataclasses.dataclass(frozen=True)
class _Found:
    """A world as one launcher family describes it."""
    source: str      # who said so, with the variables, for messages
    world: World
    addr: str | None = None  # a MASTER_ADDR the family implies (Slurm's first node)
    port: int | None = None


def _torch_style(env: Mapping[str, str]) -> _Found | None:
    size = _int(env, "WORLD_SIZE")
    if size is None:
        return None
    rank = _int(env, "RANK")
    if rank is None and size > 1:
        raise LaunchError(f"WORLD_SIZE={size} but RANK is not set: {_FIX}")
    local_rank = _int(env, "LOCAL_RANK")
    # torchrun exports LOCAL_WORLD_SIZE; DeepSpeed's MPICH/IMPI runners LOCAL_SIZE; its
    # launcher CROSS_SIZE (nodes).
    local_size = _int(env, "LOCAL_WORLD_SIZE") or _int(env, "LOCAL_SIZE")
    if local_size is None:
        nodes = _int(env, "CROSS_SIZE")
        local_size = size // nodes if nodes else size
    if local_rank is None:
        if size > 1 and local_size > 1:
            raise LaunchError(f"WORLD_SIZE={size} but LOCAL_RANK is not set: {_FIX}")
        local_rank = 0
    return _Found(_shown(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK")),
                  World(rank or 0, size, local_rank, max(1, local_size)))


def _mpi(env: Mapping[str, str], family: tuple) -> _Found | str | None:
    """The family's world; a message when it is only partly there (e.g. `srun --mpi=pmi2` sets
    PMI_RANK and PMI_SIZE without the local ones; Slurm's own variables may then do)."""
    name, *variables = family
    present = [v for v in variables if v in env]
    if not present:
        return None
    if len(present) < len(variables):
        missing = ", ".join(v for v in variables if v not in env)
        return f"started by {name} ({_shown(env, present)}) but {missing} is not set: {_FIX}"
    rank, size, local_rank, local_size = (_int(env, v) for v in variables)
    return _Found(f"{name} ({_shown(env, variables)})", World(rank, size, local_rank, local_size))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: "gpu[003-004,007],cpu1" -> "gpu003"."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # commas outside brackets
    return re.sub(r"\[([^,\]-]+)[^\]]*\]", r"\1", first)


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Slurm's "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot read the Slurm task layout {spec!r}: {_FIX}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _slurm(env: Mapping[str, str]) -> _Found | None:
    # Only inside an `srun` step: a batch script's own shell has SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, but is one process.
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    shown = _shown(env, ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID",
                         "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"))
    size = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if size is None or local_rank is None or not per_node:
        raise LaunchError(f"started by srun ({shown}) without SLURM_STEP_NUM_TASKS, "
                          f"SLURM_LOCALID and SLURM_STEP_TASKS_PER_NODE: {_FIX}")
    counts = slurm_tasks_per_node(per_node)
    node = _int(env, "SLURM_NODEID") or 0
    local_size = counts[node] if node < len(counts) else max(counts)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    job = _int(env, "SLURM_JOB_ID")
    return _Found(f"srun ({shown})", World(_int(env, "SLURM_PROCID"), size, local_rank, local_size),
                  addr=first_slurm_host(nodelist) if nodelist else None,
                  # the same on every task of the job, different between jobs (Lightning's rule)
                  port=15000 + job % 10000 if job is not None else None)


def _check(found: _Found) -> None:
    w = found.world
    if not (0 <= w.rank < w.size and 0 <= w.local_rank < w.local_size <= w.size):
        raise LaunchError(f"inconsistent process layout from {found.source}: rank {w.rank} of "
                          f"{w.size}, local rank {w.local_rank} of {w.local_size}")


def _discover(env: Mapping[str, str]) -> _Found | None:
    """The launcher's description of the world: torch-style variables first (deepspeed,
    torchrun, also when they run inside mpirun/srun), else an MPI runtime's, else srun's.
    None: no launcher."""
    found = _torch_style(env)
    if found is None:
        described = [_mpi(env, family) for family in MPI_FAMILIES]
        candidates = [f for f in described if isinstance(f, _Found)]
        for other in candidates[1:]:
            a, b = candidates[0].world, other.world
            if (a.rank, a.size) != (b.rank, b.size):
                raise LaunchError(f"the launcher variables disagree: {candidates[0].source} vs "
                                  f"{other.source}; {_FIX}")
        # An MPI runtime's own variables first: under `mpirun` in a Slurm job the SLURM_* ones
        # describe mpirun's daemons (one per node), not the ranks.
        found = candidates[0] if candidates else _slurm(env)
        partial = [f for f in described if isinstance(f, str)]
        if found is None and partial:
            raise LaunchError(partial[0])
    if found is not None:
        _check(found)
    return found


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The process layout the launcher exported (a one-process world when there is none)."""
    found = _discover(os.environ if env is None else env)
    return found.world if found else World()


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for this
    process, from whatever launcher started it (see module docstring); a LaunchError (one line,
    naming the launcher variables found) when the rendezvous address cannot be known."""
    found = _discover(env)
    w = found.world if found else World()
    addr, port = (env.get(k, "").strip() for k in ("MASTER_ADDR", "MASTER_PORT"))
    if not addr:
        if w.local_size == w.size:  # every process on this machine
            addr = "127.0.0.1"
        elif found.addr:
            addr = found.addr
        else:
            raise LaunchError(f"started by {found.source} across machines, and MASTER_ADDR is "
                              "not set: export MASTER_ADDR=<host of rank 0> (and MASTER_PORT) "
                              f"to every process (mpirun -x MASTER_ADDR=...), or {_FIX}")
    if not port:  # a one-process world meets nobody: a free port, never a job-wide fixed one
        port = _free_port() if w.size == 1 else (found.port or DEFAULT_PORT)
    return {"RANK": str(w.rank), "WORLD_SIZE": str(w.size), "LOCAL_RANK": str(w.local_rank),
            "LOCAL_WORLD_SIZE": str(w.local_size), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def cuda_device(local_rank: int, local_size: int, device_count: int) -> int:
    """The GPU this process uses: `local_rank % device_count` where that gives every process of
    the node its own GPU: one GPU per process (each sees one, its own, through
    CUDA_VISIBLE_DEVICES: device 0), or at least as many visible GPUs as processes. More
    processes than GPUs would put two ranks on one GPU, which NCCL refuses: a LaunchError."""
    if device_count == 1:
        return 0
    if device_count < 1 or max(local_size, local_rank + 1) > device_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise LaunchError(f"{local_size} processes on this machine (this one is local rank "
                          f"{local_rank}) but {device_count} GPUs visible to it "
                          f"(CUDA_VISIBLE_DEVICES={visible}): start at most {device_count} "
                          "processes per machine, or give each process one GPU")
    return local_rank % device_count


# DeepSpeed's CPU shared-memory all-reduce, a C++ op it JIT-compiles at init_distributed.
SHM_OP = "deepspeed_shm_comm"


def _skip_shm_inference_op() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op on CPU. Only its inference
    all-reduce (init_inference's tensor parallelism) uses that op, and vlp never calls it; yet
    init_distributed compiles it on every machine that lacks it, behind torch's lock file
    (`$TORCH_EXTENSIONS_DIR/.../deepspeed_shm_comm/lock`), and a build that was killed leaves that
    lock behind: every later run then waits on it forever, silently (torch's FileBaton has no
    timeout). CI hung exactly so. Skipping it also skips a compiler run per machine and the
    /dev/shm buffers it leaks when a run is killed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def init() -> World:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPUs), once per
    process, and pin this process to its GPU when there is one."""
    found = _discover(os.environ)
    translated = found is not None and "WORLD_SIZE" not in os.environ
    os.environ.update(launch_env(os.environ))
    world = dataclasses.replace(world_from_env(), launched=found is not None)
    if translated and world.size > 1:
        # The world came from MPI or Slurm variables, perhaps inherited unexpectedly (a shell
        # inside a job): say so, since the rendezvous waits for every rank.
        print(f"vlp: rank {world.rank} of {world.size} from {found.source}; waiting for all "
              f"{world.size} processes at {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']}", file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_device(world.local_rank, world.local_size,
                                          torch.cuda.device_count()))
    # Named, DeepSpeed skips probing (and its "Setting accelerator to CPU" warning).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would drown the progress bar
    if not torch_dist.is_initialized():
        _skip_shm_inference_op()
        deepspeed.init_distributed(verbose=False)
    global _CPU_GROUP
    if _CPU_GROUP is None and world.size > 1 and torch_dist.get_backend() != "gloo":
        _CPU_GROUP = torch_dist.new_group(backend="gloo")  # every rank calls it, in order
    return world


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for `rank` of a run seeded `seed`: different on every rank (and not
    `seed + rank`, which would make run seed 1's rank 0 replay run seed 0's rank 1)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_for_rank(seed: int, rank: int) -> int:
    """Seed this process's Python, NumPy and torch (CPU and every GPU) generators with
    `rank_seed(seed, rank)`, so that dropout, masking and sampling differ between ranks
    (the same seed everywhere would give every rank the same masks). Returns the seed."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # seeds the CUDA generators too
    return s


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


_CPU_GROUP = None  # a gloo group beside NCCL for the loop's small per-step exchanges


def _cpu_group():
    """The group for small host-side exchanges: the default one on gloo; beside NCCL, a gloo
    group of the same ranks (made by `init`), so the per-step rows of numbers the ranks swap
    never go through the GPU (no host-device copies, no NCCL launches on the step path)."""
    return _CPU_GROUP


def all_gather_rows(row: list[float], world: World) -> torch.Tensor:
    """Each rank's `row` of numbers -> (world, len(row)) float64 tensor, same on every rank."""
    mine = torch.tensor(row, dtype=torch.float64)
    if world.size == 1:
        return mine[None]
    out = [torch.empty_like(mine) for _ in range(world.size)]
    torch_dist.all_gather(out, mine, group=_cpu_group())
    return torch.stack(out)


def all_gather_object(obj, world: World) -> list:
    if world.size == 1:
        return [obj]
    out: list = [None] * world.size
    torch_dist.all_gather_object(out, obj, group=_cpu_group())
    return out
