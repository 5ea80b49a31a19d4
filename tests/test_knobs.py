"""The knob table (qwenft.knobs) and the stage and method tables (qwenft.choices), issue 21: one
declaration per fact, and every command's options, checks, messages and train.yaml sections come
from it. Fast tier: no model, no LLaMA-Factory launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from qwenft import knobs, settings
from qwenft.choices import METHOD_FACTS, STAGE_FACTS, Method, Stage
from qwenft.cli.common import knob_options
from qwenft.errors import QwenftError
from qwenft.lf import args_snapshot, render
from tests.helpers.cli import invoke

COMMAND_HELP = {
    knobs.TRAIN: ("train",),
    knobs.PLAN: ("plan",),
    knobs.EVAL: ("eval",),
    knobs.DATA_CHECK: ("data", "check"),
}


@pytest.mark.parametrize("command", list(COMMAND_HELP))
def test_every_command_offers_exactly_its_knobs(command: str) -> None:
    """Each command's --help shows the option of every knob the table gives it, with its help."""
    out = invoke(*COMMAND_HELP[command], "--help").output
    offered = knobs.offered(command)
    assert offered
    for knob in offered:
        assert knob.flag in out, knob
        assert knob.help.split()[0] in out, knob
    for knob in knobs.KNOBS:
        if knob.option and knob not in offered and knob.flag not in {k.flag for k in offered}:
            assert f"{knob.flag} " not in out, (command, knob.flag)


def test_table_rows_are_sound() -> None:
    options: dict[tuple[str, str], str] = {}
    for knob in knobs.KNOBS:
        # a real LLaMA-Factory training argument (the snapshot of its dataclasses); eval's
        # generation length is one of its generating arguments, which the snapshot leaves out
        fields = args_snapshot.TABLE["fields"]
        assert knob.key in fields or knob.key == "max_new_tokens" or knob.own, knob.key
        # written in a section of train.yaml, not under "other" (qwenft's own: never written, or
        # in the section its row names)
        placed = {k for keys in render.SECTIONS.values() for k in keys}
        assert knob.key in placed or knob.section in render.SECTIONS or knob.own, knob.key
        assert knob.type in (int, float, str, bool, list)
        for command in knob.commands if knob.option else ():
            # one option name means one knob on each command
            assert options.setdefault((command, knob.flag), knob.key) == knob.key
    assert len(knobs.BY_KEY) == len(knobs.KNOBS)  # one row per key


def test_the_old_views_are_derived() -> None:
    assert settings.KEY_OPTIONS["freeze_trainable_layers"] == "--trainable-layers"
    assert settings.RANGES["cutoff_len"][1] == knobs.WHOLE
    assert all(k in knobs.BY_KEY for k in [*settings.KEY_OPTIONS, *settings.RANGES])


