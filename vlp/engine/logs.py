"""A run's logs: `train_log.jsonl` (one JSON record per logging step, flushed as written) and,
optionally, TensorBoard events."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from vlp.config import ConfigError


class JsonlLog:
    """Append-only JSON-lines metrics log, flushed per record so a killed run keeps it."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._fh.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop records after `step`: a resumed run redoes those steps, and a log with two
    different step 7s would be wrong to plot."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= step and record.get("event") != "end":
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def check_tensorboard(enabled: bool) -> None:
    """Before any work: logging.tensorboard=true needs the package."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard (or set logging.tensorboard=false)")


class TensorBoardLog:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def write(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
