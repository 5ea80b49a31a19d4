"""`qwenft train`: check everything, render the run folder, launch LLaMA-Factory, record the outcome.

plan_train() reads and checks but writes nothing (it is all --dry-run needs); execute_train()
builds the tiny model if needed, registers the dataset, creates the run folder atomically,
launches `llamafactory-cli train` and finalizes the manifest. Every stage (sft, pt, dpo, orpo,
simpo, kto) goes the same way; the data must be the kind the stage takes (the stage table, choices.STAGE_FACTS),
and `--from RUN_DIR` starts from an earlier run's weights (settings.from_run).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qwenft import knobs, settings
from qwenft.choices import (
    DEFAULT_OVERLENGTH,
    DataKind,
    DeepSpeed,
    Engine,
    Launcher,
    Method,
    Overlength,
    Stage,
    Template,
    stages_for,
)
from qwenft.data import (
    cache,
    check,
    convert,
    images,
    kinds,
    pipeline,
    prepare,
    reader,
    registry,
    split,
)
from qwenft.data.mixture import Mixture, Source, check_split, expected_samples, source_lines
from qwenft.data.pipeline import DataFiles, DataSpec, TokenStats
from qwenft.data.prepare import CacheState, cache_state, tokenize_ahead
from qwenft.errors import Interrupted, JobFailed, QwenftError, Stopped, raise_all
from qwenft.fsutil import atomic_write_json
from qwenft.launch import options as launch_options
from qwenft.launch import ray as ray_launch
from qwenft.launch import schedulers, slurm
from qwenft.launch.options import LaunchRequest
from qwenft.lf import launcher as lf_launcher
from qwenft.lf import render
from qwenft.lf.merge import merge_refusal
from qwenft.models import derived, moe_adapter, presets
from qwenft.models.target import base_target
from qwenft.paths import default_dataset_dir
from qwenft.proc import launcher
from qwenft.rl import engine as rl_engine
from qwenft.runs import tracking
from qwenft.runs.folder import check_new_run_dir, create_run_dir, default_run_dir
from qwenft.runs.lock import RunLock, newest_complete_checkpoint, set_aside_incomplete_checkpoints
from qwenft.runs.manifest import (
    MANIFEST,
    DatasetRecord,
    Manifest,
    is_inside,
    now_iso,
    package_versions,
    read_manifest,
    relocate_train_yaml,
    update_manifest,
)
from qwenft.runs.progress import Monitor, TrainProgress, read_end, surface_log
from qwenft.runs.watch import LossWatch, training_summary
from qwenft.settings import RunRequest


@dataclass
class TrainRequest(RunRequest):
    """`qwenft train`'s options: the run's choices (settings.RunRequest) and where it runs.
    `gpus` (processes per node) defaults to every visible GPU, else 1."""

    output_dir: Path | None = None
    overlength: str = DEFAULT_OVERLENGTH.value
    dataset_dir: Path | None = None
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # --launcher and its options; `nnodes` None: not given (1, or the scheduler's)
    launch: LaunchRequest = field(default_factory=LaunchRequest)
    dry_run: bool = False  # renders only: --gpus may name GPUs this machine does not have
    # several --data files, their shares and --eval-data (data.mixture); None: `data` alone
    mixture: Mixture | None = None


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
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # choices and warnings to show before launch
    overlength: str = DEFAULT_OVERLENGTH.value
    train_data: Path | None = (
        None  # what LLaMA-Factory reads (a filtered copy with --overlength drop, a .txt's jsonl)
    )
    # steps, logging_steps, save_steps, eval_steps, held_out, samples, per_step: see schedule()
    schedule: dict[str, Any] = field(default_factory=dict)
    stage: str = Stage.SFT.value
    kind: str = DataKind.SFT.value  # the data kind the stage takes
    packed: bool = False  # pt with packing: texts run on in cutoff_len blocks, nothing is cut
    parent: settings.FromRun | None = None
    launch: LaunchRequest = field(default_factory=LaunchRequest)
    mixture: Mixture | None = None  # several --data files or --eval-data (data.mixture)

    @functools.cached_property
    def data_spec(self) -> DataSpec:
        """The run's data arguments (train.yaml's values and --overlength), read once."""
        return DataSpec.from_config(self.config, overlength=self.overlength)

    @property
    def data_files(self) -> DataFiles:
        """The files LLaMA-Factory reads: what it trains on, the further --data files, the
        --eval-data files."""
        return data_files(self.manifest, self.train_data or self.data_path)


def data_files(m: Manifest, first: Path) -> DataFiles:
    """A run's data files from its manifest (`first`: the file read for its first source)."""
    return DataFiles(
        (first, *(Path(r.path) for r in m.sources)), tuple(Path(r.path) for r in m.eval_data)
    )


FILTERED_DATA = "data.fit.jsonl"
PT_DATA = "data.pt.jsonl"  # a .txt corpus as {"text"} rows, one per blank-line-separated block

# What each kind of data is, and how to get it, for the refusal of a stage/data mismatch.
KIND_WHAT = {
    DataKind.SFT: 'chat conversations (sft data: {"messages": [...]} ending with the assistant)',
    DataKind.PREFERENCE: 'preference pairs (a "messages" context with "chosen" and "rejected" '
    "answers)",
    DataKind.KTO: 'labelled answers (KTO data: "messages" with a boolean "label")',
    DataKind.PT: 'plain text (pt data: {"text": ...} rows or a .txt file)',
    DataKind.PROMPT: 'prompts (grpo data: "messages" ending with the user turn, and the fields '
    "the rewards read)",
}
KIND_FIX = {
    DataKind.SFT: 'give it {"messages": [...]} conversations ending with the assistant\'s answer',
    DataKind.PREFERENCE: "give it chosen/rejected pairs (docs/data.md); `qwenft data convert` "
    "reads LLaMA-Factory's, TRL's and UltraFeedback's pair files",
    DataKind.KTO: 'give every row a boolean "label" (true: a desirable answer, false: an '
    "undesirable one); `qwenft data convert` reads kto_tag and prompt/completion/label files",
    DataKind.PT: 'give it {"text": ...} rows or a .txt file (`qwenft data convert --from text` '
    "makes them from a corpus)",
    DataKind.PROMPT: 'give it {"messages": [..., user], "answer": ...} rows: the prompt and the '
    "fields --reward reads (docs/rl.md)",
}


def check_data_fits(path: Path, stage: str) -> None:
    """Refuse data of another kind than the stage takes (the stage table, choices.STAGE_FACTS), naming the stages
    that take it and what this stage needs. Rows in no kind's shape, and the rules of the kind,
    are left to check.require_valid."""
    want = Stage(stage).facts.data
    if not path.is_file():
        return
    try:
        found = kinds.detect_file_kind(path)
    except QwenftError:
        return
    if found is None or found == want or (want, found) == (DataKind.PROMPT, DataKind.SFT):
        return  # prompt rows have sft's keys: check.require_valid holds them to the prompt rules
    found = DataKind(found)
    takers = stages_for(found)
    raise QwenftError(
        f"--stage {stage} trains on {KIND_WHAT[want]}, but {path} holds {KIND_WHAT[found]}; "
        "nothing was started",
        f"{found.value} data trains with --stage {' | '.join(takers)}"
        + (f" (e.g. qwenft train --stage {takers[0]} --data {path} ...)" if takers else "")
        + f"; for --stage {stage}, {KIND_FIX[want]}",
    )


