"""The data kinds (qwenft.choices.DataKind), how a row shows its kind, and each kind's own rules.

One file holds one kind, each the shape LLaMA-Factory 0.9.5 reads for one training stage:

- sft: ``{"messages": [..., assistant]}`` (the chat rules of qwenft.data.check.Checker);
- preference (dpo, orpo, simpo): ``{"messages": [..., user], "chosen": {"role": "assistant",
  "content": ...}, "rejected": {...}}``, registered as sharegpt with ``ranking: true``;
- kto: ``{"messages": [..., assistant], "label": true|false}``, the label is the ``kto_tag`` column;
- pt: ``{"text": ...}``, or a .txt file read as LLaMA-Factory reads it: one document per line;
- prompt (grpo, trained by TRL: qwenft.rl): ``{"messages": [..., user], ...fields}``, every other
  key a field the rewards read (``"answer"``, ``"tools"``, ...). A row of it has sft's keys, so it
  is told apart only where the caller takes prompt data.

sft rows may carry images (``"images": [paths]`` with ``<image>`` placeholders: qwenft.data.images,
trained with --stage sft on a vision-language model); they are sft data, not a kind of their own.

RowRules applies the rules of the file's kind to each row, plus the rules every kind shares:
the media rules (qwenft.data.images.ImageRules: images in sft rows only, videos and audios
refused), ``{{name}}`` placeholders are reported. Nothing here prints, exits or imports
LLaMA-Factory.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from qwenft.choices import DataKind
from qwenft.data.images import MEDIA_KEYS, ImageRules, ImageTokens
from qwenft.data.messages import ASSISTANT, FUNCTION_CALL, Checker, check_surrogates
from qwenft.data.reader import Collector, iter_rows, jtype, open_data_file

SFT, PREFERENCE, KTO, PT, PROMPT = (
    DataKind.SFT.value,
    DataKind.PREFERENCE.value,
    DataKind.KTO.value,
    DataKind.PT.value,
    DataKind.PROMPT.value,
)
SIDES = ("chosen", "rejected")
LABEL = "label"
TEXT = "text"
PLACEHOLDER_RE = re.compile(rb"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")  # LLaMA-Factory's identity.json

# What each kind's rows look like, for messages naming a kind.
SHAPES = {
    SFT: '{"messages": [..., assistant]}',
    PREFERENCE: '{"messages": [..., user], "chosen": {...}, "rejected": {...}}',
    KTO: '{"messages": [..., assistant], "label": true|false}',
    PT: '{"text": "..."}',
    PROMPT: '{"messages": [..., user], "answer": ...}',
}

_CONVERT = "convert it with `qwenft data convert FILE -o OUT.jsonl`"

# Keys LLaMA-Factory reads in some kind of data: the note says where (never "not used").
_KEY_WHAT = {
    "chosen": "(a preference pair's preferred answer)",
    "rejected": "(a preference pair's rejected answer)",
    "label": "(KTO's label)",
    "kto_tag": "(LLaMA-Factory's KTO label column)",
    "text": "(pre-training text)",
    "tools": "(the functions a conversation offers)",
    "messages": "(a conversation)",
    "conversations": "(ShareGPT's conversation)",
    "instruction": "(Alpaca's prompt)",
    "input": "(Alpaca's input)",
    "output": "(Alpaca's answer)",
    "history": "(Alpaca's history)",
    "prompt": "(TRL's prompt)",
    "completion": "(TRL's completion)",
}


def _key_notes(kind: str) -> dict[str, str]:
    notes = {
        key: f"{what} is not read for {kind} data: remove it, or give this kind's rows their own file"
        for key, what in _KEY_WHAT.items()
    }
    notes["system"] = (
        "(a system prompt column) is not read by the entry qwenft registers: put the system "
        'prompt first in messages as role "system" (`qwenft data convert` does it)'
    )
    if kind == KTO:
        notes["kto_tag"] = (
            "(LLaMA-Factory's KTO label column) is not read here: qwenft reads the label from "
            f'"label" ({_CONVERT} renames it)'
        )
    return notes


# --------------------------------------------------------------------------------------------------
# which kind a row is


def has_content_parts(msgs: Any) -> bool:
    """Whether messages are in LLaMA-Factory's content-part shape (a content list holding a
    {"type", "value"} part), which `qwenft data convert` reads."""
    return isinstance(msgs, list) and any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and "value" in p for p in m["content"])
        for m in msgs
    )


def row_kind(obj: Any) -> str | None:
    """The kind of one row in qwenft's shapes, by its keys; None when it is in none of them."""
    if type(obj) is not dict:
        return None
    if "messages" in obj:
        if "chosen" in obj or "rejected" in obj:
            return PREFERENCE
        if LABEL in obj or "kto_tag" in obj:
            return KTO
        return SFT
    if TEXT in obj:
        return PT
    return None


