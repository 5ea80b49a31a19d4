"""The supervisor between qwenft and every long-running child: nothing outlives the qwenft that
started it, whatever happens to qwenft (kill -9, the OOM killer, a closed terminal).

    python qwenft/proc/supervise.py --parent PID [--grace S] [--orphan-grace S] -- ARGV...

Why a process of its own: LLaMA-Factory starts torchrun, and torch elastic starts each worker in a
new session (`start_new_session=True` in torch.distributed.elastic.multiprocessing.subprocess_handler),
so a process-group kill misses the workers, and the kernel's parent-death signal
(PR_SET_PDEATHSIG) only covers a direct child. The supervisor

- makes itself a child subreaper (PR_SET_CHILD_SUBREAPER): every descendant that loses its parent
  is reparented to it, never to init, so its descendants are always found by walking /proc;
- arms PR_SET_PDEATHSIG, and then compares getppid() with --parent, closing the race where qwenft
  died before the signal was armed (and telling a mere exit of the thread that forked it, which
  also fires the signal, from the death of qwenft, which changes the parent);
- runs ARGV in a process group of its own, with PR_SET_PDEATHSIG=SIGKILL on that direct child too
  (if the supervisor itself were SIGKILLed, LLaMA-Factory's main process still dies);
- on SIGTERM, SIGINT or SIGHUP, or when qwenft dies, sends SIGTERM to the child's group and to every
  other descendant, waits up to --grace seconds (--orphan-grace when qwenft died: nobody waits for
  a clean end then), and SIGKILLs whatever is left; a second signal SIGKILLs at once;
- when the child ends on its own, stops whatever it left behind the same way;
- reaps every process reparented to it, and ends as its child ended: the same exit code, or killed
  by the same signal, so to the caller it looks like the child itself.

It imports only the standard library (it starts before every LLaMA-Factory launch) and writes
nothing to the output it shares with the child except a line when ARGV cannot be started (exit 127).
`descendants`, `tree_memory` and `kill_tree` are also used by qwenft.proc.launcher. Linux only: on
another system the prctl calls are skipped and the parent is watched by polling getppid().
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PARENT_DEATH_SIGNAL = (
    signal.SIGUSR2
)  # only ever sent by the kernel; the supervisor checks getppid()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.05


def prctl(option: int, value: int) -> bool:
    """prctl(option, value) through libc; False where it is not available (not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# the process table, from /proc


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, state) of pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # the name (in parentheses) may hold spaces
    try:
        return int(fields[1]), int(fields[2]), fields[0].decode()
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, tuple[int, int, str]]:
    """{pid: (ppid, pgid, state)} of every process visible in /proc."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def descendants(root: int, *, live_only: bool = True) -> list[int]:
    """Every process below root (children first, then theirs); zombies left out unless asked."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, queue = [], list(children.get(root, []))
    while queue:
        pid = queue.pop(0)
        found.append(pid)
        queue.extend(children.get(pid, []))
    if live_only:
        found = [p for p in found if table[p][2] not in ("Z", "X")]
    return found


