"""Where qwenft keeps its own state: QWENFT_HOME (default ~/.cache/qwenft)."""

from __future__ import annotations

import os
from pathlib import Path


def qwenft_home() -> Path:
    """The cache folder for the tiny models, the Qwen vocabulary and the dataset registry."""
    return Path(os.environ.get("QWENFT_HOME") or Path.home() / ".cache" / "qwenft").expanduser()


def default_dataset_dir() -> Path:
    """The qwenft-managed folder holding dataset_info.json (never LLaMA-Factory's own data/)."""
    return qwenft_home() / "datasets"
