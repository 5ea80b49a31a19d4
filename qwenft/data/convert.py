"""Converting rows to qwenft's shapes (qwenft.data.kinds), written atomically.

Sources: alpaca (plain, ranking with chosen/rejected, KTO with kto_tag), sharegpt (the same three),
OpenAI chat (messages; with chosen/rejected or label too), LLaMA-Factory's content-part messages
({"type": "text" | "reasoning" | "tool_call", "value": ...} parts) and its chosen_messages /
rejected_messages pairs, TRL / UltraFeedback (prompt with chosen/rejected as strings or message
lists, or prompt/completion/label) and text corpora ({"text"} rows, or a .txt file: one document
per line as LLaMA-Factory reads it, or per blank-line-separated block when asked for). What changes training is never dropped: a KTO label is kept, a
turn with weight 0, a video or an audio refuses the row with the reason, and {{name}} placeholders
can be filled (fill=) or are reported.

Images are carried into qwenft's image rows (qwenft.data.images): OpenAI image_url parts (and the
Responses API's input_image, Qwen's image parts) become an <image> where they stand plus an entry
of the row's images, an images list (LLaMA-Factory's mllm_demo shape, in any source format) is
kept; data: URLs are written out as files beside the output (ImageFiles), file:// URLs become
paths, remote URLs refuse the row.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.choices import ConvertFormat
from qwenft.data.check import ASSISTANT, FUNCTION_CALL, SYSTEM, TOOL, USER, WEIGHT_ZERO_WHY
from qwenft.data.images import (
    IMAGE_PLACEHOLDER,
    IMAGES,
    KIND_WHY,
    REFUSED_MEDIA,
    REMOTE_WHY,
    rebase_path,
    reference_problem,
)
from qwenft.data.kinds import PT, RowRules, has_content_parts
from qwenft.data.reader import (
    BAD,
    TEXT_DOCS,
    TEXT_MODES,
    Collector,
    Problem,
    dump_row,
    iter_rows,
    jtype,
    open_data_file,
)
from qwenft.errors import QwenftError, RowError
from qwenft.fsutil import AtomicOutput, check_out_path, umask_mode

# ultrafeedback is trl under the name its users know (prompt, chosen and rejected message lists).
CONVERT_FORMATS = ConvertFormat.values()
_PLACEHOLDER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    problems: list[Problem]  # errors: rows not converted; warnings: rows written with a remark
    written: bool  # False: some rows could not be converted and skip_invalid was off
    kind: str = "sft"  # the data kind written (qwenft.choices.DataKind value)
    n_errors: int = 0  # rows not converted (problems keeps the first few of each kind)
    reading: str | None = None  # a .txt source: "lines" (LLaMA-Factory's) or "blocks"
    n_images: int = 0  # images in the rows written
    images_written: int = 0  # of them, data URLs written out as files (in images_dir)
    images_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.written

    def to_dict(self) -> dict:
        return {
            "src": str(self.src),
            "out": str(self.out),
            "format": self.format,
            "kind": self.kind,
            "reading": self.reading,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "written": self.written,
            "n_images": self.n_images,
            "images_written": self.images_written,
            "images_dir": str(self.images_dir) if self.images_dir else None,
            "problems": [p.to_dict() for p in self.problems],
        }


# --------------------------------------------------------------------------------------------------
# images: where a converted row's images are

_IMAGE_EXT = {
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}


class ImageFiles:
    """The images of converted rows as qwenft's image rows hold them: paths relative to the
    output's folder (or absolute). A path stays as written when the source is in the same folder,
    else becomes absolute; a file:// URL becomes its path; a data: URL is decoded and written as
    ``<output stem>_images/<row>-<k>.<ext>`` (atomically; an existing file with other bytes is
    never replaced: the row is refused); an http(s) URL refuses the row. discard() removes what was
    written (a refused row's files with drop())."""

    def __init__(self, src_dir: Path, out_path: Path) -> None:
        self.src_dir = Path(os.path.abspath(src_dir))
        self.out_dir = Path(os.path.abspath(out_path.parent))
        self.folder = self.out_dir / f"{out_path.stem}_images"
        self.created_folder = False
        self.created: dict[int, list[Path]] = {}  # row -> files written for it
        self.written = 0
        self.decoded: dict[int, int] = {}  # row -> its data URLs (written, or there already)

    def place(self, refs: list, row: int) -> list:
        """The output's images for a row's refs (row: its 1-based number in the source)."""
        out = []
        for k, ref in enumerate(refs):
            fld = f"{IMAGES}[{k}]"
            if not isinstance(ref, str):
                out.append(ref)  # the check says what is wrong with it
                continue
            problem = reference_problem(ref)
            if problem is not None and problem.kind == "remote_image":
                raise RowError(problem.kind, problem.message, fld)
            if ref.lower().startswith("data:"):
                out.append(self._write(ref, row, k, fld))
                continue
            if ref.lower().startswith("file:"):
                ref = str(_file_url_path(ref, fld))
            out.append(rebase_path(ref, self.src_dir, self.out_dir))
        return out

    def _write(self, url: str, row: int, k: int, fld: str) -> str:
        header, sep, payload = url.partition(",")
        params = header[len("data:") :].split(";")
        mime = params[0].strip().lower()
        if not sep or not mime.startswith("image/"):
            raise RowError(
                "image_url",
                f"a data URL of {mime or 'no type'}, not an image (data:image/...)",
                fld,
            )
        try:
            if "base64" in (p.strip().lower() for p in params[1:]):
                data = base64.b64decode("".join(payload.split()), validate=True)
            else:
                data = urllib.parse.unquote_to_bytes(payload)
        except ValueError as exc:
            raise RowError(
                "image_url", f"the image's data URL does not decode: {exc}", fld
            ) from None
        if not data:
            raise RowError("image_url", "the image's data URL is empty", fld)
        ext = _IMAGE_EXT.get(mime) or re.sub(r"[^a-z0-9]", "", mime.split("/", 1)[1])[:8] or "img"
        target = self.folder / f"{row}-{k}.{ext}"
        rel = f"{self.folder.name}/{target.name}"
        self.decoded[row] = self.decoded.get(row, 0) + 1
        if target.exists() or target.is_symlink():
            if target.is_file() and target.read_bytes() == data:
                return rel  # written by an earlier conversion: the same image
            raise RowError(
                "image_exists",
                f"{target} already exists with other content: an image is never overwritten; "
                f"remove {self.folder} (or write to another -o) and convert again",
                fld,
            )
        if not self.folder.is_dir():
            self.folder.mkdir()
            self.created_folder = True
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, umask_mode(0o666))
            try:
                os.link(tmp, target)  # never replaces a file that appeared meanwhile
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if target.exists():
                    raise FileExistsError(target) from None
                os.replace(tmp, target)
        except FileExistsError:
            raise RowError(
                "image_exists", f"{target} appeared while converting: not overwritten", fld
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.created.setdefault(row, []).append(target)
        self.written += 1
        return rel

    def drop(self, row: int) -> None:
        """Remove the files written for a row that is not written after all."""
        self.decoded.pop(row, None)
        for path in self.created.pop(row, []):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                self.written -= 1

    def discard(self) -> None:
        """Remove every file written (nothing was written after all)."""
        for row in list(self.created):
            self.drop(row)
        self.decoded.clear()
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def _file_url_path(url: str, fld: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise RowError(
            "remote_image",
            f"{url[:60]} is a file on another host ({parsed.netloc}): {REMOTE_WHY}",
            fld,
        )
    return Path(urllib.request.url2pathname(parsed.path))


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


_IMAGE_PARTS = ("image_url", "input_image", "image")  # OpenAI's (chat, Responses), Qwen's
_MEDIA_PARTS = ("input_audio", "audio", "audio_url", "video", "video_url", "file")
_MULTIMODAL_PARTS = (*_IMAGE_PARTS, *_MEDIA_PARTS)
_MULTIMODAL_WHY = (
    "not supported yet: qwenft trains text and images only, and would not show the model these "
    "files; keep such rows out (--skip-invalid writes the others)"
)


def _image_ref(part: dict, k: int, fld: str) -> str:
    """The image of an image content part: OpenAI's {"type": "image_url", "image_url": {"url"}}
    (or the URL alone), the Responses API's {"type": "input_image", "image_url": URL}, Qwen's
    {"type": "image", "image": path or URL}; a data:, file:// or http(s) URL or a path."""
    value = part.get(part["type"]) if part["type"] != "input_image" else part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value.strip():
        raise RowError(
            "bad_content",
            f"content part {k} ({part['type']}) has no image URL or path"
            + (" (an uploaded file_id cannot be read)" if "file_id" in part else ""),
            fld,
        )
    return value


def _text(content: Any, fld: str, images: list[str] | None = None, role: str = "") -> str:
    """An OpenAI content value (string, None or a list of parts) as plain text. With images (a
    user or tool turn), each image part becomes an <image> where it stands and its URL or path is
    appended to images; elsewhere an image part refuses the row."""
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
            elif isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                if images is None and role in ("user", "tool", ""):
                    raise RowError(
                        "multimodal",
                        f"content part {k} is an image: images are carried in chat (sft) rows "
                        "only; multimodal preference and KTO data are not supported",
                        fld,
                    )
                if images is None:
                    raise RowError(
                        "image_placeholder_role",
                        f"content part {k} is an image in a {role} turn: images go in user "
                        "turns (LLaMA-Factory would train an answer's image tokens as text, and "
                        "leaves a system prompt's image out)",
                        fld,
                    )
                images.append(_image_ref(part, k, fld))
                parts.append(IMAGE_PLACEHOLDER)
            else:
                kind = part.get("type") if isinstance(part, dict) else jtype(part)
                if kind in _MEDIA_PARTS:
                    raise RowError(
                        "multimodal", f"content part {k} is {kind}: {_MULTIMODAL_WHY}", fld
                    )
                raise RowError("bad_content", f"content part of type {kind!r} is not text", fld)
        return "".join(parts)
    raise RowError("bad_content", f"content must be a string, got {jtype(content)}", fld)


def _refuse_multimodal(obj: dict) -> None:
    """Videos and audios refuse the row (images are carried: _row_images)."""
    for key in REFUSED_MEDIA:
        if obj.get(key) not in (None, "", []):
            raise RowError("multimodal", f'"{key}": {_MULTIMODAL_WHY}', key)


def _row_images(obj: dict, found: list[str] | None = None) -> list | None:
    """The row's images: its images list (LLaMA-Factory's mllm_demo shape, in any source format)
    or those of its image content parts (found); both at once is ambiguous and refused."""
    listed = obj.get(IMAGES)
    if listed in (None, "", []):
        return found or None
    if found:
        raise RowError(
            "image_count",
            "the row has image content parts and an images list: which image goes where is "
            "ambiguous; give the images one way",
            IMAGES,
        )
    return [listed] if isinstance(listed, str) else listed


def _weight(turn: dict, role: str, fld: str) -> None:
    """OpenAI's per-turn weight: 1 (or absent, or null) changes nothing and is dropped; 0 on a
    trained turn cannot be honoured (LLaMA-Factory trains every assistant turn): the row is refused."""
    if "weight" not in turn or turn["weight"] is None:
        return
    value = turn["weight"]
    if type(value) not in (int, float) or value not in (0, 1):
        raise RowError("bad_weight", f"weight must be 0 or 1, got {json.dumps(value)}", fld)
    if value == 0 and role in (ASSISTANT, FUNCTION_CALL):
        raise RowError("weight_zero", WEIGHT_ZERO_WHY, fld)


def _label(obj: dict) -> bool | None:
    """The KTO label (label, or LLaMA-Factory's kto_tag), None when the row has none."""
    key = "label" if "label" in obj else "kto_tag" if "kto_tag" in obj else None
    if key is None:
        return None
    value = obj[key]
    if type(value) is not bool:
        raise RowError(
            "bad_label",
            f"{key} must be true or false (a JSON boolean), got {jtype(value) or 'null'} "
            f"{value!r}; it is not guessed",
            key,
        )
    return value


def _str_field(obj: dict, key: str) -> str:
    v = obj.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise RowError("bad_field", f"{key} must be a string, got {jtype(v)}", key)
    return v


def _turns(value: Any, fld: str, default_role: str) -> list[dict]:
    """A prompt, completion or preference side in any of the common forms, as messages: a string
    (one turn of default_role), one message (role/content or from/value), or a list of them."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(
            "bad_field", f"{fld} must be a string or messages, got {jtype(value) or 'null'}", fld
        )
    if all(isinstance(t, dict) and "from" in t for t in value):
        return _sharegpt_turns(value, fld)
    return _openai_turns(value, fld)


def _with_tools(out: dict, obj: dict) -> dict:
    tools = _tools_text(obj.get("tools") if obj.get("tools") is not None else obj.get("functions"))
    if tools is not None:
        out["tools"] = tools
    return out


def _pair(context: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    """A preference row: the shared context, then chosen's and rejected's last (assistant) turn.

    chosen and rejected may repeat the context (UltraFeedback: [user, assistant] each): what comes
    before their last turns must then be the same in both, and agree with the context."""
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise RowError("empty_side", f"{side} is empty", side)
        if turns[-1]["role"] not in (ASSISTANT, FUNCTION_CALL):
            raise RowError(
                "bad_side", f"{side} must end with an assistant turn, got {turns[-1]['role']}", side
            )
    prefix = chosen[:-1]
    if prefix != rejected[:-1]:
        raise RowError(
            "prefix_mismatch",
            "chosen and rejected differ before their last turn: a pair answers one conversation",
            "rejected",
        )
    if prefix:
        if prefix[: len(context)] != context:
            raise RowError(
                "prefix_mismatch",
                "the prompt is not the conversation chosen and rejected start with",
                "prompt",
            )
        context = prefix
    return {"messages": context, "chosen": chosen[-1], "rejected": rejected[-1]}


def _finish(
    context: list[dict], obj: dict, answer: list[dict] | None, images: list[str] | None = None
) -> dict:
    """The row of the kind obj's keys ask for: a pair (chosen/rejected), KTO (label or kto_tag)
    or SFT; context is the conversation before the answer; the row's images (_row_images) kept
    (the check refuses them outside sft rows, saying why)."""
    refs = _row_images(obj, images)
    row = _finish_kind(context, obj, answer)
    if refs:
        row[IMAGES] = refs
    return row


def _finish_kind(context: list[dict], obj: dict, answer: list[dict] | None) -> dict:
    if "chosen" in obj or "rejected" in obj:
        if answer:
            raise RowError(
                "bad_field",
                "a row with chosen/rejected has no single answer besides them",
                "output",
            )
        sides = {}
        for side in ("chosen", "rejected"):
            if obj.get(side) is None:
                raise RowError("missing_side", f'no "{side}"', side)
            sides[side] = _turns(obj[side], side, ASSISTANT)
        return _with_tools(_pair(context, sides["chosen"], sides["rejected"]), obj)
    label = _label(obj)
    out: dict[str, Any] = {"messages": context + (answer or [])}
    if label is not None:
        out["label"] = label
    return _with_tools(out, obj)


def _from_alpaca(obj: dict) -> dict:
    _refuse_multimodal(obj)
    messages = []
    system = _str_field(obj, "system")
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
    # as LLaMA-Factory joins them
    query = "\n".join(x for x in (_str_field(obj, "instruction"), _str_field(obj, "input")) if x)
    if not query:
        raise RowError("empty_content", "instruction and input are both empty", "instruction")
    messages.append({"role": USER, "content": query})
    if "chosen" in obj or "rejected" in obj:
        return _finish(messages, obj, None)
    if "output" not in obj:
        raise RowError("missing_field", 'no "output"', "output")
    return _finish(messages, obj, [{"role": ASSISTANT, "content": _str_field(obj, "output")}])


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


def _sharegpt_turns(conv: list, fld: str) -> list[dict]:
    messages = []
    for k, turn in enumerate(conv):
        f = f"{fld}[{k}]"
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
        _weight(turn, role, f + ".weight")
        messages.append({"role": role, "content": value})
    return messages


def _from_sharegpt(obj: dict) -> dict:
    _refuse_multimodal(obj)
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        raise RowError("missing_field", 'no "conversations" list', "conversations")
    messages = _sharegpt_turns(conv, "conversations")
    system = obj.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == SYSTEM):
        messages.insert(0, {"role": SYSTEM, "content": system})
    return _finish(messages, obj, None)


TOOL_RESULT_SEP = "\n</tool_response>\n<tool_response>\n"  # LLaMA-Factory's, parallel results


def _offered_tools(obj: dict) -> set[str] | None:
    """The function names a row offers (None when it offers no usable list: not checked here)."""
    tools = obj.get("tools") if obj.get("tools") is not None else obj.get("functions")
    tools = _maybe_json(tools)
    if not isinstance(tools, list) or not tools:
        return None
    names = set()
    for tool in tools:
        fn = (
            tool.get("function")
            if isinstance(tool, dict) and tool.get("type") == "function"
            else tool
        )
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def _call_arguments(fn: dict, name: str, fld: str) -> dict:
    """A call's arguments as the JSON object Qwen's tool format holds (OpenAI sends a JSON string)."""
    args = fn.get("arguments", {})
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            shown = args if len(args) <= 40 else args[:37] + "..."
            raise RowError(
                "bad_arguments", f"arguments of {name} are not valid JSON: {shown!r}", fld
            ) from None
    if not isinstance(args, dict):
        raise RowError(
            "bad_arguments",
            f"arguments of {name} must be a JSON object, got a {jtype(args) or 'null'}",
            fld,
        )
    return args


def _call_message(calls: list[dict], text: str, reasoning: str | None) -> dict:
    """The function_call turn of an assistant turn's calls ({"name", "arguments"}; a list for
    parallel calls), after its text and its reasoning."""
    from qwenft.data.reasoning import with_reasoning

    body = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    if text.strip():  # LLaMA-Factory keeps the text before a <tool_call> block
        body = f"{text.rstrip()}\n<tool_call>{body}</tool_call>"
    if reasoning is not None:
        body = with_reasoning(reasoning, body)
    return {"role": FUNCTION_CALL, "content": body}


def _reasoning(m: dict, fld: str) -> str | None:
    """The reasoning of an assistant turn (reasoning_content, as DeepSeek's and OpenAI-compatible
    APIs name it, or reasoning), None when it has none."""
    for key in ("reasoning_content", "reasoning"):
        value = m.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise RowError(
                "bad_reasoning", f"{key} must be a string, got {jtype(value)}", f"{fld}.{key}"
            )
        return value if value.strip() else None
    return None


def _openai_turns(
    msgs: list, fld: str, tool_names: set[str] | None = None, images: list[str] | None = None
) -> list[dict]:
    """OpenAI chat messages as qwenft's: tool_calls become a function_call turn, the tool
    replies that answer them one tool turn (in the calls' order, matched by tool_call_id, else by
    order), reasoning_content the Qwen3 <think> form before the answer. images: where the image
    parts of user and tool turns go (an <image> stands in each one's place); None: image parts
    refuse the row."""
    from qwenft.data.reasoning import with_reasoning

    messages: list[dict] = []
    # the last assistant turn's calls, waiting for replies: [call id or None, name, reply or None]
    pending: list[list] = []
    pending_at = ""

    def flush_tools() -> None:
        nonlocal pending
        if not pending:
            return
        missing = [
            f"{name}" + (f" (id {cid})" if cid else "")
            for cid, name, reply in pending
            if reply is None
        ]
        if missing:
            raise RowError(
                "unanswered_call",
                f"the call to {', '.join(missing)} is left without a tool reply: each call needs "
                'a role "tool" message (with its tool_call_id) before the conversation goes on',
                pending_at,
            )
        messages.append({"role": TOOL, "content": TOOL_RESULT_SEP.join(r for _, _, r in pending)})
        pending = []

    for k, m in enumerate(msgs):
        f = f"{fld}[{k}]"
        if not isinstance(m, dict):
            raise RowError("bad_message", "each message must be an object", f)
        role = m.get("role")
        if role in ("tool", "function"):
            text = _text(m.get("content"), f + ".content", images, "tool")
            cid = m.get("tool_call_id")
            if not pending:
                raise RowError(
                    "tool_without_call",
                    "a tool reply with no tool call before it"
                    + (f" (tool_call_id {cid!r})" if cid is not None else ""),
                    f,
                )
            if cid is not None:
                slot = next((p for p in pending if p[0] == cid), None)
                if slot is None:
                    known = ", ".join(repr(p[0]) for p in pending if p[0] is not None) or "none"
                    raise RowError(
                        "unknown_tool_call_id",
                        f"tool_call_id {cid!r} answers no call of the assistant turn before it "
                        f"(its call ids: {known})",
                        f + ".tool_call_id",
                    )
            else:  # no id: the first call still waiting, as LLaMA-Factory pairs them by order
                slot = next((p for p in pending if p[2] is None), None)
                if slot is None:
                    raise RowError(
                        "tool_without_call", "more tool replies than calls before them", f
                    )
            if slot[2] is not None:
                raise RowError(
                    "duplicate_tool_reply",
                    f"call {slot[1]}"
                    + (f" (id {slot[0]!r})" if slot[0] else "")
                    + " is answered twice",
                    f,
                )
            slot[2] = text
            continue
        flush_tools()
        text = _text(m.get("content"), f + ".content", images if role == "user" else None, role)
        if role in ("system", "developer"):
            messages.append({"role": SYSTEM, "content": text})
        elif role == "user":
            messages.append({"role": USER, "content": text})
        elif role in ("assistant", "function_call"):
            calls = m.get("tool_calls") or (
                [{"function": m["function_call"]}] if m.get("function_call") else []
            )
            _weight(m, ASSISTANT, f + ".weight")
            reasoning = _reasoning(m, f)
            if reasoning is not None and "<think>" in text:
                raise RowError(
                    "bad_reasoning",
                    "the turn has reasoning_content and a <think> block in its content: one "
                    "thought per answer",
                    f,
                )
            if not calls:
                body = with_reasoning(reasoning, text) if reasoning is not None else text
                messages.append({"role": role, "content": body})
                continue
            if not isinstance(calls, list):
                raise RowError("bad_function_call", "tool_calls must be a list", f + ".tool_calls")
            parsed, ids = [], set()
            for c, call in enumerate(calls):
                cf = f"{f}.tool_calls[{c}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RowError("bad_function_call", "tool call without a function name", cf)
                name = fn["name"]
                if tool_names is not None and name not in tool_names:
                    raise RowError(
                        "unknown_function",
                        f"calls {name}, which is not in the row's tools "
                        f"({', '.join(sorted(tool_names))})",
                        cf + ".function.name",
                    )
                cid = call.get("id")
                if cid is not None:
                    if cid in ids:
                        raise RowError("duplicate_call_id", f"call id {cid!r} is used twice", cf)
                    ids.add(cid)
                args = _call_arguments(fn, name, cf + ".function.arguments")
                parsed.append({"name": name, "arguments": args})
                pending.append([cid, name, None])
            pending_at = f + ".tool_calls"
            messages.append(_call_message(parsed, text, reasoning))
        else:
            raise RowError(
                "bad_role",
                f"role {json.dumps(role)} is not one of system, user, assistant, tool",
                f + ".role",
            )
    if pending and all(p[2] is None for p in pending):
        pending = []  # the row ends with the calls: it trains the model to make them
    flush_tools()
    return messages


def _from_openai(obj: dict) -> dict:
    _refuse_multimodal(obj)
    if "chosen_messages" in obj or "rejected_messages" in obj:
        return _from_lf_pair(obj)
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        raise RowError("missing_field", 'no "messages" list', "messages")
    images: list[str] = []
    if has_content_parts(msgs):
        _refuse_extra_info(obj)
        messages = _part_turns(msgs, "messages", _offered_tools(obj))
    else:
        messages = _openai_turns(msgs, "messages", _offered_tools(obj), images)
    system = obj.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == SYSTEM):
        messages.insert(0, {"role": SYSTEM, "content": system})  # a top-level system prompt
    return _finish(messages, obj, None, images)


# LLaMA-Factory's content-part messages (its v1 data: reason_tool_use_demo_50.jsonl, and the
# chosen_messages / rejected_messages pairs of v1_dpo_demo.jsonl): {"role": system | user |
# assistant | tool, "content": [{"type": ..., "value": ...}, ...], "loss_weight": ...}.
_PART_TYPES = {  # the part types each role may hold, as LLaMA-Factory's renderer reads them
    "system": ("text",),
    "user": ("text",),
    "tool": ("text",),
    "assistant": ("text", "reasoning", "tool_call"),
}


def _refuse_extra_info(obj: dict) -> None:
    if obj.get("extra_info") not in (None, "", {}, []):
        raise RowError(
            "extra_info",
            "extra_info (LLaMA-Factory's per-sample extra information, such as KTO labels) "
            'cannot be carried into qwenft\'s shapes: give a KTO label as "label", and remove '
            "the key",
            "extra_info",
        )


def _loss_weight(m: dict, role: str, fld: str) -> None:
    """A message's loss_weight: LLaMA-Factory 0.9.5 trains every answer and no other turn, so
    only those weights (1 on an assistant turn, 0 elsewhere) can be carried; others refuse."""
    value = m.get("loss_weight")
    if value is None:
        return
    if type(value) not in (int, float):
        raise RowError("bad_weight", f"loss_weight must be a number, got {jtype(value)}", fld)
    if role == ASSISTANT:
        if value == 0:
            raise RowError("weight_zero", WEIGHT_ZERO_WHY, fld)
        if value != 1:
            raise RowError(
                "bad_weight",
                f"loss_weight {value} on an assistant turn cannot be carried: LLaMA-Factory "
                "0.9.5 trains every answer with weight 1",
                fld,
            )
    elif value != 0:
        raise RowError(
            "bad_weight",
            f"loss_weight {value} on a {role} turn cannot be carried: LLaMA-Factory 0.9.5 "
            "trains the answers (assistant turns) only, never the prompt's turns",
            fld,
        )


def _parts(m: dict, role: str, fld: str) -> tuple[str, str, list[dict]]:
    """(text, reasoning, tool calls) of one content-part message, each kind of part joined as
    LLaMA-Factory's renderer joins them; a part qwenft cannot carry refuses the row, named."""
    content = m.get("content")
    if content is None:
        content = []
    elif isinstance(content, str):
        content = [{"type": "text", "value": content}]
    elif not isinstance(content, list):
        raise RowError("bad_content", f"content must be a list of parts, got {jtype(content)}", fld)
    text, reasoning, calls = [], [], []
    for k, part in enumerate(content):
        pf = f"{fld}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else jtype(part)
        if kind in _MULTIMODAL_PARTS:
            why = _MULTIMODAL_WHY
            if kind in _IMAGE_PARTS:
                why = (
                    "qwenft reads images from OpenAI image_url parts or an images list, not from "
                    "this content-part shape"
                )
            raise RowError("multimodal", f"content part {k} is {kind}: {why}", pf)
        if kind not in ("text", "reasoning", "tool_call"):
            raise RowError(
                "bad_content",
                f"content part {k} is of type {kind!r}, which qwenft cannot carry (it carries "
                "text, reasoning and tool_call parts)",
                pf,
            )
        if kind not in _PART_TYPES[role]:
            raise RowError(
                "bad_content",
                f"content part {k} is {kind} in a {role} turn: only an assistant turn holds "
                "reasoning and tool calls",
                pf,
            )
        value = part.get("value")
        if kind == "tool_call" and isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False)
        if not isinstance(value, str):
            raise RowError(
                "bad_content",
                f"content part {k} ({kind}) has no string value (got {jtype(value) or 'null'})",
                pf + ".value",
            )
        if kind == "text":
            text.append(value)
        elif kind == "reasoning":
            reasoning.append(value)
        else:
            try:
                call = json.loads(value)
            except ValueError:
                shown = value if len(value) <= 40 else value[:37] + "..."
                raise RowError(
                    "bad_function_call",
                    f"content part {k} (tool_call) is not valid JSON: {shown!r}",
                    pf + ".value",
                ) from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise RowError(
                    "bad_function_call",
                    f'content part {k} (tool_call) must be {{"name": ..., "arguments": {{...}}}}',
                    pf + ".value",
                )
            calls.append((k, call))
    parsed = [
        {
            "name": call["name"],
            "arguments": _call_arguments(call, call["name"], f"{fld}[{k}].value.arguments"),
        }
        for k, call in calls
    ]
    return "".join(text), "".join(reasoning), parsed


def _part_turns(msgs: list, fld: str, tool_names: set[str] | None = None) -> list[dict]:
    """LLaMA-Factory's content-part messages as qwenft's: an assistant turn's reasoning parts the
    Qwen3 <think> block before its answer (as reasoning_content is converted), its tool_call parts
    a function_call turn (content {"name", "arguments"} JSON, a list for parallel calls), the
    tool messages that follow one tool turn (each its own <tool_response>, as LLaMA-Factory
    renders consecutive tool messages)."""
    from qwenft.data.reasoning import with_reasoning

    messages: list[dict] = []
    last_tool = False
    for k, m in enumerate(msgs):
        f = f"{fld}[{k}]"
        if not isinstance(m, dict):
            raise RowError("bad_message", "each message must be an object", f)
        role = m.get("role")
        if role not in _PART_TYPES:
            raise RowError(
                "bad_role",
                f"role {json.dumps(role)} is not one of system, user, assistant, tool",
                f + ".role",
            )
        _loss_weight(m, role, f + ".loss_weight")
        text, reasoning, calls = _parts(m, role, f + ".content")
        if role == "tool":
            if last_tool:
                messages[-1]["content"] += TOOL_RESULT_SEP + text
            else:
                messages.append({"role": TOOL, "content": text})
            last_tool = True
            continue
        last_tool = False
        if role != ASSISTANT:
            messages.append({"role": role, "content": text})
            continue
        thought = reasoning if reasoning.strip() else None
        if thought is not None and "<think>" in text:
            raise RowError(
                "bad_reasoning",
                "the turn has a reasoning part and a <think> block in its text: one thought per "
                "answer",
                f + ".content",
            )
        if not calls:
            body = with_reasoning(thought, text) if thought is not None else text
            messages.append({"role": ASSISTANT, "content": body})
            continue
        for c, call in enumerate(calls):
            if tool_names is not None and call["name"] not in tool_names:
                raise RowError(
                    "unknown_function",
                    f"calls {call['name']}, which is not in the row's tools "
                    f"({', '.join(sorted(tool_names))})",
                    f"{f}.content (tool call {c})",
                )
        messages.append(_call_message(calls, text, thought))
    return messages


def _from_lf_pair(obj: dict) -> dict:
    """LLaMA-Factory's chosen_messages / rejected_messages pair (two whole conversations) as
    qwenft's preference row: the prompt they share, then each one's last (assistant) turn."""
    _refuse_extra_info(obj)
    _refuse_images(obj, "preference")
    tool_names = _offered_tools(obj)
    sides = {}
    for key in ("chosen_messages", "rejected_messages"):
        msgs = obj.get(key)
        if msgs is None:
            raise RowError("missing_side", f'no "{key}": a pair needs both conversations', key)
        if not isinstance(msgs, list) or not msgs:
            raise RowError(
                "empty_side" if msgs == [] else "bad_side",
                f"{key} must be a non-empty list of messages",
                key,
            )
        turns = (
            _part_turns(msgs, key, tool_names)
            if has_content_parts(msgs)
            else _openai_turns(msgs, key, tool_names)
        )
        if turns[-1]["role"] not in (ASSISTANT, FUNCTION_CALL):
            raise RowError(
                "bad_side",
                f"{key} must end with an assistant turn (the answer), got {turns[-1]['role']}",
                key,
            )
        sides[key] = turns
    chosen, rejected = sides["chosen_messages"], sides["rejected_messages"]
    prompt = chosen[:-1]
    if prompt != rejected[:-1]:
        n = min(len(chosen), len(rejected)) - 1
        k = next((k for k in range(n) if chosen[k] != rejected[k]), n)
        if k < n:
            why = f"message {k} ({chosen[k]['role']}) differs"
        else:
            longer = "chosen" if len(chosen) > len(rejected) else "rejected"
            why = f"{longer}_messages has more turns before its answer"
        raise RowError(
            "prefix_mismatch",
            f"chosen_messages and rejected_messages do not share the prompt: {why}; a pair is "
            "two answers to one prompt, so everything before their last (assistant) turn must "
            "be the same in both",
            f"rejected_messages[{k}]",
        )
    row = {"messages": prompt, "chosen": chosen[-1], "rejected": rejected[-1]}
    return _with_tools(row, obj)


def _from_trl(obj: dict) -> dict:
    """TRL's preference (prompt?, chosen, rejected), prompt-completion and KTO (prompt,
    completion, label) rows, as strings or message lists; UltraFeedback binarized is the
    preference one with chosen and rejected repeating the prompt."""
    _refuse_multimodal(obj)
    prompt = obj.get("prompt")
    context = [] if prompt is None else _turns(prompt, "prompt", USER)
    if "chosen" in obj or "rejected" in obj:
        return _finish(context, obj, None)
    if "completion" not in obj:
        raise RowError("missing_field", 'no "chosen"/"rejected" and no "completion"', "completion")
    return _finish(context, obj, _turns(obj["completion"], "completion", ASSISTANT))


def _refuse_images(obj: dict, kind: str) -> None:
    """Images in a row whose kind does not carry them refuse it (never dropped in silence)."""
    if obj.get(IMAGES) not in (None, "", []):
        raise RowError("multimodal", KIND_WHY.format(kind=kind), IMAGES)


def _from_text(obj: dict) -> dict:
    _refuse_multimodal(obj)
    _refuse_images(obj, PT)
    text = obj.get("text")
    if not isinstance(text, str):
        raise RowError("bad_text", f"text must be a string, got {jtype(text) or 'null'}", "text")
    return {"text": text}


_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "openai": _from_openai,
    "trl": _from_trl,
    "ultrafeedback": _from_trl,
    "text": _from_text,
}


