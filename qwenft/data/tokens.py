"""Tokenization exactly as LLaMA-Factory's preprocessing of each data kind, reproduced here.

LLaMA-Factory 0.9.5 (the version in LLAMAFACTORY_TESTED) builds the tokens of a sample from its
converter (the dataset_info.json entry qwenft registers), its chat template (`qwen`, `qwen3`,
`qwen3_nothink`) and the dataset processor of the stage: SupervisedDatasetProcessor (sft),
PairwiseDatasetProcessor (dpo, orpo, simpo: prompt + chosen, prompt + rejected),
FeedbackDatasetProcessor (kto, with its KL sample) and PretrainDatasetProcessor (pt). This module
is the one place that logic is reproduced: the formatting of each message (system prompt and tool
list, user, assistant, tool call, tool result), the thinking rules of the `qwen3` template, the
truncation at cutoff_len, the masking of labels. Each formatted piece is encoded separately, as
LLaMA-Factory encodes it, but in one batch call of the fast tokenizer (Rust, on every core) instead
of one call per piece; the tokenizer is read from the model's tokenizer.json without importing
transformers. tests/test_tokenize.py proves the arrays equal LLaMA-Factory's own, sample by sample.

Rows with images are measured, not written: with image settings (LlamaFactoryEncoder's images,
as DataSpec.encoder gives them) each <image> is first expanded into the image's vision tokens, as
LLaMA-Factory's Qwen2-VL plugin expands it (qwenft.data.images), so lengths and cuts count them;
LLaMA-Factory tokenizes such data for training itself (pipeline.data_not_reproduced).

After a LLaMA-Factory upgrade, start here: a version not in LLAMAFACTORY_TESTED is not trusted to
match (qwenft.data.pipeline.not_reproduced: LLaMA-Factory then tokenizes the data itself).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

from qwenft.choices import DataKind, Template
from qwenft.data import parallel
from qwenft.data.check import ASSISTANT, FUNCTION_CALL, SYSTEM, TOOL, USER
from qwenft.data.images import ImageTokens
from qwenft.data.kinds import KTO, PREFERENCE, PT, SFT, RowRules
from qwenft.data.piece_bpe import PieceEncoder, unassigned
from qwenft.data.reader import BAD, Collector, iter_rows, jsonl_payloads, open_data_file
from qwenft.errors import QwenftError

LLAMAFACTORY_TESTED = ("0.9.5",)  # the versions whose preprocessing this module reproduces
IGNORE_INDEX = -100  # LLaMA-Factory's label of a token without loss

# LLaMA-Factory 0.9.5's qwen, qwen3 and qwen3_nothink templates (data/template.py) share these
# slots; each is (before the content, after it).
_USER = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
_ASSISTANT = ("", "<|im_end|>\n")
_SYSTEM = ("<|im_start|>system\n", "<|im_end|>\n")
_OBSERVATION = (
    "<|im_start|>user\n<tool_response>\n",
    "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)
EOS = "<|im_end|>"  # the template's first stop word, which replaces the tokenizer's eos
DEFAULT_SYSTEM = {
    Template.QWEN.value: "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    Template.QWEN3.value: "",
    Template.QWEN3_NOTHINK.value: "",
    # the vision-language templates: the same slots for text (LLaMA-Factory's qwen2_vl is qwen's
    # with this system prompt, qwen3_vl qwen3's, qwen3_vl_nothink qwen3_nothink's), plus their
    # mm_plugin, which expands <image> (qwenft.data.images); used once choices.Template has them
    "qwen2_vl": "You are a helpful assistant.",
    "qwen3_vl": "",
    "qwen3_vl_nothink": "",
}
REASONING = {Template.QWEN3.value, "qwen3_vl"}  # LLaMA-Factory's ReasoningTemplate
_THOUGHT = ("<think>\n", "\n</think>\n\n")
_EMPTY_THOUGHT = _THOUGHT[0] + _THOUGHT[1]
_THOUGHT_RE = re.compile(f"{re.escape(_THOUGHT[0])}(.*?){re.escape(_THOUGHT[1])}", re.DOTALL)
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)
# qwenft's role names -> LLaMA-Factory's (converter.py's tag mapping for the registered entry)
_ROLE = {USER: "user", ASSISTANT: "assistant", TOOL: "observation", FUNCTION_CALL: "function"}
_ODD, _EVEN = ("user", "observation"), ("assistant", "function")
# The columns of a row each kind's dataset entry maps (what the converter reads).
_COLUMNS = {
    SFT: ("messages", "tools"),
    PREFERENCE: ("messages", "chosen", "rejected", "tools"),
    KTO: ("messages", "label", "tools"),
    PT: ("text",),
}

Message = tuple[str, str]  # (LLaMA-Factory role, content)


def llamafactory_version() -> str | None:
    """The installed LLaMA-Factory's version (package metadata; nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version("llamafactory")
    except metadata.PackageNotFoundError:
        return None


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's truncation: the lengths a prompt and its answer keep within cutoff_len
    (processor_utils.infer_seqlen)."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