def _status_kib(pid: int, key: bytes) -> int:
    """A `Key:   N kB` line of /proc/PID/status (VmRSS, VmHWM) in KiB; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(key + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def tree_memory(pids: list[int]) -> tuple[int, int | None]:
    """(summed RSS, summed PSS or None) of pids, in bytes, read now from /proc.

    RSS counts pages shared between processes (the torch libraries every worker maps) once per
    process; PSS splits them between the processes sharing them, so its sum is what the tree
    really occupies. PSS needs /proc/PID/smaps_rollup (Linux 4.14+)."""
    rss = pss = 0
    pss_known = True
    for pid in pids:
        rss += _status_kib(pid, b"VmRSS")
        p = _pss_kib(pid) if pss_known else None
        if p is None:
            pss_known = False
        else:
            pss += p
    return rss * 1024, (pss * 1024 if pss_known else None)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(root: int, sig: int, *, include_root: bool = False) -> list[int]:
    """Send sig to every live descendant of root (and root itself if asked); the pids signalled."""
    pids = descendants(root)
    for pid in pids:
        _kill(pid, sig)
    if include_root:
        _kill(root, sig)
    return pids


# --------------------------------------------------------------------------------------------------
# the supervisor


class Supervisor:
    def __init__(self, argv: list[str], parent: int, grace_s: float, orphan_grace_s: float) -> None:
        self.argv, self.parent = argv, parent
        self.grace_s, self.orphan_grace_s = grace_s, orphan_grace_s
        self.stop_signal: int | None = None  # SIGTERM/SIGINT/SIGHUP received
        self.signals_seen = 0
        self.child: subprocess.Popen | None = None
        self.status: int | None = None  # the child's wait status, once reaped

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.signals_seen += 1
        if self.stop_signal is None:
            self.stop_signal = signum

    def _on_parent_signal(self, _signum: int, _frame: object) -> None:
        pass  # woken up; the loop compares getppid() with the parent

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent

    def _child_setup(self) -> None:  # in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.supervisor_pid:
            os._exit(1)

    def reap(self) -> None:
        """Collect every child that ended (the command, and orphans reparented to us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.status = status
                self.child.returncode = 0  # reaped here; keeps Popen from waiting on it again

    def run(self) -> int:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_stop)
        signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_signal)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
        if self.parent_gone() or self.stop_signal is not None:
            return 128 + int(self.stop_signal or signal.SIGTERM)  # nobody to run it for
        self.supervisor_pid = os.getpid()
        try:
            self.child = subprocess.Popen(self.argv, process_group=0, preexec_fn=self._child_setup)
        except OSError as exc:
            print(f"qwenft: cannot start {self.argv[0]}: {exc}", file=sys.stderr, flush=True)
            return 127

        deadline: float | None = None  # when stopping: SIGKILL what is left after it
        stopping_for = 0
        signalled: set[int] = set()
        while True:
            self.reap()
            wanted = self.stop_signal is not None or self.status is not None or self.parent_gone()
            if not wanted:  # the cheap path while the command runs: no walk of /proc
                time.sleep(POLL_S)
                continue
            left = descendants(self.supervisor_pid)
            if self.status is not None and not left:
                break
            if deadline is None:
                grace = self.orphan_grace_s if self.parent_gone() else self.grace_s
                deadline = time.monotonic() + grace
                stopping_for = self.signals_seen
            if self.parent_gone():  # qwenft died (maybe while we waited): no long wait
                deadline = min(deadline, time.monotonic() + self.orphan_grace_s)
            new = [p for p in left if p not in signalled]
            if new:  # the first time all of them; later, any started meanwhile
                self._terminate(new, first=not signalled)
                signalled.update(new)
            if time.monotonic() >= deadline or self.signals_seen > max(stopping_for, 1):
                for pid in left:
                    _kill(pid, signal.SIGKILL)
            time.sleep(POLL_S)
        return self._exit_code()

    def _terminate(self, pids: list[int], first: bool) -> None:
        """SIGTERM the child's process group (LLaMA-Factory and torchrun, as a Ctrl-C would) and
        every other descendant (workers in sessions of their own, orphans)."""
        assert self.child is not None
        group = self.child.pid
        if first and self.status is None:
            try:
                os.killpg(group, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        table = process_table()
        for pid in pids:
            if not first or self.status is not None or table.get(pid, (0, 0, ""))[1] != group:
                _kill(pid, signal.SIGTERM)

    def _exit_code(self) -> int:
        status = self.status or 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            sys.stdout.flush()
            for s in {*STOP_SIGNALS, sig} - {signal.SIGKILL, signal.SIGSTOP}:
                try:
                    signal.signal(s, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
            os.kill(os.getpid(), sig)  # end the way the child ended
            time.sleep(1)
            return 128 + sig
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def parse_args(args: list[str]) -> tuple[list[str], int, float, float]:
    if "--" not in args:
        raise SystemExit(
            "usage: supervise.py --parent PID [--grace S] [--orphan-grace S] -- ARGV..."
        )
    split = args.index("--")
    opts, argv = args[:split], args[split + 1 :]
    values = {"--parent": str(os.getppid()), "--grace": "20", "--orphan-grace": "3"}
    if len(opts) % 2:
        raise SystemExit(f"supervise.py: options come in pairs: {opts}")
    for i in range(0, len(opts), 2):
        if opts[i] not in values:
            raise SystemExit(f"supervise.py: unknown option {opts[i]}")
        values[opts[i]] = opts[i + 1]
    if not argv:
        raise SystemExit("supervise.py: no command after --")
    return (
        argv,
        int(values["--parent"]),
        float(values["--grace"]),
        float(values["--orphan-grace"]),
    )


def main(args: list[str] | None = None) -> int:
    argv, parent, grace_s, orphan_grace_s = parse_args(sys.argv[1:] if args is None else args)
    return Supervisor(argv, parent, grace_s, orphan_grace_s).run()


if __name__ == "__main__":
    sys.exit(main())
