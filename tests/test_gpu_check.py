"""bench/gpu_check.sh on a machine without a CUDA GPU: one clear line, exit status 2, and
nothing else run (no output folder made)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is visible: the script would run its checks")


def _run(tmp_path: Path, python_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{python_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    proc = _run(tmp_path, Path(sys.executable).parent)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: needs a GPU: no CUDA device is visible here" in proc.stderr
    assert "CHECK" not in proc.stdout and not (tmp_path / "out").exists()


def test_without_torch_it_says_so_and_exits_2(tmp_path):
    bare = tmp_path / "bin"  # a `python` that cannot see the installed packages
    bare.mkdir()
    (bare / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bare / "python").chmod(0o755)
    proc = _run(tmp_path, bare)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: needs a GPU machine with vlp installed" in proc.stderr
    assert "torch does not import here" in proc.stderr and not (tmp_path / "out").exists()