# --- the tokenizer --------------------------------------------------------------------------------


def _tokenizer_folder(model: str) -> Path | None:
    """The local folder holding the model's tokenizer.json: the model folder, or the hub cache's
    snapshot of a hub id (nothing is downloaded here)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings it
        return None
    try:
        found = try_to_load_from_cache(model, "tokenizer.json")
    except Exception:  # noqa: BLE001 - not a hub id (a path that does not exist): not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def load_tokenizer(model: str | Path) -> tuple[Any, dict]:
    """(the fast tokenizer LLaMA-Factory trains with, as a `tokenizers.Tokenizer`; the model's
    tokenizer_config.json).

    Read straight from tokenizer.json when the folder has one and every added token of
    tokenizer_config.json is in it with the same id (then transformers builds the same tokenizer:
    a model-tier test compares the two); otherwise through transformers, as LLaMA-Factory loads
    it. As LLaMA-Factory's template fix, <|im_end|> becomes the eos token, added if missing."""
    folder = _tokenizer_folder(str(model))
    config = _read_json(folder / "tokenizer_config.json") if folder else {}
    tokenizer = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:  # noqa: BLE001 - an unreadable file: let transformers say why
            tokenizer = None
        added = config.get("added_tokens_decoder") or {}
        if tokenizer is not None and any(
            tokenizer.token_to_id(t.get("content", "")) != int(i)
            for i, t in added.items()
            if isinstance(t, dict)
        ):
            tokenizer = None
    if tokenizer is None:
        tokenizer = _transformers_tokenizer(str(folder or model))
    if tokenizer.token_to_id(EOS) is None:
        from tokenizers import AddedToken

        tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return tokenizer, config


def _transformers_tokenizer(model: str) -> Any:
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(
            model, use_fast=True, split_special_tokens=False, padding_side="right"
        )
    except Exception as exc:  # noqa: BLE001 - any failure to load is the user's model path
        raise QwenftError(
            f"cannot load the tokenizer of {model}: {exc}",
            "pass --model a preset, a downloaded hub id or a local model folder",
        ) from None
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise QwenftError(
            f"the tokenizer of {model} has no fast (Rust) version",
            "Qwen models ship tokenizer.json; download the model's tokenizer files",
        )
    return backend


class NfcStable:
    """Tells the texts NFC leaves as they are, whatever Unicode version the Rust tokenizer's
    normalizer knows, so that they can skip it (an eighth of the tokenizer's time on chat text).

    A text qualifies if it is ASCII, or if it is in NFC by Python's Unicode data and holds only
    characters that data knows (BMP ones: the check is then a fast lookup). Unicode's normalization
    stability policy keeps such a text in NFC in every later version, and so every substring of it:
    the segments between added tokens the tokenizer normalizes one by one."""

    def __init__(self) -> None:
        self._unknown = unassigned(unicodedata).search

    def __call__(self, text: str) -> bool:
        return text.isascii() or (
            unicodedata.is_normalized("NFC", text) and self._unknown(text) is None
        )

    @staticmethod
    def in_nfc(text: str) -> bool:
        """Whether the text is in NFC by this Python's data: the whole answer for a text whose
        characters that data all knows."""
        return text.isascii() or unicodedata.is_normalized("NFC", text)


# --- LLaMA-Factory's qwen templates ---------------------------------------------------------------


def remove_thought(content: str) -> str:
    """ReasoningTemplate.remove_thought: drop every think block, then leading newlines."""
    return _THOUGHT_RE.sub("", content).lstrip("\n")


def _tool_text(tools: str) -> str:
    """ToolFormatter(tool_format="qwen"): the tool list appended to the system prompt."""
    decoded = json.loads(tools)
    if len(decoded) == 0:
        return ""
    text = ""
    for tool in decoded:
        wrapped = tool if tool.get("type") == "function" else {"type": "function", "function": tool}
        text += "\n" + json.dumps(wrapped, ensure_ascii=False)
    return _QWEN_TOOL_PROMPT.format(tool_text=text)


def _calls_text(json_content: str) -> str:
    calls = json.loads(json_content)
    if not isinstance(calls, list):
        calls = [calls]
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    )


def _function_text(content: str) -> str:
    """FunctionFormatter(tool_format="qwen").apply: a tool-call turn as the model writes it."""
    match = _TOOL_CALL_RE.search(content)
    if match is None:
        thought = _THOUGHT_RE.search(content)
        json_part = content.replace(thought.group(0), "") if thought else content
        text = _calls_text(json_part)
        return (thought.group(0) + text) if thought else text
    return content.replace(match.group(0), "") + _calls_text(match.group(1))


