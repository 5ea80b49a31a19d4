"""Pure rendering: a training spec -> an ordered LLaMA-Factory config -> YAML text.

The method templates live in configs/ (shipped as package data `qwenft.configs`), the stages'
keys in configs/stages/ (layered over the method's: load_recipe). Every key the run uses is
written out, grouped in the `### model / ### method / ### dataset / ### output /
### train / ### eval` sections of the Qwen guide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from qwenft.choices import DeepSpeed, Method, Stage
from qwenft.errors import QwenftError
from qwenft.knobs import KNOBS, as_number

# The sections of train.yaml and the order of keys in each; a knob not listed here is written in
# the section its row in qwenft.knobs.KNOBS names.
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": (
        "model_name_or_path",
        "adapter_name_or_path",
        "trust_remote_code",
        "quantization_bit",
        "quantization_method",
        "quantization_type",
        "double_quantization",
        "flash_attn",
        "enable_liger_kernel",
        "use_unsloth",
        "infer_backend",
    ),
    "method": (
        "stage",
        "do_train",
        "finetuning_type",
        "pref_loss",
        "pref_beta",
        "simpo_gamma",
        "kto_chosen_weight",
        "kto_rejected_weight",
        "pref_ftx",
        "lora_target",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "freeze_trainable_layers",
        "deepspeed",
    ),
    "dataset": (
        "dataset",
        "data_file",
        "mix_strategy",
        "interleave_probs",
        "eval_dataset",
        "dataset_dir",
        "template",
        "default_system",
        "enable_thinking",
        "cutoff_len",
        "max_samples",
        "overwrite_cache",
        "preprocessing_num_workers",
        "tokenized_path",
        "packing",
        "neat_packing",
    ),
    "output": (
        "output_dir",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "plot_loss",
        "report_to",
        "run_name",
        "use_swanlab",
        "swanlab_mode",
        "swanlab_logdir",
        "swanlab_run_name",
        "save_only_model",
    ),
    "train": (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "train_sampling_strategy",
        "learning_rate",
        "optim",
        "num_train_epochs",
        "max_steps",
        "lr_scheduler_type",
        "warmup_ratio",
        "warmup_steps",
        "bf16",
        "fp16",
        "ddp_timeout",
        "seed",
        "include_effective_tokens_per_second",
    ),
    "eval": (
        "val_size",
        "per_device_eval_batch_size",
        "eval_strategy",
        "eval_steps",
        "do_eval",
        "do_predict",
        "predict_with_generate",
    ),
    "export": ("export_dir", "export_size", "export_device", "export_legacy_format"),
}


def load_template(name: str) -> dict[str, Any]:
    """Read configs/<name>.yaml from the installed package data (name may be stages/<stage>)."""
    *folders, leaf = name.split("/")
    where = resources.files("qwenft.configs")
    for folder in folders:
        where = where.joinpath(folder)
    text = where.joinpath(f"{leaf}.yaml").read_text(encoding="utf-8")
    return dict(yaml.safe_load(text) or {})


def load_recipe(method: str, stage: str = Stage.SFT.value) -> dict[str, Any]:
    """A run's recipe: configs/<method>.yaml with configs/stages/<stage>.yaml over it. The one
    place the stage's keys (stage, pref_loss, pref_beta, ...) come from: `train`, `--dry-run`,
    `plan` and settings.recipe read it."""
    stage = Stage.parse(stage, "--stage")
    cfg = load_template(method)
    cfg.update(load_template(f"stages/{stage}"))
    return cfg


def deepspeed_config_text(stage: str) -> str:
    """The JSON text of configs/deepspeed/<stage>.json."""
    if stage == DeepSpeed.NONE:
        raise QwenftError("no DeepSpeed config for 'none'")
    stage = DeepSpeed.parse(stage, "--deepspeed")
    return resources.files("qwenft.configs.deepspeed").joinpath(f"{stage}.json").read_text()


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse --set key=value pairs; values are YAML scalars (so 1e-4, true, null work)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise QwenftError(
                f"malformed --set {item!r}", "write --set key=value, e.g. --set logging_steps=5"
            )
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise QwenftError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
        out[key] = as_number(parsed)
    return out


@dataclass
class TrainSpec:
    """Everything that decides a training config. Values left as None keep the template's."""

    method: str
    model_path: str
    template: str
    default_system: str
    dataset: str
    dataset_dir: str
    output_dir: str
    stage: str = Stage.SFT.value
    enable_thinking: bool | None = None
    deepspeed_path: str | None = None
    bf16: bool = False
    # --config FILE < the knobs (--cutoff-len, --lr, ...) < --set key=value, already layered
    overrides: dict[str, Any] = field(default_factory=dict)
    # several --data files and --eval-data: mix_strategy, interleave_probs, eval_dataset
    # (qwenft.data.mixture.Mixture.lf_keys), over the overrides
    mixture: dict[str, Any] = field(default_factory=dict)


