"""`qwenft chat` refusals through typer's CliRunner (the chats themselves are end to end:
test_e2e.py, test_serve_eval.py, test_agents.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


def test_chat_refusals(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert invoke("train", "--model", local_model, "--data", chat_file, "-o", "r").exit_code == 0
    wrong = invoke("chat", "r", "--template", "qwen3", "--prompt", "hi")
    assert wrong.exit_code == 2 and "trained with template 'qwen'" in wrong.output
    if importlib.util.find_spec("vllm") is None:
        vllm = invoke("chat", "r", "--backend", "vllm", "--prompt", "hi")
        assert vllm.exit_code == 2 and "pip install vllm" in vllm.output
    missing = invoke("chat", "./nowhere/model", "--prompt", "hi")
    assert missing.exit_code == 2 and "model folder not found" in missing.output
    not_adapter = invoke("chat", local_model, "--adapter", local_model, "--prompt", "hi")
    assert not_adapter.exit_code == 2 and "not a LoRA adapter" in not_adapter.output
