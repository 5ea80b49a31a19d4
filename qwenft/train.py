"""`qwenft train`: check everything, render the run folder, launch LLaMA-Factory, record the outcome.

plan_train() reads and checks but writes nothing (it is all --dry-run needs); execute_train()
builds the tiny model if needed, registers the dataset, creates the run folder atomically,
launches `llamafactory-cli train` and finalizes the manifest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwenft import cache, datasets, launcher, presets, render, runs
from qwenft.errors import JobFailed, QwenftError
from qwenft.paths import default_dataset_dir


@dataclass
class TrainRequest:
    method: str
    model: str
    data: Path
    output_dir: Path | None = None
    gpus: int | None = None
    deepspeed: str = "auto"
    template: str | None = None
    thinking: str = "auto"  # auto | on | off (Qwen3 hybrid models only)
    # GB per GPU for --method auto and the fit check; default: what the GPUs report
    gpu_mem_gb: float | None = None
    overlength: str = "warn"  # samples longer than cutoff_len: warn | drop | fail
    dataset_dir: Path | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    config_file: Path | None = None
    set_items: list[str] = field(default_factory=list)
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainPlan:
    run_dir: Path
    config: dict[str, Any]
    yaml_text: str
    argv: list[str]
    env: dict[str, str]
    model: presets.ResolvedModel
    dataset_name: str
    dataset_dir: Path
    data_path: Path
    data_sha256: str
    deepspeed: str
    files: dict[str, str]
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # choices and warnings to show before launch
    overlength: str = "warn"
    train_data: Path | None = (
        None  # what LLaMA-Factory reads (a filtered copy with --overlength drop)
    )


OVERLENGTH = ("warn", "drop", "fail")
FILTERED_DATA = "data.fit.jsonl"


def detect_gpus() -> list[dict[str, Any]]:
    """Visible NVIDIA GPUs (name, memory GiB, compute capability) via nvidia-smi; [] if none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, mem, cap = (x.strip() for x in line.split(","))
        gpus.append({"name": name, "memory_gib": float(mem) / 1024, "compute_cap": float(cap)})
    return gpus


def _thinking_choice(req: TrainRequest, model: presets.ResolvedModel, data: Path) -> bool | None:
    """enable_thinking for Qwen3 hybrid models, decided from the data unless the user chose."""
    if model.thinking != "hybrid":
        return None
    if req.thinking in ("on", "off"):
        return req.thinking == "on"
    with_think, total = datasets.count_thinking_samples(data)
    if with_think == 0:
        return False
    if with_think == total:
        return True
    raise QwenftError(
        f"{with_think} of {total} samples in {data} have <think> blocks and the rest do not",
        "decide with --thinking on (train reasoning) or --thinking off (train direct answers)",
    )


