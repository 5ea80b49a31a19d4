"""`qwenft runs`: finding runs (./runs, --dir, QWENFT_HOME's record), live / died, `runs rm`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from qwenft.runs.folder import create_run_dir, list_runs, recorded_runs
from qwenft.runs.manifest import MANIFEST, update_manifest
from tests.helpers.builders import run_manifest
from tests.helpers.cli import invoke


def make_run(path: Path, **fields: object) -> Path:
    run = create_run_dir(path, {MANIFEST: run_manifest().to_json()})
    if fields:
        update_manifest(run, **fields)
    return run


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds the run's lock (as a live `qwenft train` does) until killed."""
    code = (
        "import sys, time\n"
        "from qwenft.runs.lock import RunLock\n"
        "with RunLock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_runs_are_found_under_runs_dir_and_in_the_record(tmp_path: Path) -> None:
    here = make_run(Path("runs/a"), status="completed", final_loss=1.25)
    there = make_run(tmp_path / "elsewhere" / "b", status="failed")
    named = tmp_path / "named"
    (named / "c").mkdir(parents=True)
    (named / "c" / MANIFEST).write_text(run_manifest(status="completed").to_json())  # not recorded
    assert {str(p) for p in recorded_runs()} == {str(here), str(there)}
    rows = list_runs([Path("runs"), named])
    assert sorted(Path(r["run_dir"]).name for r in rows) == ["a", "b", "c"]  # each once
    result = invoke("runs", "--dir", named, "--json")
    assert result.exit_code == 0, result.output
    by_name = {Path(r["run_dir"]).name: r for r in json.loads(result.output)}
    assert by_name["a"]["final_loss"] == 1.25 and by_name["a"]["stage"] == "sft"
    assert by_name["b"]["status"] == "failed"
    text = invoke("runs").output
    assert "STAGE/METHOD" in text and "sft/lora" in text and "1.2500" in text


def test_a_running_run_whose_process_is_gone_is_died(tmp_path: Path) -> None:
    run = make_run(
        tmp_path / "r",
        status="running",
        started="2026-11-30T07:00:00+0000",
        host=socket.gethostname(),
        pid=2**22 + 1,  # no such process
        log=str(tmp_path / "r" / "train.log"),
    )
    (run / "train.log").write_text("step 1\nstep 2\nKilled\n")
    (run / "trainer_log.jsonl").write_text(
        json.dumps({"current_steps": 2, "total_steps": 10, "loss": 3.0}) + "\n"
    )
    [row] = list_runs([])
    assert (row["status"], row["steps_done"], row["steps_planned"]) == ("died", 2, 10)
    out = invoke("runs", "--tail", "2").output
    assert "died" in out and "2/10" in out and "| Killed" in out and "step 1" not in out


def test_a_live_run_is_running_and_cannot_be_removed(tmp_path: Path) -> None:
    run = make_run(tmp_path / "live", status="running", host=socket.gethostname(), pid=os.getpid())
    holder = hold_lock(run)
    try:
        assert [r["status"] for r in list_runs([])] == ["running"]
        result = invoke("runs", "rm", run)
        assert result.exit_code == 2 and "is running" in result.output
        assert (run / MANIFEST).is_file()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 5
    while list_runs([])[0]["status"] != "died":  # the kernel dropped the lock with its holder
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_runs_rm_deletes_a_finished_run_and_its_record(tmp_path: Path) -> None:
    run = make_run(tmp_path / "done", status="completed")
    result = invoke("runs", "rm", run)
    assert result.exit_code == 0, result.output
    assert not run.exists() and not list(tmp_path.glob(".done*"))
    assert recorded_runs() == [] and list_runs([]) == []
    missing = invoke("runs", "rm", run)
    assert missing.exit_code == 2 and "run folder not found" in missing.output


def test_runs_show_the_lineage_of_a_chained_stage() -> None:
    sft = make_run(Path("runs/sft"), status="completed")
    make_run(Path("runs/dpo"), status="completed", stage="dpo", parent_run=str(sft))
    by_name = {Path(r["run_dir"]).name: r for r in json.loads(invoke("runs", "--json").output)}
    assert by_name["dpo"]["parent_run"] == str(sft) and by_name["sft"]["parent_run"] is None
    lines = invoke("runs").output.splitlines()
    (dpo,) = [x for x in lines if "runs/dpo" in x]
    (plain,) = [x for x in lines if "runs/sft" in x]
    assert "dpo/lora" in dpo and dpo.endswith("<- sft") and "<-" not in plain
