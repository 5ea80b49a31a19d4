"""`qwenft train` through typer's CliRunner, with the recording llamafactory-cli standing in for the
real one: command building, run folders, the environment of a launch, refusals, step settings.
The end-to-end tests (test_e2e.py) prove that training works with the real LLaMA-Factory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.builders import read_calls, write_jsonl, written
from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


def test_dry_run_prints_everything_and_writes_nothing(
    fake_cli: Path, local_model: Path, chat_file: Path, isolated: Path
) -> None:
    before = written(Path.cwd(), isolated)
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "--dry-run", "--cpu-procs", "2"
    )
    assert result.exit_code == 0, result.output
    assert "### model" in result.output and f"model_name_or_path: {local_model}" in result.output
    assert "FORCE_TORCHRUN=1" in result.output and "NPROC_PER_NODE=2" in result.output
    assert "llamafactory-cli train" in result.output
    assert "template: qwen\n" in result.output
    assert written(Path.cwd(), isolated) == before
    assert read_calls(fake_cli) == []


def test_train_lora_records_run(
    fake_cli: Path, local_model: Path, chat_file: Path, isolated: Path
) -> None:
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "-o",
        "runs/r1",
        "--max-steps",
        "2",
        "--set",
        "logging_steps=1",
    )
    assert result.exit_code == 0, result.output
    (call,) = read_calls(fake_cli)
    run_dir = Path("runs/r1").absolute()
    assert call["argv"] == ["train", str(run_dir / "train.yaml")]
    assert "FORCE_TORCHRUN" not in call["env"]
    assert call["env"]["HF_HUB_OFFLINE"] == "1"
    cfg = call["yaml"]
    assert cfg["finetuning_type"] == "lora" and cfg["max_steps"] == 2 and cfg["logging_steps"] == 1
    assert cfg["output_dir"] == str(run_dir)
    # the dataset is registered where the YAML says, with the absolute path
    info = json.loads((Path(cfg["dataset_dir"]) / "dataset_info.json").read_text())
    assert info[cfg["dataset"]]["file_name"] == str(chat_file.resolve())
    assert Path(cfg["dataset_dir"]).is_relative_to(isolated)
    manifest = json.loads((run_dir / "qwenft.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["final_loss"] == 2.0 and manifest["tokens_per_second"] == 123.0
    assert manifest["template"] == "qwen" and manifest["method"] == "lora"
    assert manifest["dataset"]["sha256"]
    assert manifest["command"][1:] == ["train", "$RUN/train.yaml"]  # the run folder's: as $RUN
    assert "fake llamafactory-cli train" in (run_dir / "train.log").read_text()
    assert yaml.safe_load((run_dir / "train.yaml").read_text()) == cfg
    # staged with mkdtemp/mkstemp, but ends with the modes a plain mkdir/open would give
    from qwenft.fsutil import umask_mode

    assert run_dir.stat().st_mode & 0o777 == umask_mode(0o777)
    assert (run_dir / "train.yaml").stat().st_mode & 0o777 == umask_mode(0o666)
    info_path = Path(cfg["dataset_dir"]) / "dataset_info.json"
    assert info_path.stat().st_mode & 0o777 == umask_mode(0o666)


def test_gpus_2_uses_torchrun(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "-o", "r", "--cpu-procs", "2"
    )
    assert result.exit_code == 0, result.output
    (call,) = read_calls(fake_cli)
    assert call["env"]["FORCE_TORCHRUN"] == "1" and call["env"]["NPROC_PER_NODE"] == "2"
    assert "deepspeed" not in call["yaml"]


@pytest.mark.parametrize(("flag", "stage"), [([], 3), (["--deepspeed", "z2"], 2)])
def test_full_uses_deepspeed_through_torchrun(
    fake_cli: Path, local_model: Path, chat_file: Path, flag: list[str], stage: int
) -> None:
    result = invoke(
        "train", "--method", "full", "--model", local_model, "--data", chat_file, "-o", "r", *flag
    )
    assert result.exit_code == 0, result.output
    (call,) = read_calls(fake_cli)
    assert call["env"]["FORCE_TORCHRUN"] == "1" and call["env"]["NPROC_PER_NODE"] == "1"
    ds = Path(call["yaml"]["deepspeed"])
    assert ds == Path("r/deepspeed.json").absolute()
    assert json.loads(ds.read_text())["zero_optimization"]["stage"] == stage


def test_qlora_uses_bnb(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert (
        invoke(
            "train", "--method", "qlora", "--model", local_model, "--data", chat_file, "-o", "r"
        ).exit_code
        == 0
    )
    (call,) = read_calls(fake_cli)
    assert call["yaml"]["quantization_bit"] == 4 and call["yaml"]["quantization_method"] == "bnb"


def test_failed_training_exits_1_and_marks_failed(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LF_EXIT", "3")
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r")
    assert result.exit_code == 1
    assert "exited with code 3" in result.output and "train.log" in result.output
    assert json.loads(Path("r/qwenft.json").read_text())["status"] == "failed"


def test_qwen3_template_and_thinking_from_data(
    fake_cli: Path, tmp_path: Path, chat_file: Path
) -> None:
    d = tmp_path / "Qwen3-0.6B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert invoke("train", "--model", d, "--data", chat_file, "-o", "r").exit_code == 0
    (call,) = read_calls(fake_cli)
    assert call["yaml"]["template"] == "qwen3" and call["yaml"]["enable_thinking"] is False
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "<think>x</think>b"},
                ]
            },
            {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        ],
    )
    assert invoke("train", "--model", d, "--data", mixed, "-o", "r2").exit_code == 0
    assert read_calls(fake_cli)[-1]["yaml"]["enable_thinking"] is True  # both modes are trained
    assert (
        invoke("train", "--model", d, "--data", mixed, "-o", "r3", "--thinking", "on").exit_code
        == 0
    )
    assert read_calls(fake_cli)[-1]["yaml"]["enable_thinking"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--model", "no-such-preset"], "unknown model"),
        (["--model", "./not-there"], "model folder not found"),
        (["--model", "{bare}"], "no config.json"),
        (["--method", "dpo"], "unknown --method"),
        (["--set", "oops"], "malformed --set"),
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--deepspeed", "z9"], "unknown --deepspeed"),
        (["--template", "llama3"], "unknown --template"),
        (["--data", "{bad}"], "data error"),
        (["-o", "{occupied}"], "already exists and is not empty"),
        (["--set", "output_dir=/tmp/x"], "may not set output_dir"),
        (["--overlength", "sometimes"], "unknown --overlength"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
    tmp_path: Path,
    isolated: Path,
    args: list[str],
    message: str,
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}]
    )
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    subst = {"{bare}": str(bare), "{bad}": str(bad), "{occupied}": str(occupied)}
    full = {"--model": str(local_model), "--data": str(chat_file), "-o": "runs/x"}
    for i in range(0, len(args), 2):
        full[args[i]] = subst.get(args[i + 1], args[i + 1])
    before = written(Path.cwd(), isolated)
    result = invoke("train", *[x for kv in full.items() for x in kv])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ")
    assert written(Path.cwd(), isolated) == before
    assert (occupied / "keep.txt").read_text() == "mine"
    assert read_calls(fake_cli) == []


def test_missing_llamafactory_cli_names_setup(
    local_model: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
    result = invoke("train", "--model", local_model, "--data", chat_file)
    assert result.exit_code == 2
    assert "llamafactory-cli was not found" in result.output and "make setup" in result.output
    assert not Path("runs").exists()


def test_multinode_dry_run_prints_every_node(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "--dry-run",
        "--cpu-procs",
        "8",
        "--nnodes",
        "2",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29501",
    )
    assert result.exit_code == 0, result.output
    for rank in (0, 1):
        assert f"# node {rank} of 2:" in result.output
        assert (
            f"FORCE_TORCHRUN=1 NPROC_PER_NODE=8 NNODES=2 NODE_RANK={rank} MASTER_ADDR=10.0.0.1 "
            "MASTER_PORT=29501"
        ) in result.output
    bad = invoke("train", "--model", local_model, "--data", chat_file, "--nnodes", "2")
    assert bad.exit_code == 2 and "--master-addr" in bad.output
    bad = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "--nnodes",
        "2",
        "--node-rank",
        "2",
        "--master-addr",
        "h",
    )
    assert bad.exit_code == 2 and "--node-rank" in bad.output


def test_method_auto_picks_what_fits(fake_cli: Path, chat_file: Path) -> None:
    big = invoke(
        "train",
        "--method",
        "auto",
        "--gpu-mem",
        "24",
        "--model",
        "Qwen/Qwen2.5-7B-Instruct",
        "--data",
        chat_file,
        "--dry-run",
    )
    assert big.exit_code == 0, big.output
    assert "auto:" in big.output and "finetuning_type: lora" in big.output
    small = invoke(
        "train",
        "--method",
        "auto",
        "--gpu-mem",
        "80",
        "--model",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--data",
        chat_file,
        "--dry-run",
    )
    assert small.exit_code == 0 and "finetuning_type: full" in small.output
    nothing = invoke(
        "train", "--method", "auto", "--model", "Qwen/Qwen2.5-0.5B", "--data", chat_file
    )
    assert nothing.exit_code == 2 and "--gpu-mem" in nothing.output


def test_warns_when_plan_does_not_fit(fake_cli: Path, chat_file: Path) -> None:
    from qwenft.train import TrainRequest, plan_train

    gpus = [{"name": "RTX 4090", "memory_gib": 24.0, "compute_cap": 8.9}]
    req = TrainRequest(
        method="full", model="Qwen/Qwen2.5-7B-Instruct", data=chat_file, deepspeed="none"
    )
    plan = plan_train(req, gpus_seen=gpus)
    assert plan.notes and plan.notes[0].startswith("warning: qwenft plan predicts")
    assert "what would fit" in plan.notes[0]
    assert plan.config["bf16"] is True  # compute capability 8.9 supports bf16
    ok = plan_train(
        TrainRequest(method="qlora", model="Qwen/Qwen2.5-0.5B-Instruct", data=chat_file),
        gpus_seen=gpus,
    )
    assert ok.notes == [] and ok.config["bf16"] is True


def test_tokenized_cache_key_covers_every_input(
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qwenft.train import TrainRequest, plan_train

    def path(**kw) -> str:
        base = dict(method="lora", model=str(local_model), data=chat_file)
        base.update(kw)
        return plan_train(TrainRequest(**base), gpus_seen=[]).config["tokenized_path"]

    first = path()
    assert first == path()  # same inputs, same cache
    assert Path(first).is_relative_to(Path.cwd().parent / "home" / "tokenized")
    other_data = write_jsonl(
        tmp_path / "other.jsonl", [json.loads(chat_file.read_text().splitlines()[0])]
    )
    variants = [
        path(knobs={"cutoff_len": 512}),
        path(template="qwen3"),
        path(data=other_data),
        path(set_items=["val_size=0.2"]),
        path(set_items=["packing=true"]),
        path(set_items=["preprocessing_batch_size=7"]),  # KTO's KL pairs and pt blocks follow it
    ]
    assert len({first, *variants}) == 1 + len(variants)

    def multi_node() -> dict:
        req = TrainRequest(
            method="lora", model=str(local_model), data=chat_file, nnodes=2, master_addr="h"
        )
        return plan_train(req, gpus_seen=[]).config

    # qwenft tokenizes on each node before torchrun and publishes a whole copy: cached there too
    assert multi_node()["tokenized_path"] == first
    from qwenft.data import tokens

    real = tokens.llamafactory_version
    monkeypatch.setattr(tokens, "llamafactory_version", lambda: "0.9.9")
    assert path() != first  # another LLaMA-Factory: another key
    assert "tokenized_path" not in multi_node()  # and it tokenizes inside the job: one node only
    monkeypatch.setattr(tokens, "llamafactory_version", real)
    (local_model / "tokenizer.json").write_text("{}")  # a different tokenizer
    assert path() != first


def test_the_same_data_file_in_two_places_trains(
    fake_cli: Path, local_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """A copy of a data file (another folder, a second clone) trains without --force: the
    dataset name qwenft picks for it never clashes with the original's."""
    clone = tmp_path / "clone"
    clone.mkdir()
    copy = clone / chat_file.name
    copy.write_bytes(chat_file.read_bytes())
    first = invoke("train", "--model", local_model, "--data", chat_file, "-o", "a")
    second = invoke("train", "--model", local_model, "--data", copy, "-o", "b")
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    names = [c["yaml"]["dataset"] for c in read_calls(fake_cli)]
    assert len(set(names)) == 2
    info = json.loads((Path(os.environ["QWENFT_HOME"]) / "datasets/dataset_info.json").read_text())
    assert [info[n]["file_name"] for n in names] == [str(chat_file), str(copy)]


