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


def resolve(req: RunRequest) -> RunSettings:
    """Check every choice of the request and fill in every default; raises QwenftError."""
    method = Method.parse(req.method, "--method", auto=True)
    deepspeed = DeepSpeed.parse(req.deepspeed, "--deepspeed", auto=True)
    gpus = 1 if req.gpus is None else req.gpus
    if gpus < 1:
        raise QwenftError(
            f"--gpus must be at least 1 (got {req.gpus})", "omit --gpus to use every visible GPU"
        )
    model = model_for(req.model, req.template)
    enable_thinking = thinking_choice(req.thinking, model, req.data)
    overrides = {
        **read_config_file(req.config_file),
        **{k: v for k, v in req.knobs.items() if v is not None},
        **render.parse_set(req.set_items),
    }
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
