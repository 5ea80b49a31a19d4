"""The typed run manifest (qwenft.runs.manifest) and the one staged-folder helper (fsutil)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenft.errors import QwenftError
from qwenft.fsutil import staged_dir
from qwenft.models.target import resolve_target
from qwenft.runs.folder import create_run_dir, list_runs
from qwenft.runs.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    read_manifest,
    update_manifest,
)
from tests.helpers.builders import run_manifest as manifest
from tests.helpers.builders import write_checkpoint, write_safetensors


def write_run(run: Path, data: dict) -> Path:
    """A run folder holding only a manifest (qwenft.json) of `data`."""
    run.mkdir(parents=True, exist_ok=True)
    (run / MANIFEST).write_text(json.dumps(data))
    return run


def test_manifest_round_trips_and_keeps_unknown_keys(tmp_path: Path) -> None:
    data = {**manifest().to_dict(), "written_by_a_later_qwenft": {"x": 1}}
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["enable_thinking"] is None  # a decided value, written even when None
    assert "merged" not in data  # not set yet: left out
    run = write_run(tmp_path / "r", data)
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
    assert read_manifest(write_run(tmp_path / "old", data)).schema_version == 0


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
    assert list_runs([tmp_path]) == []  # `qwenft runs` leaves it out instead of failing


def test_update_manifest_refuses_unknown_fields_and_statuses(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", manifest().to_dict())
    with pytest.raises(TypeError, match="unknown manifest field"):
        update_manifest(run, mergd="/typo")
    with pytest.raises(ValueError, match="unknown run status"):
        update_manifest(run, status="finished")
    assert read_manifest(run).status == "running"


def test_freeze_and_full_runs_load_their_own_weights(tmp_path: Path) -> None:
    for method in ("full", "freeze"):
        run = write_run(tmp_path / method, manifest(method=method, status="completed").to_dict())
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


# --------------------------------------------------------------------------------------------------
# one writer per run folder (qwenft.runs.lock), and which checkpoint a resume may use

HOLDER = """
import sys, time
from qwenft.runs.lock import RunLock
lock = RunLock(sys.argv[1], "train").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from qwenft.runs.lock import LOCK_NAME, RunLock, read_holder, run_is_live

    run = tmp_path / "r"
    run.mkdir()
    assert run_is_live(run) is None  # no lock file: cannot tell (a run made before locks)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert run_is_live(run) is True
        with pytest.raises(
            QwenftError, match=rf"in use by qwenft train \(pid {holder.pid}, since"
        ) as info:
            RunLock(run, "resume", wait_s=0.1).acquire()
        assert info.value.exit_code == 2 and "wait for it to end" in (info.value.hint or "")
        assert read_holder(run)["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock of a killed process
        holder.wait()
    assert run_is_live(run) is False
    with RunLock(run, "resume") as lock:
        assert lock.held and run_is_live(run) is True
        assert read_holder(run)["action"] == "resume"
    assert run_is_live(run) is False and (run / LOCK_NAME).exists()


# The lock outlives a SIGKILLed qwenft while its children are still being stopped: the supervisor
# holds it (hold_fds) until the last one is gone. The child ignores SIGTERM, so that takes the
# supervisor's grace period after qwenft's death.
HOLDER_WITH_CHILD = """
import io, sys
from qwenft.proc import launcher
from qwenft.runs.lock import RunLock
child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
with RunLock(sys.argv[1], "train") as lock:
    launcher.run([sys.executable, "-c", child], {}, echo=sys.stdout.buffer, grace_s=2, hold_fds=[lock.fileno()])
"""


def test_the_lock_is_held_until_the_last_child_is_gone(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from qwenft.runs.lock import run_is_live

    run = tmp_path / "r"
    run.mkdir()
    qwenft = subprocess.Popen(
        [sys.executable, "-c", HOLDER_WITH_CHILD, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert qwenft.stdout is not None and qwenft.stdout.readline() == "up\n"
    qwenft.kill()
    qwenft.wait()
    killed = time.monotonic()
    assert run_is_live(run) is True  # its child is still stopping (it ignores SIGTERM)
    while run_is_live(run) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert run_is_live(run) is False
    assert 1 < time.monotonic() - killed < 5  # SIGKILLed after the supervisor's grace of 2 s


def test_resume_skips_a_half_written_checkpoint(tmp_path: Path) -> None:
    from qwenft.runs.lock import (
        checkpoint_is_complete,
        newest_complete_checkpoint,
        set_aside_incomplete_checkpoints,
    )

    run = tmp_path / "r"
    assert newest_complete_checkpoint(tmp_path / "missing") is None
    done = write_checkpoint(run, 2)
    write_checkpoint(run, 10)  # step 10 > 4 > 2: by number, not by name
    (run / "checkpoint-10" / "adapter_model.safetensors").unlink()  # weights not written yet
    write_checkpoint(run, 4, state=None)  # killed before trainer_state.json (the last file written)
    write_checkpoint(run, 5, state='{"global_st')  # killed while writing trainer_state.json
    write_checkpoint(run, 6, truncate=3)  # weights cut short (the state is there: a crashed disk)
    (run / "checkpoint-x").mkdir()  # not a checkpoint name
    assert checkpoint_is_complete(done)
    assert newest_complete_checkpoint(run) == done
    full = run / "checkpoint-7"  # a full fine-tune: sharded weights behind an index
    full.mkdir()
    write_safetensors(full / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (full / "model.safetensors.index.json").write_text(json.dumps(index))
    (full / "trainer_state.json").write_text('{"global_step": 7}')
    assert newest_complete_checkpoint(run) == done  # a shard is missing
    write_safetensors(full / "model-00002-of-00002.safetensors")
    assert newest_complete_checkpoint(run) == full

    moved = set_aside_incomplete_checkpoints(run)
    assert sorted(p.name for p in moved) == [
        ".incomplete-checkpoint-10",
        ".incomplete-checkpoint-4",
        ".incomplete-checkpoint-5",
        ".incomplete-checkpoint-6",
    ]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-7",
        "checkpoint-x",
    ]
