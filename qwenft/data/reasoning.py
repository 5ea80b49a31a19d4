"""Reasoning (chain of thought) in chat data: the Qwen3 ``<think>`` form, and how each kind of
sample is trained.

LLaMA-Factory 0.9.5's qwen3 template (a ReasoningTemplate, thought words ``"<think>\\n"`` and
``"\\n</think>\\n\\n"``) reads a thought at the start of an assistant turn:
``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``. What it does with a sample depends on
``enable_thinking``:

- true: a turn with a thought is trained as it is (thought and answer); a turn without one gets an
  empty thought ``<think>\\n\\n</think>\\n\\n`` before its answer, trained too. That is how Qwen3's
  own chat template renders a turn in no-think mode, so one run trains both modes (as ms-swift
  does): the model thinks when the prompt leaves the thought open, and answers directly after an
  empty thought (``enable_thinking=False`` at inference).
- false: every thought is removed, and the empty thought goes into the prompt (not trained): only
  direct answers are learned.

``thinking_plan`` is the one decision rule (train, plan and ``data check`` ask it).
Nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwenft.data.reader import Collector, iter_rows, open_data_file

# LLaMA-Factory's qwen3 thought words, and Qwen3's chat template's own form of a thought.
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
_THOUGHT_RE = re.compile(r"<think>\n(.*?)\n</think>\n\n", re.DOTALL)
NO_THINK_TEMPLATES = ("qwen", "qwen3_nothink")  # templates without a thinking mode

_ANSWER_ROLES = ("assistant", "function_call")


def with_reasoning(reasoning: str, content: str) -> str:
    """An answer with its reasoning in the Qwen3 form, as Qwen3's chat template renders
    ``reasoning_content``: ``<think>\\n`` + reasoning.strip("\\n") + ``\\n</think>\\n\\n`` +
    content.lstrip("\\n")."""
    return f"{THINK_OPEN}{reasoning.strip(chr(10))}{THINK_CLOSE}{content.lstrip(chr(10))}"


def thought_problem(content: str) -> tuple[str, str] | None:
    """(severity, why) when an answer's <think> block is not one LLaMA-Factory's qwen3 template
    reads as a thought; None when it is fine, or when there is no block."""
    if "<think>" not in content and "</think>" not in content:
        return None
    if content.count("<think>") != 1 or content.count("</think>") != 1:
        return "error", (
            "an answer holds one thought at most: one <think> ... </think> block at its start "
            f"(found {content.count('<think>')} <think> and {content.count('</think>')} </think>)"
        )
    if not content.startswith("<think>"):
        return "error", (
            "the <think> block must open the answer (Qwen3 thinks first, then answers); text "
            "before it would be trained as part of the answer"
        )
    if not _THOUGHT_RE.match(content):
        return "warning", (
            "the thought is not in Qwen3's form <think>\\n...\\n</think>\\n\\n that LLaMA-Factory's "
            "qwen3 template reads: it is trained as written with thinking on, but not removed "
            "with thinking off; `qwenft data convert` writes reasoning_content in that form"
        )
    return None


def has_thought(content: Any) -> bool:
    """Whether an answer carries a non-empty thought (an empty one is Qwen3's no-think form)."""
    if not isinstance(content, str) or "think>" not in content:
        return False
    match = _THOUGHT_RE.match(content)
    if match is None:
        return True  # a malformed block: still reasoning text (check_file reports its form)
    return bool(match.group(1).strip())


@dataclass
class ReasoningCounts:
    """The samples of a chat file by how they answer."""

    reasoning: int = 0  # some answer carries a non-empty thought
    plain: int = 0  # no answer does (an empty thought counts as plain: Qwen3's no-think form)
    first_reasoning: int | None = None  # line
    first_plain: int | None = None

    @property
    def total(self) -> int:
        return self.reasoning + self.plain


def count_reasoning(path: Path) -> ReasoningCounts:
    """How many samples reason and how many answer directly (rows without messages are skipped).

    Remembered for the file as it is (its size and modification time): `data check` and the
    settings resolver both ask for the same file in one command."""
    try:
        st = Path(path).stat()
    except OSError:  # open_data_file says why
        return _count_reasoning(path)
    return replace(_counted(str(Path(path).resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _counted(path: str, size: int, mtime_ns: int) -> ReasoningCounts:
    return _count_reasoning(Path(path))


def _count_reasoning(path: Path) -> ReasoningCounts:
    path, fh, mode = open_data_file(path)
    counts = ReasoningCounts()
    with fh:
        for line, value, raw in iter_rows(fh, mode, Collector()):
            if not (isinstance(value, dict) and isinstance(value.get("messages"), list)):
                continue
            answers = [*value["messages"], value.get("chosen"), value.get("rejected")]
            reasons = b"think>" in raw and any(
                isinstance(m, dict)
                and m.get("role") in _ANSWER_ROLES
                and has_thought(m.get("content"))
                for m in answers
            )
            if reasons:
                counts.reasoning += 1
                counts.first_reasoning = counts.first_reasoning or line
            else:
                counts.plain += 1
                counts.first_plain = counts.first_plain or line
    return counts


@dataclass
class ThinkingPlan:
    """What thinking_plan decided: enable_thinking for LLaMA-Factory (None: the template has no
    switch), how each kind of sample is trained (notes), and a warning when the data carries
    thoughts the template cannot train as thoughts."""

    enable_thinking: bool | None
    notes: list[str] = field(default_factory=list)
    warning: str | None = None
    counts: ReasoningCounts = field(default_factory=ReasoningCounts)

    def __iter__(self):  # enable_thinking, notes = thinking_plan(...)
        return iter((self.enable_thinking, self.notes))

    def to_dict(self) -> dict:
        return {
            "enable_thinking": self.enable_thinking,
            "reasoning_samples": self.counts.reasoning,
            "plain_samples": self.counts.plain,
            "notes": list(self.notes),
            "warning": self.warning,
        }


def _n(k: int, what: str = "sample") -> str:
    return f"{k} {what}{'s' if k != 1 else ''}"


def thinking_plan(
    path: Path | None,
    model_thinking: str | None,
    requested: str = "auto",
    template: str | None = None,
) -> ThinkingPlan:
    """enable_thinking for training on path, and how each kind of sample will be trained.

    model_thinking: the model family's "hybrid" (Qwen3: switchable), "always" (thinking-only) or
    "none"; template: LLaMA-Factory's template (qwen and qwen3_nothink have no thinking mode);
    requested: --thinking auto | on | off (honoured for hybrid models only).

    Hybrid, auto: no sample reasons -> off; some or all do -> on, which trains both modes the
    way Qwen3's chat template renders them (reasoning samples with their thought, the others with
    an empty thought before the answer). Thoughts in data for a template without a thinking mode
    are reported (they would be trained as plain text)."""
    requested = str(requested or "auto").lower()
    counts = count_reasoning(path) if path is not None else ReasoningCounts()
    r, p = counts.reasoning, counts.plain
    no_switch = (template in NO_THINK_TEMPLATES) or model_thinking in (None, "none")
    if no_switch:
        plan = ThinkingPlan(None, counts=counts)
        if r:
            where = f" (first at line {counts.first_reasoning})" if counts.first_reasoning else ""
            plan.warning = (
                f"{_n(r)}{where} {'carries' if r == 1 else 'carry'} <think> reasoning, but the {template or 'model'!s} template "
                "has no thinking mode: the blocks would be trained as plain answer text; use a "
                "Qwen3 model with the qwen3 template to train reasoning, or remove the blocks"
            )
            plan.notes.append(f"reasoning ({_n(r)}): <think> blocks trained as plain text")
        if p:
            plan.notes.append(f"direct answers ({_n(p)}): trained as they are")
        return plan
    if model_thinking == "always":
        plan = ThinkingPlan(None, counts=counts)
        if r:
            plan.notes.append(f"reasoning ({_n(r)}): thought and answer trained")
        if p:
            plan.notes.append(
                f"direct answers ({_n(p)}): trained after an empty <think></think> block (a "
                "thinking-only model always opens one)"
            )
        return plan
    if requested in ("on", "true", "1"):
        on = True
    elif requested in ("off", "false", "0"):
        on = False
    else:
        on = r > 0
    plan = ThinkingPlan(on, counts=counts)
    if on:
        if r:
            plan.notes.append(
                f"reasoning ({_n(r)}): thought and answer trained (thinking mode: the model "
                "opens <think> itself)"
            )
        if p:
            plan.notes.append(
                f"direct answers ({_n(p)}): trained after an empty <think>\\n\\n</think> block, "
                "as Qwen3's chat template renders no-think mode (enable_thinking=False at "
                "inference answers directly)"
            )
    else:
        if r:
            plan.notes.append(
                f"reasoning ({_n(r)}): thoughts removed, only the answers trained (--thinking "
                "off); drop --thinking to train both modes"
            )
        if p:
            plan.notes.append(
                f"direct answers ({_n(p)}): trained with the empty thought in the prompt "
                "(no-think mode)"
            )
    return plan
