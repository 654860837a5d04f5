"""Fetch one pinned Debian package (a ``.deb`` from the Debian archive) and read files out of it.

A ``.deb`` is an ``ar`` archive whose ``data.tar.*`` member holds the installed files. The package is
downloaded once into ``cache_dir()/downloads`` (checked against its SHA-256 on every call, written
atomically) and never installed; ``$PYRO_IBDR_DEBIAN_MIRROR`` replaces the default mirror.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from pyro_ibdr.experiments.assets.fetch import cache_dir, sha256_of, write_atomic

DEFAULT_MIRROR = "http://deb.debian.org/debian"
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def fetch_deb(pool_path: str, sha256: str) -> Path:
    """The ``.deb`` at ``<mirror>/<pool_path>`` (e.g. ``pool/main/d/x/x_1.0_all.deb``), downloaded once.

    Raises:
        RuntimeError: the mirror cannot be reached or has no such file.
        ValueError: the file's SHA-256 is not ``sha256`` (delete it to download again).
    """
    downloads = cache_dir() / "downloads"
    target = downloads / Path(pool_path).name
    if not target.is_file():
        url = f"{os.environ.get('PYRO_IBDR_DEBIAN_MIRROR', DEFAULT_MIRROR).rstrip('/')}/{quote(pool_path)}"
        print(f"pyro_ibdr: downloading {url} into {downloads} ...", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=180) as response:
                write_atomic(response, target)
        except (urllib.error.URLError, OSError) as error:
            raise RuntimeError(f"could not download {url} ({error}); is the Debian archive reachable? "
                               "$PYRO_IBDR_DEBIAN_MIRROR names another mirror") from error
    digest = sha256_of(target)
    if digest != sha256.lower():
        raise ValueError(f"SHA-256 mismatch for {target}: expected {sha256}, got {digest}; delete the file to "
                         "download it again")
    return target


def _ar_members(raw: bytes, source: Path) -> dict[str, bytes]:
    if not raw.startswith(_AR_MAGIC):
        raise ValueError(f"{source} is not a Debian package (no ar archive header)")
    members, offset = {}, len(_AR_MAGIC)
    while offset + _AR_HEADER <= len(raw):
        header = raw[offset:offset + _AR_HEADER]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as error:
            raise ValueError(f"{source}: corrupt ar header of member {name!r}") from error
        start = offset + _AR_HEADER
        members[name] = raw[start:start + size]
        offset = start + size + (size % 2)  # members are padded to an even length
    return members


def deb_files(deb: Path, paths: Iterable[str]) -> dict[str, bytes]:
    """The contents of installed-file ``paths`` (e.g. ``usr/share/x/y.gz``) inside the ``.deb`` file ``deb``.

    Raises:
        ValueError: not a ``.deb`` or no data archive inside.
        FileNotFoundError: a path is not in the package.
    """
    deb = Path(deb)
    members = _ar_members(deb.read_bytes(), deb)
    data = next((members[name] for name in members if name.startswith("data.tar")), None)
    if data is None:
        raise ValueError(f"{deb} has no data.tar member: {sorted(members)}")
    wanted = {path.removeprefix("./"): path for path in paths}
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            handle = archive.extractfile(member) if member.isfile() and name in wanted else None
            if handle is not None:
                found[wanted[name]] = handle.read()
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise FileNotFoundError(f"{deb} does not contain {missing}")
    return found
