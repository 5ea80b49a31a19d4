"""Run folders and their manifests (qwenft.json): the record that merge, chat and resume read."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from qwenft import __version__
from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, share_like_umask

MANIFEST = "qwenft.json"
STATUSES = ("running", "completed", "failed", "interrupted")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def default_run_dir(model_spec: str, method: str, root: Path | None = None) -> Path:
    """runs/<model>-<method>-<timestamp>/ under the current folder (or root)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_spec.rstrip("/")).name).strip("-").lower()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (root or Path("runs")) / f"{slug or 'model'}-{method}-{stamp}"


def check_new_run_dir(path: Path) -> None:
    """Refuse to reuse a folder: a run folder is never silently overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise QwenftError(
            f"{path} already exists and is not empty",
            "choose a new --output-dir (or omit it for a fresh runs/<model>-<method>-<time> folder)",
        )


def create_run_dir(
    path: Path, files: dict[str, str], prepare: Callable[[Path], None] | None = None
) -> Path:
    """Create the run folder with its first files all at once: stage beside it, then rename.
    `prepare(stage)` may add more files to the staged folder before the rename."""
    check_new_run_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, text in files.items():
            (stage / name).write_text(text, encoding="utf-8")
        if prepare:
            prepare(stage)
        share_like_umask(stage)
        if path.exists():  # an empty folder the user made for us
            path.rmdir()
        os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return path.resolve()


def package_versions() -> dict[str, str | None]:
    """Versions of the training stack, read from package metadata (no imports)."""
    out: dict[str, str | None] = {}
    for name in ("llamafactory", "transformers", "torch", "peft", "deepspeed", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_manifest(**fields: Any) -> dict[str, Any]:
    return {"qwenft_version": __version__, "created": now_iso(), "status": "running", **fields}


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of a run folder, or QwenftError naming what is wrong."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise QwenftError(
            f"{run_dir} is not a qwenft run folder (no {MANIFEST})",
            "pass a folder made by `qwenft train`; `qwenft runs` lists them",
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise QwenftError(f"cannot read {path}: {exc}") from exc


def update_manifest(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Read, change and atomically rewrite the manifest."""
    manifest = read_manifest(run_dir)
    manifest.update(changes)
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)
    return manifest


def read_trainer_log(run_dir: Path) -> list[dict[str, Any]]:
    """LLaMA-Factory's trainer_log.jsonl (one JSON object per logging step); [] if absent."""
    path = Path(run_dir) / "trainer_log.jsonl"
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Steps, losses and throughput from the files LLaMA-Factory wrote into the run folder."""
    run_dir = Path(run_dir)
    losses = [
        r["loss"] for r in read_trainer_log(run_dir) if isinstance(r.get("loss"), int | float)
    ]
    results: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        results = json.loads((run_dir / "all_results.json").read_text())
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        state = json.loads((run_dir / "trainer_state.json").read_text())
    finite = [x for x in losses if math.isfinite(x)]
    return {
        "global_step": state.get("global_step"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(finite) if finite else None,
        "train_loss": results.get("train_loss"),
        "tokens_per_second": results.get("effective_tokens_per_sec"),
        "train_runtime_s": results.get("train_runtime"),
        "loss_plot": str(run_dir / "training_loss.png")
        if (run_dir / "training_loss.png").is_file()
        else None,
    }


class LossWatch:
    """Polled while training: a reason to stop when the loss is NaN/inf or exactly 0 for
    `patience` consecutive logging steps (typical causes: fp16 on Qwen, a too-high learning rate)."""

    def __init__(self, run_dir: Path, patience: int = 3) -> None:
        self.run_dir, self.patience = Path(run_dir), patience

    def __call__(self) -> str | None:
        losses = [r.get("loss") for r in read_trainer_log(self.run_dir) if "loss" in r]
        tail = losses[-self.patience :]
        if len(tail) < self.patience:
            return None
        if all(not isinstance(x, int | float) or not math.isfinite(x) for x in tail):
            return (
                f"the loss was NaN/inf for {self.patience} logging steps in a row; typical causes: "
                "fp16 with Qwen (use bf16 or fp32), a too-high learning rate"
            )
        if all(x == 0 for x in tail):
            return (
                f"the loss was exactly 0 for {self.patience} logging steps in a row: nothing is "
                "being learned (typical causes: fp16 overflow with Qwen, labels all masked)"
            )
        return None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run folder directly under root (newest first), with its manifest's headline fields."""
    rows = []
    if root.is_dir():
        for manifest_path in root.glob(f"*/{MANIFEST}"):
            try:
                m = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            rows.append(
                {
                    "run_dir": str(manifest_path.parent),
                    "status": m.get("status"),
                    "method": m.get("method"),
                    "model": (m.get("model") or {}).get("spec"),
                    "final_loss": m.get("final_loss"),
                    "created": m.get("created"),
                }
            )
    return sorted(rows, key=lambda r: r["created"] or "", reverse=True)
