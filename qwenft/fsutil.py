"""Atomic writes and file locks: files a person cares about are whole or absent, never half-written."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def umask_mode(mode: int) -> int:
    """mode as a plain open()/mkdir() would create it: mkstemp/mkdtemp make private 0600/0700."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def share_like_umask(folder: Path) -> None:
    """Give a finished mkdtemp-staged folder (and everything in it) the modes a plain mkdir/open
    would have, before it is renamed into place."""
    folder = Path(folder)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod(umask_mode(0o777 if p.is_dir() else 0o666))


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temporary file beside path, fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """atomic_write_text of data as indented UTF-8 JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on path (created if missing), held for the with-block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
