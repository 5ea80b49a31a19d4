"""The package's layers (pyproject.toml [tool.importlinter]): the command line above one floor of
independent operations, above what they share; nothing imports the command line; no import
cycles inside a package. Checked with import-linter, lazy in-function imports included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(no_cache=True, no_logo=True))"
)


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_import_contracts_hold() -> None:
    pytest.importorskip("importlinter", reason="the dev extra (requirements/cpu.lock) has it")
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_lazy_upward_import_breaks_them(tmp_path: Path) -> None:
    """An in-function import counts: a lower layer importing an operation is reported by name."""
    pytest.importorskip("importlinter", reason="the dev extra (requirements/cpu.lock) has it")
    import shutil

    shutil.copytree(
        ROOT / "qwenft", tmp_path / "qwenft", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    gguf = tmp_path / "qwenft" / "runs" / "gguf.py"
    gguf.write_text(gguf.read_text() + "\n\ndef _up():\n    from qwenft import export  # noqa\n")
    out = lint(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "qwenft.runs.gguf -> qwenft.export" in out.stdout
