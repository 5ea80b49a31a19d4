"""Data means what LLaMA-Factory makes of it (issue 23, parts 2 and 3).

- A .txt is one document per line, as LLaMA-Factory reads it (HF datasets' "text" builder): its
  wiki_demo.txt (articles one per line, no blank lines) is that many documents, never one; a blank
  line would be an empty document (the end-of-text token alone), so it is refused with the way out;
  a document per blank-line-separated block only when asked for (`data convert --text-docs
  blocks`). The model tier proves the counts and tokens against LLaMA-Factory's own get_dataset.
- LLaMA-Factory's newer shapes: content-part messages (text, reasoning, tool_call parts; its
  reason_tool_use_demo_50.jsonl) and chosen_messages / rejected_messages pairs (v1_dpo_demo.jsonl)
  convert into qwenft's shapes with nothing lost, or the row is refused naming the part.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenft.data.check import check_file, format_report
from qwenft.data.convert import convert_file
from tests.helpers.builders import read_calls, write_jsonl
from tests.helpers.cli import invoke

# --------------------------------------------------------------------------------------------------
# .txt: one document per line

ARTICLES = [
    f"Article {i}: " + " ".join(f"sentence {j} of article {i} 中文 🦊." for j in range(40))
    for i in range(30)
]


def wiki_demo(folder: Path) -> Path:
    """A file shaped like LLaMA-Factory's wiki_demo.txt: 30 long articles, one per line, no blank
    lines."""
    path = folder / "wiki_demo.txt"
    path.write_text("\n".join(ARTICLES) + "\n", encoding="utf-8")
    return path


def test_wiki_demo_is_thirty_documents_everywhere(tmp_path: Path) -> None:
    src = wiki_demo(tmp_path)
    report = check_file(src)
    assert (report.ok, report.kind, report.n_samples, report.reading) == (True, "pt", 30, "lines")
    result = invoke("data", "check", src)
    assert result.exit_code == 0, result.output
    assert "30 documents (read as LLaMA-Factory reads a .txt: one document per line)" in (
        result.output
    )
    result = invoke("data", "check", src, "--json")
    assert json.loads(result.stdout)["reading"] == "lines"
    out = tmp_path / "wiki.jsonl"
    result = invoke("data", "convert", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert "converted 30 of 30 rows" in result.output and "one document per line" in result.output
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"text": a} for a in ARTICLES]
    assert check_file(out).n_samples == 30


def test_a_blank_line_is_refused_as_the_empty_document_llamafactory_would_train(
    tmp_path: Path,
) -> None:
    src = tmp_path / "paras.txt"
    src.write_text("Doc one,\nstill doc one?\n\nDoc two.\n", encoding="utf-8")
    report = check_file(src)
    assert (report.n_samples, report.n_valid) == (4, 3)  # LLaMA-Factory's 4 rows
    (p,) = report.errors
    assert (p.kind, p.line) == ("blank_line", 3)
    assert "end-of-text token alone" in p.message and "--text-docs blocks" in p.message
    result = invoke("data", "convert", src, "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "blank_line" in result.output
    assert not (tmp_path / "x.jsonl").exists()
    # the blank-line reading, only when asked for
    out = tmp_path / "blocks.jsonl"
    result = invoke("data", "convert", src, "-o", out, "--text-docs", "blocks")
    assert result.exit_code == 0, result.output
    assert "converted 2 of 2 rows" in result.output and "blank-line-separated" in result.output
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == [
        "Doc one,\nstill doc one?",
        "Doc two.",
    ]
    assert check_file(out).ok
    result = invoke("data", "convert", out, "-o", tmp_path / "y.jsonl", "--text-docs", "blocks")
    assert result.exit_code == 2 and "reads a .txt file" in result.output
    result = invoke("data", "convert", src, "-o", out, "--force", "--text-docs", "paragraphs")
    assert result.exit_code == 2 and "lines, blocks" in result.output


def test_text_docs_option_offers_the_readings_of_the_reader() -> None:
    from qwenft.data import reader

    assert reader.TEXT_DOCS == tuple(reader.TEXT_MODES)


def test_lines_end_as_llamafactory_ends_them(tmp_path: Path) -> None:
    """Universal newlines ("\\n", "\\r\\n", a lone "\\r"), nothing else stripped; a byte-order
    mark stays, as LLaMA-Factory's UTF-8 reading keeps it."""
    from qwenft.data.reader import Collector, iter_rows, open_data_file

    src = tmp_path / "t.txt"
    src.write_bytes(b"\xef\xbb\xbfone \r\ntwo\rthree\t\nfour\x0cfive\xe2\x80\xa8six")
    _, fh, mode = open_data_file(src)
    with fh:
        texts = [v["text"] for _, v, _ in iter_rows(fh, mode, Collector())]
    assert texts == ["\ufeffone ", "two", "three\t", "four\x0cfive\u2028six"]


