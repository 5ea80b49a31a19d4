"""The one subprocess runner: output teed to the log, exit codes, the monitor, process groups."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenft.proc import launcher


def test_run_tees_output_and_returns_code(tmp_path: Path) -> None:
    echo = io.BytesIO()
    code = launcher.run(
        [sys.executable, "-c", "import sys; print('a\\rb'); sys.exit(3)"],
        {},
        tmp_path / "x.log",
        echo=echo,
    )
    assert code == 3
    assert (
        echo.getvalue() == b"a\rb\n" == (tmp_path / "x.log").read_bytes()
    )  # \r kept: progress bars


def test_monitor_stops_the_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)"
    )
    started = time.monotonic()
    with pytest.raises(launcher.Stopped, match="loss is NaN"):
        launcher.run(
            [sys.executable, "-c", script],
            {},
            echo=io.BytesIO(),
            grace_s=5,
            monitor=lambda: "loss is NaN" if pid_file.exists() else None,
            monitor_every_s=0.2,
        )
    assert time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(grandchild, 0)


def test_env_is_added_and_venv_bin_first(tmp_path: Path) -> None:
    echo = io.BytesIO()
    code = launcher.run(
        [sys.executable, "-c", "import os; print(os.environ['QWENFT_X'], os.environ['PATH'])"],
        {"QWENFT_X": "42"},
        echo=echo,
    )
    value, path = echo.getvalue().decode().split(" ", 1)
    assert code == 0 and value == "42"
    assert path.startswith(str(Path(sys.executable).parent))


def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(launcher.QwenftError, match="cannot start"):
        launcher.run(["/nonexistent/llamafactory-cli", "train"], {}, echo=io.BytesIO())


# --------------------------------------------------------------------------------------------------
# nothing outlives qwenft: real processes under the supervisor (qwenft/lf/supervise.py)

# A child that starts a grandchild in a session of its own (as torch elastic starts its workers),
# writes both pids, and sleeps.
TREE = """
import os, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {g.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""

# Stands in for `qwenft train`: launcher.run() of TREE, the exception it ends with on stdout.
DRIVER = """
import io, sys
from pathlib import Path
from qwenft.proc import launcher
try:
    launcher.run([sys.executable, "-c", sys.argv[1], sys.argv[2]], {}, echo=io.BytesIO(), grace_s=5)
except launcher.QwenftError as exc:
    print(type(exc).__name__, exc, flush=True)
    sys.exit(exc.exit_code)
"""


def alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and [p for p in pids if alive(p)]:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def start_driver(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """The driver running, with the pids of everything below it: supervisor, child, grandchild."""
    pid_file = tmp_path / "tree.pids"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, TREE, str(pid_file)], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.05)
    child, grandchild = map(int, pid_file.read_text().split())
    supervisor = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert supervisor != driver.pid and alive(grandchild)
    return driver, [supervisor, child, grandchild]


def test_sigkill_of_qwenft_leaves_no_process_behind(tmp_path: Path) -> None:
    driver, pids = start_driver(tmp_path)
    started = time.monotonic()
    driver.kill()  # kill -9: no handler, no cleanup in qwenft
    driver.wait()
    assert wait_gone(pids, 5) == [], "outlived a SIGKILLed qwenft"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_sighup_is_handled_like_sigterm(tmp_path: Path, sig: int) -> None:
    driver, pids = start_driver(tmp_path)
    driver.send_signal(sig)
    out, _ = driver.communicate(timeout=30)
    assert driver.returncode == 130, out
    assert out.strip() == f"Interrupted stopped by {signal.Signals(sig).name}"
    assert wait_gone(pids, 1) == []  # run() returned only once the whole tree was gone


def test_leftovers_of_a_finished_child_are_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"
    script = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
        "start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); sys.exit(4)"
    )
    assert launcher.run([sys.executable, "-c", script], {}, echo=io.BytesIO(), grace_s=5) == 4
    assert not alive(int(pid_file.read_text()))


def test_exit_by_signal_is_passed_through(tmp_path: Path) -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert launcher.run([sys.executable, "-c", script], {}, echo=io.BytesIO()) == -signal.SIGKILL


def test_peak_memory_sums_every_process_of_the_tree(tmp_path: Path) -> None:
    hog = "import time; b = b'x' * (100 * 2**20); time.sleep(4)"  # 100 MiB, every page touched
    script = (
        "import subprocess, sys; "
        f"ps = [subprocess.Popen([sys.executable, '-c', {hog!r}]) for _ in range(2)]; "
        "sys.exit(sum(p.wait() for p in ps))"
    )
    stats: dict = {}
    code = launcher.run(
        [sys.executable, "-c", script], {}, echo=io.BytesIO(), stats=stats, sample_every_s=0.2
    )
    assert code == 0 and stats["samples"] >= 5 and stats["max_processes"] >= 3
    assert stats["peak_rss_bytes"] > 200 * 2**20  # both hogs: more than the larger one alone
    if stats["peak_pss_bytes"] is not None:
        assert 200 * 2**20 < stats["peak_pss_bytes"] <= stats["peak_rss_bytes"]
