"""End to end with the real LLaMA-Factory, transformers, torchrun and DeepSpeed on CPU.

Each test runs `python -m qwenft ...` as a user would, on the embedded tiny Qwen models (real Qwen
vocabulary, random weights)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import QA, env_without_fake, write_jsonl

pytestmark = pytest.mark.e2e


def qwenft(*args: object, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "qwenft", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_without_fake(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"qwenft {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "qwenft.json").read_text())


# A few quick steps: enough to prove a pipeline runs.
QUICK = (
    "--max-steps 4 --batch-size 2 --grad-accum 1 --cutoff-len 128 --val-size 0 "
    "--set logging_steps=1 --set save_steps=1000"
).split()
# Makes the tiny model learn the 4 QA rows (FACTS.md): rank-32 LoRA on all linears, lr 5e-3
# constant; by 80 steps the loss has fallen >100x and greedy answers are the trained ones.
LEARN = (
    "--lr 5e-3 --batch-size 4 --grad-accum 1 --lora-rank 32 --cutoff-len 128 --val-size 0 "
    "--set lora_alpha=64 --set lr_scheduler_type=constant --set warmup_ratio=0 "
    "--set logging_steps=5 --set save_steps=1000"
).split()


def test_lora_learns_then_merge_then_chat(tiny_home: Path, chat_file: Path) -> None:
    run = Path("runs/lora").absolute()
    qwenft(
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "lora",
        "--data",
        chat_file,
        "-o",
        run,
        "--max-steps",
        "80",
        *LEARN,
    )
    curve = losses(run)
    assert all(math.isfinite(x) and x > 0 for x in curve), curve
    assert curve[-1] <= curve[0] / 2, curve
    m = manifest(run)
    assert m["status"] == "completed" and m["final_loss"] == curve[-1]
    assert m["tokens_per_second"] > 0  # LLaMA-Factory's effective (non-pad) tokens/s
    assert m["summary"]["global_step"] == 80
    assert (run / "adapter_model.safetensors").is_file() and (run / "train.log").stat().st_size > 0

    out = qwenft("merge", run, "--verify")
    assert "ends on a stop token" in out.stderr  # the trained answer ends with <|im_end|>
    m = manifest(run)
    assert m["merge_checks"]["generation"]["stopped"] is True
    assert m["merge_checks"]["verify_max_abs_logit_diff"] < 1e-3
    merged = run / "merged"
    assert (merged / "model.safetensors").is_file()
    gen = json.loads((merged / "generation_config.json").read_text())
    assert {151645, 151643} <= set(gen["eos_token_id"])
    assert (merged / "chat_template.jinja").is_file() or "chat_template" in (
        merged / "tokenizer_config.json"
    ).read_text()

    question, answer = QA[0]
    out = qwenft("chat", run, "--prompt", question, "--max-new-tokens", "30")
    assert out.stdout.strip() == answer, out.stdout
    # base + adapter (unmerged) gives the same greedy answer
    out2 = qwenft(
        "chat", "tiny-qwen2", "--adapter", run, "--prompt", question, "--max-new-tokens", "30"
    )
    assert out2.stdout.strip() == answer


def test_qlora_4bit_trains_then_merges(tiny_home: Path, chat_file: Path) -> None:
    run = Path("runs/qlora").absolute()
    qwenft(
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "qlora",
        "--data",
        chat_file,
        "-o",
        run,
        *QUICK,
    )
    log = (run / "train.log").read_text()
    assert "Quantizing model to 4 bit" in log  # bnb really used, not silently plain LoRA
    assert all(math.isfinite(x) for x in losses(run))
    qwenft("merge", run)
    assert (run / "merged" / "model.safetensors").is_file()
    assert manifest(run)["merged"] == str(run / "merged")


def test_tiny_qwen3_uses_qwen3_template(tiny_home: Path, chat_file: Path) -> None:
    run = Path("runs/q3").absolute()
    qwenft("train", "--model", "tiny-qwen3", "--data", chat_file, "-o", run, *QUICK)
    m = manifest(run)
    assert m["template"] == "qwen3" and m["enable_thinking"] is False
    assert "template: qwen3\n" in (run / "train.yaml").read_text()
    assert all(math.isfinite(x) for x in losses(run))


def test_sigterm_stops_every_worker_and_marks_interrupted(tiny_home: Path, chat_file: Path) -> None:
    import psutil

    run = Path("runs/int").absolute()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwenft",
            "train",
            "--model",
            "tiny-qwen2",
            "--method",
            "full",
            "--gpus",
            "2",
            "--deepspeed",
            "none",
            "--data",
            str(chat_file),
            "-o",
            str(run),
            "--max-steps",
            "100000",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--val-size",
            "0",
            "--cutoff-len",
            "64",
            "--set",
            "logging_steps=1",
            "--set",
            "save_steps=100000",
        ],
        env=env_without_fake(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "trainer_log.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(1)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(run) in " ".join(p.info["cmdline"] or []) and p.pid != proc.pid
    ]
    assert len(workers) >= 3  # llamafactory-cli, torchrun, and its two workers
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    time.sleep(1)
    alive = [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert manifest(run)["status"] == "interrupted"


def test_repeat_run_reuses_tokenized_data(tiny_home: Path, chat_file: Path) -> None:
    runs = [Path(f"runs/tok{i}").absolute() for i in range(3)]
    qwenft("train", "--model", "tiny-qwen2", "--data", chat_file, "-o", runs[0], *QUICK)
    qwenft("train", "--model", "tiny-qwen2", "--data", chat_file, "-o", runs[1], *QUICK)
    qwenft(
        "train",
        "--model",
        "tiny-qwen2",
        "--data",
        chat_file,
        "-o",
        runs[2],
        *QUICK[:6],
        "--cutoff-len",
        "96",
        *QUICK[8:],
    )
    first, second, third = (manifest(r)["tokenized_cache"] for r in runs)
    assert (
        first["hit"] is False
        and "Tokenized dataset is saved" in (runs[0] / "train.log").read_text()
    )
    assert second == {"path": first["path"], "hit": True}
    assert "Loaded tokenized dataset from" in (runs[1] / "train.log").read_text()
    assert "Running tokenizer on dataset" not in (runs[1] / "train.log").read_text()
    assert third["path"] != first["path"] and third["hit"] is False
    assert all(manifest(r)["status"] == "completed" for r in runs)


def test_overlength_warn_drop_fail(tiny_home: Path, tmp_path: Path) -> None:
    long_answer = " ".join(f"word{i}" for i in range(200))
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]
    rows.insert(
        1,
        {
            "messages": [
                {"role": "user", "content": "Tell me a long story."},
                {"role": "assistant", "content": long_answer},
            ]
        },
    )
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    base = ["--model", "tiny-qwen2", "--data", data, *QUICK[:6], "--cutoff-len", "64", *QUICK[8:]]

    failed = qwenft("train", *base, "-o", "runs/fail", "--overlength", "fail", check=False)
    assert failed.returncode == 2 and "1 sample(s) exceed cutoff_len 64 (lines 2)" in failed.stderr
    assert not Path("runs/fail").exists()

    warned = qwenft("train", *base, "-o", "runs/warn")
    assert "1 sample(s) exceed cutoff_len 64 and lose" in warned.stderr
    record = manifest(Path("runs/warn"))["overlength"]
    assert record["n_over_cutoff"] == 1 and record["tokens_cut"] > 300

    qwenft("train", *base, "-o", "runs/drop", "--overlength", "drop")
    m = manifest(Path("runs/drop"))
    assert (m["overlength"]["kept"], m["overlength"]["dropped"]) == (4, 1)
    filtered = Path("runs/drop/data.fit.jsonl")
    assert len(filtered.read_text().splitlines()) == 4 and long_answer not in filtered.read_text()
    assert m["overlength"]["filtered_sha256"] != m["dataset"]["sha256"]
    assert m["dataset"]["train_path"] == str(filtered.absolute())
    assert m["status"] == "completed"