@pytest.mark.usefixtures("no_token_stats")
def test_train_pt_on_a_txt_trains_its_lines(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
    src = wiki_demo(tmp_path)
    result = invoke("train", "--model", local_model, "--data", src, "--stage", "pt", "-o", "p")
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    info = json.loads((Path(cfg["dataset_dir"]) / "dataset_info.json").read_text())
    assert info[cfg["dataset"]]["file_name"] == str(Path("p/data.pt.jsonl").absolute())
    rows = [json.loads(x) for x in Path("p/data.pt.jsonl").read_text().splitlines()]
    assert rows == [{"text": a} for a in ARTICLES]
    blank = tmp_path / "blank.txt"
    blank.write_text("One.\n\nTwo.\n")
    result = invoke("train", "--model", local_model, "--data", blank, "--stage", "pt", "-o", "q")
    assert result.exit_code == 2 and "blank_line" in result.output
    assert not Path("q").exists()


def _lf_txt_rows(data: Path, config: dict, work: Path, monkeypatch: pytest.MonkeyPatch) -> list:
    """LLaMA-Factory's get_dataset on the .txt itself, registered as its wiki_demo.txt is
    (file_name + the text column as prompt): the train rows it builds."""
    from qwenft.models.tiny import ensure_tiny_model
    from tests.helpers import lf_reference

    def register(path: Path, name: str, folder: Path, kind: str) -> dict:
        entry = {"file_name": str(path), "columns": {"prompt": "text"}}
        (folder / "dataset_info.json").write_text(json.dumps({name: entry}))
        return entry

    monkeypatch.setattr(lf_reference, "register_dataset", register)
    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    return lf_reference.lf_rows(data, model_dir, config, work)


def test_txt_documents_and_tokens_equal_llamafactory(
    tmp_path: Path, tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft.data.prepare import write_tokenized
    from qwenft.models.tiny import ensure_tiny_model
    from tests.helpers.lf_reference import load_splits

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LLAMAFACTORY_VERBOSITY", "WARN")
    src = wiki_demo(tmp_path)
    unpacked = {"stage": "pt", "template": "qwen", "cutoff_len": 64, "packing": False}
    lf = _lf_txt_rows(src, unpacked, tmp_path / "lf", monkeypatch)
    assert len(lf) == check_file(src).n_samples == 30  # one sample per article
    model_dir = ensure_tiny_model("tiny-qwen2", progress=None)
    for name, config in (
        ("unpacked", unpacked),
        ("packed", {"stage": "pt", "template": "qwen", "cutoff_len": 64}),
    ):
        from tests.helpers.lf_reference import lf_tokenized

        work = tmp_path / name
        lf_tokenized(src, model_dir, dict(config), work / "lf", work)
        write_tokenized(src, model_dir, dict(config), work / "ours")
        assert load_splits(work / "ours") == load_splits(work / "lf"), name


def test_a_blank_line_is_what_llamafactory_trains_as_a_lone_end_of_text(
    tmp_path: Path, tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LLAMAFACTORY_VERBOSITY", "WARN")
    src = tmp_path / "paras.txt"
    src.write_text("Doc one.\n\nDoc two.\n \nDoc three.\n", encoding="utf-8")
    config = {"stage": "pt", "template": "qwen", "cutoff_len": 64, "packing": False}
    lf = _lf_txt_rows(src, config, tmp_path / "lf", monkeypatch)
    report = check_file(src)
    assert len(lf) == report.n_samples == 5  # the same documents, blank ones included
    eos = lf[0]["input_ids"][-1]
    assert lf[1]["input_ids"] == [eos]  # the empty document: the end-of-text token alone
    assert len(lf[3]["input_ids"]) == 2  # " " + end-of-text
    assert [(p.kind, p.line) for p in report.errors] == [("blank_line", 2), ("blank_line", 4)]


# --------------------------------------------------------------------------------------------------
# LLaMA-Factory's content-part messages and chosen_messages / rejected_messages pairs


def T(value: str) -> dict:
    return {"type": "text", "value": value}


def R(value: str) -> dict:
    return {"type": "reasoning", "value": value}


def C(name: str, **arguments) -> dict:
    return {"type": "tool_call", "value": json.dumps({"name": name, "arguments": arguments})}


TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "circle_area",
                "description": "The area of a circle.",
                "parameters": {
                    "type": "object",
                    "properties": {"radius": {"type": "number"}},
                    "required": ["radius"],
                },
            },
        }
    ]
)
SYSTEM = {"role": "system", "content": [T("You are methodical.")]}
ASK = {"role": "user", "content": [T("Areas for r=1.5 and r=3?")]}
CALLS = {
    "role": "assistant",
    "content": [R("Two calls."), C("circle_area", radius=1.5), C("circle_area", radius=3)],
}
# one tool message for both calls, as in reason_tool_use_demo_50.jsonl
RESULTS = {"role": "tool", "content": [T('[{"area": 7.07}, {"area": 28.27}]')]}
ANSWER = {"role": "assistant", "content": [R("Report both."), T("7.07 and 28.27 m².")]}
REASON_ROW = {"messages": [SYSTEM, ASK, CALLS, RESULTS, ANSWER], "tools": TOOLS}
# one call with text before it, two tool messages after it (two <tool_response> blocks)
TWO_RESULTS_ROW = {
    "messages": [
        ASK,
        {"role": "assistant", "content": [T("Let me compute."), C("circle_area", radius=2)]},
        {"role": "tool", "content": [T("12.57")]},
        {"role": "tool", "content": [T("(cached)")]},
        {"role": "assistant", "content": [T("About 12.57.")]},
    ],
    "tools": TOOLS,
}
PLAIN_ROW = {
    "messages": [
        {"role": "user", "content": [T("Hi")]},
        {"role": "assistant", "content": [T("Hello!")], "loss_weight": 1.0},
    ]
}