def placement(
    req: TrainRequest, gpus_seen: list[dict[str, Any]], env: Mapping[str, str]
) -> tuple[TrainRequest, int, list[str]]:
    """Where the run's processes start: the request with its nodes filled in (from the
    command line, else a scheduler's variables: launch.schedulers), the processes per node and
    the notes to show. Refuses a launcher's options that do not fit (every problem at once)."""
    launch = req.launch
    kind = Launcher(Launcher.parse(launch.launcher, "--launcher"))
    raise_all(launch_options.problems(launch, req.nnodes, dry_run=req.dry_run))
    if launch.submit:
        slurm.sbatch_path()  # refused before anything is written
    notes: list[str] = []
    given = req.nnodes is not None or req.node_rank or req.master_addr or req.master_port
    found = schedulers.detect(env) if kind == Launcher.LOCAL else None
    if found and given:
        notes.append(
            f"{found.scheduler}'s variables are set, and --nnodes/--node-rank/--master-addr "
            "were given: the command line's are used"
        )
    elif found:
        notes.append(f"placement from {found.describe()}")
        req = replace(
            req,
            nnodes=found.nnodes or 1,
            node_rank=found.node_rank or 0,
            master_addr=found.master_addr,
            master_port=found.master_port,
        )
        if found.nproc_per_node and req.gpus is None and req.cpu_procs is None:
            per_node = {"gpus" if gpus_seen else "cpu_procs": found.nproc_per_node}
            req = replace(req, **per_node)
    req = replace(req, nnodes=1 if req.nnodes is None else req.nnodes)
    if req.nnodes < 1 or not 0 <= req.node_rank < req.nnodes:
        raise QwenftError(
            f"--node-rank must be in 0..{req.nnodes - 1} and --nnodes at least 1",
            "number the machines 0, 1, ... with --node-rank; 0 is the master",
        )
    if kind == Launcher.RAY:  # one process per worker, placed by Ray
        notes += ray_launch.check_workers(launch.workers, gpus_seen)
        return replace(req, gpus=None, cpu_procs=None), launch.workers, notes
    if req.nnodes > 1 and not req.master_addr and not kind.facts.remote:
        raise QwenftError(
            "--nnodes > 1 needs --master-addr",
            "pass the address of node 0 that every node can reach",
        )
    if (kind.facts.remote or req.dry_run) and req.gpus and not gpus_seen and not req.cpu_procs:
        notes.append(
            f"no GPU is visible on this machine: rendered for {req.gpus} GPU(s) per node on "
            "the machines that will run it (bf16 on: --set bf16=false for GPUs before Ampere)"
        )
        return req, req.gpus, notes
    return req, settings.processes_per_node(req.gpus, req.cpu_procs, gpus_seen), notes


