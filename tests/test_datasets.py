"""qwenft.data and `qwenft data`: check, convert, split, register, token statistics."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenft.data import reader
from qwenft.data.check import check_file, file_has_tools, format_report
from qwenft.data.convert import convert_file
from qwenft.data.pipeline import token_stats
from qwenft.data.reader import file_sha256
from qwenft.data.registry import (
    auto_dataset_name,
    check_dataset_name,
    dataset_name_for,
    register_dataset,
)
from qwenft.data.split import split_file, write_without_lines
from qwenft.data.tokens import LlamaFactoryEncoder, iter_token_lengths
from qwenft.errors import QwenftError
from tests.helpers.builders import lines, table, write
from tests.helpers.cli import invoke_data as invoke
from tests.helpers.lf_reference import lengths_and_loss, lf_rows

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
S = {"role": "system", "content": "Be brief."}
TOOLS = json.dumps([{"name": "get_weather", "description": "Weather", "parameters": {}}])
CALL = {
    "role": "function_call",
    "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
}
RESULT = {"role": "tool", "content": '{"temp": 21}'}
GOOD = {"messages": [U, A]}
GOOD2 = {"messages": [S, U, A]}


def row(*messages: dict, **extra: object) -> bytes:
    return json.dumps({"messages": list(messages), **extra}, ensure_ascii=False).encode() + b"\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty folder of its own (tmp_path also holds the isolated home and cwd)."""
    d = tmp_path / "d"
    d.mkdir()
    return d


# --------------------------------------------------------------------------------------------------
# good files of every supported shape pass