def _pair_row(chosen: str, rejected: str, **extra) -> dict:
    system = {"role": "system", "content": [T("Be brief.")], "loss_weight": 0.0}
    user = {"role": "user", "content": [T("Translate: hola")], "loss_weight": 0.0}
    return {
        "chosen_messages": [
            system,
            user,
            {"role": "assistant", "content": [T(chosen)], "loss_weight": 1.0},
        ],
        "rejected_messages": [
            system,
            user,
            {"role": "assistant", "content": [T(rejected)], "loss_weight": 1.0},
        ],
        **extra,
    }


def _converted(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_content_parts_convert_with_nothing_lost(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "reason_tool_use.jsonl", [REASON_ROW, TWO_RESULTS_ROW, PLAIN_ROW])
    before = check_file(src)
    assert [p.kind for p in before.errors] == ["content_parts"] * 3
    assert "qwenft data convert" in before.errors[0].message
    out = tmp_path / "out.jsonl"
    result = invoke("data", "convert", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert "converted 3 of 3 rows (openai -> sft data)" in result.output
    rows = _converted(out)
    assert rows[0] == {
        "messages": [
            {"role": "system", "content": "You are methodical."},
            {"role": "user", "content": "Areas for r=1.5 and r=3?"},
            {
                "role": "function_call",
                "content": "<think>\nTwo calls.\n</think>\n\n"
                + json.dumps(
                    [
                        {"name": "circle_area", "arguments": {"radius": 1.5}},
                        {"name": "circle_area", "arguments": {"radius": 3}},
                    ]
                ),
            },
            {"role": "tool", "content": '[{"area": 7.07}, {"area": 28.27}]'},
            {
                "role": "assistant",
                "content": "<think>\nReport both.\n</think>\n\n7.07 and 28.27 m².",
            },
        ],
        "tools": TOOLS,
    }
    assert rows[1]["messages"][1:4] == [
        {
            "role": "function_call",
            "content": 'Let me compute.\n<tool_call>{"name": "circle_area", "arguments": '
            '{"radius": 2}}</tool_call>',
        },
        {"role": "tool", "content": "12.57\n</tool_response>\n<tool_response>\n(cached)"},
        {"role": "assistant", "content": "About 12.57."},
    ]
    assert rows[2] == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    }
    report = check_file(out)
    assert report.ok and report.n_samples == 3 and report.has_tools, format_report(report)


PART_REFUSALS = [
    # (id, row, error kind, words of the message)
    (
        "image_part",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [T("What is this?"), {"type": "image_url", "value": "cat.png"}],
                },
                ANSWER,
            ]
        },
        "multimodal",
        "content part 1 is image_url",
    ),
    (
        "audio_part",
        {
            "messages": [
                ASK,
                {"role": "assistant", "content": [{"type": "audio_url", "value": "a.wav"}]},
            ]
        },
        "multimodal",
        "content part 0 is audio_url",
    ),
    (
        "video_part",
        {
            "messages": [
                {"role": "user", "content": [{"type": "video_url", "value": "v.mp4"}]},
                ANSWER,
            ]
        },
        "multimodal",
        "content part 0 is video_url",
    ),
    (
        "unknown_part",
        {
            "messages": [
                ASK,
                {"role": "assistant", "content": [T("x"), {"type": "citation", "value": "[1]"}]},
            ]
        },
        "bad_content",
        "content part 1 is of type 'citation'",
    ),
    (
        "reasoning_in_user",
        {"messages": [{"role": "user", "content": [R("hm"), T("q")]}, ANSWER]},
        "bad_content",
        "content part 0 is reasoning in a user turn",
    ),
    (
        "tool_call_in_tool",
        {
            "messages": [
                ASK,
                CALLS,
                {"role": "tool", "content": [C("circle_area", radius=1)]},
                ANSWER,
            ],
            "tools": TOOLS,
        },
        "bad_content",
        "content part 0 is tool_call in a tool turn",
    ),
    (
        "part_without_value",
        {
            "messages": [
                ASK,
                {"role": "assistant", "content": [{"type": "text", "value": None}, T("x")]},
            ]
        },
        "bad_content",
        "content part 0 (text) has no string value",
    ),
    (
        "tool_call_not_json",
        {
            "messages": [
                ASK,
                {
                    "role": "assistant",
                    "content": [{"type": "tool_call", "value": "circle_area(1)"}],
                },
            ],
            "tools": TOOLS,
        },
        "bad_function_call",
        "content part 0 (tool_call) is not valid JSON",
    ),
    (
        "unknown_function",
        {
            "messages": [ASK, {"role": "assistant", "content": [C("square_area", side=1)]}],
            "tools": TOOLS,
        },
        "unknown_function",
        "calls square_area",
    ),
    (
        "answer_not_trained",
        {"messages": [ASK, {**ANSWER, "loss_weight": 0.0}]},
        "weight_zero",
        "weight",
    ),
    (
        "prompt_trained",
        {"messages": [{**ASK, "loss_weight": 1.0}, ANSWER]},
        "bad_weight",
        "loss_weight 1.0 on a user turn",
    ),
    ("extra_info", {**PLAIN_ROW, "extra_info": "kto_label=1"}, "extra_info", "KTO labels"),
    (
        "reasoning_and_think",
        {
            "messages": [
                ASK,
                {"role": "assistant", "content": [R("a"), T("<think>\nb\n</think>\n\nc")]},
            ]
        },
        "bad_reasoning",
        "one thought per answer",
    ),
]


