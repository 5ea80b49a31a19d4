"""LLaMA-Factory's dataset_info.json: dataset names, entries and registering files in it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from qwenft.choices import DataKind
from qwenft.data.check import (
    ASSISTANT,
    FUNCTION_CALL,
    SYSTEM,
    TOOL,
    USER,
    file_has_images,
    file_has_tools,
)
from qwenft.data.images import IMAGES
from qwenft.data.kinds import detect_file_kind
from qwenft.data.reader import SUFFIXES, TEXT_SUFFIXES, jtype
from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, file_lock
from qwenft.paths import default_dataset_dir

# The LLaMA-Factory dataset_info.json entry for this shape (tags as LLaMA-Factory 0.9.5 names them).
DATASET_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": USER,
    "assistant_tag": ASSISTANT,
    "system_tag": SYSTEM,
    "observation_tag": TOOL,
    "function_tag": FUNCTION_CALL,
}
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def dataset_name_for(path: Path, sha256: str) -> str:
    """A stable default dataset name: <stem>-<sha256[:8]>, limited to letters, digits and _.-"""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).stem).strip("-.")[:64] or "data"
    return f"{stem}-{sha256[:8]}"


def auto_dataset_name(path: Path, sha256: str, dataset_dir: Path | None = None) -> str:
    """The name qwenft picks itself for a file: dataset_name_for(), unless dataset_info.json already
    holds that name for another path (a copy of the file elsewhere, a second clone of a project);
    then the same name with a digest of this path added. Deterministic for a path and its content,
    so a resumed run finds its own entry; a name qwenft chose is never the user's problem."""
    base = dataset_name_for(path, sha256)
    path = Path(path).expanduser().absolute()
    info_path = (
        Path(dataset_dir or default_dataset_dir()).expanduser().absolute() / "dataset_info.json"
    )
    old = _read_dataset_info(info_path).get(base)
    if old is None or _entry_path(old, info_path.parent) == os.path.normpath(str(path)):
        return base
    return f"{base}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _entry_path(entry: object, dataset_dir: Path) -> str | None:
    """The normalized absolute file an entry of dataset_info.json points at, if any."""
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    if not isinstance(file_name, str):
        return None
    return os.path.normpath(os.path.join(dataset_dir, file_name))


def dataset_entry(
    path: Path, *, kind: str = "sft", has_tools: bool = False, has_images: bool = False
) -> dict:
    """The LLaMA-Factory 0.9.5 dataset_info.json entry for a file of one data kind at path.

    sft: sharegpt formatting, role/content tags, the messages column (and, with images, the
    images column: LLaMA-Factory's mllm_demo entry; their paths are resolved against train.yaml's
    media_dir, which must be the file's folder: qwenft.data.images.media_dir); preference: the
    same with ``ranking: true`` and the chosen/rejected columns (LLaMA-Factory reads each side's
    role and content with the same tags); kto: the label column as ``kto_tag``; pt: the text
    column as the prompt (LLaMA-Factory's c4_demo entry)."""
    kind = DataKind.parse(kind, "data kind")
    file_name = str(Path(path).expanduser().absolute())
    if kind == DataKind.PT:
        return {"file_name": file_name, "columns": {"prompt": "text"}}
    columns = {"messages": "messages"}
    if kind == DataKind.PREFERENCE:
        columns.update(chosen="chosen", rejected="rejected")
    elif kind == DataKind.KTO:
        columns["kto_tag"] = "label"
    if has_tools:  # only then: LLaMA-Factory fails (KeyError) on a mapped column no row has
        columns["tools"] = "tools"
    if has_images and kind == DataKind.SFT:  # other kinds with images are refused by the check
        columns[IMAGES] = IMAGES
    entry: dict = {"file_name": file_name, "formatting": "sharegpt"}
    if kind == DataKind.PREFERENCE:
        entry["ranking"] = True
    entry.update(columns=columns, tags=dict(DATASET_TAGS))
    return entry


