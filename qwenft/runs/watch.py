"""What LLaMA-Factory's Trainer left in a run folder, read back: trainer_log.jsonl, the log history
(trainer_state.json or the newest checkpoint's), the figures each stage shows, and the summary of
a finished run (the manifest, qwenft.json, is qwenft.runs.manifest's)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from qwenft.choices import Stage


def read_trainer_log(run_dir: Path) -> list[dict[str, Any]]:
    """LLaMA-Factory's trainer_log.jsonl (one JSON object per logging step); [] if absent."""
    path = Path(run_dir) / "trainer_log.jsonl"
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def log_history(run_dir: Path) -> list[dict[str, Any]]:
    """The Trainer's log_history: trainer_state.json in the run folder (written at the end), else
    the newest checkpoint's (a run that stopped early); [] if neither can be read."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "trainer_state.json"]
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    candidates += [c / "trainer_state.json" for c in checkpoints]
    for path in candidates:
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            history = json.loads(path.read_text()).get("log_history")
            if isinstance(history, list):
                return [r for r in history if isinstance(r, dict)]
    return []


def stage_figures(run_dir: Path, stage: str) -> dict[str, list[float]]:
    """The stage's own training figures, first and last logged value each ({} for sft and pt)."""
    keys = Stage(stage).facts.figures
    if not keys:
        return {}
    rows = [r for r in log_history(run_dir) if "loss" in r]
    out: dict[str, list[float]] = {}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if values:
            out[key] = [values[0], values[-1]]
    return out


def training_summary(run_dir: Path, stage: str = "sft") -> dict[str, Any]:
    """Steps, losses and throughput from the files LLaMA-Factory wrote into the run folder, and
    the stage's own figures (`stage_figures`: e.g. DPO's reward accuracy and margin)."""
    run_dir = Path(run_dir)
    log = read_trainer_log(run_dir)
    losses = [r["loss"] for r in log if isinstance(r.get("loss"), int | float)]
    evals = [r["eval_loss"] for r in log if isinstance(r.get("eval_loss"), int | float)]
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
        # on the held-out split or --eval-data: the first evaluation's, and the last (the final)
        "first_eval_loss": evals[0] if evals else None,
        "eval_loss": results.get("eval_loss", evals[-1] if evals else None),
        "tokens_per_second": results.get("effective_tokens_per_sec"),
        "train_runtime_s": results.get("train_runtime"),
        "loss_plot": str(run_dir / "training_loss.png")
        if (run_dir / "training_loss.png").is_file()
        else None,
        "stage_figures": stage_figures(run_dir, stage),
    }


# Stages whose loss can reach 0 when training works: the preference losses fall towards 0 as the
# pairs separate (DPO's hinge loss is exactly 0 past the margin), so a zero loss is no alarm there.


class LossWatch:
    """Polled while training: a reason to stop when the loss is NaN/inf or exactly 0 for
    `patience` consecutive logging steps (typical causes: fp16 on Qwen, a too-high learning rate).
    A zero loss stops only runs whose stage cannot reach it legitimately (the stage table's
    zero_loss_ok: sft and pt)."""

    def __init__(self, run_dir: Path, patience: int = 3, stage: str = "sft") -> None:
        self.run_dir, self.patience = Path(run_dir), patience
        self.zero_ok = Stage(stage).facts.zero_loss_ok

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
        if not self.zero_ok and all(x == 0 for x in tail):
            return (
                f"the loss was exactly 0 for {self.patience} logging steps in a row: nothing is "
                "being learned (typical causes: fp16 overflow with Qwen, labels all masked)"
            )
        return None
