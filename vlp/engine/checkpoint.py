"""Crash-safe checkpoint folders.

Each checkpoint is written into `<name>.tmp/`, flushed, then renamed to `<name>/`; only after
that does the `latest` pointer move (written to a temporary file and `os.replace`d, which is
atomic on POSIX). A crash at any moment leaves the previous checkpoint and pointer intact.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(root: Path, name: str) -> Path:
    """A fresh temporary folder to write checkpoint `name` into."""
    tmp = root / f"{name}.tmp"
    if tmp.exists():  # left over from a crash mid-save
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, name: str, keep: int) -> Path:
    """Publish `<name>.tmp` as `<name>`, point `latest` at it, prune to the newest `keep`."""
    tmp, final = root / f"{name}.tmp", root / name
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f"{LATEST}.tmp"
    pointer.write_text(name + "\n")
    with open(pointer, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    if keep > 0:
        done = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            if old.name != name:
                shutil.rmtree(old)
    return final


def resolve(path: str | Path) -> Path:
    """`DIR/latest` or a checkpoints folder with a `latest` pointer -> the checkpoint folder."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        path = path.parent
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no checkpoint at {path}: expected a checkpoint folder or a folder "
                            f"holding a '{LATEST}' pointer (e.g. OUT/checkpoints)")
