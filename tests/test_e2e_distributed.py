"""Several processes and machines, interruption and resume, with the real torchrun/DeepSpeed.

Two CPU processes stand in for two GPUs (gloo backend); two torchrun launches on loopback stand
in for two machines."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from qwenft.runs.lock import checkpoint_is_complete
from tests.helpers.e2e import SHORT, Qwenft, free_port, losses, manifest


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_full_two_processes_deepspeed(qwenft: Qwenft, chat_file: Path, stage: str) -> None:
    run = Path(f"runs/full-{stage}").absolute()
    qwenft(
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "full",
        "--cpu-procs",
        "2",
        "--deepspeed",
        stage,
        "--data",
        chat_file,
        "-o",
        run,
        *SHORT,
    )
    m = manifest(run)
    assert m["status"] == "completed" and m["summary"]["global_step"] == 3
    assert m["env"]["FORCE_TORCHRUN"] == "1" and m["env"]["NPROC_PER_NODE"] == "2"
    assert json.loads((run / "deepspeed.json").read_text())["zero_optimization"]["stage"] == int(
        stage[1]
    )
    assert all(math.isfinite(x) and x > 0 for x in losses(run))
    # qwenft tokenized the data before torchrun started: no rank preprocessed it
    log = (run / "train.log").read_text()
    assert "Loaded tokenized dataset from" in log and "Running tokenizer on dataset" not in log
    assert any(run.glob("*.safetensors"))
    # the saved full model loads and answers (ZeRO-2 saves tied embeddings as a separate lm_head)
    assert qwenft("chat", run, "--prompt", "hi", "--max-new-tokens", "5").returncode == 0


def test_two_nodes_on_loopback(qwenft: Qwenft, chat_file: Path) -> None:
    port = free_port()
    nodes = []
    for rank in (0, 1):
        args = [
            "train",
            "--model",
            "tiny-qwen2",
            "--method",
            "lora",
            "--data",
            str(chat_file),
            "-o",
            str(Path(f"runs/node{rank}").absolute()),
            "--cpu-procs",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            *SHORT,
        ]
        nodes.append(
            qwenft.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, out in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    m0, m1 = manifest(Path("runs/node0")), manifest(Path("runs/node1"))
    assert (m0["env"]["NNODES"], m0["env"]["NODE_RANK"], m1["env"]["NODE_RANK"]) == ("2", "0", "1")
    assert m0["status"] == m1["status"] == "completed"
    assert m0["summary"]["global_step"] == 3  # global rank 0 logs and saves
    assert (Path("runs/node0") / "adapter_model.safetensors").is_file()
    # each node tokenized before its torchrun; sharing one home (one file system), they raced
    # to publish the same cache folder, and the copy renamed into place first is the one used
    assert m0["tokenized_cache"]["path"] == m1["tokenized_cache"]["path"]
    assert m0["tokenized_cache"]["by"] == m1["tokenized_cache"]["by"] == "qwenft"
    logs = [(Path(f"runs/node{rank}") / "train.log").read_text() for rank in (0, 1)]
    assert "Loaded tokenized dataset from" in logs[0]  # LLaMA-Factory logs on global rank 0
    assert all("Running tokenizer on dataset" not in log for log in logs)
    # the loser's staging folder (fsutil.staged_dir: .<name>.<random> beside it) is gone
    cache = Path(m0["tokenized_cache"]["path"])
    assert cache.is_dir() and not list(cache.parent.glob(f".{cache.name}.*"))


def test_interrupt_after_checkpoint_then_resume(qwenft: Qwenft, chat_file: Path) -> None:
    run = Path("runs/resume").absolute()
    args = [
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "lora",
        "--data",
        str(chat_file),
        "-o",
        str(run),
        "--max-steps",
        "40",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--cutoff-len",
        "64",
        "--val-size",
        "0",
        "--lr",
        "1e-3",
        "--set",
        "lr_scheduler_type=linear",
        "--set",
        "warmup_ratio=0",
        "--set",
        "logging_steps=1",
        "--set",
        "save_steps=5",
    ]
    proc = qwenft.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-5" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stderr.read() if proc.stderr else ""
        )
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"qwenft resume {run}" in stderr
    m = manifest(run)
    assert m["status"] == "interrupted"
    # stopped short of the end: the newest checkpoint is before step 40 and the final state that
    # Trainer writes only when training ends is not there
    saved = sorted(int(p.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*"))
    assert saved and 5 <= saved[-1] < 40 and saved[-1] % 5 == 0, saved
    state = json.loads((run / f"checkpoint-{saved[-1]}" / "trainer_state.json").read_text())
    assert state["global_step"] == saved[-1] < 40
    assert not (run / "trainer_state.json").exists()

    # A kill that lands while the next checkpoint is written leaves it without trainer_state.json
    # (transformers writes it last); LLaMA-Factory would pick it, as the highest, and fail.
    half = run / f"checkpoint-{saved[-1] + 5}"
    shutil.copytree(run / f"checkpoint-{saved[-1]}", half)
    (half / "trainer_state.json").unlink()

    resume = qwenft.popen("resume", run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run / ".qwenft.lock"  # the resume holds it (and records itself) from its start
    while '"action": "resume"' not in lock.read_text() and resume.poll() is None:
        time.sleep(0.1)
    second = qwenft("resume", run, check=False)  # one writer per run folder
    assert second.returncode == 2, second.stderr
    assert f"is in use by qwenft resume (pid {resume.pid}" in second.stderr
    out, err = resume.communicate(timeout=600)
    assert resume.returncode == 0, err
    assert out.strip() == str(run)
    assert (
        f"set aside a checkpoint that was never completely written: .incomplete-{half.name}" in err
    )
    assert (run / f".incomplete-{half.name}").is_dir()
    assert checkpoint_is_complete(half)  # written again, whole, by the resumed training
    m = manifest(run)
    assert m["status"] == "completed" and len(m["resumes"]) == 1
    assert m["resumes"][0]["from"] == f"checkpoint-{saved[-1]}"
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 40
    assert m["summary"]["global_step"] == 40
    assert "Resuming training from" in (run / "train.log").read_text()
    # the learning-rate schedule continued: linear decay, never back up to the initial value
    rows = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    by_step = {r["current_steps"]: r["lr"] for r in rows if "lr" in r}
    lrs = [by_step[s] for s in sorted(by_step)]
    assert sorted(by_step) == list(range(1, 41))
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)), lrs


def test_sigkill_of_qwenft_stops_torchrun_and_its_workers(qwenft: Qwenft, chat_file: Path) -> None:
    """kill -9 of `qwenft train` on two processes: torchrun's workers (each in a session of its
    own) and everything else LLaMA-Factory started are gone within 5 s (qwenft/proc/supervise.py)."""
    import psutil

    run = Path("runs/killed").absolute()
    long = ["--max-steps", "500", *SHORT[2:]]  # SHORT, but it would run for minutes
    args = ["train", "--model", "tiny-qwen2", "--method", "lora", "--cpu-procs", "2"]
    proc = qwenft.popen(
        *args,
        "--data",
        chat_file,
        "-o",
        run,
        *long,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "trainer_log.jsonl").exists():  # the workers are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        family = psutil.Process(proc.pid).children(recursive=True)
        sessions = {p.pid: os.getsid(p.pid) for p in family}
        assert len(set(sessions.values())) >= 3  # the supervisor's and one for each worker
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        while time.monotonic() - killed < 5 and any(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family
        ):
            time.sleep(0.1)
        left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"still running 5 s after qwenft was killed: {left}"
        # The manifest still says "running"; `qwenft runs` tells it died, and resume may take it.
        assert manifest(run)["status"] == "running"
        rows = json.loads(qwenft("runs", "--json").stdout)
        assert [r["status"] for r in rows if r["run_dir"] == str(run)] == ["died"]
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
