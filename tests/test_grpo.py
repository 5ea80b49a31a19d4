"""GRPO with verifiable rewards (issue 27): `train --stage grpo` on prompt data, run by TRL's
GRPOTrainer in qwenft's GRPO process (qwenft.rl), its rewards (qwenft.rl.rewards), its train.yaml and
refusals; end to end, a policy that learns to say what the reward asks.

The fast tests need no model and no rl extra; the end-to-end ones drive the real TRL (the rl extra
that `make test` installs), LLaMA-Factory (the SFT start and the merges) and transformers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenft.errors import QwenftError
from qwenft.knobs import TRL_READS
from qwenft.rl import engine, rewards
from qwenft.rl.grpo import TrainerLog, grpo_args, prompt_rows
from tests.helpers.builders import chat_rows, write_jsonl, yes_no_rows, yes_prompts
from tests.helpers.cli import dry_run, invoke
from tests.helpers.e2e import manifest, trainer_log

# --------------------------------------------------------------------------------------------------
# the rewards


def test_builtin_rewards_score_what_they_name() -> None:
    assert rewards.match_score("  Yes. ", "yes") == 1.0
    assert rewards.match_score("Yes!", "YES") == 1.0
    assert rewards.match_score("yes, maybe", "yes") == 0.0
    assert rewards.match_score("anything", None) == 0.0
    # a reasoning model's thoughts are not its answer
    assert rewards.match_score("<think>maybe no</think>\n\nYes.", "yes") == 1.0
    assert rewards.number_score("<think>3 or 4?</think> It is 4", 4) == 1.0
    assert rewards.number_score("<think>4</think> I cannot say", 4) == 0.0
    assert rewards.number_score("so the total is 1,234.", "1234") == 1.0
    assert rewards.number_score("3 apples, then 5", 5) == 1.0  # the last number counts
    assert rewards.number_score("about -3.5 degrees", "-3.5") == 1.0
    assert rewards.number_score("no number here", "4") == 0.0
    fmt = re.compile(r"<think>.*</think>.+", re.S)
    assert rewards.regex_score("<think>a\nb</think>answer\n", fmt) == 1.0
    assert rewards.regex_score("answer <think>a</think>", fmt) == 0.0
    assert rewards.length_score(10, 10) == 1.0
    assert rewards.length_score(15, 10) == 0.5 and rewards.length_score(25, 10) == 0.0


def test_tool_call_reward_checks_calls_against_the_rows_tools() -> None:
    tools = json.dumps(
        [
            {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            }
        ]
    )
    call = '<tool_call>\n{"name": "get_weather", "arguments": {CALL}}\n</tool_call>'
    assert (
        rewards.tool_call_score(call.replace("{CALL}", '{"city": "Oslo", "days": 2}'), tools) == 1
    )
    openai_shape = [{"type": "function", "function": json.loads(tools)[0]}]
    assert rewards.tool_call_score(call.replace("{CALL}", '{"city": "Oslo"}'), openai_shape) == 1
    for bad in ('{"days": 2}', '{"city": 3}', '{"city": "Oslo", "days": true}'):
        assert rewards.tool_call_score(call.replace("{CALL}", bad), tools) == 0, bad
    assert rewards.tool_call_score(call.replace("get_weather", "get_time"), tools) == 0
    assert rewards.tool_call_score("<tool_call>{not json}</tool_call>", tools) == 0
    assert rewards.tool_call_score("It is sunny in Oslo.", tools) == 0  # no call at all
    assert rewards.tool_call_score(call.replace("{CALL}", '{"city": "Oslo"}'), None) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("exact:answer", "unknown reward"),
        ("match", "match needs an argument"),
        ("regex:(unclosed", "not a regular expression"),
        ("length:ten", "positive whole number"),
        ("tool_call:x", "takes no argument"),
        ("missing.py:fn", "is not a file"),
        ("REWARDS:nope", "defines no 'nope'"),
        ("REWARDS:", "name the function"),
    ],
)
def test_a_bad_reward_spec_is_refused_naming_it(spec: str, message: str, tmp_path: Path) -> None:
    user = tmp_path / "my_rewards.py"
    user.write_text("def short(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(QwenftError, match=re.escape(message)):
        rewards.parse_spec(spec.replace("REWARDS", str(user)), tmp_path)


def test_specs_resolve_user_files_against_the_working_folder(tmp_path: Path) -> None:
    (tmp_path / "r.py").write_text(
        "def fn(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    spec = rewards.parse_spec("r.py:fn", tmp_path)
    assert spec.kind == "file" and spec.path == str(tmp_path / "r.py") and spec.name == "fn"
    with pytest.raises(QwenftError, match="needs at least one --reward"):
        rewards.parse_specs([])
    with pytest.raises(QwenftError, match="given twice"):
        rewards.parse_specs(["match:answer", "match:answer"])
    assert rewards.parse_weights("1, 0.5", 2) == [1.0, 0.5]
    assert rewards.parse_weights(None, 2) is None
    for bad in ("1", "1,x", "1,nan"):
        with pytest.raises(QwenftError, match="reward-weights"):
            rewards.parse_weights(bad, 2)


def test_checked_rewards_name_the_reward_and_the_data_line() -> None:
    convs = json.dumps([{"role": "user", "content": "q"}])
    lines = {rewards.LINE: [7, 7, 9, 9], rewards.MESSAGES: [convs] * 4}
    completions = ["a", "b", "c", "d"]

    def seen(prompts: list, completions: list, **kw: object) -> list[float]:
        assert rewards.LINE not in kw and rewards.MESSAGES not in kw  # the data's fields only
        return [1.0, None, 0.5, 2]

    assert rewards.checked(seen, "seen")([""] * 4, completions, **lines, answer=["x"] * 4) == [
        1.0,
        None,
        0.5,
        2.0,
    ]
    cases = [
        (
            lambda **kw: 1 / 0,
            "raised ZeroDivisionError: division by zero (on the batch from data line 7)",
        ),
        (lambda **kw: [1.0], "returned 1 values for 4 completions"),
        (lambda **kw: [1.0, 1.0, math.nan, 1.0], "returned nan for completion 2 (data line 9)"),
        (lambda **kw: [1.0, "1", 1.0, 1.0], "returned '1' for completion 1 (data line 7)"),
        (lambda **kw: 3.0, "returned float for 4 completions"),
    ]

    def conversation(prompts: list, completions: list, messages: list, **kw: object) -> list:
        assert messages == [[{"role": "user", "content": "q"}]] * 4  # a reward model's input
        return [0.0] * 4

    rewards.checked(conversation, "run:rm", messages=True)([""] * 4, completions, **lines)
    for fn, message in cases:
        with pytest.raises(rewards.RewardError, match=re.escape(message)):
            rewards.checked(fn, "mine.py:fn")([""] * 4, completions, **lines)


def test_a_builtin_needs_the_field_it_names() -> None:
    fn = rewards.build(rewards.parse_spec("match:answer"))
    assert fn.__name__ == "match"
    assert fn(["p", "p"], ["Yes.", "no"], answer=["yes", "yes"], **{rewards.LINE: [1, 1]}) == [1, 0]
    with pytest.raises(rewards.RewardError, match="the rows have no field 'answer'"):
        fn(["p"], ["yes"], reference=["yes"], **{rewards.LINE: [3]})


def test_a_reward_run_must_be_a_reward_model_with_its_head(tmp_path: Path) -> None:
    from qwenft.runs.manifest import MANIFEST
    from tests.helpers.builders import run_manifest

    def fake_run(name: str, **changes: object) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / MANIFEST).write_text(run_manifest(status="completed", **changes).to_json())
        (folder / "adapter_config.json").write_text("{}")
        return folder

    sft, rm = fake_run("sft"), fake_run("rm", stage="rm")
    for spec, message in [
        (f"run:{tmp_path / 'nothing'}", "is not a qwenft run folder"),
        (f"run:{sft}", "sft is a sft run, not a reward model"),
        ("run:rm", "has no value head"),
    ]:
        with pytest.raises(QwenftError, match=re.escape(message)):
            rewards.parse_spec(spec, tmp_path)
    (rm / "value_head.safetensors").write_bytes(b"")
    spec = rewards.parse_spec("run:rm", tmp_path)  # relative to the working folder
    assert spec.kind == "run" and spec.path == str(rm) and spec.yaml_text == f"run:{rm}"


# --------------------------------------------------------------------------------------------------
# what the GRPO process reads


class _Template:
    """A stand-in tokenizer: its chat template writes the messages out, and the tools given."""

    def apply_chat_template(self, messages: list, tools: object = None, **kw: object) -> str:
        assert kw["tokenize"] is False and kw["add_generation_prompt"] is True
        return json.dumps([messages, tools, kw.get("enable_thinking")])


def test_prompt_rows_carry_the_fields_and_the_runs_system_prompt(tmp_path: Path) -> None:
    tools = json.dumps([{"name": "f", "parameters": {}}])
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"messages": [{"role": "user", "content": "q1"}], "answer": "1", "tools": tools},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q2"}]},
        ],
    )
    config = {
        "data_file": str(data),
        "default_system": "You are helpful.",
        "enable_thinking": False,
    }
    rows = prompt_rows(config, _Template())
    first, second = (json.loads(r["prompt"]) for r in rows)
    assert (
        first[0][0] == {"role": "system", "content": "You are helpful."}
        and first[1][0]["name"] == "f"
    )
    assert first[2] is False  # the run's thinking mode
    assert second[0][0]["content"] == "own"  # a row's own system prompt stays
    assert rows[0]["answer"] == "1" and rows[0]["tools"] == tools and "messages" not in rows[0]
    assert [r[rewards.LINE] for r in rows] == [1, 2]
    assert json.loads(rows[0][rewards.MESSAGES]) == [{"role": "user", "content": "q1"}]
    assert len(prompt_rows({**config, "max_samples": 1}, _Template())) == 1


def test_grpo_args_map_llamafactory_keys_to_trl() -> None:
    config = {
        "output_dir": "/runs/g",
        "learning_rate": "1e-5",  # YAML 1.1 reads it as text
        "pref_beta": 0.04,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "reward_funcs": ["match:answer", "length:8"],
        "reward_weights": "1,0.25",
        "disable_gradient_checkpointing": True,
        "bf16": True,
    }
    args = grpo_args(config, cuda=False)
    assert args["learning_rate"] == 1e-5 and args["beta"] == 0.04 and "pref_beta" not in args
    assert args["reward_weights"] == [1.0, 0.25] and args["num_generations"] == 4
    assert args["gradient_checkpointing"] is False and args["bf16"] is False and args["use_cpu"]
    assert args["report_to"] == "none"


def test_trainer_log_rows_are_llamafactorys_with_the_reward_figures(tmp_path: Path) -> None:
    log = TrainerLog(tmp_path)
    state = SimpleNamespace(max_steps=10, global_step=4, epoch=0.5)
    log(state, {"loss": 0.01, "learning_rate": 1e-5, "reward": 0.75, "reward_std": 0.4,
                "kl": 0.002, "rewards/match/mean": 0.75, "completions/mean_length": 3.0})  # fmt: skip
    log(state, {"train_runtime": 12.0})  # the end-of-training summary: no row
    (row,) = trainer_log(tmp_path)
    assert row["current_steps"] == 4 and row["total_steps"] == 10 and row["percentage"] == 40.0
    assert row["loss"] == 0.01 and row["lr"] == 1e-5 and row["reward"] == 0.75
    assert row["rewards/match/mean"] == 0.75 and row["completions/mean_length"] == 3.0
    from qwenft.runs.progress import progress_line

    line = progress_line(4, 10, loss=0.01, figures=row)
    assert "reward 0.750 ± 0.40 | kl 0.0020 | completion 3.0 tokens" in line


# --------------------------------------------------------------------------------------------------
# train --stage grpo: what it renders and what it refuses


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", yes_prompts(1, 8))


def test_dry_run_renders_what_the_grpo_process_reads(local_model: Path, prompts: Path) -> None:
    cfg, env, result = dry_run(
        "--model", local_model, "--data", prompts, "--stage", "grpo", "--reward", "match:answer",
        "--reward", "length:8", "--reward-weights", "1,0.5", "--generations", "4",
        "--completion-len", "16", "--beta", "0.04", "--temperature", "0.9",
    )  # fmt: skip
    assert set(cfg) <= TRL_READS  # nothing TRL would not see
    assert cfg["stage"] == "grpo" and cfg["data_file"] == str(prompts.resolve())
    assert cfg["reward_funcs"] == ["match:answer", "length:8"] and cfg["reward_weights"] == "1,0.5"
    assert (cfg["num_generations"], cfg["max_completion_length"]) == (4, 16)
    assert (cfg["pref_beta"], cfg["temperature"], cfg["loss_type"]) == (0.04, 0.9, "dapo")
    assert "dataset" not in cfg and "cutoff_len" not in cfg and "tokenized_path" not in cfg
    assert env["PYTHONPATH"].split(":")[0] == str(engine.rl_path())
    assert "-m qwenft.rl.grpo" in result.output
    assert "read by the GRPO process" in result.output


def test_a_user_reward_file_is_found_before_launch(
    local_model: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine.py").write_text(
        "def yes(completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg, _, _ = dry_run(
        "--model", local_model, "--data", prompts, "--stage", "grpo", "--reward", "mine.py:yes"
    )  # fmt: skip
    assert cfg["reward_funcs"] == [f"{tmp_path / 'mine.py'}:yes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--stage grpo needs at least one --reward"),
        (("--reward", "exact:answer"), "unknown reward"),
        (("--reward", "match:answer", "--generations", "1"), "--generations must be 2 or more"),
        (("--reward", "match:answer", "--generations", "3"), "not whole groups of --generations 3"),
        (("--reward", "match:answer", "--cutoff-len", "512"), "does nothing for --stage grpo"),
        (
            ("--reward", "match:answer", "--set", "neftune_noise_alpha=5"),
            "does nothing for --stage grpo",
        ),
        (("--reward", "match:answer", "--method", "freeze"), "--method lora (or full)"),
        (("--reward", "match:answer", "--deepspeed", "z2"), "--deepspeed none"),
        (("--reward", "match:answer", "--overlength", "drop"), "prompts are never cut"),
        (("--reward", "match:answer", "--gpus", "2"), "runs on one device"),
        (("--reward", "match:answer", "--pref-loss", "hinge"), "does nothing for --stage grpo"),
        (("--generations", "4"), "needs at least one --reward"),
        (("--reward", "number:total"), "reads the field 'total', and prompts.jsonl:1 has none"),
        (("--reward", "match:answer", "--vllm"), "--vllm needs"),  # a CUDA GPU, the vllm package
    ],
)
def test_grpo_refuses_what_it_cannot_do_and_writes_nothing(
    args: tuple, message: str, local_model: Path, prompts: Path, tmp_path: Path
) -> None:
    run = tmp_path / "runs" / "g"
    result = invoke(
        "train", "--model", local_model, "--data", prompts, "--stage", "grpo", "-o", run, *args,
        "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output
    assert not run.exists()


def test_grpo_takes_prompts_not_conversations(local_model: Path, tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    result = invoke(
        "train", "--model", local_model, "--data", chat, "--stage", "grpo",
        "--reward", "match:answer", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "a prompt's messages end with the user turn" in result.output


def test_train_without_the_rl_extra_says_how_to_add_it(
    local_model: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "rl_path", lambda: tmp_path / "no-rl")
    run = tmp_path / "runs" / "g"
    result = invoke(
        "train", "--model", local_model, "--data", prompts, "--stage", "grpo",
        "--reward", "match:answer", "-o", run,
    )  # fmt: skip
    assert result.exit_code == 2 and "needs the rl extra" in result.output, result.output
    assert "make setup-extras" in result.output and not run.exists()


def test_plan_says_what_a_grpo_step_holds() -> None:
    result = invoke("plan", "--model", "qwen2.5-7b-instruct", "--stage", "grpo")
    assert result.exit_code == 0, result.output
    assert "grpo: planned as its training pass, 4 completions" in result.output
    assert "a shorter --completion-len shrinks them" in result.output


def test_data_check_reads_prompt_files_as_prompts(data_app: object, prompts: Path) -> None:
    from tests.helpers.cli import invoke_data

    ok = invoke_data(data_app, "check", prompts, "--kind", "prompt")
    assert ok.exit_code == 0 and "prompt data, 8 samples, 8 valid" in ok.output, ok.output
    assert "unknown key" not in ok.output  # "answer" is a field the rewards read
    as_chat = invoke_data(data_app, "check", prompts)
    assert as_chat.exit_code == 2 and "--kind prompt" in as_chat.output


# --------------------------------------------------------------------------------------------------
# end to end: a policy learns what the reward asks

GRPO_STEPS = 16
# the grpo run: one prompt a step (batch 8 = one group of 8 completions), a constant lr high enough
# for the tiny model to move in a few steps, a completion of at most 8 tokens
GRPO = (
    f"--max-steps {GRPO_STEPS} --lr 5e-3 --batch-size 8 --grad-accum 1 --generations 8 "
    "--completion-len 8 --set logging_steps=1 --set save_steps=8 --set lr_scheduler_type=constant "
    "--set warmup_ratio=0"
).split()


@pytest.fixture(scope="module")
def grpo_runs(e2e_home):  # noqa: ANN001, ANN201 - tests.helpers.cli.Qwenft -> dict[str, Path]
    """An SFT run that answers "no." to three in four yes/no questions (so it says no, and samples
    yes now and then), merged; a GRPO run from it rewarded for "yes" (match:answer), merged."""
    from tests.conftest import made_once

    root = e2e_home.cwd.parent
    runs = {
        "sft": e2e_home.cwd / "runs" / "yes-no-sft",
        "grpo": e2e_home.cwd / "runs" / "yes-grpo",
    }

    def make() -> None:
        sft_data = write_jsonl(root / "yes-no.jsonl", yes_no_rows(1, 40))
        prompts = write_jsonl(root / "yes-prompts.jsonl", yes_prompts(2, 32))
        e2e_home(
            "train", "--model", "tiny-qwen2", "--data", sft_data, "-o", runs["sft"],
            "--max-steps", "30", "--lr", "5e-3", "--batch-size", "4", "--grad-accum", "1",
            "--lora-rank", "32", "--cutoff-len", "128", "--val-size", "0",
            "--set", "lora_alpha=64", "--set", "lr_scheduler_type=constant",
            "--set", "warmup_ratio=0", "--set", "save_steps=1000",
        )  # fmt: skip
        e2e_home("merge", runs["sft"])
        out = e2e_home(
            "train", "--stage", "grpo", "--from", runs["sft"], "--data", prompts,
            "--reward", "match:answer", "-o", runs["grpo"], *GRPO,
        )  # fmt: skip
        (root / "grpo.stderr").write_text(out.stderr, encoding="utf-8")
        e2e_home("merge", runs["grpo"])

    made_once(root, "grpo_runs", make)
    return runs


def _answers(model_dir: Path, questions: list[str]) -> tuple[list[str], list[float]]:
    """The model's greedy answer to each question (its chat template and system prompt, as `qwenft
    chat` prompts it), and log p("yes.") - log p("no.") of the whole answer, teacher-forced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    greedy, margins = [], []
    for q in questions:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": q},
        ]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        prompt = list(ids["input_ids"])
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=stop
            )
            greedy.append(tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip())
            logp = {}
            for answer in ("yes.", "no."):
                target = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
                logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
                logp[answer] = float(
                    torch.log_softmax(logits, -1)[range(len(target)), target].sum()
                )
            margins.append(logp["yes."] - logp["no."])
    return greedy, margins


@pytest.mark.e2e
def test_grpo_raises_the_reward_and_the_merged_model_answers_as_rewarded(grpo_runs) -> None:  # noqa: ANN001
    import random

    from tests.helpers.builders import yes_no_question

    run = grpo_runs["grpo"]
    m = manifest(run)
    assert m["status"] == "completed" and m["stage"] == "grpo", m.get("reason")
    assert m["command"][1:3] == ["-m", "qwenft.rl.grpo"]
    rows = [r for r in trainer_log(run) if "reward" in r]
    assert len(rows) == GRPO_STEPS and rows[-1]["current_steps"] == GRPO_STEPS
    curve = [r["reward"] for r in rows]
    first, last = sum(curve[:4]) / 4, sum(curve[-4:]) / 4
    # the SFT start samples "yes." about one time in four; GRPO makes it the answer
    assert last >= first + 0.3 and last >= 0.8, curve
    assert m["summary"]["stage_figures"]["reward"][1] == curve[-1]
    assert (run / "checkpoint-8").is_dir() and (run / "adapter_model.safetensors").is_file()
    stderr = (run.parent.parent.parent / "grpo.stderr").read_text()
    assert "on yes-prompts.jsonl: 32 prompts" in stderr and "8 completions of each prompt" in stderr
    assert "reward " in stderr and "grpo: reward" in stderr  # the progress line, the summary

    rng = random.Random(3)  # held-out questions: neither run saw them
    questions = [yes_no_question(rng) for _ in range(8)]
    base_greedy, base_margins = _answers(grpo_runs["sft"] / "merged", questions)
    tuned_greedy, tuned_margins = _answers(run / "merged", questions)
    base_yes = sum(rewards.match_score(a, "yes") for a in base_greedy)
    tuned_yes = sum(rewards.match_score(a, "yes") for a in tuned_greedy)
    assert tuned_yes > base_yes and tuned_yes >= 7, (base_greedy, tuned_greedy)
    gain = sum(tuned_margins) / 8 - sum(base_margins) / 8
    assert gain > 2.0, (base_margins, tuned_margins)  # nats of log p(yes) over log p(no)


@pytest.mark.e2e
def test_full_grpo_with_a_kl_term_writes_its_own_weights(e2e_home, tmp_path: Path) -> None:  # noqa: ANN001
    """--method full with --beta > 0: TRL keeps a reference model and logs the KL; the run folder
    holds the whole model (no adapter), moved from the base, and chat loads it as it is. From the
    base, whose completions of a prompt are all alike: a user reward that scores every other one
    1 gives the group something to compare. Nothing is asked of its learning, so it does not wait
    for the learning test's SFT start."""
    from safetensors.numpy import load_file

    prompts = write_jsonl(tmp_path / "prompts.jsonl", yes_prompts(7, 8))
    (tmp_path / "alternate.py").write_text(
        "def every_other(completions, **kw):\n"
        "    return [float(i % 2) for i in range(len(completions))]\n"
    )
    run = tmp_path / "runs" / "full"
    e2e_home(
        "train", "--stage", "grpo", "--method", "full", "--model", "tiny-qwen2", "--data",
        prompts, "--reward", f"{tmp_path / 'alternate.py'}:every_other", "--beta", "0.1", "-o", run,
        "--max-steps", "3", "--lr", "1e-3", "--batch-size", "8", "--grad-accum", "1",
        "--generations", "8", "--completion-len", "6", "--set", "logging_steps=1",
        "--set", "save_steps=3", "--set", "warmup_ratio=0",
    )  # fmt: skip
    m = manifest(run)
    assert m["status"] == "completed" and m["method"] == "full" and m["deepspeed"] == "none"
    rows = trainer_log(run)
    assert len(rows) == 3 and all(math.isfinite(r["kl"]) for r in rows), rows
    assert (run / "model.safetensors").is_file() and not (run / "adapter_config.json").exists()
    tuned = load_file(str(run / "model.safetensors"))
    base = load_file(str(Path(m["model"]["path"]) / "model.safetensors"))
    assert any(
        k in base and tuned[k].shape == base[k].shape and (tuned[k] != base[k]).any() for k in tuned
    )  # trained
    e2e_home("chat", run, "--prompt", "Is lamp like paper? Answer yes or no.")  # loads, answers


@pytest.mark.e2e
def test_a_failing_user_reward_stops_the_run_naming_it_and_the_row(
    qwenft,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", yes_prompts(4, 8))
    (tmp_path / "mine.py").write_text(
        "def flaky(completions, answer, **kw):\n"
        "    return [float('nan')] + [1.0] * (len(completions) - 1)\n"
    )
    run = tmp_path / "runs" / "bad"
    out = qwenft(
        "train", "--stage", "grpo", "--model", "tiny-qwen2", "--data", prompts,
        "--reward", f"{tmp_path / 'mine.py'}:flaky", "-o", run, "--max-steps", "2",
        "--batch-size", "8", "--grad-accum", "1", "--generations", "8", "--completion-len", "4",
        check=False,
    )  # fmt: skip
    assert out.returncode != 0
    message = f"reward '{tmp_path / 'mine.py'}:flaky' returned nan for completion 0 (data line"
    assert f"training stopped: {message}" in out.stderr, out.stderr
    m = manifest(run)
    assert m["status"] == "failed" and message in m["reason"]
    assert (run / "train.yaml").is_file() and (run / "train.log").is_file()  # the folder stays


@pytest.mark.e2e
def test_a_reward_run_scores_completions_as_qwenft_score_does(
    rm_run: Path,
    e2e_home,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """`--reward run:RM`: the session's reward model (conftest.rm_run: sums answered beat dodged)
    scores a prompt's completions as `qwenft score` scores the same conversations; a GRPO run
    with it logs its mean."""
    from tests.helpers.builders import reward_pairs

    held = reward_pairs(5, 4)
    convs = [
        {"messages": [*row["messages"], side]}
        for row in held
        for side in (row["chosen"], row["rejected"])
    ]
    out = e2e_home("score", rm_run, write_jsonl(tmp_path / "convs.jsonl", convs))
    want = [json.loads(line)["score"] for line in out.stdout.splitlines()]
    reward = rewards.build(rewards.parse_spec(f"run:{rm_run}"))
    got = reward(
        [""] * len(convs),
        [c["messages"][-1]["content"] for c in convs],
        **{
            rewards.LINE: list(range(len(convs))),
            rewards.MESSAGES: [json.dumps(c["messages"][:-1]) for c in convs],
        },
    )
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-3, (got, want)
    assert all(c > r for c, r in zip(got[0::2], got[1::2], strict=True))  # answers beat dodges

    prompts = write_jsonl(
        tmp_path / "sums.jsonl", [{"messages": row["messages"]} for row in reward_pairs(6, 8)]
    )
    run = tmp_path / "runs" / "by-rm"
    e2e_home(
        "train", "--stage", "grpo", "--model", "tiny-qwen2", "--data", prompts,
        "--reward", f"run:{rm_run}", "-o", run, "--max-steps", "2", "--batch-size", "4",
        "--grad-accum", "1", "--generations", "4", "--completion-len", "6",
        "--set", "logging_steps=1", "--temperature", "2.0",
    )  # fmt: skip
    rows = trainer_log(run)
    assert len(rows) == 2 and all(math.isfinite(r["rewards/run/mean"]) for r in rows), rows
