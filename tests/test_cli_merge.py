"""`qwenft merge` with the recording llamafactory-cli: the merged folder, its refusals, a failed
merge, `--json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.builders import read_calls
from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


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
    assert json.loads(Path("r/qwenft.json").read_text())["merged"] == "merged"  # in the run folder
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
