"""`qwenft merge`: fold a LoRA/QLoRA adapter into its unquantized base with `llamafactory-cli export`.

The export goes to a hidden folder beside the target and is renamed into place only when it is
complete and checked, so a merged model is whole or absent.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.choices import Stage, own_weights
from qwenft.errors import JobFailed, QwenftError
from qwenft.fsutil import atomic_write_json, atomic_write_text, refuse_existing, staged_dir
from qwenft.lf import launcher as lf_launcher
from qwenft.lf import render
from qwenft.models import inference
from qwenft.models.presets import quantization_label
from qwenft.models.target import VALUE_HEAD, ModelTarget, resolve_target
from qwenft.proc import launcher
from qwenft.runs.lock import RunLock
from qwenft.runs.manifest import Manifest, now_iso, read_manifest, update_manifest
from qwenft.runs.progress import surface_log

# Qwen chat models stop on <|im_end|>; base models on <|endoftext|>. A fine-tuned model needs both,
# or generation after fine-tuning a base model never stops.
QWEN_STOP_TOKENS = {"<|im_end|>": 151645, "<|endoftext|>": 151643}


@dataclass
class MergePlan:
    run_dir: Path
    target: Path
    source: ModelTarget  # the run's base model + adapter
    config: dict[str, Any]
    argv: list[str]
    env: dict[str, str]


MERGE_HINT = "pass a new --export-dir"


def merge_refusal(run_dir: Path, manifest: Manifest) -> QwenftError | None:
    """Why a run has nothing to merge (None: it has): a full or freeze run's weights are already a
    complete model; a LoRA on a pre-quantized base cannot be merged into it."""
    if own_weights(manifest.method):
        return QwenftError(
            f"{run_dir} is a {manifest.method} fine-tune: its weights are already a complete model",
            f"chat with it directly: qwenft chat {run_dir}",
        )
    quantized = manifest.model.extra.get("quantization")
    if quantized:
        return QwenftError(
            f"{run_dir} trained a LoRA on a {quantization_label(quantized)}-quantized base, and "
            "LLaMA-Factory merges no adapter into a quantized model (its weights are packed "
            '4-bit/8-bit codes: "Cannot merge adapters to a quantized model")',
            f"chat, serve and eval load the base + adapter as they are (qwenft chat {run_dir}); "
            "for a merged model, train on the unquantized release",
        )
    return None


def plan_merge(run_dir: Path, export_dir: Path | None = None) -> MergePlan:
    """Check the run and the target; raise QwenftError (writing nothing) when merging cannot work."""
    run_dir = Path(run_dir).expanduser().absolute()
    manifest = read_manifest(run_dir)
    refusal = merge_refusal(run_dir, manifest)
    if refusal is not None:
        raise refusal
    source = resolve_target(str(run_dir), adapter=run_dir)  # base + adapter, never the merged one
    target = Path(export_dir).expanduser().absolute() if export_dir else run_dir / "merged"
    refuse_existing(target, MERGE_HINT)
    config = render.build_merge_config(
        model_path=source.model_path,
        adapter_dir=str(source.adapter_path),  # a PiSSA run's plain-LoRA copy (target)
        template=source.template,
        default_system=source.system,
        export_dir="<staging>",
        reward=Stage(manifest.stage).facts.reward,
    )
    argv, env = lf_launcher.build_export_command(
        lf_launcher.find_llamafactory_cli(), run_dir / "merge.yaml", source.model_kind
    )
    return MergePlan(run_dir, target, source, config, argv, env)


def fix_generation_config(model_dir: Path) -> list[str]:
    """Make generation_config.json stop on both Qwen stop tokens; return what was changed."""
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id")
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    missing = [name for name, tid in QWEN_STOP_TOKENS.items() if tid not in eos_list]
    if missing:
        gen["eos_token_id"] = eos_list + [QWEN_STOP_TOKENS[n] for n in missing]
        gen.setdefault("pad_token_id", QWEN_STOP_TOKENS["<|endoftext|>"])
        atomic_write_json(path, gen)
    return (
        [f"generation_config.json: added {', '.join(missing)} to eos_token_id"] if missing else []
    )


def ensure_chat_template(model_dir: Path, base_dir: str) -> list[str]:
    """The exported tokenizer must carry the chat template; copy the base model's if it is missing."""
    cfg_path = model_dir / "tokenizer_config.json"
    has = (model_dir / "chat_template.jinja").is_file() or (
        cfg_path.is_file() and "chat_template" in json.loads(cfg_path.read_text())
    )
    if has:
        return []
    src = Path(base_dir) / "chat_template.jinja"
    if src.is_file():
        shutil.copyfile(src, model_dir / "chat_template.jinja")
        return ["chat_template.jinja: copied from the base model (the export had none)"]
    raise JobFailed(
        "the merged tokenizer has no chat template", "export again from a base model that has one"
    )


def generation_check(model_dir: Path, system: str, prompt: str, max_new_tokens: int = 64) -> dict:
    """Greedy generation through the chat template: does it end on a stop token within the limit?"""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = inference.load_pretrained(model_dir, dtype="auto").eval()
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    stop = list(QWEN_STOP_TOKENS.values())
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop[1],
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stopped = bool(new) and new[-1] in stop
    return {
        "prompt": prompt,
        "new_tokens": len(new),
        "stopped": stopped,
        "text": tok.decode(new, skip_special_tokens=True),
    }


