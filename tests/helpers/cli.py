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


def data_app() -> Typer:
    """A Typer app holding only `qwenft data` (check, convert, split, register)."""
    from qwenft.cli import data as data_cli

    root = Typer()
    root.add_typer(data_cli.app, name="data")
    return root


def invoke_data(data_app: Typer, *args: object) -> Result:
    """`qwenft data ARGS...` against a `data_app()` (the conftest's `data_app` fixture)."""
    return invoke("data", *args, app=data_app)
