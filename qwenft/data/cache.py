"""The tokenized-dataset cache: LLaMA-Factory's `tokenized_path`, keyed by everything that decides
the tokens, so a repeat run on the same data skips preprocessing and any change tokenizes afresh.
qwenft writes the folder itself before launching where it reproduces LLaMA-Factory's preprocessing
(qwenft.data.prepare); otherwise LLaMA-Factory tokenizes and saves it during the run.

LLaMA-Factory loads a non-empty `tokenized_path` as is ("Loading dataset from disk will ignore
other data arguments"), so the key must cover every data argument, and a folder whose save was
cut short must never be read: qwenft marks a folder complete only after LLaMA-Factory reports the
save, and removes an unmarked one before launching.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from qwenft.data import tokens
from qwenft.paths import qwenft_home

# Data arguments that change what LLaMA-Factory's preprocessing produces.
KEY_FIELDS = (
    "stage",
    "template",
    "default_system",
    "enable_thinking",
    "cutoff_len",
    "val_size",
    "seed",
    "packing",
    "neat_packing",
    "max_samples",
    "train_on_prompt",
    "mask_history",
    "tool_format",
    "preserve_thinking",
    "preprocessing_num_workers",  # KTO's KL pairs and pt's blocks follow the map batches
    "preprocessing_batch_size",
)
MARKER = ".qwenft-complete"
SAVED_LINE = "Tokenized dataset is saved at"


def tokenizer_fingerprint(model_kind: str, model_path: str) -> str:
    """What identifies the tokenizer: its files' hashes for a local folder, else the name."""
    if model_kind == "tiny":
        from qwenft.models.tiny import BUILD_VERSION, QWEN_TIKTOKEN_SHA256

        return f"tiny:{Path(model_path).name}:v{BUILD_VERSION}:{QWEN_TIKTOKEN_SHA256[:16]}"
    folder = Path(model_path)
    if model_kind == "local" and folder.is_dir():
        h = hashlib.sha256()
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "chat_template.jinja",
        ):
            if (folder / name).is_file():
                h.update(name.encode() + b"\0" + (folder / name).read_bytes())
        return f"local:{h.hexdigest()[:16]}"
    return f"hub:{model_path}"


def tokenized_dir(config: dict[str, Any], data_sha256: str, model_kind: str) -> Path:
    """QWENFT_HOME/tokenized/<key>: the key hashes the data, the tokenizer and the data arguments."""
    key = {k: config.get(k) for k in KEY_FIELDS}
    key["data_sha256"] = data_sha256
    key["llamafactory"] = (
        tokens.llamafactory_version()
    )  # its preprocessing may change between versions
    key["tokenizer"] = tokenizer_fingerprint(model_kind, config["model_name_or_path"])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return qwenft_home() / "tokenized" / digest


def is_ready(path: Path) -> bool:
    return (path / MARKER).is_file()


def discard_partial(path: Path) -> None:
    """Remove a cache folder whose save never completed, so LLaMA-Factory re-tokenizes."""
    if path.exists() and not is_ready(path):
        shutil.rmtree(path, ignore_errors=True)


def mark_if_saved(path: Path, log_text: str) -> bool:
    """After a run: mark the folder complete when LLaMA-Factory said it saved it."""
    if SAVED_LINE in log_text and path.is_dir() and not is_ready(path):
        (path / MARKER).write_text("")
        return True
    return is_ready(path)


def forget(path: Path) -> None:
    """Remove a cache folder and its measured-lengths sidecar (a run refused after writing them)."""
    shutil.rmtree(path, ignore_errors=True)
    Path(f"{path}.overlength.json").unlink(missing_ok=True)