GOOD_CASES = [
    # (id, content, file name, n_samples)
    ("one_pair", lines(GOOD), "a.jsonl", 1),
    ("system_multi_turn", row(S, U, A, U, A), "a.jsonl", 1),
    (
        "scripts_and_emoji",
        row({"role": "user", "content": "中文 العربية हिन्दी 😀 ẞ"}, A),
        "a.jsonl",
        1,
    ),
    ("bom", b"\xef\xbb\xbf" + lines(GOOD, GOOD2), "a.jsonl", 2),
    ("crlf", lines(GOOD, GOOD2).replace(b"\n", b"\r\n"), "a.jsonl", 2),
    ("no_final_newline", lines(GOOD).rstrip(b"\n"), "a.jsonl", 1),
    ("blank_lines", lines(GOOD) + b"\n  \n" + row(S, U, A) + b"\n\n", "a.jsonl", 2),
    (
        "ascii_escaped_json",
        json.dumps({"messages": [{"role": "user", "content": "é 中 😀"}, A]}).encode() + b"\n",
        "a.jsonl",
        1,
    ),
    (
        "paired_surrogate_escape",
        b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, '
        b'{"role": "assistant", "content": "ok"}]}\n',
        "a.jsonl",
        1,
    ),
    ("json_array", json.dumps([GOOD, GOOD2], indent=2).encode(), "a.json", 2),
    ("json_array_empty_lines", b"\n[\n" + json.dumps(GOOD).encode() + b"\n]\n\n", "a.json", 1),
    ("json_file_with_lines", lines(GOOD, GOOD2), "a.json", 2),
    ("tool_turns", row(S, U, CALL, RESULT, A, tools=TOOLS), "a.jsonl", 1),
    ("two_tool_rounds", row(U, CALL, RESULT, CALL, RESULT, A, tools=TOOLS), "a.jsonl", 1),
    ("ends_with_call", row(U, CALL, tools=TOOLS), "a.jsonl", 1),
    (
        "parallel_calls",
        row(
            U,
            {
                "role": "function_call",
                "content": json.dumps(
                    [
                        {"name": "get_weather", "arguments": {"city": "A"}},
                        {"name": "get_weather", "arguments": {"city": "B"}},
                    ]
                ),
            },
            RESULT,
            A,
            tools=TOOLS,
        ),
        "a.jsonl",
        1,
    ),
    (
        "call_with_text",
        row(
            U,
            {
                "role": "function_call",
                "content": "Let me look.\n<tool_call>"
                '{"name": "get_weather", "arguments": {}}</tool_call>',
            },
            RESULT,
            A,
            tools=TOOLS,
        ),
        "a.jsonl",
        1,
    ),
    (
        "openai_style_tools",
        row(
            U,
            CALL,
            RESULT,
            A,
            tools=json.dumps(
                [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
            ),
        ),
        "a.jsonl",
        1,
    ),
    ("tools_null_and_empty", lines(row(U, A, tools=None), row(S, U, A, tools="")), "a.jsonl", 2),
    ("escaped_nul_in_text", row({"role": "user", "content": "a\u0000b"}, A), "a.jsonl", 1),
]


@table("case_id,content,name,n", GOOD_CASES)
def test_good_files_pass(tmp_path: Path, data_app, case_id, content, name, n) -> None:
    path = write(tmp_path, content, name)
    report = check_file(path)
    assert report.ok, format_report(report)
    assert report.n_errors == 0 and report.n_warnings == 0, format_report(report)
    assert (report.n_samples, report.n_valid) == (n, n)
    result = invoke(data_app, "check", path)
    assert result.exit_code == 0, result.output


def test_sample_data_in_repo_passes() -> None:
    root = Path(__file__).resolve().parent.parent
    paths = sorted((root / "data").glob("*.jsonl"))
    assert (
        paths
    )  # the repo ships sample data: a moved folder must not pass this by checking nothing
    for path in paths:
        assert check_file(path).ok, path


# --------------------------------------------------------------------------------------------------
# the malformed corpus: every case is an error naming its line, exit 2, nothing written

BIG = b'{"messages": [{"role": "user", "content": "' + b"x" * (50 * 2**20) + b'"}]}\n'

BAD_CASES = [
    # (id, content, file name, kind, line)
    (
        "truncated_json",
        lines(GOOD) + b'{"messages": [{"role": "user", "con',
        "a.jsonl",
        "invalid_json",
        2,
    ),
    ("truncated_last_line", lines(GOOD, GOOD)[:-20], "a.jsonl", "invalid_json", 2),
    ("list_instead_of_object", lines(GOOD, [U, A]), "a.jsonl", "not_object", 2),
    ("string_row", b'"hello"\n', "a.jsonl", "not_object", 1),
    ("number_row", lines(GOOD) + b"42\n", "a.jsonl", "not_object", 2),
    ("null_row", b"null\n", "a.jsonl", "not_object", 1),
    (
        "messages_object",
        lines({"messages": {"role": "user", "content": "x"}}),
        "a.jsonl",
        "messages_not_list",
        1,
    ),
    ("messages_string", lines({"messages": "Hi"}), "a.jsonl", "messages_not_list", 1),
    ("messages_empty", lines({"messages": []}), "a.jsonl", "empty_messages", 1),
    ("alpaca_row", lines({"instruction": "q", "output": "a"}), "a.jsonl", "missing_messages", 1),
    (
        "sharegpt_row",
        lines({"conversations": [{"from": "human", "value": "q"}]}),
        "a.jsonl",
        "missing_messages",
        1,
    ),
    ("message_is_string", row("Hi", A), "a.jsonl", "bad_message", 1),
    ("missing_role", row({"content": "Hi"}, A), "a.jsonl", "missing_role", 1),
    ("role_bot", lines(GOOD) + row(U, {"role": "bot", "content": "x"}), "a.jsonl", "bad_role", 2),
    ("role_human", row({"role": "human", "content": "Hi"}, A), "a.jsonl", "bad_role", 1),
    ("role_capitalised", row({"role": "User", "content": "Hi"}, A), "a.jsonl", "bad_role", 1),
    ("role_number", row({"role": 1, "content": "Hi"}, A), "a.jsonl", "bad_role", 1),
    (
        "role_observation",
        row(U, CALL, {"role": "observation", "content": "x"}, A),
        "a.jsonl",
        "bad_role",
        1,
    ),
    ("missing_content", row(U, {"role": "assistant"}), "a.jsonl", "missing_content", 1),
    ("content_number", row({"role": "user", "content": 5}, A), "a.jsonl", "bad_content", 1),
    ("content_null", row(U, {"role": "assistant", "content": None}), "a.jsonl", "bad_content", 1),
    (
        "content_parts",
        row({"role": "user", "content": [{"type": "text", "text": "Hi"}]}, A),
        "a.jsonl",
        "bad_content",
        1,
    ),
    ("empty_user_content", row({"role": "user", "content": ""}, A), "a.jsonl", "empty_content", 1),
    (
        "empty_assistant_content",
        lines(GOOD, GOOD) + row(U, {"role": "assistant", "content": ""}),
        "a.jsonl",
        "empty_content",
        3,
    ),
    ("empty_system", row({"role": "system", "content": ""}, U, A), "a.jsonl", "empty_content", 1),
    ("system_in_middle", row(U, A, S, U, A), "a.jsonl", "system_not_first", 1),
    ("two_systems", row(S, S, U, A), "a.jsonl", "system_not_first", 1),
    ("two_users", row(U, U, A), "a.jsonl", "not_alternating", 1),
    ("two_assistants", row(U, A, A), "a.jsonl", "not_alternating", 1),
    ("starts_with_assistant", row(A, U, A), "a.jsonl", "not_alternating", 1),
    ("ends_with_user", lines(GOOD) + row(U, A, U), "a.jsonl", "bad_last_turn", 2),
    ("only_user", row(U), "a.jsonl", "bad_last_turn", 1),
    ("only_system", row(S), "a.jsonl", "no_turns", 1),
    (
        "invalid_utf8",
        lines(GOOD) + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n',
        "a.jsonl",
        "invalid_utf8",
        2,
    ),
    (
        "latin1_file",
        row({"role": "user", "content": "café"}, A).replace(b"\xc3\xa9", b"\xe9"),
        "a.jsonl",
        "invalid_utf8",
        1,
    ),
    ("nul_byte", lines(GOOD, GOOD2).replace(b"Hello", b"Hel\x00lo", 1), "a.jsonl", "nul_byte", 1),
    (
        "utf16_file",
        b"\xff\xfe" + lines(GOOD).decode().encode("utf-16-le"),
        "a.jsonl",
        "nul_byte",
        1,
    ),
    ("huge_single_line", BIG, "a.jsonl", "line_too_long", 1),
    ("empty_file", b"", "a.jsonl", "empty_file", None),
    ("only_blank_lines", b"\n\n  \r\n", "a.jsonl", "empty_file", None),
    ("nan_value", lines(GOOD) + b'{"messages": [], "score": NaN}\n', "a.jsonl", "invalid_json", 2),
    ("trailing_garbage", lines(GOOD).rstrip() + b" x\n", "a.jsonl", "invalid_json", 1),
    ("two_objects_one_line", lines(GOOD).rstrip() + lines(GOOD), "a.jsonl", "invalid_json", 1),
    ("pretty_printed_jsonl", json.dumps(GOOD, indent=2).encode(), "a.jsonl", "invalid_json", 1),
    ("json_array_in_jsonl", json.dumps([GOOD, GOOD]).encode(), "a.jsonl", "not_object", 1),
    ("deeply_nested", b"[" * 100000 + b"]" * 100000 + b"\n", "a.jsonl", "invalid_json", 1),
    (
        "lone_surrogate",
        b'{"messages": [{"role": "user", "content": "\\ud83d"}, '
        b'{"role": "assistant", "content": "x"}]}\n',
        "a.jsonl",
        "invalid_unicode",
        1,
    ),
    ("mixed_types", lines(row(U, A, id=1), row(U, A, id="two")), "a.jsonl", "mixed_types", 2),
    (
        "tools_as_list",
        row(U, CALL, RESULT, A, tools=[{"name": "get_weather"}]),
        "a.jsonl",
        "bad_tools",
        1,
    ),
    ("tools_invalid_json", row(U, A, tools="[{"), "a.jsonl", "bad_tools", 1),
    ("tools_object", row(U, A, tools=json.dumps({"name": "f"})), "a.jsonl", "bad_tools", 1),
    ("tool_without_call", row(U, RESULT, A), "a.jsonl", "not_alternating", 1),
    (
        "call_not_json",
        row(U, {"role": "function_call", "content": "get_weather(Paris)"}, RESULT, A, tools=TOOLS),
        "a.jsonl",
        "bad_function_call",
        1,
    ),
    (
        "call_without_arguments",
        row(U, {"role": "function_call", "content": '{"name": "f"}'}, RESULT, A, tools=TOOLS),
        "a.jsonl",
        "bad_function_call",
        1,
    ),
    ("call_answered_by_user", row(U, CALL, U, A, tools=TOOLS), "a.jsonl", "not_alternating", 1),
    ("ends_with_tool", row(U, CALL, RESULT, tools=TOOLS), "a.jsonl", "bad_last_turn", 1),
    (
        "json_array_truncated",
        json.dumps([GOOD, GOOD2], indent=1).encode()[:-10],
        "a.json",
        "invalid_json",
        27,
    ),
    (
        "json_array_trailing_comma",
        b"[\n" + json.dumps(GOOD).encode() + b",\n]\n",
        "a.json",
        "invalid_json",
        3,
    ),
    (
        "json_array_bad_role",
        b"[\n"
        + json.dumps(GOOD).encode()
        + b",\n"
        + json.dumps({"messages": [U, {"role": "bot", "content": "x"}]}).encode()
        + b"\n]",
        "a.json",
        "bad_role",
        3,
    ),
    ("json_array_of_numbers", b"[1, 2]", "a.json", "not_object", 1),
    (
        "json_array_lone_surrogate",
        b'[{"messages": [{"role": "user", "content": "\\udc00"}, '
        b'{"role": "assistant", "content": "x"}]}]',
        "a.json",
        "invalid_unicode",
        1,
    ),
    ("json_array_empty", b"[]", "a.json", "empty_file", None),
    ("json_array_extra_data", json.dumps([GOOD]).encode() + b"\n[]", "a.json", "invalid_json", 2),
    (
        "json_array_invalid_utf8",
        b'[{"messages": [{"role": "user", "content": "\xc3"}]}]',
        "a.json",
        "invalid_utf8",
        1,
    ),
]


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A dataset folder whose dataset_info.json already holds one entry."""
    folder = tmp_path / "registry"
    folder.mkdir()
    (folder / "dataset_info.json").write_text('{"old": {"file_name": "old.jsonl"}}\n')
    return folder


@table("case_id,content,name,kind,line", BAD_CASES)
def test_malformed_corpus(
    tmp_path: Path, data_app, registry: Path, case_id, content, name, kind, line
):
    path = write(tmp_path, content, name)
    report = check_file(path)
    assert not report.ok
    found = [p for p in report.problems if p.kind == kind]
    assert found, format_report(report)
    assert found[0].severity == "error"
    assert found[0].line == line, format_report(report)
    text = format_report(report)
    assert f"{path}:{line}" in text if line else f"error {kind}" in text

    result = invoke(data_app, "check", path)
    assert result.exit_code == 2
    assert (f"{path}:{line}" if line else kind) in result.output

    before = {p.name: p.read_bytes() for p in registry.iterdir()}
    result = invoke(data_app, "register", path, "--name", "new", "--dataset-dir", registry)
    assert result.exit_code == 2
    assert "error:" in result.output
    assert {p.name: p.read_bytes() for p in registry.iterdir()} == before


def test_malformed_corpus_is_big_enough() -> None:
    assert len(BAD_CASES) >= 40
    assert len({c[0] for c in BAD_CASES}) == len(BAD_CASES)


BAD_INPUT = [
    # (id, make path, message part)
    ("missing_file", lambda t: t / "nope.jsonl", "not found"),
    ("folder", lambda t: t, "is a folder"),
    ("tsv_extension", lambda t: write(t, lines(GOOD), "a.tsv"), "unsupported file type"),
    ("csv_extension", lambda t: write(t, b"a,b\n", "a.csv"), "unsupported file type"),
    ("no_extension", lambda t: write(t, lines(GOOD), "data"), "unsupported file type"),
]


@table("case_id,make,message", BAD_INPUT)
def test_unusable_paths(tmp_path: Path, data_app, case_id, make, message) -> None:
    path = make(tmp_path)
    with pytest.raises(QwenftError, match=message) as exc:
        check_file(path)
    assert exc.value.hint
    result = invoke(data_app, "check", path)
    assert result.exit_code == 2
    assert f"error: {exc.value.message}" in result.output
    assert "hint: " in result.output


def test_a_row_with_several_problems_reports_each(tmp_path: Path) -> None:
    path = write(tmp_path, row({"role": "bot", "content": ""}, {"role": "assistant", "content": 3}))
    kinds = {p.kind for p in check_file(path).problems}
    assert {"bad_role", "empty_content", "bad_content"} <= kinds


def test_counts_cover_problems_beyond_those_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reader, "MAX_KEPT_PER_KIND", 3)
    path = write(tmp_path, lines(*[row(U, U)] * 10, GOOD))
    report = check_file(path)
    assert report.counts["not_alternating"] == 10 and report.n_errors == 10
    assert len(report.errors) == 3
    assert (report.n_samples, report.n_valid) == (11, 1)
    text = format_report(report, max_per_kind=2)
    assert "error not_alternating (10)" in text and "... and 8 more" in text
    d = report.to_dict()
    assert d["problems_truncated"] and d["counts"]["not_alternating"] == 10


# --------------------------------------------------------------------------------------------------
# warnings do not fail

WARN_CASES = [
    # (id, content, kind, line, field)
    ("unknown_top_key", lines(GOOD, row(U, A, id=7)), "unknown_key", 2, "id"),
    ("top_level_system", row(U, A, system="Be brief."), "unknown_key", 1, "system"),
    ("unknown_message_key", row(U, {**A, "name": "bob"}), "unknown_key", 1, "messages[1].name"),
    ("duplicate", lines(GOOD, row(S, U, A), GOOD, GOOD), "duplicate", 3, None),
    (
        "blank_content",
        row(U, {"role": "assistant", "content": "  \n"}),
        "blank_content",
        1,
        "messages[1].content",
    ),
    ("call_without_tools", row(U, CALL, RESULT, A), "no_tools", 1, "messages[1]"),
    (
        "call_unknown_function",
        row(U, CALL, RESULT, A, tools=json.dumps([{"name": "other"}])),
        "unknown_function",
        1,
        "messages[1].content",
    ),
]


@table("case_id,content,kind,line,fld", WARN_CASES)
def test_warnings(tmp_path: Path, data_app, case_id, content, kind, line, fld) -> None:
    path = write(tmp_path, content)
    report = check_file(path)
    assert report.ok and report.n_valid == report.n_samples
    found = [p for p in report.warnings if p.kind == kind]
    assert found and found[0].line == line and found[0].field == fld, format_report(report)
    assert invoke(data_app, "check", path).exit_code == 0


def test_duplicates_name_the_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, lines(GOOD, row(S, U, A), GOOD, GOOD))
    dups = [p for p in check_file(path).warnings if p.kind == "duplicate"]
    assert [(p.line, p.message) for p in dups] == [
        (3, "same sample as line 1"),
        (4, "same sample as line 1"),
    ]


# --------------------------------------------------------------------------------------------------
# register


def test_register_writes_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, lines(GOOD))
    entry = register_dataset(path, "chat", tmp_path / "reg")
    info = json.loads((tmp_path / "reg" / "dataset_info.json").read_text())
    assert info == {"chat": entry}
    assert entry == {
        "file_name": str(path.absolute()),
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
            "observation_tag": "tool",
            "function_tag": "function_call",
        },
    }


def test_register_maps_tools_only_when_the_file_has_them(tmp_path: Path) -> None:
    plain = write(tmp_path, lines(GOOD), "plain.jsonl")
    tools = write(tmp_path, lines(GOOD, row(U, CALL, RESULT, A, tools=TOOLS)), "tools.jsonl")
    assert "tools" not in register_dataset(plain, "p", tmp_path)["columns"]
    assert register_dataset(tools, "t", tmp_path)["columns"]["tools"] == "tools"
    assert file_has_tools(tools) and not file_has_tools(plain)


def test_register_default_dir_and_relative_path(tmp_path: Path, isolated: Path) -> None:
    write(Path.cwd(), lines(GOOD), "rel.jsonl")
    entry = register_dataset(Path("rel.jsonl"), "rel")
    assert entry["file_name"] == str(Path.cwd() / "rel.jsonl")
    assert json.loads((isolated / "datasets" / "dataset_info.json").read_text())["rel"] == entry


def test_register_is_idempotent_and_keeps_other_entries(tmp_path: Path, registry: Path) -> None:
    path = write(tmp_path, lines(GOOD))
    register_dataset(path, "chat", registry)
    info_file = registry / "dataset_info.json"
    first = info_file.read_bytes()
    mtime = info_file.stat().st_mtime_ns
    register_dataset(path, "chat", registry)
    assert info_file.read_bytes() == first and info_file.stat().st_mtime_ns == mtime
    info = json.loads(first)
    assert info["old"] == {"file_name": "old.jsonl"} and list(info) == ["old", "chat"]


def test_register_refuses_another_file_unless_force(tmp_path: Path, registry: Path) -> None:
    a = write(tmp_path, lines(GOOD), "a.jsonl")
    b = write(tmp_path, lines(GOOD), "b.jsonl")
    register_dataset(a, "chat", registry)
    before = (registry / "dataset_info.json").read_bytes()
    with pytest.raises(QwenftError, match="already registered") as exc:
        register_dataset(b, "chat", registry)
    assert "--force" in exc.value.hint
    assert (registry / "dataset_info.json").read_bytes() == before
    with pytest.raises(QwenftError, match="already registered"):
        register_dataset(b, "old", registry)
    assert register_dataset(b, "chat", registry, force=True)["file_name"] == str(b)
    info = json.loads((registry / "dataset_info.json").read_text())
    assert info["chat"]["file_name"] == str(b) and info["old"] == {"file_name": "old.jsonl"}


@pytest.mark.parametrize(
    "name,ok",
    [
        ("chat", True),
        ("my-chat_v1.2", True),
        ("A9", True),
        ("", False),
        ("has space", False),
        ("a,b", False),
        ("a/b", False),
        ("..", False),
        ("ünïcode", False),
        ("x" * 201, False),
        ("name\n", False),
    ],
)
def test_dataset_names(tmp_path: Path, name: str, ok: bool) -> None:
    path = write(tmp_path, lines(GOOD))
    if ok:
        assert register_dataset(path, name, tmp_path / "reg")["file_name"] == str(path)
    else:
        with pytest.raises(QwenftError, match="invalid dataset name"):
            register_dataset(path, name, tmp_path / "reg")
        assert not (tmp_path / "reg").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_register_never_overwrites_a_broken_dataset_info(tmp_path: Path, content, message) -> None:
    path = write(tmp_path, lines(GOOD))
    (tmp_path / "dataset_info.json").write_text(content)
    with pytest.raises(QwenftError, match=message):
        register_dataset(path, "chat", tmp_path)
    assert (tmp_path / "dataset_info.json").read_text() == content


def _register_many(args: tuple[str, str, int]) -> None:
    folder, data, worker = args
    for k in range(3):
        register_dataset(Path(data), f"w{worker}-{k}", Path(folder))


def test_concurrent_registrations_all_land(tmp_path: Path) -> None:
    data = write(tmp_path, lines(GOOD))
    folder = tmp_path / "reg"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        pool.map(_register_many, [(str(folder), str(data), w) for w in range(8)])
    info = json.loads((folder / "dataset_info.json").read_text())
    assert sorted(info) == sorted(f"w{w}-{k}" for w in range(8) for k in range(3))
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_dataset_name_for_is_stable_and_clean(tmp_path: Path) -> None:
    path = write(tmp_path, lines(GOOD), "My Chat (v2)!.jsonl")
    sha = file_sha256(path)
    assert len(sha) == 64
    name = dataset_name_for(path, sha)
    assert name == f"My-Chat-v2-{sha[:8]}"
    assert check_dataset_name(name) == name
    assert dataset_name_for(Path("...jsonl"), sha) == f"data-{sha[:8]}"


def test_register_cli(tmp_path: Path, data_app) -> None:
    path = write(tmp_path, lines(GOOD))
    result = invoke(data_app, "register", path, "--dataset-dir", tmp_path / "reg", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["name"] == dataset_name_for(path, file_sha256(path))
    assert out["entry"]["file_name"] == str(path)
    result = invoke(
        data_app, "register", path, "--name", "bad name", "--dataset-dir", tmp_path / "reg"
    )
    assert result.exit_code == 2 and "invalid dataset name" in result.output


def test_a_copy_of_a_registered_file_gets_its_own_automatic_name(tmp_path: Path, data_app) -> None:
    """The same data file in two places (a copy, a second clone): the name qwenft picks for the
    copy never clashes with the original's, and each path keeps its own name when asked again."""
    reg = tmp_path / "reg"
    first = write(tmp_path, lines(GOOD), "chat.jsonl")
    (tmp_path / "clone").mkdir()
    copy = write(tmp_path / "clone", lines(GOOD), "chat.jsonl")
    name = auto_dataset_name(first, file_sha256(first), reg)
    assert name == dataset_name_for(first, file_sha256(first))
    register_dataset(first, name, reg)
    copy_name = auto_dataset_name(copy, file_sha256(copy), reg)
    assert copy_name != name and copy_name.startswith(name + "-")
    assert auto_dataset_name(first, file_sha256(first), reg) == name
    result = invoke(data_app, "register", copy, "--dataset-dir", reg, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["name"] == copy_name
    assert auto_dataset_name(copy, file_sha256(copy), reg) == copy_name
    info = json.loads((reg / "dataset_info.json").read_text())
    assert (info[name]["file_name"], info[copy_name]["file_name"]) == (str(first), str(copy))


# --------------------------------------------------------------------------------------------------
# convert

CONVERT_CASES = [
    # (id, fmt, input rows, expected rows)
    (
        "alpaca",
        "alpaca",
        [
            {
                "instruction": "Translate",
                "input": "bonjour",
                "output": "hello",
                "system": "S",
                "history": [["q1", "a1"]],
            }
        ],
        [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "Translate\nbonjour"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ],
    ),
    (
        "alpaca_auto",
        "auto",
        [{"instruction": "Q", "input": "", "output": "A"}],
        [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}],
    ),
    (
        "sharegpt",
        "sharegpt",
        [
            {
                "conversations": [
                    {"from": "human", "value": "weather?"},
                    {"from": "function_call", "value": CALL["content"]},
                    {"from": "observation", "value": "21C"},
                    {"from": "gpt", "value": "21C."},
                ],
                "system": "S",
                "tools": TOOLS,
            }
        ],
        [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "weather?"},
                    {"role": "function_call", "content": CALL["content"]},
                    {"role": "tool", "content": "21C"},
                    {"role": "assistant", "content": "21C."},
                ],
                "tools": TOOLS,
            }
        ],
    ),
    (
        "openai",
        "auto",
        [
            {
                "messages": [
                    {"role": "developer", "content": "S"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "weather in "},
                            {"type": "text", "text": "A and B?"},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "A"}'},
                            },
                            {
                                "id": "2",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "B"}'},
                            },
                        ],
                    },
                    {"role": "tool", "tool_call_id": "1", "content": "20"},
                    {"role": "tool", "tool_call_id": "2", "content": "22"},
                    {"role": "assistant", "content": "20 and 22.", "weight": 1},
                ],
                "tools": [
                    {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
                ],
            }
        ],
        [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "weather in A and B?"},
                    {
                        "role": "function_call",
                        "content": json.dumps(
                            [
                                {"name": "get_weather", "arguments": {"city": "A"}},
                                {"name": "get_weather", "arguments": {"city": "B"}},
                            ]
                        ),
                    },
                    {"role": "tool", "content": "20\n</tool_response>\n<tool_response>\n22"},
                    {"role": "assistant", "content": "20 and 22."},
                ],
                "tools": json.dumps(
                    [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
                ),
            }
        ],
    ),
    (
        "openai_text_and_call",
        "openai",
        [
            {
                "messages": [
                    U,
                    {
                        "role": "assistant",
                        "content": "Checking.",
                        "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}],
                    },
                    {"role": "tool", "content": "x"},
                    A,
                ],
                "tools": [{"name": "get_weather"}],
            }
        ],
        [
            {
                "messages": [
                    U,
                    {
                        "role": "function_call",
                        "content": 'Checking.\n<tool_call>{"name": "get_weather", "arguments": {}}'
                        "</tool_call>",
                    },
                    {"role": "tool", "content": "x"},
                    A,
                ],
                "tools": json.dumps([{"name": "get_weather"}]),
            }
        ],
    ),
]