def detect_format(obj: Any) -> str | None:
    """alpaca | sharegpt | openai | trl | text for one sample, or None."""
    if not isinstance(obj, dict):
        return None
    if "conversations" in obj:
        return "sharegpt"
    if "messages" in obj or "chosen_messages" in obj or "rejected_messages" in obj:
        return "openai"  # LLaMA-Factory's content-part messages and pairs are read there too
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "prompt" in obj or "chosen" in obj or "rejected" in obj or "completion" in obj:
        return "trl"
    if "text" in obj:
        return "text"
    return None


def parse_fill(items: list[str] | None) -> dict[str, str]:
    """--fill NAME=VALUE options as a mapping; QwenftError for a malformed one."""
    fill: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip().strip("{}")
        if not sep or not _PLACEHOLDER_NAME_RE.fullmatch(name):
            raise QwenftError(
                f"--fill {item!r}: expected NAME=VALUE", "e.g. --fill name=MyBot --fill author=Me"
            )
        fill[name] = value
    return fill


def _fill(value: Any, marks: dict[str, str]) -> Any:
    """Every {{name}} placeholder in the strings of value replaced by its fill."""
    if isinstance(value, str):
        if "{{" in value:
            for mark, text in marks.items():
                value = value.replace(mark, text)
        return value
    if isinstance(value, list):
        return [_fill(v, marks) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, marks) for k, v in value.items()}
    return value


