"""Converting alpaca, sharegpt and openai rows to the messages format, written atomically."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.data.check import ASSISTANT, FUNCTION_CALL, SYSTEM, TOOL, USER, Checker
from qwenft.data.reader import BAD, Collector, Problem, dump_row, iter_rows, jtype, open_data_file
from qwenft.errors import QwenftError, RowError
from qwenft.fsutil import AtomicOutput, check_out_path

CONVERT_FORMATS = ("alpaca", "sharegpt", "openai", "auto")


# --------------------------------------------------------------------------------------------------
# results


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


# --------------------------------------------------------------------------------------------------
# converters


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
                    raise RowError("bad_content", f"content part {k} has no text", fld)
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else jtype(part)
                raise RowError("bad_content", f"content part of type {kind!r} is not text", fld)
        return "".join(parts)
    raise RowError("bad_content", f"content must be a string, got {jtype(content)}", fld)


def _from_alpaca(obj: dict) -> dict:
    def s(key: str) -> str:
        v = obj.get(key)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise RowError("bad_field", f"{key} must be a string, got {jtype(v)}", key)
        return v

    messages = []
    system = s("system")
    if system:
        messages.append({"role": SYSTEM, "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RowError("bad_field", "history must be a list of [prompt, response] pairs", "history")
    for k, pair in enumerate(history):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise RowError(
                "bad_field", "each history item must be [prompt, response]", f"history[{k}]"
            )
        messages += [{"role": USER, "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
    query = "\n".join(x for x in (s("instruction"), s("input")) if x)  # as LLaMA-Factory joins them
    if not query:
        raise RowError("empty_content", "instruction and input are both empty", "instruction")
    if "output" not in obj:
        raise RowError("missing_field", 'no "output"', "output")
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
        raise RowError("missing_field", 'no "conversations" list', "conversations")
    messages = []
    for k, turn in enumerate(conv):
        f = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise RowError("bad_message", "each turn must be an object with from and value", f)
        who = turn.get("from")
        role = _SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise RowError(
                "bad_role",
                f"from {json.dumps(who)} is not one of {', '.join(_SHAREGPT_ROLES)}",
                f + ".from",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise RowError(
                "bad_content",
                f"value must be a string, got {jtype(value) or 'null'}",
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
        raise RowError("missing_field", 'no "messages" list', "messages")
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
            raise RowError("bad_message", "each message must be an object", f)
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
                raise RowError("bad_function_call", "tool_calls must be a list", f + ".tool_calls")
            parsed = []
            for c, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RowError(
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
            raise RowError(
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
    src_path, fh, mode = open_data_file(src)
    out_path = check_out_path(out, force, src_path)
    col = Collector()
    n_in = n_out = 0
    created_dir = None
    if not out_path.parent.exists():
        created_dir = out_path.parent
        out_path.parent.mkdir(parents=True)
    tmp = AtomicOutput(out_path)
    detected = fmt if fmt != "auto" else None
    try:
        with fh:
            for line, value, _raw in iter_rows(fh, mode, col):
                n_in += 1
                if value is BAD:
                    continue
                if detected is None:
                    detected = detect_format(value)
                    if detected is None:
                        keys = (
                            ", ".join(sorted(map(str, value))[:6])
                            if isinstance(value, dict)
                            else jtype(value)
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
                        f"expected a JSON object, got a {jtype(value) or 'null'}",
                    )
                    continue
                try:
                    row = _CONVERTERS[detected](value)
                except RowError as exc:
                    col.error(exc.kind, line, exc.field, exc.message)
                    continue
                scratch = Collector()
                dumped = dump_row(row)
                if not Checker(scratch).check(row, line, dumped):
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
