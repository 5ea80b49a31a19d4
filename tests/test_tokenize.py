"""qwenft's fast tokenizer (qwenft.data.prepare.write_tokenized) writes the very DatasetDict that
LLaMA-Factory 0.9.5's get_dataset saves at tokenized_path for the same train config: same splits,
same features, same rows sample by sample (model tier: the tiny models' real Qwen vocabulary).

Each case is one generated data file that groups several behaviours (system prompts, multi-turn,
truncation, tools, reasoning, masking, the validation split, KTO's KL rotation, packing), and
checks that its data really exercised them, so that equal outputs mean something."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.builders import write_jsonl
from tests.helpers.lf_reference import lf_tokenized, load_splits

Splits = dict[str, tuple[str, list[dict]]]
IGNORE = -100

# --------------------------------------------------------------------------------------------------
# the data: deterministic, built here in plain Python

SYSTEM = "You are a careful tutor. 你是一位耐心的老师 🧑‍🏫"
DEFAULT_SYSTEM = "Answer briefly. 请简短回答。"
LONG = " ".join(f"第{i}句：the quick brown fox 🦊 jumps over {i} lazy dogs." for i in range(12))
REASON = "REASONING"  # every reasoning block holds this word; no answer does


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _think(reasoning: str, answer: str) -> str:
    return f"<think>\n{REASON}: {reasoning}\n</think>\n\n{answer}"


def sft_rows() -> list[dict]:
    """15 conversations: a system message on every third, 1-3 user/assistant pairs, a long first
    question on some and a long last answer on others (they pass a cutoff of 64)."""
    rows = []
    for i in range(15):
        messages = [_m("system", f"{SYSTEM} #{i}")] if i % 3 == 0 else []
        turns = 1 + i % 3
        for t in range(turns):
            question = LONG if i % 4 == 3 and t == 0 else f"问题 {i}.{t}: what is {i} + {t}? 🤔"
            answer = LONG if i % 5 == 4 and t == turns - 1 else f"答案是 {i + t}. It is {i + t} ✅"
            messages += [_m("user", question), _m("assistant", answer)]
        rows.append({"messages": messages})
    return rows


WEATHER = {
    "name": "get_weather",
    "description": "当前天气 for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "城市 name"}},
        "required": ["city"],
    },
}
CONVERT = {
    "name": "convert_currency",
    "description": "Convert an amount between currencies 💱",
    "parameters": {
        "type": "object",
        "properties": {
            "amount": {"type": "number"},
            "from": {"type": "string"},
            "to": {"type": "string"},
        },
        "required": ["amount", "from", "to"],
    },
}


def _call(name: str, **arguments: object) -> dict:
    return {"name": name, "arguments": arguments}


def tool_rows() -> list[dict]:
    """Tool calls (one, two in parallel, one then a follow-up turn), a tools row answered without
    a call, and plain rows without tools, in one file."""
    tools = json.dumps([WEATHER, CONVERT], ensure_ascii=False)
    one = json.dumps(_call("get_weather", city="北京"), ensure_ascii=False)
    both = json.dumps(
        [
            _call("get_weather", city="上海"),
            _call("convert_currency", amount=100, to="EUR", **{"from": "CNY"}),
        ],
        ensure_ascii=False,
    )
    return [
        {
            "messages": [
                _m("user", "北京天气怎么样？☔"),
                _m("function_call", one),
                _m("tool", json.dumps({"temp": 21, "sky": "晴"}, ensure_ascii=False)),
                _m("assistant", "北京今天晴，21°C ☀️"),
            ],
            "tools": tools,
        },
        {"messages": [_m("user", "What is 2 + 2?"), _m("assistant", "4")]},
        {
            "messages": [
                _m("system", SYSTEM),
                _m("user", "Weather in Shanghai, and 100 CNY in euros? 🌧️💶"),
                _m("function_call", both),
                _m("tool", json.dumps([{"temp": 18}, {"amount": 12.9}])),
                _m("assistant", "上海 18°C; 100 CNY is about 12.90 EUR."),
            ],
            "tools": tools,
        },
        {
            "messages": [_m("user", "Say hello in Chinese."), _m("assistant", "你好 👋")],
            "tools": tools,
        },
        {
            "messages": [
                _m("user", "Is it raining in 广州?"),
                _m(
                    "function_call",
                    json.dumps(_call("get_weather", city="广州"), ensure_ascii=False),
                ),
                _m("tool", '{"rain": true}'),
                _m("assistant", "Yes, it is raining 🌧️"),
                _m("user", "Thanks! 谢谢"),
                _m("assistant", "不客气 😊"),
            ],
            "tools": tools,
        },
        {"messages": [_m("system", SYSTEM), _m("user", "你好"), _m("assistant", "你好！")]},
    ]


def thinking_rows() -> list[dict]:
    """Answers with and without a reasoning block, in the last and in earlier turns."""
    return [
        {"messages": [_m("user", "What is 3 * 7?"), _m("assistant", _think("3*7", "21"))]},
        {"messages": [_m("user", "Capital of France?"), _m("assistant", "Paris 🇫🇷")]},
        {
            "messages": [
                _m("user", "天空为什么是蓝色的？"),
                _m("assistant", _think("瑞利散射 🌈", "因为瑞利散射。")),
                _m("user", "And sunsets?"),
                _m("assistant", "They are red."),
            ]
        },
        {
            "messages": [
                _m("user", "Hi"),
                _m("assistant", "Hello!"),
                _m("user", "12 * 12?"),
                _m("assistant", _think("12*12 = 144", "144")),
            ]
        },
        {
            "messages": [
                _m("system", SYSTEM),
                _m("user", "1 + 1 = ? 🤔"),
                _m("assistant", _think("一加一", "2")),
                _m("user", "2 + 2 = ?"),
                _m("assistant", _think("二加二", "4")),
            ]
        },
    ]


def history_rows() -> list[dict]:
    """Three-pair conversations with long early turns and a short last one, and short rows."""
    rows = []
    for i in range(8):
        if i % 4 == 3:
            rows.append(
                {"messages": [_m("user", f"短问题 {i}"), _m("assistant", f"短答案 {i} 👍")]}
            )
            continue
        rows.append(
            {
                "messages": [
                    _m("user", f"{i}: {LONG}"),
                    _m("assistant", f"Long answer {i}: {LONG}"),
                    _m("user", f"第二个问题 {i}?"),
                    _m("assistant", f"第二个答案 {i} 🎯 " * 3),
                    _m("user", f"Last {i}?"),
                    _m("assistant", f"最后 {i} ✅"),
                ]
            }
        )
    return rows


def _pair(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {
        "messages": prompt,
        "chosen": _m("assistant", chosen),
        "rejected": _m("assistant", rejected),
    }


def pair_rows() -> list[dict]:
    """10 preference pairs: single and multi-turn prompts, a system message, a long chosen answer
    (row 3) and a long prompt (row 6)."""
    rows = []
    for i in range(10):
        prompt = [_m("system", SYSTEM)] if i % 4 == 0 else []
        if i % 3 == 2:
            prompt += [_m("user", f"先问 {i}"), _m("assistant", f"先答 {i}")]
        prompt.append(_m("user", LONG if i == 6 else f"问题 {i}: {i} squared? 🔢"))
        chosen = LONG if i == 3 else f"{i * i} ✅"
        rows.append(_pair(prompt, chosen, f"{i * i + 1} ❌"))
    return rows


def kto_rows() -> list[dict]:
    """11 KTO rows, labels mixed (not simply alternating), row 5 with a long answer."""
    rows = []
    for i in range(11):
        good = i % 3 != 1
        answer = LONG if i == 5 else (f"正确 {i} ✅" if good else f"wrong {i} ❌")
        messages = [_m("system", SYSTEM)] if i % 4 == 0 else []
        messages += [_m("user", f"问题 {i}: {i} + {i}? 🤔"), _m("assistant", answer)]
        rows.append({"messages": messages, "label": good})
    return rows


def text_rows() -> list[dict]:
    """13 texts from a few tokens to a few dozen."""
    return [
        {"text": f"文档 {i} 📄 " + "the cat sat on the mat, 猫坐在垫子上. " * (i % 5)}
        for i in range(13)
    ]


# --------------------------------------------------------------------------------------------------
# what each case's data must have exercised


@cache
def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _text(model_dir: Path, ids: list[int]) -> str:
    return _tokenizer(model_dir).decode(ids, skip_special_tokens=False)


def _loss_text(model_dir: Path, labels: list[int]) -> str:
    return _text(model_dir, [x for x in labels if x != IGNORE])


def _prompt_text(model_dir: Path, row: dict) -> str:
    return _text(
        model_dir, [i for i, x in zip(row["input_ids"], row["labels"], strict=True) if x == IGNORE]
    )


def _rows(splits: Splits) -> list[dict]:
    return [row for _, rows in splits.values() for row in rows]


def _mixed_labels(rows: list[dict], key: str = "labels") -> bool:
    return any(IGNORE in r[key] for r in rows) and any(x != IGNORE for r in rows for x in r[key])


def check_sft(splits: Splits, model_dir: Path) -> None:
    """Both splits; rows cut at cutoff_len and shorter ones; the default system and own ones."""
    rows = _rows(splits)
    assert sorted(splits) == ["train", "validation"] and len(splits["validation"][1]) == 3
    lengths = [len(r["input_ids"]) for r in rows]
    assert max(lengths) == 64 and lengths.count(64) >= 3 and min(lengths) < 64
    assert _mixed_labels(rows)
    texts = [_text(model_dir, r["input_ids"]) for r in rows]
    assert any(DEFAULT_SYSTEM in t for t in texts) and any(SYSTEM in t for t in texts)


def check_tools(splits: Splits, model_dir: Path) -> None:
    """Tools prompts only where a row has tools; single and parallel calls trained on."""
    rows = _rows(splits)
    texts = [_text(model_dir, r["input_ids"]) for r in rows]
    assert sum("<tools>" in t for t in texts) == 4  # the two rows without tools have none
    assert sum("<tool_response>" in t for t in texts) == 3
    calls = [_loss_text(model_dir, r["labels"]).count("<tool_call>") for r in rows]
    assert sorted(calls) == [0, 0, 0, 1, 1, 2]  # trained on; two calls in parallel
    assert _mixed_labels(_rows(splits))


def check_tools_and_thinking(splits: Splits, model_dir: Path) -> None:
    """Tools prompts where a row has tools; reasoning trained on, as check_thinking."""
    texts = [_text(model_dir, r["input_ids"]) for r in _rows(splits)]
    assert sum("<tools>" in t for t in texts) == 4
    check_thinking(splits, model_dir)


def check_thinking(splits: Splits, model_dir: Path) -> None:
    """enable_thinking true: reasoning trained on, an empty block added to plain answers."""
    rows = _rows(splits)
    losses = [_loss_text(model_dir, r["labels"]) for r in rows]
    assert any(REASON in t for t in losses)  # the last answer's reasoning is trained on
    assert any("<think>\n\n</think>" in t for t in losses)  # an empty one for plain answers


def check_not_thinking(splits: Splits, model_dir: Path) -> None:
    """enable_thinking false: no reasoning trained on; the empty block in every prompt."""
    rows = _rows(splits)
    assert not any(REASON in _loss_text(model_dir, r["labels"]) for r in rows)
    assert all("<think>\n\n</think>" in _prompt_text(model_dir, r) for r in rows)


def check_nothink_template(splits: Splits, model_dir: Path) -> None:
    """qwen3_nothink: reasoning kept verbatim as text; no empty blocks added."""
    rows = _rows(splits)
    assert any(REASON in _loss_text(model_dir, r["labels"]) for r in rows)  # verbatim content
    assert not any("<think>\n\n</think>" in _text(model_dir, r["input_ids"]) for r in rows)


def check_mask_history(splits: Splits, model_dir: Path) -> None:
    """mask_history: rows cut from the front; the last answer whole and the only loss."""
    rows = _rows(splits)
    im_end = _tokenizer(model_dir).convert_tokens_to_ids("<|im_end|>")
    assert sum(len(r["input_ids"]) == 48 for r in rows) >= 4  # truncated...
    for r in rows:  # ...from the front: the last answer is kept whole and is the only loss
        loss = [x for x in r["labels"] if x != IGNORE]
        assert r["labels"][-2] == im_end and loss.count(im_end) == 1


def check_train_on_prompt(splits: Splits, model_dir: Path) -> None:
    """train_on_prompt: every token is a label; rows cut at cutoff_len."""
    rows = _rows(splits)
    assert sum(len(r["input_ids"]) == 48 for r in rows) >= 4
    assert all(r["labels"] == r["input_ids"] for r in rows)


def check_pairs(splits: Splits, model_dir: Path) -> None:
    """Two validation pairs (val_size 2); the long chosen answer cut at cutoff_len."""
    rows = _rows(splits)
    assert sorted(splits) == ["train", "validation"] and len(splits["validation"][1]) == 2
    assert max(len(r["chosen_input_ids"]) for r in rows) == 64  # the long chosen answer
    assert any(LONG[:20] in _text(model_dir, r["chosen_input_ids"]) for r in rows)
    assert _mixed_labels(rows, "chosen_labels") and _mixed_labels(rows, "rejected_labels")


def check_kto(splits: Splits, model_dir: Path) -> None:
    """Both labels; the long row cut; KL completions rotated within each batch."""
    rows = _rows(splits)
    assert len(rows) == 11 and {r["kto_tags"] for r in rows} == {True, False}
    assert max(len(r["input_ids"]) for r in rows) == 96
    assert sum(r["kl_input_ids"] != r["input_ids"] for r in rows) >= 9  # the KL rotation
    assert _mixed_labels(rows) and _mixed_labels(rows, "kl_labels")


def _check_blocks(splits: Splits, model_dir: Path, block: int) -> None:
    rows = _rows(splits)
    eos = _tokenizer(model_dir).eos_token_id
    assert len(rows) >= 4 and {len(r["input_ids"]) for r in rows} == {block}
    assert sum(r["input_ids"].count(eos) for r in rows) >= 4  # several texts in a block


def check_packed(splits: Splits, model_dir: Path) -> None:
    """packing set true: DataArguments takes one off cutoff_len (32 -> blocks of 31)."""
    _check_blocks(splits, model_dir, 31)


def check_packed_by_default(splits: Splits, model_dir: Path) -> None:
    """packing unset: the parser turns it on for pt after that, so blocks of the full 32."""
    _check_blocks(splits, model_dir, 32)


def check_truncated_texts(splits: Splits, model_dir: Path) -> None:
    """packing false: one row per text, the long ones cut at cutoff_len."""
    lengths = [len(r["input_ids"]) for r in _rows(splits)]
    assert len(lengths) == 13 and max(lengths) == 16 and min(lengths) < 16


# --------------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    """One generated data file, one train config, and what its data must have exercised."""

    id: str
    preset: str
    rows: Callable[[], list[dict]]
    config: dict
    check: Callable[[Splits, Path], None]


def _sft(template: str = "qwen", **config: object) -> dict:
    return {
        "stage": "sft",
        "template": template,
        "train_on_prompt": False,
        "mask_history": False,
        **config,
    }


CASES = [
    Case(
        "sft-qwen",
        "tiny-qwen2",
        sft_rows,
        _sft(
            cutoff_len=64,
            default_system=DEFAULT_SYSTEM,
            val_size=0.2,
            seed=42,
            preprocessing_num_workers=2,
        ),
        check_sft,
    ),
    Case("sft-tools", "tiny-qwen2", tool_rows, _sft(cutoff_len=512), check_tools),
    Case(
        "sft-qwen3-thinking",
        "tiny-qwen3",
        thinking_rows,
        _sft("qwen3", cutoff_len=256, enable_thinking=True),
        check_thinking,
    ),
    Case(
        "sft-qwen3-not-thinking",
        "tiny-qwen3",
        thinking_rows,
        _sft("qwen3", cutoff_len=256, enable_thinking=False),
        check_not_thinking,
    ),
    Case(
        "sft-qwen3-nothink",
        "tiny-qwen3",
        thinking_rows,
        _sft("qwen3_nothink", cutoff_len=256),
        check_nothink_template,
    ),
    Case(
        "sft-mask-history",
        "tiny-qwen2",
        history_rows,
        _sft(cutoff_len=48, mask_history=True),
        check_mask_history,
    ),
    Case(
        "sft-train-on-prompt",
        "tiny-qwen2",
        history_rows,
        _sft(cutoff_len=48, train_on_prompt=True),
        check_train_on_prompt,
    ),
    Case(
        "dpo",
        "tiny-qwen2",
        pair_rows,
        {"stage": "dpo", "template": "qwen", "cutoff_len": 64, "val_size": 2},
        check_pairs,
    ),
    Case(
        "kto",
        "tiny-qwen2",
        kto_rows,
        {
            "stage": "kto",
            "template": "qwen",
            "cutoff_len": 96,
            "preprocessing_batch_size": 3,
            "preprocessing_num_workers": 2,
        },
        check_kto,
    ),
    Case(
        "pt-packed",
        "tiny-qwen2",
        text_rows,
        {
            "stage": "pt",
            "template": "qwen",
            "cutoff_len": 32,
            "packing": True,
            "preprocessing_batch_size": 4,
            "preprocessing_num_workers": 2,
        },
        check_packed,
    ),
    Case(
        "pt-packed-by-default",
        "tiny-qwen2",
        text_rows,
        {"stage": "pt", "template": "qwen", "cutoff_len": 32, "preprocessing_batch_size": 4},
        check_packed_by_default,
    ),
    Case(
        "pt-unpacked",
        "tiny-qwen2",
        text_rows,
        {"stage": "pt", "template": "qwen", "cutoff_len": 16, "packing": False},
        check_truncated_texts,
    ),
]


def _first_difference(ours: Splits, lf: Splits) -> str | None:
    """Where ours first differs from LLaMA-Factory's: split names, features, row count, then the
    first row and column that differ (for a list, its first differing position), both values."""
    if sorted(ours) != sorted(lf):
        return f"splits: ours {sorted(ours)}, LLaMA-Factory {sorted(lf)}"
    for split, (lf_features, lf_rows) in lf.items():
        features, rows = ours[split]
        if features != lf_features:
            return f"{split}: features\n  ours {features}\n  LF   {lf_features}"
        if len(rows) != len(lf_rows):
            return f"{split}: {len(rows)} rows, LLaMA-Factory {len(lf_rows)}"
        for n, (row, lf_row) in enumerate(zip(rows, lf_rows, strict=True)):
            for column, want in lf_row.items():
                got = row.get(column)
                if got == want:
                    continue
                where = ""
                if isinstance(got, list) and isinstance(want, list):
                    k = next(
                        (k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                        min(len(got), len(want)),
                    )
                    where = f" (lengths {len(got)}/{len(want)}, first difference at {k})"
                    if max(len(got), len(want)) > 40:  # the neighbourhood of the difference
                        start = max(0, k - 8)
                        where += f", [{start}:{k + 16}]"
                        got, want = got[start : k + 16], want[start : k + 16]
                return f"{split} row {n} column {column}{where}\n  ours {got!r}\n  LF   {want!r}"
    return None


def _ours_and_lf(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **write: Any
) -> tuple[Splits, Splits]:
    """(write_tokenized's DatasetDict, the one LLaMA-Factory's get_dataset saves) for the case's
    data and train config; the case's check run on LLaMA-Factory's."""
    from qwenft.data.prepare import write_tokenized
    from qwenft.models.tiny import ensure_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LLAMAFACTORY_VERBOSITY", "WARN")
    model_dir = ensure_tiny_model(case.preset, progress=None)
    data = write_jsonl(tmp_path / "data.jsonl", case.rows())
    lf_tokenized(data, model_dir, dict(case.config), tmp_path / "lf", tmp_path / "lf-work")
    lf = load_splits(tmp_path / "lf")
    case.check(lf, model_dir)  # the data exercised what the case is about
    write_tokenized(data, model_dir, dict(case.config), tmp_path / "ours", **write)
    return load_splits(tmp_path / "ours"), lf


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_written_tokens_equal_llamafactory(
    case: Case, tmp_path: Path, tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_tokenized's DatasetDict equals the one LLaMA-Factory's get_dataset saves for the same
    train config, split by split and sample by sample, on data that exercises the case."""
    ours, lf = _ours_and_lf(case, tmp_path, monkeypatch)
    assert _first_difference(ours, lf) is None, _first_difference(ours, lf)
    assert ours == lf