def plan_train(req: TrainRequest, gpus_seen: list[dict[str, Any]] | None = None) -> TrainPlan:
    """Check every input and render the run; raises QwenftError and writes nothing."""
    if req.method not in (*render.METHODS, "auto"):
        raise QwenftError(
            f"unknown method {req.method!r}", f"choose auto or one of {', '.join(render.METHODS)}"
        )
    if req.deepspeed not in (*render.DEEPSPEED_STAGES, "auto"):
        raise QwenftError(
            f"unknown --deepspeed {req.deepspeed!r}",
            f"choose auto or one of {', '.join(render.DEEPSPEED_STAGES)}",
        )
    gpus_seen = detect_gpus() if gpus_seen is None else gpus_seen
    nproc = req.gpus if req.gpus is not None else max(1, len(gpus_seen))
    if nproc < 1:
        raise QwenftError(
            f"--gpus must be at least 1 (got {nproc})", "omit --gpus to use every visible GPU"
        )
    if req.nnodes < 1 or not 0 <= req.node_rank < req.nnodes:
        raise QwenftError(
            f"--node-rank must be in 0..{req.nnodes - 1} and --nnodes at least 1",
            "number the machines 0, 1, ... with --node-rank; 0 is the master",
        )
    if req.nnodes > 1 and not req.master_addr:
        raise QwenftError(
            "--nnodes > 1 needs --master-addr",
            "pass the address of node 0 that every node can reach",
        )
    cli = launcher.find_llamafactory_cli()

    report = datasets.require_valid(Path(req.data).expanduser(), "nothing was started")
    data = report.path.resolve()
    sha = datasets.file_sha256(data)

    model = presets.resolve_model(req.model)
    if req.template:
        if req.template not in presets.TEMPLATES:
            raise QwenftError(
                f"unknown template {req.template!r}",
                f"choose one of {', '.join(presets.TEMPLATES)}",
            )
        if req.template != model.template:
            fam = presets.FAMILIES[presets.template_family(req.template)]
            model.template, model.thinking = req.template, fam.thinking
    enable_thinking = _thinking_choice(req, model, data)
    req, notes = _fit_to_memory(req, model, gpus_seen, nproc)

    config_file: dict[str, Any] = {}
    if req.config_file:
        try:
            config_file = yaml.safe_load(Path(req.config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise QwenftError(f"cannot read --config {req.config_file}: {exc}") from exc
        if not isinstance(config_file, dict):
            raise QwenftError(f"--config {req.config_file} must hold a YAML mapping of keys")
    set_values = render.parse_set(req.set_items)

    stage = req.deepspeed
    if stage == "auto":
        stage = "z3" if req.method == "full" else "none"
    run_dir = (
        Path(req.output_dir) if req.output_dir else runs.default_run_dir(req.model, req.method)
    )
    runs.check_new_run_dir(run_dir)
    run_dir = run_dir.expanduser().absolute()
    dataset_dir = (req.dataset_dir or default_dataset_dir()).expanduser().absolute()
    if req.overlength not in OVERLENGTH:
        raise QwenftError(
            f"unknown --overlength {req.overlength!r}", f"choose one of {', '.join(OVERLENGTH)}"
        )
    dataset_name = datasets.dataset_name_for(data, sha)
    train_data = data
    if req.overlength == "drop":
        # Trained on a filtered copy inside the run folder, registered under a run-specific name.
        train_data = run_dir / FILTERED_DATA
        dataset_name = f"{dataset_name}-fit-{run_dir.name}"

    files: dict[str, str] = {}
    ds_path = None
    if stage != "none":
        files["deepspeed.json"] = render.deepspeed_config_text(stage)
        ds_path = str(run_dir / "deepspeed.json")
    spec = render.TrainSpec(
        method=req.method,
        model_path=model.path,
        template=model.template,
        default_system=model.default_system,
        dataset=dataset_name,
        dataset_dir=str(dataset_dir),
        output_dir=str(run_dir),
        enable_thinking=enable_thinking,
        deepspeed_path=ds_path,
        bf16=bool(gpus_seen) and all(g["compute_cap"] >= 8.0 for g in gpus_seen),
        config_file=config_file,
        knobs=req.knobs,
        set_values=set_values,
    )
    config = render.build_train_config(spec)
    if "tokenized_path" not in config and req.nnodes == 1:
        # Several nodes on one shared file system could race on the cache: only for one node.
        key_sha = sha if req.overlength != "drop" else f"{sha}:drop-overlength"
        config["tokenized_path"] = str(cache.tokenized_dir(config, key_sha, model.kind))
    yaml_text = render.to_yaml(config, header=f"qwenft {req.method} fine-tune of {req.model}")
    files["train.yaml"] = yaml_text

    dist = launcher.Distributed(
        nproc_per_node=nproc,
        nnodes=req.nnodes,
        node_rank=req.node_rank,
        master_addr=req.master_addr,
        master_port=req.master_port,
        force_torchrun=stage != "none",
    )
    argv, env = launcher.build_train_command(cli, run_dir / "train.yaml", dist, model.kind)
    manifest = runs.new_manifest(
        kind="train",
        method=req.method,
        model=model.to_dict(),
        template=model.template,
        default_system=model.default_system,
        enable_thinking=enable_thinking,
        deepspeed=stage,
        gpus=nproc,
        nnodes=req.nnodes,
        dataset={
            "path": str(data),
            "sha256": sha,
            "name": dataset_name,
            "dataset_dir": str(dataset_dir),
            "samples": report.n_samples,
            "train_path": str(train_data),
        },
        overlength={"mode": req.overlength},
        command=argv,
        env=env,
        versions=runs.package_versions(),
    )
    files[runs.MANIFEST] = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    return TrainPlan(
        run_dir,
        config,
        yaml_text,
        argv,
        env,
        model,
        dataset_name,
        dataset_dir,
        data,
        sha,
        stage,
        files,
        manifest,
        notes,
        req.overlength,
        train_data,
    )


def _fit_to_memory(
    req: TrainRequest, model: presets.ResolvedModel, gpus_seen: list[dict[str, Any]], nproc: int
) -> tuple[TrainRequest, list[str]]:
    """--method auto picks what fits (qwenft plan's choice); otherwise warn when the plan says the
    run will not fit the GPUs in sight. Returns the (possibly filled-in) request and notes."""
    from dataclasses import replace

    from qwenft import memory

    gpu_mem = req.gpu_mem_gb or (
        min(g["memory_gib"] for g in gpus_seen) * 2**30 / 1e9 if gpus_seen else None
    )
    cutoff = req.knobs.get("cutoff_len") or render.load_template("lora")["cutoff_len"]
    given_batch = req.knobs.get("per_device_train_batch_size")
    if req.method == "auto":
        if model.arch is None or gpu_mem is None:
            raise QwenftError(
                "--method auto needs the model's shape and the GPU memory",
                "pass --gpu-mem GB (and a preset, hub id from `qwenft models` or a local folder)",
            )
        chosen, why = memory.choose_method(
            model.arch,
            gpu_mem,
            gpus=nproc,
            cutoff_len=cutoff,
            batch_size=given_batch,
            deepspeed=None if req.deepspeed == "auto" else req.deepspeed,
        )
        knobs = {**req.knobs, "per_device_train_batch_size": given_batch or chosen.batch_size}
        if chosen.method == "qlora":
            knobs["quantization_bit"] = chosen.bits
        deepspeed = chosen.deepspeed if req.deepspeed == "auto" else req.deepspeed
        return replace(req, method=chosen.method, deepspeed=deepspeed, knobs=knobs), [
            f"auto: {why}"
        ]
    if model.arch is None or gpu_mem is None:
        return req, []
    stage = req.deepspeed if req.deepspeed != "auto" else ("z3" if req.method == "full" else "none")
    template = render.load_template(req.method)  # the run's defaults where no knob was given
    bits = req.knobs.get("quantization_bit") or (4 if req.method == "qlora" else None)
    est = memory.estimate(
        memory.PlanInput(
            arch=model.arch,
            method=req.method,
            bits=bits,
            gpus=nproc,
            deepspeed=stage,
            cutoff_len=cutoff,
            batch_size=given_batch or template["per_device_train_batch_size"],
            lora_rank=req.knobs.get("lora_rank") or template.get("lora_rank", 16),
            gpu_mem_gb=gpu_mem,
        )
    )
    if est.fits is not False:
        return req, []
    note = (
        f"warning: qwenft plan predicts {est.peak_bytes / 1e9:.1f} GB per GPU for this run, "
        f"more than the {gpu_mem:.1f} GB available"
    )
    try:
        _, why = memory.choose_method(model.arch, gpu_mem, gpus=nproc, cutoff_len=cutoff)
        note += f"; what would fit: {why}"
    except QwenftError:
        note += "; nothing qwenft plans fits: add GPUs or lower --cutoff-len"
    return req, [note]


def execute_train(plan: TrainPlan, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare the model, measure over-long samples, create the run folder, register the data,
    launch training and finalize the record. Refusals (--overlength fail) happen before any write."""
    _ensure_model(plan.model.kind, plan.model.spec, progress)
    stats = overlength_stats(plan, progress)
    n_over = stats["n_over_cutoff"]
    cutoff = plan.config["cutoff_len"]
    if n_over and plan.overlength == "fail":
        raise QwenftError(
            f"{n_over} sample(s) exceed cutoff_len {cutoff} (lines {_lines(stats)}); nothing was started",
            f"raise --cutoff-len (suggested: {stats['suggested_cutoff_len']}), shorten them, or "
            "use --overlength drop",
        )
    if n_over and plan.overlength == "warn":
        progress(
            f"warning: {n_over} sample(s) exceed cutoff_len {cutoff} and lose {stats['tokens_cut']} "
            f"tokens to truncation (lines {_lines(stats)}); suggested --cutoff-len "
            f"{stats['suggested_cutoff_len']}, or --overlength drop|fail"
        )
    record = {
        "mode": plan.overlength,
        "n_over_cutoff": n_over,
        "tokens_cut": stats["tokens_cut"],
        "cutoff_len": cutoff,
    }

    def add_filtered_copy(stage: Path) -> None:
        if plan.overlength != "drop":
            return
        kept, dropped = datasets.write_without_lines(
            plan.data_path, stage / FILTERED_DATA, stats["over_cutoff_lines"]
        )
        record.update(
            kept=kept, dropped=dropped, filtered_sha256=datasets.file_sha256(stage / FILTERED_DATA)
        )
        progress(f"--overlength drop: training on {kept} samples, {dropped} over-long dropped")

    run_dir = runs.create_run_dir(plan.run_dir, plan.files, prepare=add_filtered_copy)
    progress(f"run folder: {run_dir}")
    runs.update_manifest(run_dir, overlength=record)
    datasets.register_dataset(
        plan.train_data or plan.data_path, plan.dataset_name, plan.dataset_dir
    )
    return _launch(run_dir, plan.argv, plan.env, progress, plan.config.get("tokenized_path"))


def _lines(stats: dict[str, Any], shown: int = 5) -> str:
    lines = stats["over_cutoff_lines"]
    return ", ".join(map(str, lines[:shown])) + (", ..." if len(lines) > shown else "")


def overlength_stats(plan: TrainPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    """Token counts of the data under the run's template and cutoff_len, exactly as LLaMA-Factory
    will preprocess it; cached beside the tokenized data, so repeat runs pay nothing."""
    from qwenft.fsutil import atomic_write_json

    cfg = plan.config
    tokenized = cfg.get("tokenized_path")
    sidecar = Path(f"{tokenized}.overlength.json") if tokenized else None
    if sidecar and sidecar.is_file():
        return json.loads(sidecar.read_text())
    progress("measuring sample lengths with the run's tokenizer and template ...")
    stats = datasets.token_stats(
        plan.data_path,
        Path(plan.model.path),
        cfg["template"],
        cfg["cutoff_len"],
        default_system=cfg.get("default_system"),
        enable_thinking=cfg.get("enable_thinking", True),
        train_on_prompt=bool(cfg.get("train_on_prompt")),
        mask_history=bool(cfg.get("mask_history")),
        max_lines=None,
    )
    if sidecar:
        atomic_write_json(sidecar, stats)
    return stats


def _ensure_model(kind: str, spec: str, progress: Callable[[str], None]) -> None:
    if kind == "tiny":
        from qwenft.tiny import ensure_tiny_model

        ensure_tiny_model(spec.lower(), progress=progress)


def _launch(
    run_dir: Path,
    argv: list[str],
    env: dict[str, str],
    progress: Callable[[str], None],
    tokenized: str | None,
) -> dict[str, Any]:
    """Run `llamafactory-cli train` in run_dir under the loss watch; record how it ended."""
    import resource

    tokenized_path = Path(tokenized) if tokenized else None
    cache_hit = False
    if tokenized_path:
        cache.discard_partial(tokenized_path)
        cache_hit = cache.is_ready(tokenized_path)
        progress(f"tokenized data: {'reusing' if cache_hit else 'will cache at'} {tokenized_path}")
    progress(f"launching: {launcher.format_command(argv, env)}")
    log_path = run_dir / "train.log"
    started = time.monotonic()
    runs.update_manifest(
        run_dir,
        status="running",
        started=runs.now_iso(),
        log=str(log_path),
        tokenized_cache={"path": tokenized, "hit": cache_hit} if tokenized else None,
    )
    resume_hint = f"resume with: qwenft resume {run_dir}"
    try:
        code = launcher.run(argv, env, log_path, cwd=run_dir, monitor=runs.LossWatch(run_dir))
    except launcher.Interrupted as exc:
        runs.update_manifest(run_dir, status="interrupted", ended=runs.now_iso())
        raise launcher.Interrupted(f"{exc}; the run is marked interrupted", resume_hint) from None
    except launcher.Stopped as exc:
        runs.update_manifest(run_dir, status="failed", ended=runs.now_iso(), reason=str(exc))
        raise JobFailed(f"training stopped: {exc}", f"read the log: {log_path}") from None
    if tokenized_path:
        cache.mark_if_saved(tokenized_path, log_path.read_text(encoding="utf-8", errors="replace"))
    summary = runs.training_summary(run_dir)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["peak_rss_gib"] = round(
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2
    )
    summary["log"] = str(log_path)
    status = "completed" if code == 0 else "failed"
    runs.update_manifest(
        run_dir,
        status=status,
        ended=runs.now_iso(),
        returncode=code,
        summary=summary,
        final_loss=summary["final_loss"],
        tokens_per_second=summary["tokens_per_second"],
    )
    if code != 0:
        raise JobFailed(
            f"llamafactory-cli train exited with code {code}",
            f"read the log: {log_path}; {resume_hint}",
            returncode=code,
        )
    return {"run_dir": str(run_dir), **summary}


def resume_train(
    run_dir: Path,
    *,
    data: Path | None = None,
    method: str | None = None,
    template: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Continue a run from its newest checkpoint (LLaMA-Factory restores step, optimizer and LR
    schedule); refuse when the data, template or method differ from the manifest unless forced."""
    run_dir = Path(run_dir).expanduser().absolute()
    m = runs.read_manifest(run_dir)
    if m.get("status") == "completed" and not force:
        raise QwenftError(
            f"{run_dir} already completed", "start a new run, or --force to run it again"
        )
    ds = m["dataset"]
    data_path = Path(data).expanduser().resolve() if data else Path(ds["path"])
    if not data_path.is_file():
        raise QwenftError(
            f"the run's data file is gone: {data_path}", "pass --data with the same file"
        )
    problems = []
    sha = datasets.file_sha256(data_path)
    if sha != ds["sha256"]:
        problems.append(
            f"the data changed (sha256 {sha[:12]} != {ds['sha256'][:12]} in the manifest)"
        )
    if method and method != m["method"]:
        problems.append(f"method {method} != {m['method']}")
    if template and template != m["template"]:
        problems.append(f"template {template} != {m['template']}")
    if problems and not force:
        raise QwenftError(
            f"cannot resume {run_dir}: " + "; ".join(problems),
            "resume with the run's own inputs, or --force to continue anyway",
        )
    checkpoints = sorted(
        run_dir.glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    if not checkpoints:
        raise QwenftError(
            f"{run_dir} has no checkpoint-* to resume from",
            "start a new run (lower save_steps to checkpoint more often)",
        )
    _ensure_model(m["model"]["kind"], m["model"]["spec"], progress)
    datasets.register_dataset(
        Path(ds.get("train_path") or ds["path"]), ds["name"], Path(ds["dataset_dir"])
    )
    resumes = [
        *m.get("resumes", []),
        {
            "at": runs.now_iso(),
            "from": checkpoints[-1].name,
            "forced": bool(problems),
            "problems": problems,
        },
    ]
    runs.update_manifest(run_dir, resumes=resumes)
    progress(f"resuming {run_dir} from {checkpoints[-1].name}")
    tokenized = yaml.safe_load((run_dir / "train.yaml").read_text()).get("tokenized_path")
    return _launch(run_dir, m["command"], m["env"], progress, tokenized)
