"""Splitting a checked data file into train/val files, and copying it without some rows."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from qwenft.data.check import require_valid
from qwenft.data.images import rebase
from qwenft.data.reader import BAD, Collector, dump_row, iter_rows, open_data_file
from qwenft.errors import QwenftError
from qwenft.fsutil import AtomicOutput, check_out_path


def split_file(
    path: Path,
    val_ratio: float = 0.1,
    seed: int = 42,
    out_dir: Path | None = None,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write <stem>.train.jsonl and <stem>.val.jsonl: a seeded random val_ratio of the rows for
    validation, both in file order. Any data kind; a .txt file's lines (one document each, as
    LLaMA-Factory reads them) become {"text"} rows. Written in another folder, relative image
    paths become absolute (images.rebase)."""
    if not (isinstance(val_ratio, (int, float)) and 0 < val_ratio < 1):
        raise QwenftError(
            f"--val-ratio must be between 0 and 1 (exclusive), got {val_ratio}",
            "e.g. --val-ratio 0.1",
        )
    report = require_valid(path, "not splitting it", kind=None)
    src = report.path
    n = report.n_samples
    if n < 2:
        raise QwenftError(f"{src} has {n} sample; a split needs at least 2", "add samples")
    n_val = min(max(round(n * val_ratio), 1), n - 1)
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    folder = Path(out_dir).expanduser() if out_dir is not None else src.parent
    if folder.exists() and not folder.is_dir():
        raise QwenftError(f"{folder} is a file", "pass a folder to --out-dir")
    stem = src.name[: -len(src.suffix)]
    train_path, val_path = folder / f"{stem}.train.jsonl", folder / f"{stem}.val.jsonl"
    for p in (train_path, val_path):
        check_out_path(p, force, src)
    folder.mkdir(parents=True, exist_ok=True)
    outs: list[AtomicOutput] = []
    try:
        outs = [AtomicOutput(train_path), AtomicOutput(val_path)]
        train_fh, val_fh = outs[0].fh, outs[1].fh
        _, fh, mode = open_data_file(src)
        with fh:
            for i, (_line, value, raw) in enumerate(iter_rows(fh, mode, Collector())):
                (val_fh if i in val_idx else train_fh).write(_moved(value, raw, src, folder))
        for o in outs:
            o.commit()
    except BaseException:
        for o in outs:
            o.discard()
        raise
    return train_path, val_path


def write_without_lines(
    src: Path, out: Path, drop: Iterable[int], *, force: bool = False
) -> tuple[int, int]:
    """Copy src to out (JSON lines, atomically) without the rows starting on the given lines.

    Lines are those check_file and token_stats report. Returns (rows written, rows dropped).
    In another folder, relative image paths become absolute (images.rebase).
    """
    drop = set(drop)
    src_path, fh, mode = open_data_file(src)
    out_path = check_out_path(out, force, src_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = AtomicOutput(out_path)
    kept = dropped = 0
    try:
        with fh:
            for line, value, raw in iter_rows(fh, mode, Collector()):
                if line in drop:
                    dropped += 1
                elif value is not BAD:
                    tmp.fh.write(_moved(value, raw, src_path, out_path.parent))
                    kept += 1
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    return kept, dropped


def _moved(value: object, raw: bytes, src: Path, folder: Path) -> bytes:
    """A row's line as a file in folder holds it (its image paths rebased when it has images)."""
    if b'"images"' in raw:
        moved = rebase(value, src.parent, folder)
        if moved is not value:
            return dump_row(moved) + b"\n"
    return raw + b"\n"
