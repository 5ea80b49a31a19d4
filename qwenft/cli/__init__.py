"""The qwenft command line: parse, call one function of the core, print.

Errors become exit codes in qwenft.cli.common; the other command modules (data, plan, use) are
mounted at the end. Nothing heavy (torch, transformers,
llamafactory) is imported at module level, so `qwenft --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qwenft import __version__
from qwenft.choices import (
    AUTO,
    DEFAULT_METHOD,
    DEFAULT_OVERLENGTH,
    Launcher,
    Method,
    Mix,
    Stage,
    Template,
    Thinking,
)
from qwenft.cli.common import (
    AdapterOpt,
    DeepSpeedOpt,
    ForceTemplateOpt,
    JsonOpt,
    MethodOpt,
    OverlengthOpt,
    TargetArg,
    TemplateOpt,
    ThinkingOpt,
    VerboseOpt,
    choice_option,
    err,
    handle_errors,
    knob_options,
    launch_options,
    print_json,
    stdout_for_results,
)
from qwenft.errors import QwenftError
from qwenft.knobs import NO_KNOBS, TRAIN, KnobValues
from qwenft.launch.options import NO_LAUNCH, LaunchRequest

app = typer.Typer(
    name="qwenft",
    help="Fine-tune Qwen models with LLaMA-Factory: checked data, complete configs, runs you can repeat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: importing rich would cost ~0.15 s on every call
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Preset (tiny-qwen2, tiny-qwen3, ...), hub id or local folder."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qwenft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Fine-tune Qwen models with LLaMA-Factory."""


