"""Chat datasets: check, convert, split, register and measure them before any GPU time is spent.

The dataset shape qwenft trains on is JSON lines (or a JSON array in a ``.json`` file) of
``{"messages": [{"role": ..., "content": ...}, ...], "tools": "<JSON list>"?}`` objects,
registered with LLaMA-Factory as ``formatting: sharegpt`` with role/content tags. Roles:
``system`` (first only), ``user``, ``assistant``, and for tool use ``function_call`` (the
assistant calls a function; content is ``{"name": ..., "arguments": {...}}`` or a list of them,
as JSON text) and ``tool`` (the function's result). A sample's ``tools`` field is the JSON text
of the list of functions offered.

Every function here returns a result or raises QwenftError; nothing prints or exits. torch,
transformers and llamafactory are imported inside token_stats only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, file_lock
from qwenft.paths import default_dataset_dir

SYSTEM, USER, ASSISTANT, FUNCTION_CALL, TOOL = (
    "system",
    "user",
    "assistant",
    "function_call",
    "tool",
)
ROLES = (SYSTEM, USER, ASSISTANT, FUNCTION_CALL, TOOL)
SAMPLE_KEYS = ("messages", "tools")
MESSAGE_KEYS = ("role", "content")

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

SUFFIXES = (".jsonl", ".json")
MAX_LINE_BYTES = 16 * 1024 * 1024  # one chat sample this long fits no cutoff_len; keeps memory flat
MAX_KEPT_PER_KIND = 1000  # problems kept in memory per kind; all are counted
BOM = b"\xef\xbb\xbf"
CONVERT_FORMATS = ("alpaca", "sharegpt", "openai", "auto")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_WS_RE = re.compile(r"[ \t\n\r]*")
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # as LLaMA-Factory's
_THOUGHT_RE = re.compile(r"<think>\n(.*?)\n</think>\n\n", re.DOTALL)

_HINT_CONVERT = "convert it with `qwenft data convert FILE -o OUT.jsonl --from auto`"


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


@dataclass
class CheckReport:
    """What check_file found. ``problems`` keeps the first MAX_KEPT_PER_KIND of each kind;
    ``counts``, ``n_errors`` and ``n_warnings`` count all of them."""

    path: Path
    n_samples: int  # rows read (valid or not); blank lines are not rows
    n_valid: int  # rows without errors
    problems: list[Problem]
    counts: dict[str, int] = field(default_factory=dict)  # kind -> number found
    n_errors: int = 0
    n_warnings: int = 0
    format: str = "jsonl"  # "jsonl" | "json" (a JSON array)
    has_tools: bool = False  # some row has a "tools" key (the dataset entry then maps that column)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "ok": self.ok,
            "n_samples": self.n_samples,
            "n_valid": self.n_valid,
            "n_errors": self.n_errors,
            "n_warnings": self.n_warnings,
            "has_tools": self.has_tools,
            "counts": dict(self.counts),
            "problems": [p.to_dict() for p in self.problems],
            "problems_truncated": len(self.problems) < self.n_errors + self.n_warnings,
        }


@dataclass
class ConvertReport:
    """What convert_file did. ``problems`` names the rows that were not converted."""

    src: Path
    out: Path
    format: str  # the source format used (detected when asked for "auto")
    n_in: int  # rows read
    n_out: int  # rows written (0 when nothing was written)
    problems: list[Problem]
    written: bool  # False: some rows could not be converted and skip_invalid was off

    @property
    def ok(self) -> bool:
        return self.written

    def to_dict(self) -> dict:
        return {
            "src": str(self.src),
            "out": str(self.out),
            "format": self.format,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "written": self.written,
            "problems": [p.to_dict() for p in self.problems],
        }


class _Collector:
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


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN = _DECODER.scan_once


def _loads(text: str) -> Any:
    """json.loads without NaN/Infinity, skipping the Python-level wrapper on the happy path."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return _DECODER.decode(text)  # raises JSONDecodeError with its message
    if end != len(text):
        return _DECODER.decode(text)  # raises "Extra data"
    return value