def convert_file(
    src: Path,
    out: Path,
    fmt: str = "auto",
    *,
    force: bool = False,
    skip_invalid: bool = False,
    fill: dict[str, str] | None = None,
    text_docs: str | None = None,
) -> ConvertReport:
    """Convert rows to qwenft's shapes (sft, preference, kto or pt), written atomically to out.

    Rows that cannot be converted (or that would not pass check_file) are reported with their
    lines. Unless skip_invalid, any such row means nothing is written (report.written is False).
    fill: {name: text} for {{name}} placeholders; those left are reported as warnings.
    text_docs: how a .txt source becomes documents: "lines" (the default: LLaMA-Factory's
    reading, one per line) or "blocks" (one per blank-line-separated block); only for a .txt.
    """
    if fmt not in CONVERT_FORMATS:
        raise QwenftError(f"unknown format {fmt!r}", f"use one of {', '.join(CONVERT_FORMATS)}")
    if text_docs is not None and text_docs not in TEXT_DOCS:
        raise QwenftError(
            f"unknown --text-docs {text_docs!r}", f"use one of {', '.join(TEXT_DOCS)}"
        )
    marks = {"{{" + k + "}}": v for k, v in (fill or {}).items()}
    src_path, fh, mode = open_data_file(src)
    reading = None
    if mode == "txt":
        reading = text_docs or "lines"
        mode = TEXT_MODES[reading]
    elif text_docs is not None:
        fh.close()
        raise QwenftError(
            f"--text-docs {text_docs} reads a .txt file, and {src_path.name} is JSON data",
            "drop --text-docs",
        )
    out_path = check_out_path(out, force, src_path)
    col = Collector()
    n_in = n_out = n_images = 0
    created_dir = None
    if not out_path.parent.exists():
        created_dir = out_path.parent
        out_path.parent.mkdir(parents=True)
    # the converted rows are checked as `data check` would check the output: images beside it
    rules = RowRules(
        Collector(), mode="txt" if mode == "txt" else "jsonl", data_dir=out_path.parent
    )
    images = ImageFiles(src_path.parent, out_path)
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
                        choices = "|".join(f for f in CONVERT_FORMATS if f != "auto")
                        raise QwenftError(
                            f"{src_path}:{line}: cannot tell the format from this row "
                            f"(keys: {keys})",
                            f"pass --from {choices}",
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
                    if isinstance(row.get(IMAGES), list):
                        row[IMAGES] = images.place(row[IMAGES], n_in)
                except RowError as exc:
                    images.drop(n_in)
                    col.error(exc.kind, line, exc.field, exc.message)
                    continue
                if marks:
                    row = _fill(row, marks)
                dumped = dump_row(row)
                seen = len(rules.col.problems)
                errors_before = rules.col.n_errors
                ok = rules.check(row, line, dumped)
                new = rules.col.problems[seen:]
                if not ok or rules.col.n_errors != errors_before:
                    images.drop(n_in)
                    first = next((p for p in new if p.severity == "error"), None)
                    if first is None:
                        col.error("invalid_row", line, None, "after conversion: the row is invalid")
                    else:
                        col.error(
                            first.kind, line, first.field, f"after conversion: {first.message}"
                        )
                    continue
                for p in new:
                    col.warning(p.kind, line, p.field, p.message)
                tmp.fh.write(dumped + b"\n")
                n_out += 1
                n_images += len(row.get(IMAGES) or ())
        if n_in == 0:
            raise QwenftError(f"{src_path} has no rows to convert", "is it the right file?")
        rules.finish()
        for p in rules.col.problems:
            if p.line is None:  # file-level remarks (e.g. KTO labels all alike)
                col.warning(p.kind, None, p.field, p.message)
        written = n_out > 0 and (col.n_errors == 0 or skip_invalid)
        if written:
            tmp.commit()
        else:
            tmp.discard()
            images.discard()
            n_out = n_images = 0
    except BaseException:
        tmp.discard()
        images.discard()
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
        kind=rules.file_kind,
        n_errors=col.n_errors,
        reading=reading,
        n_images=n_images,
        images_written=images.written,
        images_dir=images.folder if images.decoded else None,
    )