@app.command()
@handle_errors
@knob_options(TRAIN)
@launch_options
def train(
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            "-d",
            help="The stage's data: chat jsonl (sft), chosen/rejected pairs (dpo, orpo, simpo), "
            'labelled answers (kto), {"text"} jsonl or .txt (pt). Repeat it to mix files; '
            "FILE:SHARE gives each file its share of an interleaved mixture (docs/data.md).",
        ),
    ] = None,
    mix: Annotated[
        str | None,
        choice_option(
            "--mix",
            Mix.values(),
            "How several --data files mix: concat (every row once; the default), interleave "
            "(drawn at the shares until one file runs out; the default with shares), "
            "interleave-over (until every file is read).",
        ),
    ] = None,
    eval_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-data",
            help="Evaluation data held apart from training (repeatable; instead of --val-size): "
            "its loss shows in the progress line and summary, and `qwenft eval RUN` reads it.",
        ),
    ] = None,
    stage: Annotated[
        str,
        choice_option(
            "--stage",
            Stage.values(),
            "Training stage (default sft); each takes its kind of data (docs/data.md).",
        ),
    ] = Stage.SFT.value,
    from_run: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Start from an earlier run (its merged model, or a full/freeze run's weights), "
            "keeping its template, system prompt and thinking mode.",
        ),
    ] = None,
    method: MethodOpt = None,
    gpu_mem: Annotated[
        float | None,
        typer.Option("--gpu-mem", help="GB per GPU for --method auto (default: as reported)."),
    ] = None,
    model: ModelOpt = "",
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "-o", help="Run folder (default runs/<model>-<method>-<time>)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print YAML, env and command; write nothing.")
    ] = False,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            "--gpus-per-node",
            help="GPUs (processes) per node; default: all visible, else 1. Where no GPU is "
            "visible: refused for a launch here (see --cpu-procs), taken as the target's for "
            "--dry-run and the schedulers' launchers.",
        ),
    ] = None,
    cpu_procs: Annotated[
        int | None,
        typer.Option(
            "--cpu-procs",
            help="CPU processes per node, on a machine without GPUs (instead of --gpus).",
        ),
    ] = None,
    deepspeed: DeepSpeedOpt = AUTO,
    template: Annotated[
        str | None,
        choice_option("--template", Template.values(), "Override the model's template."),
    ] = None,
    thinking: ThinkingOpt = Thinking.AUTO.value,
    knobs: KnobValues = NO_KNOBS,  # the knob table's train options (knob_options)
    launch: LaunchRequest = NO_LAUNCH,  # --launcher and its options (launch_options)
    overlength: OverlengthOpt = DEFAULT_OVERLENGTH.value,
    dataset_dir: Annotated[
        Path | None, typer.Option("--dataset-dir", help="Where dataset_info.json lives.")
    ] = None,
    nnodes: Annotated[
        int | None,
        typer.Option(
            "--nnodes", "--nodes", help="Machines taking part (torchrun NNODES; default 1)."
        ),
    ] = None,
    node_rank: Annotated[
        int, typer.Option("--node-rank", help="This machine's rank, 0 = master.")
    ] = 0,
    master_addr: Annotated[
        str | None, typer.Option("--master-addr", help="Address of node 0.")
    ] = None,
    master_port: Annotated[
        int | None, typer.Option("--master-port", help="Port on node 0.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue RUN_DIR from its newest checkpoint.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --resume: continue despite changed inputs.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Extra LLaMA-Factory keys from a YAML file.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value for any LLaMA-Factory key (repeatable)."),
    ] = None,
    verbose: VerboseOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run's manifest instead of its folder.")
    ] = False,
) -> None:
    """Fine-tune a Qwen model (sft, pt, dpo, orpo, simpo, kto; LoRA, QLoRA, full or freeze)
    through LLaMA-Factory.

    stdout carries only the run folder (or --json: its manifest), so RUN=$(qwenft train ...)
    works; progress and the summary go to stderr, LLaMA-Factory's output to RUN/train.log."""
    from qwenft.data.mixture import mixture_of
    from qwenft.train import TrainRequest, execute_train, plan_train

    if resume is not None:
        if data and len(data) > 1:
            raise QwenftError(
                "--resume takes the run's own files: give at most one --data (the first)",
                f"qwenft resume {resume}",
            )
        resumed = _resume(resume, Path(data[0]) if data else None, method, template, force, verbose)
        _report_training(resumed, as_json)
        return
    if from_run is not None and model:
        raise QwenftError(
            "--from and --model exclude each other: --from starts from that run's weights",
            "drop --model (or drop --from to start from the model)",
        )
    if not data or not (model or from_run):
        raise QwenftError(
            f"{'--data' if not data else '--model'} is required",
            "qwenft train --model MODEL --data FILE.jsonl (MODEL: a preset such as tiny-qwen2, a hub id "
            "or a folder; `qwenft models` lists presets)",
        )
    req = TrainRequest(
        method=method or DEFAULT_METHOD.value,
        model=model,
        gpu_mem_gb=gpu_mem,
        overlength=overlength,
        data=None,
        mixture=mixture_of(data, mix, eval_data or ()),
        output_dir=output_dir,
        gpus=gpus,
        cpu_procs=cpu_procs,
        deepspeed=deepspeed,
        template=template,
        thinking=thinking,
        dataset_dir=dataset_dir,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        config_file=config,
        set_items=set_ or [],
        stage=stage,
        parent=from_run,
        knobs=knobs,
        launch=launch,
        dry_run=dry_run,
    )
    plan = plan_train(req)
    for note in plan.notes:
        err(note)
    if launch.kind.facts.remote and not launch.kind.facts.in_run:
        typer.echo(_pod_file(plan, launch, gpus), nl=False)  # --dry-run only (launch.options)
        return
    if dry_run:
        _print_dry_run(plan)
        return
    if plan.manifest.launch:
        with stdout_for_results():
            result = execute_train(plan, progress=err, verbose=verbose)
        print_json(result) if as_json else typer.echo(result["run_dir"])
        return
    with stdout_for_results():
        result = execute_train(plan, progress=err, verbose=verbose)
    _report_training(result, as_json)


def _pod_file(plan: Any, launch: LaunchRequest, gpus: int | None) -> str:  # train.TrainPlan
    """The Kubeflow PyTorchJob or SkyPilot task that runs this same `qwenft train` on every
    node (without the options of this launch: each node reads its place from the scheduler)."""
    from qwenft.launch import manifests
    from qwenft.launch.options import LAUNCH_OPTIONS

    drop = {"--launcher": True, "--dry-run": False, "--nnodes": True, "--nodes": True}
    drop |= {"--node-rank": True, "--master-addr": True, "--master-port": True}
    drop |= {o.option: o.type is not bool for o in LAUNCH_OPTIONS}
    command = manifests.pod_command(sys.argv[1:], drop)
    name = f"qwenft-{plan.run_dir.name}"
    if launch.kind == Launcher.KUBEFLOW:
        return manifests.pytorchjob(name, plan.manifest.nnodes, gpus, launch.image, command)
    accelerators = launch.accelerators or (f"A100:{gpus}" if gpus else None)
    return manifests.skypilot_task(name, plan.manifest.nnodes, accelerators, command)


