"""A quiet, informative terminal (issue 11, items 2, 3, 6): what `qwenft train` prints on stdout and
stderr, the progress line, what it surfaces from a failed log, and the loss watch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.builders import write_checkpoint
from tests.helpers.cli import invoke

# Command-building tests use config-only model folders (no tokenizer): the length measurement is
# stubbed (tests/conftest.py), the end-to-end tests run it for real (test_e2e.py, overlength).
pytestmark = pytest.mark.usefixtures("no_token_stats")


def test_train_stdout_is_the_run_folder_and_the_rest_is_stderr(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r")
    assert result.exit_code == 0, result.output
    run_dir = Path("r").absolute()
    assert result.stdout == f"{run_dir}\n"  # RUN=$(qwenft train ...) works
    err = result.stderr
    assert err.startswith(
        f"lora fine-tune of {local_model} (template qwen) on chat.jsonl: 4 samples"
    )
    assert f"log: {run_dir / 'train.log'}" in err and "starting LLaMA-Factory ..." in err
    assert "step 2/2 100% | loss 2.0000" in err  # the progress line, from trainer_log.jsonl
    assert "done: 2 steps" in err and f"next: qwenft merge {run_dir}" in err
    # LLaMA-Factory's own output only in the log (no -v)
    assert "fake llamafactory-cli" not in result.output
    assert "fake llamafactory-cli train" in (run_dir / "train.log").read_text()
    verbose = invoke("train", "--model", local_model, "--data", chat_file, "-o", "v", "-v")
    assert verbose.exit_code == 0, verbose.output
    assert verbose.stdout == f"{Path('v').absolute()}\n"
    assert "fake llamafactory-cli train" in verbose.stderr and "launching: " in verbose.stderr


def test_full_run_suggests_chat_not_merge(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke(
        "train", "--method", "full", "--model", local_model, "--data", chat_file, "-o", "f"
    )
    assert result.exit_code == 0, result.output
    assert "qwenft merge" not in result.stderr
    assert f"next: qwenft chat {Path('f').absolute()}" in result.stderr


def test_failed_training_surfaces_what_matters_in_the_log(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LF_EXIT", "1")
    monkeypatch.setenv(
        "FAKE_LF_SAY",
        'loading...\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    )
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r")
    assert result.exit_code == 1
    log = Path("r/train.log").absolute()
    assert f"from {log}:" in result.stderr
    assert (
        "  torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in result.stderr
    )
    assert "loading..." not in result.stderr and result.stdout == ""
    # no checkpoint was written: no resume command that would then fail
    assert "no checkpoint was written" in result.stderr and "qwenft resume" not in result.stderr


def test_interrupted_before_the_first_checkpoint_says_so(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft.errors import Interrupted

    def stopped(*args: object, **kw: object) -> int:
        raise Interrupted("stopped by SIGINT")

    monkeypatch.setattr("qwenft.proc.launcher.run", stopped)
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "-o", "r", "--max-steps", "40"
    )
    assert result.exit_code == 130, result.output
    assert "no checkpoint was written (the first was due at step 4)" in result.stderr
    assert "start again with the same `qwenft train` command" in result.stderr
    assert "qwenft resume" not in result.stderr
    assert json.loads(Path("r/qwenft.json").read_text())["status"] == "interrupted"
    write_checkpoint(Path("r"), 4)
    from qwenft.train import _resume_hint

    assert _resume_hint(Path("r")) == "resume with: qwenft resume r"


def test_progress_plain_lines_and_terminal_line(tmp_path: Path) -> None:
    import io

    from qwenft.runs.progress import TrainProgress, progress_line

    assert progress_line(37, 120, 1.23456, 9.5e-5, 1234.4, 70, 135) == (
        "step 37/120 30% | loss 1.2346 | lr 9.50e-05 | 1,234 tok/s | 1:10 elapsed | ETA 2:15"
    )
    assert progress_line(None, None) == "step -"
    assert progress_line(5, 10, eval_loss=0.5, elapsed_s=3725) == (
        "step 5/10 50% | eval loss 0.5000 | 1:02:05 elapsed"
    )

    def feed(tty: bool) -> str:
        run = tmp_path / ("tty" if tty else "plain")
        run.mkdir()
        log, rows = run / "train.log", run / "trainer_log.jsonl"
        now = [0.0]
        out = io.StringIO()
        progress = TrainProgress(run, log, out, tty=tty, clock=lambda: now[0], min_gap_s=5)
        log.write_text("[INFO] Loading dataset d.jsonl...\nRunning tokenizer on dataset: 1/4\n")
        now[0] = 2
        progress()
        with log.open("a") as fh:
            fh.write("***** Running training *****\n  Total optimization steps = 10\n")
            fh.write("  0%|   | 0/10 [00:00<?, ?it/s]")
        now[0] = 4
        progress()
        for step, t in ((2, 6), (4, 8), (6, 12)):
            with rows.open("a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "current_steps": step,
                            "total_steps": 10,
                            "loss": 4.0 / step,
                            "lr": 1e-4,
                            "elapsed_time": f"0:00:{t:02d}",
                            "throughput": 500.0,
                            "total_tokens": 100 * step,
                        }
                    )
                    + "\n"
                )
            with log.open("a") as fh:
                fh.write(f" {step * 10}%|   | {step}/10 [00:0{step}<00:10]")
            now[0] = t
            progress()
        with log.open("a") as fh:
            fh.write(" 100%|   | 10/10 [00:14<00:00] Saving model checkpoint to r/checkpoint-10\n")
        progress.close()
        return out.getvalue()

    plain = feed(tty=False).splitlines()
    assert plain[:3] == ["starting LLaMA-Factory ...", "tokenizing the data ...", "training ..."]
    # a line per new loss point, at most every min_gap_s (step 4 came 2 s after step 2), the end
    assert [ln.split(" | ")[0] for ln in plain[3:]] == [
        "step 2/10 20%",
        "step 6/10 60%",
        "step 10/10 100%",
    ]
    assert (
        plain[3]
        == "step 2/10 20% | loss 2.0000 | lr 1.00e-04 | 500 tok/s | 0:06 elapsed | ETA 0:08"
    )
    assert "\r" not in "".join(plain)
    tty = feed(tty=True)
    assert tty.startswith("\rstarting LLaMA-Factory ...\x1b[K\rtokenizing the data ...\x1b[K")
    assert "\rstep 4/10 40% | loss 1.0000" in tty
    assert tty.endswith(
        "\rstep 10/10 100% | loss 0.6667 | lr 1.00e-04 | 500 tok/s | 0:12 elapsed\x1b[K\n"
    )
    assert tty.count("\n") == 1


def test_progress_after_resume_counts_only_this_launch(tmp_path: Path) -> None:
    import io

    from qwenft.runs.progress import TrainProgress, tokens_per_second

    rows = tmp_path / "trainer_log.jsonl"
    old = {"current_steps": 4, "total_steps": 8, "loss": 9.0, "total_tokens": 400}
    rows.write_text(json.dumps(old) + "\n")
    out = io.StringIO()
    progress = TrainProgress(tmp_path, tmp_path / "train.log", out, tty=False)
    assert progress.resumed
    new = [
        {
            "current_steps": 6,
            "total_steps": 8,
            "loss": 1.5,
            "elapsed_time": "0:00:02",
            "throughput": 999.0,
            "total_tokens": 600,
        },
        {
            "current_steps": 8,
            "total_steps": 8,
            "loss": 1.0,
            "elapsed_time": "0:00:06",
            "throughput": 999.0,
            "total_tokens": 800,
        },
    ]
    with rows.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in new)
    progress.close()
    assert "step 8/8 100% | loss 1.0000 | 50 tok/s" in out.getvalue()  # (800-600) / (6-2)
    assert tokens_per_second(new, resumed=False) == 999.0
    assert tokens_per_second([], resumed=True) is None


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (
            'step 1\nTraceback (most recent call last):\n  File "a.py", line 3, in f\n    x()\n'
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\nbye\n",
            ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"],
        ),
        (
            '[rank0]: Traceback (most recent call last):\n[rank0]:   File "b.py"\n'
            "[rank0]: ModuleNotFoundError: No module named 'deepspeed'\n",
            ["ModuleNotFoundError: No module named 'deepspeed'"],
        ),
        (
            "{'loss': 2.1, 'grad_norm': 1.0}\n{'loss': nan, 'grad_norm': nan}\n",
            ["{'loss': nan, 'grad_norm': nan}"],
        ),
        (
            "ok\r 50%|##  | 5/10\nKilled\n",
            ["Killed"],
        ),
        (
            'Traceback (most recent call last):\n  File "c.py"\nValueError: first\n\n'
            'Traceback (most recent call last):\n  File "d.py"\n'
            "ValueError: Cannot find valid samples, check `data/README.md` for the data format.\n",
            ["ValueError: Cannot find valid samples, check `data/README.md` for the data format."],
        ),
        ("all went well\n", []),
    ],
)
def test_log_findings(log: str, expected: list[str]) -> None:
    from qwenft.runs.progress import log_findings

    assert log_findings(log) == expected


def test_surface_log_falls_back_to_the_tail(tmp_path: Path) -> None:
    from qwenft.runs.progress import surface_log

    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)) + "a\rb\r")
    said: list[str] = []
    surface_log(log, said.append)
    assert said == [f"the end of {log}:", "  line 17", "  line 18", "  line 19", "  a", "  b"]
    surface_log(tmp_path / "missing.log", said.append)
    assert len(said) == 6


def test_loss_watch_stops_nan_and_zero(tmp_path: Path) -> None:
    from qwenft.runs.watch import LossWatch

    log = tmp_path / "trainer_log.jsonl"
    watch = LossWatch(tmp_path, patience=3)
    assert watch() is None
    log.write_text(
        "".join(json.dumps({"loss": x}) + "\n" for x in (2.0, float("nan"), float("nan")))
    )
    assert watch() is None  # only two in a row
    log.write_text(log.read_text() + json.dumps({"loss": float("nan")}) + "\n")
    assert "NaN" in watch()
    log.write_text("".join(json.dumps({"loss": x}) + "\n" for x in (1.0, 0.0, 0.0, 0.0)))
    assert "exactly 0" in watch()
