"""Past one machine, for real (issue 24): a Slurm job on a real Slurm 22.05 cluster of two nodes
on this host (scripts/slurm_local.sh installs Debian's slurm-wlm and munge where they are missing
and starts slurmctld and a slurmd per node, on loopback), training the tiny Qwen with one process
per node through `qwenft start`, torchrun's c10d rendezvous and gloo.

Resubmission (`qwenft resume RUN --submit`) is proven with a stand-in sbatch (test_launch.py):
on CPUs, transformers cannot resume a run of several processes (it loads the optimizer state
with map_location "cpu:0", which torch refuses), so a real resumed job fails here."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.e2e import LEARN, Qwenft, losses, manifest

ENDED = {"completed", "failed", "interrupted"}
SLURM_LOCAL = Path(__file__).parents[1] / "scripts" / "slurm_local.sh"


@pytest.fixture
def slurm_cluster() -> None:
    """The two-node cluster, up (started once; a later call returns at once)."""
    out = subprocess.run([str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (
        f"the local Slurm cluster did not start:\n{out.stdout}\n{out.stderr}"
    )


def _status(qwenft: Qwenft, run: Path) -> str:
    return json.loads(qwenft("runs", run, "--json").stdout)["status"]


def _wait(
    qwenft: Qwenft, run: Path, until: set[str], seen: list[str], bound_s: float, marks: dict
) -> str:
    """Poll `qwenft runs RUN` until its status is one of `until`; `seen`: the statuses it went
    through; `marks["step1"]`: when trainer_log.jsonl (step 1's line) first appeared."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        status = _status(qwenft, run)
        if "step1" not in marks and (run / "trainer_log.jsonl").is_file():
            marks["step1"] = time.monotonic()
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in until:
            return status
        time.sleep(1)
    raise AssertionError(f"{run} still {seen[-1]} after {bound_s:.0f} s (went {seen})")


def test_slurm_job_on_two_nodes_trains(
    qwenft: Qwenft, chat_file: Path, slurm_cluster: None
) -> None:
    run = Path("runs/slurm").absolute()
    # the 4 QA rows each step (2 a rank), LEARN's LoRA: the loss falls well within 12 steps
    schedule = [*LEARN, "--batch-size", "2", "--max-steps", "12", "--set", "logging_steps=1"]
    submitted = time.monotonic()
    qwenft(
        "train", "--model", "tiny-qwen2", "--method", "lora", "--data", chat_file, "-o", run,
        "--launcher", "slurm", "--nodes", "2", "--cpu-procs", "1", *schedule, "--submit",
    )  # fmt: skip
    m = manifest(run)
    job = m["launch"]["job_id"]
    assert job and m["status"] in ("submitted", "running")  # an idle cluster starts it at once
    seen: list[str] = []
    marks: dict[str, float] = {}
    _wait(qwenft, run, {"running", *ENDED}, seen, 300, marks)
    assert _wait(qwenft, run, ENDED, seen, 600, marks) == "completed", (
        run / "train.log"
    ).read_text()[-3000:]
    assert "running" in seen  # the job's state was shown while it ran
    m = manifest(run)
    assert m["launch"]["job_id"] == job and m["launch"]["nodes"] == 2
    assert (m["env"]["NNODES"], m["env"]["RDZV_ID"]) == ("2", job)
    assert m["summary"]["global_step"] == 12 and m["summary"]["processes"] >= 2
    loss = losses(run)
    assert sum(loss[-3:]) < 0.8 * sum(loss[:3]), loss
    assert (run / "train.node1.log").is_file() and (run / f"slurm-{job}.out").is_file()
    print(
        f"submission to step 1: {marks['step1'] - submitted:.0f} s, to the end: "
        f"{time.monotonic() - submitted:.0f} s"
    )
