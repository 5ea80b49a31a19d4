"""`qwenft plan`: predict peak GPU memory per device before launching, or pick the method that fits.

Mounted by qwenft/cli/__init__.py with `app.command("plan")(plan)`. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qwenft.choices import AUTO, DEFAULT_METHOD, Stage
from qwenft.cli.common import (
    DeepSpeedOpt,
    JsonOpt,
    MethodOpt,
    choice_option,
    handle_errors,
    knob_options,
)
from qwenft.knobs import NO_KNOBS, PLAN, KnobValues

PlanStageOpt = Annotated[
    str,
    choice_option(
        "--stage",
        Stage.values(),
        "Training stage: dpo/orpo/simpo hold chosen + rejected per sample; full dpo/kto "
        "add a frozen reference model.",
    ),
]

_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "reference_model": "reference model (frozen)",
    "activations": "activations",
    "vision_activations": "vision activations",
    "logits_and_loss": "logits + loss",
    "no_grad_forward": "reference/KL forward (no grad)",
    "buffers": "buffers (DeepSpeed/dequant)",
    "optimizer_step": "optimizer step (transient)",
    "allocator_slack": "allocator slack",
    "cuda_context": "CUDA context",
}


@handle_errors
@knob_options(PLAN)
def plan(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Preset, hub id from `qwenft models`, or local folder."),
    ],
    method: MethodOpt = None,
    stage: PlanStageOpt = Stage.SFT.value,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs (processes) sharing the run.")] = 1,
    deepspeed: DeepSpeedOpt = AUTO,
    knobs: KnobValues = NO_KNOBS,  # the knob table's plan options (knob_options)
    gpu_mem: Annotated[
        float | None,
        typer.Option("--gpu-mem", help="Memory of one GPU in GB (1e9 bytes), e.g. 24 or 80."),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            "-d",
            help="Size for this data (repeatable: a mixture's files): its longest sample, padded "
            "as the trainer pads a batch, instead of cutoff_len (needs the model's tokenizer).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict peak GPU memory per device, with a breakdown, and whether it fits --gpu-mem.

    The defaults (cutoff_len, batch size, LoRA rank and target, DeepSpeed stage) are the ones
    `qwenft train` uses for the same options. With --data, the sequence length is the data's
    longest sample (no batch is longer), measured as train tokenizes it."""
    from qwenft import memory, settings

    stage = Stage.parse(stage, "--stage")

    def resolved(chosen: KnobValues) -> Any:  # settings.RunSettings
        return settings.resolve(
            settings.RunRequest(
                model=model,
                method=method or DEFAULT_METHOD.value,
                deepspeed=deepspeed,
                gpus=gpus,
                gpu_mem_gb=gpu_mem,
                knobs=chosen,
                stage=stage,
                data=data[0] if data else None,
            )
        )

    run = resolved(knobs)
    sized = None
    if data:
        # measuring loads the tokenizer (and an image processor), whose imports print to stdout
        # (DeepSpeed's accelerator line): keep stdout for the result (--json)
        with contextlib.redirect_stdout(sys.stderr):
            sized = _data_length(run, data, stage)
    if sized and sized["length"] < run.cutoff_len:
        run = resolved(KnobValues({**knobs, "cutoff_len": sized["length"]}))
    inp = run.plan_input(images=sized["images"] if sized else 0)  # carries the stage
    result = run.auto_plan or memory.estimate(inp)
    why = run.auto_why
    if as_json:
        out = {"model": model, **result.to_dict()}
        if why:
            out["explanation"] = why
        if sized:
            out["data"] = sized
        typer.echo(json.dumps(out, indent=2))
        return
    if sized:
        typer.echo(sized["line"])
    _print_table(model, result, why, inp)


