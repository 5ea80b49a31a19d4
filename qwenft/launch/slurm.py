"""Slurm: the batch script a prepared run folder carries (launch.sbatch), submitting it, and
reading its job's state.

The script asks for one task per node; each task runs `qwenft start RUN`, which reads the step's
variables (launch.schedulers) and starts LLaMA-Factory's torchrun for its node. The data was
checked and tokenized before submission, so no rank waits on another's tokenization.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qwenft.errors import QwenftError
from qwenft.launch.schedulers import DEFAULT_PORT
from qwenft.proc.launcher import capture

SCRIPT = "launch.sbatch"

# squeue's and sacct's states, as `qwenft runs` shows them
JOB_STATES = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "pending",
    "RUNNING": "running",
    "COMPLETING": "running",
    "COMPLETED": "done",
    "FAILED": "failed",
    "CANCELLED": "failed",
    "TIMEOUT": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "PREEMPTED": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
}


@dataclass(frozen=True)
class SlurmJob:
    """What launch.sbatch asks of Slurm."""

    name: str
    nodes: int
    gpus_per_node: int | None  # None: a CPU job (no --gpus-per-node line)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    extra: tuple[str, ...] = ()  # further #SBATCH options, as given (--qos=high)


def render_sbatch(job: SlurmJob, run_dir: Path, *, python: str | None = None) -> str:
    """launch.sbatch: literal #SBATCH values (sbatch reads those lines before any shell runs, so
    a variable there would never be expanded), then one `qwenft start` task per node."""
    run = shlex.quote(str(run_dir))
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    for option, value in (
        ("partition", job.partition),
        ("time", job.time),
        ("account", job.account),
    ):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    lines += [f"#SBATCH {arg}" for arg in job.extra]
    lines += [
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        "# Written by `qwenft train --launcher slurm`: the run folder, its data and the tokenized",
        "# dataset were prepared before submission. Submit: sbatch " + f"{run}/{SCRIPT}",
        "# (or `qwenft resume RUN --submit` to go on from the newest checkpoint).",
        "set -euo pipefail",
        "# rank 0's host, and a port of the job's own (every node computes the same)",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT=$(( {DEFAULT_PORT} + SLURM_JOB_ID % 10000 ))",
        "export MASTER_ADDR MASTER_PORT",
        # one task per node: `qwenft start` maps SLURM_PROCID / SLURM_STEP_NUM_TASKS onto NODE_RANK /
        # NNODES and the job id onto RDZV_ID, then runs llamafactory-cli train
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {shlex.quote(python or sys.executable)} "
        f"-m qwenft start {run}",
    ]
    return "\n".join(lines) + "\n"


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if not found:
        raise QwenftError(
            "--submit: sbatch was not found on this machine",
            "run qwenft on a Slurm login node, or drop --submit and copy the run folder's "
            f"{SCRIPT} to one (sbatch RUN/{SCRIPT})",
        )
    return found


def submit(script: Path) -> str:
    """sbatch the script; the job id (QwenftError with sbatch's message if it refused)."""
    out = capture([sbatch_path(), "--parsable", str(script)], 60)
    if out.returncode != 0:
        raise QwenftError(
            f"sbatch refused {script}: {(out.stderr or out.stdout).strip()}",
            "fix the job's options (--partition, --time, --account, --sbatch-arg) and submit "
            f"again: sbatch {script}",
        )
    return out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"


def job_state(job_id: str) -> str | None:
    """pending / running / done / failed, from squeue (live jobs) then sacct and scontrol
    (finished ones); None where the Slurm commands are absent or know no such job."""
    for argv in (
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        ["scontrol", "-o", "show", "job", job_id],
    ):
        if not shutil.which(argv[0]):
            continue
        out = capture(argv, 15)
        if out.returncode != 0:
            continue
        text = out.stdout.strip()
        if argv[0] == "scontrol":
            text = next((w.split("=", 1)[1] for w in text.split() if w.startswith("JobState=")), "")
        state = text.split()[0].rstrip("+") if text else ""
        if state in JOB_STATES:
            return JOB_STATES[state]
    return None
