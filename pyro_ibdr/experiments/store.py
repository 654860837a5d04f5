"""Where a grid keeps each unit's result and files, and the configuration that makes a result reusable.

Layout under the results folder, for a unit with key ``<task>__<method>__seed<s>``:

- ``runs/<key>.json``: the record (metrics, cost, history, ...) with the unit's full configuration
  (``config``) and its hash (``config_hash``);
- ``posteriors/<key>.pt``: the learned posterior (:func:`pyro_ibdr.checkpoint.save_checkpoint`);
- ``reliability/<key>.png``: its reliability diagram;
- ``resume/<key>-<hash>.pt``: the training snapshot while the unit trains (:mod:`pyro_ibdr.resume`);
- ``runs/old/<key>-<hash>.{json,pt,png}``: a record and files set aside because the configuration changed.

A stored record is reused only when its configuration hash equals the current one, so ``results.json`` never
pairs one configuration with another's numbers.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_json


@dataclass(frozen=True)
class Unit:
    """One training run: a method on a task with a seed."""

    task: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}__{self.method}__seed{self.seed}"


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a unit's configuration holds plain JSON values only, got a {type(value).__name__}: {value!r}")


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as JSON would read it back (paths as strings, tuples as lists, keys as strings).

    :raises TypeError: for a value that is not plain JSON (the message names it).
    """
    return json.loads(json.dumps(config, sort_keys=True, allow_nan=False, default=_plain))


def config_hash(config: dict[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of the canonical JSON of ``config`` (sorted keys, no spaces)."""
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"dotted.key: old → new"`` for every leaf that differs between two configurations."""
    before, after = _flatten(old), _flatten(new)
    return [f"{key}: {before.get(key, '(absent)')!r} → {after.get(key, '(absent)')!r}"
            for key in sorted(set(before) | set(after))
            if key not in before or key not in after or before[key] != after[key]]


class ResultStore:
    """One JSON record per finished unit under ``<folder>/runs/``, each written atomically, with the files
    the unit produced (see the module docstring for the layout).

    A unit whose record exists with the current configuration is finished; an interrupted grid resumes at
    the first unit without one (and that unit at its last training snapshot). Several processes (shards,
    machines on a shared file system) can fill one store: a process runs a unit only after :meth:`claim` created
    its claim file ``runs/<key>.claim`` exclusively (``O_CREAT | O_EXCL``), so no unit runs twice; the claim is
    removed when the record is saved or the run fails. A claim left by a crashed process keeps the unit from
    running until :meth:`release` removes it (the CLIs' ``--reclaim``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.runs = self.folder / "runs"

    def path(self, unit: Unit) -> Path:
        return self.runs / f"{unit.key}.json"

    def posterior_path(self, unit: Unit) -> Path:
        return self.folder / "posteriors" / f"{unit.key}.pt"

    def reliability_path(self, unit: Unit) -> Path:
        return self.folder / "reliability" / f"{unit.key}.png"

    def resume_path(self, unit: Unit, config: dict[str, Any]) -> Path:
        """The training snapshot of ``unit`` under ``config`` (another configuration never reads it)."""
        return self.folder / "resume" / f"{unit.key}-{config_hash(config)}.pt"

    def claim_path(self, unit: Unit) -> Path:
        return self.runs / f"{unit.key}.claim"

    def done(self, unit: Unit) -> bool:
        return self.path(unit).is_file()

    def claim(self, unit: Unit) -> bool:
        """Create the unit's claim file (who and when); False when another process holds it."""
        self.runs.mkdir(parents=True, exist_ok=True)
        try:
            handle = os.open(self.claim_path(unit), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as file:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, file)
        return True

    def release(self, unit: Unit) -> None:
        """Remove the unit's claim (no-op without one)."""
        self.claim_path(unit).unlink(missing_ok=True)

    def load(self, unit: Unit) -> dict[str, Any]:
        path = self.path(unit)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"result file {path} is corrupted ({error}); delete it to rerun that unit") from error

    def save(self, unit: Unit, record: dict[str, Any], config: dict[str, Any]) -> Path:
        """Write the record of ``unit`` with its configuration and the configuration's hash."""
        identity = {"task": unit.task, "method": unit.method, "seed": unit.seed}
        return write_json(self.path(unit), {**identity, **record, "config": canonical_config(config),
                                            "config_hash": config_hash(config)})

    def set_aside(self, unit: Unit, record: dict[str, Any]) -> Path:
        """Move the record of ``unit`` and its posterior and diagram to ``runs/old/<key>-<its hash>.*``; return
        the record's new path."""
        folder, stem = self.runs / "old", f"{unit.key}-{record.get('config_hash', 'unhashed')}"
        folder.mkdir(parents=True, exist_ok=True)
        for source, suffix in ((self.path(unit), ".json"), (self.posterior_path(unit), ".pt"),
                               (self.reliability_path(unit), ".png")):
            if source.is_file():
                os.replace(source, folder / f"{stem}{suffix}")
        return folder / f"{stem}.json"

    def clear_resume(self, unit: Unit, keep: Path | None = None) -> None:
        """Delete the training snapshots of ``unit`` (all but ``keep``)."""
        for path in (self.folder / "resume").glob(f"{glob.escape(unit.key)}-*.pt"):
            if path != keep:
                path.unlink()
