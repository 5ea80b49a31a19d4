"""`qwenft train --stage` and `--from` (issue 12) with the recording llamafactory-cli: DPO, KTO and
pt runs, chaining from a parent run, packed pt refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.builders import read_calls, write_jsonl
from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


def test_dpo_run_records_its_stage_and_reports_its_figures(
    fake_cli: Path, local_model: Path, tmp_path: Path
) -> None:
    from tests.helpers.builders import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        pairs,
        "--stage",
        "dpo",
        "--beta",
        "0.2",
        "--pref-loss",
        "hinge",
        "--sft-weight",
        "0.5",
        "-o",
        "runs/d",
    )
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert (cfg["stage"], cfg["pref_loss"], cfg["pref_beta"], cfg["pref_ftx"]) == (
        "dpo",
        "hinge",
        0.2,
        0.5,
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
        "train",
        "--model",
        local_model,
        "--data",
        data,
        "--stage",
        "kto",
        "--method",
        "freeze",
        "--trainable-layers",
        "1",
        "--beta",
        "0.3",
        "-o",
        "runs/k",
    )
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert (cfg["stage"], cfg["finetuning_type"], cfg["freeze_trainable_layers"]) == (
        "kto",
        "freeze",
        1,
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
    corpus.write_text("First document, one line.\nSecond document.\n")
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
    assert rows == [{"text": "First document, one line."}, {"text": "Second document."}]
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
    assert (
        invoke(
            "train", "--method", "full", "--model", local_model, "--data", chat_file, "-o", "f"
        ).exit_code
        == 0
    )
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
    for stage in ("dpo", "orpo", "simpo", "kto", "rm"):  # the pairs are separated: no alarm
        assert LossWatch(tmp_path, stage=stage)() is None


def test_packed_pt_under_one_block_is_refused_before_anything_is_written(
    fake_cli: Path, local_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft.data.pipeline import TokenStats
    from tests.helpers.builders import text_rows

    texts = write_jsonl(tmp_path / "texts.jsonl", text_rows())
    stats = TokenStats(n_samples=4, n_over_cutoff=0, tokens_total=40, tokens_cut=0)
    monkeypatch.setattr("qwenft.train.overlength_stats", lambda plan, progress: stats)
    result = invoke("train", "--model", local_model, "--data", texts, "--stage", "pt", "-o", "p")
    assert result.exit_code == 2 and "make no packed block" in result.output, result.output
    assert "lower --cutoff-len (at most 40)" in result.output
    assert not Path("p").exists() and read_calls(fake_cli) == []
    ok = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        texts,
        "--stage",
        "pt",
        "--cutoff-len",
        "16",
        "-o",
        "p",
    )
    assert ok.exit_code == 0, ok.output
    # `packing: true` in train.yaml makes LLaMA-Factory's blocks one token shorter than cutoff_len
    assert "40 tokens packed into 2 block(s) of 15" in ok.output, ok.output
    assert "10 tokens (less than a block, per batch) are left out" in ok.output
    record = json.loads(Path("p/qwenft.json").read_text())["overlength"]
    assert record == {
        "mode": "packed",
        "cutoff_len": 16,
        "block_len": 15,
        "tokens": 40,
        "blocks": 2,
        "tokens_left_out": 10,
    }
