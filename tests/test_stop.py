"""Issue 17: stopping a launched run stops it, and one OUT holds one run at a time.

- A second run on an OUT that a run is using is refused (OUT/.lock), in one line.
- `kill -9 -- -PGID` of torchrun kills the launcher only (torchrun starts every rank in a
  session of its own); the orphaned ranks notice their launcher is gone, save a checkpoint and
  exit, instead of training on and racing a `--resume` started meanwhile, which then continues
  from that checkpoint to the end.
"""
import fcntl
import json
import os
import signal
import subprocess
import time

import pytest
from launch import ROOT, command, env, run, train_log

from vlp.cli import main
from vlp.data.synth import generate

TINY = ["--no-progress", "model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "tokenizer.vocab_size=200", "train.batch_size=8",
        "data.num_workers=1", "train.log_every=1", "eval.at_end=false", "train.threads=1",
        "train.save_every=2"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=64, val_images=8, benchmark_images=0, shard_size=16, progress=False)
    return root


def _wait_for_checkpoint(out, proc, timeout=240):
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not latest.is_file():
        time.sleep(0.05)
    assert latest.is_file(), "no checkpoint was written"


def _lock_free(out) -> bool:
    with open(out / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _processes_using(out) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if str(out) in line
            and "ps -eo" not in line]


def test_a_second_run_on_the_same_out_is_refused(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), f"data.train={shapes}/train", "train.steps=500",
            *TINY]
    proc = subprocess.Popen(command("python", 1, args), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_checkpoint(out, proc)
        assert main(["pretrain", "--out", str(out), "--resume", "latest"]) == 2
        err = capsys.readouterr().err
        assert "is in use by another run" in err and f"pid {proc.pid}" in err, err
    finally:
        proc.send_signal(signal.SIGTERM)  # saves a checkpoint and stops
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert proc.returncode == 130, output[-2000:]
    assert _lock_free(out)


def test_killing_the_launcher_group_stops_the_ranks(shapes, tmp_path):
    out = tmp_path / "run"
    steps = 100_000  # far more than 90 s of training: the ranks must stop, not finish
    args = ["pretrain", "--out", str(out), f"data.train={shapes}/train", f"train.steps={steps}",
            *TINY]
    proc = subprocess.Popen(command("torchrun", 2, args), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _wait_for_checkpoint(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # `kill -9 -- -PGID`: the launcher's group
    proc.communicate()
    deadline = time.time() + 90
    while time.time() < deadline and (_processes_using(out) or not _lock_free(out)):
        time.sleep(0.2)
    assert not _processes_using(out), "the ranks kept training after their launcher died"
    assert _lock_free(out)
    stopped = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    done = [r["step"] for r in train_log(out)]
    assert stopped == done[-1] < steps  # they saved where they stopped: nothing lost
    run("torchrun", 2, ["pretrain", "--out", str(out), "--resume", "latest",
                        f"train.steps={stopped + 4}"])
    assert [r["step"] for r in train_log(out)] == list(range(1, stopped + 5))
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == stopped + 4
