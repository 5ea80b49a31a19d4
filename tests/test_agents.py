"""Agents (issue 13): tool-call and reasoning data in, checked and converted; a trained model that
calls tools through `qwenft chat --tools` and `qwenft serve`; reasoning kept apart in chat.

Fast tier: the bad-input corpus (check and convert), conversions, the thinking rule, the serve
wrapper's tool-reply handling, chat's reasoning/tool plumbing. Model tier: token counts of converted
tool-call and reasoning rows equal LLaMA-Factory's own preprocessing. e2e: tiny-qwen2 learns to call
a tool and an OpenAI client drives it through `qwenft serve`; tiny-qwen3 trains on mixed reasoning
data and greedy chat in each mode returns that mode's answer.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qwenft.data.check import check_file, format_report
from qwenft.data.convert import convert_file
from qwenft.data.reasoning import count_reasoning, thinking_plan, with_reasoning
from tests.helpers import cli
from tests.helpers.builders import lines, table, write
from tests.helpers.e2e import LEARN, serve_until_ready
from tests.helpers.learning import LM, assert_learned, trained_rows
from tests.helpers.lf_reference import lengths_and_loss, lf_rows

U = {"role": "user", "content": "Weather in Paris?"}
A = {"role": "assistant", "content": "Paris: 18C and sunny."}
FN = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OPENAI_TOOLS = [{"type": "function", "function": FN}]
TOOLS = json.dumps([FN])
CALL = {
    "role": "function_call",
    "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
}
RESULT = {"role": "tool", "content": "18C sunny"}
THINK = with_reasoning("The user wants the weather.", "Paris: 18C and sunny.")


def row(*messages: dict, **extra: object) -> dict:
    return {"messages": list(messages), **extra}


def tc(cid: str | None, name: str = "get_weather", arguments: object = '{"city": "Paris"}') -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": cid, **call} if cid is not None else call


def calls(*tool_calls: dict, content: object = None, **extra: object) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(tool_calls), **extra}


def reply(content: str, cid: str | None = None) -> dict:
    return {"role": "tool", "content": content, **({"tool_call_id": cid} if cid else {})}


GOOD_OPENAI = row(U, calls(tc("c1")), reply("18C sunny", "c1"), A, tools=OPENAI_TOOLS)

# --------------------------------------------------------------------------------------------------
# the bad-input corpus: every case exits 2 and names file:line (a good row first: line 2)

CHECK_BAD = [
    # (id, row in qwenft's shape, kind)
    (
        "arguments_not_json",
        row(
            U,
            {
                "role": "function_call",
                "content": json.dumps({"name": "get_weather", "arguments": "{city: Paris"}),
            },
            RESULT,
            A,
            tools=TOOLS,
        ),
        "bad_arguments",
    ),
    (
        "arguments_a_list",
        row(
            U,
            {
                "role": "function_call",
                "content": json.dumps({"name": "get_weather", "arguments": ["Paris"]}),
            },
            RESULT,
            A,
            tools=TOOLS,
        ),
        "bad_arguments",
    ),
    (
        "arguments_a_json_string",
        row(
            U,
            {
                "role": "function_call",
                "content": json.dumps({"name": "get_weather", "arguments": '{"city": "Paris"}'}),
            },
            RESULT,
            A,
            tools=TOOLS,
        ),
        "bad_arguments",
    ),
    (
        "call_left_without_reply",
        row(U, CALL, {"role": "user", "content": "and?"}, A, tools=TOOLS),
        "not_alternating",
    ),
    ("reply_without_call", row(U, RESULT, A), "not_alternating"),
    ("reasoning_content_key", row(U, {**A, "reasoning_content": "hm"}), "reasoning_dropped"),
    ("think_unclosed", row(U, {"role": "assistant", "content": "<think>\nhm"}), "bad_think"),
    ("think_not_first", row(U, {"role": "assistant", "content": "Yes. " + THINK}), "bad_think"),
    ("think_twice", row(U, {"role": "assistant", "content": THINK + THINK}), "bad_think"),
    ("think_close_only", row(U, {"role": "assistant", "content": "</think>\n\nYes."}), "bad_think"),
    (
        "think_unclosed_in_a_call",
        row(
            U,
            {"role": "function_call", "content": "<think>\nhm\n" + CALL["content"]},
            RESULT,
            A,
            tools=TOOLS,
        ),
        "bad_think",
    ),
]

CONVERT_BAD = [
    # (id, OpenAI row, kind)
    (
        "reply_to_unknown_id",
        row(U, calls(tc("c1")), reply("18C", "c9"), A, tools=OPENAI_TOOLS),
        "unknown_tool_call_id",
    ),
    (
        "call_not_in_tools",
        row(U, calls(tc("c1", "get_time")), reply("9am", "c1"), A, tools=OPENAI_TOOLS),
        "unknown_function",
    ),
    (
        "arguments_not_json",
        row(
            U,
            calls(tc("c1", arguments="{'city': 'Paris'}")),
            reply("18C", "c1"),
            A,
            tools=OPENAI_TOOLS,
        ),
        "bad_arguments",
    ),
    (
        "arguments_not_object",
        row(U, calls(tc("c1", arguments="[1, 2]")), reply("18C", "c1"), A, tools=OPENAI_TOOLS),
        "bad_arguments",
    ),
    ("call_without_reply", row(U, calls(tc("c1")), A, tools=OPENAI_TOOLS), "unanswered_call"),
    (
        "parallel_call_half_answered",
        row(
            U,
            calls(tc("c1"), tc("c2", arguments='{"city": "Rome"}')),
            reply("18C", "c1"),
            A,
            tools=OPENAI_TOOLS,
        ),
        "unanswered_call",
    ),
    (
        "reply_twice",
        row(U, calls(tc("c1")), reply("18C", "c1"), reply("19C", "c1"), A, tools=OPENAI_TOOLS),
        "duplicate_tool_reply",
    ),
    ("reply_without_any_call", row(U, reply("18C", "c1"), A), "tool_without_call"),
    (
        "more_replies_than_calls",
        row(U, calls(tc(None)), reply("18C"), reply("19C"), A, tools=OPENAI_TOOLS),
        "tool_without_call",
    ),
    (
        "call_ids_repeat",
        row(U, calls(tc("c1"), tc("c1")), reply("a", "c1"), A, tools=OPENAI_TOOLS),
        "duplicate_call_id",
    ),
    ("reasoning_not_a_string", row(U, {**A, "reasoning_content": ["hm"]}), "bad_reasoning"),
    (
        "reasoning_and_think_block",
        row(U, {"role": "assistant", "content": THINK, "reasoning_content": "hm"}),
        "bad_reasoning",
    ),
    (
        "reasoning_with_bad_think",
        row(U, {"role": "assistant", "content": "y <think>\nx\n</think>"}),
        "bad_think",
    ),
]


@table("case_id,bad,kind", CHECK_BAD)
def test_check_refuses_bad_tool_and_reasoning_rows(tmp_path: Path, data_app, case_id, bad, kind):
    path = write(tmp_path, lines(row(U, A), bad))
    report = check_file(path)
    found = [p for p in report.errors if p.kind == kind]
    assert found and found[0].line == 2, format_report(report)
    result = cli.invoke("data", "check", path, app=data_app)
    assert result.exit_code == 2 and f"{path}:2" in result.output and kind in result.output


@table("case_id,bad,kind", CONVERT_BAD)
def test_convert_refuses_bad_tool_and_reasoning_rows(tmp_path: Path, data_app, case_id, bad, kind):
    src = write(tmp_path, lines(GOOD_OPENAI, bad), "in.jsonl")
    out = tmp_path / "out.jsonl"
    report = convert_file(src, out, "openai")
    assert not report.written and not out.exists()
    found = [p for p in report.problems if p.kind == kind and p.severity == "error"]
    assert found and found[0].line == 2, report.to_dict()
    result = cli.invoke("data", "convert", src, "-o", out, app=data_app)
    assert result.exit_code == 2 and f"{src}:2" in result.output and kind in result.output
    kept = convert_file(src, out, "openai", skip_invalid=True)  # only that row is refused
    assert kept.written and kept.n_out == 1


def test_a_thought_out_of_qwen3_form_is_a_warning(tmp_path: Path, data_app) -> None:
    path = write(tmp_path, lines(row(U, {"role": "assistant", "content": "<think>hm</think>Yes."})))
    report = check_file(path)
    assert report.ok and [(p.kind, p.line) for p in report.warnings] == [("think_form", 1)]


def test_the_corpus_is_large_enough() -> None:
    assert len(CHECK_BAD) + len(CONVERT_BAD) >= 15


# --------------------------------------------------------------------------------------------------
# what converts, and how


def _converted(tmp_path: Path, rows: list[dict], fmt: str = "auto") -> list[dict]:
    src = write(tmp_path, lines(*rows), "in.jsonl")
    out = tmp_path / "out.jsonl"
    report = convert_file(src, out, fmt)
    assert report.written, report.to_dict()
    assert check_file(out).ok, format_report(check_file(out))
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_parallel_replies_are_matched_by_id_not_order(tmp_path: Path) -> None:
    rows = [
        row(
            U,
            calls(tc("a"), tc("b", arguments='{"city": "Rome"}'), content="Checking."),
            reply("22C", "b"),
            reply("18C", "a"),
            A,
            tools=OPENAI_TOOLS,
        )
    ]
    (out,) = _converted(tmp_path, rows)
    assert out["messages"][1] == {
        "role": "function_call",
        "content": 'Checking.\n<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]</tool_call>',
    }
    assert out["messages"][2] == {
        "role": "tool",
        "content": "18C\n</tool_response>\n<tool_response>\n22C",
    }
    assert json.loads(out["tools"]) == OPENAI_TOOLS


def test_replies_without_ids_pair_by_order_and_a_row_may_end_with_calls(tmp_path: Path) -> None:
    rows = [
        row(U, calls(tc(None)), reply("18C"), A, tools=OPENAI_TOOLS),
        row(U, calls(tc("c1")), tools=OPENAI_TOOLS),
    ]
    first, second = _converted(tmp_path, rows)
    assert first["messages"][2] == {"role": "tool", "content": "18C"}
    assert second["messages"][-1]["role"] == "function_call"


def test_reasoning_content_becomes_the_qwen3_think_form(tmp_path: Path) -> None:
    rows = [
        row(U, {**A, "reasoning_content": "\nThe user wants the weather.\n"}),
        row(
            U,
            calls(tc("c1"), reasoning_content="Need the tool."),
            reply("18C", "c1"),
            {"role": "assistant", "content": "18C.", "reasoning": "Read it."},
            tools=OPENAI_TOOLS,
        ),
    ]
    plain, tool = _converted(tmp_path, rows)
    assert plain["messages"][1]["content"] == THINK
    assert tool["messages"][1]["content"] == (
        '<think>\nNeed the tool.\n</think>\n\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    )
    assert tool["messages"][3]["content"] == "<think>\nRead it.\n</think>\n\n18C."


def test_glaive_rows_llamafactory_trains_are_accepted(tmp_path: Path, data_app) -> None:
    """The shape of LLaMA-Factory's glaive_toolcall_zh_demo.json: calls and results as
    function_call/observation, tools as a JSON string, and rows where a tool result follows a text
    answer (LLaMA-Factory trains them: the answer as text, the result as a tool response)."""
    tools = json.dumps(
        [
            {
                "name": "calculate_discount",
                "description": "计算折扣价格",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "original_price": {"type": "number"},
                        "discount_percentage": {"type": "number"},
                    },
                },
            }
        ],
        ensure_ascii=False,
    )
    call = json.dumps(
        {
            "name": "calculate_discount",
            "arguments": {"original_price": 200, "discount_percentage": 20},
        }
    )
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "这件衣服打八折后多少钱？原价200美元。"},
                {"from": "function_call", "value": call},
                {"from": "observation", "value": '{"discounted_price": 160}'},
                {"from": "gpt", "value": "打折后是160美元。"},
            ],
            "tools": tools,
        },
        {
            "conversations": [
                {"from": "human", "value": "原价200美元，打八折，我要付多少？"},
                {
                    "from": "gpt",
                    "value": "好的，让我帮你计算一下。\nAI 计算折扣: "
                    '{"原价": 200, "折扣百分比": 20}',
                },
                {"from": "observation", "value": '{"discounted_price": 160}'},
                {"from": "gpt", "value": "您需要支付160美元。"},
                {"from": "human", "value": "谢谢！"},
                {"from": "gpt", "value": "不客气！"},
            ],
            "tools": tools,
        },
        {
            "conversations": [
                {"from": "human", "value": "你好"},
                {"from": "gpt", "value": "你好！"},
            ],
            "tools": "[]",
        },
    ]
    src = write(tmp_path, json.dumps(rows, ensure_ascii=False, indent=2).encode(), "glaive.json")
    out = tmp_path / "glaive.jsonl"
    report = convert_file(src, out)
    assert report.written and report.n_out == 3 and report.format == "sharegpt"
    assert [p.kind for p in report.problems] == ["tool_after_text"]
    checked = check_file(out)
    assert checked.ok and [(p.kind, p.line) for p in checked.warnings] == [("tool_after_text", 2)]
    assert cli.invoke("data", "check", out, app=data_app).exit_code == 0


# --------------------------------------------------------------------------------------------------
# the thinking rule (qwenft.data.reasoning.thinking_plan)

PLAIN = row({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"})
EMPTY_THOUGHT = row(U, {"role": "assistant", "content": with_reasoning("", "Hello!")})
REASONS = row(U, {"role": "assistant", "content": THINK})


def test_count_reasoning_counts_an_empty_thought_as_a_direct_answer(tmp_path: Path) -> None:
    counts = count_reasoning(write(tmp_path, lines(PLAIN, REASONS, EMPTY_THOUGHT, REASONS)))
    assert (counts.reasoning, counts.plain) == (2, 2)
    assert (counts.first_reasoning, counts.first_plain) == (2, 1)


def test_count_reasoning_reads_a_file_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft.data import reasoning

    reads = []
    real = reasoning._count_reasoning
    monkeypatch.setattr(reasoning, "_count_reasoning", lambda p: reads.append(p) or real(p))
    path = write(tmp_path, lines(PLAIN, REASONS))
    assert count_reasoning(path).reasoning == count_reasoning(path).reasoning == 1
    assert len(reads) == 1  # data check and the settings resolver share one pass
    path.write_bytes(lines(PLAIN, REASONS, REASONS))
    assert (count_reasoning(path).reasoning, len(reads)) == (2, 2)  # the new content is counted


@pytest.mark.parametrize(
    "rows,model,requested,template,expected",
    [
        ([PLAIN], "hybrid", "auto", "qwen3", False),
        ([REASONS], "hybrid", "auto", "qwen3", True),
        ([REASONS, PLAIN], "hybrid", "auto", "qwen3", True),  # mixed: both modes, not refused
        ([REASONS, PLAIN], "hybrid", "off", "qwen3", False),
        ([PLAIN], "hybrid", "on", "qwen3", True),
        ([REASONS, PLAIN], "always", "auto", "qwen3", None),
        ([REASONS], "none", "auto", "qwen", None),
        ([REASONS], "hybrid", "auto", "qwen3_nothink", None),
    ],
)
def test_thinking_plan(tmp_path: Path, rows, model, requested, template, expected) -> None:
    plan = thinking_plan(write(tmp_path, lines(*rows)), model, requested, template)
    enable, notes = plan
    assert enable is expected and notes
    assert (plan.warning is not None) == (template in ("qwen", "qwen3_nothink"))
    if model == "hybrid" and expected and len(rows) == 2:
        assert any("empty <think>" in n for n in notes) and any(
            "thought and answer" in n for n in notes
        )


def test_data_check_says_how_each_kind_is_trained(tmp_path: Path, data_app) -> None:
    path = write(tmp_path, lines(REASONS, PLAIN))
    result = cli.invoke("data", "check", path, app=data_app)
    assert result.exit_code == 0
    assert "reasoning: 1 of 2 samples reason; for a Qwen3 hybrid model: enable_thinking: true" in (
        result.output
    )
    assert "direct answers (1 sample): trained after an empty <think>" in result.output
    data = json.loads(cli.invoke("data", "check", path, "--json", app=data_app).stdout)
    assert data["reasoning"]["enable_thinking"] is True
    assert data["reasoning"]["reasoning_samples"] == 1
    plain = write(tmp_path, lines(PLAIN), "plain.jsonl")
    assert "reasoning:" not in cli.invoke("data", "check", plain, app=data_app).output


# --------------------------------------------------------------------------------------------------
# serve: the OpenAI tool loop through LLaMA-Factory's API


def test_serve_merges_tool_replies_in_the_calls_order() -> None:
    from qwenft.serve import RequestChecks, decode_call_arguments, merge_tool_replies

    history = [
        U,
        calls(tc("a"), tc("b", arguments='{"city": "Rome"}')),
        reply("22C", "b"),
        reply("18C", "a"),
    ]
    body = {"model": "m", "messages": list(history)}
    assert merge_tool_replies(body) is None
    assert body["messages"][-1] == {
        "role": "tool",
        "content": "18C\n</tool_response>\n<tool_response>\n22C",
    }
    assert merge_tool_replies({"messages": [U, calls(tc("a")), reply("x", "zz")]})[0].startswith(
        "messages[2].tool_call_id 'zz' answers no call"
    )
    assert (
        "answered twice"
        in merge_tool_replies({"messages": [U, calls(tc("a")), reply("x", "a"), reply("y", "a")]})[
            0
        ]
    )
    # the history's calls: arguments decoded, so the prompt shows them as trained
    (fn,) = decode_call_arguments(
        [
            {
                "role": "function",
                "content": json.dumps([{"name": "get_weather", "arguments": '{"city": "Paris"}'}]),
            }
        ]
    )
    assert json.loads(fn["content"]) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]

    checks = RequestChecks(None, chat_model=None)
    checks.served_model = "m"
    problem, raw = checks.prepare(json.dumps({"model": "m", "messages": history}).encode())
    assert problem is None and len(json.loads(raw)["messages"]) == 3
    problem, _ = checks.prepare(
        json.dumps({"model": "m", "messages": [U, calls(tc("a")), reply("x", "q")]}).encode()
    )
    assert problem and "answers no call" in problem[0]


# --------------------------------------------------------------------------------------------------
# chat: reasoning apart, the run's thinking mode, tool calls shown as calls


def test_split_reasoning_and_streaming_router() -> None:
    from qwenft.chat import _ThoughtRouter, split_reasoning

    assert split_reasoning(THINK) == ("The user wants the weather.", "Paris: 18C and sunny.")
    assert split_reasoning("Hello!") == ("", "Hello!")
    assert split_reasoning("<think>\ncut off") == ("cut off", "")
    text, thought = [], []
    router = _ThoughtRouter(text.append, thought.append)
    for k in range(0, len(THINK), 3):
        router.feed(THINK[k : k + 3])
    router.close()
    assert "".join(thought).strip() == "The user wants the weather."
    assert "".join(text) == "Paris: 18C and sunny."


def test_chat_thinking_keeps_the_runs_mode() -> None:
    from qwenft.chat import chat_thinking
    from qwenft.errors import QwenftError

    assert chat_thinking(True, "auto") is None and chat_thinking(True, "off") is False
    assert chat_thinking(False, "off") is False and chat_thinking(False, "on", force=True)
    with pytest.raises(QwenftError, match="trained with thinking off"):
        chat_thinking(False, "on")
    with pytest.raises(QwenftError, match="no thinking mode"):
        chat_thinking(None, "on")


def test_run_turn_shows_calls_and_reads_results(capsys) -> None:
    from qwenft.chat import Reply, load_tools, run_turn

    class Fake:
        def __init__(self) -> None:
            self.got: list = []

        def send(self, prompt, on_text, on_reasoning, images=None):
            on_reasoning("Need the tool.")
            return Reply("", "Need the tool.", [("get_weather", '{"city": "Paris"}')])

        def tool_results(self, results, on_text, on_reasoning):
            self.got.append(results)
            return Reply("Paris: 18C and sunny.")

    fake, out = Fake(), []
    reply_ = run_turn(fake, "Weather?", out.append, read=lambda _: "18C sunny", stream=False)
    assert fake.got == [["18C sunny"]] and reply_.answer == "Paris: 18C and sunny."
    assert out == ['tool call: get_weather {"city": "Paris"}\n', "Paris: 18C and sunny."]
    assert "thinking: Need the tool." in capsys.readouterr().err
    assert load_tools(json.dumps(OPENAI_TOOLS))[0]["function"]["name"] == "get_weather"


# --------------------------------------------------------------------------------------------------
# model tier: token counts of converted rows equal LLaMA-Factory's own preprocessing

TOOL_ROWS = [
    GOOD_OPENAI,
    row(
        U,
        calls(tc("a"), tc("b", arguments='{"city": "Rome"}'), content="Checking both."),
        reply("22C", "b"),
        reply("18C", "a"),
        A,
        tools=OPENAI_TOOLS,
    ),
    row(
        {"role": "system", "content": "Be brief."},
        U,
        calls(tc(None)),
        reply("18C"),
        {"role": "assistant", "content": "18C."},
        U,
        calls(tc("c2")),
        reply("19C", "c2"),
        A,
        tools=OPENAI_TOOLS,
    ),
]
REASONING_ROWS = [
    row(U, {**A, "reasoning_content": "The user wants the weather."}),
    row({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}),
    row(
        U,
        calls(tc("c1"), reasoning_content="Need the tool."),
        reply("18C", "c1"),
        {"role": "assistant", "content": "18C.", "reasoning_content": "Read it."},
        tools=OPENAI_TOOLS,
    ),
    row(
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "One and one."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ),
]


@pytest.mark.parametrize(
    "preset,template,rows,enable_thinking",
    [
        ("tiny-qwen2", "qwen", TOOL_ROWS, True),
        ("tiny-qwen3", "qwen3", TOOL_ROWS + REASONING_ROWS, True),  # mixed: both modes
        ("tiny-qwen3", "qwen3", REASONING_ROWS, False),
    ],
)
def test_converted_rows_count_as_llamafactory_does(
    tmp_path: Path, tiny_home: Path, monkeypatch, preset, template, rows, enable_thinking
):
    from qwenft.data.tokens import LlamaFactoryEncoder, iter_token_lengths
    from qwenft.models.tiny import ensure_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = ensure_tiny_model(preset, progress=None)
    src = write(tmp_path, lines(*rows), "openai.jsonl")
    data = tmp_path / "data.jsonl"
    assert convert_file(src, data, "openai").n_out == len(rows)
    config = {
        "stage": "sft",
        "template": template,
        "cutoff_len": 1024,
        "enable_thinking": enable_thinking,
    }
    expected = lengths_and_loss(lf_rows(data, model_dir, config, tmp_path / "lf"))
    assert len(expected) == len(rows)
    encoder = LlamaFactoryEncoder(model_dir, template, 1024, enable_thinking=enable_thinking)
    got = [(kept, loss) for _, _, kept, loss in iter_token_lengths(data, encoder, batch_size=3)]
    assert got == expected


# --------------------------------------------------------------------------------------------------
# e2e: a trained model that calls tools, served to an OpenAI client

WEATHER_Q = "Weather in Paris?"
WEATHER_A = "Paris: 18C and sunny."
# one call row (the tiny model mixes up the arguments of near-identical rows) and a plain one
TOOL_TRAIN = [
    row(
        {"role": "user", "content": WEATHER_Q},
        calls(tc("c1")),
        reply("18C sunny", "c1"),
        {"role": "assistant", "content": WEATHER_A},
        tools=OPENAI_TOOLS,
    ),
    row(
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        tools=OPENAI_TOOLS,
    ),
]
# LEARN with room for the tools prompt, the learning rate decaying to 0 (cosine): the one token
# that decides between calling and answering ("<tool_call>" or "Hello") settles slowly, and at a
# constant rate it swings (measured here, lowest logit lead of the two rows' trained tokens: 0.27
# after 80 steps, then 1.2, 2.1, 3.3, 5.0 at 70, 80, 90, 100 of 120 cosine steps, 5.0 at 120).
TOOL_LEARN = [
    *LEARN[: LEARN.index("--cutoff-len")],
    "--cutoff-len",
    "384",
    *LEARN[LEARN.index("--cutoff-len") + 2 :],
]
TOOL_LEARN[TOOL_LEARN.index("lr_scheduler_type=constant")] = "lr_scheduler_type=cosine"
TOOL_STEPS = 120
# Mixed reasoning: the lowest lead 7.7 and 5.8 (the two rows) after 80 steps, 4.9 after 70.
MIXED_STEPS = 80


def test_trained_model_calls_tools_through_serve_and_chat(qwenft, tmp_path: Path) -> None:
    import signal

    import openai

    from qwenft import serve as serve_mod

    src = write(tmp_path, lines(*TOOL_TRAIN), "openai.jsonl")
    data = tmp_path / "tools.jsonl"
    qwenft("data", "convert", src, "-o", data)
    run = tmp_path / "runs" / "tools"
    qwenft(
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "lora",
        "--data",
        data,
        "-o",
        run,
        "--max-steps",
        TOOL_STEPS,
        *TOOL_LEARN,
    )
    # the learning claim: every trained token of both rows (the call, and the answer after the
    # tool's result) ranked first with a logit margin, so greedy decoding reproduces the call.
    # serve and chat below run base + adapter (merging is the merge tests')
    assert_learned(LM.of_run(run), trained_rows(run, data, tmp_path / "lf"))

    port = serve_mod.free_port()
    proc = serve_until_ready(qwenft, run, port, tmp_path / "serve.err")
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120
        )
        msgs: list = [{"role": "user", "content": WEATHER_Q}]
        first = client.chat.completions.create(
            model=run.name, messages=msgs, tools=OPENAI_TOOLS, temperature=0, max_tokens=64
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        msgs += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18C sunny"},
        ]
        second = client.chat.completions.create(
            model=run.name, messages=msgs, tools=OPENAI_TOOLS, temperature=0, max_tokens=64
        )
        assert second.choices[0].finish_reason == "stop"  # answers after the result, and stops
        assert second.choices[0].message.content.strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    tools = write(tmp_path, json.dumps(OPENAI_TOOLS).encode(), "tools.json")
    chat = subprocess.run(
        qwenft.argv("chat", run, "--tools", tools, "--prompt", WEATHER_Q, "--max-new-tokens", 64),
        input="18C sunny\n",
        capture_output=True,
        text=True,
        env=qwenft.env,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    call_line, answer = chat.stdout.splitlines()  # the call shown, the answer after its result
    assert call_line.startswith("tool call: get_weather {") and answer.strip(), chat.stdout


# --------------------------------------------------------------------------------------------------
# e2e: mixed reasoning data on tiny-qwen3 trains both modes
# NEEDS settings.thinking_choice to call qwenft.data.reasoning.thinking_plan (it refused mixed
# data before issue 13).

MIXED = [
    row(
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    ),
    row({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there!"}),
]


def test_mixed_reasoning_trains_both_modes_on_tiny_qwen3(qwenft, tmp_path: Path) -> None:
    src = write(tmp_path, lines(*MIXED), "openai.jsonl")
    data = tmp_path / "mixed.jsonl"
    qwenft("data", "convert", src, "-o", data)
    run = tmp_path / "runs" / "mixed"
    qwenft(
        "train",
        "--model",
        "tiny-qwen3",
        "--method",
        "lora",
        "--data",
        data,
        "-o",
        run,
        "--max-steps",
        MIXED_STEPS,
        *LEARN,
    )
    assert json.loads((run / "qwenft.json").read_text())["enable_thinking"] is True
    # both modes learned: the reasoning row's thought and answer, the direct row's empty thought
    # and answer, every trained token ranked first with a logit margin
    lm = LM.of_run(run)
    assert_learned(lm, trained_rows(run, data, tmp_path / "lf"))
    # `qwenft chat` in the run's mode shows a thought, then answers; with --thinking off it
    # answers without one; both stop before the token limit
    think = qwenft("chat", run, "--prompt", "What is 2+2?", "--max-new-tokens", 40)
    thought = [x for x in think.stderr.splitlines() if x.startswith("thinking: ")]
    assert thought and think.stdout.strip() and lm.n_tokens(think.stdout) < 40, think.stderr
    direct = qwenft("chat", run, "--thinking", "off", "--prompt", "Say hi", "--max-new-tokens", 40)
    assert direct.stdout.strip() and lm.n_tokens(direct.stdout) < 40
    assert "thinking:" not in direct.stderr
