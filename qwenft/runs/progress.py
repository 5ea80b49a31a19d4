"""What a person sees while LLaMA-Factory runs: qwenft's own progress line, and the lines of its log
that matter when something went wrong.

LLaMA-Factory's own output goes to the run's log file (qwenft -v streams it to stderr too).
TrainProgress is polled through launcher.run's `monitor`: it follows the log for the phases before
the first step (reading the data, tokenizing, loading the model) and the trainer's step counter,
and trainer_log.jsonl (one row per logging step) for loss, learning rate and real tokens/s. On a
terminal it keeps one line rewritten with \\r; otherwise it prints plain lines: each phase, and a
progress line when a new loss point arrives (at most every `min_gap_s`) or a minute has passed.

Real tokens/s: the recipes set `include_num_input_tokens_seen: non_padding`, so every row carries
LLaMA-Factory's `throughput` (non-padding tokens since training began) and `total_tokens`. After a
resume the Trainer's token count continues from the checkpoint while LLaMA-Factory's clock restarts,
so there the rate is taken between the first and the last row of this launch instead.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from qwenft.runs.watch import read_trainer_log

# Markers in LLaMA-Factory's / transformers' output, and what qwenft says; the latest one wins.
PHASES = (
    ("Loading dataset", "reading the data"),
    ("Running tokenizer on dataset", "tokenizing the data"),
    ("Loaded tokenized dataset from", "reading the tokenized data (cached)"),
    ("loading weights file", "loading the model"),
    ("Loading checkpoint shards", "loading the model"),
    ("***** Running training *****", "training"),
    ("***** Running Evaluation *****", "evaluating on the held-out split"),
    ("Saving model checkpoint to", "saving a checkpoint"),
    ("Training completed", "saving the model"),
)
TRAINING = "training"
_TOTAL = re.compile(r"Total optimization steps = ([\d,]+)")
_OVERLAP = 256  # bytes kept from the previous read, so a marker split between reads is still seen


def clock_text(seconds: float | None) -> str:
    """1:02:03 / 2:03 (minutes:seconds under an hour); '-' when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(
    step: int | None,
    total: int | None,
    loss: float | None = None,
    lr: float | None = None,
    tokens_per_s: float | None = None,
    elapsed_s: float | None = None,
    eta_s: float | None = None,
    eval_loss: float | None = None,
    figures: dict[str, Any] | None = None,
) -> str:
    """`step 37/120 31% | loss 1.2345 | lr 9.50e-05 | 1,234 tok/s | 1:10 elapsed | ETA 2:15`;
    the parts that are unknown are left out. figures: a trainer_log row; a GRPO step shows its, after the
    loss: `reward 0.750 ± 0.46 | kl 0.0012 | completion 12.5 tokens`."""
    if step is not None and total:
        parts = [f"step {step}/{total} {100 * step // total}%"]
    else:
        parts = [f"step {step if step is not None else '-'}"]
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.4f}")
    if isinstance(eval_loss, int | float):
        parts.append(f"eval loss {eval_loss:.4f}")
    figures = figures or {}
    if isinstance(figures.get("reward"), int | float):
        spread = figures.get("reward_std")
        parts.append(
            f"reward {figures['reward']:.3f}"
            + (f" ± {spread:.2f}" if isinstance(spread, int | float) else "")
        )
    if isinstance(figures.get("kl"), int | float):
        parts.append(f"kl {figures['kl']:.4f}")
    if isinstance(figures.get("completions/mean_length"), int | float):
        parts.append(f"completion {figures['completions/mean_length']:.1f} tokens")
    if isinstance(lr, int | float):
        parts.append(f"lr {lr:.2e}")
    if isinstance(tokens_per_s, int | float) and tokens_per_s > 0:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    if elapsed_s is not None:
        parts.append(f"{clock_text(elapsed_s)} elapsed")
    if eta_s is not None:
        parts.append(f"ETA {clock_text(eta_s)}")
    return " | ".join(parts)


def _elapsed_s(text: Any) -> float | None:
    """LLaMA-Factory's elapsed_time ('0:01:10', '1 day, 2:03:04') in seconds."""
    if not isinstance(text, str):
        return None
    days = 0
    if "day" in text:
        head, _, text = text.partition(",")
        days = int(head.split()[0])
    try:
        h, m, s = (int(x) for x in text.strip().split(":"))
    except ValueError:
        return None
    return days * 86400 + h * 3600 + m * 60 + s


