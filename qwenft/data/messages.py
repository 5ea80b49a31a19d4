"""The messages rules the chat kinds share: roles, keys, and the Checker of one sample's
``messages`` (and ``tools``), used by every kind's rules (qwenft.data.kinds) and so by check_file
(qwenft.data.check).

The chat shape is JSON lines (or a JSON array in a ``.json`` file) of
``{"messages": [{"role": ..., "content": ...}, ...], "tools": "<JSON list>"?}`` objects,
registered with LLaMA-Factory as ``formatting: sharegpt`` with role/content tags. Roles:
``system`` (first only), ``user``, ``assistant``, and for tool use ``function_call`` (the
assistant calls a function; content is ``{"name": ..., "arguments": {...}}`` or a list of them,
as JSON text) and ``tool`` (the function's result). A sample's ``tools`` field is the JSON text
of the list of functions offered.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qwenft.data.reader import Collector, jtype

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
REASONING_KEYS = ("reasoning_content", "reasoning")  # DeepSeek / OpenAI-compatible APIs

WEIGHT_ZERO_WHY = (
    '"weight": 0 (OpenAI\'s "do not train on this turn") cannot be honoured: LLaMA-Factory trains '
    "every assistant turn of a row; drop the weight to train on the turn, or end the row before it"
)

_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # as LLaMA-Factory's
_THOUGHT_RE = re.compile(r"<think>\n(.*?)\n</think>\n\n", re.DOTALL)

_HINT_CONVERT = "convert it with `qwenft data convert FILE -o OUT.jsonl --from auto`"


# --------------------------------------------------------------------------------------------------
# checking one sample


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


def check_surrogates(obj: Any, raw: bytes | None, line: int, col: Collector) -> None:
    """An invalid_unicode error for a lone UTF-16 surrogate escape anywhere in the row."""
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


_ROLE_HINTS = {
    "human": 'ShareGPT names: use "user" (or convert the file with --from sharegpt)',
    "gpt": 'ShareGPT names: use "assistant" (or convert the file with --from sharegpt)',
    "bot": 'use "assistant"',
    "model": 'use "assistant"',
    "observation": 'use "tool" for a function result',
    "function": 'use "tool" for a function result',
    "developer": 'use "system"',
}


def _tool_names(tools: Any, line: int, col: Collector) -> set[str] | None:
    """Validate a sample's tools field; return the function names offered (None if invalid)."""
    if not isinstance(tools, str):
        col.error(
            "bad_tools",
            line,
            "tools",
            f"tools must be a string holding a JSON list (LLaMA-Factory json-decodes it), got a "
            f"{jtype(tools)}; {_HINT_CONVERT.replace('auto', 'openai')}",
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
            f"tools must decode to a JSON list of functions, got a {jtype(decoded)}",
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


def _arguments_problem(name: str, k: int, args: Any) -> str | None:
    """Why a call's arguments are not the JSON object Qwen's tool format holds (None if they are)."""
    if isinstance(args, dict):
        return None
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except ValueError:
            shown = args if len(args) <= 40 else args[:37] + "..."
            return f"call {k + 1} ({name}): arguments {shown!r} are not valid JSON"
        return (
            f"call {k + 1} ({name}): arguments are a JSON string (holding a {jtype(decoded)}), not "
            "an object: LLaMA-Factory would train them as one quoted string, and the trained model "
            "would answer with string arguments; write the object itself (`qwenft data convert "
            "--from openai` decodes OpenAI's argument strings)"
        )
    return f"call {k + 1} ({name}): arguments must be a JSON object, got a {jtype(args) or 'null'}"


def _function_call_names(content: str) -> tuple[list[str] | None, str, str]:
    """Parse a function_call turn the way LLaMA-Factory does: (names, "", "") or
    (None, why, problem kind)."""
    match = _TOOL_CALL_RE.search(content)
    if match is not None:
        json_part = match.group(1)
    else:
        thought = _THOUGHT_RE.search(content)
        json_part = content.replace(thought.group(0), "") if thought else content
    try:
        calls = json.loads(json_part)
    except ValueError:
        return (
            None,
            'a function_call turn must hold JSON: {"name": "...", "arguments": {...}} or a list of '
            "them",
            "bad_function_call",
        )
    if not isinstance(calls, list):
        calls = [calls]
    if not calls:
        return None, "a function_call turn holds an empty list of calls", "bad_function_call"
    names = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            return (
                None,
                f"call {k + 1} is a {jtype(call)}, not an object with name and arguments",
                "bad_function_call",
            )
        name = call.get("name")
        if not isinstance(name, str) or not name:
            return None, f'call {k + 1} has no "name"', "bad_function_call"
        if "arguments" not in call:
            return (
                None,
                f'call {k + 1} ({name}) has no "arguments" (LLaMA-Factory fails on it)',
                "bad_function_call",
            )
        why = _arguments_problem(name, k, call["arguments"])
        if why:
            return None, why, "bad_arguments"
        names.append(name)
    return names, "", ""


_ROLE_CODE = {SYSTEM: "s", USER: "u", ASSISTANT: "a", FUNCTION_CALL: "f", TOOL: "t"}
_ORDER_RE = re.compile(r"s?(?:ua)+")
_CONTEXT_ORDER_RE = re.compile(r"s?(?:ua)*u")  # a preference row's context: ends with the user


def _fast_ok(msgs: Any, order: re.Pattern = _ORDER_RE) -> bool:
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
            if type(c) is not str or not c or c.isspace() or "think>" in c:
                return False
            codes.append(_ROLE_CODE[m["role"]])
    except (TypeError, KeyError):
        return False
    return order.fullmatch("".join(codes)) is not None


class Checker:
    """The messages rules of one sample. Keeps the cross-row state (types of extra keys, tools).

    context_only: the messages are a preference row's context, ending with the user turn (or a
    tool result) that the row's chosen and rejected answer. row_keys: top-level keys the caller's
    kind rules handle (no unknown-key warning). key_notes: why a key LLaMA-Factory knows is not
    read for this kind of data (its warning says so, never "not used by LLaMA-Factory").
    fields: every other top-level key is a field the rewards read (grpo's prompt data): kept,
    its type checked across rows, never warned about."""

    def __init__(
        self,
        col: Collector,
        *,
        context_only: bool = False,
        row_keys: tuple[str, ...] = (),
        key_notes: dict[str, str] | None = None,
        fields: bool = False,
    ) -> None:
        self.col = col
        self.types: dict[str, tuple[str, int]] = {}  # extra key -> (JSON type, first line)
        self.has_tools = False
        self.context_only = context_only
        self.row_keys = row_keys
        self.key_notes = key_notes or {}
        self.fields = fields
        self._order = _CONTEXT_ORDER_RE if context_only else _ORDER_RE

    def _track_type(self, key: str, value: Any, line: int, fld: str) -> None:
        t = jtype(value)
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
        if (
            type(obj) is dict
            and len(obj) == 1
            and not self.context_only
            and _fast_ok(obj.get("messages"))
        ):
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
                f"got a {jtype(obj) or 'null'}",
            )
            return False
        if "messages" not in obj:
            keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
            col.error("missing_messages", line, "messages", f'no "messages" list (keys: {keys})')
        for key, value in obj.items():
            if key in SAMPLE_KEYS or key in self.row_keys:
                continue
            if self.fields:
                self._track_type(key, value, line, key)
                continue
            note = self.key_notes.get(key)
            if note:
                msg = f'key "{key}" {note}'
            else:
                msg = f'unknown key "{key}" is not used by LLaMA-Factory'
            col.warning("unknown_key", line, key, msg)
            self._track_type(key, value, line, key)
        tool_names: set[str] | None = set()
        if "tools" in obj:
            self.has_tools = True
            if obj["tools"] is not None:
                tool_names = _tool_names(obj["tools"], line, col)
        check_surrogates(obj, raw, line, col)
        if "messages" in obj and not _fast_ok(obj["messages"], self._order):
            self._check_messages(obj["messages"], line, tool_names)
        return col.n_errors == before

    def _check_messages(self, msgs: Any, line: int, tool_names: set[str] | None) -> None:
        col = self.col
        if not isinstance(msgs, list):
            col.error(
                "messages_not_list",
                line,
                "messages",
                f"messages must be a list, got a {jtype(msgs) or 'null'}",
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
                    f"got a {jtype(m) or 'null'}",
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
                        f"content must be a string, got {jtype(content) or 'null'}{extra}",
                    )
                elif not content:
                    col.error("empty_content", line, f"{f}.content", "content is empty")
                elif content.isspace():
                    col.warning("blank_content", line, f"{f}.content", "content is only whitespace")
                else:
                    if role in (ASSISTANT, FUNCTION_CALL):
                        from qwenft.data.reasoning import thought_problem

                        problem = thought_problem(content)
                        if problem and problem[0] == "error":
                            col.error("bad_think", line, f"{f}.content", problem[1])
                        elif problem:
                            col.warning("think_form", line, f"{f}.content", problem[1])
                    if role == FUNCTION_CALL:
                        names, why, kind = _function_call_names(content)
                        if names is None:
                            col.error(kind, line, f"{f}.content", why)
                        else:
                            called.append((i, names))
            for key, value in m.items():
                if key == "weight":
                    self._check_weight(value, role, line, f"{f}.weight")
                    continue
                if key in REASONING_KEYS and m.get(key) not in (None, ""):
                    col.error(
                        "reasoning_dropped",
                        line,
                        f"{f}.{key}",
                        f'"{key}" is not read by LLaMA-Factory: the reasoning would be dropped; '
                        "convert the file (`qwenft data convert FILE -o OUT.jsonl --from openai` "
                        "puts it before the answer in the Qwen3 <think> form)",
                    )
                    continue
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

    def _check_weight(self, value: Any, role: str | None, line: int, fld: str) -> None:
        """OpenAI's per-turn weight: 1 changes nothing (LLaMA-Factory trains every assistant turn);
        0 on a trained turn cannot be honoured, so the row is refused rather than trained on it."""
        if type(value) not in (int, float) or value not in (0, 1):
            self.col.error(
                "bad_weight",
                line,
                fld,
                f"weight must be 0 or 1 (OpenAI's per-turn flag), got {json.dumps(value)}",
            )
        elif value == 0 and role in (ASSISTANT, FUNCTION_CALL):
            self.col.error("weight_zero", line, fld, WEIGHT_ZERO_WHY)

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
            elif role == TOOL and prev == ASSISTANT:
                # LLaMA-Factory accepts it (a result in a user's place) and trains the answer
                # before it as text: its glaive demo data has such rows (a call written as text).
                col.warning(
                    "tool_after_text",
                    line,
                    f,
                    "a tool result follows a text answer, not a function_call turn: "
                    "LLaMA-Factory trains that answer as plain text (any call in it is not "
                    "learned as a call) and shows the result to the model as a tool response",
                )
            elif role == TOOL and prev != FUNCTION_CALL:
                msg = f"a tool turn must answer a function_call turn, but follows {prev}"
            elif prev == FUNCTION_CALL and role != TOOL:
                msg = (
                    f"the call in messages[{j + start - 1}] is left without a reply: a "
                    f"function_call turn must be answered by a tool turn, got {role}"
                )
            elif j % 2 == 1 and role not in (ASSISTANT, FUNCTION_CALL):
                msg = f"expected assistant after {prev}, got {role} ({prev} twice in a row?)"
            elif j % 2 == 0 and role not in (USER, TOOL):
                msg = f"expected user after {prev}, got {role} ({prev} twice in a row?)"
            if msg:
                col.error("not_alternating", line, f, msg)
                return
        if self.context_only:
            if turns[-1] not in (USER, TOOL):
                col.error(
                    "bad_last_turn",
                    line,
                    f"messages[{len(roles) - 1}].role",
                    f"the context ends with a {turns[-1]} turn: "
                    + (
                        "a prompt's messages end with the user turn that the sampled completions "
                        'answer (the reference answer goes in a field, e.g. "answer")'
                        if self.fields
                        else "a preference row's messages end with the user turn that chosen and "
                        "rejected answer (the answers go in chosen and rejected, not in messages)"
                    ),
                )
            return
        if turns[-1] not in (ASSISTANT, FUNCTION_CALL):
            col.error(
                "bad_last_turn",
                line,
                f"messages[{len(roles) - 1}].role",
                f"the sample ends with a {turns[-1]} turn: the last turn must be the assistant's "
                "reply (LLaMA-Factory drops such samples); prompts for --stage grpo end so: "
                "`qwenft data check FILE --kind prompt`",
            )
