"""The typed run manifest (qwenft.runs.manifest) and the one staged-folder helper (fsutil)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenft.errors import QwenftError
from qwenft.fsutil import staged_dir
from qwenft.models.presets import resolve_model
from qwenft.models.target import resolve_target
from qwenft.runs.folder import create_run_dir, list_runs
from qwenft.runs.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    DatasetRecord,
    Manifest,
    read_manifest,
    update_manifest,
)


def manifest(**changes: object) -> Manifest:
    m = Manifest(
        method="lora",
        model=resolve_model("qwen2-0.5b-instruct"),
        template="qwen",
        default_system="You are a helpful assistant.",
        enable_thinking=None,
        dataset=DatasetRecord("/data/chat.jsonl", "ab" * 32, "chat-abababab", "/ds"),
        command=["llamafactory-cli", "train", "train.yaml"],
        env={"HF_HUB_OFFLINE": "1"},
    )
    for key, value in changes.items():
        setattr(m, key, value)
    return m


def write(run: Path, data: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / MANIFEST).write_text(json.dumps(data))
    return run


def test_manifest_round_trips_and_keeps_unknown_keys(tmp_path: Path) -> None:
    data = {**manifest().to_dict(), "written_by_a_later_qwenft": {"x": 1}}
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["enable_thinking"] is None  # a decided value, written even when None
    assert "merged" not in data  # not set yet: left out
    run = write(tmp_path / "r", data)
    m = read_manifest(run)
    assert m.model.arch is not None and m.model.arch.hidden_size == 896
    assert m.dataset.sha256 == "ab" * 32
    update_manifest(run, status="completed", final_loss=1.5)
    again = json.loads((run / MANIFEST).read_text())
    assert again["written_by_a_later_qwenft"] == {"x": 1}
    assert (again["status"], again["final_loss"]) == ("completed", 1.5)
    assert {k: v for k, v in again.items() if k not in ("status", "final_loss")} == {
        k: v for k, v in data.items() if k not in ("status", "final_loss")
    }


def test_manifest_without_schema_version_reads_as_version_0(tmp_path: Path) -> None:
    data = manifest().to_dict()
    del data["schema_version"]
    assert read_manifest(write(tmp_path / "old", data)).schema_version == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**manifest().to_dict(), "schema_version": SCHEMA_VERSION + 1}, "newer qwenft"),
        ({k: v for k, v in manifest().to_dict().items() if k != "dataset"}, "not a complete"),
        ("[1, 2]", "not a complete"),  # not an object at all
    ],
)
def test_unreadable_manifests_are_refused(tmp_path: Path, data: object, message: str) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / MANIFEST).write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(QwenftError, match=message):
        read_manifest(run)
    assert list_runs(tmp_path) == []  # `qwenft runs` leaves it out instead of failing


def test_update_manifest_refuses_unknown_fields_and_statuses(tmp_path: Path) -> None:
    run = write(tmp_path / "r", manifest().to_dict())
    with pytest.raises(TypeError, match="unknown manifest field"):
        update_manifest(run, mergd="/typo")
    with pytest.raises(ValueError, match="unknown run status"):
        update_manifest(run, status="finished")
    assert read_manifest(run).status == "running"


def test_freeze_and_full_runs_load_their_own_weights(tmp_path: Path) -> None:
    for method in ("full", "freeze"):
        run = write(tmp_path / method, manifest(method=method, status="completed").to_dict())
        with pytest.raises(QwenftError, match="holds no trained weights"):
            resolve_target(str(run))
        (run / "config.json").write_text("{}")
        target = resolve_target(str(run))
        assert (target.model_path, target.adapter_path) == (str(run.absolute()), None)


# --------------------------------------------------------------------------------------------------
# staged_dir: a folder is whole or absent


def test_staged_dir_renames_into_place_and_refuses_to_overwrite(tmp_path: Path) -> None:
    parent = tmp_path / "t"  # tmp_path also holds the test's home and work folders
    parent.mkdir()
    target = parent / "out"
    with staged_dir(target) as stage:
        (stage / "a.txt").write_text("1")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(QwenftError, match="already exists") as info:
        with staged_dir(target, hint="pick another"):
            pass
    assert info.value.hint == "pick another"
    assert (target / "a.txt").read_text() == "1"
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # no staging left behind


def test_staged_dir_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path) -> None:
    parent = tmp_path / "t"  # tmp_path also holds the test's home and work folders
    parent.mkdir()
    target = parent / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(target, replace=True) as stage:
            (stage / "new.txt").write_text("new")
            raise RuntimeError("the job failed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with staged_dir(target, replace=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_create_run_dir_takes_an_empty_folder_but_not_a_full_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    made = create_run_dir(empty, {"train.yaml": "a: 1\n"}, prepare=lambda s: (s / "x").touch())
    assert sorted(p.name for p in made.iterdir()) == ["train.yaml", "x"]
    with pytest.raises(QwenftError, match="not empty") as info:
        create_run_dir(made, {"train.yaml": "b: 2\n"})
    assert "--output-dir" in (info.value.hint or "")
    assert (made / "train.yaml").read_text() == "a: 1\n"