def plan_train(req: TrainRequest, gpus_seen: list[dict[str, Any]] | None = None) -> TrainPlan:
    """Check every input and render the run; raises QwenftError and writes nothing."""
    overlength = Overlength.parse(req.overlength, "--overlength")
    gpus_seen = launcher.detect_gpus() if gpus_seen is None else gpus_seen
    req, nproc, placed = placement(req, gpus_seen, os.environ)
    # The choices that need no file are checked before the data is read.
    Method.parse(req.method, "--method", auto=True)
    DeepSpeed.parse(req.deepspeed, "--deepspeed", auto=True)
    stage = Stage.parse(req.stage, "--stage")
    kind = Stage(stage).facts.data.value
    if req.data is None and req.mixture is None:
        raise QwenftError("--data is required", "qwenft train --model MODEL --data FILE.jsonl")
    cli = lf_launcher.find_llamafactory_cli()
    mixture = req.mixture or Mixture((Source(Path(req.data).expanduser()),))
    # each file checked, of the kind the stage takes; the first is the run's `data`
    reports = [_checked(path, stage, kind) for path in (*mixture.paths, *mixture.eval_paths)]
    report = reports[0]
    data = report.path.resolve()
    sha = reader.file_sha256(data)

    gpu_mem = req.gpu_mem_gb or (
        min(g["memory_gib"] for g in gpus_seen) * 2**30 / 1e9 if gpus_seen else None
    )
    run = settings.resolve(replace(req, data=data, gpus=nproc, gpu_mem_gb=gpu_mem))
    settings.check_applies(run)
    check_split(mixture, run.overrides.get("val_size"))
    trl = Stage(stage).facts.engine == Engine.TRL
    if trl:
        refuse_trl(req, run, mixture, nproc * req.nnodes, overlength)
    notes = placed + ([f"auto: {run.auto_why}"] if run.auto_why else [])
    if run.thinking_warning:
        notes.append(f"warning: {run.thinking_warning}")
    if run.parent:
        notes.append(
            f"from {run.parent.run_dir} ({run.parent.stage}): {run.parent.source}; template "
            f"{run.model.template}, its system prompt and thinking mode kept"
        )
    warning = settings.fit_warning(run)
    if warning:
        notes.append(warning)
    notes += run.adapter_notes  # an MoE run's adapter: what differs from the recipe, and why
    model, method, ds_stage = run.model, run.method, run.deepspeed
    if not Template(model.template).vision:  # what only a vision model reads
        raise_all(knobs.vision_keys(run.overrides, req.model or model.spec))
    pictured = [r.path for r in reports if r.has_images]
    has_images = bool(pictured)
    if has_images and not Template(model.template).vision:
        raise QwenftError(
            f"{pictured[0].name} holds images, and {req.model or model.spec} is a text model "
            f"(template {model.template}): it would train on the text and drop the images; "
            "nothing was started",
            "train image data on a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; "
            "`qwenft models` lists them, tiny-qwen2-vl for a try)",
        )
    if req.launch.kind == Launcher.RAY and ds_stage != DeepSpeed.NONE:
        raise QwenftError(
            f"--launcher ray runs without DeepSpeed (--deepspeed {ds_stage}: "
            + ("full's auto is z3" if req.deepspeed == "auto" else "given")
            + "); qwenft's Ray driver is proven with plain DDP only",
            "add --deepspeed none, or launch with torchrun (--gpus N, --nnodes N)",
        )

    name_from = run.parent.run_dir.name if run.parent else req.model
    label = method if stage == Stage.SFT else f"{stage}-{method}"
    run_dir = Path(req.output_dir) if req.output_dir else default_run_dir(name_from, label)
    check_new_run_dir(run_dir)
    run_dir = run_dir.expanduser().absolute()
    dataset_dir = (req.dataset_dir or default_dataset_dir()).expanduser().absolute()
    dataset_name = registry.auto_dataset_name(data, sha, dataset_dir)
    train_data = data
    packed = run.packed
    is_txt = report.format == "txt"
    if mixture.several or mixture.eval_paths:
        _check_mixable(reports, overlength)
    if packed and overlength != Overlength.WARN:
        raise QwenftError(
            f"--overlength {overlength} does not apply to packed pre-training: texts are packed "
            "into blocks of cutoff_len tokens and run on into the next block, none is cut",
            "drop --overlength, or --set packing=false to train one text per sample (cut at "
            "cutoff_len)",
        )
    if overlength == Overlength.DROP and is_txt:
        raise QwenftError(
            "--overlength drop reads the data by JSON line, and this is a .txt corpus",
            f"convert it first: qwenft data convert {data} -o {data.with_suffix('.jsonl')}",
        )
    if overlength == Overlength.DROP:
        # Trained on a filtered copy inside the run folder, registered under a run-specific name.
        train_data = run_dir / FILTERED_DATA
        dataset_name = f"{dataset_name}-fit-{run_dir.name}"
    elif is_txt:
        # A .txt trains as LLaMA-Factory reads it, one document per line: the {"text"} copy holds
        # those lines (blocks as documents only through `qwenft data convert --text-docs blocks`).
        train_data = run_dir / PT_DATA
        dataset_name = f"{dataset_name}-pt-{run_dir.name}"

    # every file registered under its own name; LLaMA-Factory mixes them (data.mixture)
    records = [_record(r.path.resolve(), r.n_samples, dataset_dir) for r in reports[1:]]
    n_train = len(mixture.sources)
    sources, evals = records[: n_train - 1], records[n_train - 1 :]
    samples = expected_samples(
        [report.n_samples, *(r.samples or 0 for r in sources)],
        mixture.mix,
        mixture.shares,
        run.values.get("max_samples"),
    )
    mix_keys = mixture.lf_keys([r.name for r in evals])
    lf_dataset = ",".join([dataset_name, *(r.name for r in sources)])  # train.yaml's `dataset`
    if mixture.several:
        notes += source_lines(
            [data.name, *(Path(r.path).name for r in sources)],
            [report.n_samples, *(r.samples or 0 for r in sources)],
            samples,
        )
    n_samples = max(1, round(sum(samples)))

    # logging_steps, save_steps and the evaluation follow the run's length (settings.step_defaults)
    processes = nproc * req.nnodes
    if trl:  # a grpo step's batch counts completions, num_generations of each prompt
        n_samples *= int(run.values.get("num_generations", 1))
    derived = settings.step_defaults(
        {**run.values, **mix_keys}, {**run.overrides, **mix_keys}, n_samples, processes
    )

    files: dict[str, str] = {}
    ds_path = None
    if ds_stage != DeepSpeed.NONE:
        files["deepspeed.json"] = render.deepspeed_config_text(ds_stage)
        ds_path = str(run_dir / "deepspeed.json")
    spec = render.TrainSpec(
        method=method,
        model_path=model.path,
        template=model.template,
        default_system=model.default_system,
        dataset=lf_dataset,
        dataset_dir=str(dataset_dir),
        output_dir=str(run_dir),
        stage=stage,
        enable_thinking=run.enable_thinking,
        deepspeed_path=ds_path,
        # GPUs seen here and all Ampere or newer; rendered for GPUs elsewhere: on (placement's note)
        bf16=all(g["compute_cap"] >= 8.0 for g in gpus_seen)
        if gpus_seen
        else bool(req.gpus) and (req.launch.kind.facts.remote or req.dry_run),
        overrides={**run.overrides, **derived},
        mixture=mix_keys,
    )
    config = render.build_train_config(spec)
    if run.initial_adapter:  # an MoE run's adapter over its experts: qwenft makes it (moe_adapter)
        config["adapter_name_or_path"] = str(run_dir / moe_adapter.INIT_ADAPTER)
    if has_images:
        # the images are relative to the data file; LLaMA-Factory's default is dataset_dir
        config.setdefault("media_dir", images.media_dir(data))
    if Template(model.template).vision:
        notes.append(vision_note(config))
    read = DataFiles((data, *(Path(r.path) for r in sources)), tuple(Path(r.path) for r in evals))
    if (
        not trl
        and "tokenized_path" not in config
        and (req.nnodes == 1 or DataSpec.from_config(config).for_data(read).lf_tokenizes is None)
    ):
        # Each node tokenizes before its torchrun starts (tokenize_ahead), and a copy is renamed
        # into place whole, so nodes sharing a file system cannot race on the cache. Where
        # LLaMA-Factory tokenizes inside the job instead, only a single node caches.
        key_sha = sha if overlength != Overlength.DROP else f"{sha}:drop-overlength"
        if records:  # a mixture: every file, and how they mix
            key_sha = hashlib.sha256(
                json.dumps([sha, *(r.sha256 for r in records), mix_keys]).encode()
            ).hexdigest()
        config["tokenized_path"] = str(cache.tokenized_dir(config, key_sha, model.kind))
    track = tracking.plan(config, run_dir)  # --report-to: inside the run folder, named after it
    config.update(track.keys)
    notes += [f"tracking: {line}" for line in (*track.look.values(), *track.notes)]
    what = f"{stage} {method}" if stage != Stage.SFT else method
    origin = f"{model.path} (--from {run.parent.run_dir})" if run.parent else req.model

    launch = req.launch
    if launch.kind == Launcher.RAY:
        config.update(ray_launch.config_keys(launch.workers))
    if trl:  # what TRL reads; the rewards checked, a user's file found
        config = rl_engine.grpo_config(config, data, Path.cwd(), processes)
    yaml_text = render.to_yaml(config, header=f"qwenft {what} fine-tune of {origin}")
    files["train.yaml"] = yaml_text
    if trl:
        rl_dir = rl_engine.rl_path() if req.dry_run else rl_engine.require_extra()
        argv, env = rl_engine.command(
            run_dir / "train.yaml", lf_launcher.offline_env(model.kind), rl_dir
        )
    elif launch.kind == Launcher.RAY:
        argv, env = ray_launch.ray_command(run_dir / "train.yaml", launch.workers)
        env = {**lf_launcher.offline_env(model.kind), **env}
    else:
        dist = lf_launcher.Distributed(
            nproc_per_node=nproc,
            nnodes=req.nnodes,
            node_rank=req.node_rank,
            master_addr=req.master_addr,
            master_port=req.master_port,
            force_torchrun=ds_stage != DeepSpeed.NONE,
        )
        argv, env = lf_launcher.build_train_command(cli, run_dir / "train.yaml", dist, model.kind)
    env.update(track.env)
    launch_record = None
    if launch.kind == Launcher.SLURM:
        job = slurm.SlurmJob(
            name=f"qwenft-{run_dir.name}",
            nodes=req.nnodes,
            gpus_per_node=nproc if gpus_seen or req.gpus else None,
            partition=launch.partition,
            time=launch.time,
            account=launch.account,
            extra=tuple(launch.sbatch_args),
        )
        files[slurm.SCRIPT] = slurm.render_sbatch(job, run_dir)
        launch_record = {"launcher": launch.launcher, "script": slurm.SCRIPT}
    manifest = Manifest(
        method=method,
        model=model,
        template=model.template,
        default_system=model.default_system,
        enable_thinking=run.enable_thinking,
        deepspeed=ds_stage,
        gpus=nproc,
        stage=stage,
        parent_run=str(run.parent.run_dir) if run.parent else None,
        nnodes=req.nnodes,
        dataset=DatasetRecord(
            path=str(data),
            sha256=sha,
            name=dataset_name,
            dataset_dir=str(dataset_dir),
            samples=report.n_samples,
            train_path=str(train_data),
            share=mixture.sources[0].share,
        ),
        sources=[
            replace(r, share=s.share) for r, s in zip(sources, mixture.sources[1:], strict=True)
        ],
        mix=str(mixture.mix) if mixture.several else None,
        eval_data=evals,
        overlength={"mode": overlength},
        tracking=track.look or None,
        launch=launch_record,
        status="prepared" if launch_record else "running",
        command=argv,
        env=env,
        versions=package_versions(),
        trains=trains_record(run),
    )
    files[MANIFEST] = manifest.to_json()
    return TrainPlan(
        run_dir,
        config,
        yaml_text,
        argv,
        env,
        model,
        lf_dataset,
        dataset_dir,
        data,
        sha,
        ds_stage,
        files,
        manifest,
        notes,
        overlength,
        train_data,
        schedule(config, n_samples, processes),
        stage=stage,
        kind=kind,
        packed=packed,
        parent=run.parent,
        launch=launch,
        mixture=mixture if records else None,
    )