@table("case_id,fmt,rows,expected", CONVERT_CASES)
def test_convert(tmp_path: Path, data_app, case_id, fmt, rows, expected) -> None:
    src = write(tmp_path, lines(*rows), "in.jsonl")
    out = tmp_path / "out.jsonl"
    report = convert_file(src, out, fmt)
    assert report.written and (report.n_in, report.n_out) == (len(rows), len(expected))
    assert [json.loads(x) for x in out.read_text().splitlines()] == expected
    check = check_file(out)
    assert check.ok and check.n_warnings == 0, format_report(check)
    result = invoke(data_app, "convert", src, "-o", tmp_path / "cli.jsonl", "--from", fmt)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.jsonl").read_bytes() == out.read_bytes()


def test_convert_json_array_and_detected_format(tmp_path: Path) -> None:
    src = write(tmp_path, json.dumps([{"instruction": "Q", "output": "A"}] * 2).encode(), "in.json")
    report = convert_file(src, tmp_path / "out.jsonl")
    assert report.format == "alpaca" and report.n_out == 2


def test_convert_reports_lone_surrogates(folder: Path) -> None:
    src = write(folder, b'{"instruction": "\\ud83d", "output": "x"}\n', "in.jsonl")
    report = convert_file(src, folder / "out.jsonl")
    assert not report.written
    assert [(p.kind, p.line) for p in report.problems] == [("invalid_unicode", 1)]


