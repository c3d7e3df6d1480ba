"""Durable renames of whole folders: fsync a folder's files and the folder before it is renamed into
place and its parent after, and replace a folder that readers use (a run's ``model/``) so that a
kill at any moment leaves a complete one.

A folder is replaced by writing the new one beside it (``.<name>.new``) and swapping the two:
atomically where Linux's ``renameat2(RENAME_EXCHANGE)`` is available, else by renaming the old one
aside (``.<name>.old``) and the new one in, a window that :func:`recover_swap` closes the next
time the owner starts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_path(path: Path) -> None:
    """fsync one file or folder (folders are skipped on Windows, which cannot open them)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first (``root`` last)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def replace_durably(src: Path, dst: Path) -> None:
    """Rename the folder ``src`` (already fsynced) to ``dst`` and fsync the parent of ``dst``."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def staging_path(target: Path) -> Path:
    """Where the next version of ``target`` is written before it is swapped in."""
    return target.parent / f".{target.name}.new"


def aside_path(target: Path) -> Path:
    """Where the portable swap puts the old ``target`` while the new one is renamed in."""
    return target.parent / f".{target.name}.old"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def swap_folder(new: Path, target: Path) -> None:
    """Put the complete, fsynced folder ``new`` at ``target`` and delete the old one; at every
    moment ``target`` is the old folder or the new one (or, in the portable fallback between its
    two renames, the old one is at :func:`aside_path` and ``new`` is complete)."""
    parent = target.parent
    aside = aside_path(target)
    if target.exists():
        if _exchange(new, target):
            fsync_path(parent)
            shutil.rmtree(new)  # now the old folder
            return
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(new, target)
    fsync_path(parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_swap(target: Path) -> None:
    """Finish or undo a swap a kill interrupted, and delete its leftovers.

    ``target`` missing with both leftovers present: the portable swap stopped between its renames,
    after the new folder was complete, so the new one goes in. ``target`` missing with only the
    old one aside: that goes back. A staged folder without the old one aside may be incomplete and
    is deleted (the owner writes it again).
    """
    new, aside = staging_path(target), aside_path(target)
    if not target.exists():
        if aside.is_dir() and new.is_dir():
            replace_durably(new, target)
        elif aside.is_dir():
            replace_durably(aside, target)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)


def replace_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a new version of the folder ``target`` with ``write(folder)`` beside it, fsync it and
    swap it in (see :func:`swap_folder`); returns ``target``."""
    target = Path(target)
    recover_swap(target)
    staging = staging_path(target)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_tree(staging)
    swap_folder(staging, target)
    return target
