"""The typed run manifest (qwenft.runs.manifest: what it records, and a run folder that travels)
and the one staged-folder helper (fsutil)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from qwenft.errors import QwenftError
from qwenft.fsutil import staged_dir
from qwenft.models.presets import resolve_model
from qwenft.models.target import resolve_target
from qwenft.runs.folder import create_run_dir, list_runs
from qwenft.runs.gguf import exported_gguf
from qwenft.runs.manifest import (
    MANIFEST,
    RUN_VAR,
    SCHEMA_VERSION,
    DatasetRecord,
    Manifest,
    read_manifest,
    relocate_train_yaml,
    update_manifest,
)
from tests.helpers.builders import run_manifest as manifest
from tests.helpers.builders import write_checkpoint, write_model_folder, write_safetensors
from tests.helpers.cli import invoke


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


# --------------------------------------------------------------------------------------------------
# a run folder travels: moved or copied, it reads its own things where it is now


def travelling(run: Path, outside: Path) -> Manifest:
    """A completed, merged, exported and evaluated LoRA run's manifest as qwenft fills it in at
    `run` (the paths inside it absolute, as train, merge, export and eval pass them)."""
    return manifest(
        status="completed",
        dataset=DatasetRecord(
            str(outside / "chat.jsonl"),
            "ab" * 32,
            "chat-abababab-fit-r",
            str(outside / "datasets"),
            4,
            str(run / "data.fit.jsonl"),  # --overlength drop: the copy inside the run folder
        ),
        command=["/venv/bin/llamafactory-cli", "train", str(run / "train.yaml")],
        env={
            "HF_HUB_OFFLINE": "1",
            "TENSORBOARD_LOGGING_DIR": str(run / "tb"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{run / 'mlflow.db'}",
        },
        tracking={"tensorboard": f"tensorboard --logdir {run / 'tb'}"},
        parent_run=str(outside / "sft"),
        log=str(run / "train.log"),
        summary={"log": str(run / "train.log"), "loss_plot": str(run / "training_loss.png")},
        merged=str(run / "merged"),
        exports=[
            {"file": str(run / "export" / "r-f16.gguf"), "modelfile": str(run / "export" / "M")}
        ],
        last_eval={"report": str(run / "eval" / "eval.json"), "at": "2026-12-03T08:00:00+0000"},
        tokenized_cache={"path": str(outside / "tokenized" / "x"), "hit": True, "by": "qwenft"},
    )


def inside(m: Manifest) -> list[str]:
    """What a manifest names inside its run folder, as qwenft reads it."""
    e = m.exports[0]
    return [
        *(m.log, m.merged, m.summary["log"], m.summary["loss_plot"], m.dataset.train_path),
        *(m.last_eval["report"], e["file"], e["modelfile"], m.command[2]),
        *(
            m.env["TENSORBOARD_LOGGING_DIR"],
            m.env["MLFLOW_TRACKING_URI"],
            m.tracking["tensorboard"],
        ),
    ]


def inside_of(run: Path) -> list[str]:
    """inside() of travelling(run, ...) read from `run`."""
    names = ["train.log", "merged", "train.log", "training_loss.png", "data.fit.jsonl"]
    names += ["eval/eval.json", "export/r-f16.gguf", "export/M", "train.yaml", "tb"]
    return [str(run / n) for n in names] + [
        f"sqlite:///{run / 'mlflow.db'}",
        f"tensorboard --logdir {run / 'tb'}",
    ]


def outside(m: Manifest) -> list[str | None]:
    """What a manifest names outside its run folder (kept as given)."""
    paths = (m.dataset.path, m.dataset.dataset_dir, m.model.path, m.parent_run)
    return [*paths, m.tokenized_cache["path"]]


def test_paths_inside_the_run_folder_are_written_relative_to_it(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "cluster" / "r", tmp_path / "data"
    m = travelling(run, elsewhere)
    write_run(run, m.to_dict())  # as `train` writes its first manifest: absolute paths
    update_manifest(run, final_loss=0.5)  # every later write stores them relative
    raw = json.loads((run / MANIFEST).read_text())
    assert (raw["log"], raw["merged"], raw["dataset"]["train_path"]) == (
        "train.log",
        "merged",
        "data.fit.jsonl",
    )
    assert raw["summary"] == {"log": "train.log", "loss_plot": "training_loss.png"}
    assert raw["exports"] == [{"file": "export/r-f16.gguf", "modelfile": "export/M"}]
    assert raw["last_eval"]["report"] == "eval/eval.json"
    # the folder inside text: the launch command, the variables, where the trackers wrote
    assert raw["command"][2] == f"{RUN_VAR}/train.yaml"
    assert raw["env"]["TENSORBOARD_LOGGING_DIR"] == f"{RUN_VAR}/tb"
    assert raw["env"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{RUN_VAR}/mlflow.db"
    assert raw["tracking"] == {"tensorboard": f"tensorboard --logdir {RUN_VAR}/tb"}
    assert str(run) not in json.dumps(raw)  # nothing names where the folder is
    # outside it, as given: the data, dataset_dir, the base model, the parent run, the cache
    assert raw["dataset"]["path"] == str(elsewhere / "chat.jsonl")
    assert raw["parent_run"] == str(elsewhere / "sft")
    assert raw["tokenized_cache"]["path"] == str(elsewhere / "tokenized" / "x")
    read = read_manifest(run)
    assert inside(read) == inside_of(run) and outside(read) == outside(m)
    assert json.loads(read.to_json()) == {**m.to_dict(), "final_loss": 0.5}  # --json: absolute
    update_manifest(run, final_loss=0.5)
    assert json.loads((run / MANIFEST).read_text()) == raw  # read and written back: the same


def test_a_moved_run_folder_reads_its_paths_where_it_is_now(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "cluster" / "r", tmp_path / "data"
    m = travelling(run, elsewhere)
    write_run(run, m.to_dict(run))
    (run / "export").mkdir()
    (run / "export" / "r-f16.gguf").write_bytes(b"GGUF")
    laptop = tmp_path / "laptop" / "renamed"  # rsynced elsewhere under another name
    laptop.parent.mkdir()
    os.rename(run, laptop)
    moved = read_manifest(laptop)
    assert inside(moved) == inside_of(laptop) and outside(moved) == outside(m)
    assert exported_gguf(laptop, moved) == laptop / "export" / "r-f16.gguf"
    update_manifest(laptop, final_loss=0.5)  # written where it is now: still relative
    assert json.loads((laptop / MANIFEST).read_text())["merged"] == "merged"
    # `qwenft runs RUN`: its log and where its trackers wrote, in the folder it is in now
    shown = invoke("runs", laptop)
    assert shown.exit_code == 0, shown.output
    assert f"log: {laptop / 'train.log'}" in shown.output
    assert f"tensorboard: tensorboard --logdir {laptop / 'tb'}" in shown.output
    assert str(run) not in shown.output
    [row] = json.loads(invoke("runs", "--dir", laptop.parent, "--json").stdout)
    assert (row["run_dir"], row["log"]) == (str(laptop), str(laptop / "train.log"))


def test_a_manifest_written_with_absolute_paths_is_rebased(tmp_path: Path) -> None:
    """Manifests written before paths were relative: what lay under the folder the run was in then
    (its command's train.yaml, its train.log) is read in the folder it is in now, moved or copied
    (the original still there)."""
    run, elsewhere = tmp_path / "cluster" / "r", tmp_path / "data"
    m = travelling(run, elsewhere)
    write_run(run, m.to_dict())  # an older qwenft's manifest: every path absolute
    copy = tmp_path / "copy" / "r2"
    shutil.copytree(run, copy)
    moved = tmp_path / "laptop" / "r3"
    moved.parent.mkdir()
    os.rename(run, moved)
    shutil.copytree(moved, run)  # the original back in place: the copies still read their own
    for folder in (copy, moved, run):
        read = read_manifest(folder)
        assert inside(read) == inside_of(folder) and outside(read) == outside(m)
    update_manifest(moved, final_loss=0.5)  # its first write where it is now: relative since
    assert json.loads((moved / MANIFEST).read_text())["log"] == "train.log"
    assert inside(read_manifest(moved)) == inside_of(moved)


def test_an_absolute_path_under_no_known_folder_is_rebased_only_onto_what_exists(
    tmp_path: Path,
) -> None:
    """A gone absolute path that no recorded location explains (merged after an earlier move,
    under the same folder name) is read under the run folder after the folder's name, if it is
    there; else kept as given."""
    gone = tmp_path / "gone" / "r"
    data = manifest(merged=str(gone / "merged"), log=str(gone / "logs" / "x.log")).to_dict()
    run = write_run(tmp_path / "here" / "r", data)
    (run / "merged").mkdir()
    read = read_manifest(run)
    assert read.merged == str(run / "merged")
    assert read.log == str(gone / "logs" / "x.log")  # not here either: as given


def test_train_yaml_is_pointed_at_the_folder_it_is_in_now(tmp_path: Path) -> None:
    run = tmp_path / "cluster" / "r"
    run.mkdir(parents=True)
    text = (
        "# qwenft lora fine-tune of tiny-qwen2\n\n### model\n"
        f"model_name_or_path: {tmp_path / 'base'}\n\n### output\n"
        f"output_dir: {run}\ndeepspeed: {run}/deepspeed.json\n"
        f"swanlab_logdir: {run}/swanlog\nadapter_name_or_path: {run}-parent/adapter\n"
    )
    (run / "train.yaml").write_text(text)
    assert relocate_train_yaml(run) is False  # where it was written: left alone
    laptop = tmp_path / "laptop" / "r2"
    laptop.parent.mkdir()
    os.rename(run, laptop)
    assert relocate_train_yaml(laptop) is True
    after = (laptop / "train.yaml").read_text()
    assert after == text.replace(f"{run}/", f"{laptop}/").replace(f": {run}\n", f": {laptop}\n")
    assert yaml.safe_load(after)["output_dir"] == str(laptop)
    assert f"{run}-parent/adapter" in after  # another folder: kept
    assert relocate_train_yaml(laptop) is False


def test_a_base_model_that_is_gone_is_named_with_what_to_do(tmp_path: Path) -> None:
    base = write_model_folder(tmp_path / "models" / "Qwen2-0.5B-Instruct")
    run = tmp_path / "laptop" / "r"
    write_run(run, manifest(model=resolve_model(str(base)), status="completed").to_dict(run))
    (run / "adapter_config.json").write_text("{}")
    assert resolve_target(str(run)).model_path == str(base)  # outside the run: as given
    shutil.rmtree(base)
    with pytest.raises(QwenftError, match=f"the base model of {run} is missing: {base}") as info:
        resolve_target(str(run))
    assert info.value.hint and "--adapter" in info.value.hint and str(base) in info.value.hint
    # a tiny preset's build is this home's (qwenft builds the same weights on first use)
    tiny = resolve_model("tiny-qwen2", tiny_home=tmp_path / "another-home")
    update_manifest(run, model=tiny)
    assert resolve_target(str(run)).model_path == resolve_model("tiny-qwen2").path
