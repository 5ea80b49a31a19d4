#!/usr/bin/env python
"""How much `--help` costs: every qwenft command's `--help` next to a minimal two-command Typer
app's, in fresh processes, interleaved, on the same Python. The target (issue 21): each at most
1.2x the minimal app, a `typer.Typer()` with default settings (which formats help with rich where
rich is installed, as it is beside LLaMA-Factory). The same app without rich (the
`rich_markup_mode=None` qwenft uses) is shown too: the floor of any Typer CLI here.

    .venv/bin/python scripts/bench_cli.py [--repeat 8] [--json docs/bench_cli.json]

Prints the median wall time of each and its ratio to the minimal app; exits 1 when one is over
the target. `-X importtime` on a slow one shows where its time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.2
MINIMAL = '''
import sys

import typer

app = typer.Typer(**({"rich_markup_mode": None} if "--plain" in sys.argv else {}))
sys.argv = [a for a in sys.argv if a != "--plain"]


@app.command()
def hello(name: str = "x") -> None:
    """Say hello."""


@app.command()
def bye(name: str = "x") -> None:
    """Say bye."""


app()
'''
COMMANDS = [
    [],
    ["train"],
    ["plan"],
    ["eval"],
    ["data", "check"],
    ["merge"],
    ["chat"],
    ["serve"],
    ["export"],
    ["runs"],
]


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        minimal = Path(tmp, "minimal.py")
        minimal.write_text(MINIMAL)
        runs: dict[str, list[float]] = {"minimal": [], "minimal, no rich": []}
        runs.update({" ".join(c) or "(root)": [] for c in COMMANDS})
        for _ in range(args.repeat):  # interleaved: load on the machine hits every one alike
            runs["minimal"].append(_time([sys.executable, str(minimal), "--help"]))
            runs["minimal, no rich"].append(
                _time([sys.executable, str(minimal), "--plain", "--help"])
            )
            for c in COMMANDS:
                runs[" ".join(c) or "(root)"].append(
                    _time([sys.executable, "-m", "qwenft", *c, "--help"])
                )
    base = statistics.median(runs["minimal"])
    rows = {name: statistics.median(t) for name, t in runs.items()}
    print(f"{'--help of':<17} {'median s':>9} {'x minimal':>10}")
    worst = 0.0
    for name, t in rows.items():
        ratio = t / base
        if not name.startswith("minimal"):
            worst = max(worst, ratio)
        print(f"{name:<17} {t:>9.3f} {ratio:>10.2f}")
    print(f"worst {worst:.2f}x (target <= {TARGET}x), median of {args.repeat}")
    if args.json:
        args.json.write_text(
            json.dumps({"repeat": args.repeat, "median_s": rows, "worst_ratio": worst}, indent=2)
            + "\n"
        )
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
