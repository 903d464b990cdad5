"""Append-only JSONL files that survive interruption: the one way stages stream records to disk.

Each record is one line, flushed and fsynced after every batch. A kill mid-write leaves at most
a torn last line, which :func:`read_jsonl` ignores and :func:`open_for_append` cuts off before
appending, so a resumed run neither duplicates nor loses finished records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of ``path`` as dicts (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open() as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn write from an interrupted run
            records.append(json.loads(line))
    return records


def truncate_torn_tail(path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably (flush + fsync), after cutting any torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truncate_torn_tail(path)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def json_digest(value: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value`` as key-sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]
