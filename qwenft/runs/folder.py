"""Run folders: naming a new one, creating it whole (staged, then renamed), finding them (under
folders the user names and in QWENFT_HOME's record), telling a live run from a dead one, removing."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, refuse_existing, staged_dir
from qwenft.paths import qwenft_home
from qwenft.runs.manifest import MANIFEST, Manifest, read_manifest
from qwenft.runs.watch import read_trainer_log


def default_run_dir(model_spec: str, method: str, root: Path | None = None) -> Path:
    """runs/<model>-<method>-<timestamp>/ under the current folder (or root)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_spec.rstrip("/")).name).strip("-").lower()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (root or Path("runs")) / f"{slug or 'model'}-{method}-{stamp}"


NEW_RUN_HINT = (
    "choose a new --output-dir (or omit it for a fresh runs/<model>-<method>-<time> folder)"
)


def check_new_run_dir(path: Path) -> None:
    """Refuse to reuse a folder: a run folder is never silently overwritten."""
    refuse_existing(path, NEW_RUN_HINT)


def create_run_dir(
    path: Path, files: dict[str, str], prepare: Callable[[Path], None] | None = None
) -> Path:
    """Create the run folder with its first files all at once (staged, then renamed).
    `prepare(stage)` may add more files to the staged folder before the rename."""
    with staged_dir(path, hint=NEW_RUN_HINT) as stage:
        for name, text in files.items():
            (stage / name).write_text(text, encoding="utf-8")
        if prepare:
            prepare(stage)
    record_run(path)
    return path.resolve()


def index_dir() -> Path:
    """QWENFT_HOME/runs: one small file per run qwenft created, wherever its folder is."""
    return qwenft_home() / "runs"


def _index_file(run_dir: Path) -> Path:
    run_dir = Path(run_dir).absolute()
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    return index_dir() / f"{run_dir.name[:60]}-{digest}.json"


def record_run(run_dir: Path) -> None:
    """Remember a new run folder in QWENFT_HOME, so `qwenft runs` finds it from anywhere."""
    atomic_write_json(_index_file(run_dir), {"run_dir": str(Path(run_dir).absolute())})


def recorded_runs() -> list[Path]:
    """The run folders recorded in QWENFT_HOME that still exist."""
    found = []
    for entry in sorted(index_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            path = Path(json.loads(entry.read_text(encoding="utf-8"))["run_dir"])
            if (path / MANIFEST).is_file():
                found.append(path)
    return found


def run_state(run_dir: Path, m: Manifest) -> str:
    """The manifest's status, except that a run marked running whose process is gone is `died`
    (killed with -9, out of memory, the machine went down). Liveness is the run folder's lock,
    which the kernel drops when its holder dies; a run started on another host is trusted."""
    from qwenft.runs.lock import pid_alive, run_is_live

    job = (m.launch or {}).get("job_id")
    if job and m.status in ("submitted", "running"):
        return _job_status(str(job), m.status)
    if m.status != "running" or (m.host and m.host != socket.gethostname()):
        return m.status
    live = run_is_live(run_dir)
    if live is None and m.pid:  # no lock file to ask: the process it recorded
        live = pid_alive(m.pid)
    return "died" if live is False else "running"


def _job_status(job_id: str, recorded: str) -> str:
    """A Slurm run's status from its job where the Slurm commands answer: pending while queued,
    failed when the job ended without its run finishing (scancel, time limit, a node lost)."""
    from qwenft.launch import slurm

    state = slurm.job_state(job_id)
    if state in ("pending", "running", "failed"):
        return state
    if state == "done" and recorded == "submitted":
        return "failed"  # the job ended before `qwenft start` recorded anything
    return recorded


def run_row(run_dir: Path, m: Manifest) -> dict[str, Any]:
    """The headline fields `qwenft runs` shows for one run."""
    log = read_trainer_log(run_dir)
    last = log[-1] if log else {}
    summary = m.summary or {}
    started = _parse_time(m.started)
    ended = _parse_time(m.ended)
    state = run_state(run_dir, m)
    if started is not None and ended is None and state == "running":
        ended = time.time()
    return {
        "run_dir": str(run_dir),
        "status": state,
        "stage": m.stage,
        "method": m.method,
        "parent_run": m.parent_run,
        "model": m.model.spec,
        "data": m.data_line(),
        "mixture": bool(m.sources or m.eval_data),  # several files or --eval-data
        "started": m.started,
        "steps_done": summary.get("global_step") or last.get("current_steps"),
        "steps_planned": last.get("total_steps"),
        "duration_s": round(ended - started) if started is not None and ended else None,
        "final_loss": m.final_loss,
        # qwenft export's verify: answers that ended on <|im_end|> (None: not measured yet)
        "stops": dataclasses.asdict(m.stopping) if m.stopping else None,
        "tracking": m.tracking,  # --report-to: tracker -> where to look
        "created": m.created,
        "log": m.log,
    }


def _parse_time(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def list_runs(roots: list[Path], *, recorded: bool = True) -> list[dict[str, Any]]:
    """Every run folder directly under each root, plus (recorded) those QWENFT_HOME knows, newest
    first, each once; folders whose manifest cannot be read are left out."""
    candidates = [
        p.parent.absolute() for root in roots if root.is_dir() for p in root.glob(f"*/{MANIFEST}")
    ]
    if recorded:
        candidates += recorded_runs()
    rows, seen = [], set()
    for run_dir in candidates:
        key = os.path.realpath(run_dir)
        if key in seen:
            continue
        seen.add(key)
        try:
            m = read_manifest(run_dir)
        except QwenftError:
            continue
        rows.append(run_row(run_dir, m))
    return sorted(rows, key=lambda r: r["created"] or "", reverse=True)


def remove_run(run_dir: Path) -> Path:
    """Delete a run folder that is not running: moved aside first (one rename), then removed,
    so it is never left half-deleted under its own name. A live run is refused."""
    run_dir = Path(run_dir).expanduser().absolute()
    m = read_manifest(run_dir)
    if run_state(run_dir, m) == "running":
        where = f"pid {m.pid} on {m.host}" if m.pid else "another process"
        raise QwenftError(
            f"{run_dir} is running ({where}); it was not removed",
            "stop it first (Ctrl-C in its terminal, or kill that process)",
        )
    trash = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.rm-", dir=run_dir.parent))
    os.rename(run_dir, trash / run_dir.name)
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _index_file(run_dir).unlink()
    return run_dir