def foreign_shape(obj: Any) -> str | None:
    """What a row that is in none of qwenft's shapes looks like (a shape `data convert` reads)."""
    if not isinstance(obj, dict):
        return None
    if "chosen_messages" in obj or "rejected_messages" in obj:
        return "LLaMA-Factory's chosen_messages / rejected_messages preference pairs"
    pair = "chosen" in obj or "rejected" in obj
    kto = "kto_tag" in obj or LABEL in obj
    if "conversations" in obj:
        return (
            "LLaMA-Factory's sharegpt preference (ranking) data"
            if pair
            else "LLaMA-Factory's sharegpt KTO data"
            if kto
            else "ShareGPT"
        )
    if "instruction" in obj or "output" in obj:
        return (
            "LLaMA-Factory's alpaca preference (ranking) data"
            if pair
            else "LLaMA-Factory's alpaca KTO data"
            if kto
            else "Alpaca"
        )
    if pair:
        return "TRL / UltraFeedback preference data"
    if "prompt" in obj and "completion" in obj:
        return "TRL KTO data" if kto else "TRL prompt-completion data"
    return None


def detect_file_kind(path: Path, max_rows: int = 1000) -> str | None:
    """The kind of the first row (of the first max_rows) that shows one; None if none does."""
    path, fh, mode = open_data_file(path)
    if mode == "txt":
        fh.close()
        return PT
    with fh:
        for n, (_line, value, _raw) in enumerate(iter_rows(fh, mode, Collector())):
            kind = row_kind(value)
            if kind is not None or n >= max_rows:
                return kind
    return None


# --------------------------------------------------------------------------------------------------
# the rules of each kind


