"""The one place that runs subprocesses (LLaMA-Factory's commands are built in qwenft.lf.launcher).

`run()` streams the child's output
live (progress bars intact) while logging it, and on Ctrl-C / SIGTERM / SIGHUP stops the child and
everything it started (torchrun and every worker) before returning. Every long child (`run()`,
`start()`) runs under qwenft/proc/supervise.py, so nothing it started outlives qwenft, even when
qwenft itself is killed with SIGKILL.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qwenft.errors import Interrupted, QwenftError, Stopped
from qwenft.proc import supervise

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


def format_command(argv: list[str], env: dict[str, str]) -> str:
    """A shell line a person can paste: VAR=value ... argv."""
    import shlex

    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


Runner = Callable[..., Any]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # a closed terminal = a SIGTERM
SUPERVISOR = Path(__file__).with_name("supervise.py")
ORPHAN_GRACE_S = 3.0  # when qwenft itself dies: SIGTERM, then SIGKILL after this


class _Discard:
    """An output that drops what it is given (a child's output that only its log keeps)."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def child_echo(verbose: bool) -> IO[bytes]:
    """Where a LLaMA-Factory child's output goes besides its log: stderr with -v, else nowhere
    (stdout carries only qwenft's results)."""
    return sys.stderr.buffer if verbose else _Discard()  # type: ignore[return-value]


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
    stats: dict[str, Any] | None = None,
    sample_every_s: float = 1.0,
    hold_fds: Sequence[int] = (),
) -> int:
    """Run argv with env added, tee its output to echo (stdout) and log_path, return its exit code.

    The child runs under the supervisor (see start()). On SIGINT/SIGTERM/SIGHUP the whole child tree
    gets SIGTERM (SIGKILL after grace_s) and Interrupted is raised once it is gone. `monitor` is
    polled while the child runs; when it returns a reason, the tree is stopped the same way and
    Stopped(reason) is raised.

    `stats`, when given, is filled (also when Interrupted/Stopped is raised) with the memory of the
    whole child tree, sampled every sample_every_s from /proc:
    `peak_rss_bytes` (the peak of the summed RSS of every process: all workers, not the largest),
    `peak_pss_bytes` (the same with shared pages split between the processes sharing them; None
    where /proc has no smaps_rollup), `max_processes` and `samples`.

    `hold_fds` (e.g. a RunLock's fileno()) stay open in the supervisor, not in the child, until the
    whole tree is gone: a run folder's lock outlives a killed qwenft until its workers are stopped.
    """
    reason = None
    memory = TreeMemory()
    try:
        with start(
            argv, env, log_path, cwd=cwd, echo=echo, popen=popen, grace_s=grace_s, hold_fds=hold_fds
        ) as proc:
            now = time.monotonic()
            next_check, next_sample = now + monitor_every_s, now
            while proc.poll() is None and proc.signalled is None and reason is None:
                now = time.monotonic()
                if now >= next_sample:
                    memory.sample(proc.pid, proc.supervised)
                    next_sample = now + sample_every_s
                if monitor and now >= next_check:
                    reason = monitor()
                    next_check = time.monotonic() + monitor_every_s
                time.sleep(0.1)
            code = proc.close()  # after a stop: SIGTERM the tree, SIGKILL what outlives grace_s
    finally:
        if stats is not None:
            stats.update(memory.as_dict())
    if reason:
        raise Stopped(reason)
    if proc.signalled is not None:
        raise Interrupted(f"stopped by {signal.Signals(proc.signalled).name}")
    return code


class TreeMemory:
    """The peak of the summed memory of a child tree, sampled from /proc."""

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_pss: int | None = None
        self.max_processes = 0
        self.samples = 0

    def sample(self, root: int, supervised: bool) -> None:
        pids = supervise.descendants(root)  # the supervisor itself (a small python) left out
        if not supervised:
            pids = [root, *pids]
        if not pids:
            return
        rss, pss = supervise.tree_memory(pids)
        self.samples += 1
        self.max_processes = max(self.max_processes, len(pids))
        self.peak_rss = max(self.peak_rss, rss)
        if pss is not None:
            self.peak_pss = max(self.peak_pss or 0, pss)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": self.peak_rss or None,
            "peak_pss_bytes": self.peak_pss,
            "max_processes": self.max_processes,
            "samples": self.samples,
        }