def _print_dry_run(plan: Any) -> None:  # train.TrainPlan
    """--dry-run: the run folder, the dataset, train.yaml, the environment and the command (one
    per node), and nothing written."""
    from qwenft.proc import launcher
    from qwenft.train import trains_line

    typer.echo(f"# run folder (not created): {plan.run_dir}")
    typer.echo(f"# {trains_line(plan.manifest)}")
    copy = plan.train_data if plan.train_data not in (None, plan.data_path) else None
    m = plan.manifest
    first = m.dataset.name
    if plan.config.get("data_file"):  # a TRL stage reads its prompt file itself
        typer.echo(f"# prompts: {plan.data_path} (read by the GRPO process; not registered)")
    else:
        typer.echo(
            f"# dataset {first} -> {copy or plan.data_path} (registered in "
            f"{plan.dataset_dir})" + (f"; written at launch from {plan.data_path}" if copy else "")
        )
    for rec in m.sources:
        typer.echo(f"# dataset {rec.name} -> {rec.path}")
    for rec in m.eval_data:
        typer.echo(f"# eval dataset {rec.name} -> {rec.path}")
    typer.echo("# --- train.yaml ---")
    typer.echo(plan.yaml_text, nl=False)
    typer.echo("# --- environment ---")
    for key, value in plan.env.items():
        typer.echo(f"{key}={value}")
    typer.echo("# --- command ---")
    nnodes = plan.manifest.nnodes
    if nnodes == 1:
        typer.echo(launcher.format_command(plan.argv, plan.env))
        return
    for rank in range(nnodes):
        env = {**plan.env, "NODE_RANK": str(rank)}
        typer.echo(f"# node {rank} of {nnodes}:")
        typer.echo(launcher.format_command(plan.argv, env))


def _resume(
    run_dir: Path,
    data: Path | None,
    method: str | None,
    template: str | None,
    force: bool,
    verbose: bool = False,
    submit: bool = False,
) -> dict:
    from qwenft.train import resume_train

    with stdout_for_results():
        return resume_train(
            run_dir,
            data=data,
            method=method,
            template=template,
            force=force,
            progress=err,
            verbose=verbose,
            submit=submit,
        )


def _report_training(result: dict, as_json: bool = False) -> None:
    """The end-of-training summary on stderr; the run folder (or its manifest) on stdout."""

    def num(key: str, fmt: str) -> str:
        return format(result[key], fmt) if isinstance(result.get(key), int | float) else "-"

    # two times: training (the trainer's own runtime) and the wall time with start-up and saving
    took = f"{num('wall_s', '.0f')} s wall time"
    if isinstance(result.get("train_runtime_s"), int | float):
        took = f"training {num('train_runtime_s', '.0f')} s ({num('wall_s', '.0f')} s wall time with start-up)"
    procs = result.get("processes")
    err(
        f"done: {result['global_step']} steps, {took} | loss {num('first_loss', '.4f')} -> "
        f"{num('final_loss', '.4f')} (best {num('best_loss', '.4f')})"
        + (
            f" | eval loss {num('first_eval_loss', '.4f')} -> {num('eval_loss', '.4f')}"
            if result.get("eval_loss") is not None
            else ""
        )
        + f" | {num('tokens_per_second', '.0f')} "
        f"real tokens/s | peak memory {num('peak_mem_gib', '.2f')} GiB "
        f"({num('processes', 'd')} process{'' if procs == 1 else 'es'})"
    )
    figures = result.get("stage_figures") or {}
    if figures:
        err(
            f"{result.get('stage')}: "
            + " | ".join(f"{key} {_fig(a)} -> {_fig(b)}" for key, (a, b) in figures.items())
        )
    err(
        f"log: {result['log']}"
        + (f" | loss plot: {result['loss_plot']}" if result.get("loss_plot") else "")
    )
    if result.get("stage") == Stage.RM:  # a reward model: scores, never chats
        err(f"next: qwenft score {result['run_dir']} FILE (conversations or pairs)")
    elif not result["mergeable"]:  # its own weights, or a LoRA on a quantized base
        err(f"next: qwenft chat {result['run_dir']}")
    else:
        err(f"next: qwenft merge {result['run_dir']} (or qwenft chat {result['run_dir']})")
    _print_result(Path(result["run_dir"]), result["run_dir"], as_json)