class RowRules:
    """Checks rows of one file against its kind's rules; records problems in col.

    kind None: the kind of the first row that shows one is the file's, and a later row of another
    kind is an error (mixed_kinds). A DataKind value: the kind the caller takes, and any row of
    another kind is an error (wrong_kind). Rows in no kind's shape are checked as the file's kind
    (sft until one shows) and refused with what they look like.
    """

    def __init__(
        self,
        col: Collector,
        kind: str | None = None,
        mode: str = "jsonl",
        *,
        data_dir: Path | None = None,
        image_tokens: ImageTokens | None = None,
    ) -> None:
        """data_dir: the data file's folder, where its images are looked for (each must exist and
        decode); None: image paths are checked as written only. image_tokens: how images are
        counted for ImageRules.stats (LLaMA-Factory's defaults, Qwen2-VL's image processor)."""
        if kind is not None:
            kind = DataKind.parse(kind, "data kind")
        self.col = col
        self.images = ImageRules(col, data_dir, image_tokens or ImageTokens())
        self.mode = mode  # reader mode: "txt" rows are the lines of a text file
        self.expected = kind
        self.kind: str | None = kind
        self.kind_line: int | None = None
        self.labels: Counter[bool] = Counter()
        self._checkers: dict[str, Checker] = {}

    @property
    def file_kind(self) -> str:
        return self.kind or SFT

    @property
    def has_tools(self) -> bool:
        return any(c.has_tools for c in self._checkers.values())

    def _checker(self, kind: str) -> Checker:
        checker = self._checkers.get(kind)
        if checker is None:
            row_keys = {PREFERENCE: SIDES, KTO: (LABEL,), PT: (TEXT,)}.get(kind, ())
            checker = Checker(
                self.col,
                context_only=kind in (PREFERENCE, PROMPT),
                fields=kind == PROMPT,
                row_keys=(*row_keys, *MEDIA_KEYS),
                key_notes=_key_notes(kind),
            )
            self._checkers[kind] = checker
        return checker

    def check(self, obj: Any, line: int, raw: bytes = b"") -> bool:
        """Record the problems of one row; True if it has no errors."""
        kind = row_kind(obj)
        if kind == SFT and self.expected == PROMPT:  # the same keys: the caller says which
            kind = PROMPT
        if kind is not None and kind != self.kind:
            if self.kind is None:
                self.kind, self.kind_line = kind, line
            else:
                self._other_kind(kind, line)
                return False
        kind = self.file_kind
        if (
            type(obj) is dict
            and (not raw or b'"value"' in raw)  # cheap: no part has a "value" key otherwise
            and has_content_parts(obj.get("messages"))
        ):
            self.col.error(
                "content_parts",
                line,
                "messages",
                'this row is in LLaMA-Factory\'s content-part shape ({"type": "text" | '
                '"reasoning" | "tool_call", "value": ...}): ' + _CONVERT,
            )
            return False
        if (
            kind == SFT
            and type(obj) is dict
            and len(obj) == 1
            and b"{{" not in raw
            and b"<image>" not in raw
        ):
            return self._checker(SFT).check(obj, line, raw)  # the common clean row, fast
        col = self.col
        before = col.n_errors
        if isinstance(obj, dict) and row_kind(obj) is None:
            keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
            shape = foreign_shape(obj)
            missing = "text" if kind == PT else "messages"
            msg = f'no "{missing}" (keys: {keys})'
            if shape:
                msg += f"; this looks like {shape}: {_CONVERT}"
            col.error(f"missing_{missing}", line, missing, msg)
            return False
        if isinstance(obj, dict):
            self._check_common(obj, line, raw)
        if kind == PT:
            self._check_pt(obj, line, raw)
        else:
            self._checker(kind).check(obj, line, raw)
            if isinstance(obj, dict) and kind == PREFERENCE:
                self._check_sides(obj, line)
            elif isinstance(obj, dict) and kind == KTO:
                self._check_label(obj, line)
        return col.n_errors == before

    def _other_kind(self, kind: str, line: int) -> None:
        if self.expected is not None:
            self.col.error(
                "wrong_kind",
                line,
                None,
                f"this row is {kind} data ({SHAPES[kind]}), but {self.expected} data "
                f"({SHAPES[self.expected]}) is wanted here",
            )
        else:
            self.col.error(
                "mixed_kinds",
                line,
                None,
                f"this row is {kind} data ({SHAPES[kind]}), but the file is {self.kind} data from "
                f"line {self.kind_line} on: one file holds one kind; put each in its own file",
            )

    def _check_common(self, obj: dict, line: int, raw: bytes) -> None:
        col = self.col
        self.images.check(obj, line, self.file_kind, raw)
        if b"{{" in raw:
            names = sorted({m.decode() for m in PLACEHOLDER_RE.findall(raw)})
            if names:
                marks = ", ".join("{{" + n + "}}" for n in names)
                fills = " ".join(f"--fill {n}=..." for n in names)
                col.warning(
                    "placeholder",
                    line,
                    None,
                    f"{marks} placeholder{'s' if len(names) > 1 else ''} (as in LLaMA-Factory's "
                    f"identity.json) would be trained as written: fill them with "
                    f"`qwenft data convert FILE -o OUT.jsonl {fills}`",
                )

    def _check_sides(self, obj: dict, line: int) -> None:
        col = self.col
        sides = {}
        for side in SIDES:
            if side not in obj:
                col.error(
                    "missing_side",
                    line,
                    side,
                    f'no "{side}": a preference row needs both chosen and rejected',
                )
                continue
            value = obj[side]
            if not isinstance(value, dict):
                hint = f"; {_CONVERT} --from trl" if isinstance(value, (str, list)) else ""
                col.error(
                    "bad_side",
                    line,
                    side,
                    f'{side} must be {{"role": "assistant", "content": "..."}}, got a '
                    f"{jtype(value) or 'null'}{hint}",
                )
                continue
            role, content = value.get("role"), value.get("content")
            if role not in (ASSISTANT, FUNCTION_CALL):
                col.error(
                    "bad_side",
                    line,
                    f"{side}.role",
                    f"{side}'s role must be assistant (or function_call), got "
                    f"{jtype(role) and repr(role) or 'none'}",
                )
                continue
            if not isinstance(content, str):
                col.error(
                    "bad_side",
                    line,
                    f"{side}.content",
                    f"{side}'s content must be a string, got {jtype(content) or 'null'}",
                )
                continue
            if not content.strip():
                col.error("empty_side", line, f"{side}.content", f"{side} is empty")
                continue
            for key in value:
                if key not in ("role", "content"):
                    col.warning(
                        "unknown_key",
                        line,
                        f"{side}.{key}",
                        f'unknown key "{key}" is not used by LLaMA-Factory',
                    )
            sides[side] = (role, content)
        if len(sides) == 2 and sides["chosen"] == sides["rejected"]:
            col.error(
                "same_sides",
                line,
                "rejected",
                "chosen and rejected are identical: the pair teaches nothing",
            )

    def _check_label(self, obj: dict, line: int) -> None:
        if LABEL not in obj:
            self.col.error(
                "bad_label",
                line,
                "kto_tag",
                f'the KTO label must be named "label" (true or false); {_CONVERT} renames kto_tag',
            )
            return
        label = obj[LABEL]
        if type(label) is not bool:
            self.col.error(
                "bad_label",
                line,
                LABEL,
                f"label must be true or false (a JSON boolean), got {jtype(label) or 'null'} "
                f"{label!r}: LLaMA-Factory drops a row whose label is not a boolean",
            )
            return
        self.labels[label] += 1

    def _check_pt(self, obj: Any, line: int, raw: bytes) -> None:
        col = self.col
        if not isinstance(obj, dict):
            col.error(
                "not_object",
                line,
                None,
                f'each row must be a JSON object {{"text": "..."}}, got a {jtype(obj) or "null"}',
            )
            return
        text = obj.get(TEXT)
        if not isinstance(text, str):
            col.error("bad_text", line, TEXT, f"text must be a string, got {jtype(text) or 'null'}")
        elif self.mode == "txt" and not text.strip():
            col.error(
                "blank_line",
                line,
                None,
                "blank line: LLaMA-Factory reads a .txt file one document per line, and would "
                "train this line as an empty document (the end-of-text token alone); remove the "
                "blank lines, or make each blank-line-separated block one document with "
                "`qwenft data convert FILE -o OUT.jsonl --text-docs blocks`",
            )
        elif not text.strip():
            col.error(
                "empty_text",
                line,
                TEXT,
                "text is empty: LLaMA-Factory would train on the end-of-text token alone",
            )
        elif self.mode == "txt" and text.lstrip()[:1] == "{" and text.rstrip()[-1:] == "}":
            col.warning(
                "txt_json",
                line,
                None,
                "this line of a .txt file looks like JSON: a .txt file is read as plain text "
                "(one document per line, as LLaMA-Factory reads it); name the file .jsonl if it "
                "holds JSON lines",
            )
        checker = self._checker(PT)
        notes = checker.key_notes
        for key, value in obj.items():
            if key in (TEXT, *MEDIA_KEYS):
                continue
            msg = notes.get(key)
            col.warning(
                "unknown_key",
                line,
                key,
                f'key "{key}" {msg}'
                if msg
                else f'unknown key "{key}" is not used by LLaMA-Factory',
            )
            checker._track_type(key, value, line, key)
        check_surrogates(obj, raw, line, col)

    def finish(self) -> None:
        """The file-level rules, after the last row."""
        if self.file_kind == KTO and len(self.labels) == 1:
            (label,) = self.labels
            self.col.warning(
                "one_label",
                None,
                LABEL,
                f"every row is labelled {str(label).lower()}: KTO learns from both desirable "
                "(true) and undesirable (false) answers",
            )
