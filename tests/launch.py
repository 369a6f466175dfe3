"""Helpers for the tests that launch real multi-process `vlp` runs (deepspeed's launcher,
torchrun, or one plain process) on CPU/gloo."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vlp.engine.dist import without_launcher_vars

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, nproc: int, args: list[str]) -> list[str]:
    """`vlp ARGS` under `launcher` (deepspeed, torchrun, or python: one process)."""
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", "vlp", *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "vlp", *args]
    return [sys.executable, "-m", "vlp", *args]


def env() -> dict:
    # not this pytest process's one-process world, if an in-process run made one
    out = without_launcher_vars(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def run(launcher: str, nproc: int, args: list[str], timeout: int = 300):
    proc = subprocess.run(command(launcher, nproc, args), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_log(out: Path) -> list[dict]:
    """The per-step records of OUT/train_log.jsonl."""
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "event" not in r]


def kill_after_checkpoint(launcher: str, nproc: int, args: list[str], out: Path,
                          step: int) -> None:
    """Start `vlp ARGS` (which write to `out`), SIGKILL the launcher, its ranks and their loader
    workers as soon as the step-`step` checkpoint is published, and check it died there."""
    proc = subprocess.Popen(command(launcher, nproc, args),
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == f"step_{step:08d}":
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    assert step in [r["step"] for r in train_log(out)]