def test_a_new_knob_is_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a knob is one Knob(...) row: the option, its parsing, the range check and the
    applicability check all follow (here for a made-up command, so nothing else moves)."""
    row = knobs.Knob(
        "lora_dropout",
        "--lora-dropout",
        float,
        "Dropout of the LoRA layers.",
        knobs.FRACTION("e.g. 0.05"),
        methods=(Method.LORA, Method.QLORA),
        commands=("demo",),
    )
    monkeypatch.setattr(knobs, "KNOBS", (*knobs.KNOBS, row))
    monkeypatch.setattr(knobs, "BY_KEY", {**knobs.BY_KEY, row.key: row})
    seen: list[Any] = []
    app = typer.Typer()

    @app.command()
    @knob_options("demo")
    def demo(knobs: knobs.KnobValues = knobs.NO_KNOBS) -> None:  # noqa: F811 - the parameter
        seen.append(dict(knobs))

    @app.command()
    def other() -> None:
        pass

    assert "--lora-dropout" in invoke("demo", "--help", app=app).output
    assert invoke("demo", "--lora-dropout", "0.1", app=app).exit_code == 0
    assert seen == [{"lora_dropout": 0.1}]
    assert knobs.out_of_range({"lora_dropout": 1.5}, command="demo")[0].message.startswith(
        "--lora-dropout must be in [0, 1), got 1.5"
    )
    (problem,) = knobs.inapplicable({"lora_dropout": 0.1}, "sft", "full")
    assert "does nothing for --method full" in problem.message


def test_knob_values_are_typed_rows() -> None:
    assert dict(knobs.KnobValues({"cutoff_len": 64, "learning_rate": None})) == {"cutoff_len": 64}
    with pytest.raises(KeyError, match="not in the knob table"):
        knobs.KnobValues({"cutof_len": 64})
    # a switch that says the opposite of its key
    values = knobs.KnobValues.from_options(
        knobs.PLAN, {"gradient_checkpointing": False, "liger": None}
    )
    assert dict(values) == {"disable_gradient_checkpointing": True}


def test_every_problem_of_a_command_line_is_reported_at_once(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "--lr",
        "0",
        "--batch-size",
        "0",
        "--beta",
        "0.5",
        "--trainable-layers",
        "2",
        "--set",
        "lora_rnak=8",
        "-o",
        "r",
    )
    assert result.exit_code == 2, result.output
    for part in (
        "5 problems",
        "no training argument 'lora_rnak'",
        "--lr must be positive",
        "--batch-size must be a positive whole number",
        "--beta (pref_beta) does nothing for --stage sft",
        "--trainable-layers (freeze_trainable_layers) does nothing for --method lora",
    ):
        assert part in result.output, (part, result.output)
    assert not Path("r").exists()
    with pytest.raises(QwenftError) as info:
        settings.resolve(
            settings.RunRequest(model="qwen2-7b-instruct", knobs={"max_steps": 0, "val_size": 2})
        )
    assert "2 problems" in info.value.message
    assert "--max-steps" in info.value.message and "--val-size" in info.value.message


def test_cutoff_len_has_one_range_on_every_command(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    """The same rule for train, plan, data check and eval (eval had its own bound of 16)."""
    message = "--cutoff-len must be a positive whole number, got 0"
    for argv in (
        ("train", "--model", local_model, "--data", chat_file, "--cutoff-len", "0"),
        ("plan", "--model", "qwen2-7b-instruct", "--cutoff-len", "0"),
        ("data", "check", chat_file, "--cutoff-len", "0"),
        ("eval", local_model, "--data", chat_file, "--cutoff-len", "0"),
    ):
        result = invoke(*argv)
        assert result.exit_code == 2, (argv, result.output)
        assert message in result.output, (argv, result.output)
    # what eval refused before (8 < 16) is now checked as train checks it: not a range problem
    assert not knobs.out_of_range({"cutoff_len": 8}, command=knobs.EVAL)


def test_plan_takes_trainable_layers_and_estimates_with_them() -> None:
    """`plan --trainable-layers` (it had none, and freeze always meant 2 layers)."""

    def plan(*extra: str) -> dict:
        result = invoke("plan", "--model", "qwen2-7b-instruct", "--method", "freeze", *extra)
        assert result.exit_code == 0, result.output
        return result.output

    assert "freeze (last 2 layers)" in plan()
    assert "freeze (last 8 layers)" in plan("--trainable-layers", "8")
    assert "freeze (first 1 layer)" in plan("--trainable-layers", "-1")

    def trainable(n: int) -> int:
        out = invoke(
            "plan",
            "-m",
            "qwen2-7b-instruct",
            "--method",
            "freeze",
            "--trainable-layers",
            str(n),
            "--json",
        ).output
        return json.loads(out)["trainable_params"]

    assert trainable(8) == 4 * trainable(2)
    # and train's memory estimate reads the same knob
    run = settings.resolve(
        settings.RunRequest(
            model="qwen2-7b-instruct", method="freeze", knobs={"freeze_trainable_layers": 6}
        )
    )
    assert run.plan_input().trainable_layers == 6
    result = invoke("plan", "-m", "qwen2-7b-instruct", "--trainable-layers", "4")
    assert result.exit_code == 2 and "does nothing for --method lora" in result.output


def test_stage_table_matches_the_recipes() -> None:
    """The stage LLaMA-Factory runs is the one configs/stages/<stage>.yaml writes, and each stage's
    data kind is the one train refuses other data for."""
    for stage, facts in STAGE_FACTS.items():
        assert render.load_template(f"stages/{stage}")["stage"] == facts.lf_stage
        assert (
            settings.resolve(settings.RunRequest(model="qwen2-7b-instruct", stage=stage)).data_kind
            == facts.data
        )
        assert facts.paired == (facts.data == "preference")
    assert set(STAGE_FACTS) == set(Stage)
    assert set(METHOD_FACTS) == set(Method)
    for method, facts in METHOD_FACTS.items():
        assert render.load_template(method)["finetuning_type"] == facts.finetuning_type
        assert ("quantization_bit" in render.load_template(method)) == facts.quantized


def test_help_imports_no_data_package_and_no_stack() -> None:
    """`qwenft --help` loads the command modules only: the data package, the presets, yaml and
    the training stack load when a command runs (scripts/bench_cli.py measures the time)."""
    code = (
        "import sys, qwenft.cli; "
        "print([m for m in sys.modules if m.startswith(('qwenft.data', 'qwenft.models', "
        "'qwenft.settings', 'yaml', 'torch', 'transformers', 'llamafactory', 'rich'))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out


def test_refusals_read_the_run_they_are_part_of() -> None:
    """A Refusal's other key may be a choice of the run (processes: in all), be refused unless
    it has one of some values (`other_than`), need further keys (`also`); it sees what the knobs
    imply (badam_mode layer beside --badam); a key its switch is missing for does nothing."""
    rule = knobs.Refusal("why", "fix", with_key="processes", with_values=(1,), other_than=True)
    assert not rule.applies(True, {"processes": 1}) and rule.applies(True, {"processes": 2})
    assert not rule.applies(True, {})  # not known (plan before --method auto chooses)
    both = knobs.Refusal(
        "why", "fix", with_key="processes", with_values=(1,), other_than=True,
        also=(("deepspeed", ("none",)),),
    )  # fmt: skip
    assert both.applies(True, {"processes": 2, "deepspeed": "none"})
    assert not both.applies(True, {"processes": 2, "deepspeed": "z3"})
    values = {"use_badam": True, **knobs.implied({"use_badam": True})}
    (problem,) = knobs.refused(values, {"processes": 4, "deepspeed": "none"})
    assert problem.message.startswith("--badam-mode layer with 4 processes and --deepspeed none: ")
    (problem,) = knobs.inapplicable({"galore_rank": 8}, "sft", "full")
    assert problem.message == "--galore-rank (galore_rank) does nothing without --galore"
    assert knobs.inapplicable({"galore_rank": 8, "use_galore": True}, "sft", "full") == []
    # a value a knob implies that the person set otherwise is theirs: a Refusal decides
    assert knobs.implied({"use_galore": True, "optim": "adafactor"}) == {}
    assert knobs.refused({"use_galore": True, "optim": "adafactor"}) == []
    assert settings.RunRequest(model="m", gpus=2, nnodes=3).processes == 6
