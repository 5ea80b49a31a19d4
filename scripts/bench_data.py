#!/usr/bin/env python3
"""Data-check speed and memory (issue 3), measured side by side in one run.

1. Structural check (`qwenft data check`, no tokenizer) of a generated jsonl of --check-mb MB:
   throughput in MB/s and peak RSS of the checking process.
2. Token statistics (qwenft's LLaMA-Factory-exact encoder) against LLaMA-Factory's own
   preprocessing (`get_dataset`) of the same --samples chat samples of ~1 KB, on tiny-qwen2,
   each in a fresh process, with the counts compared for equality.

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


def timed(code: str, *args: str) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of `python -c code args` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LLAMAFACTORY_VERBOSITY": "WARN"},
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    # DeepSpeed prints "Setting accelerator to CPU" on stdout while transformers loads: the
    # result is the last line.
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(rss, before) / 1024, out.stdout.strip().splitlines()[-1]


CHECK = """
import sys
from pathlib import Path
from qwenft.data.check import check_file
r = check_file(Path(sys.argv[1]))
print(r.n_samples, r.n_errors)
"""

OURS = """
import json, sys
from pathlib import Path
from qwenft.data.tokens import LlamaFactoryEncoder, iter_token_lengths
enc = LlamaFactoryEncoder(sys.argv[2], "qwen", int(sys.argv[3]), default_system="You are a helpful assistant.")
print(json.dumps([[kept, loss] for _, _, kept, loss in iter_token_lengths(Path(sys.argv[1]), enc)]))
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
args = dict(stage="sft", do_train=True, model_name_or_path=sys.argv[2], dataset="bench", dataset_dir=d,
            template="qwen", default_system="You are a helpful assistant.", cutoff_len=int(sys.argv[3]),
            output_dir=os.path.join(d, "out"), overwrite_cache=True, preprocessing_num_workers=os.cpu_count(),
            cache_dir=os.path.join(d, "cache"), report_to="none")
model_args, data_args, training_args, _, _ = get_train_args(args)
tm = load_tokenizer(model_args)
tpl = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
ds = get_dataset(tpl, model_args, data_args, training_args, stage="sft", **tm)["train_dataset"]
print(json.dumps([[len(r["input_ids"]), sum(1 for x in r["labels"] if x != -100)] for r in ds]))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 MB and 10,000 samples")
    ap.add_argument("--check-mb", type=float, default=1000.0)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--cutoff-len", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_data.json")
    args = ap.parse_args()
    if args.quick:
        args.check_mb, args.samples = 100.0, 10_000

    from qwenft.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("tiny-qwen2", progress=None))
    results: dict = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
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
        print(
            f"token statistics of {args.samples} samples: qwenft, then LLaMA-Factory ...",
            flush=True,
        )
        t_ours, _, ours = timed(OURS, str(data), model, str(args.cutoff_len))
        t_lf, _, lf = timed(LLAMAFACTORY, str(data), model, str(args.cutoff_len))
        results["token_stats"] = {
            "samples": args.samples,
            "cutoff_len": args.cutoff_len,
            "qwenft_s": round(t_ours, 1),
            "llamafactory_s": round(t_lf, 1),
            "ratio": round(t_lf / t_ours, 2),
            "counts_equal": json.loads(ours) == json.loads(lf),
        }
        print(f"token statistics: {results['token_stats']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    c, t = results["check"], results["token_stats"]
    print("\n| what | figure | target |\n|---|---|---|")
    print(f"| structural check, {c['mb']} MB | {c['mb_per_s']} MB/s | >= 50 MB/s |")
    print(f"| peak RSS of that check | {c['peak_rss_mib']} MiB | < 300 MB |")
    print(f"| token stats, {t['samples']} samples | {t['qwenft_s']} s | < 60 s |")
    print(f"| vs LLaMA-Factory's preprocessing | {t['llamafactory_s']} s ({t['ratio']}x) | >= 2x |")
    print(f"| counts equal | {t['counts_equal']} | True |")
    return 0 if t["counts_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
