"""One home for each rule: qwenft.choices and the settings resolver that train, plan, data check
and eval share. Each bug that came from a rule written twice has its regression test here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qwenft import settings
from qwenft.choices import AUTO, DeepSpeed, Method, Overlength, Template, Thinking, auto_deepspeed
from qwenft.errors import QwenftError
from qwenft.lf import render
from tests.helpers.builders import read_calls, write_jsonl, write_model_folder
from tests.helpers.cli import invoke

QWEN3_CONFIG = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}


def rows(thinking: list[bool]) -> list[dict]:
    """One chat row per flag; the answer reasons (<think> block) where the flag is set."""
    out = []
    for i, think in enumerate(thinking):
        answer = f"<think>\nstep {i}\n</think>\n\nanswer {i}" if think else f"answer {i}"
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


@pytest.fixture
def qwen3_model(tmp_path: Path) -> Path:
    return write_model_folder(tmp_path / "Qwen3-0.6B", {**QWEN3_CONFIG, "hidden_size": 64})


# --------------------------------------------------------------------------------------------------
# the choices: one list each, shown in every --help that takes them


@pytest.mark.parametrize(
    ("command", "option", "choices"),
    [
        (["train"], "--method", (AUTO, *Method.values())),
        (["plan"], "--method", (AUTO, *Method.values())),
        (["train"], "--deepspeed", (AUTO, *DeepSpeed.values())),
        (["plan"], "--deepspeed", (AUTO, *DeepSpeed.values())),
        (["train"], "--template", Template.values()),
        (["data", "check"], "--template", Template.values()),
        (["chat"], "--template", Template.values()),
        (["serve"], "--template", Template.values()),
        (["eval"], "--template", Template.values()),
        (["resume"], "--template", Template.values()),
        (["resume"], "--method", Method.values()),
        (["train"], "--thinking", Thinking.values()),
        (["data", "check"], "--thinking", Thinking.values()),
        (["train"], "--overlength", Overlength.values()),
    ],
)
def test_every_help_shows_the_one_list_of_choices(
    command: list[str], option: str, choices: tuple[str, ...]
) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert f"{option} [{'|'.join(choices)}]" in result.output


def test_choices_have_one_home() -> None:
    assert Method.values() == ("lora", "qlora", "full", "freeze")
    assert auto_deepspeed("full") == "z3"
    assert {auto_deepspeed(m) for m in ("lora", "qlora", "freeze")} == {"none"}
    for method in Method.values():  # every method has a recipe that renders
        assert render.load_template(method)["finetuning_type"] in ("lora", "full", "freeze")
    with pytest.raises(QwenftError, match="unknown --method 'dpo'") as info:
        Method.parse("dpo", "--method", auto=True)
    assert info.value.hint == "choose one of auto, lora, qlora, full, freeze"


# --------------------------------------------------------------------------------------------------
# bug: plan accepted --method freeze, train refused it


def test_freeze_is_planned_and_trained(
    fake_cli: Path,
    no_token_stats: None,
    tmp_path: Path,
    chat_file: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    plan = invoke("plan", "-m", "qwen2-7b-instruct", "--method", "freeze", "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["method"] == "freeze"
    model = write_model_folder(tmp_path / "Qwen2-0.5B-Instruct")
    train = invoke("train", "-m", model, "--data", chat_file, "--method", "freeze", "-o", "r")
    assert train.exit_code == 0, train.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert cfg["finetuning_type"] == "freeze" and cfg["freeze_trainable_layers"] == 2
    assert "deepspeed" not in cfg  # auto: no DeepSpeed for freeze, as plan says


# --------------------------------------------------------------------------------------------------
# bug: "auto DeepSpeed = ZeRO-3 for full" was written three times; the plan input two ways


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze"])
def test_plan_and_train_take_the_same_deepspeed_and_plan_input(
    fake_cli: Path, tmp_path: Path, chat_file: Path, method: str
) -> None:
    plan = invoke("plan", "-m", "qwen2-0.5b-instruct", "--method", method, "--json")
    assert plan.exit_code == 0, plan.output
    shown = json.loads(plan.output)
    run = settings.resolve(settings.RunRequest(model="qwen2-0.5b-instruct", method=method))
    inp = run.plan_input()
    assert shown["deepspeed"] == run.deepspeed == auto_deepspeed(method)
    # plan shows the batch size and cutoff train renders from the same recipe
    assert (shown["batch_size"], shown["cutoff_len"]) == (inp.batch_size, inp.cutoff_len)
    model = write_model_folder(tmp_path / "Qwen2-0.5B-Instruct")
    train = invoke("train", "-m", model, "--data", chat_file, "--method", method, "--dry-run")
    assert train.exit_code == 0, train.output
    cfg = yaml.safe_load(train.output.split("# --- train.yaml ---")[1].split("# ---")[0])
    assert cfg["per_device_train_batch_size"] == inp.batch_size
    assert cfg["cutoff_len"] == inp.cutoff_len
    assert ("deepspeed" in cfg) == (run.deepspeed != "none")


def test_config_and_set_reach_the_memory_plan(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("cutoff_len: 4096\nlora_rank: 8\n")
    run = settings.resolve(
        settings.RunRequest(
            model="qwen2-7b-instruct",
            config_file=extra,
            set_items=["per_device_train_batch_size=2"],
        )
    )
    inp = run.plan_input()
    assert (inp.cutoff_len, inp.lora_rank, inp.batch_size) == (4096, 8, 2)


# --------------------------------------------------------------------------------------------------
# one rule for train, data check and eval (qwenft.data.reasoning.thinking_plan): a mix of
# reasoning and plain samples trains both modes (thinking on), as Qwen3's own template renders them


@pytest.mark.parametrize(
    ("flags", "thinking", "expected"),
    [
        ([True, True], "auto", True),
        ([False, False], "auto", False),
        ([True, False], "auto", True),
        ([True, False], "on", True),
        ([True, False], "off", False),
    ],
)
def test_one_thinking_rule(
    tmp_path: Path, qwen3_model: Path, flags: list[bool], thinking: str, expected: object
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows(flags))
    model = settings.model_for(str(qwen3_model), None)
    assert settings.thinking_choice(thinking, model, data) is expected
    # a template without a thinking switch ignores the data
    assert (
        settings.thinking_choice(thinking, settings.model_for(str(qwen3_model), "qwen"), data)
        is None
    )


def test_mixed_thinking_data_trains_both_modes_in_train_and_data_check_alike(
    fake_cli: Path, tmp_path: Path, qwen3_model: Path
) -> None:
    data = write_jsonl(tmp_path / "mixed.jsonl", rows([True, False]))
    train = invoke("train", "-m", qwen3_model, "--data", data, "--dry-run")
    assert train.exit_code == 0, train.output
    assert "enable_thinking: true" in train.output.split("# --- train.yaml ---")[1]
    check = invoke("data", "check", data)
    assert check.exit_code == 0, check.output
    assert "1 of 2 samples reason" in check.output and "enable_thinking: true" in check.output


def test_think_blocks_for_a_template_without_thinking_are_reported_by_train(
    fake_cli: Path, tmp_path: Path
) -> None:
    """Qwen2.5's template has no thinking mode: train says the blocks become plain answer text."""
    model = write_model_folder(tmp_path / "Qwen2.5-0.5B-Instruct")
    data = write_jsonl(tmp_path / "think.jsonl", rows([True, False]))
    result = invoke("train", "-m", model, "--data", data, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning: 1 sample (first at line 1) carries <think> reasoning" in result.stderr
    assert "trained as plain answer text" in result.stderr


# --------------------------------------------------------------------------------------------------
# bug: data check measured against cutoff 2048, train cut at 1024


def test_data_check_and_eval_default_to_trains_cutoff() -> None:
    assert settings.default_cutoff_len() == render.load_template("lora")["cutoff_len"]
    for method in Method.values():
        run = settings.resolve(settings.RunRequest(model="qwen2-0.5b-instruct", method=method))
        assert run.cutoff_len == settings.default_cutoff_len()


def test_data_check_measures_against_trains_cutoff(
    fake_cli: Path, tiny_home: Path, chat_file: Path
) -> None:
    checked = invoke("data", "check", chat_file, "--model", "tiny-qwen2", "--json")
    assert checked.exit_code == 0, checked.output
    stats = json.loads(checked.output[checked.output.index("{") :])["tokens"]
    dry = invoke("train", "-m", "tiny-qwen2", "--data", chat_file, "--dry-run")
    assert dry.exit_code == 0, dry.output
    cfg = yaml.safe_load(dry.output.split("# --- train.yaml ---")[1].split("# ---")[0])
    assert stats["cutoff_len"] == cfg["cutoff_len"] == 1024
    assert stats["template"] == cfg["template"]


def test_eval_follows_the_same_thinking_rule(
    fake_cli: Path, no_token_stats: None, tmp_path: Path, qwen3_model: Path
) -> None:
    from qwenft.evaluate import plan_eval

    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows([True, False]))
    assert plan_eval(str(qwen3_model), mixed).enable_thinking is True  # both modes, as train
    assert plan_eval(str(qwen3_model), mixed, thinking="off").enable_thinking is False
    reasoning = write_jsonl(tmp_path / "think.jsonl", rows([True, True]))
    assert plan_eval(str(qwen3_model), reasoning).enable_thinking is True
    # a run keeps the mode it was trained with
    plain = write_jsonl(tmp_path / "plain.jsonl", rows([False, False]))
    trained = invoke("train", "-m", qwen3_model, "--data", plain, "-o", "run")
    assert trained.exit_code == 0, trained.output
    (Path("run") / "adapter_config.json").write_text("{}")
    assert plan_eval("run", reasoning).enable_thinking is False
    wrong = invoke("eval", "run", "--data", reasoning, "--thinking", "on")
    assert wrong.exit_code == 2 and "trained with thinking off" in wrong.output
    assert plan_eval("run", reasoning, thinking="on", force=True).enable_thinking is True


