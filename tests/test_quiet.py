"""Quiet terminals (issue 23, part 4): what transformers, DeepSpeed and bitsandbytes print while a
model loads in qwenft's own process stays off the terminal (in the command's log where it has one),
and the end-of-training line says which time is which. `serve`'s quiet terminal is tested with the
served run in tests/test_serve_eval.py (test_serve_openai_client_end_to_end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.e2e import assert_quiet


def test_merge_prints_only_qwenft_lines(merged_lora: Path) -> None:
    """The session's merge of lora_run (`merge --verify`, conftest.merged_lora): its check and
    verify load models in-process, and the terminal shows qwenft's lines only. `chat`'s quiet
    terminal is asserted where the merged run and its base + adapter chat
    (test_e2e.py::test_trained_lora_merges_then_chats)."""
    out = (merged_lora.parent / "merge.stdout").read_text()
    err = (merged_lora.parent / "merge.stderr").read_text()
    assert_quiet(out + err, "merge")
    assert "check: greedy answer" in err and "verify: largest" in err
    log = (merged_lora / "merge.log").read_text()
    assert "Model config" in log  # LLaMA-Factory's export keeps its output in its log


@pytest.mark.parametrize(
    ("summary", "line"),
    [
        (
            {"processes": 1, "train_runtime_s": 50.2, "wall_s": 74.0},
            "done: 120 steps, training 50 s (74 s wall time with start-up) |",
        ),
        ({"processes": 2, "wall_s": 74.0}, "done: 120 steps, 74 s wall time |"),
    ],
)
def test_training_summary_names_its_times_and_counts_processes(
    summary: dict, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from qwenft.cli import _report_training

    result = {
        "global_step": 120,
        "first_loss": 19.0,
        "final_loss": 0.02,
        "best_loss": 0.02,
        "tokens_per_second": 100.0,
        "peak_mem_gib": 1.11,
        "log": "r/train.log",
        "method": "lora",
        "mergeable": True,
        "run_dir": "r",
        **summary,
    }
    _report_training(result)
    err = capsys.readouterr().err
    assert line in err
    n = summary["processes"]
    assert f"peak memory 1.11 GiB ({n} process{'es' if n > 1 else ''})" in err
