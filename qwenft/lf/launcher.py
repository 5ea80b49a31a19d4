"""Commands for llamafactory-cli, built as pure argv/env, and the one place that runs subprocesses.

`build_*` functions are pure and tested apart from `run()`. `run()` streams the child's output
live (progress bars intact) while logging it, runs the child in its own process group, and on
Ctrl-C / SIGTERM stops that whole group (torchrun and every worker) before returning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qwenft.errors import Interrupted, QwenftError, Stopped

SETUP_HINT = "run `make setup` (or `scripts/setup_env.sh`) and use .venv/bin/qwenft"


@dataclass
class Captured:
    """What a short command printed, and how it ended."""

    returncode: int
    stdout: str
    stderr: str


def capture(argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Captured:
    """Run a short command to read its output (probes, nvidia-smi, pip download): no shell, no
    exception for a non-zero exit; a command that cannot start or times out gives code 127/124."""
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **env} if env else None,
        )
    except subprocess.TimeoutExpired:
        return Captured(124, "", f"{argv[0]} did not finish in {timeout_s:g} s")
    except OSError as exc:
        return Captured(127, "", f"cannot run {argv[0]}: {exc}")
    return Captured(proc.returncode, proc.stdout, proc.stderr)


def detect_gpus() -> list[dict[str, Any]]:
    """Visible NVIDIA GPUs (name, memory GiB, compute capability) via nvidia-smi; [] if none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    out = capture(
        [exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"], 20
    )
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, mem, cap = (x.strip() for x in line.split(","))
        gpus.append({"name": name, "memory_gib": float(mem) / 1024, "compute_cap": float(cap)})
    return gpus


def find_llamafactory_cli() -> str:
    """Path of llamafactory-cli: on PATH first, then beside this interpreter (an unactivated venv)."""
    found = shutil.which("llamafactory-cli")
    if found:
        return found
    beside = Path(sys.executable).parent / "llamafactory-cli"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise QwenftError("llamafactory-cli was not found", SETUP_HINT)


@dataclass
class Distributed:
    """How many processes per node and nodes; maps to LLaMA-Factory's torchrun variables."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    force_torchrun: bool = False

    def env(self) -> dict[str, str]:
        if not (self.force_torchrun or self.nproc_per_node > 1 or self.nnodes > 1):
            return {}
        env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(self.nproc_per_node)}
        if self.nnodes > 1:
            env.update(NNODES=str(self.nnodes), NODE_RANK=str(self.node_rank))
        if self.master_addr:
            env["MASTER_ADDR"] = self.master_addr
        if self.master_port:
            env["MASTER_PORT"] = str(self.master_port)
        return env


def offline_env(model_kind: str) -> dict[str, str]:
    """Local and embedded models never need the hub: say so, so nothing waits on the network."""
    if model_kind in ("tiny", "local"):
        return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return {}


def build_train_command(
    cli: str, yaml_path: Path, dist: Distributed, model_kind: str
) -> tuple[list[str], dict[str, str]]:
    """argv and the environment variables qwenft sets for `llamafactory-cli train`."""
    env = {**offline_env(model_kind), **dist.env()}
    return [cli, "train", str(yaml_path)], env


def build_export_command(
    cli: str, yaml_path: Path, model_kind: str
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for `llamafactory-cli export` (merging an adapter)."""
    return [cli, "export", str(yaml_path)], offline_env(model_kind)


def format_command(argv: list[str], env: dict[str, str]) -> str:
    """A shell line a person can paste: VAR=value ... argv."""
    import shlex

    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


Runner = Callable[..., Any]


def run(
    argv: list[str],
    env: dict[str, str],
    log_path: Path | None = None,
    *,
    cwd: Path | None = None,
    echo: IO[bytes] | None = None,
    popen: Runner = subprocess.Popen,
    grace_s: float = 20.0,
    monitor: Callable[[], str | None] | None = None,
    monitor_every_s: float = 2.0,
) -> int:
    """Run argv with env added, tee its output to echo (stdout) and log_path, return its exit code.

    On SIGINT/SIGTERM the child's whole process group gets SIGTERM (SIGKILL after grace_s) and
    Interrupted is raised once it is gone. `monitor` is polled while the child runs; when it
    returns a reason, the group is stopped the same way and Stopped(reason) is raised.
    """
    reason = None
    with start(argv, env, log_path, cwd=cwd, echo=echo, popen=popen, grace_s=grace_s) as proc:
        next_check = time.monotonic() + monitor_every_s
        while proc.poll() is None and proc.signalled is None and reason is None:
            if monitor and time.monotonic() >= next_check:
                reason = monitor()
                next_check = time.monotonic() + monitor_every_s
            time.sleep(0.1)
        code = proc.close()  # after a stop: SIGTERM the group, SIGKILL what outlives grace_s
    if reason:
        raise Stopped(reason)
    if proc.signalled is not None:
        raise Interrupted(f"stopped by {signal.Signals(proc.signalled).name}")
    return code


def _signal_group(proc: Any, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group(proc: Any, grace_s: float | None) -> int:
    """Wait for the child; after a stop, make sure no process of its group outlives it."""
    if grace_s is None:
        return proc.wait()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return proc.returncode
        time.sleep(0.2)
    _signal_group(proc, signal.SIGKILL)
    return proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------------------------------
# long-running children (servers): start now, wait later


class Process:
    """A child started by start(): in its own process group, its output pumped to echo and a log.

    While it is open, SIGINT/SIGTERM send SIGTERM to the child's group (a second one: SIGKILL) and
    set `signalled`; the caller decides what that means. close() stops whatever is left.
    """

    def __init__(self, proc: Any, log: IO[bytes] | None, echo: IO[bytes], grace_s: float) -> None:
        self.proc, self.grace_s, self.signalled = proc, grace_s, None
        self._log, self._echo = log, echo
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
            }

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def _copy_output(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            with contextlib.suppress(ValueError, OSError):
                self._echo.write(chunk)
                self._echo.flush()
            if self._log:
                with contextlib.suppress(ValueError, OSError):
                    self._log.write(chunk)
                    self._log.flush()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signalled is not None:  # a second Ctrl-C: no more waiting
            _signal_group(self.proc, signal.SIGKILL)
            return
        self.signalled = signum
        _signal_group(self.proc, signal.SIGTERM)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        """Wait for the child to end (a signal ends it); after a signal, for its whole group too."""
        code = self.proc.wait()
        if self.signalled is not None:
            code = stop_group(self.proc, self.grace_s)
        return code

    def close(self) -> int:
        """Stop the group if anything of it is left, flush the output, restore signal handlers."""
        try:
            code = stop_group(self.proc, self.grace_s)
            self._pump.join(timeout=5)
        finally:
            for s, handler in self._old.items():
                signal.signal(s, handler)
            self._old = {}
            if self._log:
                self._log.close()
                self._log = None
        return code

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start(
    argv: list[str],
    env: dict[str, str],
    log_path: Path | None = None,
    *,
    cwd: Path | None = None,
    echo: IO[bytes] | None = None,
    popen: Runner = subprocess.Popen,
    grace_s: float = 20.0,
) -> Process:
    """Start argv (env added) in its own process group and return at once; see Process."""
    echo = echo if echo is not None else sys.stdout.buffer
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    bin_dir = str(Path(argv[0]).parent) if os.sep in argv[0] else None
    if bin_dir:
        full_env["PATH"] = os.pathsep.join([bin_dir, full_env.get("PATH", "")])
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed by Process.close
    try:
        proc = popen(
            argv,
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        if log:
            log.close()
        raise QwenftError(f"cannot start {argv[0]}: {exc}", SETUP_HINT) from exc
    return Process(proc, log, echo, grace_s)


def stop_group(proc: Any, grace_s: float = 20.0) -> int:
    """SIGTERM the child's process group, wait until every member is gone (SIGKILL after grace_s)."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return int(proc.returncode)
    _signal_group(proc, signal.SIGTERM)
    return int(_wait_group(proc, grace_s))