# --------------------------------------------------------------------------------------------------
# bug: --max-steps 0 was dropped in rendering (a whole epoch trained); the knob -> LLaMA-Factory
# key map lived only in the CLI, so messages could not name the option


def test_every_train_knob_has_its_option_in_the_one_map(
    monkeypatch: pytest.MonkeyPatch, chat_file: Path
) -> None:
    import qwenft.train

    seen: list = []

    def capture(req, gpus_seen=None):  # noqa: ANN001, ANN202
        seen.append(req)
        raise QwenftError("stop here")

    monkeypatch.setattr(qwenft.train, "plan_train", capture)
    invoke("train", "-m", "qwen2-7b-instruct", "--data", chat_file)
    (req,) = seen
    help_text = invoke("train", "--help").output
    for key in req.knobs:
        assert key in settings.KEY_OPTIONS, key
        assert settings.KEY_OPTIONS[key] in help_text, key


@pytest.mark.parametrize(
    "request_",
    [
        settings.RunRequest(model="qwen2-7b-instruct", knobs={"max_steps": 0}),
        settings.RunRequest(model="qwen2-7b-instruct", set_items=["max_steps=-1"]),
    ],
)
def test_max_steps_below_one_is_refused_not_dropped(request_: settings.RunRequest) -> None:
    with pytest.raises(QwenftError, match="--max-steps must be a positive whole number"):
        settings.resolve(request_)


