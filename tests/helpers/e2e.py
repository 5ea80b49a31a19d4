"""End-to-end helpers: `python -m qwenft ...` as a user runs it, and what a run folder holds.

The conftest's `qwenft` fixture hands tests a `Qwenft` bound to their home; a test that asks for
it (or for a trained run) is marked `e2e` automatically."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers.builders import env_without_fake

# A few quick steps: enough to prove a pipeline runs.
QUICK = (
    "--max-steps 4 --batch-size 2 --grad-accum 1 --cutoff-len 128 --val-size 0 "
    "--set logging_steps=1 --set save_steps=1000"
).split()
# QUICK with another cutoff_len (so another tokenized-data cache key).
QUICK_CUTOFF_96 = [*QUICK[:6], "--cutoff-len", "96", *QUICK[8:]]
# Makes the tiny model learn the 4 QA rows (docs/tiny-models.md): rank-32 LoRA on all linears, lr 5e-3
# constant; by 80 steps the loss has fallen >100x and greedy answers are the trained ones.
LEARN = (
    "--lr 5e-3 --batch-size 4 --grad-accum 1 --lora-rank 32 --cutoff-len 128 --val-size 0 "
    "--set lora_alpha=64 --set lr_scheduler_type=constant --set warmup_ratio=0 "
    "--set logging_steps=5 --set save_steps=1000"
).split()
LEARN_STEPS = 80
# tiny-qwen3-moe (LoRA on the attention and the experts) learns them at lr 3e-3 in 100 steps (at
# 5e-3 its loss oscillates), with the router's balancing loss on (--moe-aux-loss). Its lr decays
# (cosine): as the attention's LoRA moves a token's hidden state, the router can send it to
# another expert, and the loss jumps for a step (0.01 -> 0.7 at step 86 of a constant-lr run);
# a constant-lr run that ends on such a step leaves one answer token unlearned (a CI machine
# did: rank 275). With the decay the last 30 steps barely move the weights and the loss is flat.
MOE_LEARN = [
    *(a.replace("=constant", "=cosine") for a in LEARN[2:]),
    *("--lr", "3e-3", "--moe-aux-loss", "0.001"),
]
MOE_LEARN_STEPS = 100
# Short runs of the stages: every step logged, no checkpoints, no held-out split.
FEW = (
    "--batch-size 4 --grad-accum 1 --cutoff-len 128 --val-size 0 "
    "--set logging_steps=1 --set save_steps=1000 --set lr_scheduler_type=constant "
    "--set warmup_ratio=0"
).split()
# Three steps, one sample a step: the distributed tests.
SHORT = (
    "--max-steps 3 --batch-size 1 --grad-accum 1 --cutoff-len 64 --val-size 0 "
    "--set logging_steps=1 --set save_steps=1000"
).split()


# What must stay off a qwenft command's terminal while it loads models in its own process (issue
# 23, part 4; tests/test_quiet.py): transformers' weight-loading bar (any tqdm bar: "%|"), its
# advisory warnings, DeepSpeed's accelerator notice, bitsandbytes' kernel notice.
NOISE = (
    "Loading weights",
    "%|",
    "it/s]",
    "Setting accelerator",
    "The attention mask is not set",
    "[transformers]",
    "gemm_4bit_forward",
    "Warning:",
)


def assert_quiet(output: str, what: str) -> None:
    found = [n for n in NOISE if n in output]
    assert not found, f"{what} printed {found}:\n{output[-3000:]}"


class Qwenft:
    """Runs `python -m qwenft ARGS` in a child with the real llamafactory-cli (no stand-in).

    `home` pins QWENFT_HOME and `cwd` the working folder; None keeps the caller's (a test's own,
    from the autouse `isolated` fixture)."""

    def __init__(self, home: Path | None = None, cwd: Path | None = None) -> None:
        self.home = home
        self.cwd = cwd

    @property
    def env(self) -> dict[str, str]:
        return env_without_fake(**({"QWENFT_HOME": str(self.home)} if self.home else {}))

    def argv(self, *args: object) -> list[str]:
        return [sys.executable, "-m", "qwenft", *map(str, args)]

    def __call__(
        self, *args: object, timeout: int = 900, check: bool = True
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.cwd,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"qwenft {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
            )
        return proc

    def popen(self, *args: object, **kw: object) -> subprocess.Popen:
        """Start `qwenft ARGS` without waiting (kw go to Popen: stdout, stderr, text...)."""
        return subprocess.Popen(self.argv(*args), env=self.env, cwd=self.cwd, **kw)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in trainer_log(run_dir) if "loss" in r]


def trainer_log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "trainer_log.jsonl").read_text().splitlines()]


def manifest(run_dir: Path) -> dict:
    """The run's qwenft.json as qwenft reads it: the paths inside the folder (stored relative to
    it) resolved against it, so absolute. The raw file: json.loads of RUN/qwenft.json."""
    from qwenft.runs.manifest import read_manifest

    return read_manifest(run_dir).to_dict()


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A private copy of a shared run folder, for a test that writes into it (merge, eval)."""
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_ready(qwenft: Qwenft, run: Path, port: int, log: Path) -> subprocess.Popen:
    """`qwenft serve RUN --port PORT` started, once it says it is ready (its stderr into log)."""
    proc = qwenft.popen(
        "serve", run, "--port", port, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True
    )  # noqa: SIM115
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 240
    got: list[str] = []
    while not any(x.startswith("press Ctrl-C") for x in got):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            got.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    return proc


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request over a connection of its own, Host as given in headers (else 127.0.0.1:port):
    (status, headers in lower case, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            method, path, body=body, headers={"Host": f"127.0.0.1:{port}", **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
