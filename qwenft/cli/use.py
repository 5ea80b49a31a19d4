"""`qwenft serve`, `qwenft eval` and `qwenft score`: use a fine-tuned model. Mounted by qwenft.cli."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from qwenft.choices import Thinking
from qwenft.cli.common import (
    AdapterOpt,
    ForceTemplateOpt,
    TargetArg,
    TemplateOpt,
    ThinkingOpt,
    VerboseOpt,
    choice_option,
    err,
    guard_options,
    handle_errors,
    knob_options,
    stdout_for_results,
)
from qwenft.knobs import EVAL, NO_KNOBS, SCORE, KnobValues
from qwenft.serve_guard import DEFAULT_GUARD, KEY_ENV, GuardSettings


@handle_errors
@guard_options
def serve(
    target: TargetArg,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on (0: any free port).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar=KEY_ENV,
            show_envvar=False,
            help=f"Require this Bearer key. Better: set {KEY_ENV} instead; a key on the "
            "command line shows in `ps` to every user of the machine.",
        ),
    ] = None,
    adapter: AdapterOpt = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the model to load.")
    ] = 300.0,
    template: TemplateOpt = None,
    force: ForceTemplateOpt = False,
    backend: Annotated[
        str,
        choice_option(
            "--backend",
            ("transformers", "llama.cpp"),
            "transformers: LLaMA-Factory's API server; llama.cpp: the run's GGUF export.",
        ),
    ] = "transformers",
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Stream the server's output to stderr too (it is always logged).",
        ),
    ] = False,
    guard: GuardSettings = DEFAULT_GUARD,  # browser origins, host names, limits (guard_options)
) -> None:
    """Serve a model over an OpenAI-compatible API (llamafactory-cli api, or llama-cpp-python's
    server for a GGUF export) until Ctrl-C. The terminal shows one line per request; the server's
    own output goes to RUN/serve.log (QWENFT_HOME/logs/serve-NAME.log for a model). Web pages of
    other origins, other Host names (DNS rebinding) and oversized or excess requests are refused."""
    from qwenft.serve import execute_serve, plan_serve

    plan = plan_serve(
        target,
        host=host,
        port=port,
        api_key=api_key or None,
        adapter=adapter,
        timeout_s=timeout,
        template=template,
        force=force,
        backend=backend,
        guard=guard,
    )
    execute_serve(plan, progress=err, announce=typer.echo, verbose=verbose)


@handle_errors
@knob_options(EVAL)
def eval_cmd(
    target: TargetArg,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Held-out data; its kind decides the report: chat (loss, BLEU/ROUGE), "
            "preference pairs (reward accuracy and margin), KTO (log-p shift), pt (perplexity). "
            "Default: the run's --eval-data.",
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "-o", help="Report folder (default RUN/eval, else ./eval-<model>)."
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", help="Compare with this model instead of the run's base."),
    ] = None,
    no_base: Annotated[
        bool, typer.Option("--no-base", help="Skip the base model's eval loss.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing report; allow a --template/--thinking other than the run's.",
        ),
    ] = False,
    template: TemplateOpt = None,
    thinking: ThinkingOpt = Thinking.AUTO.value,
    knobs: KnobValues = NO_KNOBS,  # the knob table's eval options (knob_options)
    as_json: Annotated[
        bool, typer.Option("--json", help="Print eval.json instead of the table.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure a fine-tune next to its base (starting) model on held-out data of any kind.

    chat: eval loss, perplexity, token accuracy, BLEU-4/ROUGE of generated answers. preference
    pairs: each model's log p(chosen) - log p(rejected), reward accuracy and margin. KTO: how
    desirable vs undesirable answers' log p moved. pt text: perplexity."""
    from qwenft.evaluate import execute_eval, format_table, plan_eval

    plan = plan_eval(
        target,
        data,
        output_dir=output_dir,
        base=base,
        no_base=no_base,
        force=force,
        knobs=knobs,
        template=template,
        thinking=thinking,
    )
    with stdout_for_results():
        report = execute_eval(plan, progress=err, verbose=verbose)
    sys.stderr.flush()
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        typer.echo(format_table(report), nl=False)
    err(f"report: {plan.out_dir}")


@handle_errors
@knob_options(SCORE)
def score(
    target: TargetArg,
    data: Annotated[
        Path,
        typer.Argument(
            help="Conversations (messages ending with an assistant turn) or chosen/rejected pairs."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the per-row scores (JSON lines) here, not to stdout."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing --output; allow a --template/--thinking other than the run's.",
        ),
    ] = False,
    template: TemplateOpt = None,
    thinking: ThinkingOpt = Thinking.AUTO.value,
    knobs: KnobValues = NO_KNOBS,  # the knob table's score options (knob_options)
) -> None:
    """Score conversations or pairs with a reward model (a run trained with --stage rm).

    Each row is encoded as the run was trained (its chat template, system prompt and thinking
    mode), so the scores mean what the model learned. One JSON line per row: {"line", "score"}
    for a conversation, {"line", "chosen", "rejected", "margin"} for a pair; a summary on stderr."""
    from qwenft.evaluate import execute_score, plan_score, score_lines, score_summary

    plan = plan_score(
        target,
        data,
        output=output,
        force=force,
        knobs=knobs,
        template=template,
        thinking=thinking,
    )
    with stdout_for_results():
        result = execute_score(plan, progress=err)
    sys.stderr.flush()
    if plan.output is None:
        typer.echo(score_lines(result["rows"]), nl=False)
    err(score_summary(result))
    if plan.output is not None:
        err(f"scores: {plan.output}")