def tokens_per_second(rows: list[dict[str, Any]], resumed: bool) -> float | None:
    """Real (non-padding) tokens/s of this launch from its trainer_log rows (see the module doc)."""
    rows = [r for r in rows if isinstance(r.get("total_tokens"), int | float)]
    if not rows:
        return None
    if not resumed:
        value = rows[-1].get("throughput")
        return float(value) if isinstance(value, int | float) else None
    first, last = rows[0], rows[-1]
    t0, t1 = _elapsed_s(first.get("elapsed_time")), _elapsed_s(last.get("elapsed_time"))
    if t0 is None or t1 is None or t1 <= t0:
        return None
    return (last["total_tokens"] - first["total_tokens"]) / (t1 - t0)


class TrainProgress:
    """Polled while `llamafactory-cli train` runs (call it; then close()). See the module doc."""

    def __init__(
        self,
        run_dir: Path,
        log_path: Path,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        min_gap_s: float = 5.0,
        heartbeat_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        trainer: str = "LLaMA-Factory",
    ) -> None:
        """trainer: what starts the training, as the first line names it."""
        self.run_dir, self.log_path = Path(run_dir), Path(log_path)
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty, self.min_gap_s, self.heartbeat_s, self.clock = tty, min_gap_s, heartbeat_s, clock
        # A resumed run appends to the same files: only what this launch adds counts.
        self.skip_rows = len(read_trainer_log(self.run_dir))
        self.resumed = self.skip_rows > 0
        self.offset = self.log_path.stat().st_size if self.log_path.is_file() else 0
        self.tail = ""
        self.phase = f"starting {trainer}"
        self.total: int | None = None
        self.step: int | None = None
        self.rows: list[dict[str, Any]] = []
        self.started = clock()
        self.rate_from: tuple[float, int] | None = None  # (time, step) of the first step seen
        self.shown = ""  # what the terminal line shows now
        self.printed: tuple[int, int | None] = (0, None)  # (rows, step) of the last plain line
        self.last_print = -1e18
        self.closed = False
        self._show_phase()

    # ---------------------------------------------------------------- reading
    def _read_log(self) -> tuple[str, int]:
        """What the log gained since the last read, after the kept overlap; and where it starts."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return "", 0
        self.offset += len(data)
        start = len(self.tail)
        text = self.tail + data.decode("utf-8", errors="replace")
        self.tail = text[-_OVERLAP:]
        return text, start

    def _update_from_log(self, text: str, start: int = 0) -> None:
        """The latest event wins: a phase marker, or the trainer's step counter moving on."""
        events = [
            (pos, phase)
            for marker, phase in PHASES
            if (pos := text.rfind(marker)) >= 0 and pos + len(marker) > start
        ]
        totals = _TOTAL.findall(text)
        if totals:
            self.total = int(totals[-1].replace(",", ""))
        if self.total:
            bars = list(re.finditer(rf"(\d+)/{self.total} \[", text))
            if bars and int(bars[-1].group(1)) > (self.step or 0):
                self.step = int(bars[-1].group(1))
                events.append((bars[-1].start(), TRAINING))
        if events:
            self.phase = max(events)[1]

    def _update_from_rows(self) -> bool:
        rows = read_trainer_log(self.run_dir)[self.skip_rows :]
        new = len(rows) > len(self.rows)
        self.rows = rows
        steps = [r for r in rows if isinstance(r.get("current_steps"), int)]
        if steps:
            last = steps[-1]
            if self.step is None or last["current_steps"] >= self.step:
                self.step = last["current_steps"]
            if isinstance(last.get("total_steps"), int) and last["total_steps"] > 0:
                self.total = last["total_steps"]
            if new and "loss" in rows[-1]:
                self.phase = TRAINING
        return new

    def poll(self) -> None:
        """Read what is new in the log and trainer_log.jsonl, and show it."""
        self._update_from_log(*self._read_log())
        new_rows = self._update_from_rows()
        now = self.clock()
        if self.phase == TRAINING and self.rate_from is None:
            if self.step is not None or not self.resumed:  # a resume starts at its checkpoint
                self.rate_from = (now, self.step or 0)
        if self.step is None:
            self._show_phase()
            return
        line = self.line(now)
        if self.phase != TRAINING:  # a checkpoint, an evaluation, the final save
            line += f" | {self.phase} ..."
        if self.tty:
            self._rewrite(line)
        elif (new_rows and now - self.last_print >= self.min_gap_s) or (
            now - self.last_print >= self.heartbeat_s
        ):
            self._print(line, now)
            self.printed = (len(self.rows), self.step)

    def __call__(self) -> str | None:
        """launcher.run's monitor: show progress, never ask for a stop."""
        with contextlib.suppress(Exception):  # a display problem must never stop a training run
            self.poll()
        return None

    # ---------------------------------------------------------------- showing
    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        losses = [r for r in self.rows if isinstance(r.get("loss"), int | float)]
        evals = [r for r in self.rows if isinstance(r.get("eval_loss"), int | float)]
        last = losses[-1] if losses else {}
        eta = None
        if self.rate_from and self.step is not None and self.total:
            t0, s0 = self.rate_from
            if s0 < self.step < self.total and now > t0:
                eta = (self.total - self.step) * (now - t0) / (self.step - s0)
        return progress_line(
            self.step,
            self.total,
            loss=last.get("loss"),
            lr=last.get("lr"),
            tokens_per_s=tokens_per_second(self.rows, self.resumed),
            elapsed_s=now - self.started,
            eta_s=eta,
            eval_loss=evals[-1]["eval_loss"] if evals else None,
            figures=last,
        )

    def _show_phase(self) -> None:
        text = f"{self.phase} ..."
        if self.tty:
            self._rewrite(text)
        elif text != self.shown:
            self._print(text, None)
            self.shown = text

    def _rewrite(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        text = text[:width]
        if text == self.shown:
            return
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self.shown = text

    def _print(self, text: str, now: float | None) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        if now is not None:
            self.last_print = now

    def close(self) -> None:
        """After the child ended: a last look, then the line is finished (so what follows starts
        on its own line); a plain stream gets the last loss point if it was not printed. Once."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._update_from_log(*self._read_log())
            self._update_from_rows()
            self.phase = TRAINING
            if self.step is not None:
                line = self.line()
                if self.tty:
                    self._rewrite(line)
                elif (len(self.rows), self.step) != self.printed:
                    self._print(line, self.clock())
                    self.printed = (len(self.rows), self.step)
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = ""


class Monitor:
    """Several monitors polled as one (the first reason to stop wins); close() closes each."""

    def __init__(self, *parts: Callable[[], str | None]) -> None:
        self.parts = parts

    def __call__(self) -> str | None:
        for part in self.parts:
            reason = part()
            if reason:
                return reason
        return None

    def close(self) -> None:
        for part in self.parts:
            close = getattr(part, "close", None)
            if close:
                close()


# --------------------------------------------------------------------------------------------------
# the lines of a log that matter

_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")  # torchrun's per-worker prefix
_NOTABLE = (
    re.compile(r"CUDA out of memory|OutOfMemoryError|\bout of memory\b", re.IGNORECASE),
    re.compile(r"No module named|ModuleNotFoundError|ImportError"),
    re.compile(
        r"['\"]?(loss|grad_norm)['\"]?\s*[:=]\s*['\"]?(nan|inf)\b|\bNaN\b|\bnan (or|and) inf\b",
        re.IGNORECASE,
    ),
    re.compile(r"^Killed\b|SIGKILL|exitcode\s*:\s*-9\b|\bOOM killer\b"),
)


def log_findings(text: str, limit: int = 8) -> list[str]:
    """The lines of a log worth showing after a failure: out of memory, a missing package, NaN,
    a killed process, and the last line of the last Python traceback (the exception itself).
    In order, without repeats, at most `limit`, each shortened to 300 characters."""
    lines = [_PREFIX.sub("", ln).rstrip() for ln in re.split(r"[\r\n]+", text)]
    picked: list[int] = []
    for i, line in enumerate(lines):
        if any(p.search(line) for p in _NOTABLE):
            picked.append(i)
    tracebacks = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call")]
    if tracebacks:
        for j in range(tracebacks[-1] + 1, len(lines)):
            line = lines[j]
            if line and not line[0].isspace():
                picked.append(j)
                break
    out: list[str] = []
    for i in sorted(set(picked)):
        line = lines[i].strip()
        line = line if len(line) <= 300 else line[:297] + "..."
        if line and line not in out:
            out.append(line)
    return out[-limit:]


def log_tail(text: str, n: int = 5) -> list[str]:
    """The last n lines with text (progress bars' \\r-separated updates count as lines)."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return [ln if len(ln) <= 300 else ln[:297] + "..." for ln in lines[-n:]]


def read_end(path: Path, n_bytes: int) -> str:
    """The text of a log's last n_bytes (what a failed process said last); OSError if unreadable."""
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, 2) - n_bytes))
        return fh.read().decode("utf-8", errors="replace")


def surface_log(log_path: Path, progress: Callable[[str], None], tail_bytes: int = 256_000) -> None:
    """After a failure: print what matters in the log (else its last lines), naming the log."""
    try:
        text = read_end(log_path, tail_bytes)
    except OSError:
        return
    found = log_findings(text)
    lines = found or log_tail(text)
    if not lines:
        return
    progress(f"{'from' if found else 'the end of'} {log_path}:")
    for line in lines:
        progress(f"  {line}")
