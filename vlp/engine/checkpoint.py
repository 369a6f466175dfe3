"""Crash-safe checkpoint folders, and loading one on another number of processes.

Each checkpoint is written into `<name>.tmp/`, flushed, then renamed to `<name>/`; only after
that does the `latest` pointer move (written to a temporary file and `os.replace`d, which is
atomic on POSIX). A crash at any moment leaves the previous checkpoint and pointer intact.

`load_resharded` loads a checkpoint that another number of processes wrote: ZeRO 1-3 keep
each process's partition of the fp32 weights and AdamW moments in its own file, so rank 0
first merges them per parameter with DeepSpeed's universal checkpoint converter
(deepspeed/checkpoint/ds_to_universal.py, into `<checkpoint>/universal/`, removed after the
load) and every rank then takes its new partition from that (`load_universal`). Nothing of
the optimizer is reset.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from vlp.config import ConfigError
from vlp.engine import dist, safe_load

if TYPE_CHECKING:
    from vlp.engine.engine import Engine

LATEST = "latest"
UNIVERSAL = "universal"


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


def _to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of `folder` at `out` (its output chatter captured).
    `inject_missing_state`: our checkpoints lack the Megatron-only `universal_checkpoint_info`,
    which the converter then fills in with its defaults (no tensor/pipeline parallelism)."""
    from deepspeed.checkpoint import ds_to_universal

    if out.parent.exists():  # left over from an interrupted conversion
        shutil.rmtree(out.parent)
    out.parent.mkdir()
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1,  # in-process
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
            safe_load.weights_only_loads():
        ds_to_universal.main(args)


def load_resharded(engine: "Engine", folder: Path, saved_world: int,
                   world: dist.World) -> str:
    """Load checkpoint `folder`, written by `saved_world` processes, into `engine` running on
    `world` (another number; every rank calls this). Returns what was done, for the log."""
    folder = Path(folder)
    if not any(folder.glob("*optim_states.pt")):
        # ZeRO-0 (DeepSpeed's native bf16 aside, which partitions its fp32 copies): nothing
        # partitioned, the optimizer state is in the model file, which loads on any number
        engine.load(folder)
        return "ZeRO-0: nothing partitioned, optimizer state loaded as saved"
    safe_load.check_folder(folder)  # every rank refuses alike, before any state changes
    out = folder / UNIVERSAL / folder.name
    error = None
    if world.is_main:
        try:
            _to_universal(folder, out)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {e}"
    error = dist.all_gather_object(error, world)[0]  # also the barrier before the loads
    if error:
        raise ConfigError(f"cannot re-shard {folder} (ZeRO-{engine.zero_stage}, written by "
                          f"{saved_world} processes) for {world.size}: DeepSpeed's universal "
                          f"checkpoint conversion failed ({error}); resume it with "
                          f"{saved_world} processes")
    ds = engine.ds
    # DeepSpeed reads this config flag when loading (engine.load_universal_checkpoint()), not
    # when it builds the engine, so it is set for this one load only
    ds._config.load_universal_checkpoint = True
    try:
        with safe_load.weights_only_loads():
            path, _ = ds.load_checkpoint(str(out.parent), tag=out.name)
    finally:
        ds._config.load_universal_checkpoint = False
    dist.barrier()
    if world.is_main:
        shutil.rmtree(out.parent)
    if path is None:
        raise FileNotFoundError(f"{out} holds no DeepSpeed checkpoint this run can load")
    return (f"ZeRO-{engine.zero_stage} partitions re-sharded through DeepSpeed's universal "
            "checkpoint (fp32 weights, AdamW moments and step, LR schedule carried over)")
