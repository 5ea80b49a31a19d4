"""The one subprocess runner: output teed to the log, exit codes, the monitor, process groups."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest

from qwenft.lf import launcher


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