def _data_length(run: Any, files: list[Path], stage: str) -> dict[str, Any]:
    """The sequence length a run on these files reaches (settings.RunSettings `run`): its longest
    sample as train tokenizes it (pipeline.file_stats), padded to a multiple of 8 as
    LLaMA-Factory's collator pads a training batch, at most cutoff_len; packed pt: cutoff_len
    (every block is full)."""
    from qwenft.cli.common import err
    from qwenft.data import check
    from qwenft.data.images import most_images
    from qwenft.data.pipeline import DataSpec, file_stats
    from qwenft.models.target import base_target

    kind = Stage(stage).facts.data.value
    target = base_target(run.model)
    target.ensure_built(progress=err)
    spec = DataSpec.from_settings(run, kind=kind)
    longest, samples, lengths, images = 0, 0, [], 0
    for path in files:
        report = check.require_valid(path, "nothing was planned", kind=kind)
        if report.has_images:  # the most images one row holds (its vision tower's work)
            images = max(images, most_images(path))
        stats = file_stats(path, spec, target.model_path, max_lines=None)
        longest = max(longest, stats.length.max)
        samples += stats.n_samples
        lengths.append(
            f"{path.name} p50 {stats.length.p50} p99 {stats.length.p99} max {stats.length.max}"
        )
    cutoff = run.cutoff_len
    length = cutoff if spec.packed else min(cutoff, 8 * math.ceil(longest / 8))
    why = (
        "packed: every block is cutoff_len long"
        if spec.packed
        else f"the longest sample, {longest} tokens, padded to a multiple of 8"
        if length < cutoff
        else f"cutoff_len (the longest sample, {longest} tokens, is cut there)"
    )
    line = (
        f"data: {samples} samples ({'; '.join(lengths)}): sized for {length} tokens per "
        f"sequence, {why}"
    )
    if images:
        line += f"; up to {images} image(s) a sample"
    return {
        "samples": samples,
        "longest": longest,
        "length": length,
        "images": images,
        "line": line,
    }


def _print_table(model: str, p: Any, why: str | None, inp: Any) -> None:  # memory.Plan, PlanInput
    from qwenft.memory import GB, GIB, OPTIMIZERS

    lora_rank, lora_target = inp.lora_rank, inp.lora_target
    gradient_checkpointing, liger = inp.gradient_checkpointing, inp.liger
    if p.method == "full":
        what = "full fine-tuning"
    elif p.method == "freeze":
        n = p.trainable_layers
        what = f"freeze ({'last' if n > 0 else 'first'} {abs(n)} layer{'s' if abs(n) != 1 else ''})"
    else:
        quant = f"QLoRA {p.bits}-bit" if p.method == "qlora" else "LoRA"
        what = f"{quant}, rank {lora_rank} on {lora_target}"
    if p.stage != "sft":
        what = f"{p.stage}, {what}"
    ds = "no DeepSpeed" if p.deepspeed == "none" else f"DeepSpeed {p.deepspeed}"
    extras = ["gradient checkpointing" if gradient_checkpointing else "no gradient checkpointing"]
    if liger:
        extras.append("Liger")
    extras.append(f"{OPTIMIZERS[p.optimizer]} optimizer")
    if why:
        typer.echo(f"auto: {why}")
    typer.echo(
        f"{model}: {what}; {p.gpus} GPU(s), {ds}; batch {p.batch_size}"
        + (
            f" pairs ({p.sequences_per_step} sequences)"
            if p.sequences_per_step > p.batch_size
            else ""
        )
        + f" x {p.cutoff_len} tokens; "
        f"{', '.join(extras)}"
    )
    active = (
        f" ({p.active_params / 1e9:.2f}B active per token: mixture of experts)"
        if p.active_params != p.total_params
        else ""
    )
    typer.echo(
        f"params: {p.total_params / 1e9:.2f}B total{active}, "
        f"{p.trainable_params / 1e6:,.1f}M trainable"
    )
    if p.coverage:
        typer.echo(f"trains: {p.coverage['line']}")
    typer.echo("")
    typer.echo(f"  {'PER GPU':<34} {'GB':>8} {'GiB':>8}")
    for key, value in p.breakdown.items():
        if value <= 0:
            continue
        typer.echo(f"  {_LABELS.get(key, key):<34} {value / GB:>8.2f} {value / GIB:>8.2f}")
    typer.echo(f"  {'-' * 52}")
    typer.echo(
        f"  {'predicted peak (' + p.peak_phase + ')':<34} {p.peak_gb:>8.2f} {p.peak_gib:>8.2f}"
    )
    if p.cpu_offload_bytes:
        typer.echo(
            f"  {'CPU RAM per process (offload)':<34} {p.cpu_offload_bytes / GB:>8.2f} "
            f"{p.cpu_offload_bytes / GIB:>8.2f}"
        )
    typer.echo("")
    if p.fits is None:
        typer.echo("fits: unknown (pass --gpu-mem GB to check)")
    elif p.fits:
        typer.echo(f"fits in {p.gpu_mem_gb:g} GB: yes, {p.margin_gb:.2f} GB to spare")
    else:
        typer.echo(f"fits in {p.gpu_mem_gb:g} GB: NO, {-p.margin_gb:.2f} GB short")
    for note in p.notes:
        typer.echo(f"note: {note}")
