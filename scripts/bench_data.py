#!/usr/bin/env python3
"""Data speed and memory (issues 3 and 15), measured side by side in one run.

1. Structural check (`qwenft data check`, no tokenizer) of a generated jsonl of --check-mb MB:
   throughput in MB/s and peak RSS of the checking process.
2. Tokenizing --samples chat samples of ~1 KB on tiny-qwen2 (the real Qwen vocabulary) into
   LLaMA-Factory's tokenized dataset: qwenft (qwenft.data.prepare.write_tokenized) against
   LLaMA-Factory's own preprocessing (get_dataset saving to `tokenized_path`, with as many
   preprocessing workers as cores), each in a fresh process with the same train.yaml data
   arguments; then both saved datasets are compared, every column of every sample.
3. `qwenft data check FILE --model tiny-qwen2` (structure and token statistics) on the same file,
   a fresh process, against the same LLaMA-Factory time.
Peak memory is the peak of the summed proportional set size of the whole process tree
(LLaMA-Factory's map workers included), sampled every 0.5 s. Each side runs --repeat times,
interleaved; the wall time is the median.

    .venv/bin/python scripts/bench_data.py              # 1 GB check, 100,000 samples
    .venv/bin/python scripts/bench_data.py --quick      # 100 MB, 10,000 samples

Writes docs/bench_data.json and prints a table. Run it on a quiet machine: the figures are wall
times of whole processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = (
    "model data train token qwen chat answer question helpful fine tune layer weight "
    "北京 数据 模型 训练 问题 回答 def return print list value"
).split()


def make_file(
    path: Path, n_rows: int | None = None, size_mb: float | None = None, seed: int = 0
) -> int:
    """Deterministic chat rows of ~1 KB (a system prompt on some, two turns on some)."""
    rng = random.Random(seed)
    rows = 0
    with open(path, "w", encoding="utf-8") as fh:
        while (n_rows is None or rows < n_rows) and (size_mb is None or fh.tell() < size_mb * 1e6):

            def text(n: int) -> str:
                return " ".join(rng.choice(WORDS) for _ in range(n))

            msgs = (
                [{"role": "system", "content": "You are a helpful assistant."}]
                if rows % 3 == 0
                else []
            )
            msgs += [
                {"role": "user", "content": f"{rows}: {text(40)}"},
                {"role": "assistant", "content": text(rng.randint(80, 140))},
            ]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
            rows += 1
    return rows


def natural_file(path: Path, n_rows: int, seed: int = 0) -> int:
    """Deterministic chat rows of natural text, for the piece encoder's side-by-side (the words
    file above repeats 24 words, the best case for remembering pieces): two in three rows English
    (windows of the docstrings and markdown of the installed transformers, torch.nn and datasets:
    prose, code, numbers), one in three Chinese (jieba's dictionary words drawn by frequency, no
    spaces, a run between two commas is one piece)."""
    import ast
    import bisect
    import importlib.util

    def folder(name: str) -> Path:
        return Path(importlib.util.find_spec(name).origin).parent

    docs = []
    for file in sorted(
        [
            *folder("transformers").glob("models/*/modeling_*.py"),
            *folder("torch").glob("nn/modules/*.py"),
            *folder("datasets").glob("*.py"),
        ]
    ):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    english = " \n".join(docs)
    words, totals = [], []
    total = 0
    for line in (folder("jieba") / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq, *_ = line.split()
        total += int(freq)
        words.append(word)
        totals.append(total)
    rng = random.Random(seed)

    def chinese(n: int) -> str:
        drawn = (words[bisect.bisect(totals, rng.random() * total)] for _ in range(n))
        return "".join(w + ("，" if rng.random() < 0.1 else "") for w in drawn)

    def window(n: int) -> str:
        start = rng.randrange(len(english) - n)
        return english[start : start + n]

    with open(path, "w", encoding="utf-8") as fh:
        for row in range(n_rows):
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] * (row % 3 == 0)
            if row % 3 == 2:
                turns = (chinese(40), chinese(rng.randint(80, 200)))
            else:
                turns = (window(300), window(rng.randint(500, 900)))
            msgs += [
                {"role": "user", "content": turns[0]},
                {"role": "assistant", "content": turns[1]},
            ]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return n_rows


def timed(code: str, *args: str) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of `python -c code args` in a fresh process: its own peak,
    read with wait4 (RUSAGE_CHILDREN would be the largest of every child so far, the tiny model's
    build included)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=out,
            stderr=err,
            text=True,
            cwd=ROOT,
            env={**os.environ, "LLAMAFACTORY_VERBOSITY": "WARN"},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(err.read()[-3000:])
        # DeepSpeed prints "Setting accelerator to CPU" on stdout while transformers loads: the
        # result is the last line.
        return wall, usage.ru_maxrss / 1024, out.read().strip().splitlines()[-1]


CHECK = """
import sys
from pathlib import Path
from qwenft.data.check import check_file
r = check_file(Path(sys.argv[1]))
print(r.n_samples, r.n_errors)
"""

# the train.yaml data arguments both sides tokenize with (an sft LoRA run's)
CONFIG = {
    "stage": "sft",
    "template": "qwen",
    "default_system": "You are a helpful assistant.",
    "seed": 42,
}

QWENFT = """
import json, sys
from pathlib import Path
from qwenft.data.prepare import write_tokenized
stats = write_tokenized(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]))
print(stats.n_samples)
"""

# The piece encoder against the Rust tokenizer on one thread, on the same formatted pieces (each
# map batch's texts, as the encoder plans them): CPU-seconds of each, the ids compared.
PIECES = """
import json, os, sys, time
os.environ["RAYON_NUM_THREADS"] = "1"
from qwenft.data.tokens import Encoded, LlamaFactoryEncoder, align, row_value
encoder = LlamaFactoryEncoder(sys.argv[2], "qwen", 1024, default_system="You are a helpful assistant.")
raws = open(sys.argv[1], "rb").read().splitlines()
cpu = {"rust": 0.0, "pieces": 0.0}
taken = total = 0
equal = True
for start in range(0, len(raws), 1000):
    plans, texts = encoder.plan_batch([align(row_value(r), "sft") for r in raws[start:start + 1000]])
    rest, stable, pieces = encoder.parts(texts)
    taken, total = taken + len(pieces), total + len(rest) + len(stable) + len(pieces)
    out = {}
    for name, parts in (("rust", (rest, stable + pieces, [])), ("pieces", (rest, stable, pieces))):
        t = time.process_time()
        encoded = Encoded(*encoder.encode_parts(parts))
        cpu[name] += time.process_time() - t
        out[name] = {k: encoded.flat[s:s + n].tobytes() for k, (s, n) in encoded.at.items()}
    equal = equal and out["rust"] == out["pieces"]
