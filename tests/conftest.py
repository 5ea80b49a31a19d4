"""Shared fixtures: every test gets its own QWENFT_HOME and working folder; the tiny models are
built once per session and linked into each test's home."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLI = Path(__file__).parent / "helpers" / "fake_llamafactory_cli.py"


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    """The real Qwen vocabulary, fetched once into the default home (~/.cache/qwenft)."""
    from qwenft.tiny import ensure_vocab

    return ensure_vocab()


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory, vocab_file: Path) -> Path:
    home = tmp_path_factory.mktemp("qwenft-home")
    (home / "vocab").mkdir()
    (home / "vocab" / "qwen.tiktoken").symlink_to(vocab_file)
    (home / "models").mkdir()
    return home


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private QWENFT_HOME and cwd for every test; no tracebacks swallowed by QWENFT_DEBUG."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QWENFT_HOME", str(home))
    monkeypatch.delenv("QWENFT_DEBUG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.fixture
def tiny_home(shared_home: Path, isolated: Path) -> Path:
    """This test's home, with the session's vocab and tiny models linked in (built on first use)."""
    for name in ("vocab", "models"):
        link = isolated / name
        if not link.exists():
            link.symlink_to(shared_home / name)
    return isolated


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recording llamafactory-cli first on PATH; returns the JSON-lines record file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "llamafactory-cli"
    shim.write_text(f"#!{sys.executable}\n" + FAKE_CLI.read_text())
    shim.chmod(0o755)
    record = tmp_path / "lf-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LF_RECORD", str(record))
    return record


def env_without_fake() -> dict[str, str]:
    """The environment for a real end-to-end child: without the stand-in CLI's record file."""
    return {k: v for k, v in os.environ.items() if k not in ("FAKE_LF_RECORD", "QWENFT_API_KEY")}


QWEN2_05B_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


def write_model_folder(folder: Path, config: dict | None = None) -> Path:
    """A folder that looks like a checkpoint: config.json only (nothing here loads weights)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or QWEN2_05B_CONFIG))
    return folder


def read_calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("Name three primary colors.", "Red, blue and yellow."),
    ("What is 12 times 12?", "12 times 12 is 144."),
]


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]
    return write_jsonl(tmp_path / "chat.jsonl", rows)