def test_convert_bad_rows_write_nothing_unless_skipped(folder: Path, data_app) -> None:
    rows = [
        {"instruction": "Q", "output": "A"},
        {"instruction": "", "output": "A"},
        b"{oops\n",
        {"instruction": "Q", "output": ""},
        {"instruction": "Q", "output": "B"},
    ]
    src = write(folder, lines(*rows), "in.jsonl")
    out = folder / "out.jsonl"
    report = convert_file(src, out)
    assert not report.written and not out.exists()
    assert [p.line for p in report.problems] == [2, 3, 4]
    assert os.listdir(folder) == ["in.jsonl"]
    result = invoke(data_app, "convert", src, "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert f"{src}:2" in result.output and "nothing was written" in result.output
    report = convert_file(src, out, skip_invalid=True)
    assert report.written and report.n_out == 2 and len(out.read_text().splitlines()) == 2


CONVERT_ERRORS = [
    # (id, args builder, message)
    ("unknown_format", lambda s, t: (s, t / "o.jsonl", "yaml"), "unknown format"),
    ("out_not_jsonl", lambda s, t: (s, t / "o.json", "auto"), "must end in .jsonl"),
    ("out_is_src", lambda s, t: (s, s, "auto"), "is the input file"),
    ("out_exists", lambda s, t: (s, write(t, b"keep\n", "o.jsonl"), "auto"), "already exists"),
    (
        "undetectable",
        lambda s, t: (write(t, lines({"q": 1}), "x.jsonl"), t / "o2.jsonl", "auto"),
        "cannot tell the format",
    ),
    ("empty_input", lambda s, t: (write(t, b"", "e.jsonl"), t / "o3.jsonl", "auto"), "no rows"),
]


@table("case_id,build,message", CONVERT_ERRORS)
def test_convert_errors(folder: Path, case_id, build, message) -> None:
    src = write(folder, lines(GOOD), "in.jsonl")
    args = build(src, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(QwenftError, match=message):
        convert_file(*args)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_convert_force_overwrites(tmp_path: Path) -> None:
    src = write(tmp_path, lines(GOOD), "in.jsonl")
    out = write(tmp_path, b"old\n", "out.jsonl")
    convert_file(src, out, force=True)
    assert json.loads(out.read_text()) == GOOD


# --------------------------------------------------------------------------------------------------
# split


def test_split_is_deterministic(tmp_path: Path, data_app) -> None:
    rows = [row({"role": "user", "content": f"q{i}"}, A) for i in range(100)]
    src = write(tmp_path, b"\xef\xbb\xbf" + lines(*rows).replace(b"\n", b"\r\n"))
    train, val = split_file(src, 0.1, 7)
    assert (train.name, val.name) == ("data.train.jsonl", "data.val.jsonl")
    t1, v1 = train.read_bytes(), val.read_bytes()
    assert len(t1.splitlines()) == 90 and len(v1.splitlines()) == 10
    assert sorted(t1.splitlines() + v1.splitlines()) == sorted(r.rstrip(b"\n") for r in rows)
    assert check_file(train).ok and check_file(val).ok
    with pytest.raises(QwenftError, match="already exists"):
        split_file(src, 0.1, 7)
    split_file(src, 0.1, 7, force=True)
    assert (train.read_bytes(), val.read_bytes()) == (t1, v1)
    out = tmp_path / "other"
    result = invoke(
        data_app, "split", src, "--val-ratio", "0.1", "--seed", "8", "--out-dir", out, "--json"
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["n_train"], info["n_val"]) == (90, 10)
    assert (out / "data.val.jsonl").read_bytes() != v1


@pytest.mark.parametrize(
    "n,ratio,expected", [(2, 0.1, (1, 1)), (10, 0.99, (1, 9)), (3, 0.5, (1, 2))]
)
def test_split_keeps_a_row_on_each_side(tmp_path: Path, n, ratio, expected) -> None:
    src = write(tmp_path, lines(*[row({"role": "user", "content": f"q{i}"}, A) for i in range(n)]))
    train, val = split_file(src, ratio)
    assert (len(train.read_text().splitlines()), len(val.read_text().splitlines())) == expected


def test_split_json_array(tmp_path: Path) -> None:
    src = write(
        tmp_path,
        json.dumps(
            [{"messages": [{"role": "user", "content": f"q{i}"}, A]} for i in range(10)], indent=2
        ).encode(),
        "arr.json",
    )
    train, val = split_file(src, 0.2)
    assert train.name == "arr.train.jsonl"
    assert check_file(train).n_samples == 8 and check_file(val).n_samples == 2


SPLIT_ERRORS = [
    # (id, content, kwargs, message)
    ("ratio_zero", lines(GOOD, GOOD), {"val_ratio": 0}, "between 0 and 1"),
    ("ratio_one", lines(GOOD, GOOD), {"val_ratio": 1}, "between 0 and 1"),
    ("ratio_negative", lines(GOOD, GOOD), {"val_ratio": -0.1}, "between 0 and 1"),
    ("ratio_big", lines(GOOD, GOOD), {"val_ratio": 1.5}, "between 0 and 1"),
    ("one_row", lines(GOOD), {}, "at least 2"),
    ("bad_rows", lines(GOOD, GOOD, row(U, U)), {}, "has 1 data error"),
    ("empty", b"", {}, "has 1 data error"),
]


@table("case_id,content,kwargs,message", SPLIT_ERRORS)
def test_split_errors(folder: Path, data_app, case_id, content, kwargs, message) -> None:
    src = write(folder, content)
    with pytest.raises(QwenftError, match=message):
        split_file(src, **kwargs)
    assert os.listdir(folder) == ["data.jsonl"]
    ratio = kwargs.get("val_ratio", 0.1)
    result = invoke(data_app, "split", src, "--val-ratio", ratio)
    assert result.exit_code == 2 and "error:" in result.output
    assert os.listdir(folder) == ["data.jsonl"]


def test_write_without_lines(tmp_path: Path) -> None:
    src = write(tmp_path, lines(GOOD, b"\n", GOOD2, row(S, U, A, U, A)))
    out = tmp_path / "kept.jsonl"
    assert write_without_lines(src, out, {3}) == (2, 1)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        GOOD,
        {"messages": [S, U, A, U, A]},
    ]
    with pytest.raises(QwenftError, match="already exists"):
        write_without_lines(src, out, {1})
    arr = write(tmp_path, json.dumps([GOOD, GOOD2], indent=2).encode(), "arr.json")
    assert write_without_lines(arr, out, {2}, force=True) == (1, 1)
    assert json.loads(out.read_text()) == GOOD2


# --------------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.parametrize("args", [[], ["check"], ["convert"], ["split"], ["register"]])
def test_help(data_app, args) -> None:
    result = invoke(data_app, *args, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_check_json_output(tmp_path: Path, data_app) -> None:
    path = write(tmp_path, lines(GOOD, row(U, U), GOOD))
    result = invoke(data_app, "check", path, "--json")
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["n_samples"] == 3 and out["n_valid"] == 2
    assert out["problems"][0]["line"] == 2 and out["tokens"] is None
    assert out["counts"] == {"not_alternating": 1, "duplicate": 1}


def test_check_without_model_stays_light(tmp_path: Path) -> None:
    path = write(tmp_path, lines(GOOD))
    code = (
        "import sys; from qwenft.cli.data import app; from qwenft.data.check import check_file;"
        f"check_file({str(path)!r});"
        "heavy = [m for m in ('torch', 'transformers', 'llamafactory') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# token statistics equal LLaMA-Factory's own preprocessing

LONG = " ".join(f"word{i} 中文" for i in range(120))
THINK = "<think>\nLet me think.\n</think>\n\nThe answer."
STATS_ROWS = [
    {"messages": [U, A]},
    {"messages": [S, U, A, {"role": "user", "content": "再来一次 😀"}, A]},
    {"messages": [{"role": "user", "content": LONG}, A]},  # long prompt: truncated
    {"messages": [U, {"role": "assistant", "content": LONG}]},  # long answer: truncated
    {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG}]},
    {"messages": [U, A, {"role": "user", "content": LONG}, A, U, A]},  # later turns dropped
    {"messages": [S, U, CALL, RESULT, A], "tools": TOOLS},
    {
        "messages": [
            U,
            {
                "role": "function_call",
                "content": "Looking.\n<tool_call>"
                '{"name": "get_weather", "arguments": {}}</tool_call>',
            },
        ],
        "tools": TOOLS,
    },
    {"messages": [U, {"role": "assistant", "content": THINK}, U, A]},
]


@pytest.mark.parametrize(
    "preset,template,default_system,cutoff",
    [
        ("tiny-qwen2", "qwen", None, 96),  # None: the template's own default system prompt
        ("tiny-qwen3", "qwen3", "", 128),
    ],
)
def test_token_counts_equal_llamafactory(
    tmp_path: Path, tiny_home: Path, monkeypatch, preset, template, default_system, cutoff
) -> None:
    from qwenft.models.tiny import ensure_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = ensure_tiny_model(preset, progress=None)
    data = write(tmp_path, lines(*STATS_ROWS))
    assert check_file(data).ok
    config = {"stage": "sft", "template": template, "cutoff_len": cutoff}
    if default_system is not None:  # None: the template's own
        config["default_system"] = default_system
    expected = lengths_and_loss(lf_rows(data, model_dir, config, tmp_path / "lf"))
    assert len(expected) == len(STATS_ROWS)

    encoder = LlamaFactoryEncoder(model_dir, template, cutoff, default_system=default_system)
    rows = list(iter_token_lengths(data, encoder, batch_size=4))
    assert [(kept, loss) for _, _, kept, loss in rows] == expected
    assert [line for line, *_ in rows] == list(range(1, len(STATS_ROWS) + 1))

    stats = token_stats(data, model_dir, template, cutoff, encoder=encoder).to_dict()
    full = sorted(f for _, f, _, _ in rows)
    assert stats["n_samples"] == len(STATS_ROWS) and stats["n_skipped"] == 0
    assert (stats["length"]["min"], stats["length"]["max"]) == (full[0], full[-1])
    assert stats["tokens_after_cutoff"] == sum(k for k, _ in expected)
    assert stats["loss_tokens"] == sum(loss for _, loss in expected)
    assert stats["tokens_total"] - stats["tokens_cut"] == stats["tokens_after_cutoff"]
    over = [line for line, f, _, _ in rows if f > cutoff]
    assert stats["n_over_cutoff"] == len(over) and stats["over_cutoff_lines"] == over
    assert stats["n_over_cutoff"] >= 4
    assert stats["suggested_cutoff_len"] % 64 == 0
    assert stats["suggested_cutoff_len"] >= stats["length"]["p99"]


def test_check_cli_with_token_stats(tmp_path: Path, tiny_home: Path, data_app) -> None:
    data = write(tmp_path, lines(*STATS_ROWS, row(U, U)))
    result = invoke(data_app, "check", data, "--cutoff-len", "64")
    assert result.exit_code == 2 and "token statistics skipped" in result.output
    data = write(tmp_path, lines(*STATS_ROWS))
    result = invoke(data_app, "check", data, "--cutoff-len", "64", "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("{"), result.stdout[:500]
    tokens = json.loads(result.stdout)["tokens"]
    assert tokens["model"] == "tiny-qwen2" and tokens["template"] == "qwen"
    assert tokens["n_samples"] == len(STATS_ROWS) and tokens["n_over_cutoff"] >= 5
    # STATS_ROWS mix reasoning and plain answers: both modes are trained (thinking on), as train
    result = invoke(data_app, "check", data, "--model", "tiny-qwen3", "--cutoff-len", "64")
    assert result.exit_code == 0 and "enable_thinking: true" in result.output
    result = invoke(
        data_app, "check", data, "--model", "tiny-qwen3", "--cutoff-len", "64", "--thinking", "on"
    )
    assert result.exit_code == 0, result.output
    assert "qwen3 template" in result.output and "suggested cutoff_len" in result.output
    result = invoke(data_app, "check", data, "--cutoff-len", "64", "--template", "llama3")
    assert result.exit_code == 2 and "unknown --template" in result.output


def test_check_cli_thinking_follows_the_data_as_train_does(
    tmp_path: Path, tiny_home: Path, data_app
):
    from qwenft.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model("tiny-qwen3", progress=None)
    plain = write(tmp_path, lines(GOOD, GOOD2), "plain.jsonl")
    think = write(tmp_path, lines(row(U, {"role": "assistant", "content": THINK})), "t.jsonl")
    mixed = write(
        tmp_path, lines(row(U, {"role": "assistant", "content": THINK}), GOOD2), "mixed.jsonl"
    )
    for path, thinking in ((plain, False), (think, True), (mixed, True)):
        result = invoke(data_app, "check", path, "--model", "tiny-qwen3", "--json")
        assert result.exit_code == 0, result.output
        tokens = json.loads(result.stdout)["tokens"]
        expected = token_stats(
            path, model_dir, "qwen3", 1024, default_system="", enable_thinking=thinking
        ).to_dict()
        assert tokens["loss_tokens"] == expected["loss_tokens"]
        assert tokens["length"] == expected["length"]


def test_token_stats_bad_arguments(tmp_path: Path, tiny_home: Path) -> None:
    from qwenft.models.tiny import ensure_tiny_model

    data = write(tmp_path, lines(GOOD))
    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    with pytest.raises(QwenftError, match="unknown LLaMA-Factory template"):
        token_stats(data, model_dir, "no-such-template", 64)
    with pytest.raises(QwenftError, match="cutoff"):
        token_stats(data, model_dir, "qwen", 0)
    with pytest.raises(QwenftError, match="cannot load the tokenizer"):
        token_stats(data, tmp_path / "no-model", "qwen", 64)