def materialize_pt_jsonl(src: Path, dst: Path) -> int:
    """Write pre-training data src (a .txt file, one document per line, or {"text"} jsonl) to
    dst as {"text": ...} JSON lines, atomically (dst is replaced); the rows written.

    A .txt is read as LLaMA-Factory reads it (one document per line), so the copy trains what
    LLaMA-Factory would train from the .txt itself; training on a .txt goes through this copy (in
    the run folder). A row that is not pre-training text raises QwenftError naming its line
    (check the file first: check_file(src, "pt"))."""
    src_path, fh, mode = open_data_file(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    col = Collector()
    tmp = AtomicOutput(dst)
    n = 0
    try:
        with fh:
            for line, value, _raw in iter_rows(fh, mode, col):
                text = value.get("text") if isinstance(value, dict) else None
                if value is BAD or not isinstance(text, str):
                    why = (
                        col.problems[-1].message
                        if value is BAD and col.problems
                        else ('not a {"text": "..."} row')
                    )
                    raise QwenftError(
                        f"{src_path}:{line}: {why}", f"check it: qwenft data check {src_path}"
                    )
                tmp.fh.write(dump_row({"text": text}) + b"\n")
                n += 1
        if col.n_errors:
            p = col.problems[0]
            raise QwenftError(f"{src_path}:{p.line}: {p.message}")
        if n == 0:
            raise QwenftError(f"{src_path} holds no {PT} text", "is it the right file?")
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    return n
