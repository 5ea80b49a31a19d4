"""One resolver from a request (CLI options, --config, --set, the model, the data) to a run's
settings. `train`, `plan` and `data check --model` call `resolve`, so the cutoff, template,
system prompt, thinking mode, method and DeepSpeed stage one of them shows are the ones `train`
uses; `eval` reads the run's own train.yaml, and for a model that is not a run the same defaults
(`default_cutoff_len`, `model_for`, `thinking_choice`). The knobs and their ranges come from
the knob table (qwenft.knobs).

The recipe defaults live in configs/<method>.yaml with the stage's keys over them
(configs/stages/<stage>.yaml: `recipe(method, stage)`); the layers over the recipe are, lowest
first: --config FILE < the named knobs (--cutoff-len, --lr, --beta, ...) < --set key=value.
A later stage can start from an earlier run (`--from RUN_DIR`, `from_run`): its weights, and the
template, system prompt and thinking mode it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qwenft import knobs
from qwenft.choices import (
    AUTO,
    DeepSpeed,
    Method,
    Stage,
    Template,
    Thinking,
    auto_deepspeed,
)
from qwenft.errors import QwenftError, raise_all
from qwenft.knobs import KEY_OPTIONS, RANGES, KnobValues, bad_value, key_label
from qwenft.lf import render
from qwenft.models import moe_adapter, presets

__all__ = [
    "KEY_OPTIONS",
    "RANGES",
    "KnobValues",
    "bad_value",
    "key_label",
]  # the knob table's views

LORA_RANK_DEFAULT = 16  # LLaMA-Factory's own, for recipes that do not set lora_rank
LOW_RANK_DEFAULT = 16  # LLaMA-Factory's galore_rank and apollo_rank


@dataclass
class RunRequest:
    """What a person asked for. `method` and `deepspeed` may be `auto`; knobs set to None are
    left to the recipe."""

    model: str
    method: str = Method.LORA.value
    template: str | None = None
    thinking: str = Thinking.AUTO.value
    deepspeed: str = AUTO
    data: Path | None = None  # decides thinking for Qwen3 hybrid models
    gpus: int | None = None  # GPUs (processes) per node sharing the run; None: 1
    nnodes: int = 1  # machines taking part, each running `gpus` processes
    gpu_mem_gb: float | None = None  # GB per GPU: --method auto and the fit check
    config_file: Path | None = None
    set_items: list[str] = field(default_factory=list)
    knobs: KnobValues = field(default_factory=KnobValues)  # the knob options set (a dict is typed)
    cpu_procs: int | None = None  # processes on a machine without GPUs (instead of gpus)
    stage: str = Stage.SFT.value  # LLaMA-Factory's training stage (choices.Stage)
    parent: Path | None = None  # --from RUN_DIR: start from that run's weights and chat settings

    def __post_init__(self) -> None:
        if not isinstance(self.knobs, KnobValues):
            self.knobs = KnobValues(self.knobs)

    @property
    def processes(self) -> int:
        """The processes of the run in all (what LLaMA-Factory's distributed checks count)."""
        return (self.gpus or 1) * self.nnodes


@dataclass
class FromRun:
    """--from RUN_DIR made concrete: the weights to start from and the run they came from."""

    run_dir: Path
    model: presets.ResolvedModel  # path: the merged model or the run's own weights
    enable_thinking: bool | None
    stage: str
    source: str  # "merged model ...", or the run folder (full/freeze)


@dataclass
class RunSettings:
    """A request made concrete: every choice taken, every default filled in."""

    model: presets.ResolvedModel  # template, default_system, thinking already overridden
    method: str
    deepspeed: str
    enable_thinking: bool | None  # None: the template has no thinking switch
    overrides: dict[str, Any]  # --config < knobs < --set: the keys the person chose
    values: dict[str, Any]  # the recipe with the overrides over it: what the run will use
    gpus: int = 1
    gpu_mem_gb: float | None = None
    auto_plan: Any = None  # memory.Plan behind --method auto
    auto_why: str | None = None  # its one-line explanation
    thinking_warning: str | None = None  # <think> blocks the template cannot train as thoughts
    stage: str = Stage.SFT.value
    parent: FromRun | None = None
    lora_experts: bool = True  # an MoE model: LoRA covers its experts too (--lora-experts)
    train_router: bool = False  # ... and its router (--train-router)
    # the adapter qwenft makes before launch (moe_adapter.INIT_ADAPTER; LLaMA-Factory trains it on)
    initial_adapter: dict[str, Any] | None = None
    adapter_notes: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> Any:
        """What the run trains of the model (models.coverage.Coverage); None when its
        architecture numbers are unknown."""
        from qwenft.memory import FREEZE_TRAINABLE_LAYERS
        from qwenft.models.coverage import coverage

        if self.model.arch is None or self.method == AUTO:
            return None
        v = self.values
        return coverage(
            self.model.arch,
            Method.LORA.value if Method(self.method).facts.adapter else self.method,
            self.lora_rank,
            self.lora_target,
            self.lora_experts,
            self.train_router,
            int(v.get("freeze_trainable_layers") or FREEZE_TRAINABLE_LAYERS),
        )

    @property
    def lora_target(self) -> str:
        target = self.values.get("lora_target") or "all"
        return ",".join(map(str, target)) if isinstance(target, list | tuple) else str(target)

    @property
    def data_kind(self) -> str:
        """The kind of data the stage trains on (the stage table, choices.STAGE_FACTS)."""
        return Stage(self.stage).facts.data.value

    @property
    def packed(self) -> bool:
        """pt packs texts into cutoff_len blocks unless packing is set false (LLaMA-Factory's
        default: `packing` None means true for pt); nothing is truncated then."""
        return self.stage == Stage.PT and self.values.get("packing") is not False

    @property
    def template(self) -> str:
        return self.model.template

    @property
    def default_system(self) -> str:
        return self.model.default_system

    @property
    def cutoff_len(self) -> int:
        return int(self.values["cutoff_len"])

    @property
    def batch_size(self) -> int:
        return int(self.values["per_device_train_batch_size"])

    @property
    def lora_rank(self) -> int:
        return int(self.values.get("lora_rank", LORA_RANK_DEFAULT))

    @property
    def quantization_bit(self) -> int | None:
        """The bit width the base is loaded at: QLoRA's, or a pre-quantized base's own."""
        bits = self.values.get("quantization_bit")
        quantized = self.model.extra.get("quantization")
        if quantized and quantized["bits"]:
            return int(quantized["bits"])
        return int(bits) if bits else None

    def plan_input(self, images: int = 0) -> Any:
        """The memory-plan input for this run (qwenft.memory.PlanInput): the one way it is built.
        images: per sample, for a vision-language model (the most in a row of its data)."""
        from qwenft import memory
        from qwenft.data.images import DEFAULT_MAX_PIXELS

        if self.model.arch is None:
            raise QwenftError(
                f"qwenft has no architecture numbers for {self.model.spec}, so it cannot plan "
                "memory for it",
                "use a model listed by `qwenft models`, or download it and pass the local folder "
                "(its config.json is read)",
            )
        v = self.values
        optimizer = next((o for o in memory.OPTIMIZERS if v.get(f"use_{o}")), "adamw")
        return memory.PlanInput(
            arch=self.model.arch,
            # LoRA on a pre-quantized base is QLoRA's memory (its weights at the base's bits)
            method=Method.QLORA.value if self.model.extra.get("quantization") else self.method,
            stage=self.stage,
            bits=self.quantization_bit,
            gpus=self.gpus,
            deepspeed=self.deepspeed,
            cutoff_len=self.cutoff_len,
            batch_size=self.batch_size,
            lora_rank=self.lora_rank,
            lora_target=self.lora_target,
            lora_experts=self.lora_experts,
            train_router=self.train_router,
            trainable_layers=int(
                v.get("freeze_trainable_layers") or memory.FREEZE_TRAINABLE_LAYERS
            ),
            gradient_checkpointing=not v.get("disable_gradient_checkpointing", False),
            liger=bool(v.get("enable_liger_kernel", False)),
            gpu_mem_gb=self.gpu_mem_gb,
            optimizer=optimizer,
            optimizer_rank=int(v.get(f"{optimizer}_rank") or LOW_RANK_DEFAULT),
            layerwise=bool(v.get(f"{optimizer}_layerwise")),
            images=images,
            image_pixels=int(v.get("image_max_pixels") or DEFAULT_MAX_PIXELS),
            train_vision=v.get("freeze_vision_tower") is False,
        )


def recipe(method: str, stage: str = Stage.SFT.value) -> dict[str, Any]:
    """The defaults of a method and stage: configs/<method>.yaml (LoRA's for `auto`, until it is
    chosen) with configs/stages/<stage>.yaml over it (render.load_recipe: the one place)."""
    return render.load_recipe(Method.LORA.value if method == AUTO else method, stage)


def default_cutoff_len() -> int:
    """cutoff_len when nobody chose one (the same in every method's recipe)."""
    return int(recipe(Method.LORA.value)["cutoff_len"])


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The keys of --config FILE (a YAML mapping), or {}."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise QwenftError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise QwenftError(f"--config {path} must hold a YAML mapping of keys")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise QwenftError(f"--config {path}: keys must be names, not {bad[0]!r}")
    return data


def model_for(spec: str, template: str | None) -> presets.ResolvedModel:
    """The model with a --template override applied (its family's system prompt and thinking)."""
    model = presets.resolve_model(spec)
    if template is not None:
        template = Template.parse(template, "--template")
        if template != model.template:
            fam = presets.FAMILIES[presets.template_family(template)]
            model = replace(model, template=template, thinking=fam.thinking)
    return model


def thinking_choice(thinking: str, model: presets.ResolvedModel, data: Path | None) -> bool | None:
    """enable_thinking: None where the template has no switch; for Qwen3 hybrid models the
    person's --thinking, else qwenft.data.reasoning.thinking_plan decides from the data: no sample
    reasons -> off; some or all do -> on, which trains both modes the way Qwen3's chat template
    renders them (reasoning samples with their thought, the others after an empty one)."""
    from qwenft.data.reasoning import thinking_plan

    thinking = Thinking.parse(thinking, "--thinking")
    return thinking_plan(data, model.thinking, thinking, model.template).enable_thinking


# --------------------------------------------------------------------------------------------------
# Every knob is checked before launch, from its row in the knob table (qwenft.knobs): train, plan,
# data check and eval resolve here, so they agree. Every problem of a command line is reported at
# once (errors.raise_all).


def checked_overrides(req: RunRequest) -> dict[str, Any]:
    """The person's keys, layered (--config < knobs < --set) and checked: --config and --set keys
    must be LLaMA-Factory training arguments (qwenft.lf.args: its own dataclasses) with values of
    the declared type, every key with a range (knobs.KNOBS) must be in range, whichever layer set
    it, and every key must be one the request's stage (and method, when chosen) reads. Messages
    name the qwenft option and where the value came from; raises QwenftError with every problem."""
    config = read_config_file(req.config_file)
    chosen = dict(req.knobs)
    sets = render.parse_set(req.set_items)
    origin: dict[str, str] = {k: f"from --config {req.config_file}" for k in config}
    origin.update({k: "" for k in chosen})
    for item in req.set_items:
        origin[item.partition("=")[0].strip()] = f"from --set {item.strip()}"
    overrides = {**config, **chosen, **sets}
    free = [k for k in overrides if k not in chosen or k in sets]  # keys typed as text, not options
    problems: list[QwenftError] = []
    if free:
        typed, problems = _check_lf_keys({k: overrides[k] for k in free}, origin)
        overrides.update(typed)
    overrides.update(knobs.as_lists(overrides))  # --report-to a,b and report_to: [a, b] alike
    problems += knobs.out_of_range(overrides, origin)
    method = None if req.method == AUTO else req.method
    problems += knobs.inapplicable(overrides, req.stage, method)
    # what the knobs bring beside them (pissa_convert, the optimizers' optim), refused alike
    overrides.update(knobs.implied(overrides))
    deepspeed = (
        req.deepspeed if req.deepspeed != AUTO else method and auto_deepspeed(method, req.stage)
    )
    problems += knobs.refused(
        overrides,
        {
            "deepspeed": deepspeed,
            "stage": req.stage,
            "method": method,
            "processes": req.processes,
            # LLaMA-Factory's default, under its other spelling too (render writes bnb)
            "quantization_method": str(overrides.get("quantization_method") or "bnb").replace(
                "bitsandbytes", "bnb"
            ),
        },
    )
    raise_all(problems)
    return overrides


def _check_lf_keys(
    given: dict[str, Any], origin: dict[str, str]
) -> tuple[dict[str, Any], list[QwenftError]]:
    """given with each value as LLaMA-Factory needs it, and a problem for each unknown key or
    value of the wrong type. Unchecked when LLaMA-Factory's table cannot be had (not installed)."""
    from qwenft.lf import args

    table = args.table()
    if table is None:
        return given, []
    lf = f"LLaMA-Factory {table.versions.get('llamafactory', '')}".rstrip()
    problems = []
    unknown = [k for k in given if k not in table]
    if unknown and not args.allow_extra_keys():
        key = unknown[0]
        close = table.suggest(key)
        hint = (
            "did you mean " + " or ".join(key_label(k) for k in close) + "?"
            if close
            else "check the spelling: `llamafactory-cli train -h` lists every argument"
        )
        more = f"; also unknown: {', '.join(map(repr, unknown[1:]))}" if unknown[1:] else ""
        problems.append(
            QwenftError(
                f"{lf} has no training argument {key!r} ({origin.get(key) or 'given'}){more}", hint
            )
        )
    out = dict(given)
    for key, value in given.items():
        if key not in table:
            continue
        try:
            out[key] = table.coerce(key, value)
        except args.BadValue as exc:
            problems.append(
                QwenftError(
                    bad_value(key, f"{exc} for {lf}", value, origin.get(key, "")),
                    "leave the key out to keep the default"
                    if value is None
                    else (f"set it with {KEY_OPTIONS[key]}" if key in KEY_OPTIONS else None),
                )
            )
            out.pop(key)  # no range check on a value of the wrong type: one problem is enough
    return out, problems


def processes_per_node(
    gpus: int | None, cpu_procs: int | None, gpus_seen: list[dict[str, Any]]
) -> int:
    """How many processes `train` starts on this machine: --gpus N where GPUs are visible,
    --cpu-procs N where none are (CPU processes, gloo), else every visible GPU or 1. --gpus on a
    machine without GPUs is refused rather than quietly run as CPU processes."""
    for option, n in (("--gpus", gpus), ("--cpu-procs", cpu_procs)):
        if n is not None and n < 1:
            raise QwenftError(
                f"{option} must be at least 1 (got {n})", "omit it to use every visible GPU"
            )
    if gpus is not None and cpu_procs is not None:
        raise QwenftError(
            "--gpus and --cpu-procs exclude each other",
            "--gpus N on a machine with GPUs, --cpu-procs N on one without",
        )
    if cpu_procs is not None:
        if gpus_seen:
            raise QwenftError(
                f"--cpu-procs is for machines without GPUs, and {len(gpus_seen)} GPU(s) are "
                "visible here",
                f"use --gpus {cpu_procs}",
            )
        return cpu_procs
    if gpus is not None:
        if not gpus_seen:
            raise QwenftError(
                f"--gpus {gpus}: no GPU is visible on this machine (nvidia-smi finds none)",
                f"to train with {gpus} CPU process(es) instead, pass --cpu-procs {gpus}",
            )
        return gpus
    return max(1, len(gpus_seen))


def resolve(req: RunRequest) -> RunSettings:
    """Check every choice of the request and fill in every default; raises QwenftError."""
    method = Method.parse(req.method, "--method", auto=True)
    deepspeed = DeepSpeed.parse(req.deepspeed, "--deepspeed", auto=True)
    gpus = 1 if req.gpus is None else req.gpus
    if gpus < 1:
        raise QwenftError(
            f"--gpus must be at least 1 (got {req.gpus})", "omit --gpus to use every visible GPU"
        )
    stage = Stage.parse(req.stage, "--stage")
    overrides = checked_overrides(req)  # before the model and the data: refusals cost nothing
    derives = [knobs.BY_KEY[key] for key in DERIVING if overrides.get(key)]
    if method == AUTO and derives:
        knob = derives[0]
        raise QwenftError(
            f"--method auto picks the method from the memory plan, and {knob.flag} needs --method "
            + " or ".join(knob.methods),
            f"name the method: --method {knob.methods[0]}",
        )
    parent, thinking_warning = None, None
    if req.parent is not None:
        parent = from_run(req.parent, req.template, req.thinking)
        model, enable_thinking = parent.model, parent.enable_thinking
    else:
        from qwenft.data.reasoning import thinking_plan

        model = model_for(req.model, req.template)
        plan = thinking_plan(
            req.data, model.thinking, Thinking.parse(req.thinking, "--thinking"), model.template
        )
        enable_thinking, thinking_warning = plan.enable_thinking, plan.warning
    if derives:
        model, overrides = derived_base(model, overrides, {**recipe(method, stage), **overrides})
    experts = {k: overrides.pop(k) for k in moe_adapter.OWN_KEYS if k in overrides}
    quantized = model.extra.get("quantization")
    if quantized:
        ds = deepspeed if deepspeed != AUTO else method != AUTO and auto_deepspeed(method, stage)
        overrides = on_quantized_base(model, method, ds or DeepSpeed.NONE, overrides)
        method = Method.QLORA.value if method == AUTO else method
    settings = RunSettings(
        model=model,
        method=method,
        deepspeed=deepspeed,
        enable_thinking=enable_thinking,
        overrides=overrides,
        values={**recipe(method, stage), **overrides},
        gpus=gpus,
        gpu_mem_gb=req.gpu_mem_gb,
        stage=stage,
        parent=parent,
        thinking_warning=thinking_warning,
        lora_experts=experts.get("lora_experts", "on") != "off",
        train_router=bool(experts.get("train_router")),
    )
    if method == AUTO:
        settings = _choose_method(settings, req)
    elif deepspeed == AUTO:
        settings.deepspeed = auto_deepspeed(method, stage)
    return moe_adapter.settle(settings, experts)


def on_quantized_base(
    model: presets.ResolvedModel, method: str, deepspeed: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """A pre-quantized base (GPTQ, AWQ, AQLM, HQQ, EETQ, bitsandbytes: its config.json's
    quantization_config) trains with LoRA on top as it is: full and freeze are refused, and so
    are what LLaMA-Factory would refuse or ignore on it (a quantization_bit of its own, ZeRO-3,
    DoRA on a non-bitsandbytes base). The overrides for LLaMA-Factory: no quantization_bit (the
    base's own quantization is loaded). Raises QwenftError with every problem."""
    quant = model.extra["quantization"]
    what = f"{model.spec} is {presets.quantization_label(quant)}-quantized"
    problems = []
    if method in (Method.FULL, Method.FREEZE):
        problems.append(
            QwenftError(
                f"--method {method}: {what}, and LLaMA-Factory trains a quantized base with LoRA "
                'only ("Quantized models can only be used for the LoRA or OFT tuning")',
                "--method qlora (LoRA on the quantized base), or the unquantized release",
            )
        )
    if overrides.get("quantization_bit") is not None:
        problems.append(
            QwenftError(
                f"{key_label('quantization_bit')}: {what}; LLaMA-Factory ignores a quantization of "
                "its own on it",
                "drop quantization_bit (the base's own quantization is used)",
            )
        )
    if deepspeed in (DeepSpeed.Z3, DeepSpeed.Z3_OFFLOAD) and quant["method"] not in (
        "fp8",
        "mxfp4",
    ):
        problems.append(
            QwenftError(
                f"--deepspeed {deepspeed}: {what}, and LLaMA-Factory refuses ZeRO-3 on it "
                '("DeepSpeed ZeRO-3 or FSDP is incompatible with PTQ-quantized models")',
                "--deepspeed z2 (or none)",
            )
        )
    if overrides.get("use_dora") and quant["method"] != "bitsandbytes":
        problems.append(
            QwenftError(
                f'--dora: {what}, and LLaMA-Factory refuses DoRA on it ("DoRA is not compatible '
                'with PTQ-quantized models")',
                "drop --dora",
            )
        )
    raise_all(problems)
    return {**overrides, "quantization_bit": None}


# The knobs whose run trains a base qwenft derives from the model (derived_base)
DERIVING = ("use_llama_pro", "loftq")
# LoftQ's alternating steps (quantize the rest, then fit the LoRA to what quantizing missed)
LOFTQ_STEPS = 4


def derived_base(
    model: presets.ResolvedModel, overrides: dict[str, Any], values: dict[str, Any]
) -> tuple[presets.ResolvedModel, dict[str, Any]]:
    """--llama-pro N and --loftq train a base qwenft derives from the model (qwenft.models.derived;
    `train` makes it before launch, `model.extra` says from what): the run's model is that base,
    and LLaMA-Factory gets what it trains it with (LLaMA Pro: use_llama_pro and
    freeze_trainable_layers N; LoftQ: the initial adapter as adapter_name_or_path)."""
    from qwenft.models import derived

    option = "--llama-pro" if overrides.get("use_llama_pro") else "--loftq"
    if model.kind == "hub":
        raise QwenftError(
            f"{option} derives a base from {model.spec} on this machine, and it is a hub model "
            "(LLaMA-Factory would download it inside the job)",
            f"download it first (huggingface-cli download {model.path} --local-dir DIR), then "
            "--model DIR",
        )
    base = {"base": model.to_dict()}
    if option == "--loftq":
        made = derived.loftq_recipe(values, LOFTQ_STEPS)
        path = derived.derived_path(model.path, derived.loftq_what(made))
        overrides = {k: v for k, v in overrides.items() if k != "loftq"}
        overrides["adapter_name_or_path"] = str(path / derived.LOFTQ_ADAPTER)
        return replace(
            model,
            kind="local",
            path=str(path),
            extra={**model.extra, "loftq": {**base, "recipe": made}},
        ), overrides
    blocks = int(overrides["use_llama_pro"])
    depth = model.arch.num_hidden_layers if model.arch else derived.layer_count(Path(model.path))
    derived.check_blocks(depth, blocks)
    expanded = replace(
        model,
        kind="local",
        path=str(derived.derived_path(model.path, f"pro{blocks}")),
        arch=replace(model.arch, num_hidden_layers=depth + blocks) if model.arch else None,
        extra={**model.extra, "llama_pro": {**base, "blocks": blocks}},
    )
    return expanded, {**overrides, "use_llama_pro": True, "freeze_trainable_layers": blocks}


def from_run(
    run_dir: Path, template: str | None = None, thinking: str = Thinking.AUTO.value
) -> FromRun:
    """--from RUN_DIR: the weights a new stage starts from (a LoRA/QLoRA run's merged model, a
    full or freeze run's own weights) with the template, system prompt and thinking mode that run
    was trained with. A --template or --thinking that differs from the run's is refused (the
    model learned the run's); so is a LoRA run that was not merged, with the command that merges
    it. Raises QwenftError."""
    from qwenft.models.target import resolve_target, reward_refusal
    from qwenft.runs.manifest import MANIFEST

    run_dir = Path(run_dir).expanduser().absolute()
    if not (run_dir / MANIFEST).is_file():
        from qwenft.runs.manifest import read_manifest

        read_manifest(run_dir)  # names what is wrong: not found, not a run folder
    target = resolve_target(str(run_dir))
    m = target.manifest
    assert m is not None
    refusal = reward_refusal(run_dir, m, "be the start of a later stage")
    if refusal is not None:
        raise refusal
    if target.adapter_path is not None:
        raise QwenftError(
            f"--from {run_dir}: that {m.method} run has no merged model to start from (a later "
            "stage trains a new adapter on the merged weights)",
            f"merge it first: qwenft merge {run_dir}",
        )
    if template is not None and Template.parse(template, "--template") != m.template:
        raise QwenftError(
            f"--from {run_dir}: that run was trained with template {m.template!r}, not "
            f"{template!r}; a later stage keeps it",
            "drop --template (the run's own is used)",
        )
    thinking = Thinking.parse(thinking, "--thinking")
    if thinking != Thinking.AUTO and m.enable_thinking is not None:
        if (thinking == Thinking.ON) != m.enable_thinking:
            raise QwenftError(
                f"--from {run_dir}: that run was trained with thinking "
                f"{'on' if m.enable_thinking else 'off'}, not {thinking}; a later stage keeps it",
                "drop --thinking (the run's own mode is used)",
            )
    model = replace(
        m.model,
        spec=target.model_path,
        kind="local",
        path=target.model_path,
        template=m.template,
        default_system=m.default_system,
    )
    return FromRun(run_dir, model, m.enable_thinking, m.stage, target.source)


def check_applies(settings: RunSettings) -> None:
    """`train` (--dry-run too): the checks that need the model or this machine: --trainable-layers
    within the model's decoder layers, ratio-based BAdam on a model with its own lm_head, and what
    the knobs need of the machine (unmet_needs; the stage and method rules are checked in
    resolve). Raises QwenftError."""
    raise_all(unmet_needs(settings.values) + quantized_base_needs(settings.model))
    layers = settings.values.get("freeze_trainable_layers")
    arch = settings.model.arch
    if settings.values.get("badam_mode") == "ratio" and arch and arch.tie_word_embeddings:
        raise QwenftError(
            f"--badam-mode ratio: {settings.model.spec} ties its lm_head to its embedding, and "
            "badam's ratio optimizer then stops with AttributeError (it freezes the lm_head by "
            "name, and a tied model has none)",
            "--badam-mode layer (the default)",
        )
    if settings.method == Method.FREEZE and isinstance(layers, int) and arch is not None:
        if abs(layers) > arch.num_hidden_layers:
            raise QwenftError(
                f"--trainable-layers {layers}: {settings.model.spec} has "
                f"{arch.num_hidden_layers} decoder layers (LLaMA-Factory would train them all)",
                f"choose 1..{arch.num_hidden_layers} (the last N) or -1..-"
                f"{arch.num_hidden_layers} (the first N); --method full trains every layer",
            )


def unmet_needs(values: dict[str, Any]) -> list[QwenftError]:
    """One problem for each set knob whose needs (knobs.Needs: an NVIDIA GPU of a compute
    capability, a package) this machine does not meet: LLaMA-Factory would fall back in silence
    (fa2) or stop after loading the model (liger, unsloth). `plan` does not ask: it plans for the
    machine that will train."""
    needs = knobs.needs_of(values)
    gpus = cuda_gpus() if any(need.cuda for _, need in needs) else []
    return [problem for label, need in needs if (problem := unmet(label, need, gpus))]


def unmet(
    label: str, need: knobs.Needs, gpus: list[dict[str, Any]], other: str = ""
) -> QwenftError | None:
    """What `label` needs of this machine (with these `gpus`) that it lacks, as one problem whose
    hint also names the other way out (`other`; default: drop the label); None when nothing is
    missing."""
    missing = []
    if need.cuda and not gpus:
        missing.append("a CUDA GPU (nvidia-smi sees none here)")
    elif need.cuda and min(g["compute_cap"] for g in gpus) < need.compute_cap:
        missing.append(f"a GPU of compute capability {need.compute_cap} or more (Ampere)")
    pips = [pip for pip, module in need.packages if not has_module(module)]
    missing += [f"the {pip} package (not installed)" for pip in pips]
    if not missing:
        return None
    other = other or f"drop {label}"
    install = (
        f"install the {need.extra} extra: QWENFT_EXTRAS={need.extra} scripts/setup_env.sh "
        f"(or pip install 'qwenft[{need.extra}]')"
        if need.extra
        else f"pip install {' '.join(pips)}"
    )
    hint = (
        f"{install}, or {other}"
        if len(missing) == len(pips)
        else f"train on a machine that has {missing[0].split(' (')[0]}, or {other}"
    )
    return QwenftError(f"{label} needs {' and '.join(missing)}", hint)


def quantized_base_needs(model: presets.ResolvedModel) -> list[QwenftError]:
    """What loading a pre-quantized base needs of this machine (presets.QUANTIZED_BASE_NEEDS),
    that it lacks: LLaMA-Factory would stop after the data, at the model's load."""
    quant = model.extra.get("quantization")
    need = presets.QUANTIZED_BASE_NEEDS.get(quant["method"]) if quant else None
    if need is None:
        return []
    label = f"{model.spec} ({presets.quantization_label(quant)})"
    gpus = cuda_gpus() if need.cuda else []
    problem = unmet(label, need, gpus, "train the unquantized release")
    return [problem] if problem else []


def cuda_gpus() -> list[dict[str, Any]]:
    """The NVIDIA GPUs of this machine (nvidia-smi, as --gpus counts them)."""
    from qwenft.proc.launcher import detect_gpus

    return detect_gpus()


def has_module(module: str) -> bool:
    """The module is installed in this environment (the one llamafactory-cli runs in)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _choose_method(settings: RunSettings, req: RunRequest) -> RunSettings:
    """--method auto: the best method that fits the GPUs (full -> LoRA -> QLoRA 8 -> 4-bit)."""
    from qwenft import memory

    if req.knobs.get("quantization_bit") is not None:
        raise QwenftError("--bits does not apply to --method auto", "auto tries 8-bit, then 4-bit")
    given_batch = settings.overrides.get("per_device_train_batch_size")
    probe = settings.plan_input()  # QwenftError when the model's shape is unknown
    plan, why = memory.choose_method(  # QwenftError without the GPU memory
        probe.arch,
        req.gpu_mem_gb,  # type: ignore[arg-type]
        gpus=settings.gpus,
        cutoff_len=probe.cutoff_len,
        batch_size=given_batch,
        lora_rank=probe.lora_rank,
        lora_target=probe.lora_target,
        gradient_checkpointing=probe.gradient_checkpointing,
        liger=probe.liger,
        deepspeed=None if settings.deepspeed == AUTO else settings.deepspeed,
        stage=settings.stage,
        optimizer=probe.optimizer,
        optimizer_rank=probe.optimizer_rank,
        layerwise=probe.layerwise,
        lora_experts=probe.lora_experts,
        train_router=probe.train_router,
    )
    raise_all(
        knobs.inapplicable(settings.overrides, settings.stage, plan.method)
        + knobs.refused(
            settings.overrides,
            {
                "deepspeed": plan.deepspeed,
                "stage": settings.stage,
                "method": plan.method,
                "processes": req.processes,
            },
        )
    )
    overrides = {**settings.overrides, "per_device_train_batch_size": plan.batch_size}
    if plan.method == Method.QLORA:
        overrides["quantization_bit"] = plan.bits
    return replace(
        settings,
        method=plan.method,
        deepspeed=plan.deepspeed,
        overrides=overrides,
        values={**recipe(plan.method, settings.stage), **overrides},
        auto_plan=plan,
        auto_why=why,
    )


def fit_warning(settings: RunSettings) -> str | None:
    """A warning when the memory plan says the run will not fit the GPUs (None if it fits or
    nothing is known about the GPUs or the model)."""
    from qwenft import memory

    if settings.model.arch is None or settings.gpu_mem_gb is None or settings.auto_plan:
        return None
    est = memory.estimate(settings.plan_input())
    if est.fits is not False:
        return None
    note = (
        f"warning: qwenft plan predicts {est.peak_bytes / 1e9:.1f} GB per GPU for this run, "
        f"more than the {settings.gpu_mem_gb:.1f} GB available"
    )
    try:
        _, why = memory.choose_method(
            settings.model.arch,
            settings.gpu_mem_gb,
            gpus=settings.gpus,
            cutoff_len=settings.cutoff_len,
            stage=settings.stage,
        )
        note += f"; what would fit: {why}"
    except QwenftError:
        note += "; nothing qwenft plans fits: add GPUs or lower --cutoff-len"
    return note


# --------------------------------------------------------------------------------------------------
# Step settings that follow the run's length (issue 11, item 3). `train` calls step_defaults() from
# plan_train, so the rendered train.yaml (and with it --dry-run and resume) carries the values.

LOSS_POINTS = 50  # a loss point every ~2 % of the run
CHECKPOINTS = 10  # a checkpoint every ~10 %: Ctrl-C loses at most about a tenth of the run
EVALUATIONS = 4  # evaluations during the run (LLaMA-Factory adds one after training)
EVAL_SHARE = 2  # all evaluations together read at most 1/EVAL_SHARE of the samples training reads
MIN_HELD_OUT = 2  # a smaller default split is dropped (and LLaMA-Factory reads val_size 1 as 100 %)


def held_out_count(val_size: Any, n_samples: int) -> int:
    """Samples LLaMA-Factory holds out for val_size: a count above 1, else a share rounded up
    (datasets' train_test_split)."""
    import math

    if not isinstance(val_size, int | float) or val_size <= 1e-6:
        return 0
    if val_size > 1:
        return min(int(val_size), n_samples)
    return min(math.ceil(val_size * n_samples), n_samples)


def planned_steps(values: dict[str, Any], n_samples: int, processes: int = 1) -> int:
    """The optimizer steps the run will take, counted as the transformers Trainer counts them:
    max_steps when set, else ceil(epochs x ceil(batches per process / grad_accum)) over the samples
    left after the held-out split. (Packing changes the count; this ignores it.)"""
    import math

    max_steps = values.get("max_steps")
    if isinstance(max_steps, int | float) and max_steps > 0:
        return int(max_steps)
    n_train = max(1, n_samples - held_out_count(values.get("val_size"), n_samples))
    batch = int(values.get("per_device_train_batch_size") or 1)
    accum = int(values.get("gradient_accumulation_steps") or 1)
    batches = math.ceil(math.ceil(n_train / max(1, processes)) / batch)
    updates = max(math.ceil(batches / accum), 1)
    return max(1, math.ceil(updates * float(values.get("num_train_epochs") or 1)))


def step_defaults(
    values: dict[str, Any], overrides: dict[str, Any], n_samples: int, processes: int = 1
) -> dict[str, Any]:
    """logging_steps, save_steps and the evaluation schedule for a run of this length, for every
    key the person did not set (--config, --set, --logging-steps, --save-steps, --val-size...);
    returns only the keys to change. `values` is the recipe with the overrides over it, T the
    planned optimizer steps (planned_steps):

    - logging_steps = max(1, T // 50), never sparser than the recipe's: ~50 loss points, so a
      10-step run logs every step and the summary, loss plot and NaN/zero-loss watch work;
    - save_steps = max(1, T // 10), never sparser than the recipe's: Ctrl-C loses at most ~10 %;
    - with a held-out split and eval_strategy steps: eval_steps = ceil(T / 4), never sparser than
      the recipe's, and the recipe's split (val_size 0.1) is capped so that all evaluations
      together (T // eval_steps + 1 with LLaMA-Factory's final one) read at most half the samples
      training reads; below 2 held-out samples the split is dropped (val_size 0: no evaluation).
      A val_size the person chose is kept as it is.
    """
    import math

    out: dict[str, Any] = {}

    def capped(key: str, steps: int) -> None:
        if key in overrides:
            return
        recipe_value = values.get(key)
        if isinstance(recipe_value, int) and recipe_value > 0:
            steps = min(steps, recipe_value)
        out[key] = max(1, steps)

    total = planned_steps(values, n_samples, processes)
    val_size = values.get("val_size") or 0
    evaluates = val_size or values.get("eval_dataset")  # a held-out split, or --eval-data
    if evaluates and str(values.get("eval_strategy", "no")) == "steps":
        capped("eval_steps", math.ceil(total / EVALUATIONS))
        every = int(out.get("eval_steps") or values.get("eval_steps") or 1)
        if val_size and "val_size" not in overrides:
            per_step = (
                int(values.get("per_device_train_batch_size") or 1)
                * int(values.get("gradient_accumulation_steps") or 1)
                * max(1, processes)
            )
            budget = total * per_step // (EVAL_SHARE * (total // every + 1))
            if held_out_count(val_size, n_samples) > budget:
                out["val_size"] = budget if budget >= MIN_HELD_OUT else 0.0
                if not out["val_size"]:
                    out.pop("eval_steps", None)
                total = planned_steps({**values, **out}, n_samples, processes)
    capped("logging_steps", total // LOSS_POINTS)
    capped("save_steps", total // CHECKPOINTS)
    return out
