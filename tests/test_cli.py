"""The CLI through typer's CliRunner, with a recording llamafactory-cli standing in for the real one.

These tests check command building, run folders and refusals; the end-to-end tests (test_e2e.py)
prove that training works with the real LLaMA-Factory."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.builders import read_calls, write_jsonl, write_model_folder
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
        "train", "--model", local_model, "--data", chat_file, "--dry-run", "--gpus", "2"
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
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r", "--gpus", "2")
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
    result = invoke("train", "--model", d, "--data", mixed, "-o", "r2")
    assert result.exit_code == 2 and "--thinking" in result.output
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
        "--gpus",
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
    assert no_ckpt.exit_code == 2 and "no checkpoint" in no_ckpt.output
    Path("r/checkpoint-4").mkdir()
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
    fake_cli: Path, local_model: Path, chat_file: Path, tmp_path: Path
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
    ]
    assert len({first, *variants}) == 1 + len(variants)
    (local_model / "tokenizer.json").write_text("{}")  # a different tokenizer
    assert path() != first
    multi = plan_train(
        TrainRequest(
            method="lora", model=str(local_model), data=chat_file, nnodes=2, master_addr="h"
        ),
        gpus_seen=[],
    )
    assert "tokenized_path" not in multi.config


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
