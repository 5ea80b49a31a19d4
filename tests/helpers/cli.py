"""`invoke`: the in-process CLI through typer's CliRunner (the one wrapper every module uses)."""

from __future__ import annotations

from typer import Typer
from typer.testing import CliRunner, Result

_runner = CliRunner()


def invoke(*args: object, app: Typer | None = None) -> Result:
    """Run `qwenft ARGS...` (or ARGS against another Typer app) and return the CliRunner result."""
    if app is None:
        from qwenft.cli import app as qwenft_app

        app = qwenft_app
    return _runner.invoke(app, [str(a) for a in args])
