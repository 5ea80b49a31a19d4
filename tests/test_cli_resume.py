"""`qwenft resume` with the recording llamafactory-cli: refusals, `--force`, a DPO run resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenft.runs.manifest import read_manifest, update_manifest
from tests.helpers.builders import read_calls, write_checkpoint, write_jsonl
from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


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


def test_a_dpo_run_resumes_with_its_stage(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
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


def test_a_moved_run_resumes_where_it_is_now(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    """LLaMA-Factory reads train.yaml's output_dir when it resumes: a run folder moved since it
    was written is resumed in the folder it is in now, on its own copy of the data."""
    args = ["--model", local_model, "--data", chat_file, "-o", "r", "--overlength", "drop"]
    assert invoke("train", *args).exit_code == 0
    update_manifest(Path("r"), status="interrupted")
    write_checkpoint(Path("r"), 4)
    moved = Path("elsewhere/r2").absolute()
    moved.parent.mkdir()
    Path("r").rename(moved)
    result = invoke("resume", moved)
    assert result.exit_code == 0, result.output
    assert f"train.yaml now points at {moved}" in result.output
    call = read_calls(fake_cli)[-1]
    assert call["argv"] == ["train", str(moved / "train.yaml")]
    assert call["yaml"]["output_dir"] == str(moved)
    info = json.loads((Path(call["yaml"]["dataset_dir"]) / "dataset_info.json").read_text())
    assert info[call["yaml"]["dataset"]]["file_name"] == str(moved / "data.fit.jsonl")
    assert read_manifest(moved).log == str(moved / "train.log")


def test_a_run_whose_data_moved_resumes_with_data(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    """The data file lies outside the run folder (kept as given): gone, resume names it and asks
    for --data, and that file is what it trains on."""
    assert invoke("train", "--model", local_model, "--data", chat_file, "-o", "r").exit_code == 0
    update_manifest(Path("r"), status="interrupted")
    write_checkpoint(Path("r"), 4)
    moved = chat_file.rename(chat_file.with_name("moved.jsonl"))
    gone = invoke("resume", "r")
    assert gone.exit_code == 2 and f"the run's data file is gone: {chat_file}" in gone.output
    assert "pass --data with the same file" in gone.output
    result = invoke("resume", "r", "--data", moved)
    assert result.exit_code == 0, result.output
    call = read_calls(fake_cli)[-1]
    info = json.loads((Path(call["yaml"]["dataset_dir"]) / "dataset_info.json").read_text())
    assert info[call["yaml"]["dataset"]]["file_name"] == str(moved)