# Keys that qwenft owns: overriding them would point the run somewhere its manifest does not say.
OWNED_KEYS = {
    "model_name_or_path": "--model",
    "stage": "--stage",
    "template": "--template",
    "dataset": "--data",
    "eval_dataset": "--eval-data",
    "mix_strategy": "--mix",
    "interleave_probs": "--data FILE:SHARE",
    "dataset_dir": "--dataset-dir",
    "output_dir": "--output-dir",
    "deepspeed": "--deepspeed",
}


def build_train_config(spec: TrainSpec) -> dict[str, Any]:
    """Layer the method's template and the stage's keys < qwenft's own keys < the person's
    overrides; cross-field rules."""
    method = Method.parse(spec.method, "--method")
    for key in spec.overrides:
        if key in OWNED_KEYS:
            raise QwenftError(f"--config/--set may not set {key}", f"use {OWNED_KEYS[key]} instead")
    cfg = load_recipe(method, spec.stage)
    cfg.update(
        model_name_or_path=spec.model_path,
        dataset=spec.dataset,
        dataset_dir=spec.dataset_dir,
        template=spec.template,
        default_system=spec.default_system,
        output_dir=spec.output_dir,
        bf16=spec.bf16,
        preprocessing_num_workers=min(cfg["preprocessing_num_workers"], os.cpu_count() or 1),
    )
    if spec.enable_thinking is not None:
        cfg["enable_thinking"] = spec.enable_thinking
    if spec.deepspeed_path:
        cfg["deepspeed"] = spec.deepspeed_path
    cfg.update(spec.overrides)
    cfg.update(spec.mixture)
    if cfg.get("overwrite_output_dir"):
        raise QwenftError(
            "overwrite_output_dir would disable resuming from checkpoints",
            "remove it; qwenft never reuses a run folder (use a new --output-dir)",
        )
    if cfg.get("quantization_method") == "bitsandbytes":
        cfg["quantization_method"] = "bnb"  # the guide's spelling is ignored by LLaMA-Factory
    if not cfg.get("val_size") and not cfg.get("eval_dataset"):
        # No held-out split: evaluating would fail ("requires an eval dataset").
        cfg["val_size"] = 0.0
        cfg["eval_strategy"] = "no"
        cfg.pop("eval_steps", None)
        cfg.pop("per_device_eval_batch_size", None)
    if cfg.get("max_steps") is not None and cfg["max_steps"] <= 0:
        cfg.pop("max_steps")
    return cfg


def build_merge_config(
    model_path: str,
    adapter_dir: str,
    template: str,
    default_system: str,
    export_dir: str,
    *,
    reward: bool = False,
) -> dict[str, Any]:
    """The export config for merging a LoRA/QLoRA adapter into its unquantized base. A reward
    model's (reward) says `stage: rm`, so LLaMA-Factory copies the value head beside the merged
    weights (value_head.safetensors, from the adapter folder)."""
    cfg = {
        "model_name_or_path": model_path,
        "adapter_name_or_path": adapter_dir,
        "template": template,
        "default_system": default_system,
        "export_dir": export_dir,
    }
    cfg.update(load_template("merge"))
    if reward:
        cfg["stage"] = "rm"
    return cfg


def to_yaml(cfg: dict[str, Any], header: str | None = None) -> str:
    """YAML text with every key written out, grouped in the Qwen guide's sections."""
    placed: set[str] = set()
    blocks: list[str] = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for section, keys in [*SECTIONS.items(), ("other", tuple(cfg))]:
        keys = (*keys, *(k.key for k in KNOBS if k.section == section))  # knobs name theirs
        part = {k: cfg[k] for k in keys if k in cfg and k not in placed}
        if not part:
            continue
        placed.update(part)
        if blocks:
            blocks.append("")
        blocks.append(f"### {section}")
        blocks.append(
            yaml.safe_dump(part, sort_keys=False, allow_unicode=True, width=1000).rstrip()
        )
    return "\n".join(blocks) + "\n"
