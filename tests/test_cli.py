"""The CLI through typer's CliRunner, with a recording llamafactory-cli standing in for the real one.

These tests check command building, run folders and refusals; the end-to-end tests (test_e2e.py)
prove that training works with the real LLaMA-Factory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.builders import read_calls, write_checkpoint, write_jsonl, write_model_folder
from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


@pytest.fixture
def local_model(tmp_path: Path) -> Path:
    """A folder that looks like a Qwen2 checkpoint (config only: the fake CLI never loads it)."""
    return write_model_folder(tmp_path / "Qwen2-0.5B-Instruct")


def written(work: Path, home: Path) -> list[str]:
    """Everything a command left behind in the working folder and QWENFT_HOME."""
    return sorted(str(p.relative_to(p.anchor)) for root in (work, home) for p in root.rglob("*"))


def test_help_for_every_command() -> None:
    for cmd in (
        [],
        ["train"],
        ["merge"],
        ["chat"],
        ["runs"],
        ["models"],
        ["data"],
        ["data", "check"],
        ["data", "convert"],
        ["data", "split"],
        ["data", "register"],
        ["plan"],
        ["serve"],
        ["eval"],
        ["resume"],
        ["doctor"],
    ):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0, (cmd, result.output)
        assert "Usage" in result.output


def test_cli_import_is_light() -> None:
    code = (
        "import sys, qwenft.cli; heavy = [m for m in ('torch', 'transformers', 'llamafactory', "
        "'peft', 'datasets') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
    assert manifest["dataset"]["sha256"] and manifest["command"][1:] == call["argv"]
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


def test_merge_flow_and_refusals(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert invoke("train", "--model", local_model, "--data", chat_file, "-o", "r").exit_code == 0
    result = invoke("merge", "r", "--no-check")
    assert result.exit_code == 0, result.output
    merged = Path("r/merged")
    assert (merged / "model.safetensors").is_file()
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]  # <|endoftext|> added, and said so
    assert "added <|endoftext|>" in result.output
    call = read_calls(fake_cli)[-1]
    assert call["argv"][0] == "export" and call["yaml"]["adapter_name_or_path"] == str(
        Path("r").absolute()
    )
    assert "quantization_bit" not in call["yaml"]
    assert json.loads(Path("r/qwenft.json").read_text())["merged"] == str(merged.absolute())
    again = invoke("merge", "r", "--no-check")
    assert again.exit_code == 2 and "already exists" in again.output
    assert (
        invoke(
            "train", "--method", "full", "--model", local_model, "--data", chat_file, "-o", "f"
        ).exit_code
        == 0
    )
    refused = invoke("merge", "f")
    assert refused.exit_code == 2 and "full fine-tune" in refused.output
    assert invoke("merge", "nowhere").exit_code == 2


def test_failed_merge_leaves_no_target(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke("train", "--model", local_model, "--data", chat_file, "-o", "r").exit_code == 0
    monkeypatch.setenv("FAKE_LF_EXIT", "1")
    assert invoke("merge", "r", "--no-check").exit_code == 1
    assert not Path("r/merged").exists()
    assert not [p for p in Path("r").iterdir() if p.name.startswith(".merged")]


def test_runs_lists_runs(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert (
        invoke("train", "--model", local_model, "--data", chat_file, "-o", "runs/a").exit_code == 0
    )
    rows = json.loads(invoke("runs", "--json").output)
    assert [(r["status"], r["method"], r["final_loss"]) for r in rows] == [
        ("completed", "lora", 2.0)
    ]
    assert "completed" in invoke("runs").output


def test_models_lists_presets() -> None:
    rows = json.loads(invoke("models", "--json").output)
    by_name = {r["name"]: r for r in rows}
    assert by_name["tiny-qwen2"]["template"] == "qwen"
    assert by_name["qwen3-8b"]["template"] == "qwen3"
    assert by_name["qwen3-4b-instruct-2507"]["template"] == "qwen3_nothink"
    assert 7.0 < by_name["qwen2.5-7b-instruct"]["params_b"] < 7.8
    arch = by_name["qwen2.5-7b-instruct"]["architecture"]
    assert (arch["hidden_size"], arch["num_key_value_heads"], arch["vocab_size"]) == (
        3584,
        4,
        152064,
    )
    assert by_name["qwen2.5-7b-instruct"]["default_system"].startswith("You are Qwen")


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


def test_resume_refusals_and_force(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert invoke("train", "--model", local_model, "--data", chat_file, "-o", "r").exit_code == 0
    done = invoke("resume", "r")
    assert done.exit_code == 2 and "already completed" in done.output
    manifest = json.loads(Path("r/qwenft.json").read_text())
    Path("r/qwenft.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    no_ckpt = invoke("resume", "r")
    assert no_ckpt.exit_code == 2 and "no complete checkpoint" in no_ckpt.output
    write_checkpoint(Path("r"), 4)
    assert invoke("resume", "r", "--method", "full").exit_code == 2
    assert (
        "template qwen3 != qwen" in invoke("train", "--resume", "r", "--template", "qwen3").output
    )
    chat_file.write_text(chat_file.read_text() + chat_file.read_text())
    changed = invoke("resume", "r")
    assert changed.exit_code == 2 and "the data changed" in changed.output
    assert len(read_calls(fake_cli)) == 1  # nothing launched by any refusal
    forced = invoke("resume", "r", "--force")
    assert forced.exit_code == 0, forced.output
    calls = read_calls(fake_cli)
    assert len(calls) == 2 and calls[1]["argv"] == calls[0]["argv"]
    resumes = json.loads(Path("r/qwenft.json").read_text())["resumes"]
    assert resumes[0]["from"] == "checkpoint-4" and resumes[0]["forced"] is True


def test_loss_watch_stops_nan_and_zero(tmp_path: Path) -> None:
    from qwenft.runs.watch import LossWatch

    log = tmp_path / "trainer_log.jsonl"
    watch = LossWatch(tmp_path, patience=3)
    assert watch() is None
    log.write_text(
        "".join(json.dumps({"loss": x}) + "\n" for x in (2.0, float("nan"), float("nan")))
    )
    assert watch() is None  # only two in a row
    log.write_text(log.read_text() + json.dumps({"loss": float("nan")}) + "\n")
    assert "NaN" in watch()
    log.write_text("".join(json.dumps({"loss": x}) + "\n" for x in (1.0, 0.0, 0.0, 0.0)))
    assert "exactly 0" in watch()


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


def test_chat_refusals(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert invoke("train", "--model", local_model, "--data", chat_file, "-o", "r").exit_code == 0
    wrong = invoke("chat", "r", "--template", "qwen3", "--prompt", "hi")
    assert wrong.exit_code == 2 and "trained with template 'qwen'" in wrong.output
    if importlib.util.find_spec("vllm") is None:
        vllm = invoke("chat", "r", "--backend", "vllm", "--prompt", "hi")
        assert vllm.exit_code == 2 and "pip install vllm" in vllm.output
    missing = invoke("chat", "./nowhere/model", "--prompt", "hi")
    assert missing.exit_code == 2 and "model folder not found" in missing.output
    not_adapter = invoke("chat", local_model, "--adapter", local_model, "--prompt", "hi")
    assert not_adapter.exit_code == 2 and "not a LoRA adapter" in not_adapter.output


def test_doctor_reports_and_fails_without_llamafactory_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output[result.output.index("[") :])}
    assert rows["torch"]["ok"] and rows["llamafactory"]["ok"] and rows["llamafactory-cli"]["ok"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr("qwenft.lf.launcher.find_llamafactory_cli", _raise_not_found)
    broken = invoke("doctor")
    assert broken.exit_code == 1 and "[ERR] llamafactory-cli" in broken.output
    assert "make setup" in broken.output


def _raise_not_found() -> str:
    from qwenft.errors import QwenftError

    raise QwenftError("llamafactory-cli was not found")


# --------------------------------------------------------------------------------------------------
# a quiet, informative terminal (issue 11, items 2, 3, 6)


def test_train_stdout_is_the_run_folder_and_the_rest_is_stderr(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r")
    assert result.exit_code == 0, result.output
    run_dir = Path("r").absolute()
    assert result.stdout == f"{run_dir}\n"  # RUN=$(qwenft train ...) works
    err = result.stderr
    assert err.startswith(
        f"lora fine-tune of {local_model} (template qwen) on chat.jsonl: 4 samples"
    )
    assert f"log: {run_dir / 'train.log'}" in err and "starting LLaMA-Factory ..." in err
    assert "step 2/2 100% | loss 2.0000" in err  # the progress line, from trainer_log.jsonl
    assert "done: 2 steps" in err and f"next: qwenft merge {run_dir}" in err
    # LLaMA-Factory's own output only in the log (no -v)
    assert "fake llamafactory-cli" not in result.output
    assert "fake llamafactory-cli train" in (run_dir / "train.log").read_text()
    verbose = invoke("train", "--model", local_model, "--data", chat_file, "-o", "v", "-v")
    assert verbose.exit_code == 0, verbose.output
    assert verbose.stdout == f"{Path('v').absolute()}\n"
    assert "fake llamafactory-cli train" in verbose.stderr and "launching: " in verbose.stderr


def test_train_and_merge_json_print_the_manifest(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["status"] == "completed" and manifest["final_loss"] == 2.0
    merged = invoke("merge", "r", "--no-check")
    assert merged.exit_code == 0, merged.output
    assert merged.stdout == f"{Path('r/merged').absolute()}\n"
    assert "merging the adapter of" in merged.stderr and "merge.log" in merged.stderr
    assert "fake llamafactory-cli" not in merged.output
    assert "fake llamafactory-cli export" in Path("r/merge.log").read_text()
    again = invoke("merge", "r", "--no-check", "--json", "--export-dir", "m2")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["merged"] == str(Path("m2").absolute())


def test_full_run_suggests_chat_not_merge(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke(
        "train", "--method", "full", "--model", local_model, "--data", chat_file, "-o", "f"
    )
    assert result.exit_code == 0, result.output
    assert "qwenft merge" not in result.stderr
    assert f"next: qwenft chat {Path('f').absolute()}" in result.stderr


def test_failed_training_surfaces_what_matters_in_the_log(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LF_EXIT", "1")
    monkeypatch.setenv(
        "FAKE_LF_SAY",
        'loading...\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    )
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r")
    assert result.exit_code == 1
    log = Path("r/train.log").absolute()
    assert f"from {log}:" in result.stderr
    assert (
        "  torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in result.stderr
    )
    assert "loading..." not in result.stderr and result.stdout == ""
    # no checkpoint was written: no resume command that would then fail
    assert "no checkpoint was written" in result.stderr and "qwenft resume" not in result.stderr


def test_interrupted_before_the_first_checkpoint_says_so(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft.errors import Interrupted

    def stopped(*args: object, **kw: object) -> int:
        raise Interrupted("stopped by SIGINT")

    monkeypatch.setattr("qwenft.lf.launcher.run", stopped)
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "-o", "r", "--max-steps", "40"
    )
    assert result.exit_code == 130, result.output
    assert "no checkpoint was written (the first was due at step 4)" in result.stderr
    assert "start again with the same `qwenft train` command" in result.stderr
    assert "qwenft resume" not in result.stderr
    assert json.loads(Path("r/qwenft.json").read_text())["status"] == "interrupted"
    write_checkpoint(Path("r"), 4)
    from qwenft.train import _resume_hint

    assert _resume_hint(Path("r")) == "resume with: qwenft resume r"


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


def test_progress_plain_lines_and_terminal_line(tmp_path: Path) -> None:
    import io

    from qwenft.runs.progress import TrainProgress, progress_line

    assert progress_line(37, 120, 1.23456, 9.5e-5, 1234.4, 70, 135) == (
        "step 37/120 30% | loss 1.2346 | lr 9.50e-05 | 1,234 tok/s | 1:10 elapsed | ETA 2:15"
    )
    assert progress_line(None, None) == "step -"
    assert progress_line(5, 10, eval_loss=0.5, elapsed_s=3725) == (
        "step 5/10 50% | eval loss 0.5000 | 1:02:05 elapsed"
    )

    def feed(tty: bool) -> str:
        run = tmp_path / ("tty" if tty else "plain")
        run.mkdir()
        log, rows = run / "train.log", run / "trainer_log.jsonl"
        now = [0.0]
        out = io.StringIO()
        progress = TrainProgress(run, log, out, tty=tty, clock=lambda: now[0], min_gap_s=5)
        log.write_text("[INFO] Loading dataset d.jsonl...\nRunning tokenizer on dataset: 1/4\n")
        now[0] = 2
        progress()
        with log.open("a") as fh:
            fh.write("***** Running training *****\n  Total optimization steps = 10\n")
            fh.write("  0%|   | 0/10 [00:00<?, ?it/s]")
        now[0] = 4
        progress()
        for step, t in ((2, 6), (4, 8), (6, 12)):
            with rows.open("a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "current_steps": step,
                            "total_steps": 10,
                            "loss": 4.0 / step,
                            "lr": 1e-4,
                            "elapsed_time": f"0:00:{t:02d}",
                            "throughput": 500.0,
                            "total_tokens": 100 * step,
                        }
                    )
                    + "\n"
                )
            with log.open("a") as fh:
                fh.write(f" {step * 10}%|   | {step}/10 [00:0{step}<00:10]")
            now[0] = t
            progress()
        with log.open("a") as fh:
            fh.write(" 100%|   | 10/10 [00:14<00:00] Saving model checkpoint to r/checkpoint-10\n")
        progress.close()
        return out.getvalue()

    plain = feed(tty=False).splitlines()
    assert plain[:3] == ["starting LLaMA-Factory ...", "tokenizing the data ...", "training ..."]
    # a line per new loss point, at most every min_gap_s (step 4 came 2 s after step 2), the end
    assert [ln.split(" | ")[0] for ln in plain[3:]] == [
        "step 2/10 20%",
        "step 6/10 60%",
        "step 10/10 100%",
    ]
    assert (
        plain[3]
        == "step 2/10 20% | loss 2.0000 | lr 1.00e-04 | 500 tok/s | 0:06 elapsed | ETA 0:08"
    )
    assert "\r" not in "".join(plain)
    tty = feed(tty=True)
    assert tty.startswith("\rstarting LLaMA-Factory ...\x1b[K\rtokenizing the data ...\x1b[K")
    assert "\rstep 4/10 40% | loss 1.0000" in tty
    assert tty.endswith(
        "\rstep 10/10 100% | loss 0.6667 | lr 1.00e-04 | 500 tok/s | 0:12 elapsed\x1b[K\n"
    )
    assert tty.count("\n") == 1


def test_progress_after_resume_counts_only_this_launch(tmp_path: Path) -> None:
    import io

    from qwenft.runs.progress import TrainProgress, tokens_per_second

    rows = tmp_path / "trainer_log.jsonl"
    old = {"current_steps": 4, "total_steps": 8, "loss": 9.0, "total_tokens": 400}
    rows.write_text(json.dumps(old) + "\n")
    out = io.StringIO()
    progress = TrainProgress(tmp_path, tmp_path / "train.log", out, tty=False)
    assert progress.resumed
    new = [
        {
            "current_steps": 6,
            "total_steps": 8,
            "loss": 1.5,
            "elapsed_time": "0:00:02",
            "throughput": 999.0,
            "total_tokens": 600,
        },
        {
            "current_steps": 8,
            "total_steps": 8,
            "loss": 1.0,
            "elapsed_time": "0:00:06",
            "throughput": 999.0,
            "total_tokens": 800,
        },
    ]
    with rows.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in new)
    progress.close()
    assert "step 8/8 100% | loss 1.0000 | 50 tok/s" in out.getvalue()  # (800-600) / (6-2)
    assert tokens_per_second(new, resumed=False) == 999.0
    assert tokens_per_second([], resumed=True) is None


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (
            'step 1\nTraceback (most recent call last):\n  File "a.py", line 3, in f\n    x()\n'
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\nbye\n",
            ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"],
        ),
        (
            '[rank0]: Traceback (most recent call last):\n[rank0]:   File "b.py"\n'
            "[rank0]: ModuleNotFoundError: No module named 'deepspeed'\n",
            ["ModuleNotFoundError: No module named 'deepspeed'"],
        ),
        (
            "{'loss': 2.1, 'grad_norm': 1.0}\n{'loss': nan, 'grad_norm': nan}\n",
            ["{'loss': nan, 'grad_norm': nan}"],
        ),
        (
            "ok\r 50%|##  | 5/10\nKilled\n",
            ["Killed"],
        ),
        (
            'Traceback (most recent call last):\n  File "c.py"\nValueError: first\n\n'
            'Traceback (most recent call last):\n  File "d.py"\n'
            "ValueError: Cannot find valid samples, check `data/README.md` for the data format.\n",
            ["ValueError: Cannot find valid samples, check `data/README.md` for the data format."],
        ),
        ("all went well\n", []),
    ],
)
def test_log_findings(log: str, expected: list[str]) -> None:
    from qwenft.runs.progress import log_findings

    assert log_findings(log) == expected


def test_surface_log_falls_back_to_the_tail(tmp_path: Path) -> None:
    from qwenft.runs.progress import surface_log

    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)) + "a\rb\r")
    said: list[str] = []
    surface_log(log, said.append)
    assert said == [f"the end of {log}:", "  line 17", "  line 18", "  line 19", "  a", "  b"]
    surface_log(tmp_path / "missing.log", said.append)
    assert len(said) == 6


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


# --------------------------------------------------------------------------------------------------
# training stages (issue 12)


def test_dpo_run_records_its_stage_and_reports_its_figures(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
    from tests.helpers.builders import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    result = invoke(
        "train", "--model", local_model, "--data", pairs, "--stage", "dpo", "--beta", "0.2",
        "--pref-loss", "hinge", "--sft-weight", "0.5", "-o", "runs/d",
    )
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert (cfg["stage"], cfg["pref_loss"], cfg["pref_beta"], cfg["pref_ftx"]) == (
        "dpo", "hinge", 0.2, 0.5,
    )
    # registered as pairs: LLaMA-Factory's ranking entry
    info = json.loads((Path(cfg["dataset_dir"]) / "dataset_info.json").read_text())
    assert info[cfg["dataset"]]["ranking"] is True
    manifest = json.loads(Path("runs/d/qwenft.json").read_text())
    assert manifest["stage"] == "dpo" and "parent_run" not in manifest
    figures = manifest["summary"]["stage_figures"]
    assert figures == {"rewards/accuracies": [0.5, 1.0], "rewards/margins": [0.25, 1.5]}
    assert "dpo: rewards/accuracies 0.5000 -> 1.0000 | rewards/margins 0.2500 -> 1.5000" in (
        result.output
    )
    assert "dpo lora fine-tune of" in result.output
    rows = json.loads(invoke("runs", "--json").output)
    assert [(r["stage"], r["method"]) for r in rows] == [("dpo", "lora")]


def test_kto_registers_the_label_and_freeze_sets_its_layers(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
    from tests.helpers.builders import kto_rows

    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows())
    result = invoke(
        "train", "--model", local_model, "--data", data, "--stage", "kto", "--method", "freeze",
        "--trainable-layers", "1", "--beta", "0.3", "-o", "runs/k",
    )
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert (cfg["stage"], cfg["finetuning_type"], cfg["freeze_trainable_layers"]) == (
        "kto", "freeze", 1,
    )
    assert cfg["pref_beta"] == 0.3 and cfg["kto_chosen_weight"] == cfg["kto_rejected_weight"] == 1.0
    info = json.loads((Path(cfg["dataset_dir"]) / "dataset_info.json").read_text())
    assert info[cfg["dataset"]]["columns"]["kto_tag"] == "label"
    assert "kto: rewards/margins 0.2500 -> 1.5000" in result.output  # KTO logs no accuracy
    assert "next: qwenft chat" in result.output  # a freeze run has its own weights


def test_pt_on_a_txt_trains_on_a_jsonl_copy_in_the_run_folder(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First document,\ntwo lines.\n\nSecond document.\n")
    dry = invoke("train", "--model", local_model, "--data", corpus, "--stage", "pt", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "packing: true" in dry.output and "data.pt.jsonl" in dry.output
    assert not Path("runs").exists()
    result = invoke("train", "--model", local_model, "--data", corpus, "--stage", "pt", "-o", "p")
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert cfg["stage"] == "pt" and cfg["packing"] is True
    info = json.loads((Path(cfg["dataset_dir"]) / "dataset_info.json").read_text())
    entry = info[cfg["dataset"]]
    assert entry["file_name"] == str(Path("p/data.pt.jsonl").absolute())
    assert entry["columns"] == {"prompt": "text"}
    rows = [json.loads(x) for x in Path("p/data.pt.jsonl").read_text().splitlines()]
    assert rows == [{"text": "First document,\ntwo lines."}, {"text": "Second document."}]
    manifest = json.loads(Path("p/qwenft.json").read_text())
    assert manifest["dataset"]["path"] == str(corpus.resolve())
    assert manifest["overlength"]["mode"] == "packed"


def test_from_a_run_starts_from_its_merged_model_and_keeps_its_chat_settings(
    fake_cli: Path, local_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    from tests.helpers.builders import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    sft = invoke("train", "--model", local_model, "--data", chat_file, "-o", "runs/sft")
    assert sft.exit_code == 0, sft.output
    # the parent's chat settings differ from the model family's: they must be the ones kept
    from qwenft.runs.manifest import update_manifest

    update_manifest(Path("runs/sft"), default_system="You are Tiny.")
    before = sorted(str(p) for p in Path.cwd().rglob("*"))
    unmerged = invoke("train", "--from", "runs/sft", "--data", pairs, "--stage", "dpo")
    assert unmerged.exit_code == 2, unmerged.output
    assert "no merged model" in unmerged.output
    assert f"qwenft merge {Path('runs/sft').absolute()}" in unmerged.output
    assert sorted(str(p) for p in Path.cwd().rglob("*")) == before
    assert invoke("merge", "runs/sft", "--no-check").exit_code == 0
    for bad, message in (
        (["--model", local_model], "--from and --model exclude each other"),
        (["--template", "qwen3"], "trained with template 'qwen', not 'qwen3'"),
    ):
        refused = invoke("train", "--from", "runs/sft", "--data", pairs, "--stage", "dpo", *bad)
        assert refused.exit_code == 2 and message in refused.output, refused.output
    result = invoke(
        "train", "--from", "runs/sft", "--data", pairs, "--stage", "dpo", "-o", "runs/dpo"
    )
    assert result.exit_code == 0, result.output
    merged = str(Path("runs/sft/merged").absolute())
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert cfg["model_name_or_path"] == merged and cfg["default_system"] == "You are Tiny."
    assert cfg["template"] == "qwen" and cfg["stage"] == "dpo"
    m = json.loads(Path("runs/dpo/qwenft.json").read_text())
    assert m["parent_run"] == str(Path("runs/sft").absolute())
    assert m["model"]["path"] == merged and m["default_system"] == "You are Tiny."
    listing = invoke("runs").output
    (line,) = [x for x in listing.splitlines() if "runs/dpo" in x]
    assert "dpo/lora" in line and line.endswith("<- sft")
    rows = {Path(r["run_dir"]).name: r for r in json.loads(invoke("runs", "--json").output)}
    assert rows["dpo"]["parent_run"] == m["parent_run"] and rows["sft"]["parent_run"] is None
    # the new LoRA run merges onto the weights it started from
    assert invoke("merge", "runs/dpo", "--no-check").exit_code == 0
    assert read_calls(fake_cli)[-1]["yaml"]["model_name_or_path"] == merged


def test_from_a_full_run_starts_from_its_own_weights(
    fake_cli: Path, local_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    from tests.helpers.builders import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    assert invoke(
        "train", "--method", "full", "--model", local_model, "--data", chat_file, "-o", "f"
    ).exit_code == 0
    empty = invoke("train", "--from", "f", "--data", pairs, "--stage", "orpo")
    assert empty.exit_code == 2 and "holds no trained weights" in empty.output  # fake: no weights
    (Path("f") / "config.json").write_text((local_model / "config.json").read_text())
    result = invoke("train", "--from", "f", "--data", pairs, "--stage", "orpo", "-o", "o")
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert cfg["model_name_or_path"] == str(Path("f").absolute()) and cfg["pref_loss"] == "orpo"


def test_loss_watch_lets_a_preference_loss_reach_zero(tmp_path: Path) -> None:
    from qwenft.runs.watch import LossWatch

    (tmp_path / "trainer_log.jsonl").write_text(
        "".join(json.dumps({"loss": x}) + "\n" for x in (0.7, 0.0, 0.0, 0.0))
    )
    assert "exactly 0" in LossWatch(tmp_path, stage="pt")()
    for stage in ("dpo", "orpo", "simpo", "kto"):  # the pairs are separated: no alarm
        assert LossWatch(tmp_path, stage=stage)() is None


def test_packed_pt_under_one_block_is_refused_before_anything_is_written(
    fake_cli: Path, local_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers.builders import text_rows

    texts = write_jsonl(tmp_path / "texts.jsonl", text_rows())
    stats = {"n_samples": 4, "n_over_cutoff": 0, "tokens_total": 40, "tokens_cut": 0}
    monkeypatch.setattr("qwenft.train.overlength_stats", lambda plan, progress: stats)
    result = invoke("train", "--model", local_model, "--data", texts, "--stage", "pt", "-o", "p")
    assert result.exit_code == 2 and "make no packed block" in result.output, result.output
    assert "lower --cutoff-len (at most 40)" in result.output
    assert not Path("p").exists() and read_calls(fake_cli) == []
    ok = invoke(
        "train", "--model", local_model, "--data", texts, "--stage", "pt", "--cutoff-len", "16",
        "-o", "p",
    )
    assert ok.exit_code == 0, ok.output
    # `packing: true` in train.yaml makes LLaMA-Factory's blocks one token shorter than cutoff_len
    assert "40 tokens packed into 2 block(s) of 15" in ok.output, ok.output
    assert "10 tokens (less than a block, per batch) are left out" in ok.output
    record = json.loads(Path("p/qwenft.json").read_text())["overlength"]
    assert record == {"mode": "packed", "cutoff_len": 16, "block_len": 15, "tokens": 40,
                      "blocks": 2, "tokens_left_out": 10}


def test_a_dpo_run_resumes_with_its_stage(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
    from qwenft.runs.manifest import update_manifest
    from tests.helpers.builders import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    args = ["--model", local_model, "--data", pairs, "--stage", "dpo", "-o", "d"]
    assert invoke("train", *args).exit_code == 0
    update_manifest(Path("d"), status="failed")
    write_checkpoint(Path("d"), 1)
    info_path = Path(read_calls(fake_cli)[-1]["yaml"]["dataset_dir"]) / "dataset_info.json"
    info_path.unlink()  # resume registers the data again, as the kind the stage takes
    result = invoke("resume", "d")
    assert result.exit_code == 0, result.output
    assert "dpo: rewards/accuracies" in result.output
    assert all(entry.get("ranking") for entry in json.loads(info_path.read_text()).values())
    assert len(json.loads(Path("d/qwenft.json").read_text())["resumes"]) == 1