def refuse_trl(
    req: TrainRequest,
    run: settings.RunSettings,
    mixture: Mixture,
    processes: int,
    overlength: str,
) -> None:
    """A stage TRL trains (grpo): what qwenft's GRPO process does not do, refused with the reason
    before anything is written (docs/rl.md)."""
    stage = run.stage
    problems: list[QwenftError] = []

    def refuse(what: str, why: str, fix: str) -> None:
        problems.append(QwenftError(f"--stage {stage} with {what}: {why}", fix))

    if processes > 1:
        refuse(
            f"{processes} processes",
            "qwenft's GRPO process runs on one device (its multi-process launch is not proven)",
            "drop --gpus / --cpu-procs / --nnodes",
        )
    if run.deepspeed != DeepSpeed.NONE:
        refuse(
            f"--deepspeed {run.deepspeed}",
            "DeepSpeed is for multi-process runs",
            "--deepspeed none",
        )
    if req.launch.kind != Launcher.LOCAL:
        refuse(
            f"--launcher {req.launch.kind}",
            "GRPO starts here only",
            "drop --launcher (the run starts on this machine)",
        )
    if mixture.several or mixture.eval_paths:
        refuse(
            "several --data files or --eval-data",
            "the GRPO process reads one prompt file",
            "put the prompts in one file, and drop --eval-data",
        )
    if overlength != DEFAULT_OVERLENGTH:
        refuse(
            f"--overlength {overlength}",
            "prompts are never cut: a completion is sampled after the whole prompt",
            "drop --overlength",
        )
    if run.method not in (Method.LORA, Method.FULL):
        refuse(
            f"--method {run.method}",
            "TRL's GRPO trains a LoRA adapter or the whole model",
            "--method lora (or full)",
        )
    if Template(run.model.template).vision:
        refuse(
            f"the vision-language model {run.model.spec}",
            "qwenft's GRPO process loads text models only",
            "a text Qwen model",
        )
    if run.initial_adapter:
        refuse(
            "LoRA on a mixture-of-experts model's experts",
            "the expert adapter qwenft makes is read by LLaMA-Factory, not by TRL",
            "--method full, or --lora-experts off",
        )
    raise_all(problems)


def _checked(path: Path, stage: str, kind: str) -> check.CheckReport:
    """A --data or --eval-data file checked (QwenftError naming it): of the kind the stage takes,
    and valid."""
    check_data_fits(path, stage)
    return check.require_valid(path, "nothing was started", kind=kind)


def _record(path: Path, samples: int, dataset_dir: Path) -> DatasetRecord:
    """The record of a further --data or an --eval-data file, under the name qwenft registers it."""
    sha = reader.file_sha256(path)
    name = registry.auto_dataset_name(path, sha, dataset_dir)
    return DatasetRecord(
        path=str(path), sha256=sha, name=name, dataset_dir=str(dataset_dir), samples=samples
    )


def _check_mixable(reports: list[check.CheckReport], overlength: str) -> None:
    """What a run of several files (or with --eval-data) does not take: refused, naming it. Each
    file is registered as it is, so no file may need a copy made for it (--overlength drop, a
    .txt corpus), and all images must be found from one media folder."""
    problems = []
    if overlength == Overlength.DROP:
        problems.append(
            QwenftError(
                "--overlength drop trains on a filtered copy of one --data file, and this run "
                "reads several files",
                "drop --overlength drop (warn counts what is cut), or filter each file first "
                "(`qwenft data check FILE --model MODEL` lists the over-long lines)",
            )
        )
    for r in reports:
        if r.format == "txt":
            problems.append(
                QwenftError(
                    f"{r.path} is a .txt corpus; with several files each must be jsonl",
                    f"convert it first: qwenft data convert {r.path} -o "
                    f"{r.path.with_suffix('.jsonl')}",
                )
            )
    folders = {images.media_dir(r.path.resolve()) for r in reports if r.has_images}
    if len(folders) > 1:
        problems.append(
            QwenftError(
                "the image files hold images relative to different folders "
                f"({', '.join(sorted(folders))}), and LLaMA-Factory looks for all in one media_dir",
                "put the data files beside each other, or use absolute image paths",
            )
        )
    raise_all(problems)


def trains_line(m: Manifest) -> str:
    """What the run trains of its model, and what share of it (the manifest's `trains`)."""
    if not m.trains:
        return "trains: share unknown (qwenft has no architecture numbers for this model)"
    return f"trains: {m.trains['line']}"


def trains_record(run: settings.RunSettings) -> dict[str, Any] | None:
    """What the run trains of its model, for the manifest: the coverage (models.coverage) and,
    for an MoE run whose adapter qwenft makes, that adapter's recipe and folder."""
    covered = run.coverage
    if covered is None:
        return None
    record = covered.to_dict()
    if run.initial_adapter:
        record["initial_adapter"] = {**run.initial_adapter, "path": moe_adapter.INIT_ADAPTER}
    return record


def vision_note(config: dict[str, Any]) -> str:
    """What a vision-language run trains of the model, as train.yaml has it (LLaMA-Factory's
    defaults: the vision tower and the projector frozen)."""

    def part(key: str, name: str, option: str) -> str:
        frozen = config.get(key, True)
        return f"{name} {'frozen' if frozen else 'trained'} ({option if frozen else 'set'})"

    return "vision: " + ", ".join(
        (
            part("freeze_vision_tower", "the vision tower", "--train-vision trains it"),
            part("freeze_multi_modal_projector", "the projector", "--train-projector trains it"),
        )
    )


