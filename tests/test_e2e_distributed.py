"""Several processes and machines, interruption and resume, with the real torchrun/DeepSpeed.

Two CPU processes stand in for two GPUs (gloo backend); two torchrun launches on loopback stand
in for two machines."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

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
        "--gpus",
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
            "--gpus",
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

    qwenft("resume", run)
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