print(json.dumps({**{k: round(v, 2) for k, v in cpu.items()}, "taken": taken, "texts": total, "equal": equal}))
"""

LLAMAFACTORY = """
import json, os, sys, tempfile
from pathlib import Path
from qwenft.data.registry import register_dataset
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
from llamafactory.data import get_template_and_fix_tokenizer, get_dataset
d = tempfile.mkdtemp()
register_dataset(Path(sys.argv[1]), "bench", Path(d))
args = dict(json.loads(sys.argv[3]), do_train=True, model_name_or_path=sys.argv[2], dataset="bench",
            dataset_dir=d, finetuning_type="lora", output_dir=os.path.join(d, "out"),
            overwrite_cache=True, cache_dir=os.path.join(d, "cache"), report_to="none",
            tokenized_path=sys.argv[4])
model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
tm = load_tokenizer(model_args)
tpl = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
ds = get_dataset(tpl, model_args, data_args, training_args, stage="sft", **tm)
print(len(ds["train_dataset"]))
"""


def tree_run(argv: list[str], log: Path) -> tuple[float, float, str, float]:
    """(wall s, peak PSS MiB of the whole process tree, last output line, CPU-seconds of the tree:
    user + system of the process and every descendant it waited for, qwenft's spawned workers and
    LLaMA-Factory's map workers alike) of argv."""
    from qwenft.proc.launcher import run

    stats: dict = {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = run(
        argv, {"LLAMAFACTORY_VERBOSITY": "WARN"}, log, cwd=ROOT, stats=stats, sample_every_s=0.5
    )
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if code != 0:
        raise SystemExit(text[-3000:])
    peak = stats.get("peak_pss_bytes") or stats["peak_rss_bytes"]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, peak / 2**20, text.strip().splitlines()[-1], cpu


PROCS = (1, 2)  # preprocessing_num_workers of the compared runs; 1 runs on one core (taskset)
PROJECTED = (16, 64, 128)


def projection(t1: float, t2: float) -> dict:
    """Amdahl's law fitted to the walls with 1 and 2 processes: the serial part s = 2*t2 - t1
    (what did not halve: reading, splitting, merging, each process's start), the parallel part
    t1 - s, and the wall at each of PROJECTED cores, s + (t1 - s) / p."""
    serial = min(max(2 * t2 - t1, 0.0), t1)
    return {
        "serial_s": round(serial, 2),
        "parallel_s": round(t1 - serial, 2),
        **{str(p): round(serial + (t1 - serial) / p, 2) for p in PROJECTED},
    }


def same_datasets(a: Path, b: Path) -> tuple[bool, int]:
    """(both saved DatasetDicts have the same splits, features and every value; rows compared)."""
    from datasets import load_from_disk

    x, y = load_from_disk(str(a)), load_from_disk(str(b))
    if list(x) != list(y):
        return False, 0
    rows = 0
    for split in x:
        if x[split].features != y[split].features or len(x[split]) != len(y[split]):
            return False, rows
        for name in x[split].column_names:
            if not x[split].data.column(name).equals(y[split].data.column(name)):
                return False, rows
        rows += len(x[split])
    return True, rows


def markdown(r: dict) -> str:
    """The data section of docs/benchmarks.md."""
    c, t, n = r["check"], r["tokenize"], r["pieces"]
    q, lf = "qwenft", "llamafactory"
    met = {True: "yes", False: "no"}
    proj = " / ".join(f"{t[f'{q}_projection_s'][str(p)]} s" for p in PROJECTED)
    lf_proj = " / ".join(f"{t[f'{lf}_projection_s'][str(p)]} s" for p in PROJECTED)
    ratios = " / ".join(f"{t['projected_ratio'][str(p)]}x" for p in PROJECTED)
    return f"""## Data: checking and tokenizing

Generated by `scripts/bench_data.py` on {r["date"]} ({r["machine"]}, Python {r["python"]}, load
average {r["load_average_before"]} before, {r["load_average_after"]} after). Raw numbers:
[bench_data.json](bench_data.json). Both sides run in fresh processes, interleaved in one run, on
the same generated file of {t["samples"]:,} chat samples of ~1 KB (a third with a system prompt)
and the same train.yaml data arguments (`qwen` template, cutoff_len {t["cutoff_len"]}), with
`preprocessing_num_workers` 1 (run on one core, `taskset -c 0`: one process, no tokenizer
threads elsewhere) and 2 (both cores): qwenft's worker processes
(`qwenft.data.prepare.write_tokenized`) against LLaMA-Factory's `get_dataset` (datasets.map's
processes) saving to `tokenized_path`; the wall time is the whole process, start-up and writing
the dataset included. The two saved datasets at 2 processes are compared, every column of every
sample. Each run {t["repeat"]} times; medians (every run at 2 processes: qwenft
{t[f"{q}_walls_2p_s"]} s, LLaMA-Factory {t[f"{lf}_walls_2p_s"]} s). CPU-seconds: user + system of
the whole process tree (getrusage of the waited-for children). Memory: the peak of the summed
proportional set size of the process tree, sampled every 0.5 s.

The projection fits Amdahl's law to each side's walls at 1 and 2 processes: the serial part
s = 2 x t2 - t1 (whatever did not halve: reading the file, splitting, merging, each process's
start and the data sent to it), the parallel part t1 - s, and t(p) = s + (t1 - s) / p. It assumes
cores as fast as these, a serial part that does not grow with the processes (process starts run
in parallel; the data sent to them is the same in all), and no shared limit (memory bandwidth,
disk) reached before p cores.

| what | qwenft | LLaMA-Factory | ratio | target | met |
|---|---|---|---|---|---|
| CPU-seconds per 100,000 samples (2 processes) | {t[f"{q}_cpu_s_per_100k_2p"]} | \
{t[f"{lf}_cpu_s_per_100k_2p"]} | {t["cpu_ratio"]}x less | >= 3x | {met[t["cpu_ratio"] >= 3]} |
| wall, 1 process (one core) | {t[f"{q}_wall_1p_s"]} s | {t[f"{lf}_wall_1p_s"]} s | | | |
| wall, 2 processes | {t[f"{q}_wall_2p_s"]} s | {t[f"{lf}_wall_2p_s"]} s | {t["ratio"]}x \
faster | | |
| parallel efficiency t1 / (2 x t2) | {t[f"{q}_parallel_efficiency"]} | \
{t[f"{lf}_parallel_efficiency"]} | | >= 0.85 | {met[t[f"{q}_parallel_efficiency"] >= 0.85]} |
| projected wall at {" / ".join(map(str, PROJECTED))} cores | {proj} | {lf_proj} | {ratios} | \
>= 3x | {met[min(t["projected_ratio"].values()) >= 3]} |
| peak memory at 2 processes | {t[f"{q}_peak_pss_2p_mib"]} MiB | {t[f"{lf}_peak_pss_2p_mib"]} MiB \
| | < 1 GB | {met[t[f"{q}_peak_pss_2p_mib"] < 1000]} |
| memory growth per process (2 less 1) | {t[f"{q}_pss_growth_per_worker_mib"]} MiB | \
{t[f"{lf}_pss_growth_per_worker_mib"]} MiB | | | |
| arrays equal, sample by sample | {t["rows_compared"]:,} of {t["samples"]:,} compared | | | \
equal | {met[t["arrays_equal"]]} |
| `qwenft data check --model` (structure + token statistics) | {t["data_check_model_s"]} s | \
{t[f"{lf}_wall_s"]} s | {t["data_check_ratio"]}x faster | >= 3x | {met[t["data_check_ratio"] >= 3]} |
| structural check of a {c["mb"]} MB jsonl | {c["mb_per_s"]} MB/s, {c["peak_rss_mib"]} MiB peak \
RSS | | | >= 50 MB/s, < 300 MB | {met[c["mb_per_s"] >= 50 and c["peak_rss_mib"] < 300]} |

The benchmark's samples repeat 24 words: the best case for the piece encoder the workers use
(qwenft.data.piece_bpe), which remembers each piece's ids. On natural text ({n["samples"]:,}
samples: two in three English, windows of the installed transformers', torch.nn's and datasets'
docstrings; one in three Chinese, jieba's dictionary words by frequency, without spaces), the
same formatted texts of each map batch encoded on one thread: the piece encoder
{n["pieces_cpu_s"]} CPU-seconds against the Rust tokenizer's {n["rust_cpu_s"]} ({n["ratio"]}x
less; it took {n["texts_taken"]:,} of the {n["texts"]:,} texts, the rest went to the Rust
tokenizer in both), ids equal: {met[n["ids_equal"]]}.
""".replace("\\\n", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 MB and 10,000 samples")
    ap.add_argument("--check-mb", type=float, default=1000.0)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--cutoff-len", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side, interleaved")
    ap.add_argument("--natural-samples", type=int, default=30_000)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_data.json")
    args = ap.parse_args()
    if args.quick:
        args.check_mb, args.samples, args.natural_samples = 100.0, 10_000, 3_000

    from qwenft.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("tiny-qwen2", progress=None))
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jsonl"
        print(f"generating a {args.check_mb:.0f} MB file ...", flush=True)
        make_file(big, size_mb=args.check_mb)
        size_mb = big.stat().st_size / 1e6
        wall, rss, out = timed(CHECK, str(big))
        results["check"] = {
            "mb": round(size_mb, 1),
            "rows": int(out.split()[0]),
            "wall_s": round(wall, 2),
            "mb_per_s": round(size_mb / wall, 1),
            "peak_rss_mib": round(rss, 1),
        }
        print(f"structural check: {results['check']}", flush=True)
        big.unlink()

        data = Path(tmp) / "samples.jsonl"
        make_file(data, n_rows=args.samples, seed=1)
        runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for rep in range(args.repeat):  # interleaved: qwenft, LLaMA-Factory, qwenft, ...
            for procs in PROCS:
                config = json.dumps(
                    {**CONFIG, "cutoff_len": args.cutoff_len, "preprocessing_num_workers": procs}
                )
                for name, code in (("qwenft", QWENFT), ("llamafactory", LLAMAFACTORY)):
                    print(
                        f"tokenizing {args.samples}: {name}, {procs} proc ({rep + 1})", flush=True
                    )
                    out_dir = Path(tmp) / f"tokenized-{name}-{procs}"
                    shutil.rmtree(out_dir, ignore_errors=True)
                    argv = [sys.executable, "-c", code, str(data), model, config, str(out_dir)]
                    if procs == 1:  # one process on one core: no tokenizer threads elsewhere
                        argv = ["taskset", "-c", "0", *argv]
                    wall, pss, last, cpu = tree_run(argv, Path(tmp) / f"{name}.log")
                    if int(last) != args.samples:
                        raise SystemExit(f"{name} tokenized {last} samples, not {args.samples}")
                    runs.setdefault((name, procs), []).append((wall, pss, cpu))
        sides: dict[str, dict] = {}
        for (name, procs), measured in runs.items():
            wall = statistics.median(w for w, _, _ in measured)
            cpu = statistics.median(c for _, _, c in measured)
            side = sides.setdefault(name, {})
            side[f"wall_{procs}p_s"] = round(wall, 1)
            side[f"walls_{procs}p_s"] = [round(w, 1) for w, _, _ in measured]
            side[f"peak_pss_{procs}p_mib"] = round(max(m for _, m, _ in measured))
            side[f"cpu_s_per_100k_{procs}p"] = round(cpu * 100_000 / args.samples, 1)
        for side in sides.values():
            t1, t2 = side["wall_1p_s"], side["wall_2p_s"]
            side["parallel_efficiency"] = round(t1 / (2 * t2), 2)
            side["projection_s"] = projection(t1, t2)
            side["pss_growth_per_worker_mib"] = side["peak_pss_2p_mib"] - side["peak_pss_1p_mib"]
            side["wall_s"] = t2
            side["samples_per_s"] = round(args.samples / t2)
        print("comparing the two tokenized datasets ...", flush=True)
        equal, rows = same_datasets(
            Path(tmp) / "tokenized-qwenft-2", Path(tmp) / "tokenized-llamafactory-2"
        )
        check_argv = [
            sys.executable,
            "-m",
            "qwenft",
            "data",
            "check",
            str(data),
            "--model",
            "tiny-qwen2",
            "--template",
            "qwen",
            "--cutoff-len",
            str(args.cutoff_len),
        ]
        print("qwenft data check --model ...", flush=True)
        wall, pss, _, _ = tree_run(check_argv, Path(tmp) / "check.log")
        lf = sides["llamafactory"]["wall_s"]
        results["tokenize"] = {
            "samples": args.samples,
            "cutoff_len": args.cutoff_len,
            "repeat": args.repeat,
            **{f"{k}_{m}": v for k, side in sides.items() for m, v in side.items()},
            "ratio": round(lf / sides["qwenft"]["wall_s"], 2),
            "cpu_ratio": round(
                sides["llamafactory"]["cpu_s_per_100k_2p"] / sides["qwenft"]["cpu_s_per_100k_2p"], 2
            ),
            "projected_ratio": {
                str(p): round(
                    sides["llamafactory"]["projection_s"][str(p)]
                    / sides["qwenft"]["projection_s"][str(p)],
                    2,
                )
                for p in PROJECTED
            },
            "arrays_equal": equal,
            "rows_compared": rows,
            "data_check_model_s": round(wall, 1),
            "data_check_model_peak_pss_mib": round(pss),
            "data_check_ratio": round(lf / wall, 2),
        }
        print(f"tokenize: {results['tokenize']}", flush=True)

        natural = Path(tmp) / "natural.jsonl"
        natural_file(natural, args.natural_samples)
        print(f"piece encoder vs Rust tokenizer, {args.natural_samples} natural samples ...")
        _, _, out = timed(PIECES, str(natural), model)
        pieces = json.loads(out)
        results["pieces"] = {
            "samples": args.natural_samples,
            "rust_cpu_s": pieces["rust"],
            "pieces_cpu_s": pieces["pieces"],
            "ratio": round(pieces["rust"] / pieces["pieces"], 2),
            "texts_taken": pieces["taken"],
            "texts": pieces["texts"],
            "ids_equal": pieces["equal"],
        }
        print(f"pieces: {results['pieces']}", flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.out.parent == ROOT / "docs":
        from bench_report import DATA_SECTION, replace_section

        replace_section(ROOT / "docs" / "benchmarks.md", DATA_SECTION, markdown(results))
    c, t = results["check"], results["tokenize"]
    print("\n| what | figure | target |\n|---|---|---|")
    print(f"| structural check, {c['mb']} MB | {c['mb_per_s']} MB/s | >= 50 MB/s |")
    print(f"| peak RSS of that check | {c['peak_rss_mib']} MiB | < 300 MB |")
    for side in ("qwenft", "llamafactory"):
        print(
            f"| {side}: wall 1 proc {t[f'{side}_wall_1p_s']} s, 2 procs {t[f'{side}_wall_2p_s']} s"
            f" (efficiency {t[f'{side}_parallel_efficiency']}), "
            f"{t[f'{side}_cpu_s_per_100k_2p']} CPU-s/100k, peak {t[f'{side}_peak_pss_2p_mib']} "
            f"MiB, projected {t[f'{side}_projection_s']} | |"
        )
    print(f"| qwenft vs LLaMA-Factory | {t['ratio']}x faster, {t['cpu_ratio']}x less CPU | >= 3x |")
    print(f"| projected ratio | {t['projected_ratio']} | >= 3x |")
    print(f"| arrays equal ({t['rows_compared']} samples) | {t['arrays_equal']} | True |")
    print(
        f"| `qwenft data check --model` | {t['data_check_model_s']} s ({t['data_check_ratio']}x "
        f"faster than LLaMA-Factory) | >= 3x |"
    )
    n = results["pieces"]
    print(
        f"| piece encoder vs Rust tokenizer, {n['samples']} natural samples, one thread | "
        f"{n['pieces_cpu_s']} vs {n['rust_cpu_s']} CPU-s ({n['ratio']}x), ids equal "
        f"{n['ids_equal']} | |"
    )
    return 0 if t["arrays_equal"] and n["ids_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