def schedule(config: dict[str, Any], n_samples: int, processes: int) -> dict[str, Any]:
    """The run's length and step settings as train.yaml has them (what the first lines show)."""
    val = config.get("val_size") or 0
    held = bool(val) or bool(config.get("eval_dataset"))  # a split, or --eval-data
    evaluates = held and str(config.get("eval_strategy", "no")) != "no"
    return {
        "steps": settings.planned_steps(config, n_samples, processes),
        "samples": n_samples,
        "held_out": settings.held_out_count(val, n_samples) if evaluates else 0,
        "per_step": int(config.get("per_device_train_batch_size") or 1)
        * int(config.get("gradient_accumulation_steps") or 1)
        * processes,
        "batch": config.get("per_device_train_batch_size"),
        "grad_accum": config.get("gradient_accumulation_steps"),
        "processes": processes,
        "logging_steps": config.get("logging_steps"),
        "save_steps": config.get("save_steps"),
        "eval_steps": config.get("eval_steps") if evaluates else None,
    }


def _every(n: Any, what: str) -> str:
    return f"{what} every {'step' if n == 1 else f'{n} steps'}"


def describe(plan: TrainPlan) -> list[str]:
    """What will happen: the model, method and data; what it trains of the model; the run's length
    and steps. A grpo step's batch is completions, num_generations of each prompt."""
    m, sch = plan.manifest, plan.schedule
    what = m.method if plan.stage == Stage.SFT else f"{plan.stage} {m.method}"
    origin = (
        f"run {plan.parent.run_dir.name} ({plan.parent.source})" if plan.parent else m.model.spec
    )
    data = m.data_line() if plan.mixture else plan.data_path.name
    gens = int(plan.config.get("num_generations") or 0)
    unit = {DataKind.PT: "texts", DataKind.PROMPT: "prompts"}.get(plan.kind, "samples")
    lines = [
        f"{what} fine-tune of {origin} (template {m.template}) on {data}: "
        f"{sch['samples'] // (gens or 1)} {unit}"
        + (f", {sch['held_out']} held out" if sch.get("held_out") else "")
    ]
    lines.append(trains_line(m))
    if gens:
        weights = plan.config.get("reward_weights")
        lines.append(
            f"grpo: {gens} completions of each prompt (up to "
            f"{plan.config.get('max_completion_length')} tokens, temperature "
            f"{plan.config.get('temperature')}), scored by "
            + ", ".join(plan.config["reward_funcs"])
            + (f" (weights {weights})" if weights else "")
        )
    if sch:
        procs = sch["processes"]
        evaluation = (
            _every(sch["eval_steps"], "eval loss") if sch.get("eval_steps") else "no eval split"
        )
        if plan.packed and "max_steps" not in plan.config:
            lines.append(
                "pt packs the texts into blocks of cutoff_len tokens: the steps below count "
                "texts, the run counts blocks (--max-steps fixes the length)"
            )
        lines.append(
            f"{'about ' if 'max_steps' not in plan.config else ''}{sch['steps']} steps of "
            f"{sch['per_step']} {'completions' if gens else 'samples'} (batch {sch['batch']} x "
            f"grad-accum {sch['grad_accum']} x {procs} process{'es' if procs != 1 else ''}); "
            f"{_every(sch['logging_steps'], 'loss')}, {_every(sch['save_steps'], 'checkpoint')}, "
            f"{evaluation}"
        )
    return lines


def execute_train(
    plan: TrainPlan, progress: Callable[[str], None] = print, *, verbose: bool = False
) -> dict[str, Any]:
    """Prepare the model, measure over-long samples, create the run folder, register the data,
    launch training and finalize the record. Refusals (--overlength fail) happen before any write.
    LLaMA-Factory's output goes to the run's train.log (and to stderr too when `verbose`)."""
    for line in describe(plan):
        progress(line)
    ensure_base(plan.model, progress)
    if Stage(plan.stage).facts.engine == Engine.TRL:  # reads its prompt file itself
        run_dir = create_run_dir(plan.run_dir, plan.files)
        progress(f"run folder: {run_dir}")
        with RunLock(run_dir, "train") as lock:
            return _launch(
                run_dir, lock, plan.argv, plan.env, progress, None, verbose, stage=plan.stage
            )
    refuse_cut_images(plan, progress)
    tokenized = cache_state(plan.data_spec, plan.data_files)  # before it is written
    try:
        if plan.mixture:  # each file measured; the mixture is written below
            record = mixture_record(plan, progress)
        else:
            stats = overlength_stats(plan, progress)
            record = prepare.length_record(plan.data_spec, stats, progress)
    except QwenftError:
        # refused: nothing this run wrote stays behind, the tokenized data measured on the way
        # included (a cache no run would read)
        if tokenized and not tokenized.hit:
            cache.forget(tokenized.path)
        raise

    def add_filtered_copy(stage: Path) -> None:
        recipe = (plan.manifest.trains or {}).get("initial_adapter")
        if recipe:  # an MoE run: the adapter over the experts that LLaMA-Factory trains on
            moe_adapter.make_initial_adapter(
                plan.model.path, recipe, stage / moe_adapter.INIT_ADAPTER, progress
            )
        if plan.train_data is not None and plan.train_data.name == PT_DATA:
            rows = convert.materialize_pt_jsonl(plan.data_path, stage / PT_DATA)
            progress(f"pt: {rows} texts of {plan.data_path.name} copied to RUN/{PT_DATA}")
        if plan.overlength != "drop":
            return
        kept, dropped = split.write_without_lines(
            plan.data_path, stage / FILTERED_DATA, stats.over_cutoff_lines
        )
        record.update(
            kept=kept, dropped=dropped, filtered_sha256=reader.file_sha256(stage / FILTERED_DATA)
        )
        progress(f"--overlength drop: training on {kept} samples, {dropped} over-long dropped")

    run_dir = create_run_dir(plan.run_dir, plan.files, prepare=add_filtered_copy)
    progress(f"run folder: {run_dir}")
    with RunLock(run_dir, "train") as lock:
        update_manifest(run_dir, overlength=record)
        registry.register_dataset(
            plan.train_data or plan.data_path,
            plan.manifest.dataset.name,
            plan.dataset_dir,
            kind=plan.kind,
        )
        for rec in (*plan.manifest.sources, *plan.manifest.eval_data):
            registry.register_dataset(Path(rec.path), rec.name, plan.dataset_dir, kind=plan.kind)
        tokenize_ahead(plan.data_spec, plan.data_files, plan.model.path, progress)
        if plan.manifest.launch:  # a scheduler starts it: the folder is ready for its job
            return _prepared(run_dir, plan.launch.submit, progress)
        return _launch(
            run_dir,
            lock,
            plan.argv,
            plan.env,
            progress,
            tokenized,
            verbose,
            stage=plan.stage,
        )