class QwenTemplate:
    """LLaMA-Factory's Template / ReasoningTemplate for the qwen templates, returning for each
    message the strings LLaMA-Factory encodes one by one (_encode's elements) instead of ids."""

    def __init__(
        self,
        name: str,
        *,
        default_system: str | None,
        enable_thinking: bool | None,
        preserve_thinking: bool,
    ) -> None:
        self.name = Template.parse(name, "template")
        # get_template_and_fix_tokenizer: a default_system data argument replaces the template's
        self.default_system = DEFAULT_SYSTEM[name] if default_system is None else default_system
        self.reasoning = name in REASONING
        self.enable_thinking = enable_thinking if self.reasoning else True
        self.preserve_thinking = preserve_thinking

    def elements(self, messages: list[Message], system: str | None, tools: str | None) -> list:
        """Template._encode, as lists of strings: one list per message."""
        system = system or self.default_system
        out = []
        for i, (role, content) in enumerate(messages):
            elements = []
            if i == 0 and (system or tools):
                tool_text = _tool_text(tools) if tools else ""
                elements.append(_SYSTEM[0] + system + tool_text + _SYSTEM[1])
            if role == "user":
                text = _USER[0] + content + _USER[1]
                if "{{idx}}" in text:  # StringFormatter fills the idx placeholder too
                    text = text.replace("{{idx}}", str(i // 2), 1)
            elif role == "assistant":
                text = content + _ASSISTANT[1]
            elif role == "observation":
                text = _OBSERVATION[0] + content + _OBSERVATION[1]
            elif role == "function":
                text = _function_text(content) + _ASSISTANT[1]
            else:
                raise QwenftError(f"unexpected role {role!r} in a sample")
            elements.append(text)
            out.append(elements)
        return out

    @staticmethod
    def _thinks(content: str) -> bool:
        return _THOUGHT[0].strip() in content or _THOUGHT[1].strip() in content

    def multiturn(
        self, messages: list[Message], system: str | None, tools: str | None, discard_cot: bool
    ) -> list[tuple[list[str], list[str]]]:
        """encode_multiturn: (prompt, answer) pieces of each turn."""
        if not self.reasoning:
            el = self.elements(messages, system, tools)
            return [(el[i], el[i + 1]) for i in range(0, len(el), 2)]
        messages = list(messages)
        if self.enable_thinking is False:
            for i in range(1, len(messages), 2):
                messages[i] = (messages[i][0], remove_thought(messages[i][1]))
        if discard_cot:
            for i in range(1, len(messages) - 2, 2):
                messages[i] = (messages[i][0], remove_thought(messages[i][1]))
        el = self.elements(messages, system, tools)
        turns = [len(messages) - 2] if discard_cot else range(0, len(messages), 2)
        for i in turns:
            if not self._thinks(messages[i + 1][1]):  # an empty think block
                if not self.enable_thinking:
                    el[i] = [*el[i], _EMPTY_THOUGHT]  # in the prompt: no loss
                else:
                    el[i + 1] = [_EMPTY_THOUGHT, *el[i + 1]]  # in the answer: trained
        return [(el[i], el[i + 1]) for i in range(0, len(el), 2)]

    def oneturn(
        self, messages: list[Message], system: str | None, tools: str | None
    ) -> tuple[list[str], list[str]]:
        """encode_oneturn: (everything before the last message, the last message) pieces."""
        if self.reasoning:
            messages = list(messages)
            if not self.preserve_thinking:
                for i in range(1, len(messages) - 2, 2):
                    messages[i] = (messages[i][0], remove_thought(messages[i][1]))
            if self.enable_thinking is False:
                messages[-1] = (messages[-1][0], remove_thought(messages[-1][1]))
        el = self.elements(messages, system, tools)
        prompt = [s for e in el[:-1] for s in e]
        answer = el[-1]
        if self.reasoning and not self._thinks(messages[-1][1]):
            if not self.enable_thinking:
                prompt.append(_EMPTY_THOUGHT)
            else:
                answer = [_EMPTY_THOUGHT, *answer]
        return prompt, answer


# --- the converter --------------------------------------------------------------------------------


class Aligned:
    """One row as LLaMA-Factory's converter aligns it (_prompt, _response, _system, _tools)."""

    __slots__ = ("prompt", "response", "system", "tools")

    def __init__(self, prompt: list, response: list, system: str, tools: str | None) -> None:
        self.prompt, self.response, self.system, self.tools = prompt, response, system, tools


def align(row: dict, kind: str) -> Aligned:
    """SharegptDatasetConverter (Alpaca's for pt) for the entry qwenft registers for the kind."""
    if kind == PT:
        text = row.get("text")
        return Aligned([("user", text or "")], [], "", "")
    tools = row.get("tools") if kind != PT else ""
    messages = row.get("messages") or []
    system = ""
    if messages and messages[0].get("role") == SYSTEM:
        system = messages[0].get("content")
        messages = messages[1:]
    aligned: list[Message] = []
    broken = False
    for i, m in enumerate(messages):
        role = _ROLE.get(m.get("role"))
        if role not in (_ODD if i % 2 == 0 else _EVEN):
            broken = True
            break
        aligned.append((role, m.get("content")))
    ranking = kind == PREFERENCE
    if (len(aligned) % 2 == 0) if ranking else (len(aligned) % 2 != 0):
        broken = True
    if broken:
        return Aligned([], [], system, tools)
    label = row.get("label")
    if kind == KTO and isinstance(label, bool):
        prompt, answer = aligned[:-1], aligned[-1:]
        empty = ("assistant", "")
        return Aligned(prompt, answer + [empty] if label else [empty] + answer, system, tools)
    if ranking and isinstance(row.get("chosen"), dict) and isinstance(row.get("rejected"), dict):
        sides = [row["chosen"], row["rejected"]]
        roles = [_ROLE.get(s.get("role")) for s in sides]
        # a side that is not an answer is only logged by LLaMA-Factory: the pair still trains
        response = [(r, s.get("content")) for r, s in zip(roles, sides, strict=True)]
        return Aligned(aligned, response, system, tools)
    return Aligned(aligned[:-1], aligned[-1:], system, tools)


def kept(kind: str, a: Aligned) -> bool:
    """The processor's check of an aligned sample (invalid ones are dropped, with a warning)."""
    if kind == PT:
        return True
    if len(a.prompt) % 2 != 1:
        return False
    return len(a.response) == 1 if kind == SFT else len(a.response) >= 2


# --- the encoder ----------------------------------------------------------------------------------

Side = tuple[int, list[int], list[int]]  # (untruncated length, input_ids, labels)
# How the encoder builds a side: runs of the batch's ids end to end (Encoded.flat); a Span is
# (start, length) runs, Segments the side's (untruncated length, its (start, length, loss) runs).
Span = list[tuple[int, int]]
Segments = tuple[int, list[tuple[int, int, bool]]]


class LlamaFactoryEncoder:
    """Tokenizes samples exactly as LLaMA-Factory's preprocessing of the data kind does.

    encode_sides() gives the sequences of each sample as lists (for scoring); finish_batch() a
    batch's sides as segments (for measuring) and the columns LLaMA-Factory's processor writes
    (qwenft.data.prepare saves them)."""

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
        preserve_thinking: bool = False,
        kind: str = SFT,
        packing: bool = False,
        images: ImageTokens | None = None,
        media_dir: Path | str | None = None,
    ) -> None:
        """images: how a row's images become tokens (each <image> expanded as LLaMA-Factory's
        Qwen2-VL plugin expands it, the files looked for in media_dir); None: rows are encoded
        as they are (an <image> as its text)."""
        self.kind = DataKind.parse(kind, "data kind")
        self.images = images
        self.media_dir = Path(media_dir) if media_dir is not None else Path()
        if template not in Template.values():
            raise QwenftError(
                f"unknown LLaMA-Factory template {template!r}",
                f"use one of {', '.join(Template.values())}",
            )
        if not isinstance(cutoff_len, int) or isinstance(cutoff_len, bool) or cutoff_len < 1:
            raise QwenftError(
                f"--cutoff-len must be a positive integer, got {cutoff_len}",
                "e.g. --cutoff-len 2048",
            )
        self.template = QwenTemplate(
            template,
            default_system=default_system,
            enable_thinking=enable_thinking,
            preserve_thinking=preserve_thinking,
        )
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.packing = packing and self.kind == PT
        self.ignore_index = IGNORE_INDEX
        self.tokenizer, config = load_tokenizer(model_dir)
        self.eos_id = self.tokenizer.token_to_id(EOS)
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        add_bos = bool(config.get("add_bos_token")) and isinstance(bos, str)
        self.bos_text = bos if add_bos else ""  # PretrainDatasetProcessor's bos
        self.bos_id = self.tokenizer.token_to_id(bos) if add_bos else None
        # Asked for no special tokens, a post-processor (ByteLevel, TemplateProcessing) leaves
        # the ids as they are and only adjusts offsets, which nothing here reads (nor does
        # decode): without it encoding is 7 % faster.
        self.tokenizer.post_processor = None
        # NFC normalizes nothing in an NFC-stable text: those are encoded without the normalizer
        self._nfc = self.tokenizer.normalizer
        self._stable = NfcStable() if type(self._nfc).__name__ == "NFC" else None
        # on one thread, NFC-stable texts a Qwen tokenizer encodes alike go to the piece encoder
        self._piece_encoder = PieceEncoder.of(self.tokenizer) if self._stable is not None else None
        # encode_batch_fast (tokenizers >= 0.21) does not compute the offsets either
        self._batch = getattr(self.tokenizer, "encode_batch_fast", None) or (
            self.tokenizer.encode_batch
        )

    def with_images(self, row: Any) -> Any:
        """The row as the template sees it: its <image> placeholders expanded into the images'
        tokens (with images settings, for a row that has images), else the row itself."""
        if self.images is None or not isinstance(row, dict) or not row.get("images"):
            return row
        return self.images.expand(row, self.media_dir)

    def decode(self, ids: list[int]) -> str:
        """The text of ids, special tokens included."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- plans: the pieces each sample encodes, before any tokenizing --

    def _plan(self, a: Aligned, kl: list | None) -> Any:
        t = self.template
        if self.kind == SFT:
            discard = self.mask_history and not t.preserve_thinking
            return t.multiturn(a.prompt + a.response, a.system, a.tools, discard)
        if self.kind == PREFERENCE:
            chosen = t.oneturn(a.prompt + [a.response[0]], a.system, a.tools)
            rejected = t.oneturn(a.prompt + [a.response[1]], a.system, a.tools)
            return chosen, rejected
        if self.kind == KTO:
            answer = a.response[0] if a.response[0][1] else a.response[1]
            if not kl:  # LLaMA-Factory fails here (IndexError): the row before is not a sample
                raise QwenftError(
                    "a KTO row's KL pairing takes the answer of a row LLaMA-Factory drops"
                )
            kl_answer = kl[0] if kl[0][1] else kl[1]
            return (
                t.oneturn(a.prompt + [answer], a.system, a.tools),
                t.oneturn(a.prompt + [kl_answer], a.system, a.tools),
                bool(a.response[0][1]),
            )
        return self.bos_text * (not self.packing) + a.prompt[0][1] + EOS  # pt

    @staticmethod
    def _pieces(plan: Any, kind: str) -> Iterator[str]:
        if kind == SFT:
            for prompt, answer in plan:
                yield from prompt
                yield from answer
        elif kind == PT:
            yield plan
        else:
            for prompt, answer in plan[:2]:
                yield from prompt
                yield from answer

    # -- assembling ids the way each processor does, as segments of the batch's flat ids --

    def _supervised(self, pairs: list, enc: Encoded) -> Segments:
        cutoff = self.cutoff_len
        turns = [(enc.span(p), enc.span(r)) for p, r in pairs]
        sizes = [(_size(source), _size(target)) for source, target in turns]
        full = sum(a + b for a, b in sizes)
        prompt_loss = self.train_on_prompt
        if full < cutoff and not self.mask_history:
            # Shorter than cutoff_len: infer_seqlen keeps every turn whole (it can cut one only
            # when a turn fills the room left exactly)
            segments: list = []
            for source, target in turns:
                segments += _with_loss(source, prompt_loss)
                segments += _with_loss(target, True)
            return full, segments
        order = list(zip(turns, sizes, strict=True))
        if self.mask_history:  # the last turn first: the earlier ones get what room is left
            order.reverse()
        kept: list[list] = []
        total = 0
        for k, ((source, target), (source_size, target_size)) in enumerate(order):
            if total >= cutoff:
                break
            source_len, target_len = infer_seqlen(source_size, target_size, cutoff - total)
            total += source_len + target_len
            target_loss = not (self.mask_history and k)
            kept.append(
                _with_loss(_cut(source, source_len), prompt_loss)
                + _with_loss(_cut(target, target_len), target_loss)
            )
        if self.mask_history:
            kept.reverse()
        return full, list(chain.from_iterable(kept))

    def _one(self, prompt: Span, answer: Span) -> Segments:
        prompt_size, answer_size = _size(prompt), _size(answer)
        source_len, target_len = infer_seqlen(prompt_size, answer_size, self.cutoff_len)
        head = _with_loss(_cut(prompt, source_len), False)
        return prompt_size + answer_size, head + _with_loss(_cut(answer, target_len), True)

    def _pairwise(self, plan: tuple, enc: Encoded) -> tuple[Segments, Segments]:
        (prompt, chosen), (rejected_prompt, rejected) = (
            (enc.span(p), enc.span(a)) for p, a in plan[:2]
        )
        prompt_size, chosen_size, rejected_size = _size(prompt), _size(chosen), _size(rejected)
        source_len, target_len = infer_seqlen(
            prompt_size, max(chosen_size, rejected_size), self.cutoff_len
        )
        head = _with_loss(_cut(prompt, source_len), False)
        return (
            (prompt_size + chosen_size, head + _with_loss(_cut(chosen, target_len), True)),
            (
                _size(rejected_prompt) + rejected_size,
                head + _with_loss(_cut(rejected, target_len), True),
            ),
        )

    def plan_batch(self, aligned: list[Aligned]) -> tuple[list, set[str]]:
        """One of LLaMA-Factory's map batches, before tokenizing: (per sample, what it encodes,
        or None if the processor drops it; every string to tokenize).

        For kto the KL sample of each row is the answer of the row before it in the batch (the
        first takes the last's), as FeedbackDatasetProcessor pairs them."""
        kind = self.kind
        kls: list = [None] * len(aligned)
        if kind == KTO:
            kls = [a.response for a in aligned]
            kls = kls[-1:] + kls[:-1]
        plans = [
            self._plan(a, kl) if kept(kind, a) else None for a, kl in zip(aligned, kls, strict=True)
        ]
        texts: set[str] = set()
        for plan in plans:
            if plan is not None:
                texts.update(self._pieces(plan, kind))
        return plans, texts

    def encode_raw(self, texts: set[str]) -> tuple[list[str], list, list[list[int]]]:
        """encode_parts(parts(texts))."""
        return self.encode_parts(self.parts(texts))

    def parts(self, texts: set[str]) -> tuple[list[str], list[str], list[str]]:
        """The non-empty strings, by how they are encoded: (by the Rust tokenizer, by it without
        its normalizer (NFC-stable ones), by the piece encoder (NFC-stable ones it takes, when
        the Rust tokenizer runs on one thread here: it is then the faster))."""
        if self._stable is None:
            return [t for t in texts if t], [], []
        pieces = self._piece_encoder if parallel.one_thread() else None
        rest: list[str] = []
        stable: list[str] = []
        python: list[str] = []
        for t in texts:
            if not t:
                continue
            # the characters of a text the piece encoder takes are all known to this Python's
            # data: it is NFC-stable if it is in NFC, without NfcStable's scan for unknown ones
            if pieces is not None and pieces.takes(t) and NfcStable.in_nfc(t):
                python.append(t)
            elif self._stable(t):
                stable.append(t)
            else:
                rest.append(t)
        return rest, stable, python

    def encode_parts(
        self, parts: tuple[list[str], list[str], list[str]]
    ) -> tuple[list[str], list, list[list[int]]]:
        """(the strings; the Encodings of the first ones, from batch calls of the Rust tokenizer,
        parallel on every core and without the GIL (the NFC-stable strings with its normalizer
        switched off for the call: one thread at a time per encoder, as encode_pipelined's single
        worker calls it); the ids of the rest, from the piece encoder)."""
        rest, stable, python = parts
        encodings = self._batch(rest, False) if rest else []
        if stable:
            self.tokenizer.normalizer = None
            try:
                encodings += self._batch(stable, False)
            finally:
                self.tokenizer.normalizer = self._nfc
        ids = self._piece_encoder.encode(python) if python else []
        return rest + stable + python, encodings, ids

    def finish_batch(self, plans: list, enc: Encoded) -> tuple[list, dict[str, Any]]:
        """(per sample, its sides or None if dropped; the columns LLaMA-Factory's processor
        returns for the batch, less the attention masks (all ones, as long as the ids beside
        them) and the media columns).

        A side is (untruncated length, segments): one for sft, kto and pt, chosen and rejected for
        a pair; segments are (start, length, has loss) runs of enc.flat, its input_ids once
        joined (enc.lists gives them as lists, labels included). Each ids column is a pair of
        numpy arrays, (row offsets, values), as an arrow list column stores it."""
        kind = self.kind
        if kind == PT:
            return self._pretrain(plans, enc)
        sides: list = []
        rows: dict[str, list] = {}
        tags: list[bool] = []
        for plan in plans:
            if plan is None:
                sides.append(None)
                continue
            if kind == SFT:
                sample = {"": self._supervised(plan, enc)}
            elif kind == PREFERENCE:
                chosen, rejected = self._pairwise(plan, enc)
                sample = {"chosen_": chosen, "rejected_": rejected}
            else:
                sample = {
                    "": self._one(enc.span(plan[0][0]), enc.span(plan[0][1])),
                    "kl_": self._one(enc.span(plan[1][0]), enc.span(plan[1][1])),
                }
                tags.append(plan[2])
            for prefix, side in sample.items():
                rows.setdefault(prefix, []).append(side[1])
            sides.append([side for prefix, side in sample.items() if prefix != "kl_"])
        columns: dict[str, Any] = {}
        for prefix, segments in rows.items():
            offsets, ids, labels = enc.columns(segments)
            columns[prefix + "input_ids"] = offsets, ids
            columns[prefix + "labels"] = offsets, labels
        if kind == KTO:
            columns["kto_tags"] = tags
        return sides, columns

    def encode_batch(self, aligned: list[Aligned]) -> tuple[list, dict[str, Any]]:
        """plan_batch, encoding and finish_batch in one go, each side's segments made lists:
        (untruncated length, input_ids, labels)."""
        plans, texts = self.plan_batch(aligned)
        enc = Encoded(*self.encode_raw(texts))
        sides, columns = self.finish_batch(plans, enc)
        lists = [s and [(full, *enc.lists(segments)) for full, segments in s] for s in sides]
        return lists, columns

    def _pretrain(self, texts: list, enc: Encoded) -> tuple[list, dict[str, Any]]:
        cutoff = self.cutoff_len
        spans = [enc.span((t,)) for t in texts]
        sides = [[(_size(span), _with_loss(_cut(span, cutoff), True))] for span in spans]
        if not self.packing:
            offsets, ids, _ = enc.columns([side[0][1] for side in sides])
        else:  # the batch's texts run on into blocks of cutoff_len; the remainder is left out
            import numpy as np

            _, stream, _ = enc.columns([_with_loss(chain.from_iterable(spans), True)])
            end = len(stream) // cutoff * cutoff
            ids = stream[:end]
            offsets = np.arange(0, end + 1, cutoff, dtype=np.int32)
            if self.bos_id is not None:
                ids[offsets[:-1]] = self.bos_id
        return sides, {"input_ids": (offsets, ids)}

    def encode_sides(self, samples: list[dict]) -> list[list[Side] | None]:
        """For each sample (one batch): the sequences LLaMA-Factory trains on, each as
        (untruncated length, input_ids, labels) (a pair: chosen, then rejected), or None if it
        would drop it."""
        return self.encode_batch([align(self.with_images(s), self.kind) for s in samples])[0]

    def encode(self, samples: list[dict]) -> list[Side | None]:
        """For each sample: its first sequence (a pair's chosen side), or None if dropped."""
        return [sides and sides[0] for sides in self.encode_sides(samples)]


class Encoded:
    """A batch's encoded strings: their ids end to end in one int32 array, and where each is."""

    def __init__(self, texts: list[str], encodings: list, ids: list[list[int]]) -> None:
        """texts: the encodings' strings, then ids' (encode_parts)."""
        import numpy as np

        lists = [e.ids for e in encodings]  # Python work: it holds the GIL
        lists += ids
        lengths = list(map(len, lists))
        self.flat = np.fromiter(chain.from_iterable(lists), np.int32, sum(lengths))
        starts = accumulate(lengths, initial=0)  # one more than the texts: the end
        self.at = dict(zip(texts, zip(starts, lengths, strict=False), strict=True))

    def span(self, pieces: Iterable[str]) -> Span:
        """Where the ids of pieces encoded one by one lie (LLaMA-Factory skips empty ones)."""
        at = self.at
        return [at[p] for p in pieces if p]

    def columns(self, rows: list[list[tuple[int, int, bool]]]) -> tuple[Any, Any, Any]:
        """(row offsets, input_ids, labels) of rows of segments, end to end: numpy gathers."""
        import numpy as np

        starts: list[int] = []
        lengths: list[int] = []
        loss: list[bool] = []
        sizes: list[int] = []
        for segments in rows:
            size = 0
            for start, length, has_loss in segments:
                starts.append(start)
                lengths.append(length)
                loss.append(has_loss)
                size += length
            sizes.append(size)
        offsets = np.zeros(len(rows) + 1, np.int32)
        np.cumsum(sizes, out=offsets[1:])
        n = np.asarray(lengths, np.int64)
        first = np.cumsum(n) - n  # where each segment lands
        index = np.repeat(np.asarray(starts, np.int64) - first, n) + np.arange(int(offsets[-1]))
        ids = self.flat[index]
        labels = np.where(np.repeat(np.asarray(loss, bool), n), ids, IGNORE_INDEX)
        return offsets, ids, labels

    def lists(self, segments: list[tuple[int, int, bool]]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one side's segments, as lists."""
        _, ids, labels = self.columns([segments])
        return ids.tolist(), labels.tolist()


def _size(span: Span) -> int:
    return sum(length for _, length in span)


def _cut(span: Span, n: int) -> Span:
    """The first n ids of a span."""
    out: Span = []
    for start, length in span:
        if n <= 0:
            break
        out.append((start, min(length, n)))
        n -= length
    return out


def _with_loss(span: Iterable[tuple[int, int]], loss: bool) -> list[tuple[int, int, bool]]:
    return [(start, length, loss) for start, length in span]


# --- measuring a file -----------------------------------------------------------------------------


def encode_pipelined(
    encoder: LlamaFactoryEncoder, batches: Iterable[tuple[Any, list[Aligned]]], ahead: int = 2
) -> Iterator[tuple[Any, list, dict[str, Any]]]:
    """(meta, sides, columns) of each (meta, aligned samples) batch, as finish_batch gives them
    (sides as segments: side_counts measures them).

    The Rust tokenizer runs without the GIL: while a worker thread encodes the next batches
    (`ahead` of them queued, so it never waits for this thread), this thread reads and plans the
    ones after and turns the finished one into ids and columns (Python work, kept off the worker
    so that the tokenizer never waits for the GIL)."""
    pending: deque = deque()

    def finish() -> tuple[Any, list, dict[str, Any]]:
        meta, plans, future = pending.popleft()
        return meta, *encoder.finish_batch(plans, Encoded(*future.result()))

    with ThreadPoolExecutor(max_workers=1) as pool:
        for meta, aligned in batches:
            plans, texts = encoder.plan_batch(aligned)
            pending.append((meta, plans, pool.submit(encoder.encode_parts, encoder.parts(texts))))
            if len(pending) > ahead:
                yield finish()
        while pending:
            yield finish()


def side_counts(side: Segments) -> tuple[int, int, int]:
    """(untruncated length, length after cutoff_len, loss tokens) of a side."""
    full, segments = side
    return full, sum(n for _, n, _ in segments), sum(n for _, n, loss in segments if loss)


def row_value(payload: Any) -> Any:
    """A row's value: a payload of JSON bytes parsed (orjson where it is installed, 3x faster;
    rows it refuses, integers over 64 bits or lone surrogates, by the standard library), any
    other payload as it is."""
    if not isinstance(payload, bytes):
        return payload
    try:
        return _orjson_loads(payload)
    except ValueError:
        return json.loads(payload)


try:
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - orjson comes with LLaMA-Factory's dependencies
    _orjson_loads = json.loads

Batch = tuple[list[int], list[Any]]  # (lines, payloads): rows as row_value reads them


def measure_part(
    encoder: LlamaFactoryEncoder, batches: list[Batch], sink: Any = None
) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """(line, side_counts of each side) of every sample the processor keeps, in order, of one part
    of the data (qwenft.data.parallel: in a worker process or in this one); sink, if given, takes
    the columns of each batch (finish_batch's)."""
    kind = encoder.kind
    prepare = encoder.with_images
    aligned = (
        (lines, [align(prepare(row_value(p)), kind) for p in payloads])
        for lines, payloads in batches
    )
    measured = []
    for lines, sides, columns in encode_pipelined(encoder, aligned):
        if sink is not None:
            sink(columns)
        for line, enc in zip(lines, sides, strict=True):
            if enc is not None:
                measured.append((line, [side_counts(side) for side in enc]))
    return measured


def checked_batches(
    path: Path,
    kind: str,
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
    *,
    checked: bool = False,
) -> Iterator[Batch]:
    """Batches of the valid rows of a data file, checked as `kind` (rows of another kind are
    skipped), as (lines, one-line JSON bytes). counts, if given, receives "rows" (rows read) and
    "skipped" (rows with check errors).

    checked: the file has just passed the check as `kind` (every row valid): a .jsonl's rows are
    then passed on unparsed (jsonl_payloads), as qwenft.data.prepare reads them; parsing and
    checking each row again here was most of this process's serial work."""
    counts = counts if counts is not None else {}
    counts.update(rows=0, skipped=0)
    path, fh, mode = open_data_file(path)
    lines: list[int] = []
    raws: list[bytes] = []
    with fh:
        rows = jsonl_payloads(fh) if checked and mode == "jsonl" else _valid(fh, mode, kind, counts)
        for line, raw in rows:
            counts["rows"] += 1
            lines.append(line)
            raws.append(raw)
            if len(lines) >= batch_size:
                yield lines, raws
                lines, raws = [], []
    if lines:
        yield lines, raws


def _valid(fh: Any, mode: str, kind: str, counts: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    """(line, JSON bytes) of each row that passes the check as `kind`; the others counted in
    counts["rows"] and counts["skipped"]."""
    col = Collector()
    checker = RowRules(col, kind, mode)
    for line, value, raw in iter_rows(fh, mode, col):
        if value is BAD or not checker.check(value, line, raw):
            counts["rows"] += 1
            counts["skipped"] += 1
            continue
        yield line, raw


def iter_token_sides(
    path: Path,
    kind: str,
    build: Callable[[], LlamaFactoryEncoder],
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
    workers: int = 1,
    *,
    checked: bool = False,
) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    """(line, sides) for each valid sample in file order, a side being side_counts() of one
    sequence LLaMA-Factory trains on (a pair has two: chosen, rejected), measured by the encoder
    build() makes, in `workers` processes (qwenft.data.parallel.run_parts: parts of about
    PART_ROWS rows). counts and checked: as checked_batches; counts also gets "dropped" (rows
    LLaMA-Factory's processor would drop), complete once the iterator is."""
    counts = counts if counts is not None else {}

    def parts() -> Iterator[tuple[list[Batch]]]:
        part: list[Batch] = []
        for batch in checked_batches(path, kind, batch_size, counts, checked=checked):
            part.append(batch)
            if len(part) * batch_size >= parallel.PART_ROWS:
                yield (part,)
                part = []
        if part:
            yield (part,)

    kept = 0
    for measured in parallel.run_parts(measure_part, parts(), workers, build):
        kept += len(measured)
        yield from measured
    counts["dropped"] = counts["rows"] - counts["skipped"] - kept


def iter_token_lengths(
    path: Path,
    encoder: LlamaFactoryEncoder,
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[int, int, int, int]]:
    """(line, untruncated length, length after cutoff_len, loss tokens) for each valid sample.

    A pair counts as its longer side for the untruncated length (it decides over-length) and as
    both sides for the tokens kept and the loss tokens (iter_token_sides has each side).
    counts: as iter_token_sides.
    """
    for line, sides in iter_token_sides(path, encoder.kind, lambda: encoder, batch_size, counts):
        if len(sides) == 1:
            yield line, *sides[0]
        else:
            yield (
                line,
                max(s[0] for s in sides),
                sum(s[1] for s in sides),
                sum(s[2] for s in sides),
            )
