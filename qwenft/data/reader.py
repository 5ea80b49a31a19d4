"""Reading data files row by row: .jsonl or a .json array (BOM, strict JSON, size limits), and
.txt pre-training text as LLaMA-Factory reads it (one {"text": ...} row per line; a row per
blank-line-separated block only when asked for: mode "txt-blocks").

Every row comes back with its line number; what cannot be read is recorded as a Problem in a
Collector, never raised. Nothing here prints or exits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from qwenft.choices import TextDocs
from qwenft.errors import QwenftError

SUFFIXES = (".jsonl", ".json")  # JSON data, as LLaMA-Factory reads it
TEXT_SUFFIXES = (".txt",)  # pre-training text: one document per line, as LLaMA-Factory reads it
# How a .txt file becomes documents: "lines" (LLaMA-Factory's reading, the default everywhere) or
# "blocks" (one per blank-line-separated block: only `qwenft data convert --text-docs blocks`).
TEXT_DOCS = TextDocs.values()
TEXT_MODES = {"lines": "txt", "blocks": "txt-blocks"}  # reader mode of each reading
MAX_LINE_BYTES = 16 * 1024 * 1024  # one chat sample this long fits no cutoff_len; keeps memory flat
MAX_KEPT_PER_KIND = 1000  # problems kept in memory per kind; all are counted
BOM = b"\xef\xbb\xbf"
_WS_RE = re.compile(r"[ \t\n\r]*")


# --------------------------------------------------------------------------------------------------
# results


@dataclass
class Problem:
    """One thing wrong (error) or suspicious (warning) in a data file."""

    severity: str  # "error" | "warning"
    kind: str  # short code, e.g. "invalid_json", "bad_role", "not_alternating"
    line: int | None  # 1-based line in the file (for a .json array: the line its element starts on)
    field: str | None  # e.g. "messages[2].role"
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


class Collector:
    """Counts every problem, keeps the first few of each kind."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self.n_errors = 0
        self.n_warnings = 0

    def add(self, severity: str, kind: str, line: int | None, fld: str | None, msg: str) -> None:
        self.counts[kind] += 1
        if severity == "error":
            self.n_errors += 1
        else:
            self.n_warnings += 1
        if self.counts[kind] <= MAX_KEPT_PER_KIND:
            self.problems.append(Problem(severity, kind, line, fld, msg))

    def error(self, kind: str, line: int | None, fld: str | None, msg: str) -> None:
        self.add("error", kind, line, fld, msg)

    def warning(self, kind: str, line: int | None, fld: str | None, msg: str) -> None:
        self.add("warning", kind, line, fld, msg)


# --------------------------------------------------------------------------------------------------
# reading rows


class _Bad:
    """Marker for a row that could not be read (its problem is already recorded)."""


BAD = _Bad()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN = DECODER.scan_once


