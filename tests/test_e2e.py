"""End to end with the real LLaMA-Factory, transformers, torchrun and DeepSpeed on CPU.

Each test runs `python -m qwenft ...` as a user would, on the embedded tiny Qwen models (real Qwen
vocabulary, random weights). The trained LoRA run (`lora_run`) and the quick qlora / cutoff-96 runs
(`quick_runs`) are trained once per session (tests/conftest.py); a test that writes into one (merge)
works on a copy."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers.builders import QA, chat_rows, write_jsonl
from tests.helpers.e2e import (
    LEARN_STEPS,
    QUICK,
    Qwenft,
    assert_quiet,
    copy_run,
    losses,
    manifest,
)
from tests.helpers.learning import LM, assert_learned, trained_rows


def test_lora_learns(lora_run: Path) -> None:
    run = lora_run
    curve = losses(run)
    assert all(math.isfinite(x) and x > 0 for x in curve), curve
    assert curve[-1] <= curve[0] / 2, curve
    m = manifest(run)
    assert m["status"] == "completed" and m["final_loss"] == curve[-1]
    assert m["tokens_per_second"] > 0  # LLaMA-Factory's effective (non-pad) tokens/s
    assert m["summary"]["global_step"] == LEARN_STEPS == 80
    assert (run / "adapter_model.safetensors").is_file() and (run / "train.log").stat().st_size > 0


def test_trained_lora_merges_then_chats(
    merged_lora: Path, qwenft: Qwenft, chat_file: Path, tmp_path: Path
) -> None:
    run = merged_lora  # lora_run's copy, merged once with --verify (conftest)
    # the trained answer ends with <|im_end|>
    assert "ends on a stop token" in (run.parent / "merge.stderr").read_text()
    m = manifest(run)
    assert m["merge_checks"]["generation"]["stopped"] is True
    assert m["merge_checks"]["verify_max_abs_logit_diff"] < 1e-3
    merged = run / "merged"
    assert m["merged"] == str(merged)
    assert (merged / "model.safetensors").is_file()
    gen = json.loads((merged / "generation_config.json").read_text())
    assert {151645, 151643} <= set(gen["eos_token_id"])
    assert (merged / "chat_template.jinja").is_file() or "chat_template" in (
        merged / "tokenizer_config.json"
    ).read_text()

    # the merged model and base + adapter both learned the answers: every trained token ranked
    # first, with a logit margin (what makes the greedy answers the trained ones on any machine)
    rows = trained_rows(run, chat_file, tmp_path / "lf")
    for lm in (LM.of_run(run), LM.of_run(run, merged=False)):
        assert_learned(lm, rows)
    # `qwenft chat` answers with the merged model and with base + adapter (unmerged, peft): the
    # same greedy answer, which stops before the token limit; the terminal shows qwenft's lines
    # only, nothing of what loading the models prints (issue 23; test_quiet.py)
    question = QA[0][0]
    out = qwenft("chat", run, "--prompt", question, "--max-new-tokens", "30")
    said = out.stdout.strip()
    assert said and lm.n_tokens(said) < 30, out.stdout
    out2 = qwenft(
        "chat", "tiny-qwen2", "--adapter", run, "--prompt", question, "--max-new-tokens", "30"
    )
    assert out2.stdout.strip() == said
    for what, printed in (("chat RUN", out), ("chat --adapter", out2)):
        assert_quiet(printed.stdout + printed.stderr, what)


def test_qlora_4bit_trains_then_merges(
    quick_runs: dict[str, Path], qwenft: Qwenft, tmp_path: Path
) -> None:
    run = copy_run(quick_runs["qlora"], tmp_path / "qlora")
    log = (run / "train.log").read_text()
    assert "Quantizing model to 4 bit" in log  # bnb really used, not silently plain LoRA
    assert manifest(run)["method"] == "qlora"
    assert all(math.isfinite(x) for x in losses(run))
    qwenft("merge", run)
    assert (run / "merged" / "model.safetensors").is_file()
    assert manifest(run)["merged"] == str(run / "merged")


def test_tiny_qwen3_uses_qwen3_template(qwenft: Qwenft, chat_file: Path) -> None:
    # Also the terminal (issue 11): a 10-step run with no logging_steps/save_steps given.
    run = Path("runs/q3").absolute()
    ten = "--max-steps 10 --batch-size 2 --grad-accum 1 --cutoff-len 128 --val-size 0".split()
    out = qwenft("train", "--model", "tiny-qwen3", "--data", chat_file, "-o", run, *ten)
    m = manifest(run)
    assert m["template"] == "qwen3" and m["enable_thinking"] is False
    assert "template: qwen3\n" in (run / "train.yaml").read_text()
    assert all(math.isfinite(x) for x in losses(run))
    # RUN=$(qwenft train ...): stdout is the run folder and nothing else
    assert out.stdout == f"{run}\n"
    # the step settings follow the run's length: a loss point and a checkpoint every step
    assert len(losses(run)) == 10 and (run / "checkpoint-1" / "trainer_state.json").is_file()
    assert m["summary"]["first_loss"] is not None and m["summary"]["loss_plot"]
    # stderr: qwenft's lines (plan, phases, progress, summary); LLaMA-Factory's only in the log
    err = out.stderr
    assert err.startswith("lora fine-tune of tiny-qwen3 (template qwen3) on chat.jsonl: 4 samples")
    assert "10 steps of 2 samples" in err and "loss every step, checkpoint every step" in err
    assert "starting LLaMA-Factory ..." in err and "done: 10 steps" in err
    assert "step 10/10 100% | loss " in err and " tok/s | " in err
    for lf_line in ("[INFO|", "Running tokenizer", "***** Running training", "it/s]"):
        assert lf_line not in err, lf_line
        assert lf_line in (run / "train.log").read_text() or lf_line == "Running tokenizer"


def test_sigterm_stops_every_worker_and_marks_interrupted(qwenft: Qwenft, chat_file: Path) -> None:
    import psutil

    run = Path("runs/int").absolute()
    proc = qwenft.popen(
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "full",
        "--cpu-procs",
        "2",
        "--deepspeed",
        "none",
        "--data",
        chat_file,
        "-o",
        run,
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


def test_repeat_run_reuses_tokenized_data(lora_run: Path, quick_runs: dict[str, Path]) -> None:
    # three runs in one home on the same data: qwenft tokenizes the data of the trained LoRA run
    # before launching, and LLaMA-Factory loads it without preprocessing; the qlora run has the
    # same data arguments (the method is not part of the key) and reuses it; the cutoff-96 run
    # sets a tool_format, which qwenft does not reproduce: LLaMA-Factory tokenizes and caches it
    runs = [lora_run, quick_runs["qlora"], quick_runs["cutoff96"]]
    first, second, third = (manifest(r)["tokenized_cache"] for r in runs)
    logs = [(r / "train.log").read_text() for r in runs]
    assert first == {"path": first["path"], "hit": False, "by": "qwenft"}
    assert "Loaded tokenized dataset from" in logs[0]
    assert "Running tokenizer on dataset" not in logs[0]
    assert second == {"path": first["path"], "hit": True, "by": "qwenft"}
    assert "Loaded tokenized dataset from" in logs[1]
    assert "Running tokenizer on dataset" not in logs[1]
    assert third["path"] != first["path"]
    assert third == {"path": third["path"], "hit": False, "by": "llamafactory"}
    assert "Running tokenizer on dataset" in logs[2] and "Tokenized dataset is saved" in logs[2]
    assert (Path(third["path"]) / ".qwenft-complete").is_file()  # marked after LF saved it
    assert all(manifest(r)["status"] == "completed" for r in runs)


def test_overlength_warn_drop_fail(qwenft: Qwenft, tmp_path: Path) -> None:
    long_answer = " ".join(f"word{i}" for i in range(200))
    rows = chat_rows()
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