def _signal_group(proc: Any, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
    """A child started by start(), under the supervisor, its output pumped to echo and a log.

    While it is open, SIGINT/SIGTERM/SIGHUP send SIGTERM to the supervisor, which stops the whole
    tree (a second signal: at once), and set `signalled`; the caller decides what that means.
    close() stops whatever is left. Without the supervisor (start(..., supervised=False)) the
    child's process group is signalled instead.
    """

    def __init__(
        self,
        proc: Any,
        log: IO[bytes] | None,
        echo: IO[bytes],
        grace_s: float,
        supervised: bool = False,
    ) -> None:
        self.proc, self.grace_s, self.signalled = proc, grace_s, None
        self.supervised = supervised
        self._log, self._echo = log, echo
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

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
        first = self.signalled is None
        if first:
            self.signalled = signum
        if self.supervised:  # the supervisor: a first SIGTERM stops the tree, a second kills it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.proc.pid, signal.SIGTERM)
        else:
            _signal_group(self.proc, signal.SIGTERM if first else signal.SIGKILL)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        """Wait for the child to end (a signal ends it); after a signal, for its whole tree too."""
        code = self.proc.wait()
        if self.signalled is not None:
            code = stop_group(self.proc, self.grace_s, supervised=self.supervised)
        return code

    def close(self) -> int:
        """Stop the tree if anything of it is left, flush the output, restore signal handlers."""
        try:
            code = stop_group(self.proc, self.grace_s, supervised=self.supervised)
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


def supervised_argv(argv: list[str], grace_s: float) -> list[str]:
    """argv run under qwenft/proc/supervise.py, bound to this process (see that module)."""
    return [
        sys.executable,
        str(SUPERVISOR),
        "--parent",
        str(os.getpid()),
        "--grace",
        f"{grace_s:g}",
        "--orphan-grace",
        f"{min(grace_s, ORPHAN_GRACE_S):g}",
        "--",
        *argv,
    ]


def _check_program(program: str, path: str) -> None:
    """QwenftError when program cannot be started (the supervisor would only say so later)."""
    found = program if os.sep in program else shutil.which(program, path=path)
    if not found or not os.path.isfile(found):
        raise QwenftError(
            f"cannot start {program}: [Errno 2] No such file or directory", SETUP_HINT
        )
    if not os.access(found, os.X_OK):
        raise QwenftError(f"cannot start {program}: [Errno 13] Permission denied", SETUP_HINT)


def start(
    argv: list[str],
    env: dict[str, str],
    log_path: Path | None = None,
    *,
    cwd: Path | None = None,
    echo: IO[bytes] | None = None,
    popen: Runner = subprocess.Popen,
    grace_s: float = 20.0,
    supervised: bool = True,
    hold_fds: Sequence[int] = (),
) -> Process:
    """Start argv (env added) and return at once; see Process.

    The child runs under qwenft/proc/supervise.py, in a session of its own: when this process dies
    in any way (kill -9 included), the supervisor stops every process the child started, workers
    in sessions of their own included, within a few seconds. Call it from the main thread: the
    kernel's parent-death signal follows the thread that started the child (the supervisor tells a
    thread's exit from the process's, but only the main thread's handlers catch SIGTERM/SIGHUP).
    """
    echo = echo if echo is not None else sys.stdout.buffer
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    bin_dir = str(Path(argv[0]).parent) if os.sep in argv[0] else None
    if bin_dir:
        full_env["PATH"] = os.pathsep.join([bin_dir, full_env.get("PATH", "")])
    if supervised:
        _check_program(argv[0], full_env.get("PATH", ""))
        argv = supervised_argv(argv, grace_s)
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
            **({"pass_fds": tuple(hold_fds)} if hold_fds else {}),
        )
    except OSError as exc:
        if log:
            log.close()
        raise QwenftError(f"cannot start {argv[0]}: {exc}", SETUP_HINT) from exc
    return Process(proc, log, echo, grace_s, supervised)


def stop_group(proc: Any, grace_s: float = 20.0, *, supervised: bool = False) -> int:
    """Stop the child and everything it started; its exit code once all of it is gone.

    Supervised: SIGTERM the supervisor, which stops the tree (SIGKILL after grace_s) and then
    exits; should it not, its descendants and it are SIGKILLed from here. Otherwise: SIGTERM the
    child's process group and wait until every member is gone (SIGKILL after grace_s)."""
    if supervised:
        if proc.poll() is not None:
            return int(proc.returncode)  # the supervisor only ends once the tree is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return int(proc.wait(timeout=grace_s + 10))
        except subprocess.TimeoutExpired:
            supervise.kill_tree(proc.pid, signal.SIGKILL, include_root=True)
            return int(proc.wait())
    if proc.poll() is not None and not _group_alive(proc.pid):
        return int(proc.returncode)
    _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return int(proc.returncode)
        time.sleep(0.2)
    _signal_group(proc, signal.SIGKILL)
    return int(proc.wait())
