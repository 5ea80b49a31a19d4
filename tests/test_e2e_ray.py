"""Ray end to end (issue 24, part 3): `qwenft train --launcher ray --workers 2` trains the tiny
Qwen with two Ray workers (CPU processes, torch.distributed over gloo, both on this machine's two
cores) through qwenft.launch.ray_driver, and LLaMA-Factory 0.9.5's own Ray path, given the same
train.yaml, never reaches its first step: the reason the driver patches it. They need the ray extra
(`make test` installs it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from qwenft.proc import supervise
from tests.helpers.e2e import Qwenft, losses, manifest

STEPS = 8
# Two workers of two samples: the four QA rows every step, a LoRA that learns them fast (as LEARN)
RAY = ("--launcher", "ray", "--workers", "2")
LEARN_FAST = (
    f"--max-steps {STEPS} --lr 5e-3 --batch-size 2 --grad-accum 1 --lora-rank 32 --cutoff-len 64 "
    "--val-size 0 --set lora_alpha=64 --set lr_scheduler_type=constant --set warmup_ratio=0 "
    "--set logging_steps=1 --set save_steps=1000"
).split()
# LLaMA-Factory's Ray path: how long it may take to start (its import), then how long it is
# watched until Ray says its placement group can never be placed. Patched, the group is ready within a second of
# Ray's start (about 4 s) and step 1 follows in about 30 s (test_ray_workers_train).
REACH_S, HANG_S = 180, 60
# What Ray's autoscaler says of LLaMA-Factory's bundle on a cluster of 2 CPUs
INFEASIBLE = "No available node types can fulfill resource request {'CPU': 10.0}"


def test_ray_workers_train(qwenft: Qwenft, chat_file: Path, tmp_path: Path) -> None:
    run = Path("runs/ray").absolute()
    args = ["train", "--model", "tiny-qwen2", "--method", "lora", "--data", chat_file, "-o", run]
    out_path = tmp_path / "qwenft.out"
    started = time.monotonic()
    first_step_s = None
    with out_path.open("w") as out:
        proc = qwenft.popen(*args, *RAY, *LEARN_FAST, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                assert time.monotonic() - started < 600, "no end in 600 s"
                if first_step_s is None and (run / "trainer_log.jsonl").is_file():
                    first_step_s = time.monotonic() - started
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
    total_s = time.monotonic() - started
    output = out_path.read_text()
    assert proc.returncode == 0, output[-4000:]
    print(f"\nray: launch to step 1 in {first_step_s:.1f} s, {STEPS} steps in {total_s:.1f} s")
    assert "ray: 2 workers, one CPU process (gloo) each, on a local Ray" in output

    m = manifest(run)
    assert m["status"] == "completed" and m["summary"]["global_step"] == STEPS
    assert m["command"][1:3] == ["-m", "qwenft.launch.ray_driver"]
    assert m["env"]["USE_RAY"] == "1" and "FORCE_TORCHRUN" not in m["env"]
    assert yaml.safe_load((run / "train.yaml").read_text())["ray_num_workers"] == 2
    log = (run / "train.log").read_text()
    # the patched placement group: two bundles of one CPU (LLaMA-Factory asks {'CPU': 10} for each
    # CPU of the cluster); then one worker per rank of a world of two
    assert "Create placement group with 2 bundles: {'CPU': 1}" in log
    assert "Process rank: 0, world size: 2" in log and "Process rank: 1, world size: 2" in log
    curve = losses(run)
    assert len(curve) == STEPS, curve
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve  # the loss falls
    summary = m["summary"]
    assert summary["final_loss"] < 0.8 * summary["first_loss"], summary
    assert (run / "adapter_model.safetensors").is_file()


def test_llamafactory_own_ray_path_hangs(qwenft: Qwenft, chat_file: Path, tmp_path: Path) -> None:
    """Why qwenft.launch.ray_driver exists (LLaMA-Factory issue #10348): `USE_RAY=1
    llamafactory-cli train` on the train.yaml `qwenft train --launcher ray --workers 2` renders
    asks Ray for a placement group of one {"CPU": 10} bundle per CPU of the cluster, which can
    never be placed (Ray's autoscaler says so): it waits on it forever, before any step, still
    waiting HANG_S after it asked. (It is given the head node's
    address, master_addr: without it, it would first fail on the dashboard's state API, which
    the plain ray package does not run; the driver patches that too.)"""
    from ray.util import get_node_ip_address

    run = Path("runs/lf-ray").absolute()
    args = ["train", "--model", "tiny-qwen2", "--method", "lora", "--data", chat_file, "-o", run]
    dry = qwenft(*args, *RAY, *LEARN_FAST, "--dry-run").stdout
    text = dry.split("# --- train.yaml ---")[1].split("# --- environment ---")[0]
    assert yaml.safe_load(text)["ray_num_workers"] == 2
    config = tmp_path / "train.yaml"
    config.write_text(text)
    cli = Path(sys.executable).parent / "llamafactory-cli"
    argv = [str(cli), "train", str(config), f"master_addr={get_node_ip_address()}"]
    env = {**qwenft.env, "USE_RAY": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "lf.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + REACH_S
        while "Using ray.remote mode with 2 workers" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        # until Ray's autoscaler declares the bundle unplaceable (it never will be), within HANG_S
        until = time.monotonic() + HANG_S
        while INFEASIBLE not in log_path.read_text():
            tree.update(supervise.descendants(proc.pid))
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < until, log_path.read_text()[-4000:]
            time.sleep(1)
        tree.update(supervise.descendants(proc.pid))
        assert proc.poll() is None  # still waiting on pg.ready()
        output = log_path.read_text()
        assert "Create placement group" not in output  # logged once ray.get(pg.ready()) returns
        assert "'loss'" not in output and not (run / "trainer_log.jsonl").exists()
    finally:
        # Ray gives its workers process groups of their own: the whole tree, not only the group
        # (no `ray stop`: it would stop every Ray of the machine, a parallel test's too)
        tree.update(supervise.descendants(proc.pid))
        for pid in (proc.pid, *tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while left := [pid for pid in tree if alive(pid)]:
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.5)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