@pytest.mark.parametrize("case_id,row,kind,words", PART_REFUSALS, ids=[c[0] for c in PART_REFUSALS])
def test_a_part_qwenft_cannot_carry_refuses_the_row_naming_it(
    tmp_path: Path, case_id, row, kind, words
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [PLAIN_ROW, row])
    report = convert_file(src, tmp_path / "out.jsonl")
    assert not report.written
    (p,) = [p for p in report.problems if p.severity == "error"]
    assert (p.kind, p.line) == (kind, 2) and words in p.message, p
    result = invoke("data", "convert", src, "-o", tmp_path / "out.jsonl", "--skip-invalid")
    assert result.exit_code == 0 and "converted 1 of 2 rows" in result.output


def test_chosen_and_rejected_messages_become_a_preference_pair(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "v1_dpo.jsonl", [_pair_row("hello", "bye"), _pair_row("hi", "ciao", tools=TOOLS)]
    )
    before = check_file(src)
    assert before.errors[0].kind == "missing_messages"
    assert "chosen_messages / rejected_messages" in before.errors[0].message
    out = tmp_path / "pairs.jsonl"
    result = invoke("data", "convert", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert "converted 2 of 2 rows (openai -> preference data)" in result.output
    rows = _converted(out)
    assert rows[0] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Translate: hola"},
        ],
        "chosen": {"role": "assistant", "content": "hello"},
        "rejected": {"role": "assistant", "content": "bye"},
    }
    assert rows[1]["tools"] == TOOLS
    assert check_file(out).ok and check_file(out).kind == "preference"