def test_step_settings_follow_the_run_length(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    base = ["train", "--model", local_model, "--data", chat_file, "--val-size", "0"]
    assert invoke(*base, "-o", "a", "--max-steps", "10").exit_code == 0
    assert invoke(*base, "-o", "b", "--max-steps", "1000").exit_code == 0
    kept = invoke(
        *base, "-o", "c", "--max-steps", "10", "--logging-steps", "5", "--set", "save_steps=7"
    )
    assert kept.exit_code == 0, kept.output
    steps = [(c["yaml"]["logging_steps"], c["yaml"]["save_steps"]) for c in read_calls(fake_cli)]
    assert steps == [(1, 1), (20, 100), (5, 7)]
    dry = invoke(*base, "--max-steps", "10", "--dry-run")
    assert "logging_steps: 1\n" in dry.stdout and "save_steps: 1\n" in dry.stdout


@pytest.mark.parametrize(
    ("values", "overrides", "n", "procs", "expected"),
    [
        # a 10-step run: a loss point and a checkpoint every step, 1 held-out sample kept
        (
            {"max_steps": 10, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1},
            {"max_steps": 10},
            4,
            1,
            {"logging_steps": 1, "save_steps": 1, "eval_steps": 3},
        ),
        # 10 steps on 10000 samples: the default split (1000) would dwarf the training
        (
            {"max_steps": 10},
            {"max_steps": 10},
            10000,
            1,
            {"logging_steps": 1, "save_steps": 1, "eval_steps": 3, "val_size": 20},
        ),
        # a 1000-step run (16000 training samples): every 20 steps, checkpoints at the recipe's 100
        (
            {"max_steps": 1000},
            {},
            17778,
            1,
            {"logging_steps": 20, "save_steps": 100, "eval_steps": 250, "val_size": 1600},
        ),
        # by epochs: 2000 samples, 10 % held out, 16 a step -> 113 steps
        ({}, {}, 2000, 1, {"logging_steps": 2, "save_steps": 11, "eval_steps": 29}),
        # 2 processes halve the steps
        ({"val_size": 0}, {"val_size": 0}, 2000, 2, {"logging_steps": 1, "save_steps": 6}),
        # a long run keeps the recipe's values
        ({"val_size": 0}, {"val_size": 0}, 200000, 1, {"logging_steps": 100, "save_steps": 100}),
        # what the person set stays, and so does the split they chose
        (
            {"max_steps": 10, "logging_steps": 5, "save_steps": 7, "val_size": 0.1},
            {"max_steps": 10, "logging_steps": 5, "save_steps": 7, "val_size": 0.1},
            10000,
            1,
            {"eval_steps": 3},
        ),
        # a split too small to measure anything is dropped
        (
            {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1},
            {},
            100,
            1,
            {"logging_steps": 1, "save_steps": 1, "val_size": 0.0},
        ),
    ],
)
def test_step_defaults(values: dict, overrides: dict, n: int, procs: int, expected: dict) -> None:
    from qwenft import settings

    assert settings.step_defaults({**settings.recipe("lora"), **values}, overrides, n, procs) == (
        expected
    )