def refuse_cut_images(plan: TrainPlan, progress: Callable[[str], None]) -> None:
    """Image data: refuse a run where cutoff_len would cut a sample inside its image tokens
    (LLaMA-Factory would fail on it mid-run: "Image features and image tokens do not match"),
    whatever --overlength says; otherwise say what the images cost."""
    if not check.file_has_images(plan.data_path):
        return
    measured = pipeline.measure_images(plan.data_path, plan.data_spec, plan.model.path, max_lines=3)
    progress(measured.stats.line())
    if measured.problems:
        first = "; ".join(f"line {p.line}: {p.message}" for p in measured.problems)
        raise QwenftError(
            f"{measured.n_cut} sample(s) would be cut inside their image tokens at cutoff_len "
            f"{plan.data_spec.cutoff_len} ({first}); nothing was started",
            "raise --cutoff-len, or lower --image-max-pixels (fewer tokens per image); "
            f"`qwenft data check {plan.data_path} --model {plan.model.spec}` lists them all",
        )


def ensure_base(model: presets.ResolvedModel, progress: Callable[[str], None]) -> None:
    """The base the run trains on, on disk: a tiny preset built; a base qwenft derives (LLaMA Pro,
    LoftQ) made from the model it names, built first where that is a tiny preset."""
    how = model.extra.get("llama_pro") or model.extra.get("loftq")
    if how is None:
        base_target(model).ensure_built(progress)
        return
    base = presets.ResolvedModel.from_dict(how["base"])
    base_target(base).ensure_built(progress)
    if "blocks" in how:
        derived.expand(Path(base.path), how["blocks"], progress)
    else:
        derived.loftq(Path(base.path), how["recipe"], progress)


def overlength_stats(plan: TrainPlan, progress: Callable[[str], None]) -> TokenStats:
    """The token statistics of the run's data file under its data arguments (prepare.run_stats),
    which --overlength and packing judge."""
    return prepare.run_stats(plan.data_spec, plan.data_path, plan.model.path, progress)