# --------------------------------------------------------------------------------------------------
# training stages (issue 12)


@pytest.mark.parametrize("stage", ["sft", "pt", "dpo", "orpo", "simpo", "kto"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full", "freeze"])
def test_recipe_is_the_method_with_the_stage_over_it(method: str, stage: str) -> None:
    got = settings.recipe(method, stage)
    over = render.load_template(f"stages/{stage}")
    assert {k: got[k] for k in over} == over
    assert got["finetuning_type"] == render.load_template(method)["finetuning_type"]
    run = settings.resolve(
        settings.RunRequest(model="qwen2-7b-instruct", method=method, stage=stage)
    )
    assert run.stage == stage and run.values["stage"] == over["stage"]
    assert run.data_kind == {"sft": "sft", "pt": "pt", "kto": "kto"}.get(stage, "preference")
    assert run.packed == (stage == "pt")


def test_stage_knobs_are_checked_where_every_knob_is() -> None:
    def resolve(stage: str, method: str = "lora", **knobs: object) -> settings.RunSettings:
        run = settings.resolve(
            settings.RunRequest(model="qwen2-7b-instruct", method=method, stage=stage, knobs=knobs)
        )
        settings.check_applies(run)
        return run

    run = resolve("dpo", pref_beta=0.5, pref_loss="ipo", pref_ftx=0.0)
    assert (run.values["pref_beta"], run.values["pref_loss"]) == (0.5, "ipo")
    assert resolve("kto", pref_ftx=1.0).values["pref_ftx"] == 1.0
    assert (
        resolve("sft", "freeze", freeze_trainable_layers=-2).values["freeze_trainable_layers"] == -2
    )
    assert not resolve("pt", packing=False).packed
    for stage, method, knobs, message in [
        ("dpo", "lora", {"pref_beta": -1}, "--beta must be positive"),
        ("dpo", "lora", {"pref_ftx": -0.5}, "--sft-weight must be 0 or more"),
        ("sft", "freeze", {"freeze_trainable_layers": 0}, "--trainable-layers must be"),
        ("sft", "freeze", {"freeze_trainable_layers": -29}, "has 28 decoder layers"),
        ("dpo", "lora", {"pref_loss": "simpo"}, "not one of the DPO losses"),
        ("simpo", "lora", {"pref_loss": "sigmoid"}, "--stage simpo sets pref_loss"),
        ("pt", "lora", {"pref_beta": 0.1}, "does nothing for --stage pt"),
        ("orpo", "full", {"lora_rank": 8}, "does nothing for --method full"),
        ("rm", "lora", {"pref_beta": 0.1}, "does nothing for --stage rm"),
        ("rm", "lora", {"load_best_model_at_end": True}, "RM and PPO stages do not support"),
    ]:
        with pytest.raises(QwenftError, match=message):
            resolve(stage, method, **knobs)
    with pytest.raises(QwenftError, match="unknown --stage 'ppx'"):
        resolve("ppx")
    with pytest.raises(QwenftError, match="--stage ppo is not supported: .*trl <= 0.9.6"):
        resolve("ppo")
    assert resolve("sft", load_best_model_at_end=True).values["load_best_model_at_end"] is True
    # messages name the qwenft option
    for key, option in (
        ("pref_beta", "--beta"),
        ("pref_loss", "--pref-loss"),
        ("pref_ftx", "--sft-weight"),
        ("freeze_trainable_layers", "--trainable-layers"),
    ):
        assert settings.KEY_OPTIONS[key] == option


def test_from_run_refusals(tmp_path: Path) -> None:
    with pytest.raises(QwenftError, match="run folder not found"):
        settings.from_run(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(QwenftError, match="not a qwenft run folder"):
        settings.from_run(tmp_path / "plain")
