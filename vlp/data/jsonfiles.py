"""Reading a benchmark's JSON and JSON-lines files with errors that name the file, the line
and the missing field."""
from __future__ import annotations

import json
from pathlib import Path

from vlp.config import ConfigError


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


def read_config_json(path: str | Path) -> dict:
    """A checkpoint's config.json (Hugging Face or vlp) as a dict; an unreadable file is one
    ConfigError naming it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def typed_fields(raw: dict, defaults: dict, where: str) -> dict:
    """`defaults`' keys taken from `raw` (a None or absent value keeps the default), each
    checked to have its default's type (an int where the default is an int, a number for a
    float, a string for a string); a wrong one is a ConfigError naming `where`.key."""
    out = {}
    for key, default in defaults.items():
        value = raw.get(key)
        if value is None:
            out[key] = default
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            kind = {bool: "a boolean", int: "an integer", float: "a number",
                    str: "a string"}[type(default)]
            raise ConfigError(f"{where}.{key}={value!r} must be {kind}")
        out[key] = value
    return out
