"""What every qwenft command module shares: error handling, stderr output, shared options.

The only place that turns domain errors into exit codes and messages (`error: ...`,
`hint: ...` on stderr). Tracebacks only with QWENFT_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from qwenft import knobs
from qwenft.choices import AUTO, DeepSpeed, Launcher, Method, Overlength, Template, Thinking
from qwenft.errors import QwenftError

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Stream LLaMA-Factory's output to stderr too (it is always logged)."
    ),
]
TargetArg = Annotated[str, typer.Argument(help="A run folder, a model folder or a preset.")]
AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", help="A LoRA adapter folder to apply.")
]


def choice_option(name: str, choices: tuple[str, ...], help: str, many: bool = False) -> Any:
    """An option whose choices (from qwenft.choices) show in --help as its metavar (`many`: a
    comma list of them); the core checks the value, so a wrong one gets qwenft's own `error:`
    line and hint (exit 2)."""
    return typer.Option(
        name, metavar=f"[{'|'.join(choices)}]" + (",..." if many else ""), help=help
    )


def _bundle(
    param: str, options: list[tuple[str, Any]], build: Callable[[dict[str, Any]], Any]
) -> Callable[[F], F]:
    """Replace a command's parameter `param` by the options (name, Annotated type) of a table,
    where it stands, and hand their values to it as one argument built from them."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name != param:
                params.append(p)
                continue
            params += [
                inspect.Parameter(name, p.kind, default=None, annotation=annotation)
                for name, annotation in options
            ]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name, None) for name, _ in options}
            return fn(*args, **{param: build(values)}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != param}
        return wrapper  # type: ignore[return-value]

    return decorate


def knob_options(command: str) -> Callable[[F], F]:
    """Give a command the options of every knob it offers (qwenft.knobs.KNOBS: option, type,
    help, choices), in table order where the function's `knobs` parameter stands, and hand their
    values to it as that one `knobs: KnobValues` argument (by LLaMA-Factory key, unset ones left
    out). The ranges are checked by the core, from the same table."""
    offered = knobs.offered(command)

    def annotation(knob: knobs.Knob) -> Any:
        if knob.choices:
            info = choice_option(knob.option, knob.choices, knob.help, knob.many)
        else:  # a switch's option is "--flag/--no-flag"
            info = typer.Option(knob.option, help=knob.help)
        if knob.type is list:  # a repeatable option (--reward A --reward B)
            return Annotated[list[str] | None, info]
        return Annotated[knob.type | None, info]

    return _bundle(
        "knobs",
        [(k.param, annotation(k)) for k in offered],
        lambda values: knobs.KnobValues.from_options(command, values),
    )


def launch_options(fn: F) -> F:
    """`train`'s --launcher and the launchers' options (qwenft.launch.options.LAUNCH_OPTIONS),
    handed to it as one `launch: LaunchRequest` argument; the core checks which launcher takes
    which option, from the same table."""
    from qwenft.launch.options import LAUNCH_OPTIONS, LaunchRequest

    def annotation(opt: Any) -> Any:
        return Annotated[opt.type | None, typer.Option(opt.option, help=opt.help)]

    launcher = Annotated[
        str | None,
        choice_option(
            "--launcher", Launcher.values(), "Where the processes start (default local)."
        ),
    ]
    return _bundle(
        "launch",
        [("launcher", launcher), *((o.param, annotation(o)) for o in LAUNCH_OPTIONS)],
        lambda values: LaunchRequest.from_options(values.pop("launcher"), values),
    )(fn)


def guard_options(fn: F) -> F:
    """`serve`'s guard options (qwenft.serve_guard.GUARD_OPTIONS: browser origins, host names,
    limits), handed to it as one `guard: GuardSettings` argument, checked from the same table."""
    from qwenft.serve_guard import GUARD_OPTIONS, GuardSettings

    def annotation(opt: Any) -> Any:
        return Annotated[opt.type | None, typer.Option(opt.option, help=opt.help_text)]

    return _bundle(
        "guard", [(o.param, annotation(o)) for o in GUARD_OPTIONS], GuardSettings.from_options
    )(fn)


TemplateOpt = Annotated[
    str | None,
    choice_option("--template", Template.values(), "Must match the run's (else --force)."),
]
ForceTemplateOpt = Annotated[
    bool, typer.Option("--force", help="Allow a --template other than the trained one.")
]
MethodOpt = Annotated[
    str | None,
    choice_option(
        "--method",
        (AUTO, *Method.values()),
        "How to train (default lora); auto: what fits --gpu-mem.",
    ),
]
DeepSpeedOpt = Annotated[
    str,
    choice_option(
        "--deepspeed",
        (AUTO, *DeepSpeed.values()),
        "DeepSpeed config; auto: z3 for full, none otherwise.",
    ),
]
ThinkingOpt = Annotated[
    str,
    choice_option(
        "--thinking",
        Thinking.values(),
        "Qwen3 hybrid models: train reasoning; auto: from the data.",
    ),
]
OverlengthOpt = Annotated[
    str,
    choice_option(
        "--overlength",
        Overlength.values(),
        "Samples over --cutoff-len: warn (count the tokens lost), drop, or fail.",
    ),
]


def err(message: str) -> None:
    """A line on stderr (progress, warnings, errors); stdout stays for results."""
    typer.echo(message, err=True)


def stdout_for_results() -> contextlib.AbstractContextManager[Any]:
    """Around the work of a command whose stdout carries only its result (`RUN=$(qwenft train
    ...)`): whatever a library prints to sys.stdout meanwhile (DeepSpeed's accelerator warning
    when LLaMA-Factory is imported in-process, ...) goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr)


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