def _loads(text: str) -> Any:
    """json.loads without NaN/Infinity, skipping the Python-level wrapper on the happy path."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return DECODER.decode(text)  # raises JSONDecodeError with its message
    if end != len(text):
        return DECODER.decode(text)  # raises "Extra data"
    return value


def open_data_file(path: Path) -> tuple[Path, IO[bytes], str]:
    """Open a .jsonl/.json/.txt data file for binary reading; QwenftError if it cannot be used.

    The mode: "jsonl", "json" (a JSON array) or "txt" (pre-training text, one document per line:
    pass "txt-blocks" to iter_rows instead for one per blank-line-separated block)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise QwenftError(f"{path} is a folder, not a data file", "pass the .jsonl file itself")
    if path.suffix.lower() not in SUFFIXES + TEXT_SUFFIXES:
        raise QwenftError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}",
            "qwenft reads .jsonl (one JSON object per line), .json (a JSON array) or .txt "
            "(pre-training text, one document per line); LLaMA-Factory picks its loader from "
            "the extension",
        )
    try:
        fh = open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        raise QwenftError(
            f"data file not found: {path}", "check the path; it is relative to the current folder"
        ) from None
    except OSError as exc:
        raise QwenftError(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = "txt" if path.suffix.lower() in TEXT_SUFFIXES else "jsonl"
    if path.suffix.lower() == ".json":
        head = fh.read(4096)
        fh.seek(0)
        text = head[3:] if head.startswith(BOM) else head
        if text.lstrip()[:1] == b"[":
            mode = "json"
    return path, fh, mode


def iter_rows(fh: IO[bytes], mode: str, col: Collector) -> Iterator[tuple[int, Any, bytes]]:
    """Yield (line, parsed value or BAD, one-line JSON bytes) per row; record read problems."""
    if mode == "json":
        yield from _iter_json_array(fh, col)
    elif mode == "txt":
        yield from _iter_text_lines(fh, col)
    elif mode == "txt-blocks":
        yield from _iter_text_blocks(fh, col)
    else:
        yield from _iter_jsonl(fh, col)


def jsonl_payloads(fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line, the row's JSON bytes) of each non-blank line of a .jsonl that has passed the check:
    what iter_rows gives as its raw bytes, without decoding or parsing them (the reader of
    tokenizing, whose workers parse the rows)."""
    for lineno, raw in enumerate(fh, 1):
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[3:]
        raw = raw.strip()
        if raw:
            yield lineno, raw


def _iter_jsonl(fh: IO[bytes], col: Collector) -> Iterator[tuple[int, Any, bytes]]:
    readline = fh.readline
    lineno = 0
    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            total = len(raw)
            while True:  # skip the rest of the line without holding it
                chunk = readline(1 << 20)
                total += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            col.error(
                "line_too_long",
                lineno,
                None,
                f"line is {total / 1e6:.1f} MB, over the {MAX_LINE_BYTES // 2**20} MiB limit for "
                "one sample (no cutoff_len fits it); is the file one JSON document instead of "
                "JSON lines?",
            )
            yield lineno, BAD, b""
            continue
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[3:]
        raw = raw.strip()
        if not raw:
            continue  # blank lines (the last one included) are fine
        if b"\x00" in raw:
            at = raw.index(b"\x00") + 1
            col.error(
                "nul_byte", lineno, None, f"NUL byte at byte {at}: the file is binary or corrupt"
            )
            yield lineno, BAD, raw
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 4]
            col.error(
                "invalid_utf8",
                lineno,
                None,
                f"invalid UTF-8 at byte {exc.start + 1} of the line ({bad!r}); "
                "save the file as UTF-8",
            )
            yield lineno, BAD, raw
            continue
        try:
            value = _loads(text)
        except RecursionError:
            col.error("invalid_json", lineno, None, "JSON nested too deeply")
            yield lineno, BAD, raw
            continue
        except ValueError as exc:
            col.error("invalid_json", lineno, None, _json_error_text(exc, text, lineno))
            yield lineno, BAD, raw
            continue
        yield lineno, value, raw


def _iter_text_lines(fh: IO[bytes], col: Collector) -> Iterator[tuple[int, Any, bytes]]:
    """One {"text": line} per line, as LLaMA-Factory reads a .txt (HF datasets' "text" builder:
    UTF-8, universal newlines, so "\\n", "\\r\\n" and a lone "\\r" each end a line; the line
    without its ending, everything else kept: spaces, a byte-order mark). A blank line is a row
    too (an empty document: LLaMA-Factory trains it as the end-of-text token alone). A line that
    cannot be read is BAD (its problem recorded)."""
    readline = fh.readline
    lineno = 0
    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:  # skip the rest of the line without holding it
                chunk = readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            lineno += 1
            col.error(
                "line_too_long",
                lineno,
                None,
                f"line over the {MAX_LINE_BYTES // 2**20} MiB limit for one document",
            )
            yield lineno, BAD, b""
            continue
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        for piece in raw.split(b"\r") if b"\r" in raw else (raw,):
            lineno += 1
            if b"\x00" in piece:
                col.error("nul_byte", lineno, None, "NUL byte: the file is binary or corrupt")
                yield lineno, BAD, b""
                continue
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as exc:
                col.error(
                    "invalid_utf8",
                    lineno,
                    None,
                    f"invalid UTF-8 at byte {exc.start + 1} of the line "
                    f"({piece[exc.start : exc.start + 4]!r}); save the file as UTF-8",
                )
                yield lineno, BAD, b""
                continue
            value = {"text": text}
            yield lineno, value, dump_row(value)


def _iter_text_blocks(fh: IO[bytes], col: Collector) -> Iterator[tuple[int, Any, bytes]]:
    """One {"text": block} per run of non-blank lines (line endings as \\n, the lines as they are),
    numbered by the block's first line; a block that cannot be read is BAD (its problem recorded).
    Not LLaMA-Factory's reading of a .txt (one document per line): only `qwenft data convert
    --text-docs blocks` reads a .txt this way, and writes the blocks as {"text"} JSON lines."""
    readline = fh.readline
    lineno = start = size = 0
    parts: list[str] = []
    bad = False

    def block() -> tuple[int, Any, bytes]:
        if bad:
            return start, BAD, b""
        value = {"text": "\n".join(parts)}
        return start, value, dump_row(value)

    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            break
        lineno += 1
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[3:]
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:  # skip the rest of the line without holding it
                chunk = readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            raw = b"x"  # not blank: the block goes on, and is already bad
            if not bad:
                col.error(
                    "line_too_long",
                    lineno,
                    None,
                    f"line over the {MAX_LINE_BYTES // 2**20} MiB limit for one document",
                )
            bad, start = True, start or lineno
            continue
        if not raw.strip():
            if parts or bad:
                yield block()
            parts, bad, start, size = [], False, 0, 0
            continue
        start = start or lineno
        size += len(raw)
        if b"\x00" in raw:
            if not bad:
                col.error("nul_byte", lineno, None, "NUL byte: the file is binary or corrupt")
            bad = True
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not bad:
                col.error(
                    "invalid_utf8",
                    lineno,
                    None,
                    f"invalid UTF-8 at byte {exc.start + 1} of the line "
                    f"({raw[exc.start : exc.start + 4]!r}); save the file as UTF-8",
                )
            bad = True
            continue
        if size > MAX_LINE_BYTES and not bad:
            col.error(
                "line_too_long",
                start,
                None,
                f"the block starting here is over {MAX_LINE_BYTES // 2**20} MiB, the limit for one "
                "document: separate documents with a blank line",
            )
            bad = True
        if not bad:
            parts.append(text.rstrip("\r\n"))
    if parts or bad:
        yield block()


def _json_error_text(exc: ValueError, text: str, lineno: int) -> str:
    if isinstance(exc, json.JSONDecodeError):
        msg = f"invalid JSON: {exc.msg} at column {exc.colno}"
        if exc.msg.startswith("Expecting") and exc.pos >= len(text) - 1:
            msg += " (the line ends early: truncated?)"
        elif lineno == 1 and text in ("[", "{"):
            msg += " (the file looks like one pretty-printed JSON document, not JSON lines)"
        return msg
    return f"invalid JSON: {exc}"


def dump_row(value: Any) -> bytes:
    """One JSON line, UTF-8; lone surrogates (unencodable) stay visible as \\u escapes."""
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value).encode("ascii")


def _iter_json_array(fh: IO[bytes], col: Collector) -> Iterator[tuple[int, Any, bytes]]:
    data = fh.read()
    if data.startswith(BOM):
        data = data[3:]
    broken = False
    pos = data.find(b"\x00")
    seen_lines = set()
    while pos != -1 and len(seen_lines) < 100:
        line = data.count(b"\n", 0, pos) + 1
        if line not in seen_lines:
            seen_lines.add(line)
            col.error("nul_byte", line, None, "NUL byte: the file is binary or corrupt")
        pos = data.find(b"\x00", pos + 1)
    broken = bool(seen_lines)
    start, reported = 0, 0
    while reported < 100:
        try:
            data[start:].decode("utf-8")
            break
        except UnicodeDecodeError as exc:
            at = start + exc.start
            col.error(
                "invalid_utf8",
                data.count(b"\n", 0, at) + 1,
                None,
                f"invalid UTF-8 ({data[at : at + 4]!r}); save the file as UTF-8",
            )
            start = start + exc.end
            reported += 1
            broken = True
    if broken:
        return
    text = data.decode("utf-8")
    del data
    n = len(text)
    idx = _WS_RE.match(text, 0).end()
    if idx >= n or text[idx] != "[":
        return
    cur_idx, cur_line = 0, 1

    def line_at(i: int) -> int:
        nonlocal cur_idx, cur_line
        cur_line += text.count("\n", cur_idx, i)
        cur_idx = i
        return cur_line

    idx = _WS_RE.match(text, idx + 1).end()
    if idx < n and text[idx] == "]":
        idx = _WS_RE.match(text, idx + 1).end()
    else:
        while True:
            line = line_at(idx)
            try:
                value, end = DECODER.raw_decode(text, idx)
            except RecursionError:
                col.error("invalid_json", line, None, "JSON nested too deeply")
                yield line, BAD, b""
                return
            except ValueError as exc:
                where = line
                msg = f"invalid JSON: {exc}"
                if isinstance(exc, json.JSONDecodeError):
                    where, msg = exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"
                col.error(
                    "invalid_json", where, None, msg + " (the array cannot be read past here)"
                )
                yield line, BAD, b""
                return
            yield line, value, dump_row(value)
            idx = _WS_RE.match(text, end).end()
            if idx < n and text[idx] == ",":
                idx = _WS_RE.match(text, idx + 1).end()
                continue
            if idx < n and text[idx] == "]":
                idx = _WS_RE.match(text, idx + 1).end()
                break
            what = (
                "the array is not closed (truncated file?)" if idx >= n else "expected ',' or ']'"
            )
            col.error("invalid_json", line_at(min(idx, n)), None, f"invalid JSON: {what}")
            return
    if idx < n:
        col.error("invalid_json", line_at(idx), None, "invalid JSON: extra data after the array")


def jtype(v: Any) -> str | None:
    """The JSON type of a value as problems name it; None for null."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    return "object"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except IsADirectoryError:
        raise QwenftError(f"{path} is a folder, not a data file") from None
    except FileNotFoundError:
        raise QwenftError(f"data file not found: {path}") from None
    except OSError as exc:
        raise QwenftError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest()
