"""Tokenizing on every core: the work cut into parts, each tokenized by a worker process with its
own tokenizer on one core (for a Qwen tokenizer, the piece encoder: qwenft.data.piece_bpe).

A part is a run of whole batches (LLaMA-Factory's map batches when qwenft writes the tokenized
dataset, qwenft.data.prepare): KTO's KL pairs and pt's packed blocks depend only on the batches,
so any number of workers gives the same rows. Results come back in the parts' order.

How many workers: the run's `preprocessing_num_workers` (the recipe's, or `--data-workers`), at
most the cores this process may run on; below MIN_BYTES_FOR_WORKERS of data, where workers cost
more than they save, one process tokenizes in-process (with the Rust tokenizer's threads). This
process builds the encoder (and reads the rows) once and the workers are forked from it, so they
share its tokenizer and rows instead of each starting an interpreter and loading one (about 2
CPU-seconds a worker). A fork is safe here: the tokenizers library turns its thread pool off in a
child forked after the pool ran (its own at-fork handler), a worker that never saw it runs it on
one thread (RAYON_NUM_THREADS), and a worker touches nothing but the encoder and its own output
file. Where fork does not exist, workers are spawned and build their own. The workers are
children of this process, which waits for them: their CPU time is its children's.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from qwenft.errors import QwenftError

# Below MIN_BYTES_FOR_WORKERS of data one process tokenizes, in-process, with the Rust tokenizer's
# threads on every core. Workers, each a core, encode with the piece encoder (qwenft.data.piece_bpe,
# for a Qwen tokenizer), which needs less than half the CPU. Measured on 2 cores (the fewest that
# have workers, where they gain least), 1 KB chat samples, one process against 2 forked workers,
# best of 3: 0.93 s against 0.86 s at 2 MB, 1.15 against 0.97 at 4 MB, 1.62 against 1.24 at 8 MB,
# 2.53 against 1.61 at 16 MB, 4.53 against 2.49 at 32 MB. Each worker gets at least
# MIN_BYTES_PER_WORKER.
MIN_BYTES_FOR_WORKERS = 2_000_000
MIN_BYTES_PER_WORKER = 1_000_000
PART_ROWS = 20_000  # the most rows of a part: what one task holds in memory, one file it writes

_encoder: Any = None  # a worker process's encoder (this process's, forked; or built by _start)


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def one_thread() -> bool:
    """Whether the Rust tokenizer runs on one thread here: in a worker (_start), in a process
    allowed one core, or with the tokenizers library's parallelism turned off."""
    if os.environ.get("RAYON_NUM_THREADS") == "1" or cores() == 1:
        return True
    switch = os.environ.get("TOKENIZERS_PARALLELISM")  # the library's own reading of it
    return switch is not None and switch.lower() in ("", "off", "false", "f", "no", "n", "0")


def worker_count(requested: int | None, data_bytes: int) -> int:
    """Worker processes for data_bytes of data: the requested number (preprocessing_num_workers),
    at most the cores and one per MIN_BYTES_PER_WORKER; 1 (in-process) below
    MIN_BYTES_FOR_WORKERS."""
    if data_bytes < MIN_BYTES_FOR_WORKERS:
        return 1
    return max(1, min(requested or 1, cores(), data_bytes // MIN_BYTES_PER_WORKER))


def cut_parts(batches: list[Any], sizes: list[int], workers: int) -> list[list[Any]]:
    """Consecutive batches (of sizes rows each) cut into parts of about equal rows: a multiple of
    `workers` parts (so each worker gets as many), each of at most PART_ROWS rows where the
    batches allow. No batches: one empty part."""
    total = sum(sizes)
    count = min(len(batches), workers * math.ceil(total / (workers * PART_ROWS))) or 1
    parts: list[list[Any]] = [[]]
    done = 0
    for batch, size in zip(batches, sizes, strict=True):
        if parts[-1] and done + size / 2 > total * len(parts) / count:  # its middle is past
            parts.append([])
        parts[-1].append(batch)
        done += size
    return parts


def _start(build: Callable[[], Any] | None) -> None:
    """A worker's initializer: its tokenizer on one thread (the processes are the parallelism);
    a spawned worker builds its own encoder (a forked one has this process's)."""
    global _encoder
    os.environ["RAYON_NUM_THREADS"] = "1"
    if build is None:
        return
    try:
        _encoder = build()
    except Exception as exc:  # noqa: BLE001 - each task raises it: the caller learns why
        _encoder = exc


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    if isinstance(_encoder, Exception):
        raise _encoder
    return fn(_encoder, *args)


def run_parts(
    fn: Callable[..., Any],
    tasks: Iterable[tuple],
    workers: int,
    build: Callable[[], Any],
) -> Iterator[Any]:
    """fn(made, *task) of each task, in the tasks' order, where made is what build() makes: an
    encoder, or an encoder with the rows the tasks name (qwenft.data.prepare). With workers > 1 in
    that many worker processes (fn and build must pickle: module functions, a DataSpec's bound
    `encoder` in a functools.partial), each with what build() made in this process before they
    were forked, or (spawned) its own; else in this process, with one.

    At most two tasks per worker are queued ahead. If a task fails, or the caller stops early,
    the queued tasks are cancelled and the running ones finished before this returns or raises:
    nothing a worker writes outlives the call. A worker that dies is a QwenftError."""
    global _encoder
    if workers <= 1:
        encoder = build()
        for args in tasks:
            yield fn(encoder, *args)
        return
    if "fork" in multiprocessing.get_all_start_methods():
        context, _encoder, build = multiprocessing.get_context("fork"), build(), None
    else:  # pragma: no cover - not Linux
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(build,))
    pending: deque = deque()
    try:
        for args in tasks:
            pending.append(pool.submit(_call, fn, args))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise QwenftError(
            "a tokenizing worker process died (killed, or out of memory); nothing was written",
            "run again; --data-workers 1 tokenizes in one process",
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _encoder = None
