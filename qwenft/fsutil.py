"""Atomic writes and file locks: files a person cares about are whole or absent, never half-written."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from qwenft.errors import QwenftError


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


class AtomicOutput:
    """A temporary file beside target; commit() renames it into place, discard() deletes it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, umask_mode(0o666))  # as open() would create it, not mkstemp's 0600
        self.tmp = Path(tmp)
        self.fh: IO[bytes] = os.fdopen(fd, "wb", buffering=1 << 20)

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def check_out_path(out: Path, force: bool, *sources: Path) -> Path:
    """out, checked as a new .jsonl output: no folder, no source, not existing unless force."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".jsonl":
        raise QwenftError(
            f"output {out} must end in .jsonl", "qwenft writes JSON lines, e.g. -o data.jsonl"
        )
    if out.is_dir():
        raise QwenftError(f"output {out} is a folder", "give a file name, e.g. -o data.jsonl")
    for src in sources:
        with contextlib.suppress(OSError):
            if out.exists() and os.path.samefile(out, src):
                raise QwenftError(f"output {out} is the input file", "write to another file")
    if out.exists() and not force:
        raise QwenftError(
            f"{out} already exists", "pass --force to overwrite it, or pick another name"
        )
    return out


def refuse_existing(target: Path, hint: str, what: str = "already exists and is not empty") -> None:
    """QwenftError when target exists and is not an empty folder (nothing is overwritten)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise QwenftError(f"{target} {what}", hint)


@contextlib.contextmanager
def staged_dir(target: Path, *, replace: bool = False, hint: str = "") -> Iterator[Path]:
    """A folder is whole or absent: yield a fresh staging folder beside target to fill; when the
    block succeeds, give it umask modes and rename it into place; when it fails, delete it.

    An existing target that is not an empty folder is refused (QwenftError with hint) unless
    replace, in which case it is moved aside, and deleted once the new folder is in place.
    """
    target = Path(target)
    if not replace:
        refuse_existing(target, hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield stage
        share_like_umask(stage)
        if not replace:
            refuse_existing(target, hint)  # someone else may have made it meanwhile
        old = None
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
        try:
            os.rename(stage, target)
        except BaseException:
            if old is not None:
                os.rename(old / target.name, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
