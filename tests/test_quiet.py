"""Quiet terminals (issue 23, part 4): what transformers, DeepSpeed and bitsandbytes print while a
model loads in qwenft's own process stays off the terminal (in the command's log where it has one),
and the end-of-training line says which time is which. `serve`'s quiet terminal is tested with the
served run in tests/test_serve_eval.py (test_serve_openai_client_end_to_end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.builders import QA
from tests.helpers.e2e import Qwenft, copy_run

# what leaked before: transformers' weight-loading bar (any tqdm bar: "%|"), its advisory
# warnings, DeepSpeed's accelerator notice, bitsandbytes' kernel notice
NOISE = (
    "Loading weights",
    "%|",
    "it/s]",
    "Setting accelerator",
    "The attention mask is not set",
    "[transformers]",
    "gemm_4bit_forward",
    "Warning:",
)


def assert_quiet(output: str, what: str) -> None:
    found = [n for n in NOISE if n in output]
    assert not found, f"{what} printed {found}:\n{output[-3000:]}"


def test_merge_and_chat_print_only_qwenft_lines(
    lora_run: Path, qwenft: Qwenft, tmp_path: Path
) -> None:
    run = copy_run(lora_run, tmp_path / "lora")
    merged = qwenft("merge", run, "--verify")  # the check and the verify load models in-process
    assert_quiet(merged.stdout + merged.stderr, "merge")
    assert "check: greedy answer" in merged.stderr and "verify: largest" in merged.stderr
    log = (run / "merge.log").read_text()
    assert "Model config" in log  # LLaMA-Factory's export keeps its output in its log
    for args in ([run], ["tiny-qwen2", "--adapter", lora_run]):  # merged; base + adapter (peft)
        chat = qwenft("chat", *args, "--prompt", QA[0][0], "--max-new-tokens", 12)
        assert_quiet(chat.stdout + chat.stderr, f"chat {args}")
        assert chat.stdout.strip(), chat.stderr


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