def _two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker processes even for small data, each given several parts."""
    from qwenft.data import parallel

    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.setattr(parallel, "MIN_BYTES_FOR_WORKERS", 0)
    monkeypatch.setattr(parallel, "MIN_BYTES_PER_WORKER", 1)
    monkeypatch.setattr(parallel, "PART_ROWS", 3)


def _two_workers_of(case_id: str, **config: object) -> Case:
    case = next(c for c in CASES if c.id == case_id)
    return replace(case, config={**case.config, "preprocessing_num_workers": 2, **config})


WORKER_CASES = [
    Case(
        "sft-tools-reasoning",
        "tiny-qwen3",
        lambda: tool_rows() + thinking_rows(),
        _sft(
            "qwen3",
            cutoff_len=512,
            enable_thinking=True,
            preprocessing_num_workers=2,
            preprocessing_batch_size=2,
        ),
        check_tools_and_thinking,
    ),
    _two_workers_of("dpo", preprocessing_batch_size=2),
    _two_workers_of("kto"),  # batches of 3: the KL pairs rotate within them
    _two_workers_of("pt-packed"),  # batches of 4: each packs into its own blocks
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in WORKER_CASES])
def test_two_worker_processes_write_what_llamafactory_does(
    case: Case, tmp_path: Path, tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two worker processes, each tokenizing several parts of whole map batches into their own
    shards, write the DatasetDict LLaMA-Factory's get_dataset saves with the same
    preprocessing_num_workers (datasets.map in two processes), sample by sample."""
    _two_workers(monkeypatch)
    said: list[str] = []
    ours, lf = _ours_and_lf(case, tmp_path, monkeypatch, progress=said.append)
    assert said[0] == "tokenizing in 2 worker processes ..."
    assert len(list((tmp_path / "ours" / "train").glob("data-*.arrow"))) >= 4  # several parts
    assert _first_difference(ours, lf) is None, _first_difference(ours, lf)
    assert ours == lf


