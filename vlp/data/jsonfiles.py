"""Reading a benchmark's JSON and JSON-lines files with errors that name the file, the line
and the missing field."""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, what: str):
    """A JSON file, or a clear error naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{what}: {path} line {n} is not valid JSON ({e})") from None
    return rows


def require(record: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; it has {sorted(record)}")