def _fig(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def _print_result(run_dir: Path, text: str, as_json: bool) -> None:
    """stdout: `text` (a folder), or with --json the run's manifest (qwenft.json)."""
    if as_json:
        from qwenft.runs.manifest import read_manifest

        typer.echo(read_manifest(run_dir).to_json().rstrip("\n"))
    else:
        typer.echo(text)


@app.command("resume")
@handle_errors
def resume_cmd(
    run_dir: Annotated[Path, typer.Argument(help="An interrupted or failed run folder.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Must match the run's data (sha256).")
    ] = None,
    method: Annotated[
        str | None, choice_option("--method", Method.values(), "Must match the run's method.")
    ] = None,
    template: Annotated[
        str | None,
        choice_option("--template", Template.values(), "Must match the run's template."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Continue despite changed inputs.")
    ] = False,
    submit: Annotated[
        bool, typer.Option("--submit", help="A Slurm run: submit its job again (sbatch).")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Continue a run from its newest checkpoint (same step, optimizer and LR schedule)."""
    result = _resume(run_dir, data, method, template, force, verbose, submit)
    if submit:
        typer.echo(result["run_dir"])
        return
    _report_training(result)


@app.command(hidden=True)
@handle_errors
def start(
    run_dir: Annotated[Path, typer.Argument(help="A run folder prepared for a scheduler.")],
    verbose: VerboseOpt = False,
) -> None:
    """This node's part of a prepared run (what a Slurm job's tasks run: RUN/launch.sbatch)."""
    from qwenft.train import start_node

    with stdout_for_results():
        result = start_node(run_dir, progress=err, verbose=verbose)
    if result is not None:
        _report_training(result)


@app.command()
@handle_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A LoRA/QLoRA run folder.")],
    export_dir: Annotated[
        Path | None, typer.Option("--export-dir", help="Target (default RUN_DIR/merged).")
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check/--no-check", help="Greedy-generate once to check the model stops."),
    ] = True,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Compare merged logits with base + adapter on a few prompts."
        ),
    ] = False,
    verbose: VerboseOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run's manifest instead of the merged folder.")
    ] = False,
) -> None:
    """Merge a LoRA/QLoRA adapter into its base model with llamafactory-cli export.

    stdout carries only the merged folder (or --json: the run's manifest); the export's output
    goes to RUN/merge.log."""
    from qwenft.lf.merge import execute_merge, plan_merge

    plan = plan_merge(run_dir, export_dir)
    with stdout_for_results():
        result = execute_merge(plan, progress=err, check=check, verify=verify, verbose=verbose)
    if plan.config.get("stage") == Stage.RM:
        err(f"next: qwenft score {plan.run_dir} FILE (it reads the merged model now)")
    else:
        err(f"next: qwenft chat {result['merged']}")
    _print_result(plan.run_dir, result["merged"], as_json)


@app.command()
@handle_errors
def chat(
    target: TargetArg,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Answer once and exit.")
    ] = None,
    adapter: AdapterOpt = None,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt (default: the run's).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0 = greedy (reproducible).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="transformers; vllm (CUDA, if installed); llama.cpp (the run's GGUF export).",
        ),
    ] = "transformers",
    template: TemplateOpt = None,
    force: ForceTemplateOpt = False,
    tools: Annotated[
        Path | None,
        typer.Option(
            "--tools",
            help="An OpenAI tools list (JSON file): the model's calls are shown as calls and you "
            "type each result.",
        ),
    ] = None,
    thinking: Annotated[
        str,
        choice_option(
            "--thinking",
            Thinking.values(),
            "Qwen3: think first (on) or answer directly (off); auto: the run's mode.",
        ),
    ] = Thinking.AUTO.value,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image",
            help="Vision-language models: an image shown with --prompt (repeatable; "
            "interactively: /image PATH before a message).",
        ),
    ] = None,
) -> None:
    """Chat with a fine-tuned model: one answer with --prompt, else an interactive loop.

    Reasoning (Qwen3 <think>) goes to stderr as `thinking: ...`, the answer to stdout; the run's
    thinking mode is kept (--thinking off: Qwen3's no-think mode). With --tools, a call is shown
    as `tool call: NAME ARGUMENTS` and the tool's result is read (`result of NAME>`) before the
    model goes on (docs/agents.md)."""
    from qwenft.chat import ChatSession, chat_thinking, load_tools, run_turn
    from qwenft.models.target import refuse_reward_model, resolve_target

    tool_list = None
    if tools is not None:
        try:
            text = Path(tools).read_text(encoding="utf-8")
        except OSError as exc:
            raise QwenftError(f"cannot read --tools {tools}: {exc.strerror or exc}") from None
        tool_list = load_tools(text, f"--tools {tools}")
    if backend == "llama.cpp" and adapter is None:  # the run's GGUF alone
        from qwenft.chat import gguf_target

        resolved = gguf_target(target, template, force)
    else:
        resolved = resolve_target(target, adapter, template, force)
        refuse_reward_model(resolved, "chat")
    session = ChatSession(
        resolved,
        max_new_tokens,
        temperature,
        top_p,
        system,
        backend,
        tools=tool_list,
        enable_thinking=chat_thinking(
            resolved.enable_thinking, thinking, force, trained=resolved.manifest is not None
        ),
    )
    err(f"loading {session.target.source} ...")
    with stdout_for_results():  # stdout carries only the conversation
        session.load()

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    images = session.checked_images(image or [])
    if prompt is not None:
        try:
            run_turn(session, prompt, out, stream=False, images=images)
        except EOFError:  # a call whose result never came (stdin closed)
            err("(no tool result given: stopped at the call)")
        typer.echo("")
        return
    err(
        "type a message; /reset clears the conversation, /system TEXT sets the system prompt, "
        + ("/image PATH shows an image with the next message, " if session.vision else "")
        + "/exit quits"
    )
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            session.reset()
            err("(conversation cleared)")
            continue
        if line.startswith("/system"):
            session.system = line[len("/system") :].strip()
            session.reset()
            err(f"(system prompt set: {session.system!r}; conversation cleared)")
            continue
        if line.startswith("/image") and session.vision:
            try:
                images += session.checked_images([line[len("/image") :].strip()])
            except QwenftError as exc:
                err(f"error: {exc.message}")
                continue
            err(f"(image {len(images)} goes with your next message)")
            continue
        typer.echo("assistant> ", nl=False)
        try:
            run_turn(session, line, out, images=images)
            images = []
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            return
        typer.echo("")


@app.command()
@handle_errors
def models(as_json: JsonOpt = False) -> None:
    """List the Qwen models and presets qwenft knows, with template and size."""
    from dataclasses import asdict

    from qwenft.models.presets import FAMILIES, PRESETS

    rows = [
        {
            "name": p.name,
            "hub_id": p.hub_id,
            "family": p.family,
            "template": FAMILIES[p.family].template,
            "default_system": FAMILIES[p.family].default_system,
            "thinking": FAMILIES[p.family].thinking,
            "vision": FAMILIES[p.family].vision,  # images and videos in (a *_vl template)
            "params_b": round(p.arch.params / 1e9, 3),  # a vision encoder's included
            # a mixture-of-experts model: the parameters one token runs through
            "active_params_b": round(p.arch.active_params / 1e9, 3) if p.arch.moe else None,
            "moe": p.arch.moe is not None,
            "architecture": asdict(p.arch),
            "quantization": f"{p.quantization[0].upper()} {p.quantization[1]}-bit"
            if p.quantization
            else None,
        }
        for p in PRESETS.values()
    ]
    if as_json:
        print_json(rows)
        return
    typer.echo(
        f"{'NAME':<32} {'FAMILY':<20} {'TEMPLATE':<16} {'PARAMS':>8}  {'MOE (ACTIVE)':<14} "
        f"{'QUANTIZED':<11} HUB ID"
    )
    for r in rows:
        moe = f"MoE {r['active_params_b']:.3g}B" if r["moe"] else "-"
        typer.echo(
            f"{r['name']:<32} {r['family']:<20} {r['template']:<16} {r['params_b']:>7}B  "
            f"{moe:<14} {r['quantization'] or '-':<11} {r['hub_id'] or '(embedded)'}"
        )


@app.command()
@handle_errors
def doctor(as_json: JsonOpt = False) -> None:
    """Check the environment (packages, llamafactory-cli, GPUs, cache) and name the fixes."""
    from qwenft.doctor import as_dicts, run_checks

    err("checking the environment (imports torch in a subprocess, ~10 s) ...")
    checks = run_checks()
    if as_json:
        print_json(as_dicts(checks))
    else:
        for c in checks:
            mark = "ok " if c.ok else ("ERR" if c.required else "-- ")
            typer.echo(f"[{mark}] {c.name:<16} {c.detail}")
            if not c.ok and c.fix:
                typer.echo(f"      fix: {c.fix}")
    if any(c.required and not c.ok for c in checks):
        raise typer.Exit(1)


def _mount_subcommands() -> None:
    from qwenft.cli import data, export, plan, runs, use

    app.add_typer(data.app, name="data")
    app.add_typer(runs.app, name="runs")
    app.command("export")(export.export)
    app.command("plan")(plan.plan)
    app.command("serve")(use.serve)
    app.command("eval")(use.eval_cmd)
    app.command("score")(use.score)


_mount_subcommands()


def main() -> None:
    app()
