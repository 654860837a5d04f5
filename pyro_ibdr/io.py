"""Atomic file writing: every writer goes through a temporary sibling and ``os.replace``.

A reader therefore sees either the old file or the complete new one, never a partial write; on failure the
temporary file is removed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path`` atomically.

    Missing parent folders are created. Text mode writes UTF-8 with ``\\n`` line endings.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``folder``; on success it takes the place of ``folder``.

    An existing ``folder`` is moved aside first and deleted once the new one is in place (a directory
    cannot be replaced by one ``rename`` when the target is not empty).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(folder)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if folder.exists():
            old = _temporary_sibling(folder)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (non-finite floats are rejected: they are not JSON)."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    with atomic_write(path) as handle:
        handle.write(text + "\n")
    return Path(path)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows of a table as CSV; the header is the union of the rows' keys in first-seen order."""
    if not rows:
        raise ValueError("write_csv needs at least one row")
    header = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
