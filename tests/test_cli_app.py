"""`qwenft --help` for every command, the light import, and the small listing commands
(`models`, `runs`, `doctor`) through typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


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


def test_runs_lists_runs(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    assert (
        invoke("train", "--model", local_model, "--data", chat_file, "-o", "runs/a").exit_code == 0
    )
    rows = json.loads(invoke("runs", "--json").output)
    assert [(r["status"], r["method"], r["final_loss"]) for r in rows] == [
        ("completed", "lora", 2.0)
    ]
    assert "completed" in invoke("runs").output


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


def test_doctor_lists_the_options_this_machine_can_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every knob value that needs a GPU or a package (the knob table's Needs), checked as train
    checks it before launch."""
    from qwenft import doctor, knobs, settings

    monkeypatch.setattr(settings, "cuda_gpus", lambda: [])
    monkeypatch.setattr(settings, "has_module", lambda module: module != "flash_attn")
    checks = {c.name: c for c in doctor.menu_checks()}
    needing = {
        label
        for k in knobs.KNOBS
        for n in k.needs
        for label, _ in knobs.needs_of({k.key: n.values[0]})
    }
    assert set(checks) == needing and {"--attn fa2", "--liger", "--unsloth"} <= needing
    assert not any(c.required for c in checks.values())
    assert not checks["--liger"].ok and checks["--liger"].detail.startswith("needs a CUDA GPU")
    monkeypatch.setattr(settings, "cuda_gpus", lambda: [{"compute_cap": 9.0}])
    checks = {c.name: c for c in doctor.menu_checks()}
    assert checks["--liger"].ok and checks["--liger"].detail == "usable here"
    assert not checks["--attn fa2"].ok and "flash-attn package" in checks["--attn fa2"].detail
