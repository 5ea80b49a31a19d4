"""Checking data files against the shapes qwenft trains on, with every problem's line.

check_file reads the file and names its kind (qwenft.choices.DataKind: sft, preference, kto, pt);
the kinds and their own rules live in qwenft.data.kinds, the messages rules the chat kinds share
(the Checker, the roles, the chat shape) in qwenft.data.messages. This module holds the file's
check and report.
"""

from __future__ import annotations

import contextlib
import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from qwenft.data.images import IMAGES, ImageStats, ImageTokens
from qwenft.data.kinds import RowRules
from qwenft.data.messages import (  # noqa: F401  (the roles, re-exported for the data modules)
    ASSISTANT,
    FUNCTION_CALL,
    ROLES,
    SYSTEM,
    TOOL,
    USER,
    WEIGHT_ZERO_WHY,
)
from qwenft.data.reader import (
    BAD,
    BOM,
    DECODER,
    Collector,
    Problem,
    iter_rows,
    open_data_file,
)
from qwenft.errors import QwenftError

# --------------------------------------------------------------------------------------------------
# results


@dataclass
class CheckReport:
    """What check_file found. ``problems`` keeps the first MAX_KEPT_PER_KIND of each kind;
    ``counts``, ``n_errors`` and ``n_warnings`` count all of them."""

    path: Path
    n_samples: int  # rows read (valid or not); a .txt's lines, blank ones too (LF reads them all)
    n_valid: int  # rows without errors
    problems: list[Problem]
    counts: dict[str, int] = field(default_factory=dict)  # kind -> number found
    n_errors: int = 0
    n_warnings: int = 0
    format: str = "jsonl"  # "jsonl" | "json" (a JSON array) | "txt" (text, one document per line)
    has_tools: bool = False  # some row has a "tools" key (the dataset entry then maps that column)
    kind: str = "sft"  # a qwenft.choices.DataKind value: what the rows hold
    # the images of the valid rows (None: no row has images); n_image_rows counts every row with a
    # non-empty images list, valid or not (the dataset entry then maps the images column)
    images: ImageStats | None = None
    n_image_rows: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    @property
    def has_images(self) -> bool:
        """Some row has images: sft data for a vision-language model, whose image rows
        LLaMA-Factory tokenizes itself (qwenft.data.pipeline.data_not_reproduced)."""
        return self.n_image_rows > 0

    def add(self, problems: list[Problem]) -> None:
        """Add problems found later in valid rows (pipeline.measure_images' image_cut errors)."""
        self.n_valid -= len({p.line for p in problems if p.severity == "error"})
        for p in problems:
            self.counts[p.kind] = self.counts.get(p.kind, 0) + 1
            self.problems.append(p)
            if p.severity == "error":
                self.n_errors += 1
            else:
                self.n_warnings += 1

    @property
    def reading(self) -> str | None:
        """How the rows came out of the file: for a .txt, "lines" (LLaMA-Factory's reading, one
        document per line); None for JSON data."""
        return "lines" if self.format == "txt" else None

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "reading": self.reading,
            "kind": self.kind,
            "ok": self.ok,
            "n_samples": self.n_samples,
            "n_valid": self.n_valid,
            "n_errors": self.n_errors,
            "n_warnings": self.n_warnings,
            "has_tools": self.has_tools,
            "images": self.images.to_dict() if self.images else None,
            "counts": dict(self.counts),
            "problems": [p.to_dict() for p in self.problems],
            "problems_truncated": len(self.problems) < self.n_errors + self.n_warnings,
        }


# --------------------------------------------------------------------------------------------------
# check


def check_file(
    path: Path, kind: str | None = None, *, image_tokens: ImageTokens | None = None
) -> CheckReport:
    """Stream through a .jsonl / .json array / .txt data file and report every problem with its
    line. kind None: the file's kind is its first row's, and a row of another kind is an error;
    a DataKind value: rows of any other kind are errors (wrong_kind). Images are looked for beside
    the file and counted with image_tokens (LLaMA-Factory's defaults unless given)."""
    path, fh, mode = open_data_file(path)
    col = Collector()
    checker = RowRules(col, kind, mode, data_dir=path.parent, image_tokens=image_tokens)
    seen: dict[int, int] = {}  # hash of the row's bytes -> first line
    n_samples = n_valid = 0
    with fh:
        try:
            for line, value, raw in iter_rows(fh, mode, col):
                n_samples += 1
                if value is BAD or not checker.check(value, line, raw):
                    continue
                n_valid += 1
                first = seen.setdefault(hash(raw), line)
                if first != line:
                    col.warning("duplicate", line, None, f"same sample as line {first}")
        except OSError as exc:
            raise QwenftError(f"cannot read {path}: {exc.strerror or exc}") from None
    checker.finish()
    if n_samples == 0 and col.n_errors == 0:
        what = "an empty JSON array" if mode == "json" else "empty (no samples)"
        col.error("empty_file", None, None, f"the file is {what}")
    return CheckReport(
        path=path,
        n_samples=n_samples,
        n_valid=n_valid,
        problems=col.problems,
        counts=dict(col.counts),
        n_errors=col.n_errors,
        n_warnings=col.n_warnings,
        format=mode,
        has_tools=checker.has_tools,
        kind=checker.file_kind,
        images=checker.images.stats if checker.images.rows_with_images else None,
        n_image_rows=checker.images.rows_with_images,
    )