def _open_data_file(path: Path) -> tuple[Path, IO[bytes], str]:
    """Open a .jsonl/.json data file for binary reading; QwenftError if it cannot be used."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise QwenftError(f"{path} is a folder, not a data file", "pass the .jsonl file itself")
    if path.suffix.lower() not in SUFFIXES:
        raise QwenftError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}",
            "qwenft reads .jsonl (one JSON object per line) or .json (a JSON array); "
            "LLaMA-Factory picks its loader from the extension",
        )
    try:
        fh = open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        raise QwenftError(
            f"data file not found: {path}", "check the path; it is relative to the current folder"
        ) from None
    except OSError as exc:
        raise QwenftError(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = "jsonl"
    if path.suffix.lower() == ".json":
        head = fh.read(4096)
        fh.seek(0)
        text = head[3:] if head.startswith(BOM) else head
        if text.lstrip()[:1] == b"[":
            mode = "json"
    return path, fh, mode


def _iter_rows(fh: IO[bytes], mode: str, col: _Collector) -> Iterator[tuple[int, Any, bytes]]:
    """Yield (line, parsed value or BAD, one-line JSON bytes) per row; record read problems."""
    if mode == "json":
        yield from _iter_json_array(fh, col)
    else:
        yield from _iter_jsonl(fh, col)


def _iter_jsonl(fh: IO[bytes], col: _Collector) -> Iterator[tuple[int, Any, bytes]]:
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


def _json_error_text(exc: ValueError, text: str, lineno: int) -> str:
    if isinstance(exc, json.JSONDecodeError):
        msg = f"invalid JSON: {exc.msg} at column {exc.colno}"
        if exc.msg.startswith("Expecting") and exc.pos >= len(text) - 1:
            msg += " (the line ends early: truncated?)"
        elif lineno == 1 and text in ("[", "{"):
            msg += " (the file looks like one pretty-printed JSON document, not JSON lines)"
        return msg
    return f"invalid JSON: {exc}"


def _dump_row(value: Any) -> bytes:
    """One JSON line, UTF-8; lone surrogates (unencodable) stay visible as \\u escapes."""
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value).encode("ascii")


def _iter_json_array(fh: IO[bytes], col: _Collector) -> Iterator[tuple[int, Any, bytes]]:
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
                value, end = _DECODER.raw_decode(text, idx)
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
            yield line, value, _dump_row(value)
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


# --------------------------------------------------------------------------------------------------
# checking one sample


def _jtype(v: Any) -> str | None:
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


def _has_surrogate(v: Any, path: str) -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (unencodable as UTF-8)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = _has_surrogate(x, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(v, dict):
        for k, x in v.items():
            found = _has_surrogate(x, f"{path}.{k}" if path else str(k))
            if found:
                return found
    return None


_ROLE_HINTS = {
    "human": 'ShareGPT names: use "user" (or convert the file with --from sharegpt)',
    "gpt": 'ShareGPT names: use "assistant" (or convert the file with --from sharegpt)',
    "bot": 'use "assistant"',
    "model": 'use "assistant"',
    "observation": 'use "tool" for a function result',
    "function": 'use "tool" for a function result',
    "developer": 'use "system"',
}


def _tool_names(tools: Any, line: int, col: _Collector) -> set[str] | None:
    """Validate a sample's tools field; return the function names offered (None if invalid)."""
    if not isinstance(tools, str):
        col.error(
            "bad_tools",
            line,
            "tools",
            f"tools must be a string holding a JSON list (LLaMA-Factory json-decodes it), got a "
            f"{_jtype(tools)}; {_HINT_CONVERT.replace('auto', 'openai')}",
        )
        return None
    if not tools.strip():
        return set()
    try:
        decoded = json.loads(tools)
    except ValueError as exc:
        col.error("bad_tools", line, "tools", f"tools is not valid JSON: {exc}")
        return None
    if not isinstance(decoded, list):
        col.error(
            "bad_tools",
            line,
            "tools",
            f"tools must decode to a JSON list of functions, got a {_jtype(decoded)}",
        )
        return None
    names = set()
    for k, tool in enumerate(decoded):
        fn = (
            tool.get("function")
            if isinstance(tool, dict) and tool.get("type") == "function"
            else tool
        )
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            col.error(
                "bad_tools",
                line,
                f"tools[{k}]",
                'each tool must be an object with a "name" (optionally wrapped as '
                '{"type": "function", "function": {...}})',
            )
            return None
        names.add(name)
    return names


def _function_call_names(content: str) -> tuple[list[str] | None, str]:
    """Parse a function_call turn the way LLaMA-Factory does: (names, "") or (None, why)."""
    match = _TOOL_CALL_RE.search(content)
    if match is not None:
        json_part = match.group(1)
    else:
        thought = _THOUGHT_RE.search(content)
        json_part = content.replace(thought.group(0), "") if thought else content
    try:
        calls = json.loads(json_part)
    except ValueError:
        return None, (
            'a function_call turn must hold JSON: {"name": "...", "arguments": {...}} or a list of '
            "them"
        )
    if not isinstance(calls, list):
        calls = [calls]
    if not calls:
        return None, "a function_call turn holds an empty list of calls"
    names = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            return None, f"call {k + 1} is a {_jtype(call)}, not an object with name and arguments"
        name = call.get("name")
        if not isinstance(name, str) or not name:
            return None, f'call {k + 1} has no "name"'
        if "arguments" not in call:
            return None, f'call {k + 1} ({name}) has no "arguments" (LLaMA-Factory fails on it)'
        names.append(name)
    return names, ""


_ROLE_CODE = {SYSTEM: "s", USER: "u", ASSISTANT: "a", FUNCTION_CALL: "f", TOOL: "t"}
_ORDER_RE = re.compile(r"s?(?:ua)+")


def _fast_ok(msgs: Any) -> bool:
    """True for the common clean sample (system?, then user/assistant pairs, plain string content);
    anything else goes through the full rules, which also explain what is wrong."""
    if type(msgs) is not list or not msgs:
        return False
    codes = []
    try:
        for m in msgs:
            if len(m) != 2:
                return False
            c = m["content"]
            if type(c) is not str or not c or c.isspace():
                return False
            codes.append(_ROLE_CODE[m["role"]])
    except (TypeError, KeyError):
        return False
    return _ORDER_RE.fullmatch("".join(codes)) is not None


