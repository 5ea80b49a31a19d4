"""One resolver from a request (CLI options, --config, --set, the model, the data) to a run's
settings. `train`, `plan`, `data check --model` and `eval` all call it, so the cutoff, template,
system prompt, thinking mode, method and DeepSpeed stage one of them shows are the ones `train`
uses.

The recipe defaults live in configs/<method>.yaml; the layers over them are, lowest first:
the recipe < --config FILE < the named knobs (--cutoff-len, --lr, ...) < --set key=value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qwenft.choices import AUTO, DeepSpeed, Method, Template, Thinking, auto_deepspeed
from qwenft.errors import QwenftError
from qwenft.lf import render
from qwenft.models import presets

LORA_RANK_DEFAULT = 16  # LLaMA-Factory's own, for recipes that do not set lora_rank


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
    gpus: int | None = None  # GPUs (processes) sharing the run; None: 1
    gpu_mem_gb: float | None = None  # GB per GPU: --method auto and the fit check
    config_file: Path | None = None
    set_items: list[str] = field(default_factory=list)
    knobs: dict[str, Any] = field(default_factory=dict)  # LLaMA-Factory key -> value or None
    cpu_procs: int | None = None  # processes on a machine without GPUs (instead of gpus)


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
        bits = self.values.get("quantization_bit")
        return int(bits) if bits else None

    def plan_input(self) -> Any:
        """The memory-plan input for this run (qwenft.memory.PlanInput): the one way it is built."""
        from qwenft import memory

        if self.model.arch is None:
            raise QwenftError(
                f"qwenft has no architecture numbers for {self.model.spec}, so it cannot plan "
                "memory for it",
                "use a model listed by `qwenft models`, or download it and pass the local folder "
                "(its config.json is read)",
            )
        v = self.values
        return memory.PlanInput(
            arch=self.model.arch,
            method=self.method,
            bits=self.quantization_bit,
            gpus=self.gpus,
            deepspeed=self.deepspeed,
            cutoff_len=self.cutoff_len,
            batch_size=self.batch_size,
            lora_rank=self.lora_rank,
            lora_target=str(v.get("lora_target") or "all"),
            gradient_checkpointing=not v.get("disable_gradient_checkpointing", False),
            liger=bool(v.get("enable_liger_kernel", False)),
            gpu_mem_gb=self.gpu_mem_gb,
        )


def recipe(method: str) -> dict[str, Any]:
    """The defaults of a method: configs/<method>.yaml (LoRA's for `auto`, until it is chosen)."""
    return render.load_template(Method.LORA.value if method == AUTO else method)


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
    person's --thinking, else decided from the data (all samples reason: on; none: off; a mix is
    refused, because training one mode would teach the model the other's samples wrongly)."""
    thinking = Thinking.parse(thinking, "--thinking")
    if model.thinking != "hybrid":
        return None
    if thinking != Thinking.AUTO:
        return thinking == Thinking.ON
    if data is None:
        return False
    from qwenft.data.check import count_thinking_samples

    with_think, total = count_thinking_samples(data)
    if with_think == 0:
        return False
    if with_think == total:
        return True
    raise QwenftError(
        f"{with_think} of {total} samples in {data} have <think> blocks and the rest do not",
        "decide with --thinking on (train reasoning) or --thinking off (train direct answers)",
    )


# --------------------------------------------------------------------------------------------------
# Every knob is checked before launch (one home: train, plan, data check and eval all resolve here).

# The LLaMA-Factory keys that qwenft options set: messages and hints name the option with the key.
# `train`'s knobs (qwenft/cli/__init__.py), and the ones only `plan` has (--bits, --lora-target).
KEY_OPTIONS: dict[str, str] = {
    "cutoff_len": "--cutoff-len",
    "num_train_epochs": "--epochs",
    "max_steps": "--max-steps",
    "learning_rate": "--lr",
    "per_device_train_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "lora_rank": "--lora-rank",
    "val_size": "--val-size",
    "save_steps": "--save-steps",
    "logging_steps": "--logging-steps",
    "quantization_bit": "--bits",
    "lora_target": "--lora-target",
}


def _above_zero(v: float) -> bool:
    return v > 0


def _at_least_one(v: float) -> bool:
    return v >= 1


def _fraction(v: float) -> bool:
    return 0 <= v < 1


WHOLE = "a positive whole number"

# key -> (test, what it must be, hint). LLaMA-Factory would take most of these and then train
# nothing, a whole epoch instead of a few steps (max_steps <= 0 means "by epochs"), or fail late.
RANGES: dict[str, tuple[Any, str, str]] = {
    "max_steps": (_above_zero, WHOLE, "leave it out to train for --epochs"),
    "num_train_epochs": (_above_zero, "positive", "e.g. --epochs 3"),
    "learning_rate": (_above_zero, "positive", "e.g. --lr 1e-4 (LoRA) or --lr 1e-5 (full)"),
    "per_device_train_batch_size": (_at_least_one, WHOLE, "e.g. --batch-size 4"),
    "gradient_accumulation_steps": (_at_least_one, WHOLE, "e.g. --grad-accum 4"),
    "cutoff_len": (_at_least_one, WHOLE, "`qwenft data check --model M` suggests one"),
    "lora_rank": (_at_least_one, WHOLE, "e.g. --lora-rank 16"),
    "val_size": (_fraction, "in [0, 1)", "a share of the samples held out, e.g. 0.1; 0 = none"),
    "save_steps": (_above_zero, "positive", "steps between checkpoints, e.g. 500"),
    "logging_steps": (_above_zero, "positive", "steps between loss lines, e.g. 10"),
    "per_device_eval_batch_size": (_at_least_one, WHOLE, "e.g. 4"),
}


def key_label(key: str) -> str:
    """How messages name a LLaMA-Factory key: with the qwenft option that sets it, if any."""
    option = KEY_OPTIONS.get(key)
    return f"{option} ({key})" if option else key


def bad_value(key: str, must: str, value: Any, origin: str = "") -> str:
    """The refusal of a value, naming the qwenft option first, then the key and where the value
    came from: "--lr must be positive, got 0.0 (learning_rate, from --set learning_rate=0)"."""
    option = KEY_OPTIONS.get(key)
    notes = ", ".join(n for n in (key if option else "", origin) if n)
    shown = "null" if value is None else repr(value)
    return f"{option or key} must be {must}, got {shown}" + (f" ({notes})" if notes else "")


def checked_overrides(req: RunRequest) -> dict[str, Any]:
    """The person's keys, layered (--config < knobs < --set) and checked: --config and --set keys
    must be LLaMA-Factory training arguments (qwenft.lf.args: its own dataclasses) with values of
    the declared type, and every key in RANGES must be in range, whichever layer set it. The
    message names the qwenft option and where the value came from; raises QwenftError."""
    config = read_config_file(req.config_file)
    knobs = {k: v for k, v in req.knobs.items() if v is not None}
    sets = render.parse_set(req.set_items)
    origin: dict[str, str] = {k: f"from --config {req.config_file}" for k in config}
    origin.update({k: "" for k in knobs})
    for item in req.set_items:
        origin[item.partition("=")[0].strip()] = f"from --set {item.strip()}"
    overrides = {**config, **knobs, **sets}
    free = [k for k in overrides if k not in knobs or k in sets]  # keys typed as text, not options
    if free:
        overrides.update(_check_lf_keys({k: overrides[k] for k in free}, origin))
    for key, value in overrides.items():
        if key not in RANGES:
            continue
        test, must, hint = RANGES[key]
        number = render._as_number(value)  # --config's 1e-4 is YAML 1.1 text
        if not isinstance(number, int | float) or isinstance(number, bool):
            raise QwenftError(bad_value(key, "a number", value, origin.get(key, "")), hint)
        if not test(number):
            raise QwenftError(bad_value(key, must, value, origin.get(key, "")), hint)
    return overrides


def _check_lf_keys(given: dict[str, Any], origin: dict[str, str]) -> dict[str, Any]:
    """given with each value as LLaMA-Factory needs it; QwenftError for an unknown key or a value
    of the wrong type. Unchecked when LLaMA-Factory's table cannot be had (not installed here)."""
    from qwenft.lf import args

    table = args.table()
    if table is None:
        return given
    lf = f"LLaMA-Factory {table.versions.get('llamafactory', '')}".rstrip()
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
        raise QwenftError(
            f"{lf} has no training argument {key!r} ({origin.get(key) or 'given'}){more}", hint
        )
    out = dict(given)
    for key, value in given.items():
        if key not in table:
            continue
        try:
            out[key] = table.coerce(key, value)
        except args.BadValue as exc:
            raise QwenftError(
                bad_value(key, f"{exc} for {lf}", value, origin.get(key, "")),
                "leave the key out to keep the default"
                if value is None
                else (f"set it with {KEY_OPTIONS[key]}" if key in KEY_OPTIONS else None),
            ) from None
    return out


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
    overrides = checked_overrides(req)  # before the model and the data: refusals cost nothing
    model = model_for(req.model, req.template)
    enable_thinking = thinking_choice(req.thinking, model, req.data)
    settings = RunSettings(
        model=model,
        method=method,
        deepspeed=deepspeed,
        enable_thinking=enable_thinking,
        overrides=overrides,
        values={**recipe(method), **overrides},
        gpus=gpus,
        gpu_mem_gb=req.gpu_mem_gb,
    )
    if method == AUTO:
        return _choose_method(settings, req)
    if deepspeed == AUTO:
        settings.deepspeed = auto_deepspeed(method)
    return settings


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
    )
    overrides = {**settings.overrides, "per_device_train_batch_size": plan.batch_size}
    if plan.method == Method.QLORA:
        overrides["quantization_bit"] = plan.bits
    return replace(
        settings,
        method=plan.method,
        deepspeed=plan.deepspeed,
        overrides=overrides,
        values={**recipe(plan.method), **overrides},
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
    if val_size and str(values.get("eval_strategy", "no")) == "steps":
        capped("eval_steps", math.ceil(total / EVALUATIONS))
        every = int(out.get("eval_steps") or values.get("eval_steps") or 1)
        if "val_size" not in overrides:
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
