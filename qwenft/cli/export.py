"""`qwenft export`: a run as a GGUF file for llama.cpp and Ollama, verified. Mounted by qwenft.cli."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwenft.choices import GgufQuant
from qwenft.cli.common import JsonOpt, choice_option, err, handle_errors, print_json


@handle_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A completed run folder.")],
    format_: Annotated[
        str, choice_option("--format", ("gguf",), "What to export to (GGUF: llama.cpp, Ollama).")
    ] = "gguf",
    quant: Annotated[
        str, choice_option("--quant", GgufQuant.values(), "Weight type of the GGUF file.")
    ] = GgufQuant.F16.value,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Compare the GGUF's greedy answers with the merged model's (default on).",
        ),
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an earlier export of this --quant.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the converter's output too.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a run to GGUF (merging a LoRA run first) with an Ollama Modelfile, and verify it."""
    from qwenft.errors import QwenftError
    from qwenft.export import execute_export, plan_export

    if format_ != "gguf":
        raise QwenftError(f"unknown --format {format_!r}", "choose gguf")
    record = execute_export(
        plan_export(run_dir, quant, force=force), progress=err, verify=verify, verbose=verbose
    )
    err(
        f"exported {record['file']} ({record['size_bytes'] / 2**20:.1f} MiB, {record['quant']}) "
        f"in {record['seconds']:.0f} s"
    )
    stopping = record["checks"].get("stopping")
    if stopping:
        err(
            f"stops: {stopping['stopped']}/{stopping['answers']} verify answers ended on "
            f"<|im_end|> within {stopping['window']} tokens"
            + ("" if stopping["stopped"] == stopping["answers"] else " (not stopping yet)")
        )
    err(f"ollama: ollama create NAME -f {record['modelfile']}")
    if as_json:
        print_json(record)
    else:
        typer.echo(record["file"])
