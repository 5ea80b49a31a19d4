"""`qwenft merge`: fold a LoRA/QLoRA adapter into its unquantized base with `llamafactory-cli export`.

The export goes to a hidden folder beside the target and is renamed into place only when it is
complete and checked, so a merged model is whole or absent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft import launcher, render, runs
from qwenft.errors import JobFailed, QwenftError
from qwenft.fsutil import atomic_write_json, atomic_write_text

# Qwen chat models stop on <|im_end|>; base models on <|endoftext|>. A fine-tuned model needs both,
# or generation after fine-tuning a base model never stops.
QWEN_STOP_TOKENS = {"<|im_end|>": 151645, "<|endoftext|>": 151643}


@dataclass
class MergePlan:
    run_dir: Path
    target: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    argv: list[str]
    env: dict[str, str]


def plan_merge(run_dir: Path, export_dir: Path | None = None) -> MergePlan:
    """Check the run and the target; raise QwenftError (writing nothing) when merging cannot work."""
    run_dir = Path(run_dir).expanduser().absolute()
    manifest = runs.read_manifest(run_dir)
    method = manifest.get("method")
    if method == "full":
        raise QwenftError(
            f"{run_dir} is a full fine-tune: its weights are already a complete model",
            f"chat with it directly: qwenft chat {run_dir}",
        )
    if not (run_dir / "adapter_config.json").is_file():
        raise QwenftError(
            f"{run_dir} has no adapter (status: {manifest.get('status')})",
            "merge a run whose training completed; `qwenft runs` shows statuses",
        )
    target = Path(export_dir).expanduser().absolute() if export_dir else run_dir / "merged"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise QwenftError(f"{target} already exists and is not empty", "pass a new --export-dir")
    model = manifest["model"]
    config = render.build_merge_config(
        model_path=model["path"], adapter_dir=str(run_dir), template=manifest["template"],
        default_system=manifest.get("default_system", ""), export_dir="<staging>",
    )
    argv, env = launcher.build_export_command(
        launcher.find_llamafactory_cli(), run_dir / "merge.yaml", model["kind"]
    )
    return MergePlan(run_dir, target, manifest, config, argv, env)


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
    return [f"generation_config.json: added {', '.join(missing)} to eos_token_id"] if missing else []


def execute_merge(plan: MergePlan, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Export into a staging folder, check it, rename it into place, record it in the manifest."""
    plan.target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.target.name}.", dir=plan.target.parent))
    try:
        config = {**plan.config, "export_dir": str(staging)}
        atomic_write_text(plan.run_dir / "merge.yaml", render.to_yaml(config, header="qwenft merge"))
        progress(f"merging {plan.run_dir} -> {plan.target}")
        log_path = plan.run_dir / "merge.log"
        code = launcher.run(plan.argv, plan.env, log_path, cwd=plan.run_dir)
        if code != 0:
            raise JobFailed(
                f"llamafactory-cli export exited with code {code}", f"read the log: {log_path}",
                returncode=code,
            )
        if not any(staging.glob("*.safetensors")):
            raise JobFailed("the export wrote no weights", f"read the log: {log_path}")
        fixes = fix_generation_config(staging)
        for fix in fixes:
            progress(f"fixed {fix}")
        if plan.target.exists():
            plan.target.rmdir()  # empty (checked in plan_merge)
        staging.rename(plan.target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    runs.update_manifest(plan.run_dir, merged=str(plan.target), merged_at=runs.now_iso())
    return {"merged": str(plan.target), "fixes": fixes}
