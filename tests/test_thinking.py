"""One thinking rule for `chat`, `serve` and `eval` (qwenft.models.target.thinking_mode). Before it,
the same run got different answers: --thinking off on a run trained with thinking was refused by
eval but allowed by chat; --thinking on for a model without a thinking switch was ignored by eval
but refused by chat. A model as it comes has no trained mode: its own is the one `train` would
choose on the data at hand (eval's data), which is off where there is none (chat, serve)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenft.chat import chat_thinking
from qwenft.errors import QwenftError
from qwenft.models.target import thinking_mode
from tests.helpers.builders import write_jsonl, write_model_folder
from tests.helpers.cli import invoke

QWEN3_CONFIG = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64}


def rows(thinking: list[bool]) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {
                    "role": "assistant",
                    "content": f"<think>\nstep {i}\n</think>\n\nanswer {i}" if t else f"answer {i}",
                },
            ]
        }
        for i, t in enumerate(thinking)
    ]


def test_the_rule() -> None:
    assert thinking_mode(True, "auto") is True and thinking_mode(None, "auto") is None
    assert thinking_mode(True, "off") is False  # thinking on trained both modes
    with pytest.raises(QwenftError, match="trained with thinking off"):
        thinking_mode(False, "on")
    assert thinking_mode(False, "on", force=True) is True
    assert thinking_mode(False, "on", trained=False) is True  # a hybrid model as it comes
    for requested in ("on", "off"):
        with pytest.raises(QwenftError, match="no thinking mode"):
            thinking_mode(None, requested, force=True)


@pytest.fixture
def thinking_run(fake_cli: Path, no_token_stats: None, tmp_path: Path) -> tuple[Path, Path]:
    """A run of a Qwen3 model trained with thinking on (its data reasons), and that data."""
    model = write_model_folder(tmp_path / "Qwen3-0.6B", QWEN3_CONFIG)
    data = write_jsonl(tmp_path / "think.jsonl", rows([True, False]))
    trained = invoke("train", "-m", model, "--data", data, "-o", "run")
    assert trained.exit_code == 0, trained.output
    (Path("run") / "adapter_config.json").write_text("{}")
    return Path("run"), data


def test_thinking_off_on_a_thinking_run_is_allowed_in_chat_and_eval(
    thinking_run: tuple[Path, Path], no_token_stats: None
) -> None:
    from qwenft.evaluate import plan_eval

    run, data = thinking_run
    assert chat_thinking(True, "off") is False
    assert plan_eval(str(run), data, thinking="off").enable_thinking is False
    assert plan_eval(str(run), data).enable_thinking is True


def test_thinking_on_without_a_switch_is_refused_by_chat_and_eval(
    fake_cli: Path, tmp_path: Path
) -> None:
    from qwenft.evaluate import plan_eval

    model = write_model_folder(tmp_path / "Qwen2.5-0.5B-Instruct")
    data = write_jsonl(tmp_path / "d.jsonl", rows([False, False]))
    with pytest.raises(QwenftError, match="no thinking mode"):
        chat_thinking(None, "on")
    with pytest.raises(QwenftError, match="no thinking mode"):
        plan_eval(str(model), data, thinking="on")
    result = invoke("eval", model, "--data", data, "--thinking", "on")
    assert result.exit_code == 2 and "no thinking mode" in result.output
    assert plan_eval(str(model), data).enable_thinking is None


def test_a_base_qwen3_without_a_flag_takes_the_mode_train_would_choose(
    fake_cli: Path, tmp_path: Path, no_token_stats: None
) -> None:
    """eval: the mode `train` would choose on its data; chat and serve have none: off."""
    from qwenft.evaluate import plan_eval
    from qwenft.models.target import resolve_target

    model = write_model_folder(tmp_path / "Qwen3-0.6B", QWEN3_CONFIG)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows([False, False]))
    think = write_jsonl(tmp_path / "think.jsonl", rows([True, True]))
    assert plan_eval(str(model), plain).enable_thinking is False
    assert plan_eval(str(model), think).enable_thinking is True
    target = resolve_target(str(model))
    assert target.enable_thinking is False  # what chat and serve use with no --thinking
    assert thinking_mode(target.enable_thinking, "auto") is False
    assert plan_eval(str(model), plain, thinking="on").enable_thinking is True  # not a run