class _Checker:
    """The per-sample rules. Keeps the cross-row state (types of extra keys, tools seen)."""

    def __init__(self, col: _Collector) -> None:
        self.col = col
        self.types: dict[str, tuple[str, int]] = {}  # extra key -> (JSON type, first line)
        self.has_tools = False

    def _track_type(self, key: str, value: Any, line: int, fld: str) -> None:
        t = _jtype(value)
        if t is None:
            return
        seen = self.types.get(key)
        if seen is None:
            self.types[key] = (t, line)
        elif seen[0] != t:
            self.col.error(
                "mixed_types",
                line,
                fld,
                f"{fld} is a {t} here but a {seen[0]} at line {seen[1]}: LLaMA-Factory's JSON "
                "loader fails on a field whose type changes; remove the field or make it one type",
            )

    def check(self, obj: Any, line: int, raw: bytes = b"") -> bool:
        """Record the problems of one sample; True if it has no errors."""
        if type(obj) is dict and len(obj) == 1 and _fast_ok(obj.get("messages")):
            if not (raw and b"\\u" in raw and _SURROGATE_ESCAPE_RE.search(raw)):
                return True
        return self._check(obj, line, raw)

    def _check(self, obj: Any, line: int, raw: bytes) -> bool:
        col = self.col
        before = col.n_errors
        if not isinstance(obj, dict):
            col.error(
                "not_object",
                line,
                None,
                'each sample must be a JSON object {"messages": [...]}, '
                f"got a {_jtype(obj) or 'null'}",
            )
            return False
        if "messages" not in obj:
            keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
            msg = f'no "messages" list (keys: {keys})'
            if "conversations" in obj:
                msg += f"; this looks like ShareGPT: {_HINT_CONVERT}"
            elif "instruction" in obj or "output" in obj:
                msg += f"; this looks like Alpaca: {_HINT_CONVERT}"
            col.error("missing_messages", line, "messages", msg)
        for key, value in obj.items():
            if key in SAMPLE_KEYS:
                continue
            if key == "system":
                why = (
                    "is ignored by LLaMA-Factory: put the system prompt first in messages "
                    'as role "system"'
                )
            else:
                why = "is not used by LLaMA-Factory"
            col.warning("unknown_key", line, key, f'unknown key "{key}" {why}')
            self._track_type(key, value, line, key)
        tool_names: set[str] | None = set()
        if "tools" in obj:
            self.has_tools = True
            if obj["tools"] is not None:
                tool_names = _tool_names(obj["tools"], line, col)
        if raw and b"\\u" in raw and _SURROGATE_ESCAPE_RE.search(raw):
            where = _has_surrogate(obj, "")
            if where:
                col.error(
                    "invalid_unicode",
                    line,
                    where,
                    "lone UTF-16 surrogate escape (e.g. \\ud83d without its pair): a broken emoji "
                    "that cannot be encoded as UTF-8; LLaMA-Factory fails to load it",
                )
        if "messages" in obj and not _fast_ok(obj["messages"]):
            self._check_messages(obj["messages"], line, tool_names)
        return col.n_errors == before

    def _check_messages(self, msgs: Any, line: int, tool_names: set[str] | None) -> None:
        col = self.col
        if not isinstance(msgs, list):
            col.error(
                "messages_not_list",
                line,
                "messages",
                f"messages must be a list, got a {_jtype(msgs) or 'null'}",
            )
            return
        if not msgs:
            col.error("empty_messages", line, "messages", "messages is empty")
            return
        roles: list[str | None] = []
        called: list[tuple[int, list[str]]] = []
        for i, m in enumerate(msgs):
            f = f"messages[{i}]"
            if not isinstance(m, dict):
                col.error(
                    "bad_message",
                    line,
                    f,
                    "each message must be an object with role and content, "
                    f"got a {_jtype(m) or 'null'}",
                )
                roles.append(None)
                continue
            role = m.get("role")
            if "role" not in m:
                col.error("missing_role", line, f"{f}.role", "message has no role")
                role = None
            elif not isinstance(role, str) or role not in ROLES:
                hint = _ROLE_HINTS.get(role.lower(), "") if isinstance(role, str) else ""
                col.error(
                    "bad_role",
                    line,
                    f"{f}.role",
                    f"role {json.dumps(role, ensure_ascii=False)} is not one of {', '.join(ROLES)}"
                    + (f"; {hint}" if hint else ""),
                )
                role = None
            roles.append(role)
            if "content" not in m:
                extra = (
                    "; OpenAI tool_calls: convert with --from openai" if "tool_calls" in m else ""
                )
                col.error("missing_content", line, f"{f}.content", "message has no content" + extra)
            else:
                content = m["content"]
                if not isinstance(content, str):
                    extra = ""
                    if isinstance(content, list):
                        extra = "; OpenAI content parts: convert with --from openai"
                    col.error(
                        "bad_content",
                        line,
                        f"{f}.content",
                        f"content must be a string, got {_jtype(content) or 'null'}{extra}",
                    )
                elif not content:
                    col.error("empty_content", line, f"{f}.content", "content is empty")
                elif content.isspace():
                    col.warning("blank_content", line, f"{f}.content", "content is only whitespace")
                elif role == FUNCTION_CALL:
                    names, why = _function_call_names(content)
                    if names is None:
                        col.error("bad_function_call", line, f"{f}.content", why)
                    else:
                        called.append((i, names))
            for key, value in m.items():
                if key not in MESSAGE_KEYS:
                    extra = ""
                    if key == "tool_calls":
                        extra = " (OpenAI tool_calls are dropped: convert with --from openai)"
                    col.warning(
                        "unknown_key",
                        line,
                        f"{f}.{key}",
                        f'unknown key "{key}" is not used by LLaMA-Factory{extra}',
                    )
                    self._track_type(f"messages[].{key}", value, line, f"{f}.{key}")
        if tool_names is not None:
            for i, names in called:
                if not tool_names:
                    col.warning(
                        "no_tools",
                        line,
                        f"messages[{i}]",
                        "function_call turn but the sample offers no tools: the model learns to "
                        "call functions it was never shown",
                    )
                    break
                missing = [n for n in names if n not in tool_names]
                if missing:
                    col.warning(
                        "unknown_function",
                        line,
                        f"messages[{i}].content",
                        f"calls {', '.join(missing)}, which is not in the sample's tools",
                    )
        if None in roles:
            return
        self._check_order(roles, line)

    def _check_order(self, roles: list[Any], line: int) -> None:
        col = self.col
        start = 1 if roles[0] == SYSTEM else 0
        misplaced = [i for i in range(start, len(roles)) if roles[i] == SYSTEM]
        for i in misplaced:
            col.error(
                "system_not_first",
                line,
                f"messages[{i}].role",
                "a system message may only come first",
            )
        if misplaced:
            return
        turns = roles[start:]
        if not turns:
            col.error(
                "no_turns",
                line,
                "messages",
                "only a system message: add a user turn and the assistant's reply",
            )
            return
        for j, role in enumerate(turns):
            f = f"messages[{j + start}].role"
            prev = turns[j - 1] if j else None
            msg = None
            if j == 0:
                if role != USER:
                    where = "after the system message" if start else "of a sample"
                    msg = f"the first turn {where} must be user, got {role}"
            elif role == TOOL and prev != FUNCTION_CALL:
                msg = f"a tool turn must answer a function_call turn, but follows {prev}"
            elif prev == FUNCTION_CALL and role != TOOL:
                msg = f"a function_call turn must be answered by a tool turn, got {role}"
            elif j % 2 == 1 and role not in (ASSISTANT, FUNCTION_CALL):
                msg = f"expected assistant after {prev}, got {role} ({prev} twice in a row?)"
            elif j % 2 == 0 and role not in (USER, TOOL):
                msg = f"expected user after {prev}, got {role} ({prev} twice in a row?)"
            if msg:
                col.error("not_alternating", line, f, msg)
                return
        if turns[-1] not in (ASSISTANT, FUNCTION_CALL):
            col.error(
                "bad_last_turn",
                line,
                f"messages[{len(roles) - 1}].role",
                f"the sample ends with a {turns[-1]} turn: the last turn must be the assistant's "
                "reply (LLaMA-Factory drops such samples)",
            )