def mixture_record(plan: TrainPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    """The overlength record of a run of several files (or with --eval-data): --overlength
    judged file by file, naming the file, and each training file's rows, tokens and expected share
    of the training tokens said."""
    spec, mixture = plan.data_spec, plan.mixture
    assert mixture is not None
    records = [plan.manifest.dataset, *plan.manifest.sources]
    stats = []
    for rec in records:
        progress(f"measuring {Path(rec.path).name} with the run's tokenizer and template ...")
        stats.append(pipeline.file_stats(Path(rec.path), spec, plan.model.path, max_lines=None))
    files: dict[str, Any] = {}
    for rec, st in zip(records, stats, strict=True):
        name = Path(rec.path).name
        try:
            files[name] = prepare.length_record(
                spec, st, lambda line, name=name: progress(f"{name}: {line}")
            )
        except QwenftError as exc:
            raise QwenftError(f"{name}: {exc.message}", exc.hint) from None
    rows = [st.n_samples for st in stats]
    samples = expected_samples(rows, mixture.mix, mixture.shares, spec.max_samples)
    tokens = [st.tokens_total or 0 for st in stats]
    for line in source_lines([Path(r.path).name for r in records], rows, samples, tokens):
        progress(line)
    return {"mode": plan.overlength, "files": files}


def _launch(
    run_dir: Path,
    lock: RunLock,
    argv: list[str],
    env: dict[str, str],
    progress: Callable[[str], None],
    tokenized: CacheState | None,
    verbose: bool = False,
    *,
    stage: str = Stage.SFT.value,
) -> dict[str, Any]:
    """Run `llamafactory-cli train` in run_dir under the loss watch and qwenft's progress line;
    record how it ended. LLaMA-Factory's output goes to train.log (and stderr when `verbose`).
    The caller holds the run's lock; the launched processes hold it too until the last is gone."""
    tokenized_path = tokenized.path if tokenized else None
    if tokenized_path:
        cache.discard_partial(tokenized_path)
        if tokenized.hit:
            progress(f"tokenized data: reusing {tokenized_path}")
        elif tokenized.by == "llamafactory":
            progress(f"tokenized data: LLaMA-Factory will cache it at {tokenized_path}")
    log_path = run_dir / "train.log"
    if verbose:
        progress(f"launching: {launcher.format_command(argv, env)}")
    progress(f"log: {log_path}" + ("" if verbose else " (-v shows it here too)"))
    started = time.monotonic()
    update_manifest(
        run_dir,
        status="running",
        started=now_iso(),
        host=socket.gethostname(),
        pid=os.getpid(),
        log=str(log_path),
        tokenized_cache=tokenized.to_dict() if tokenized else None,
    )
    # With -v LLaMA-Factory's own progress bars are on stderr: no second progress line.
    loss_watch = LossWatch(run_dir, stage=stage)
    engine = Stage(stage).facts.engine
    watch = (
        Monitor(loss_watch)
        if verbose
        else Monitor(TrainProgress(run_dir, log_path, sys.stderr, trainer=engine.shown), loss_watch)
    )
    memory: dict[str, Any] = {}  # the launcher's peak of the whole process tree
    try:
        code = launcher.run(
            argv,
            env,
            log_path,
            cwd=run_dir,
            echo=launcher.child_echo(verbose),
            monitor=watch,
            stats=memory,
            hold_fds=[lock.fileno()],
        )
    except Interrupted as exc:
        watch.close()
        update_manifest(run_dir, status="interrupted", ended=now_iso())
        raise Interrupted(
            f"{exc}; the run is marked interrupted", _resume_hint(run_dir, interrupted=True)
        ) from None
    except Stopped as exc:
        watch.close()
        update_manifest(run_dir, status="failed", ended=now_iso(), reason=str(exc))
        surface_log(log_path, progress)
        raise JobFailed(f"training stopped: {exc}", f"read the log: {log_path}") from None
    finally:
        watch.close()
    tracking.fold_mlflow_runs(env, progress)  # one MLflow run per training
    if tokenized_path:
        cache.mark_if_saved(tokenized_path, log_path.read_text(encoding="utf-8", errors="replace"))
    summary = training_summary(run_dir, stage)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    # Summed over every process of the run (torchrun and each worker): proportional set size,
    # which counts the pages the workers share (torch's libraries) once; RSS where /proc has no PSS.
    peak = memory.get("peak_pss_bytes") or memory.get("peak_rss_bytes")
    summary["peak_mem_gib"] = round(peak / 2**30, 2) if peak else None
    summary["processes"] = memory.get("max_processes")
    summary["log"] = str(log_path)
    status = "completed" if code == 0 else "failed"
    if code == 0:
        summary["expert_load"] = expert_load_report(run_dir, progress)
    manifest = update_manifest(
        run_dir,
        status=status,
        ended=now_iso(),
        returncode=code,
        summary=summary,
        final_loss=summary["final_loss"],
        tokens_per_second=summary["tokens_per_second"],
    )
    if code != 0:
        surface_log(log_path, progress)
        stopped = _stopped_reason(log_path) if engine == Engine.TRL else None
        if stopped:  # the GRPO process said why (a reward that failed): the reason, recorded
            update_manifest(run_dir, reason=stopped)
        raise JobFailed(
            f"training stopped: {stopped}"
            if stopped
            else f"{engine.program} exited with code {code}",
            f"read the log: {log_path}; {_resume_hint(run_dir)}",
            returncode=code,
        )
    return {
        "run_dir": str(run_dir),
        "method": manifest.method,
        "stage": manifest.stage,
        "mergeable": merge_refusal(run_dir, manifest) is None,  # what `next:` suggests
        **summary,
    }


def _stopped_reason(log_path: Path) -> str | None:
    """The reason qwenft's own training process gave for stopping (its last `qwenft: ` line in the
    log: qwenft.rl.grpo), or None."""
    try:
        text = read_end(log_path, 64_000)  # the reason is the process's last words
    except OSError:
        return None
    found = [line.split("qwenft: ", 1)[1] for line in text.splitlines() if "qwenft: " in line]
    return found[-1].strip() if found else None


EXPERT_LOAD_SAMPLES = 32  # training samples the expert load is counted on
EXPERT_LOAD = "expert_load.json"  # the per-layer counts, in the run folder


def expert_load_report(run_dir: Path, progress: Callable[[str], None]) -> dict[str, Any] | None:
    """After a mixture-of-experts run: the tokens each expert takes of the first training samples
    under the trained model, and the router's balancing loss (scoring.Scorer.expert_load), said,
    appended to train.log, per layer in RUN/expert_load.json; the manifest's summary. None for a
    dense model, or when not measured (said why: loading the model once more must fit in memory,
    and a failure here never fails the run)."""
    m = read_manifest(run_dir)
    arch = m.model.arch
    if arch is None or arch.moe is None:
        return None
    weights = arch.params * 2  # 16-bit, as the model loads for inference
    free = _available_memory()
    if free is not None and weights > free / 2:
        progress(
            f"expert load not measured: loading the model ({weights / 1e9:.0f} GB) again would "
            f"take over half this machine's free memory ({free / 1e9:.0f} GB)"
        )
        return None
    from qwenft import scoring
    from qwenft.models.target import resolve_target

    try:
        spec = DataSpec.from_config(yaml.safe_load((run_dir / "train.yaml").read_text()))
        data = Path(m.dataset.train_path or m.dataset.path)
        rows = scoring.encode_rows(data, spec.encoder(m.model.path), EXPERT_LOAD_SAMPLES)
        scorer = scoring.load_scorer(resolve_target(str(run_dir)))
        try:
            load = scorer.expert_load([sides[0] for _, _, sides in rows])
        finally:
            scorer.close()
    except Exception as exc:  # noqa: BLE001 - a fact to report, never a reason to fail the run
        progress(f"expert load not measured: {type(exc).__name__}: {exc}")
        return None
    if load is None:
        return None
    atomic_write_json(run_dir / EXPERT_LOAD, load)
    total = load["total"]
    shares = [c / (sum(total) or 1) for c in total]
    order = sorted(range(len(total)), key=lambda e: -total[e])
    shown = order if len(order) <= 16 else [*order[:5], *order[-5:]]
    aux = load["aux_loss"]
    lines = [
        f"experts: {load['samples']} training samples, {load['tokens']} tokens, {load['top_k']} "
        f"of {load['experts']} experts per token in {len(load['layers'])} layer(s): the busiest "
        f"took {max(shares):.1%} of the choices, the idlest {min(shares):.1%} (even: "
        f"{1 / load['experts']:.1%})"
        + (f"; router balancing loss {aux:.4f}" if aux is not None else ""),
        "expert load (tokens, all layers"
        + ("" if len(shown) == len(order) else "; the 5 busiest and the 5 idlest")
        + f"): {' | '.join(f'e{e} {total[e]}' for e in shown)} (per layer: RUN/{EXPERT_LOAD})",
    ]
    with (run_dir / "train.log").open("a", encoding="utf-8") as log:
        log.writelines(f"qwenft: {line}\n" for line in lines)
    for line in lines:
        progress(line)
    return {
        "samples": load["samples"],
        "tokens": load["tokens"],
        "busiest_share": round(max(shares), 4),
        "idlest_share": round(min(shares), 4),
        "aux_loss": aux,
        "total": total,
    }


def _available_memory() -> int | None:
    """Bytes of memory available to a new process (/proc/meminfo's MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _prepared(run_dir: Path, submit: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """A run folder a Slurm job will start: submit its script (--submit) or say how to."""
    script = run_dir / slurm.SCRIPT
    result: dict[str, Any] = {"run_dir": str(run_dir), "script": str(script), "job_id": None}
    if not submit:
        progress(f"prepared: submit it with `sbatch {script}`")
        return result
    job_id = slurm.submit(script)
    launch = {**(read_manifest(run_dir).launch or {}), "job_id": job_id, "submitted": now_iso()}
    update_manifest(run_dir, status="submitted", launch=launch)
    progress(f"submitted: Slurm job {job_id}; `qwenft runs {run_dir}` shows its state")
    return {**result, "job_id": job_id}


def start_node(
    run_dir: Path, progress: Callable[[str], None] = print, *, verbose: bool = False
) -> dict[str, Any] | None:
    """This node's part of a prepared run (what launch.sbatch's tasks run): LLaMA-Factory's
    torchrun with the node's place read from the scheduler (launch.schedulers). Node 0 watches
    the run and records it like `train` does (its summary is returned); another node only runs
    its processes, logging to train.node<rank>.log, and returns None."""
    run_dir = Path(run_dir).expanduser().absolute()
    m = read_manifest(run_dir)
    found = schedulers.detect(os.environ)
    if found is None:
        raise QwenftError(
            f"qwenft start runs inside a scheduler's job step, and none is visible here "
            f"({', '.join(schedulers.NAMES)})",
            f"submit the run's script (sbatch {run_dir / slurm.SCRIPT}), or train here with "
            f"`qwenft resume {run_dir}`",
        )
    nnodes, rank = found.nnodes or 1, found.node_rank or 0
    dist = lf_launcher.Distributed(
        nproc_per_node=m.gpus,
        nnodes=nnodes,
        node_rank=rank,
        master_addr=found.master_addr,
        master_port=found.master_port,
        force_torchrun=m.deepspeed != DeepSpeed.NONE,
    )
    env = {**m.env, **dist.env()}
    if nnodes > 1 and found.rdzv_id:
        env["RDZV_ID"] = found.rdzv_id  # torchrun's c10d rendezvous, named after the job
    progress(f"node {rank} of {nnodes}: {found.describe()}")
    if rank != 0:
        log = run_dir / f"train.node{rank}.log"
        code = launcher.run(m.command, env, log, cwd=run_dir, echo=launcher.child_echo(verbose))
        if code != 0:
            raise JobFailed(
                f"node {rank}: llamafactory-cli train exited with code {code}", str(log)
            )
        return None
    launch = {**(m.launch or {}), "job_id": found.rdzv_id, "nodes": nnodes}
    update_manifest(run_dir, launch=launch, env=env)
    spec = DataSpec.from_config(yaml.safe_load((run_dir / "train.yaml").read_text()))
    with RunLock(run_dir, "train") as lock:
        return _launch(
            run_dir,
            lock,
            m.command,
            env,
            progress,
            cache_state(spec, data_files(m, Path(m.dataset.train_path or m.dataset.path))),
            verbose,
            stage=m.stage,
        )


def _resume_hint(run_dir: Path, interrupted: bool = False) -> str:
    """How to go on: resume from a checkpoint, or (before the first one) start again."""
    if newest_complete_checkpoint(run_dir) is not None:
        return f"resume with: qwenft resume {run_dir}"
    try:
        due = yaml.safe_load((run_dir / "train.yaml").read_text()).get("save_steps")
    except (OSError, yaml.YAMLError, AttributeError):
        due = None
    when = f" (the first was due at step {due})" if due else ""
    return (
        f"no checkpoint was written{when}, so there is nothing to resume; start again with the "
        f"same `qwenft train` command (with a new --output-dir, or after removing {run_dir})"
        + ("; --save-steps N checkpoints more often" if interrupted else "")
    )


def _source_changed(rec: DatasetRecord) -> list[str]:
    """What changed in a further --data or --eval-data file since the run started (named)."""
    path = Path(rec.path)
    if not path.is_file():
        return [f"{path} is gone"]
    sha = reader.file_sha256(path)
    if sha != rec.sha256:
        return [f"{path.name} changed (sha256 {sha[:12]} != {rec.sha256[:12]} in the manifest)"]
    return []


def resume_train(
    run_dir: Path,
    *,
    data: Path | None = None,
    method: str | None = None,
    template: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    submit: bool = False,
) -> dict[str, Any]:
    """Continue a run from its newest checkpoint (LLaMA-Factory restores step, optimizer and LR
    schedule); refuse when the data, template or method differ from the manifest unless forced.
    `submit`: a Slurm run's script is submitted again instead (its job resumes)."""
    run_dir = Path(run_dir).expanduser().absolute()
    read_manifest(run_dir)  # a run folder at all, before anything else is said about it
    with RunLock(run_dir, "resume") as lock:  # a live run (or a second resume) is refused here
        return _resume_locked(
            run_dir, lock, data, method, template, force, progress, verbose, submit
        )