def test_a_pair_that_does_not_share_its_prompt_is_refused_saying_why(tmp_path: Path) -> None:
    other = _pair_row("hello", "bye")
    other["rejected_messages"][1] = {"role": "user", "content": [T("Translate: adiós")]}
    longer = _pair_row("hello", "bye")
    system, user, answer = longer["chosen_messages"]
    more = [{"role": "assistant", "content": [T("Sure.")]}, {"role": "user", "content": [T("On")]}]
    longer["chosen_messages"] = [system, user, *more, answer]
    user_last = _pair_row("hello", "bye")
    user_last["rejected_messages"] = user_last["rejected_messages"][:2]
    one_side = {"chosen_messages": _pair_row("a", "b")["chosen_messages"]}
    src = write_jsonl(tmp_path / "in.jsonl", [other, longer, user_last, one_side])
    report = convert_file(src, tmp_path / "out.jsonl")
    assert not report.written
    got = [(p.line, p.kind, p.field) for p in report.problems]
    assert got == [
        (1, "prefix_mismatch", "rejected_messages[1]"),
        (2, "prefix_mismatch", "rejected_messages[2]"),
        (3, "bad_side", "rejected_messages"),
        (4, "missing_side", "rejected_messages"),
    ]
    assert "do not share the prompt: message 1 (user) differs" in report.problems[0].message
    assert "chosen_messages has more turns" in report.problems[1].message


@pytest.mark.usefixtures("no_token_stats")
def test_train_takes_the_converted_files(fake_cli: Path, local_model: Path, tmp_path: Path) -> None:
    sft = tmp_path / "sft.jsonl"
    src = write_jsonl(tmp_path / "a.jsonl", [REASON_ROW, TWO_RESULTS_ROW, PLAIN_ROW])
    assert invoke("data", "convert", src, "-o", sft).exit_code == 0
    result = invoke("train", "--model", local_model, "--data", sft, "-o", "s")
    assert result.exit_code == 0, result.output
    pairs = tmp_path / "pairs.jsonl"
    src = write_jsonl(tmp_path / "b.jsonl", [_pair_row("hello", "bye"), _pair_row("hi", "ciao")])
    assert invoke("data", "convert", src, "-o", pairs).exit_code == 0
    result = invoke("train", "--model", local_model, "--data", pairs, "--stage", "dpo", "-o", "d")
    assert result.exit_code == 0, result.output
    assert read_calls(fake_cli)[-1]["yaml"]["stage"] == "dpo"
