"""Append-only JSONL files that survive interruption: the one way stages stream records to disk.

Each record is one line, flushed and fsynced after every batch. A kill mid-write leaves at most
a torn last line, which :func:`read_jsonl` ignores and :func:`open_for_append` cuts off before
appending, so a resumed run neither duplicates nor loses finished records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mechsteer.core.errors import ArtefactError, ConfigError

LOCK_FILE = ".lock"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of ``path`` as dicts (none if it does not exist).

    A torn last line (no newline: a kill mid-write) is ignored, as resumption expects; a broken
    line anywhere else means the file was damaged afterwards, and raises :class:`ArtefactError`
    naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                break  # torn write from an interrupted run
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ArtefactError(
                    f"{path}, line {number}: not a JSON record ({error.msg} at column {error.colno}); the file "
                    f"was damaged after it was written: delete line {number} (a rerun redoes that record) "
                    "or the whole file"
                ) from None
            if not isinstance(record, dict):
                raise ArtefactError(f"{path}, line {number}: a {type(record).__name__}, not a JSON object; "
                                    f"delete line {number} or the whole file")
            records.append(record)
    return records


def read_json(path: str | Path, what: str) -> Any:
    """The JSON document at ``path``; a missing or corrupt file raises :class:`ArtefactError`
    saying which ``what`` (e.g. "activation manifest") it should have been."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} not found: no {what} there")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtefactError(f"{path} is corrupt ({error}); it should hold the {what}: rebuild it") from None


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


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON lines (as :func:`append_jsonl` writes them) to a temporary sibling and
    rename it into place."""
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


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


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, what: str = "mechsteer run") -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for one writer: a second writer, in this process or
    another, is refused in one line naming the holder's PID. The lock goes with the process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"{folder} is in use by another {what} (PID {holder}); wait for it to finish, or use "
                          "another --out") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield folder
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate ("\\ud800", from a JSON escape or a plug-in's data),
    which neither UTF-8 nor a tokenizer takes; None when it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def file_digests(folder: Path, *, skip_suffixes: tuple[str, ...] = (), skip_folders: tuple[str, ...] = (),
                 length: int = 16) -> dict[str, str]:
    """Each file under ``folder`` (its path relative to it, in POSIX form) -> the first ``length`` hex
    digits of the SHA-256 of its content; files with a suffix in ``skip_suffixes`` or under a folder
    named in ``skip_folders`` left out. Empty when ``folder`` does not exist."""
    digests = {}
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        relative = path.relative_to(folder)
        if not path.is_file() or path.suffix in skip_suffixes or any(part in skip_folders for part in relative.parts):
            continue
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        digests[relative.as_posix()] = sha.hexdigest()[:length]
    return digests


def json_digest(value: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value`` as key-sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]
