"""Run folders: naming a new one, creating it whole (staged, then renamed), listing them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.fsutil import refuse_existing, staged_dir
from qwenft.runs.manifest import MANIFEST, read_manifest


def default_run_dir(model_spec: str, method: str, root: Path | None = None) -> Path:
    """runs/<model>-<method>-<timestamp>/ under the current folder (or root)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_spec.rstrip("/")).name).strip("-").lower()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (root or Path("runs")) / f"{slug or 'model'}-{method}-{stamp}"


NEW_RUN_HINT = (
    "choose a new --output-dir (or omit it for a fresh runs/<model>-<method>-<time> folder)"
)


def check_new_run_dir(path: Path) -> None:
    """Refuse to reuse a folder: a run folder is never silently overwritten."""
    refuse_existing(path, NEW_RUN_HINT)


def create_run_dir(
    path: Path, files: dict[str, str], prepare: Callable[[Path], None] | None = None
) -> Path:
    """Create the run folder with its first files all at once (staged, then renamed).
    `prepare(stage)` may add more files to the staged folder before the rename."""
    with staged_dir(path, hint=NEW_RUN_HINT) as stage:
        for name, text in files.items():
            (stage / name).write_text(text, encoding="utf-8")
        if prepare:
            prepare(stage)
    return path.resolve()


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run folder directly under root (newest first), with its manifest's headline fields;
    folders whose manifest cannot be read are left out."""
    rows = []
    if root.is_dir():
        for manifest_path in root.glob(f"*/{MANIFEST}"):
            try:
                m = read_manifest(manifest_path.parent)
            except QwenftError:
                continue
            rows.append(
                {
                    "run_dir": str(manifest_path.parent),
                    "status": m.status,
                    "method": m.method,
                    "model": m.model.spec,
                    "final_loss": m.final_loss,
                    "created": m.created,
                }
            )
    return sorted(rows, key=lambda r: r["created"] or "", reverse=True)
