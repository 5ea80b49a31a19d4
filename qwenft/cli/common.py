"""What every qwenft command module shares: error handling, stderr output, shared options.

The only place that turns domain errors into exit codes and messages (`error: ...`,
`hint: ...` on stderr). Tracebacks only with QWENFT_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from qwenft.errors import QwenftError

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
TargetArg = Annotated[str, typer.Argument(help="A run folder, a model folder or a preset.")]
AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", help="A LoRA adapter folder to apply.")
]
TemplateOpt = Annotated[
    str | None, typer.Option("--template", help="Must match the run's (else --force).")
]
ForceTemplateOpt = Annotated[
    bool, typer.Option("--force", help="Allow a --template other than the trained one.")
]


def err(message: str) -> None:
    """A line on stderr (progress, warnings, errors); stdout stays for results."""
    typer.echo(message, err=True)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def handle_errors(fn: F) -> F:
    """Turn QwenftError into `error: ...` / `hint: ...` on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QwenftError as exc:
            if os.environ.get("QWENFT_DEBUG") == "1":
                raise
            err(f"error: {exc.message}")
            if exc.hint:
                err(f"hint: {exc.hint}")
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