def test_a_failing_worker_leaves_no_dataset(
    tmp_path: Path, tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's part fails (a KTO row whose KL partner LLaMA-Factory drops, in the second
    shard): the error is the worker's, the other parts are stopped, nothing is left behind."""
    from qwenft.data.prepare import write_tokenized
    from qwenft.errors import QwenftError
    from qwenft.models.tiny import ensure_tiny_model

    _two_workers(monkeypatch)
    rows = kto_rows()
    rows[7] = {"messages": [_m("user", "a question without an answer")], "label": True}
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "tokenized" / "key"
    config = _two_workers_of("kto").config
    with pytest.raises(QwenftError, match="KL pairing"):
        write_tokenized(data, ensure_tiny_model("tiny-qwen2", progress=None), config, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# what is reproduced, and a tokenized folder is whole or absent


def encode(encoder: Any, texts: set[str]) -> dict[str, list[int]]:
    strings, encodings, ids = encoder.encode_raw(texts)
    return dict(zip(strings, [e.ids for e in encodings] + ids, strict=True))


def test_texts_skip_the_normalizer_only_where_nfc_changes_nothing(tiny_home: Path) -> None:
    """The encoder's ids equal the transformers tokenizer's (the one LLaMA-Factory encodes with,
    NFC normalizer included) for text NFC leaves alone, which skips the normalizer, and for text
    it changes or whose characters this Python does not know, which goes through it."""
    from qwenft.data.tokens import LlamaFactoryEncoder
    from qwenft.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    encoder = LlamaFactoryEncoder(model_dir, "qwen", 64)
    changed = {
        "cafe\u0301 e\u0301",  # decomposed: NFC composes it
        "<|im_end|>\u0338",  # NFC of the whole text would turn the token's ">" into a "≯"
        "\u212b ångström",  # the Angstrom sign: NFC makes it Å
        "\u1100\u1161 jamo",  # Hangul jamo: NFC composes a syllable
        "a\u0307\u0323",  # combining marks out of canonical order
    }
    unknown = {"emoji 😀 🧑‍🏫", "\u0378 unassigned", "\U000e0001 tag"}
    stable = {"plain ASCII <|im_start|>user\nhi<|im_end|>\n", "北京 数据 모델 Ελληνικά ﬁ"}
    rest, skipped, pieces = encoder.parts(changed | unknown | stable)
    assert set(rest) == changed | unknown and set(skipped) | set(pieces) == stable
    ids = encode(encoder, changed | unknown | stable)
    reference = _tokenizer(model_dir)
    for text in changed | unknown | stable:
        assert ids[text] == reference.encode(text, add_special_tokens=False), text
    composed = encode(encoder, {"caf\u00e9 \u00e9"})["caf\u00e9 \u00e9"]
    assert ids["cafe\u0301 e\u0301"] == composed  # NFC did apply


def test_map_batches_are_the_datasets_map_shards_and_batches() -> None:
    from qwenft.data.prepare import map_batches

    def spans(n: int, num_proc: int | None, batch: int) -> list[tuple[int, int]]:
        return [(r.start, r.stop) for r in map_batches(n, num_proc, batch)]

    # 11 rows, 2 workers: contiguous shards of 6 and 5 rows, each cut into batches of 3
    assert spans(11, 2, 3) == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert spans(11, None, 3) == spans(11, 1, 3) == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert spans(3, 16, 1000) == [(0, 1), (1, 2), (2, 3)]  # no more shards than rows
    assert spans(0, 2, 1000) == []


def test_configs_qwenft_does_not_reproduce_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenft.data import tokens
    from qwenft.data.pipeline import not_reproduced

    base = {"stage": "sft", "template": "qwen", "cutoff_len": 1024, "dataset": "d"}
    assert not_reproduced(base) is None
    assert not_reproduced({**base, "stage": "pt", "packing": True}) is None
    cases = {
        "packed sft": {"packing": True},
        "neat_packing": {"neat_packing": True},
        "a tool_format": {"tool_format": "glm4"},
        "mix_strategy interleave_once": {"dataset": "a,b", "mix_strategy": "interleave_once"},
        "stage 'ppo'": {"stage": "ppo"},
        "template 'llama3'": {"template": "llama3"},
    }
    for why, change in cases.items():
        assert not_reproduced({**base, **change}) == why
    monkeypatch.setattr(tokens, "llamafactory_version", lambda: "0.9.9")
    assert "LLaMA-Factory 0.9.9 is not a version" in not_reproduced(base)


# Several files (qwenft.data.mixture): (id, preset, each file's rows, train config, eval files)
MIXTURES = [
    ("sft-concat", sft_rows, _sft(cutoff_len=64, max_samples=6), 0),
    (
        "sft-interleave-shares-eval",
        sft_rows,
        _sft(cutoff_len=64, mix_strategy="interleave_under", interleave_probs="0.7,0.3", seed=7),
        2,
    ),
    ("sft-interleave-over", sft_rows, _sft(cutoff_len=64, mix_strategy="interleave_over"), 1),
    # KTO's KL pairs and pt's packed blocks run across the border of the files in a batch
    (
        "kto-concat",
        kto_rows,
        {"stage": "kto", "template": "qwen", "cutoff_len": 64, "preprocessing_batch_size": 5},
        0,
    ),  # fmt: skip
    (
        "pt-packed-interleave",
        text_rows,
        {
            "stage": "pt",
            "template": "qwen",
            "cutoff_len": 32,
            "preprocessing_batch_size": 4,
            "mix_strategy": "interleave_under",
        },
        0,
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    ("rows", "config", "n_evals"),
    [pytest.param(r, c, n, id=i) for i, r, c, n in MIXTURES],
)
def test_mixtures_equal_llamafactory(
    rows: Callable[[], list[dict]],
    config: dict,
    n_evals: int,
    tmp_path: Path,
    tiny_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several training files (uneven: the later ones shorter) and evaluation files, merged as
    LLaMA-Factory merges them (concat, interleave at shares and the seed, interleave_over): the
    DatasetDict write_tokenized writes equals the one its get_dataset saves."""
    from qwenft.data.pipeline import DataFiles
    from qwenft.data.prepare import write_tokenized
    from qwenft.models.tiny import ensure_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LLAMAFACTORY_VERBOSITY", "WARN")
    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    every = rows()
    train = [
        write_jsonl(tmp_path / "train0.jsonl", every[:9]),
        write_jsonl(tmp_path / "train1.jsonl", every[9:13]),
    ]
    evals = [write_jsonl(tmp_path / f"eval{k}.jsonl", every[k::4]) for k in range(n_evals)]
    files = DataFiles(tuple(train), tuple(evals))
    lf_tokenized(files, model_dir, dict(config), tmp_path / "lf", tmp_path / "lf-work")
    lf = load_splits(tmp_path / "lf")
    assert ("validation" in lf) == bool(n_evals)
    config = {
        **config,
        "dataset": "a,b",
        **({"eval_dataset": ",".join("e" * n_evals)} if n_evals else {}),
    }
    write_tokenized(files, model_dir, config, tmp_path / "ours")
    ours = load_splits(tmp_path / "ours")
    assert _first_difference(ours, lf) is None, _first_difference(ours, lf)
    assert ours == lf


def test_files_other_than_train_yaml_names_are_left_to_llamafactory() -> None:
    from qwenft.data.pipeline import DataFiles, DataSpec

    spec = DataSpec.from_config(
        {
            "stage": "sft",
            "template": "qwen",
            "cutoff_len": 64,
            "dataset": "a,b",
            "eval_dataset": "e",
        }
    )
    assert (spec.n_datasets, spec.n_evals) == (2, 1)
    assert "names 2 dataset(s) and 1 eval" in (spec.for_data(Path("a.jsonl")).lf_tokenizes or "")
    files = DataFiles((Path("a.jsonl"), Path("b.jsonl")), (Path("e.jsonl"),))
    assert spec.for_data(files).lf_tokenizes is None


def test_a_tokenized_folder_is_written_whole_or_not_at_all(
    tmp_path: Path, tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft import fsutil
    from qwenft.data import prepare
    from qwenft.data.tokens import LlamaFactoryEncoder
    from qwenft.errors import QwenftError
    from qwenft.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows())
    config = {"stage": "sft", "template": "qwen", "cutoff_len": 64, "preprocessing_batch_size": 2}
    out = tmp_path / "tokenized" / "key"

    def leftovers() -> list[str]:
        return sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []

    # fails after the first batch: neither the folder nor a partial copy remains
    real_finish = LlamaFactoryEncoder.finish_batch
    calls = []

    def failing(self: LlamaFactoryEncoder, plans: list, enc: Any) -> tuple:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return real_finish(self, plans, enc)

    monkeypatch.setattr(LlamaFactoryEncoder, "finish_batch", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare.write_tokenized(data, model_dir, config, out)
    assert leftovers() == []
    monkeypatch.setattr(LlamaFactoryEncoder, "finish_batch", real_finish)

    # another node renames its copy into place first: that one is kept, ours is discarded
    real_rename = fsutil.os.rename

    def other_node_first(src: str, dst: str) -> None:
        Path(dst).mkdir()
        (Path(dst) / "theirs").write_text("")
        real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", other_node_first)
    stats = prepare.write_tokenized(data, model_dir, config, out, marker=".done")
    assert stats.n_samples == len(sft_rows())
    assert leftovers() == ["key"] and [p.name for p in out.iterdir()] == ["theirs"]
    monkeypatch.setattr(fsutil.os, "rename", real_rename)

    # a folder already there is never overwritten
    with pytest.raises(QwenftError, match="already exists"):
        prepare.write_tokenized(data, model_dir, config, out)
    shutil.rmtree(out)
    prepare.write_tokenized(data, model_dir, config, out, marker=".done")
    assert (out / ".done").is_file() and (out / "dataset_dict.json").is_file()
    assert leftovers() == ["key"]
