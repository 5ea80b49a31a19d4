"""`invoke`: the in-process CLI through typer's CliRunner (the one wrapper every module uses);
`dry_run`: what `train --dry-run` prints, parsed."""

from __future__ import annotations

import sys
from typing import Any
from unittest import mock

import yaml
from typer import Typer
from typer.testing import CliRunner, Result

_runner = CliRunner()


def invoke(*args: object, app: Typer | None = None) -> Result:
    """Run `qwenft ARGS...` (or ARGS against another Typer app) and return the CliRunner result.
    sys.argv is the command line meanwhile, as in a real `qwenft` process (a launcher that renders
    a pod's command reads it)."""
    if app is None:
        from qwenft.cli import app as qwenft_app

        app = qwenft_app
    argv = [str(a) for a in args]
    with mock.patch.object(sys, "argv", ["qwenft", *argv]):
        return _runner.invoke(app, argv)


def dry_run(*args: object) -> tuple[dict[str, Any], dict[str, str], Result]:
    """`qwenft train ARGS --dry-run`: the train.yaml it prints (parsed), its environment, and the
    result (exit code, output)."""
    result = invoke("train", *args, "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.output.split("# --- train.yaml ---\n", 1)[1]
    config, env = text.split("# --- environment ---\n", 1)
    env = env.split("# --- command ---", 1)[0]
    return yaml.safe_load(config), dict(line.split("=", 1) for line in env.splitlines()), result


def data_app() -> Typer:
    """A Typer app holding only `qwenft data` (check, convert, split, register)."""
    from qwenft.cli import data as data_cli

    root = Typer()
    root.add_typer(data_cli.app, name="data")
    return root


def invoke_data(data_app: Typer, *args: object) -> Result:
    """`qwenft data ARGS...` against a `data_app()` (the conftest's `data_app` fixture)."""
    return invoke("data", *args, app=data_app)
