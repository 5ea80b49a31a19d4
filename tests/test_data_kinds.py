"""Data for each training stage (qwenft.data.kinds): preference pairs, KTO, pre-training text.

LLaMA-Factory's demo shapes (written here) convert, check and register; the bad-input corpus of
the new kinds; the pair structure and the KTO label survive convert; token statistics of pairs,
KTO and text equal LLaMA-Factory's own preprocessing (model tier).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenft.data.check import check_file, format_report, require_valid
from qwenft.data.convert import convert_file, materialize_pt_jsonl, parse_fill
from qwenft.data.kinds import detect_file_kind, row_kind
from qwenft.data.registry import dataset_entry, register_dataset
from qwenft.data.split import split_file
from qwenft.errors import QwenftError
from tests.helpers.builders import lines, table, write
from tests.helpers.cli import invoke_data as invoke
from tests.helpers.lf_reference import lf_rows

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
S = {"role": "system", "content": "Be brief."}
GOOD_A = {"role": "assistant", "content": "Hello, how can I help?"}
BAD_A = {"role": "assistant", "content": "Go away."}
PAIR = {"messages": [U], "chosen": GOOD_A, "rejected": BAD_A}
KTO_T = {"messages": [U, GOOD_A], "label": True}
KTO_F = {"messages": [U, BAD_A], "label": False}
TEXT = {"text": "Once upon a time there was a tokenizer."}
TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function_call",
}


def pair(*context: dict, chosen: object = GOOD_A, rejected: object = BAD_A, **extra) -> dict:
    return {"messages": list(context), "chosen": chosen, "rejected": rejected, **extra}


def kto(*messages: dict, label: object = True, **extra) -> dict:
    return {"messages": list(messages), "label": label, **extra}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    folder = tmp_path / "registry"
    folder.mkdir()
    (folder / "dataset_info.json").write_text('{"old": {"file_name": "old.jsonl"}}\n')
    return folder


# --------------------------------------------------------------------------------------------------
# LLaMA-Factory's demo shapes: convert, check and register

LF_DEMOS = [
    # (id, file name, rows, expected kind, expected first converted row)
    (
        "dpo_en_demo",
        "dpo_en_demo.json",
        [
            {
                "conversations": [{"from": "human", "value": "Hi {{ . }}"}],
                "chosen": {"from": "gpt", "value": "Hello!"},
                "rejected": {"from": "gpt", "value": "No."},
            },
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                    {"from": "human", "value": "Q2"},
                ],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            },
        ],
        "preference",
        {
            "messages": [{"role": "user", "content": "Hi {{ . }}"}],
            "chosen": {"role": "assistant", "content": "Hello!"},
            "rejected": {"role": "assistant", "content": "No."},
        },
    ),
    (
        "kto_en_demo",
        "kto_en_demo.json",
        [
            {
                "messages": [
                    {"content": "Q", "role": "user"},
                    {"content": "A", "role": "assistant"},
                ],
                "label": True,
            },
            {
                "messages": [
                    {"content": "Q", "role": "user"},
                    {"content": "bad", "role": "assistant"},
                ],
                "label": False,
            },
        ],
        "kto",
        {
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "label": True,
        },
    ),
    (
        "c4_demo",
        "c4_demo.jsonl",
        [{"text": "A document."}, {"text": "Another one,\nin two lines."}],
        "pt",
        {"text": "A document."},
    ),
    (
        "alpaca_ranking",
        "comparison.json",
        [{"instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": "bye"}],
        "preference",
        {
            "messages": [{"role": "user", "content": "Translate\nbonjour"}],
            "chosen": {"role": "assistant", "content": "hello"},
            "rejected": {"role": "assistant", "content": "bye"},
        },
    ),
    (
        "sharegpt_kto",
        "kto_sharegpt.json",
        [
            {
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                "kto_tag": False,
            },
            {
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "B"}],
                "kto_tag": True,
            },
        ],
        "kto",
        {
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "label": False,
        },
    ),
    (
        "alpaca_kto",
        "kto_alpaca.json",
        [
            {"instruction": "Q", "output": "A", "kto_tag": False},
            {"instruction": "Q", "output": "B", "kto_tag": True},
        ],
        "kto",
        {
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "label": False,
        },
    ),
    (
        "trl_preference_strings",
        "trl.jsonl",
        [{"prompt": "P", "chosen": "good", "rejected": "bad"}],
        "preference",
        {
            "messages": [{"role": "user", "content": "P"}],
            "chosen": {"role": "assistant", "content": "good"},
            "rejected": {"role": "assistant", "content": "bad"},
        },
    ),
    (
        "ultrafeedback_binarized",
        "uf.jsonl",
        [
            {
                "prompt": "P",
                "prompt_id": "x",
                "score_chosen": 8.0,
                "score_rejected": 3.0,
                "chosen": [
                    {"role": "user", "content": "P"},
                    {"role": "assistant", "content": "good"},
                ],
                "rejected": [
                    {"role": "user", "content": "P"},
                    {"role": "assistant", "content": "bad"},
                ],
            }
        ],
        "preference",
        {
            "messages": [{"role": "user", "content": "P"}],
            "chosen": {"role": "assistant", "content": "good"},
            "rejected": {"role": "assistant", "content": "bad"},
        },
    ),
    (
        "trl_implicit_prompt",
        "implicit.jsonl",
        [{"chosen": [S, U, GOOD_A], "rejected": [S, U, BAD_A]}],
        "preference",
        {"messages": [S, U], "chosen": GOOD_A, "rejected": BAD_A},
    ),
    (
        "trl_conversational_prompt",
        "conv.jsonl",
        [{"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]}],
        "preference",
        {"messages": [U], "chosen": GOOD_A, "rejected": BAD_A},
    ),
    (
        "trl_kto",
        "trl_kto.jsonl",
        [
            {"prompt": "P", "completion": "yes", "label": True},
            {"prompt": [U], "completion": [BAD_A], "label": False},
        ],
        "kto",
        {
            "messages": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "yes"}],
            "label": True,
        },
    ),
    (
        "openai_weight_one",
        "openai.jsonl",
        [{"messages": [U, {**A, "weight": 1}], "system": "S"}],
        "sft",
        {"messages": [{"role": "system", "content": "S"}, U, A]},
    ),
    (
        "native_pair_round_trip",
        "pairs.jsonl",
        [pair(S, U, A, U, tools="")],
        "preference",
        pair(S, U, A, U),
    ),
    (
        "text_with_metadata",
        "c4.jsonl",
        [{"text": "Doc", "timestamp": "2019", "url": "https://x"}],
        "pt",
        {"text": "Doc"},
    ),
]


@table("case_id,name,rows,kind,first", LF_DEMOS)
def test_demo_shapes_convert_check_and_register(
    tmp_path: Path, data_app, case_id, name, rows, kind, first
) -> None:
    content = json.dumps(rows, indent=2).encode() if name.endswith(".json") else lines(*rows)
    src = write(tmp_path, content, name)
    out = tmp_path / "out.jsonl"
    result = invoke(data_app, "convert", src, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == kind and report["n_out"] == len(rows)
    converted = [json.loads(x) for x in out.read_text().splitlines()]
    assert converted[0] == first
    if kind == "kto":  # the label survives, as it was
        assert [r["label"] for r in converted] == [r.get("label", r.get("kto_tag")) for r in rows]
    check = check_file(out)
    assert check.ok and check.kind == kind and check.n_warnings == 0, format_report(check)
    result = invoke(data_app, "check", out, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["kind"] == kind
    result = invoke(
        data_app, "register", out, "--name", "demo", "--dataset-dir", tmp_path / "reg", "--json"
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "reg" / "dataset_info.json").read_text())["demo"]
    assert entry == dataset_entry(out, kind=kind)


def test_demo_files_are_named_for_what_they_are(tmp_path: Path, data_app) -> None:
    """Before: a DPO file was told "looks like ShareGPT" and then "ends with a user turn"; a KTO
    file passed with its label called "not used by LLaMA-Factory"; a text file was a dead end."""
    dpo = write(tmp_path, lines(LF_DEMOS[0][2][0]), "dpo.jsonl")
    result = invoke(data_app, "check", dpo)
    assert result.exit_code == 2 and "sharegpt preference (ranking) data" in result.output
    assert "ends with" not in result.output
    kto_file = write(tmp_path, lines(KTO_T, KTO_F), "kto.jsonl")
    result = invoke(data_app, "check", kto_file)
    assert result.exit_code == 0 and "kto data" in result.output
    assert "not used" not in result.output
    text = write(tmp_path, lines(TEXT), "c4.jsonl")
    result = invoke(data_app, "check", text, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["kind"] == "pt"


# --------------------------------------------------------------------------------------------------
# good files of each kind

GOOD_KIND_CASES = [
    # (id, content, file name, kind, n)
    ("pair", lines(PAIR), "a.jsonl", "preference", 1),
    ("pair_multi_turn", lines(pair(S, U, A, U), pair(U)), "a.jsonl", "preference", 2),
    (
        "pair_after_tool",
        lines(
            pair(
                U,
                {"role": "function_call", "content": json.dumps({"name": "f", "arguments": {}})},
                {"role": "tool", "content": "1"},
                tools=json.dumps([{"name": "f"}]),
            )
        ),
        "a.jsonl",
        "preference",
        1,
    ),
    (
        "pair_json_array",
        json.dumps([PAIR, pair(S, U)], indent=2).encode(),
        "a.json",
        "preference",
        2,
    ),
    ("kto_both_labels", lines(KTO_T, KTO_F), "a.jsonl", "kto", 2),
    ("kto_multi_turn", lines(kto(S, U, A, U, GOOD_A), KTO_F), "a.jsonl", "kto", 2),
    ("pt_jsonl", lines(TEXT, {"text": "中文 😀"}), "a.jsonl", "pt", 2),
    ("pt_txt_lines", b"First line\nsecond line\r\nThird\rfourth", "a.txt", "pt", 4),
    ("pt_txt_bom_one_block", b"\xef\xbb\xbfOnly one document.", "a.txt", "pt", 1),
    ("sft_weight_one", lines({"messages": [U, {**A, "weight": 1}]}), "a.jsonl", "sft", 1),
    ("sft_weight_zero_user", lines({"messages": [{**U, "weight": 0}, A]}), "a.jsonl", "sft", 1),
]


@table("case_id,content,name,kind,n", GOOD_KIND_CASES)
def test_good_files_of_each_kind(tmp_path: Path, data_app, case_id, content, name, kind, n) -> None:
    path = write(tmp_path, content, name)
    report = check_file(path)
    assert report.ok and report.n_warnings == 0, format_report(report)
    assert (report.kind, report.n_samples, report.n_valid) == (kind, n, n)
    assert detect_file_kind(path) == kind
    result = invoke(data_app, "check", path)
    assert result.exit_code == 0 and f"{kind} data" in result.output


def test_txt_lines_as_llamafactory_reads_them_and_blocks_when_asked(tmp_path: Path) -> None:
    from qwenft.data.reader import Collector, iter_rows, open_data_file

    path = write(tmp_path, b"a\n  b \n\n \nc\r\n\nd\n", "t.txt")
    _, fh, mode = open_data_file(path)
    with fh:  # the default: one row per line, blank ones included, the lines as they are
        rows = [(line, value) for line, value, _ in iter_rows(fh, mode, Collector())]
    assert rows == [
        (1, {"text": "a"}),
        (2, {"text": "  b "}),
        (3, {"text": ""}),
        (4, {"text": " "}),
        (5, {"text": "c"}),
        (6, {"text": ""}),
        (7, {"text": "d"}),
    ]
    _, fh, _ = open_data_file(path)
    with fh:  # blocks only when asked for
        rows = [(line, value) for line, value, _ in iter_rows(fh, "txt-blocks", Collector())]
    assert rows == [(1, {"text": "a\n  b "}), (5, {"text": "c"}), (7, {"text": "d"})]


# --------------------------------------------------------------------------------------------------
# the bad-input corpus of the new kinds: error kind, line, exit 2, registry unchanged

BAD_KIND_CASES = [
    # (id, content, file name, kind, line)
    ("pair_identical", lines(PAIR, pair(U, rejected=GOOD_A)), "a.jsonl", "same_sides", 2),
    (
        "pair_empty_chosen",
        lines(pair(U, chosen={"role": "assistant", "content": ""})),
        "a.jsonl",
        "empty_side",
        1,
    ),
    (
        "pair_blank_rejected",
        lines(PAIR, pair(U, rejected={"role": "assistant", "content": " \n"})),
        "a.jsonl",
        "empty_side",
        2,
    ),
    (
        "pair_missing_rejected",
        lines({"messages": [U], "chosen": GOOD_A}),
        "a.jsonl",
        "missing_side",
        1,
    ),
    (
        "pair_missing_chosen",
        lines(PAIR, {"messages": [U], "rejected": BAD_A}),
        "a.jsonl",
        "missing_side",
        2,
    ),
    ("pair_side_string", lines(pair(U, chosen="good")), "a.jsonl", "bad_side", 1),
    ("pair_side_list", lines(pair(U, rejected=[BAD_A])), "a.jsonl", "bad_side", 1),
    (
        "pair_side_user_role",
        lines(pair(U, chosen={"role": "user", "content": "x"})),
        "a.jsonl",
        "bad_side",
        1,
    ),
    (
        "pair_side_content_number",
        lines(pair(U, chosen={"role": "assistant", "content": 3})),
        "a.jsonl",
        "bad_side",
        1,
    ),
    ("pair_context_ends_with_assistant", lines(PAIR, pair(U, A)), "a.jsonl", "bad_last_turn", 2),
    ("pair_context_empty", lines(pair()), "a.jsonl", "empty_messages", 1),
    ("pair_context_only_system", lines(pair(S)), "a.jsonl", "no_turns", 1),
    ("pair_context_two_users", lines(pair(U, U)), "a.jsonl", "not_alternating", 1),
    ("kto_label_string", lines(KTO_T, kto(U, A, label="true")), "a.jsonl", "bad_label", 2),
    ("kto_label_number", lines(kto(U, A, label=1)), "a.jsonl", "bad_label", 1),
    ("kto_label_null", lines(KTO_F, kto(U, A, label=None)), "a.jsonl", "bad_label", 2),
    ("kto_ends_with_user", lines(KTO_T, kto(U, A, U, label=False)), "a.jsonl", "bad_last_turn", 2),
    ("kto_tag_key", lines({"messages": [U, A], "kto_tag": True}), "a.jsonl", "bad_label", 1),
    ("pt_empty_text", lines(TEXT, {"text": ""}), "a.jsonl", "empty_text", 2),
    ("pt_blank_text", lines({"text": " \n\t"}), "a.jsonl", "empty_text", 1),
    ("pt_text_number", lines({"text": 42}), "a.jsonl", "bad_text", 1),
    ("pt_text_list", lines(TEXT, TEXT, {"text": ["a", "b"]}), "a.jsonl", "bad_text", 3),
    ("pt_row_without_text", lines(TEXT, {"content": "x"}), "a.jsonl", "missing_text", 2),
    ("pt_txt_invalid_utf8", b"good\n\nbad \xff\xfe here\nmore\n", "a.txt", "invalid_utf8", 3),
    ("pt_txt_nul", b"good\n\nx\x00y\n", "a.txt", "nul_byte", 3),
    ("pt_lone_surrogate", b'{"text": "\\ud83d"}\n', "a.jsonl", "invalid_unicode", 1),
    ("mixed_sft_then_pair", lines({"messages": [U, A]}, PAIR), "a.jsonl", "mixed_kinds", 2),
    ("mixed_pair_then_kto", lines(PAIR, PAIR, KTO_T), "a.jsonl", "mixed_kinds", 3),
    ("mixed_text_then_chat", lines(TEXT, {"messages": [U, A]}), "a.jsonl", "mixed_kinds", 2),
    ("weight_zero_last", lines({"messages": [U, {**A, "weight": 0}]}), "a.jsonl", "weight_zero", 1),
    (
        "weight_zero_middle",
        lines({"messages": [U, {**A, "weight": 0}, U, A]}),
        "a.jsonl",
        "weight_zero",
        1,
    ),
    ("weight_not_flag", lines({"messages": [U, {**A, "weight": 0.5}]}), "a.jsonl", "bad_weight", 1),
    ("images_in_pair", lines(PAIR, pair(U, images=["a.jpg"])), "a.jsonl", "multimodal", 2),
    ("images_in_text", lines({"text": "x", "images": ["a.jpg"]}), "a.jsonl", "multimodal", 1),
    ("videos_in_pair", lines(PAIR, pair(U, videos=["v.mp4"])), "a.jsonl", "multimodal", 2),
    ("audios_in_text", lines({"text": "x", "audios": ["a.wav"]}), "a.jsonl", "multimodal", 1),
    ("lf_sharegpt_ranking_unconverted", lines(LF_DEMOS[0][2][0]), "a.jsonl", "missing_messages", 1),
    (
        "trl_unconverted",
        lines({"prompt": "P", "chosen": "a", "rejected": "b"}),
        "a.jsonl",
        "missing_messages",
        1,
    ),
]


@table("case_id,content,name,kind,line", BAD_KIND_CASES)
def test_bad_kind_corpus(
    tmp_path: Path, data_app, registry: Path, case_id, content, name, kind, line
):
    path = write(tmp_path, content, name)
    report = check_file(path)
    assert not report.ok
    found = [p for p in report.problems if p.kind == kind]
    assert found, format_report(report)
    assert found[0].severity == "error" and found[0].line == line, format_report(report)
    result = invoke(data_app, "check", path)
    assert result.exit_code == 2 and f"{path}:{line}" in result.output
    before = {p.name: p.read_bytes() for p in registry.iterdir()}
    result = invoke(data_app, "register", path, "--name", "new", "--dataset-dir", registry)
    assert result.exit_code == 2 and "error:" in result.output
    assert {p.name: p.read_bytes() for p in registry.iterdir()} == before


def test_bad_kind_corpus_is_big_enough() -> None:
    assert len(BAD_KIND_CASES) >= 25
    assert len({c[0] for c in BAD_KIND_CASES}) == len(BAD_KIND_CASES)


def test_a_mixed_file_names_where_its_kind_was_set(tmp_path: Path) -> None:
    path = write(tmp_path, lines(PAIR, PAIR, KTO_T, PAIR))
    report = check_file(path)
    (p,) = [p for p in report.errors if p.kind == "mixed_kinds"]
    assert p.line == 3 and "kto data" in p.message and "preference data from line 1" in p.message
    assert report.kind == "preference" and report.n_valid == 3


# --------------------------------------------------------------------------------------------------
# warnings: placeholders, one-sided KTO, LLaMA-Factory's keys are never "not used"

WARN_KIND_CASES = [
    # (id, content, name, warning kind, line, message part)
    (
        "identity_placeholders",
        lines(
            {
                "messages": [
                    U,
                    {"role": "assistant", "content": "I am {{name}}, made by {{author}}."},
                ]
            }
        ),
        "a.jsonl",
        "placeholder",
        1,
        "--fill author=... --fill name=...",
    ),
    ("placeholder_in_text", b"Intro\nI am {{name}}.\n", "a.txt", "placeholder", 2, "{{name}}"),
    ("kto_all_true", lines(KTO_T, kto(U, A)), "a.jsonl", "one_label", None, "labelled true"),
    (
        "label_in_pair",
        lines(pair(U, label=True)),
        "a.jsonl",
        "unknown_key",
        1,
        "is not read for preference data",
    ),
    (
        "text_in_chat",
        lines({"messages": [U, A], "text": "x"}),
        "a.jsonl",
        "unknown_key",
        1,
        "(pre-training text) is not read for sft data",
    ),
    (
        "system_key",
        lines({"messages": [U, A], "system": "S"}),
        "a.jsonl",
        "unknown_key",
        1,
        'role "system"',
    ),
    ("txt_holding_json", lines(KTO_T), "a.txt", "txt_json", 1, "name the file .jsonl"),
]


@table("case_id,content,name,kind,line,part", WARN_KIND_CASES)
def test_kind_warnings(tmp_path: Path, data_app, case_id, content, name, kind, line, part) -> None:
    path = write(tmp_path, content, name)
    report = check_file(path)
    assert report.ok, format_report(report)
    found = [p for p in report.warnings if p.kind == kind]
    assert found and found[0].line == line and part in found[0].message, format_report(report)
    assert invoke(data_app, "check", path).exit_code == 0


@pytest.mark.parametrize(
    "key",
    [
        "label",
        "kto_tag",
        "chosen",
        "rejected",
        "images",
        "videos",
        "tools",
        "system",
        "text",
        "messages",
    ],
)
def test_llamafactory_keys_are_never_called_unused(tmp_path: Path, key) -> None:
    rows = [{"messages": [U, A], key: v} for v in ("x", True)] + [
        pair(U, **{key: "x"}) if key not in ("chosen", "rejected", "messages") else PAIR,
        kto(U, A, **{key: "x"}) if key not in ("label", "messages") else KTO_T,
        {"text": "t", key: "x"} if key != "text" else TEXT,
    ]
    for k, r in enumerate(rows):
        report = check_file(write(tmp_path, lines(r), f"{k}.jsonl"))
        assert "not used by LLaMA-Factory" not in format_report(report), format_report(report)


# --------------------------------------------------------------------------------------------------
# convert: the new sources, refusals with the reason, --fill

CONVERT_REFUSALS = [
    # (id, rows, fmt, kind, line)
    (
        "weight_zero",
        [{"messages": [U, A]}, {"messages": [U, {**A, "weight": 0}, U, A]}],
        "auto",
        "weight_zero",
        2,
    ),
    (
        "weight_zero_sharegpt",
        [
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a", "weight": 0},
                ]
            }
        ],
        "auto",
        "weight_zero",
        1,
    ),
    ("images_in_text", [{"text": "x", "images": ["1.jpg"]}], "auto", "multimodal", 1),
    (
        "video_part",
        [{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "v"}]}, A]}],
        "openai",
        "multimodal",
        1,
    ),
    (
        "llava_sharegpt_missing_image",
        [
            {
                "conversations": [
                    {"from": "human", "value": "<image>What?"},
                    {"from": "gpt", "value": "A cat."},
                ],
                "images": ["cat.jpg"],
            }
        ],
        "auto",
        "image_missing",
        1,
    ),
    (
        "uf_prefix_mismatch",
        [
            {
                "prompt": "P",
                "chosen": [U, GOOD_A],
                "rejected": [{"role": "user", "content": "other"}, BAD_A],
            }
        ],
        "auto",
        "prefix_mismatch",
        1,
    ),
    (
        "uf_prompt_mismatch",
        [{"prompt": "P", "chosen": [U, GOOD_A], "rejected": [U, BAD_A]}],
        "ultrafeedback",
        "prefix_mismatch",
        1,
    ),
    (
        "kto_label_string",
        [{"prompt": "P", "completion": "c", "label": "false"}],
        "trl",
        "bad_label",
        1,
    ),
    (
        "kto_tag_number",
        [
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "kto_tag": 0,
            }
        ],
        "sharegpt",
        "bad_label",
        1,
    ),
    (
        "pair_identical",
        [{"prompt": "P", "chosen": "same", "rejected": "same"}],
        "trl",
        "same_sides",
        1,
    ),
    ("pair_missing_rejected", [{"instruction": "q", "chosen": "a"}], "alpaca", "missing_side", 1),
    (
        "pair_ends_with_user",
        [{"prompt": "P", "chosen": [GOOD_A, U], "rejected": [BAD_A, U]}],
        "trl",
        "bad_side",
        1,
    ),
    (
        "mixed_output_kinds",
        [
            {"prompt": "P", "chosen": "a", "rejected": "b"},
            {"prompt": "P", "completion": "c", "label": True},
        ],
        "trl",
        "mixed_kinds",
        2,
    ),
    ("text_not_string", [{"text": ["a"]}], "text", "bad_text", 1),
]


@table("case_id,rows,fmt,kind,line", CONVERT_REFUSALS)
def test_convert_refuses_with_the_reason(tmp_path: Path, data_app, case_id, rows, fmt, kind, line):
    src = write(tmp_path, lines(*rows), "in.jsonl")
    out = tmp_path / "out.jsonl"
    report = convert_file(src, out, fmt)
    assert not report.written and not out.exists()
    errors = [p for p in report.problems if p.severity == "error"]
    assert (errors[0].kind, errors[0].line) == (kind, line), report.problems
    result = invoke(data_app, "convert", src, "-o", out, "--from", fmt)
    assert result.exit_code == 2 and f"{src}:{line}" in result.output and not out.exists()


def test_convert_fill_placeholders(tmp_path: Path, data_app) -> None:
    identity = [
        {
            "instruction": "hi",
            "input": "",
            "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}.",
        },
        {"instruction": "Who are you?", "input": "", "output": "I am {{name}}."},
    ]
    src = write(tmp_path, json.dumps(identity, indent=2).encode(), "identity.json")
    out = tmp_path / "id.jsonl"
    report = convert_file(src, out)
    assert report.written
    warned = [p for p in report.problems if p.kind == "placeholder"]
    assert [p.line for p in warned] == [2, 7] and all(p.severity == "warning" for p in warned)
    result = invoke(
        data_app,
        "convert",
        src,
        "-o",
        out,
        "--force",
        "--fill",
        "name=MyBot",
        "--fill",
        "author=Me",
    )
    assert result.exit_code == 0, result.output
    assert "warning placeholder" not in result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert (
        rows[0]["messages"][1]["content"] == "Hello! I am MyBot, an AI assistant developed by Me."
    )
    check = check_file(out)
    assert check.ok and check.n_warnings == 0
    with pytest.raises(QwenftError, match="NAME=VALUE"):
        parse_fill(["name"])
    assert parse_fill(["{{name}}=X", "a=b=c"]) == {"name": "X", "a": "b=c"}


def test_convert_txt_to_jsonl_and_materialize(tmp_path: Path) -> None:
    src = write(tmp_path, b"Doc one\nDoc two, one line\n", "corpus.txt")
    report = convert_file(src, tmp_path / "c.jsonl")
    assert (report.format, report.kind, report.n_out, report.reading) == ("text", "pt", 2, "lines")
    dst = tmp_path / "run" / "data.jsonl"
    assert materialize_pt_jsonl(src, dst) == 2
    assert dst.read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    assert [json.loads(x) for x in dst.read_text().splitlines()] == [
        {"text": "Doc one"},
        {"text": "Doc two, one line"},
    ]
    assert materialize_pt_jsonl(src, dst) == 2  # replaces, atomically
    blocks = write(tmp_path, b"Doc one\nstill one\n\nDoc two\n", "blocks.txt")
    report = convert_file(blocks, tmp_path / "b.jsonl", text_docs="blocks")  # only when asked
    assert (report.n_out, report.reading) == (2, "blocks")
    assert [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()] == [
        {"text": "Doc one\nstill one"},
        {"text": "Doc two"},
    ]
    assert [p.name for p in dst.parent.iterdir()] == ["data.jsonl"]
    bad = write(tmp_path, b"ok\n\nbad\xff\n", "bad.txt")
    with pytest.raises(QwenftError, match="bad.txt:3"):
        materialize_pt_jsonl(bad, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(QwenftError, match=":1"):
        materialize_pt_jsonl(write(tmp_path, lines(PAIR), "p.jsonl"), tmp_path / "y.jsonl")


# --------------------------------------------------------------------------------------------------
# register, split, kinds wanted by a caller


def test_entries_of_each_kind(tmp_path: Path) -> None:
    p = str(tmp_path / "d.jsonl")
    assert dataset_entry(Path(p), kind="preference") == {
        "file_name": p,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
        "tags": TAGS,
    }
    assert dataset_entry(Path(p), kind="kto", has_tools=True) == {
        "file_name": p,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label", "tools": "tools"},
        "tags": TAGS,
    }
    assert dataset_entry(Path(p), kind="pt") == {"file_name": p, "columns": {"prompt": "text"}}
    with pytest.raises(QwenftError, match="unknown data kind"):
        dataset_entry(Path(p), kind="rm")


def test_register_detects_the_kind_and_refuses_txt(tmp_path: Path, data_app) -> None:
    reg = tmp_path / "reg"
    for name, rows, kind in (
        ("p", [PAIR], "preference"),
        ("k", [KTO_T, KTO_F], "kto"),
        ("t", [TEXT], "pt"),
        ("s", [{"messages": [U, A]}], "sft"),
    ):
        path = write(tmp_path, lines(*rows), f"{name}.jsonl")
        assert register_dataset(path, name, reg) == dataset_entry(path, kind=kind)
    txt = write(tmp_path, b"Some text.\n", "c.txt")
    before = (reg / "dataset_info.json").read_bytes()
    with pytest.raises(QwenftError, match="line by line") as exc:
        register_dataset(txt, "c", reg)
    assert "qwenft data convert" in exc.value.hint
    result = invoke(data_app, "register", txt, "--dataset-dir", reg)
    assert result.exit_code == 2 and "data convert" in result.output
    assert (reg / "dataset_info.json").read_bytes() == before


def test_a_caller_names_the_kind_it_takes(tmp_path: Path) -> None:
    pairs = write(tmp_path, lines(PAIR, PAIR))
    report = check_file(pairs, "kto")
    assert [(p.kind, p.line) for p in report.errors] == [("wrong_kind", 1), ("wrong_kind", 2)]
    assert "kto data" in report.errors[0].message
    with pytest.raises(QwenftError, match="wrong_kind"):
        require_valid(pairs, "nothing was started")  # training and eval take sft by default
    assert require_valid(pairs, "x", kind="preference").kind == "preference"
    assert require_valid(pairs, "x", kind=None).kind == "preference"
    assert not check_file(write(tmp_path, b"text\n", "t.txt"), "sft").ok
    assert row_kind({"text": "x"}) == "pt" and row_kind([1]) is None


def test_split_keeps_each_kind(tmp_path: Path) -> None:
    rows = [pair({"role": "user", "content": f"q{i}"}) for i in range(10)]
    train, val = split_file(write(tmp_path, lines(*rows)), 0.2)
    assert check_file(train).kind == check_file(val).kind == "preference"
    txt = write(tmp_path, b"\n".join(f"doc {i}".encode() for i in range(5)), "c.txt")
    train, val = split_file(txt, 0.2)
    assert (train.name, check_file(train).kind, check_file(val).n_samples) == (
        "c.train.jsonl",
        "pt",
        1,
    )


# --------------------------------------------------------------------------------------------------
# token statistics equal LLaMA-Factory's own preprocessing of each kind (model tier)

LONG = " ".join(f"word{i} 中文" for i in range(80))
PAIR_ROWS = [
    PAIR,
    pair(S, U, A, {"role": "user", "content": "再来 😀"}),
    pair({"role": "user", "content": LONG}),  # long prompt
    pair(U, chosen={"role": "assistant", "content": LONG}),  # long chosen only
    pair(U, rejected={"role": "assistant", "content": LONG + LONG}),
]
KTO_ROWS = [
    KTO_T,
    KTO_F,
    kto(S, U, A, U, {"role": "assistant", "content": LONG}, label=False),
    kto({"role": "user", "content": LONG}, A),
]
PT_ROWS = [TEXT, {"text": LONG}, {"text": "短い"}, {"text": LONG + "\n" + LONG}]


def _loss(labels: list[int]) -> int:
    return sum(1 for x in labels if x != -100)


@pytest.mark.parametrize(
    "preset,template,cutoff", [("tiny-qwen2", "qwen", 96), ("tiny-qwen3", "qwen3", 128)]
)
def test_pair_token_counts_equal_llamafactory(
    tmp_path: Path, tiny_home: Path, monkeypatch, preset, template, cutoff
) -> None:
    from qwenft.data.pipeline import token_stats
    from qwenft.data.tokens import LlamaFactoryEncoder, iter_token_sides
    from qwenft.models.tiny import ensure_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = ensure_tiny_model(preset, progress=None)
    data = write(tmp_path, lines(*PAIR_ROWS))
    config = {"stage": "dpo", "template": template, "cutoff_len": cutoff, "packing": False}
    lf = lf_rows(data, model_dir, config, tmp_path / "lf")
    assert len(lf) == len(PAIR_ROWS)
    encoder = LlamaFactoryEncoder(model_dir, template, cutoff, kind="preference")
    sides = list(iter_token_sides(data, encoder.kind, lambda: encoder, batch_size=2))
    assert [line for line, _ in sides] == list(range(1, len(PAIR_ROWS) + 1))
    for (_, (c, r)), row in zip(sides, lf, strict=True):
        assert (c[1], c[2]) == (len(row["chosen_input_ids"]), _loss(row["chosen_labels"]))
        assert (r[1], r[2]) == (len(row["rejected_input_ids"]), _loss(row["rejected_labels"]))
    stats = token_stats(data, model_dir, template, cutoff).to_dict()  # the file's kind
    assert stats["kind"] == "preference" and stats["n_samples"] == len(PAIR_ROWS)
    assert stats["pairs"]["chosen"]["tokens_after_cutoff"] == sum(
        len(r["chosen_input_ids"]) for r in lf
    )
    assert stats["pairs"]["rejected"]["loss_tokens"] == sum(_loss(r["rejected_labels"]) for r in lf)
    assert stats["tokens_after_cutoff"] == sum(
        len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in lf
    )
    longer = [max(c[0], r[0]) for _, (c, r) in sides]
    assert stats["length"]["max"] == max(longer)
    assert stats["over_cutoff_lines"] == [k + 1 for k, n in enumerate(longer) if n > cutoff]
    assert stats["over_cutoff_lines"][:3] == [3, 4, 5]  # the long side decides
    assert stats["tokens_total"] - stats["tokens_cut"] == stats["tokens_after_cutoff"]


def test_kto_and_text_token_counts_equal_llamafactory(
    tmp_path: Path, tiny_home: Path, monkeypatch
) -> None:
    from qwenft.data.pipeline import token_stats
    from qwenft.data.tokens import LlamaFactoryEncoder, iter_token_lengths
    from qwenft.models.tiny import ensure_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    for kind, stage, rows, cutoff in (("kto", "kto", KTO_ROWS, 96), ("pt", "pt", PT_ROWS, 64)):
        folder = tmp_path / kind
        folder.mkdir()
        data = write(folder, lines(*rows))
        config = {"stage": stage, "template": "qwen", "cutoff_len": cutoff, "packing": False}
        lf = lf_rows(data, model_dir, config, folder / "lf")
        assert len(lf) == len(rows)
        if kind == "kto":  # the label survives into LLaMA-Factory's rows
            assert [r["kto_tags"] for r in lf] == [r["label"] for r in rows]
        encoder = LlamaFactoryEncoder(model_dir, "qwen", cutoff, kind=kind)
        got = [(kept, loss) for _, _, kept, loss in iter_token_lengths(data, encoder)]
        want = [
            (len(r["input_ids"]), _loss(r["labels"]) if kind == "kto" else len(r["input_ids"]))
            for r in lf
        ]
        assert got == want
        stats = token_stats(data, model_dir, "qwen", cutoff, kind=kind).to_dict()
        assert stats["kind"] == kind and stats["n_over_cutoff"] >= 1
        assert stats["tokens_after_cutoff"] == sum(k for k, _ in want)


def test_check_cli_token_stats_for_pairs(tmp_path: Path, tiny_home: Path, data_app) -> None:
    data = write(tmp_path, lines(*PAIR_ROWS))
    result = invoke(data_app, "check", data, "--cutoff-len", "64")
    assert result.exit_code == 0, result.output
    assert "prompt+chosen" in result.output and "prompt+rejected" in result.output
    assert "5 pairs" in result.output
    txt = write(tmp_path, b"A document.\nAnother, " + LONG.encode() + b"\n", "c.txt")
    result = invoke(data_app, "check", txt, "--cutoff-len", "64", "--json")
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.stdout)["tokens"]
    assert (tokens["kind"], tokens["n_samples"], tokens["n_over_cutoff"]) == ("pt", 2, 1)
    think = {"role": "assistant", "content": "<think>\nhm\n</think>\n\nYes."}
    mixed = write(tmp_path, lines(pair(U, chosen=think), PAIR), "think.jsonl")
    result = invoke(data_app, "check", mixed, "--model", "tiny-qwen3")  # a pair's answers count too
    assert result.exit_code == 0, result.output
    assert "1 of 2 samples reason" in result.output and "enable_thinking: true" in result.output
