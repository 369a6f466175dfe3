"""Reading the files that benchmark metrics score: predictions and official annotations.

Every problem is raised as `EvalError` with the file, the record and the field named, so the
`vlp eval` command can print one clear line instead of a stack trace.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class EvalError(ValueError):
    """Predictions or annotations that cannot be scored, or a tool the metric needs is missing;
    the message names the file, the field and the value, and the fix."""


def describe(source: Any) -> str:
    """How a source is named in error messages: its path, or "<in-memory list>"."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<in-memory {type(source).__name__}>"


def load_json(source: Any, expect: type) -> Any:
    """A loaded object as is, or the JSON file at path `source`; its top level must be `expect`
    (dict or list)."""
    if isinstance(source, (str, os.PathLike)):
        text = Path(source).read_text()  # FileNotFoundError names the path
        try:
            source_obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"{source}: not valid JSON ({e})") from None
    else:
        source_obj = source
    if not isinstance(source_obj, expect):
        raise EvalError(f"{describe(source)}: expected a JSON {_json_kind(expect)} at the top "
                        f"level, found a {_json_kind(type(source_obj))}")
    return source_obj


def load_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise EvalError(f"{path}:{number}: expected a JSON object, found a "
                                f"{_json_kind(type(obj))}")
            rows.append((number, obj))
    return rows


def field(record: dict, name: str, types: type | tuple[type, ...], where: str) -> Any:
    """record[name], checked to be of `types` (bool is never accepted as a number)."""
    if name not in record:
        raise EvalError(f"{where}: missing field {name!r} (has: {sorted(record)})")
    value = record[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        want = " or ".join(_json_kind(t) for t in _tuple(types))
        article = "an" if want[0] in "aeiou" else "a"
        raise EvalError(f"{where}: field {name!r} must be {article} {want}, got {value!r}")
    return value


def require_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise EvalError(f"{where}: expected a JSON object, got {value!r}")
    return value


def id_list(ids, limit: int = 5) -> str:
    """The first few ids of a collection for a message: "3 (e.g. 1, 7, 9)"."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"{len(ids)} (e.g. {shown})" if len(ids) > limit else f"{len(ids)} ({shown})"


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _json_kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            bool: "boolean", type(None): "null"}.get(t, t.__name__)
