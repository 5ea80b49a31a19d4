"""LoRA that covers a mixture-of-experts model's experts: the initial adapter qwenft makes before
launch, and the choices and refusals around it.

Why: in transformers 5 the routed experts of Qwen2-MoE / Qwen3-MoE are fused parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and the router a bare parameter
(`mlp.gate.weight`). LLaMA-Factory 0.9.5's `lora_target: all` looks for `nn.Linear` modules only,
so it adapts the attention alone, in silence; and it never passes PEFT's `target_parameters`.

How, without patching LLaMA-Factory: its `_setup_lora_tuning` (llamafactory/model/adapter.py)
loads an existing adapter to train on when `adapter_name_or_path` is set and `create_new_adapter`
is false (`PeftModel.from_pretrained(model, path, is_trainable=True)`). So qwenft makes that
adapter itself: a PEFT `LoraConfig` with `target_modules` (the linear layers, as `lora_target`
names them) and `target_parameters` (the experts, and the router with --train-router), the run's
rank, alpha and rsLoRA, and PEFT's default initialization (B = 0: the model is unchanged at step
0). It is written into the run folder (`RUN/adapter_init`) and train.yaml names it. PEFT wraps
each targeted parameter (`ParamWrapper`): a rank-r pair per expert, folded into the weight in each
forward; such a wrapper takes no dropout (PEFT refuses `lora_dropout` != 0 on it) and no DoRA.
`merge` (LLaMA-Factory's export: `merge_and_unload`) folds the update into the expert weights.

The base is built on the meta device (no weights read, no memory): only the adapter's own
tensors are made, so a 235B model's initial adapter costs its size, not the model's.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qwenft.choices import AUTO, Method
from qwenft.errors import QwenftError, raise_all

OWN_KEYS = ("lora_experts", "train_router")  # knobs qwenft carries out (not LLaMA-Factory keys)
INIT_ADAPTER = "adapter_init"  # the initial adapter's folder in the run folder
# The route's versions: LLaMA-Factory's adapter set-up read and tried on 0.9.5; PEFT's
# target_parameters (ParamWrapper) arrived in 0.17.
LF_VERSIONS = ("0.9.5",)
PEFT_MIN = (0, 17)
# Hub ids of MoE releases: Qwen3-30B-A3B, Qwen2-57B-A14B, Qwen1.5-MoE-A2.7B ...
_MOE_NAME = re.compile(r"(-a\d+(\.\d+)?b\b|moe)", re.IGNORECASE)
# What the initial adapter replaces: keys LLaMA-Factory reads only when it makes the adapter.
_REFUSED = {
    "lora_dropout": 'PEFT puts no dropout on a LoRA of parameters ("lora.ParamWrapper does not '
    'work with lora_dropout != 0"), and one adapter has one dropout',
    "use_dora": 'PEFT has no DoRA on a LoRA of parameters ("does not work with use_dora=True")',
    "pissa_init": "LLaMA-Factory initializes PiSSA only on an adapter it makes itself",
    "adapter_name_or_path": "qwenft makes the adapter the run starts from",
    "create_new_adapter": "LLaMA-Factory would make a new adapter of linear layers only",
    "additional_target": "LLaMA-Factory adds it only to an adapter it makes itself",
    "use_llama_pro": "LLaMA-Factory places LLaMA Pro's targets only on an adapter it makes itself",
}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def route_problem() -> str | None:
    """Why qwenft cannot cover the experts with this LLaMA-Factory and PEFT (None: it can)."""
    lf, peft = _version("llamafactory"), _version("peft")
    if peft is None or _release(peft)[:2] < PEFT_MIN:
        return (
            f"PEFT {peft or '(not installed)'} has no LoRA on parameters (target_parameters "
            f"needs PEFT >= {'.'.join(map(str, PEFT_MIN))})"
        )
    if lf not in LF_VERSIONS:
        return (
            f"qwenft hands LLaMA-Factory the expert adapter through adapter_name_or_path, a route "
            f"checked on LLaMA-Factory {', '.join(LF_VERSIONS)}, and this is {lf or 'none'}"
        )
    return None


def looks_moe(name: str) -> bool:
    """A hub id or folder name of a mixture-of-experts release (-A3B, -A14B, MoE)."""
    return bool(_MOE_NAME.search(name))


def settle(settings: Any, given: dict[str, Any]) -> Any:
    """The run's adapter on a mixture-of-experts model (settings.RunSettings): refuse the MoE
    options on a dense model; on an MoE model under LoRA with the experts or the router covered,
    the initial adapter's recipe (lora_dropout 0: PEFT's rule), refusing what it would ignore or
    cannot do; with --lora-experts off, a note that the experts stay frozen. Raises QwenftError
    with every problem."""
    from qwenft.knobs import key_label

    model, arch = settings.model, settings.model.arch
    moe = arch is not None and arch.moe is not None
    chosen = [*given, *(["moe_aux_loss_coef"] if "moe_aux_loss_coef" in settings.overrides else [])]
    adapter = settings.method != AUTO and Method(settings.method).facts.adapter
    if not moe:
        if arch is None and adapter and looks_moe(model.path):
            raise QwenftError(
                f"{model.spec} looks like a mixture-of-experts model, and qwenft has no "
                "architecture numbers for it: LLaMA-Factory's LoRA would adapt its attention "
                "only and leave every expert untrained, in silence",
                "use a preset from `qwenft models`, or download it and pass the local folder "
                "(its config.json is read)",
            )
        if chosen:
            raise QwenftError(
                f"{', '.join(key_label(k) for k in chosen)}: {model.spec} is not a "
                "mixture-of-experts model",
                "drop " + ", ".join(key_label(k) for k in chosen),
            )
        return settings
    if not adapter:
        return settings  # full and freeze train the experts' (and the router's) own weights
    notes = []
    if Method(settings.method).facts.quantized:
        notes.append(
            "qlora: bitsandbytes quantizes nn.Linear layers only, so the experts (fused "
            "parameters, most of the model) stay in 16 bits; `qwenft plan` counts them so"
        )
    if not (settings.lora_experts or settings.train_router):
        notes.append(
            "--lora-experts off: LoRA on the attention and other linear layers only; the experts "
            "and the router stay frozen"
        )
        return replace(settings, adapter_notes=notes)
    problems = []
    why = route_problem()
    if why:
        problems.append(
            QwenftError(
                f"LoRA on the experts of {model.spec}: {why}; nothing was started",
                "--lora-experts off trains the attention and other linear layers only (and says "
                "so)",
            )
        )
    for key, reason in _REFUSED.items():
        value = settings.overrides.get(key)
        if value not in (None, False, 0, 0.0) or (key == "use_llama_pro" and value):
            problems.append(
                QwenftError(
                    f"{key_label(key)} with LoRA on the experts of {model.spec}: {reason}",
                    f"drop {key_label(key)}, or --lora-experts off (attention only)",
                )
            )
    if model.extra.get("loftq"):
        problems.append(
            QwenftError(
                f"--loftq with LoRA on the experts of {model.spec}: LoftQ's adapter covers "
                "linear layers only",
                "drop --loftq, or --lora-experts off",
            )
        )
    raise_all(problems)
    cov = settings.coverage
    values = settings.values
    recipe = {
        "r": settings.lora_rank,
        "lora_alpha": int(values.get("lora_alpha") or 2 * settings.lora_rank),
        "use_rslora": bool(values.get("use_rslora")),
        "lora_dropout": 0.0,
        "target_modules": list(cov.modules),
        "target_parameters": list(cov.parameters),
    }
    if values.get("lora_dropout"):
        notes.append(
            f"lora_dropout {values['lora_dropout']} -> 0: PEFT puts no dropout on a LoRA of "
            "parameters (the experts), and the adapter has one dropout"
        )
    overrides = {**settings.overrides, "lora_dropout": 0.0}
    return replace(
        settings,
        overrides=overrides,
        values={**values, "lora_dropout": 0.0},
        initial_adapter=recipe,
        adapter_notes=notes,
    )


def make_initial_adapter(
    model_path: str, recipe: dict[str, Any], out: Path, say: Callable[[str], Any] = print
) -> dict[str, int]:
    """Write the initial adapter of `recipe` (settle) for the model at model_path (a folder or a
    hub id: only its config is read) into `out`; return its trainable parameters by kind
    ("linear", "experts", "router"), as PEFT made them."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    try:
        config = transformers.AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise QwenftError(
            f"cannot read the config of {model_path} to make the expert adapter: {exc}",
            "download the model and pass its folder, or --lora-experts off",
        ) from exc
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        inference_mode=False,
        r=recipe["r"],
        lora_alpha=recipe["lora_alpha"],
        lora_dropout=recipe["lora_dropout"],
        use_rslora=recipe["use_rslora"],
        target_modules=recipe["target_modules"] or None,
        target_parameters=recipe["target_parameters"] or None,
    )
    with warnings.catch_warnings():  # PEFT warns of any module type it has no LoRA layer for
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft_model = get_peft_model(model, lora)
    counts = {"linear": 0, "experts": 0, "router": 0}
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        for part in (module.lora_A["default"], module.lora_B["default"]):
            part.to_empty(device="cpu")  # the adapter's own tensors only, made real
            part.to(torch.float32)
        module.reset_lora_parameters("default", True)  # PEFT's default: A random, B = 0
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            kind = (
                "experts" if ".mlp.experts." in name else "router" if ".mlp.gate." in name
                else "linear"
            )  # fmt: skip
            counts[kind] += param.numel()
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    say(
        f"made the initial adapter ({sum(counts.values()):,} parameters: "
        + ", ".join(f"{v:,} {k}" for k, v in counts.items() if v)
        + f") in {out}"
    )
    return counts
