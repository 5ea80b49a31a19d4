"""Run folders and their manifests (qwenft.json): the record that merge, chat and resume read."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any


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
