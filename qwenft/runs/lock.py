"""One writer per run folder, and which checkpoint of a run can be resumed from.

- `RunLock(run_dir, action)`: an exclusive, non-blocking `flock` on `run_dir/.qwenft.lock`, held for
  as long as the process holding it lives (the kernel drops it when the process dies, kill -9
  included: no stale locks). A second `train`/`resume` into a live run is refused (QwenftError,
  exit 2) naming the process. Pass `lock.fileno()` to `launcher.run(..., hold_fds=...)` and the
  supervisor keeps the lock until the last LLaMA-Factory process is gone, so no second writer can
  start while the workers of a killed qwenft are still being stopped.
- `run_is_live(run_dir)`: whether some process holds that lock now (`qwenft runs`, or telling a
  run marked "running" whose process died from a live one).
- `newest_complete_checkpoint(run_dir)`, `checkpoint_is_complete(path)`,
  `set_aside_incomplete_checkpoints(run_dir)`: a SIGTERM or kill that lands while `checkpoint-N`
  is being written leaves a folder LLaMA-Factory would pick (it takes the highest N) and fail on.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError

LOCK_NAME = ".qwenft.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # as transformers' get_last_checkpoint
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "model.safetensors",
    "adapter_model.bin",
    "pytorch_model.bin",
)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def pid_alive(pid: int) -> bool:
    """Whether pid is a running process on this machine (a zombie is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] not in "ZX"
    except (OSError, IndexError):
        return True


def describe_holder(info: dict[str, Any] | None) -> str:
    """'qwenft resume (pid 123 on host, since 2025-...)' from a lock file's record."""
    if not info:
        return "another qwenft process"
    action = info.get("action") or "qwenft"
    where = f"pid {info.get('pid', '?')}"
    if info.get("host") and info.get("host") != socket.gethostname():
        where += f" on {info['host']}"
    text = f"qwenft {action} ({where}, since {info.get('started', '?')})"
    if info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid") or 0)):
        text += "; that process has exited and its LLaMA-Factory processes are being stopped"
    return text


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    """The record the lock's holder wrote (pid, host, started, action, argv), or None."""
    try:
        data = json.loads((Path(run_dir) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """The one-writer lock of a run folder; a context manager (or acquire()/release()).

        with RunLock(run_dir, "resume") as lock:
            launcher.run(argv, env, log, hold_fds=[lock.fileno()], ...)

    acquire() raises QwenftError (exit 2) naming the holder when another process holds it; it
    retries for `wait_s` first (a `run_is_live` probe holds it for a few microseconds). The lock
    file is never deleted (deleting it would let two processes lock two different files)."""

    def __init__(self, run_dir: Path, action: str = "train", wait_s: float = 0.5) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.action = action
        self.wait_s = wait_s
        self._fd: int | None = None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the run lock is not held")
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            raise QwenftError(f"{self.run_dir} does not exist") from None
        except OSError as exc:
            raise QwenftError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise QwenftError(
                    f"{self.run_dir} is in use by {describe_holder(read_holder(self.run_dir))}",
                    "one process writes a run folder at a time: wait for it to end (or stop it), "
                    "then try again; `qwenft runs` shows which runs are live",
                ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "action": self.action,
            "argv": sys.argv,
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # nobody holds it now: no stale record
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_is_live(run_dir: Path) -> bool | None:
    """True when some process holds run_dir's lock now (a train/resume is writing it, or its
    LLaMA-Factory processes are still being stopped), False when nobody does; None when it cannot
    be told: no run folder, or no lock file (a run made before locks, or never launched), or the
    file cannot be opened. Works across processes (and, where flock does, across NFS clients)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a writer's LOCK_EX
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# checkpoints


def _safetensors_whole(path: Path) -> bool:
    """A .safetensors file is whole: its header parses and its size is header + every tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(fh.read(n))
        ends = [
            v["data_offsets"][1]
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)
        ]
        return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _weights_whole(folder: Path) -> bool:
    for name in WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            return _safetensors_whole(f) if name.endswith(".safetensors") else f.stat().st_size > 0
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return bool(shards) and all(
                _safetensors_whole(folder / s)
                if s.endswith(".safetensors")
                else (folder / s).is_file()
                for s in shards
            )
    # DeepSpeed ZeRO without gathered 16-bit weights keeps them only in global_step*/
    return any(p.is_dir() and any(p.iterdir()) for p in folder.glob("global_step*"))


def checkpoint_is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder was written to the end.

    transformers' `Trainer._save_checkpoint` (4.5x and the installed 5.x alike) writes, in this
    order: the model (`save_model`: adapter_model.safetensors + adapter_config.json for LoRA,
    model.safetensors or shards + model.safetensors.index.json for full/freeze, DeepSpeed's
    global_stepN/), then optimizer.pt, scheduler.pt, the scaler and rng_state*.pth, and last of
    all trainer_state.json (not atomically: open, write). So a folder counts as complete when its
    trainer_state.json is present and parses as a JSON object with a global_step, and its weights
    are whole (a safetensors file's size matches its header; every shard of an index exists).
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or "global_step" not in state:
        return False
    return _weights_whole(folder)


def checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint-N folder of run_dir, by step (the last is the one LLaMA-Factory picks)."""
    found = [
        p for p in Path(run_dir).glob("checkpoint-*") if CHECKPOINT_RE.match(p.name) and p.is_dir()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint-N folder with the highest N that is complete (checkpoint_is_complete), or
    None when there is none. A half-written newer folder is skipped, never chosen."""
    for folder in reversed(checkpoints(run_dir)):
        if checkpoint_is_complete(folder):
            return folder
    return None


def set_aside_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Rename every incomplete checkpoint-N folder to .incomplete-checkpoint-N (a name neither
    LLaMA-Factory's resume, which takes the highest checkpoint-N, nor transformers' rotation of
    old checkpoints matches); return the new paths. Call it only while holding the RunLock: a live
    training may be writing the newest folder."""
    moved = []
    for folder in checkpoints(run_dir):
        if checkpoint_is_complete(folder):
            continue
        target = folder.with_name(f".incomplete-{folder.name}")
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f".incomplete-{folder.name}.{n}")
        os.rename(folder, target)
        moved.append(target)
    return moved
