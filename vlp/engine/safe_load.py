"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling can call any function the file names (a checkpoint
whose `mp_rank_00_model_states.pt` reduces to `os.system` runs a shell command on `--resume`).
DeepSpeed reads its own files with `torch.load(weights_only=False)`. Here every `.pt` of a
checkpoint is read with `weights_only=True` and an allow-list of exactly the DeepSpeed classes its
ZeRO 0-3 checkpoints hold (found by saving fp32, bf16-autocast and native-bf16 ones; fp16's
loss scaler read from DeepSpeed's source); a file that needs anything else is refused with one
line naming it and what it asked for. `Engine.load` checks the whole folder first (so every rank
refuses, alike, before any state changes) and then lets DeepSpeed load inside
`weights_only_loads()`, which makes DeepSpeed's own `torch.load` calls weights-only too: a file
swapped in after the check is refused all the same.
"""
from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from vlp.config import ConfigError

_torch_load = torch.serialization.load  # the real one, whatever `torch.load` is bound to


class RefusedCheckpointError(ConfigError):
    """A checkpoint file that cannot be read safely (it needs more than tensors and the
    allow-listed DeepSpeed classes, or it is not a torch file)."""


def allowed_globals() -> list:
    """What DeepSpeed's own checkpoint files legitimately hold besides tensors and containers:
    the ZeRO stage (an enum), the loss scaler object (plain numbers; fp16 uses the dynamic one)
    and the partition map entries of ZeRO 1/2 (`param_slice_mappings`: a dataclass of two ints).
    Each is plain data: building them calls no function named by the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _names(globals_: list) -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in globals_}


def load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with the DeepSpeed allow-list; anything else is a
    `RefusedCheckpointError` naming the file (one line)."""
    allowed = allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return _torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise RefusedCheckpointError(_refusal(path, allowed, e)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # not a torch file, truncated
        raise RefusedCheckpointError(f"{path}: cannot read this checkpoint file ({_detail(e)}); "
                                     "resume from another checkpoint folder") from None


def _refusal(path, allowed: list, error: Exception) -> str:
    try:  # lists the globals by scanning the pickle's opcodes; runs nothing
        wanted = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - \
            _names(allowed)
    except Exception:  # noqa: BLE001 - not a pickle at all
        wanted = set()
    if not wanted:  # garbage, or a pickle torch cannot read weights-only for another reason
        return f"{path}: cannot read this checkpoint file ({_detail(error)}); resume from " \
               "another checkpoint folder"
    return (f"{path}: refused to load: it asks for {', '.join(sorted(wanted))}, which no "
            "vlp/DeepSpeed checkpoint holds (unpickling it could run code). Resume only from "
            "checkpoints a vlp run wrote.")


def _detail(error: Exception) -> str:
    """The informative line of torch's long weights-only message (or of any error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(error).__name__


def check_folder(folder: str | Path) -> list[Path]:
    """Read every `.pt` below `folder` weights-only (memory-mapped where the format allows, so
    the tensors are not read); the first one that cannot be is refused. Returns the files."""
    files = sorted(Path(folder).rglob("*.pt"))
    for f in files:
        load(f, mmap=zipfile.is_zipfile(f))  # mmap needs torch's zip format
    return files


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, `torch.load` (which DeepSpeed calls with `weights_only=False`) reads
    weights-only with the allow-list, whatever its caller asks for."""
    original = torch.load

    def forced(f, map_location=None, *_, mmap=None, **__):
        # whatever else the caller passed (weights_only=False, a pickle module) is overruled
        return load(f, map_location, mmap=bool(mmap))

    torch.load = forced
    try:
        yield
    finally:
        torch.load = original