def _resume_locked(
    run_dir: Path,
    lock: RunLock,
    data: Path | None,
    method: str | None,
    template: str | None,
    force: bool,
    progress: Callable[[str], None],
    verbose: bool,
    submit: bool = False,
) -> dict[str, Any]:
    m = read_manifest(run_dir)
    scheduled = (m.launch or {}).get("launcher") == Launcher.SLURM
    if submit and not scheduled:
        raise QwenftError(
            f"--submit resubmits a Slurm run's job, and {run_dir} was not started by Slurm",
            f"qwenft resume {run_dir}",
        )
    if scheduled and not submit:
        raise QwenftError(
            f"{run_dir} runs as a Slurm job on {m.nnodes} node(s)",
            f"qwenft resume {run_dir} --submit",
        )
    job_id = (m.launch or {}).get("job_id")
    state = slurm.job_state(job_id) if submit and job_id else None
    if state in ("pending", "running"):
        raise QwenftError(f"{run_dir}'s Slurm job {job_id} is {state}", f"scancel {job_id} first")
    if submit:
        slurm.sbatch_path()
    if m.status == "running" and not scheduled:  # nobody holds its lock: its process died
        progress(f"{run_dir} was left running by a process that died (pid {m.pid}); resuming it")
    if m.status == "completed" and not force:
        raise QwenftError(
            f"{run_dir} already completed", "start a new run, or --force to run it again"
        )
    ds = m.dataset
    data_path = Path(data).expanduser().resolve() if data else Path(ds.path)
    if not data_path.is_file():
        raise QwenftError(
            f"the run's data file is gone: {data_path}", "pass --data with the same file"
        )
    problems = []
    sha = reader.file_sha256(data_path)
    if sha != ds.sha256:
        problems.append(f"the data changed (sha256 {sha[:12]} != {ds.sha256[:12]} in the manifest)")
    others = [*m.sources, *m.eval_data]  # the further --data files and --eval-data
    for rec in others:
        problems += _source_changed(rec)
    if method and method != m.method:
        problems.append(f"method {method} != {m.method}")
    if template and template != m.template:
        problems.append(f"template {template} != {m.template}")
    if problems and not force:
        raise QwenftError(
            f"cannot resume {run_dir}: " + "; ".join(problems),
            "resume with the run's own inputs, or --force to continue anyway",
        )
    # LLaMA-Factory resumes from the highest checkpoint-N: one cut short by a kill is set aside.
    for moved in set_aside_incomplete_checkpoints(run_dir):
        progress(f"set aside a checkpoint that was never completely written: {moved.name}")
    checkpoint = newest_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise QwenftError(
            f"{run_dir} has no complete checkpoint to resume from",
            "start a new run (--save-steps N checkpoints more often)",
        )
    ensure_base(m.model, progress)
    if m.parent_run and not Path(m.model.path).is_dir():
        raise QwenftError(
            f"the weights {run_dir} started from are gone: {m.model.path}",
            f"merge its parent again (qwenft merge {m.parent_run}), or start a new run",
        )
    facts = Stage(Stage.parse(m.stage, "stage")).facts
    if facts.engine == Engine.TRL:  # it reads its prompt file itself, and resumes by itself
        return _launch(run_dir, lock, m.command, m.env, progress, None, verbose, stage=m.stage)
    kind = facts.data.value
    # what LLaMA-Factory reads: the run's own copy (it travels with the folder), else the data
    # (its entry re-pointed at it when moved: the same content)
    own_copy = bool(ds.train_path) and is_inside(ds.train_path, run_dir)
    train_data = Path(ds.train_path) if own_copy else data_path
    registry.register_dataset(
        train_data, ds.name, Path(ds.dataset_dir), kind=kind, force=own_copy or sha == ds.sha256
    )
    for rec in others:
        if Path(rec.path).is_file():  # forced past a missing one: LLaMA-Factory will say so
            registry.register_dataset(Path(rec.path), rec.name, Path(rec.dataset_dir), kind=kind)
    resumes = [
        *m.resumes,
        {
            "at": now_iso(),
            "from": checkpoint.name,
            "forced": bool(problems),
            "problems": problems,
        },
    ]
    update_manifest(run_dir, resumes=resumes)
    progress(f"resuming {run_dir} from {checkpoint.name}")
    if relocate_train_yaml(run_dir):  # moved since: LLaMA-Factory reads output_dir from it
        progress(f"train.yaml now points at {run_dir} (the run folder was moved)")
    config = yaml.safe_load((run_dir / "train.yaml").read_text())
    spec = DataSpec.from_config(config)
    files = data_files(m, train_data)
    tokenized = cache_state(spec, files)
    tokenize_ahead(spec, files, m.model.path, progress)
    if submit:
        return _prepared(run_dir, True, progress)
    return _launch(run_dir, lock, m.command, m.env, progress, tokenized, verbose, stage=m.stage)