def verify_logits(merged_dir: Path, base_dir: str, adapter_dir: Path, prompts: list[str]) -> float:
    """Largest absolute difference between the merged model's logits and base + adapter's."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = inference.load_pretrained(merged_dir, dtype=torch.float32).eval()
    base = inference.load_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    worst = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            diff = (
                (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
            )
            worst = max(worst, diff)
    return worst


def _first_user_message(data_path: str | None) -> str:
    """A question the model was trained on (the check should see the trained behaviour)."""
    try:
        with open(data_path or "", encoding="utf-8-sig") as fh:
            for line in fh:
                for msg in json.loads(line).get("messages", []):
                    if msg.get("role") == "user" and msg.get("content"):
                        return msg["content"]
    except (OSError, ValueError, AttributeError):
        pass
    return "Hello! Who are you?"


def execute_merge(
    plan: MergePlan,
    progress: Callable[[str], None] = print,
    *,
    check: bool = True,
    verify: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Export into a staging folder, check it, rename it into place, record it in the manifest.
    The export's output goes to RUN/merge.log (and to stderr too when `verbose`). Holds the run's
    lock: a merge of a run that is still training (or being merged) is refused."""
    with RunLock(plan.run_dir, "merge"):
        return _merge_locked(plan, progress, check, verify, verbose)


def _merge_locked(
    plan: MergePlan,
    progress: Callable[[str], None],
    check: bool,
    verify: bool,
    verbose: bool,
) -> dict[str, Any]:
    plan.source.ensure_built(progress)
    m = plan.source.manifest  # the check asks what the run trained on (its copy travels with it)
    data_path = (m.dataset.train_path or m.dataset.path) if m else None
    with staged_dir(plan.target, hint=MERGE_HINT) as staging:
        config = {**plan.config, "export_dir": str(staging)}
        atomic_write_text(
            plan.run_dir / "merge.yaml", render.to_yaml(config, header="qwenft merge")
        )
        log_path = plan.run_dir / "merge.log"
        progress(
            f"merging the adapter of {plan.run_dir} into {plan.source.model_path} -> {plan.target}"
        )
        progress(f"log: {log_path}" + ("" if verbose else " (-v shows it here too)"))
        code = launcher.run(
            plan.argv, plan.env, log_path, cwd=plan.run_dir, echo=launcher.child_echo(verbose)
        )
        if code != 0:
            surface_log(log_path, progress)
            raise JobFailed(
                f"llamafactory-cli export exited with code {code}",
                f"read the log: {log_path}",
                returncode=code,
            )
        if not any(staging.glob("*.safetensors")):
            raise JobFailed("the export wrote no weights", f"read the log: {log_path}")
        reward = plan.config.get("stage") == Stage.RM.value
        if reward and not (staging / VALUE_HEAD).is_file():
            raise JobFailed(
                f"the export of a reward model has no value head ({VALUE_HEAD})",
                f"read the log: {log_path}",
            )
        fixes = fix_generation_config(staging)
        fixes += ensure_chat_template(staging, plan.source.model_path)
        for fix in fixes:
            progress(f"fixed {fix}")
        checks: dict[str, Any] = {"fixes": fixes}
        if check or verify:  # in this process: transformers' bars and warnings into merge.log
            inference.quiet(log_path)
        if reward:  # LLaMA-Factory writes an Ollama Modelfile for any export; this is no chat model
            (staging / "Modelfile").unlink(missing_ok=True)
        if check and reward:
            progress("a reward model generates no text: no stop check (qwenft score reads it)")
        elif check:
            prompt = _first_user_message(data_path)
            progress("checking the merged model stops (a greedy answer to a trained question) ...")
            gen = generation_check(staging, plan.source.system, prompt)
            checks["generation"] = gen
            progress(
                f"check: greedy answer {'ends on a stop token' if gen['stopped'] else 'did NOT stop'} "
                f"after {gen['new_tokens']} tokens"
            )
            if not gen["stopped"]:
                progress(
                    "warning: the merged model did not stop within 64 tokens; if you fine-tuned a "
                    "base model, train longer so it learns to end turns with <|im_end|>"
                )
        if verify:
            progress("verifying: merged logits against base + adapter on 3 prompts ...")
            worst = verify_logits(
                staging,
                plan.source.model_path,
                Path(str(plan.source.adapter_path)),
                [
                    _first_user_message(data_path),
                    "Write one sentence about the sea.",
                    "1+1=",
                ],
            )
            checks["verify_max_abs_logit_diff"] = worst
            progress(f"verify: largest |merged - (base + adapter)| logit difference: {worst:.2e}")
            if worst > 1e-2:
                raise JobFailed(
                    f"the merged model's logits differ from base + adapter by {worst:.3g}",
                    "the merge is not faithful; check the base model path in qwenft.json",
                )
    update_manifest(plan.run_dir, merged=str(plan.target), merged_at=now_iso(), merge_checks=checks)
    return {"merged": str(plan.target), **checks}
