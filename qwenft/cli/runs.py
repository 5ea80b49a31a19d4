"""`qwenft runs`: list the runs (under ./runs, folders named with --dir, and those recorded in
QWENFT_HOME), `qwenft runs RUN` (`runs show RUN`) for one, with where its trackers wrote, and
`qwenft runs rm RUN` to delete one that is not running. Mounted by qwenft.cli."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from qwenft.cli.common import JsonOpt, err, handle_errors, print_json


class _RunsGroup(TyperGroup):
    """`qwenft runs RUN` is `qwenft runs show RUN`: a first argument that names no subcommand is
    a run folder."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_RunsGroup,
    help="List runs (status, stage/method, steps, duration, loss); `runs RUN` shows one and where "
    "its trackers wrote; `runs rm RUN` deletes one.",
    invoke_without_command=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
@handle_errors
def runs(
    ctx: typer.Context,
    dirs: Annotated[
        list[Path] | None,
        typer.Option("--dir", help="Also list the run folders under DIR (repeatable)."),
    ] = None,
    tail: Annotated[
        int,
        typer.Option(
            "--tail", help="Show the last N lines of the log of runs that died or failed."
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List runs: ./runs, every --dir, and the runs qwenft recorded in QWENFT_HOME. A run
    started with --from shows its lineage: `<- PARENT` after its folder. STOPS: of the greedy
    answers `qwenft export` checked, how many ended on <|im_end|> (has the model learned to end
    its turns?)."""
    if ctx.invoked_subcommand is not None:
        return
    from qwenft.runs.folder import list_runs

    roots = [Path("runs"), *(dirs or [])]
    rows = list_runs(roots)
    if as_json:
        print_json(rows)
        return
    if not rows:
        err(f"no runs under {', '.join(map(str, roots))} or recorded in QWENFT_HOME")
        return
    _print_rows(rows, tail)


@app.command("show")
@handle_errors
def show(
    run_dir: Annotated[Path, typer.Argument(help="The run folder.")],
    as_json: JsonOpt = False,
) -> None:
    """One run (also `qwenft runs RUN`): its line of the list, its log, and where each tracker
    it reported to (--report-to) wrote, with the command that shows it."""
    from qwenft.runs.folder import run_row
    from qwenft.runs.manifest import read_manifest

    run_dir = run_dir.expanduser().absolute()
    row = run_row(run_dir, read_manifest(run_dir))
    if as_json:
        print_json(row)
        return
    _print_rows([row], 0)
    typer.echo(f"data: {row['data']}")
    typer.echo(f"log: {row['log'] or '-'}")
    for tracker, look in (row["tracking"] or {}).items():
        typer.echo(f"{tracker}: {look}")


@app.command("rm")
@handle_errors
def rm(run_dir: Annotated[Path, typer.Argument(help="The run folder to delete.")]) -> None:
    """Delete a run folder (refused while the run is live)."""
    from qwenft.runs.folder import remove_run

    err(f"removed {remove_run(run_dir)}")


def _print_rows(rows: list[dict[str, Any]], tail: int) -> None:
    """The runs as a table, each with its last `tail` log lines if it died or failed."""
    typer.echo(
        f"{'STATUS':<11} {'STARTED':<16} {'STAGE/METHOD':<13} {'STEPS':>11} {'TIME':>7} "
        f"{'LOSS':>8} {'STOPS':>5}  RUN"
    )
    for r in rows:
        typer.echo(
            f"{r['status'] or '-':<11} {_started(r['started']):<16} "
            f"{r['stage'] + '/' + r['method']:<13} {_steps(r):>11} {_duration(r['duration_s']):>7} "
            f"{_loss(r['final_loss']):>8} {_stops(r.get('stops')):>5}  {r['run_dir']}"
            + (f"  <- {Path(r['parent_run']).name}" if r.get("parent_run") else "")
            + (f"  [{r['data']}]" if r.get("mixture") else "")
        )
        if tail > 0 and r["status"] in ("died", "failed") and r["log"]:
            for line in _last_lines(Path(r["log"]), tail):
                typer.echo(f"    | {line}")


def _started(stamp: str | None) -> str:
    return stamp[:16].replace("T", " ") if stamp else "-"


def _steps(r: dict[str, Any]) -> str:
    done, planned = r["steps_done"], r["steps_planned"]
    if done is None:
        return "-"
    return f"{done}/{planned}" if planned else str(done)


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _stops(stops: dict[str, Any] | None) -> str:
    """How many of export's verify answers ended on <|im_end|> (`-`: not exported yet)."""
    return f"{stops['stopped']}/{stops['answers']}" if stops else "-"


def _last_lines(path: Path, n: int) -> list[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=n)]
    except OSError as exc:
        return [f"(cannot read {path}: {exc})"]