# --------------------------------------------------------------------------------------------------
# check


def check_file(path: Path) -> CheckReport:
    """Stream through a .jsonl (or .json array) chat file and report every problem with its line."""
    path, fh, mode = _open_data_file(path)
    col = _Collector()
    checker = _Checker(col)
    seen: dict[int, int] = {}  # hash of the row's bytes -> first line
    n_samples = n_valid = 0
    with fh:
        try:
            for line, value, raw in _iter_rows(fh, mode, col):
                n_samples += 1
                if value is BAD or not checker.check(value, line, raw):
                    continue
                n_valid += 1
                first = seen.setdefault(hash(raw), line)
                if first != line:
                    col.warning("duplicate", line, None, f"same sample as line {first}")
        except OSError as exc:
            raise QwenftError(f"cannot read {path}: {exc.strerror or exc}") from None
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
    )


def require_valid(path: Path, not_done: str) -> CheckReport:
    """check_file, raising QwenftError with the grouped problems when the file has errors.

    not_done says what was not done because of them, e.g. "nothing was started"."""
    report = check_file(path)
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
    summary = (
        f"{report.path}: {n} sample{'s' if n != 1 else ''}, {report.n_valid} valid, "
        f"{report.n_errors} error{'s' if report.n_errors != 1 else ''}, "
        f"{report.n_warnings} warning{'s' if report.n_warnings != 1 else ''}"
    )
    lines = format_problems(report.problems, str(report.path), max_per_kind, report.counts)
    return "\n".join([summary, *lines])


# --------------------------------------------------------------------------------------------------
# hashing and registering


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


def dataset_name_for(path: Path, sha256: str) -> str:
    """A stable default dataset name: <stem>-<sha256[:8]>, limited to letters, digits and _.-"""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).stem).strip("-.")[:64] or "data"
    return f"{stem}-{sha256[:8]}"


def dataset_entry(path: Path, *, has_tools: bool = False) -> dict:
    """The LLaMA-Factory dataset_info.json entry for a messages-format file at path."""
    columns = {"messages": "messages"}
    if has_tools:  # only then: LLaMA-Factory fails (KeyError) on a mapped column no row has
        columns["tools"] = "tools"
    return {
        "file_name": str(Path(path).expanduser().absolute()),
        "formatting": "sharegpt",
        "columns": columns,
        "tags": dict(DATASET_TAGS),
    }


def file_has_tools(path: Path) -> bool:
    """Whether any row of the file has a "tools" key."""
    path, fh, mode = _open_data_file(path)
    col = _Collector()
    with fh:
        if mode == "jsonl":
            for raw in fh:
                if b'"tools"' in raw:
                    raw = raw.strip()
                    raw = raw[3:] if raw.startswith(BOM) else raw
                    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
                        obj = _DECODER.decode(raw.decode("utf-8"))
                        if isinstance(obj, dict) and "tools" in obj:
                            return True
            return False
        return any(isinstance(v, dict) and "tools" in v for _, v, _ in _iter_rows(fh, mode, col))


def count_thinking_samples(path: Path) -> tuple[int, int]:
    """(samples with <think> or </think> in an assistant turn, samples with a messages list).

    The same test LLaMA-Factory's reasoning templates (qwen3) make before adding an empty
    thought to a reply.
    """
    path, fh, mode = _open_data_file(path)
    with_think = total = 0
    with fh:
        for _line, value, raw in _iter_rows(fh, mode, _Collector()):
            if not (isinstance(value, dict) and isinstance(value.get("messages"), list)):
                continue
            total += 1
            if b"think>" not in raw:
                continue
            for m in value["messages"]:
                if isinstance(m, dict) and m.get("role") == ASSISTANT:
                    content = m.get("content")
                    if isinstance(content, str) and ("<think>" in content or "</think>" in content):
                        with_think += 1
                        break
    return with_think, total


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
            f"{info_path} must hold a JSON object of dataset entries, not a {_jtype(info)}",
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
) -> dict:
    """Add or update entry `name` in dataset_dir/dataset_info.json (atomic, under a file lock).

    Same name and same file: updated in place (idempotent). Same name, another file: QwenftError
    unless force. Other entries are kept as they are. has_tools None: scan the file for a tools key.
    """
    check_dataset_name(name)
    path = Path(path).expanduser().absolute()
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
    if has_tools is None:
        has_tools = file_has_tools(path)
    entry = dataset_entry(path, has_tools=has_tools)
    info_path = dataset_dir / "dataset_info.json"
    if info_path.exists():
        _read_dataset_info(info_path)  # fail early, before creating anything
    with file_lock(dataset_dir / ".dataset_info.lock"):
        info = _read_dataset_info(info_path)
        old = info.get(name)
        if old == entry:
            return entry
        if old is not None and not force:
            old_file = old.get("file_name") if isinstance(old, dict) else None
            old_path = (
                os.path.normpath(os.path.join(dataset_dir, old_file))
                if isinstance(old_file, str)
                else None
            )
            if old_path != os.path.normpath(str(path)):
                raise QwenftError(
                    f"dataset {name!r} is already registered in {info_path} for "
                    f"{old_file if old_file else 'another source'}",
                    "pick another --name, or pass --force to point it at this file",
                )
        info[name] = entry
        atomic_write_json(info_path, info)
    return entry


