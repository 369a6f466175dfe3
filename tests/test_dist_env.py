"""Which world a process is in, from whatever launcher started it (issue 18): torch-style
variables, Open MPI / MVAPICH / MPICH-Intel MPI (PMI) and srun ones, the one-line refusals,
the GPU each process takes, per-rank seeds; and two processes started with only Open MPI's
variables join one gloo world."""
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlp.engine.dist import (LAUNCHER_PREFIXES, SHM_OP, LaunchError, World, cuda_device,
                             first_slurm_host, launch_env, rank_seed, seed_for_rank,
                             slurm_tasks_per_node, without_launcher_vars, world_from_env)

ROOT = Path(__file__).resolve().parent.parent


def test_no_launcher_is_a_one_process_world_on_a_free_port():
    env = launch_env({})
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR")} == \
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
         "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    assert world_from_env({}) == World(0, 1, 0, 1)


def test_torch_style_variables_are_kept():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
           "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}  # deepspeed inside mpirun
    assert world_from_env(env) == World(5, 8, 1, 4)
    out = launch_env(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["MASTER_ADDR"], out["MASTER_PORT"]) == \
        ("5", "8", "10.0.0.1", "1234")
    # DeepSpeed's MPICH/IMPI runners export LOCAL_SIZE, its launcher CROSS_SIZE (nodes)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                           "LOCAL_SIZE": "4"}).local_size == 4
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                           "CROSS_SIZE": "2"}).local_size == 4


@pytest.mark.parametrize("family,names", [
    ("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE")),
    ("mvapich", ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                 "MV2_COMM_WORLD_LOCAL_SIZE")),
    ("pmi", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),
])
def test_mpi_launchers_make_one_world(family, names):
    one_node = dict(zip(names, ("3", "4", "3", "4")))
    assert world_from_env(one_node) == World(3, 4, 3, 4)
    env = launch_env(one_node)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == \
        ("3", "4", "3", "4")
    # every rank must agree on the rendezvous without talking: loopback + a fixed port
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")

    two_nodes = dict(zip(names, ("5", "8", "1", "4")))
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set") as e:
        launch_env(two_nodes)
    assert names[0] in str(e.value) and "\n" not in str(e.value)
    given = launch_env({**two_nodes, "MASTER_ADDR": "node7", "MASTER_PORT": "4000"})
    assert (given["RANK"], given["WORLD_SIZE"], given["LOCAL_RANK"], given["MASTER_ADDR"],
            given["MASTER_PORT"]) == ("5", "8", "1", "node7", "4000")


def test_incomplete_or_contradictory_launcher_variables_are_refused():
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_RANK=1.*OMPI_COMM_WORLD_SIZE"):
        world_from_env({"OMPI_COMM_WORLD_RANK": "1"})
    ompi = dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2",
                OMPI_COMM_WORLD_LOCAL_RANK="1", OMPI_COMM_WORLD_LOCAL_SIZE="2")
    pmi = dict(PMI_RANK="0", PMI_SIZE="2", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="2")
    with pytest.raises(LaunchError, match="disagree"):
        world_from_env({**ompi, **pmi})
    with pytest.raises(LaunchError, match="outside|inconsistent"):
        world_from_env({**ompi, "OMPI_COMM_WORLD_RANK": "2"})
    with pytest.raises(LaunchError, match="RANK is not set"):
        world_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="must be an integer"):
        world_from_env({"PMI_RANK": "x", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0",
                        "MPI_LOCALNRANKS": "2"})


SRUN = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_PROCID": "6",
        "SLURM_STEP_NUM_TASKS": "7", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "3(x2),1",
        "SLURM_STEP_NODELIST": "gpu[017-018,020]"}


def test_srun_step_makes_one_world_with_the_first_node_as_rendezvous():
    assert world_from_env(SRUN) == World(6, 7, 0, 1)
    env = launch_env(SRUN)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == \
        ("6", "7", "0", "gpu017")
    assert env["MASTER_PORT"] == str(15000 + 123456 % 10000)  # same on every task of the job
    # srun --mpi=pmi2 adds PMI_RANK/PMI_SIZE without the local ones: Slurm's describe the world
    assert world_from_env({**SRUN, "PMI_RANK": "6", "PMI_SIZE": "7"}) == World(6, 7, 0, 1)
    # a batch script's own shell (no step) is one process, whatever the job's task count
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert world_from_env({**batch, "SLURM_PROCID": "0"}) == World()


def test_a_one_task_srun_step_rendezvouses_on_a_free_local_port():
    """`srun -n1 pytest` (or an interactive `srun --pty bash`): the job-wide port 15000 + job id
    could be taken by another step on the node; a one-process world needs no agreed port."""
    one = {**SRUN, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1",
           "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_NODEID": "0"}
    assert world_from_env(one) == World(0, 1, 0, 1)
    env = launch_env(one)
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] != str(15000 + 123456 % 10000)