def _read_dataset_info(info_path: Path) -> dict:
    try:
        text = info_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise QwenftError(f"cannot read {info_path}: {exc}") from None
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise QwenftError(
            f"{info_path} is not valid JSON ({exc}); it was left as it is",
            "fix or move that file, then register again",
        ) from None
    if not isinstance(info, dict):
        raise QwenftError(
            f"{info_path} must hold a JSON object of dataset entries, not a {jtype(info)}",
            "fix or move that file, then register again",
        )
    return info


def check_dataset_name(name: str) -> str:
    """name, if it is a valid dataset name; QwenftError otherwise."""
    if (
        not isinstance(name, str)
        or not _NAME_RE.fullmatch(name)
        or name in (".", "..")
        or len(name) > 200
    ):
        raise QwenftError(
            f"invalid dataset name {name!r}",
            "use letters, digits, '_', '-' and '.' only (no spaces or commas), e.g. my-chat-v1",
        )
    return name


def register_dataset(
    path: Path,
    name: str,
    dataset_dir: Path | None = None,
    *,
    force: bool = False,
    has_tools: bool | None = None,
    kind: str | None = None,
    has_images: bool | None = None,
) -> dict:
    """Add or update entry `name` in dataset_dir/dataset_info.json (atomic, under a file lock).

    Same name and same file: updated in place (idempotent). Same name, another file: QwenftError
    unless force. Other entries are kept as they are. has_tools None: scan the file for a tools key;
    has_images None: for rows with images (the entry then maps the images column; LLaMA-Factory
    finds them with train.yaml's media_dir set to the file's folder, images.media_dir).
    kind None: the file's data kind, from its first rows (qwenft.data.kinds.detect_file_kind).
    A .txt file is refused: entries describe JSON lines (register a jsonl copy,
    qwenft.data.convert.materialize_pt_jsonl or `qwenft data convert`, which reads it as
    LLaMA-Factory does, one document per line).
    """
    check_dataset_name(name)
    path = Path(path).expanduser().absolute()
    if path.suffix.lower() in TEXT_SUFFIXES:
        raise QwenftError(
            f"{path}: qwenft registers JSON lines, not .txt files (convert it first: the "
            "conversion reads it line by line, one document each, as LLaMA-Factory does); it "
            "was not registered",
            f"convert it to JSON lines first: qwenft data convert {path} -o "
            f"{path.with_suffix('.jsonl')}, then register that file",
        )
    if path.suffix.lower() not in SUFFIXES:
        raise QwenftError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}",
            "register a .jsonl (or .json array) file in the messages format",
        )
    if not path.is_file():
        raise QwenftError(f"data file not found: {path}", "check the path")
    dataset_dir = Path(
        dataset_dir if dataset_dir is not None else default_dataset_dir()
    ).expanduser()
    dataset_dir = dataset_dir.absolute()
    if dataset_dir.exists() and not dataset_dir.is_dir():
        raise QwenftError(
            f"dataset folder {dataset_dir} is a file", "pass a folder to --dataset-dir"
        )
    if kind is None:
        kind = detect_file_kind(path) or DataKind.SFT.value
    if has_tools is None:
        has_tools = kind != DataKind.PT and file_has_tools(path)
    if has_images is None:
        has_images = kind == DataKind.SFT and file_has_images(path)
    entry = dataset_entry(path, kind=kind, has_tools=has_tools, has_images=has_images)
    info_path = dataset_dir / "dataset_info.json"
    if info_path.exists():
        _read_dataset_info(info_path)  # fail early, before creating anything
    with file_lock(dataset_dir / ".dataset_info.lock"):
        info = _read_dataset_info(info_path)
        old = info.get(name)
        if old == entry:
            return entry
        if old is not None and not force:
            old_path = _entry_path(old, dataset_dir)
            if old_path != os.path.normpath(str(path)):
                raise QwenftError(
                    f"dataset {name!r} is already registered in {info_path} for "
                    f"{old_path or 'another source'}",
                    "pick another --name, or pass --force to point it at this file",
                )
        info[name] = entry
        atomic_write_json(info_path, info)
    return entry