# --------------------------------------------------------------------------------------------------
# atomic output


class _TempOut:
    """A temporary file beside target; commit() renames it into place, discard() deletes it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self.tmp = Path(tmp)
        self.fh: IO[bytes] = os.fdopen(fd, "wb", buffering=1 << 20)

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _check_out_path(out: Path, force: bool, *sources: Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() != ".jsonl":
        raise QwenftError(
            f"output {out} must end in .jsonl", "qwenft writes JSON lines, e.g. -o data.jsonl"
        )
    if out.is_dir():
        raise QwenftError(f"output {out} is a folder", "give a file name, e.g. -o data.jsonl")
    for src in sources:
        with contextlib.suppress(OSError):
            if out.exists() and os.path.samefile(out, src):
                raise QwenftError(f"output {out} is the input file", "write to another file")
    if out.exists() and not force:
        raise QwenftError(
            f"{out} already exists", "pass --force to overwrite it, or pick another name"
        )
    return out


# --------------------------------------------------------------------------------------------------
# convert


class _RowError(Exception):
    def __init__(self, kind: str, message: str, fld: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.field = kind, message, fld


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _tools_text(tools: Any) -> str | None:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        return tools
    return json.dumps(tools, ensure_ascii=False)


def _text(content: Any, fld: str) -> str:
    """An OpenAI content value (string, None or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in (
                "text",
                "input_text",
                "output_text",
            ):
                if not isinstance(part.get("text"), str):
                    raise _RowError("bad_content", f"content part {k} has no text", fld)
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else _jtype(part)
                raise _RowError("bad_content", f"content part of type {kind!r} is not text", fld)
        return "".join(parts)
    raise _RowError("bad_content", f"content must be a string, got {_jtype(content)}", fld)


def _from_alpaca(obj: dict) -> dict:
    def s(key: str) -> str:
        v = obj.get(key)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise _RowError("bad_field", f"{key} must be a string, got {_jtype(v)}", key)
        return v

    messages = []
    system = s("system")
    if system:
        messages.append({"role": SYSTEM, "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise _RowError(
            "bad_field", "history must be a list of [prompt, response] pairs", "history"
        )
    for k, pair in enumerate(history):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise _RowError(
                "bad_field", "each history item must be [prompt, response]", f"history[{k}]"
            )
        messages += [{"role": USER, "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
    query = "\n".join(x for x in (s("instruction"), s("input")) if x)  # as LLaMA-Factory joins them
    if not query:
        raise _RowError("empty_content", "instruction and input are both empty", "instruction")
    if "output" not in obj:
        raise _RowError("missing_field", 'no "output"', "output")
    messages += [{"role": USER, "content": query}, {"role": ASSISTANT, "content": s("output")}]
    return {"messages": messages}


_SHAREGPT_ROLES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "system": SYSTEM,
    "function_call": FUNCTION_CALL,
    "observation": TOOL,
    "tool": TOOL,
}


def _from_sharegpt(obj: dict) -> dict:
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        raise _RowError("missing_field", 'no "conversations" list', "conversations")
    messages = []
    for k, turn in enumerate(conv):
        f = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise _RowError("bad_message", "each turn must be an object with from and value", f)
        who = turn.get("from")
        role = _SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise _RowError(
                "bad_role",
                f"from {json.dumps(who)} is not one of {', '.join(_SHAREGPT_ROLES)}",
                f + ".from",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise _RowError(
                "bad_content",
                f"value must be a string, got {_jtype(value) or 'null'}",
                f + ".value",
            )
        messages.append({"role": role, "content": value})
    system = obj.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == SYSTEM):
        messages.insert(0, {"role": SYSTEM, "content": system})
    out: dict[str, Any] = {"messages": messages}
    tools = _tools_text(obj.get("tools"))
    if tools is not None:
        out["tools"] = tools
    return out


def _from_openai(obj: dict) -> dict:
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        raise _RowError("missing_field", 'no "messages" list', "messages")
    messages: list[dict] = []
    pending_tool: list[str] = []

    def flush_tools() -> None:
        if pending_tool:  # parallel results in one turn, as LLaMA-Factory's openai converter does
            messages.append(
                {
                    "role": TOOL,
                    "content": "\n</tool_response>\n<tool_response>\n".join(pending_tool),
                }
            )
            pending_tool.clear()

    for k, m in enumerate(msgs):
        f = f"messages[{k}]"
        if not isinstance(m, dict):
            raise _RowError("bad_message", "each message must be an object", f)
        role = m.get("role")
        if role in ("tool", "function"):
            pending_tool.append(_text(m.get("content"), f + ".content"))
            continue
        flush_tools()
        text = _text(m.get("content"), f + ".content")
        if role in ("system", "developer"):
            messages.append({"role": SYSTEM, "content": text})
        elif role == "user":
            messages.append({"role": USER, "content": text})
        elif role == "assistant":
            calls = m.get("tool_calls") or (
                [{"function": m["function_call"]}] if m.get("function_call") else []
            )
            if not calls:
                messages.append({"role": ASSISTANT, "content": text})
                continue
            if not isinstance(calls, list):
                raise _RowError("bad_function_call", "tool_calls must be a list", f + ".tool_calls")
            parsed = []
            for c, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _RowError(
                        "bad_function_call",
                        "tool call without a function name",
                        f"{f}.tool_calls[{c}]",
                    )
                parsed.append(
                    {"name": fn["name"], "arguments": _maybe_json(fn.get("arguments", {}))}
                )
            body = json.dumps(parsed[0] if len(parsed) == 1 else parsed, ensure_ascii=False)
            if text.strip():  # LLaMA-Factory keeps the text before a <tool_call> block
                body = f"{text.rstrip()}\n<tool_call>{body}</tool_call>"
            messages.append({"role": FUNCTION_CALL, "content": body})
        else:
            raise _RowError(
                "bad_role",
                f"role {json.dumps(role)} is not one of system, user, assistant, tool",
                f + ".role",
            )
    flush_tools()
    out: dict[str, Any] = {"messages": messages}
    tools = _tools_text(obj.get("tools") if obj.get("tools") is not None else obj.get("functions"))
    if tools is not None:
        out["tools"] = tools
    return out


_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "openai": _from_openai,
}


def detect_format(obj: Any) -> str | None:
    """alpaca | sharegpt | openai for one sample, or None."""
    if not isinstance(obj, dict):
        return None
    if "conversations" in obj:
        return "sharegpt"
    if "messages" in obj:
        return "openai"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    return None


def convert_file(
    src: Path, out: Path, fmt: str = "auto", *, force: bool = False, skip_invalid: bool = False
) -> ConvertReport:
    """Convert alpaca / sharegpt / openai rows to the messages format, written atomically to out.

    Rows that cannot be converted (or that would not pass check_file) are reported with their
    lines. Unless skip_invalid, any such row means nothing is written (report.written is False).
    """
    if fmt not in CONVERT_FORMATS:
        raise QwenftError(f"unknown format {fmt!r}", f"use one of {', '.join(CONVERT_FORMATS)}")
    src_path, fh, mode = _open_data_file(src)
    out_path = _check_out_path(out, force, src_path)
    col = _Collector()
    n_in = n_out = 0
    created_dir = None
    if not out_path.parent.exists():
        created_dir = out_path.parent
        out_path.parent.mkdir(parents=True)
    tmp = _TempOut(out_path)
    detected = fmt if fmt != "auto" else None
    try:
        with fh:
            for line, value, _raw in _iter_rows(fh, mode, col):
                n_in += 1
                if value is BAD:
                    continue
                if detected is None:
                    detected = detect_format(value)
                    if detected is None:
                        keys = (
                            ", ".join(sorted(map(str, value))[:6])
                            if isinstance(value, dict)
                            else _jtype(value)
                        )
                        raise QwenftError(
                            f"{src_path}:{line}: cannot tell the format from this row "
                            f"(keys: {keys})",
                            "pass --from alpaca|sharegpt|openai",
                        )
                if not isinstance(value, dict):
                    col.error(
                        "not_object",
                        line,
                        None,
                        f"expected a JSON object, got a {_jtype(value) or 'null'}",
                    )
                    continue
                try:
                    row = _CONVERTERS[detected](value)
                except _RowError as exc:
                    col.error(exc.kind, line, exc.field, exc.message)
                    continue
                scratch = _Collector()
                dumped = _dump_row(row)
                if not _Checker(scratch).check(row, line, dumped):
                    first = next(p for p in scratch.problems if p.severity == "error")
                    col.error(first.kind, line, first.field, f"after conversion: {first.message}")
                    continue
                tmp.fh.write(dumped + b"\n")
                n_out += 1
        if n_in == 0:
            raise QwenftError(f"{src_path} has no rows to convert", "is it the right file?")
        written = n_out > 0 and (col.n_errors == 0 or skip_invalid)
        if written:
            tmp.commit()
        else:
            tmp.discard()
            n_out = 0
    except BaseException:
        tmp.discard()
        if created_dir is not None:
            with contextlib.suppress(OSError):
                created_dir.rmdir()
        raise
    if not written and created_dir is not None:
        with contextlib.suppress(OSError):
            created_dir.rmdir()
    return ConvertReport(
        src=src_path,
        out=out_path,
        format=detected or fmt,
        n_in=n_in,
        n_out=n_out,
        problems=col.problems,
        written=written,
    )


# --------------------------------------------------------------------------------------------------
# split


def split_file(
    path: Path,
    val_ratio: float = 0.1,
    seed: int = 42,
    out_dir: Path | None = None,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write <stem>.train.jsonl and <stem>.val.jsonl: a seeded random val_ratio of the rows for
    validation, both in file order."""
    if not (isinstance(val_ratio, (int, float)) and 0 < val_ratio < 1):
        raise QwenftError(
            f"--val-ratio must be between 0 and 1 (exclusive), got {val_ratio}",
            "e.g. --val-ratio 0.1",
        )
    report = require_valid(path, "not splitting it")
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
        _check_out_path(p, force, src)
    folder.mkdir(parents=True, exist_ok=True)
    outs: list[_TempOut] = []
    try:
        outs = [_TempOut(train_path), _TempOut(val_path)]
        train_fh, val_fh = outs[0].fh, outs[1].fh
        _, fh, mode = _open_data_file(src)
        with fh:
            for i, (_line, _value, raw) in enumerate(_iter_rows(fh, mode, _Collector())):
                (val_fh if i in val_idx else train_fh).write(raw + b"\n")
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
    """
    drop = set(drop)
    src_path, fh, mode = _open_data_file(src)
    out_path = _check_out_path(out, force, src_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _TempOut(out_path)
    kept = dropped = 0
    try:
        with fh:
            for line, value, raw in _iter_rows(fh, mode, _Collector()):
                if line in drop:
                    dropped += 1
                elif value is not BAD:
                    tmp.fh.write(raw + b"\n")
                    kept += 1
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    return kept, dropped


# --------------------------------------------------------------------------------------------------
# token statistics (LLaMA-Factory's own template and supervised processor)


def _percentile(sorted_vals: Any, q: float) -> int:
    """Nearest-rank percentile of a sorted sequence."""
    if not len(sorted_vals):
        return 0
    k = max(math.ceil(q / 100 * len(sorted_vals)) - 1, 0)
    return int(sorted_vals[k])


def suggest_cutoff_len(p99: int, multiple: int = 64) -> int:
    """p99 of the sample lengths rounded up to a multiple of 64 (at least 64)."""
    return max(multiple, math.ceil(p99 / multiple) * multiple)


class _CachedTokenizer:
    """The real tokenizer, with encode() answered from ids batch-encoded ahead of time."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if not add_special_tokens and not kwargs:
            ids = self.cache.get(text)
            if ids is not None:
                return ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens, **kwargs)


class _RecordingTokenizer:
    """Stands in for the tokenizer on a first pass: notes which strings the template encodes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.seen: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        self.seen.add(text)
        return []


def _measuring_template(template: Any) -> Any:
    """A shallow copy of LLaMA-Factory's template whose encode_multiturn also notes the
    untruncated length of the pairs it returns (in .last_full)."""
    import copy

    measuring = copy.copy(template)
    encode_multiturn = template.encode_multiturn

    def measured(*args: Any, **kwargs: Any) -> Any:
        pairs = encode_multiturn(*args, **kwargs)
        measuring.last_full = sum(len(s) + len(t) for s, t in pairs)
        return pairs

    measuring.encode_multiturn = measured
    measuring.last_full = 0
    return measuring


def _load_tokenizer(model_dir: str) -> Any:
    """The tokenizer exactly as LLaMA-Factory's load_tokenizer builds it, without also loading an
    AutoProcessor (a second full tokenizer load; only multimodal models use it)."""
    from llamafactory.hparams import ModelArguments

    model_args = ModelArguments(model_name_or_path=model_dir)
    try:
        from llamafactory.model.loader import _get_init_kwargs
        from llamafactory.model.patcher import patch_tokenizer
        from transformers import AutoTokenizer
    except ImportError:  # another LLaMA-Factory layout: take the slower public path
        from llamafactory.model import load_tokenizer

        return load_tokenizer(model_args)["tokenizer"]
    init_kwargs = _get_init_kwargs(model_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            use_fast=model_args.use_fast_tokenizer,
            split_special_tokens=model_args.split_special_tokens,
            padding_side="right",
            **init_kwargs,
        )
    except ValueError:  # as LLaMA-Factory: try the other kind
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            use_fast=not model_args.use_fast_tokenizer,
            padding_side="right",
            **init_kwargs,
        )
    except Exception as exc:
        raise OSError(f"failed to load the tokenizer: {exc}") from exc
    patch_tokenizer(tokenizer, model_args)
    return tokenizer


class LlamaFactoryEncoder:
    """Tokenizes samples exactly as LLaMA-Factory's supervised (SFT) preprocessing does.

    It runs LLaMA-Factory's own sharegpt converter, template and SupervisedDatasetProcessor; the
    only change is that the strings the template encodes are batch-tokenized ahead of time.
    """

    def __init__(
        self,
        model_dir: Path | str,
        template: str,
        cutoff_len: int,
        *,
        default_system: str | None = None,
        enable_thinking: bool | None = True,
        train_on_prompt: bool = False,
        mask_history: bool = False,
    ) -> None:
        # LLaMA-Factory, transformers and DeepSpeed print to stdout while they load (logging
        # handlers bound to stdout at import time): keep stdout for the caller's results.
        with contextlib.redirect_stdout(sys.stderr):
            self._setup(
                model_dir,
                template,
                cutoff_len,
                default_system=default_system,
                enable_thinking=enable_thinking,
                train_on_prompt=train_on_prompt,
                mask_history=mask_history,
            )

    def _setup(
        self,
        model_dir: Path | str,
        template: str,
        cutoff_len: int,
        *,
        default_system: str | None,
        enable_thinking: bool | None,
        train_on_prompt: bool,
        mask_history: bool,
    ) -> None:
        import copy

        # Quiet LLaMA-Factory's loggers (they read this when first imported), but do not leak
        # the setting into the environment that later child processes (training) inherit.
        previous = os.environ.get("LLAMAFACTORY_VERBOSITY")
        os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
        try:
            from llamafactory.data.converter import SharegptDatasetConverter
            from llamafactory.data.parser import DatasetAttr
            from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
            from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
            from llamafactory.extras.constants import IGNORE_INDEX
            from llamafactory.hparams import DataArguments
        except ImportError as exc:
            raise QwenftError(
                f"token statistics need LLaMA-Factory: {exc}",
                "install the training extras: pip install 'qwenft[train]'",
            ) from None
        finally:
            if previous is None:
                os.environ.pop("LLAMAFACTORY_VERBOSITY", None)
        if template not in TEMPLATES:
            raise QwenftError(
                f"unknown LLaMA-Factory template {template!r}", "use qwen, qwen3 or qwen3_nothink"
            )
        if not isinstance(cutoff_len, int) or cutoff_len < 1:
            raise QwenftError(
                f"--cutoff-len must be a positive integer, got {cutoff_len}",
                "e.g. --cutoff-len 2048",
            )
        try:
            self.tokenizer = _load_tokenizer(str(model_dir))
        except (OSError, ValueError) as exc:
            raise QwenftError(
                f"cannot load the tokenizer of {model_dir}: {exc}",
                "pass --model a preset, a downloaded hub id or a local model folder",
            ) from None
        self.data_args = DataArguments(
            template=template,
            cutoff_len=cutoff_len,
            default_system=default_system,
            enable_thinking=enable_thinking,
            train_on_prompt=train_on_prompt,
            mask_history=mask_history,
        )
        # get_template_and_fix_tokenizer mutates the shared template object: work on a copy.
        original = TEMPLATES[template]
        TEMPLATES[template] = copy.deepcopy(original)
        try:
            self.template = get_template_and_fix_tokenizer(self.tokenizer, self.data_args)
        finally:
            TEMPLATES[template] = original
        attr = DatasetAttr("file", dataset_name="qwenft")
        attr.join(dataset_entry(Path("data.jsonl"), has_tools=True))
        self.converter = SharegptDatasetConverter(attr, self.data_args)
        self.ignore_index = IGNORE_INDEX
        self.recorder = _RecordingTokenizer(self.tokenizer)
        self.cached = _CachedTokenizer(self.tokenizer)
        self.measuring = _measuring_template(self.template)
        self._record = SupervisedDatasetProcessor(
            template=self.template,
            tokenizer=self.recorder,
            processor=None,
            data_args=self.data_args,
        )
        self._encode = SupervisedDatasetProcessor(
            template=self.measuring, tokenizer=self.cached, processor=None, data_args=self.data_args
        )
        # The fast tokenizer's Rust backend, batch-encoding on all cores; encode_batch_fast
        # (tokenizers >= 0.21) skips the offsets LLaMA-Factory never uses.
        backend = getattr(self.tokenizer, "_tokenizer", None)
        self._batch = getattr(backend, "encode_batch_fast", None) or getattr(
            backend, "encode_batch", None
        )

    def _batch_encode(self, texts: list[str]) -> list[list[int]]:
        if self._batch is not None:
            return [e.ids for e in self._batch(texts, add_special_tokens=False)]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def encode(self, samples: list[dict]) -> list[tuple[int, list[int], list[int]] | None]:
        """For each sample: (untruncated length, input_ids, labels), or None if LLaMA-Factory
        would drop it."""
        aligned = []
        for s in samples:
            example = {"messages": s.get("messages"), "tools": s.get("tools")}
            a = self.converter(example)
            ok = len(a["_prompt"]) % 2 == 1 and len(a["_response"]) == 1  # as preprocess_dataset
            aligned.append(a if ok else None)
        self.recorder.seen.clear()
        for a in aligned:
            if a is not None:
                self._record._encode_data_example(
                    a["_prompt"], a["_response"], a["_system"], a["_tools"], [], [], []
                )
        texts = [t for t in self.recorder.seen if t]
        self.cached.cache = dict(zip(texts, self._batch_encode(texts), strict=True))
        out: list[tuple[int, list[int], list[int]] | None] = []
        for a in aligned:
            if a is None:
                out.append(None)
                continue
            input_ids, labels = self._encode._encode_data_example(
                a["_prompt"], a["_response"], a["_system"], a["_tools"], [], [], []
            )
            full = self.measuring.last_full + (1 if self.template.efficient_eos else 0)
            out.append((full, input_ids, labels))
        self.cached.cache = {}
        return out


def iter_token_lengths(
    path: Path,
    encoder: LlamaFactoryEncoder,
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[int, int, int, int]]:
    """(line, untruncated length, length after cutoff_len, loss tokens) for each valid sample.

    counts, if given, receives "rows" (rows read), "skipped" (rows with check errors) and
    "dropped" (rows LLaMA-Factory's processor would drop).
    """
    counts = counts if counts is not None else {}
    counts.update(rows=0, skipped=0, dropped=0)
    path, fh, mode = _open_data_file(path)
    col = _Collector()
    checker = _Checker(col)
    ignore = encoder.ignore_index

    def flush(batch: list[tuple[int, dict]]) -> Iterator[tuple[int, int, int, int]]:
        for (line, _), enc in zip(batch, encoder.encode([s for _, s in batch]), strict=True):
            if enc is None:
                counts["dropped"] += 1
                continue
            full, ids, labels = enc
            yield line, full, len(ids), len(labels) - labels.count(ignore)

    batch: list[tuple[int, dict]] = []
    with fh:
        for line, value, raw in _iter_rows(fh, mode, col):
            counts["rows"] += 1
            if value is BAD or not checker.check(value, line, raw):
                counts["skipped"] += 1
                continue
            batch.append((line, value))
            if len(batch) >= batch_size:
                yield from flush(batch)
                batch = []
        if batch:
            yield from flush(batch)


def token_stats(
    path: Path,
    model_dir: Path,
    template: str,
    cutoff_len: int,
    *,
    default_system: str | None = None,
    enable_thinking: bool | None = True,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    max_lines: int | None = 1000,
    encoder: LlamaFactoryEncoder | None = None,
) -> dict:
    """Per-sample token lengths after LLaMA-Factory's chat template, and what cutoff_len does.

    Counts equal LLaMA-Factory's supervised preprocessing for the same file, template and
    cutoff_len.
    Samples with check errors are skipped (counted in n_skipped). Lengths are untruncated; over-long
    samples are listed by line (the first max_lines of them; None: all). Pass an encoder to reuse a loaded
    tokenizer (its model, template and cutoff_len then win over the arguments).
    """
    path = Path(path)
    encoder = encoder or LlamaFactoryEncoder(
        model_dir,
        template,
        cutoff_len,
        default_system=default_system,
        enable_thinking=enable_thinking,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
    )
    lengths = array("q")
    tokens_kept = tokens_cut = loss_tokens = 0
    over_lines: list[int] = []
    n_over = 0
    counts: dict[str, int] = {}
    for line, full, kept, loss in iter_token_lengths(path, encoder, counts=counts):
        lengths.append(full)
        tokens_kept += kept
        tokens_cut += full - kept
        loss_tokens += loss
        if full > cutoff_len:
            n_over += 1
            if max_lines is None or len(over_lines) < max_lines:
                over_lines.append(line)
    n = len(lengths)
    srt = sorted(lengths)
    stats = {
        "min": int(srt[0]) if n else 0,
        "p50": _percentile(srt, 50),
        "p90": _percentile(srt, 90),
        "p99": _percentile(srt, 99),
        "max": int(srt[-1]) if n else 0,
        "mean": round(sum(srt) / n, 1) if n else 0.0,
    }
    return {
        "path": str(path),
        "model": str(model_dir),
        "template": template,
        "cutoff_len": cutoff_len,
        "n_samples": n,
        "n_skipped": counts["skipped"] + counts["dropped"],
        "length": stats,
        "n_over_cutoff": n_over,
        "over_cutoff_lines": over_lines,
        "tokens_total": int(sum(srt)),
        "tokens_after_cutoff": tokens_kept,
        "tokens_cut": tokens_cut,
        "loss_tokens": loss_tokens,
        "suggested_cutoff_len": suggest_cutoff_len(stats["p99"]) if n else None,
    }