def test_the_suite_runs_outside_any_launcher_world():
    """tests/conftest.py drops inherited launcher variables: a suite started inside an `srun`
    step or an MPI job would otherwise make every in-process run wait for absent ranks."""
    assert not [k for k in os.environ if k.startswith(LAUNCHER_PREFIXES)]
    kept = without_launcher_vars({"SLURM_PROCID": "0", "PMI_SIZE": "4", "OMPI_COMM_WORLD_RANK":
                                  "1", "MV2_COMM_WORLD_SIZE": "2", "MPI_LOCALRANKID": "0",
                                  "WORLD_SIZE": "2", "HOME": "/root", "PMIX_X": "y"})
    assert kept == {"HOME": "/root", "PMIX_X": "y"}


def test_slurm_hostlists_and_task_layouts():
    assert first_slurm_host("gpu[003-004,007],cpu1") == "gpu003"
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a[3,5]-ib,b1") == "a3-ib"
    assert first_slurm_host("n[09]") == "n09"
    assert slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm_tasks_per_node("8") == [8]
    with pytest.raises(LaunchError, match="task layout"):
        slurm_tasks_per_node("2(y3)")


# ------------------------------------------------------------------ which GPU
def test_cuda_device_arithmetic():
    # each process sees only its own GPU (CUDA_VISIBLE_DEVICES per rank): device 0
    assert [cuda_device(r, 4, 1) for r in range(4)] == [0, 0, 0, 0]
    # all GPUs visible: one each
    assert [cuda_device(r, 4, 8) for r in range(4)] == [0, 1, 2, 3]
    assert [cuda_device(r, 8, 8) for r in range(8)] == list(range(8))
    # more processes than GPUs would share one: refused on every rank, not only the extra ones
    for r in range(8):
        with pytest.raises(LaunchError, match="8 processes on this machine.*4 GPUs"):
            cuda_device(r, 8, 4)
    with pytest.raises(LaunchError, match="local rank 5"):
        cuda_device(5, 1, 2)  # a local rank beyond the GPUs, whatever the local size says


# ------------------------------------------------------------------ seeds per rank
def test_seed_for_rank_differs_by_rank_and_repeats():
    seeds = [rank_seed(0, r) for r in range(64)] + [rank_seed(1, r) for r in range(64)]
    assert len(set(seeds)) == 128  # no rank of seed 1 replays a rank of seed 0
    draws = []
    for rank in (0, 1, 0):
        seed_for_rank(7, rank)
        draws.append((random.random(), float(np.random.rand()), torch.rand(2)))
    assert draws[0][:2] == draws[2][:2] and torch.equal(draws[0][2], draws[2][2])
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]
    assert not torch.equal(draws[0][2], draws[1][2])


# ------------------------------------------------------------------ real processes
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = """
import json, sys
import torch, torch.distributed as td
from vlp.engine import dist
world = dist.init()
ranks = [None, None]
td.all_gather_object(ranks, world.rank)
print(json.dumps({"world": [world.rank, world.size, world.local_rank, world.local_size],
                  "gathered": ranks, "backend_size": td.get_world_size()}))
td.barrier()
td.destroy_process_group()  # exiting with gloo's threads alive can abort the process
"""


def test_two_processes_with_only_open_mpi_variables_join_one_world():
    """What `mpirun -n 2` (or `deepspeed --launcher openmpi`) gives each process; before, both
    were rank 0 of a one-process world."""
    base = without_launcher_vars(os.environ)
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    procs = []
    for rank in (0, 1):
        env = {**base, "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
               "MASTER_PORT": str(_port())}
        if procs:  # both must name the same port
            env["MASTER_PORT"] = procs[0][1]
        procs.append((subprocess.Popen([sys.executable, "-c", _WORKER], env=env, cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), env["MASTER_PORT"]))
    outs = []
    for p, _ in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["world"] for o in outs] == [[0, 2, 0, 2], [1, 2, 1, 2]]
    assert all(o["gathered"] == [0, 1] and o["backend_size"] == 2 for o in outs)


def test_a_build_lock_left_by_a_killed_run_does_not_stop_the_next(tmp_path):
    """DeepSpeed JIT-compiles its CPU shared-memory all-reduce at init behind torch's lock file;
    a build killed midway leaves the lock, and every later init waited on it forever (how CI
    hung). vlp never uses that op, so init skips its build: no wait, nothing compiled."""
    ext = tmp_path / "torch_extensions"
    locks = [ext / SHM_OP / "lock", ext / "py311_cpu" / SHM_OP / "lock"]
    for lock in locks:  # torch's build folder, with and without its python/cuda level
        lock.parent.mkdir(parents=True)
        lock.touch()
    env = {**without_launcher_vars(os.environ), "TORCH_EXTENSIONS_DIR": str(ext),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import torch.distributed as td\nfrom vlp.engine import dist\n"
            "print(dist.init().size, td.get_backend())\ntd.destroy_process_group()")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["1", "gloo"]
    assert all(lock.exists() for lock in locks)
    assert not list(ext.rglob("*.so"))  # nothing was built
