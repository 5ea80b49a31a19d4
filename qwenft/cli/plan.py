"""`qwenft plan`: predict peak GPU memory per device before launching, or pick the method that fits.

Mounted by qwenft/cli/__init__.py with `app.command("plan")(plan)`. Imports nothing heavy.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from qwenft.cli.common import JsonOpt, handle_errors
from qwenft.errors import QwenftError

_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_and_loss": "logits + loss",
    "buffers": "buffers (DeepSpeed/dequant)",
    "optimizer_step": "optimizer step (transient)",
    "allocator_slack": "allocator slack",
    "cuda_context": "CUDA context",
}


@handle_errors
def plan(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Preset, hub id from `qwenft models`, or local folder."),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method", help="full, freeze, lora, qlora, or auto (best that fits --gpu-mem)."
        ),
    ] = "lora",
    bits: Annotated[
        int | None, typer.Option("--bits", help="QLoRA quantization: 4 (default) or 8.")
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs (processes) sharing the run.")] = 1,
    deepspeed: Annotated[
        str,
        typer.Option(
            "--deepspeed",
            help="auto (as train: z3 for full, none otherwise), none, z0, z2, z3, "
            "z2-offload, z3-offload.",
        ),
    ] = "auto",
    cutoff_len: Annotated[
        int, typer.Option("--cutoff-len", help="Tokens per sample (the worst case).")
    ] = 1024,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="per_device_train_batch_size (auto: largest that fits)."),
    ] = None,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank.")] = 16,
    lora_target: Annotated[
        str, typer.Option("--lora-target", help="all, or a comma list such as q_proj,v_proj.")
    ] = "all",
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="LLaMA-Factory checkpoints by default.",
        ),
    ] = True,
    liger: Annotated[
        bool, typer.Option("--liger", help="Liger kernels (fused cross-entropy).")
    ] = False,
    gpu_mem: Annotated[
        float | None,
        typer.Option("--gpu-mem", help="Memory of one GPU in GB (1e9 bytes), e.g. 24 or 80."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict peak GPU memory per device, with a breakdown, and whether it fits --gpu-mem."""
    result, why = _plan(
        model,
        method,
        bits,
        gpus,
        deepspeed,
        cutoff_len,
        batch_size,
        lora_rank,
        lora_target,
        gradient_checkpointing,
        liger,
        gpu_mem,
    )
    if as_json:
        out = {"model": model, **result.to_dict()}
        if why:
            out["explanation"] = why
        typer.echo(json.dumps(out, indent=2))
        return
    _print_table(model, result, why, lora_rank, lora_target, gradient_checkpointing, liger)


def _plan(
    model: str,
    method: str,
    bits: int | None,
    gpus: int,
    deepspeed: str,
    cutoff_len: int,
    batch_size: int | None,
    lora_rank: int,
    lora_target: str,
    gradient_checkpointing: bool,
    liger: bool,
    gpu_mem: float | None,
):  # noqa: ANN202 - (Plan, str | None)
    from qwenft import memory
    from qwenft.presets import resolve_model

    if deepspeed != "auto" and deepspeed not in memory.DEEPSPEED_STAGES:
        raise QwenftError(
            f"unknown --deepspeed {deepspeed!r}",
            f"choose auto or one of {', '.join(memory.DEEPSPEED_STAGES)}",
        )
    if method not in (*memory.METHODS, "auto"):
        raise QwenftError(
            f"unknown --method {method!r}", f"choose auto or one of {', '.join(memory.METHODS)}"
        )
    resolved = resolve_model(model)
    if resolved.arch is None:
        raise QwenftError(
            f"qwenft has no architecture numbers for {model}, so it cannot plan memory for it",
            "use a model listed by `qwenft models`, or download it and pass the local folder "
            "(its config.json is read)",
        )
    if method == "auto":
        if bits is not None:
            raise QwenftError(
                "--bits does not apply to --method auto", "auto tries 8-bit, then 4-bit"
            )
        return memory.choose_method(
            resolved.arch,
            gpu_mem,
            gpus=gpus,
            cutoff_len=cutoff_len,
            batch_size=batch_size,
            lora_rank=lora_rank,
            lora_target=lora_target,
            gradient_checkpointing=gradient_checkpointing,
            liger=liger,
            deepspeed=None if deepspeed == "auto" else deepspeed,
        )
    if deepspeed == "auto":
        deepspeed = "z3" if method == "full" else "none"
    inp = memory.PlanInput(
        arch=resolved.arch,
        method=method,
        bits=bits,
        gpus=gpus,
        deepspeed=deepspeed,
        cutoff_len=cutoff_len,
        batch_size=1 if batch_size is None else batch_size,
        lora_rank=lora_rank,
        lora_target=lora_target,
        gradient_checkpointing=gradient_checkpointing,
        liger=liger,
        gpu_mem_gb=gpu_mem,
    )
    return memory.estimate(inp), None


def _print_table(
    model: str,
    p,
    why: str | None,
    lora_rank: int,
    lora_target: str,  # noqa: ANN001 - Plan
    gradient_checkpointing: bool,
    liger: bool,
) -> None:
    from qwenft.memory import GB, GIB

    what = {"full": "full fine-tuning", "freeze": "freeze (last 2 layers)"}.get(p.method)
    if what is None:
        quant = f"QLoRA {p.bits}-bit" if p.method == "qlora" else "LoRA"
        what = f"{quant}, rank {lora_rank} on {lora_target}"
    ds = "no DeepSpeed" if p.deepspeed == "none" else f"DeepSpeed {p.deepspeed}"
    extras = ["gradient checkpointing" if gradient_checkpointing else "no gradient checkpointing"]
    if liger:
        extras.append("Liger")
    if why:
        typer.echo(f"auto: {why}")
    typer.echo(
        f"{model}: {what}; {p.gpus} GPU(s), {ds}; batch {p.batch_size} x {p.cutoff_len} tokens; "
        f"{', '.join(extras)}"
    )
    typer.echo(
        f"params: {p.total_params / 1e9:.2f}B total, {p.trainable_params / 1e6:,.1f}M trainable"
    )
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