def require_valid(path: Path, not_done: str, kind: str | None = "sft") -> CheckReport:
    """check_file, raising QwenftError with the grouped problems when the file has errors.

    not_done says what was not done because of them, e.g. "nothing was started". kind: the data
    kind the caller takes (default sft: training and evaluating chat data); None takes any."""
    report = check_file(path, kind)
    if not report.ok:
        raise QwenftError(
            f"{report.path} has {report.n_errors} data error(s); {not_done}\n"
            + format_report(report, max_per_kind=3).rstrip(),
            f"fix them (`qwenft data check {report.path}` lists them all), then try again",
        )
    return report


def format_problems(
    problems: list[Problem], name: str, max_per_kind: int = 5, counts: dict[str, int] | None = None
) -> list[str]:
    """Problems grouped by kind (errors first, most frequent first), each kind counted, the first
    few shown as `name:line field: message`."""
    counts = counts or {}
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.severity, p.kind), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != "error", -counts.get(k[1], len(groups[k])), k[1]))
    lines = []
    for severity, kind in order:
        probs = groups[(severity, kind)]
        total = max(counts.get(kind, 0), len(probs))
        lines.append(f"{severity} {kind} ({total})")
        for p in probs[:max_per_kind]:
            where = name if p.line is None else f"{name}:{p.line}"
            fld = f" {p.field}" if p.field else ""
            lines.append(f"  {where}{fld}: {p.message}")
        if total > max_per_kind:
            lines.append(f"  ... and {total - max_per_kind} more")
    return lines


def format_report(report: CheckReport, max_per_kind: int = 5) -> str:
    """The report as text: a summary line, then the problems grouped by kind and counted."""
    n = report.n_samples
    what = f"sample{'s' if n != 1 else ''}"
    if report.reading == "lines":
        what = (
            f"document{'s' if n != 1 else ''} (read as LLaMA-Factory reads a .txt: one document "
            "per line)"
        )
    summary = (
        f"{report.path}: {report.kind} data, {n} {what}, "
        f"{report.n_valid} valid, "
        f"{report.n_errors} error{'s' if report.n_errors != 1 else ''}, "
        f"{report.n_warnings} warning{'s' if report.n_warnings != 1 else ''}"
    )
    lines = format_problems(report.problems, str(report.path), max_per_kind, report.counts)
    if report.images is not None:
        lines.insert(0, report.images.line())
    return "\n".join([summary, *lines])


def _holds(fh: IO[bytes], needle: bytes) -> bool:
    """Whether the file's bytes hold needle anywhere (a search of the file mapped in memory)."""
    try:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(needle) >= 0
    except (ValueError, OSError):  # an empty file (nothing to map), or one that cannot be mapped
        return needle in fh.read()


def _file_has(path: Path, key: str, filled: bool) -> bool:
    """Whether any row of the file has key (filled: with a value other than null, "" or [])."""
    path, fh, mode = open_data_file(path)
    col = Collector()
    needle = json.dumps(key).encode()

    def found(obj: object) -> bool:
        return isinstance(obj, dict) and key in obj and not (filled and obj[key] in (None, "", []))

    with fh:
        if mode == "jsonl":
            if not _holds(fh, needle):  # the usual answer, at the speed of a block search
                return False
            fh.seek(0)
            for raw in fh:
                if needle in raw:
                    raw = raw.strip()
                    raw = raw[3:] if raw.startswith(BOM) else raw
                    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
                        if found(DECODER.decode(raw.decode("utf-8"))):
                            return True
            return False
        if mode != "json":
            return False
        return any(found(v) for _, v, _ in iter_rows(fh, mode, col))


def file_has_tools(path: Path) -> bool:
    """Whether any row of the file has a "tools" key."""
    return _file_has(path, "tools", filled=False)


def file_has_images(path: Path) -> bool:
    """Whether any row of the file has images (a non-empty "images")."""
    return _file_has(path, IMAGES, filled=True)
