#!/usr/bin/env python
"""Where the test suite's CPU goes (issue 21): runs a command (default `make test`) and samples
every process of the machine once a second, then prints the CPU-seconds of each kind of process
(LLaMA-Factory launches by subcommand, qwenft commands, the pytest workers, torchrun, pip,
compilers...), how many there were, and how busy the cores were.

    .venv/bin/python scripts/profile_suite.py [--json out.json] [-- COMMAND ...]

Run it on an otherwise quiet machine: it counts every process, not only the command's. A process
that lives under a second may be missed, and each is counted to its last sample (at most a second
short); the total is checked against the busy time of the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")


def cpu_times() -> tuple[int, int]:
    """(all ticks, idle + iowait ticks) of the machine since boot."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


def sample(procs: dict[str, dict], ready: threading.Event, stop: threading.Event) -> None:
    """Every second until stop: each process's command line (first seen) and CPU ticks since the
    first pass (which runs before the command starts: older processes count from there)."""
    first = True
    while first or not stop.wait(1.0):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                key = f"{pid}:{fields[19]}"  # pid and start time: one process
                ticks = int(fields[11]) + int(fields[12])  # its own user + system time
                if key not in procs:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        args = fh.read().replace(b"\0", b" ").decode(errors="replace")
                    procs[key] = {"args": args[:300], "base": ticks if first else 0}
                procs[key]["ticks"] = ticks - procs[key]["base"]
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
        first = False
        ready.set()


def kind(args: str) -> str:
    """What a process is, from its command line (test folders' paths hold "pytest": the more
    telling names are looked for first)."""
    if "llamafactory-cli" in args or "llamafactory.cli" in args:
        found = re.search(r"llamafactory(?:-cli|\.cli) (\w+)", args)
        return f"LLaMA-Factory {found.group(1) if found else '?'}"
    if "llamafactory/launcher.py" in args:
        return "LLaMA-Factory train (a torchrun worker)"
    if found := re.search(r"-m qwenft(?:\.[\w.]+)? ?(\w*)", args):
        return f"qwenft {found.group(1) or '(module)'}"
    if "exec(eval(sys.stdin.readline()))" in args:
        return "pytest-xdist worker (in-process tests)"
    if "torchrun" in args or "torch.distributed.run" in args:
        return "torchrun"
    if "ray/" in args:
        return "Ray"
    if "-m pip " in args or "pip-runner" in args or args.startswith("pip"):
        return "pip"
    if "convert_hf_to_gguf" in args or "llama" in args.split(" ", 1)[0]:
        return "llama.cpp"
    if "cc1plus" in args or "ninja" in args:
        return "C++ compiler (torch extensions)"
    if "-m pytest" in args:
        return "pytest"
    if "python" in args.split(" ", 1)[0]:
        return "python, other"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the figures and every process here")
    ap.add_argument("command", nargs="*", default=["make", "test"])
    args = ap.parse_args()
    procs: dict[str, dict] = {}
    ready, stop = threading.Event(), threading.Event()
    sampler = threading.Thread(target=sample, args=(procs, ready, stop), daemon=True)
    sampler.start()
    ready.wait()  # the first pass, over the processes already running
    total0, idle0 = cpu_times()
    start = time.monotonic()
    code = subprocess.call(args.command, cwd=ROOT)
    stop.set()
    sampler.join()
    wall = time.monotonic() - start
    total, idle = cpu_times()
    busy = 1 - (idle - idle0) / max(total - total0, 1)
    seconds: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for proc in procs.values():
        name = kind(proc["args"])
        seconds[name] += proc["ticks"] / HZ
        count[name] += 1
    print(f"\n{' '.join(args.command)}: exit {code}, {wall:.0f} s, cores busy {busy:.0%}")
    print(f"{'CPU-s':>8} {'share':>6} {'procs':>6}  kind")
    for name, secs in seconds.most_common():
        share = secs / max(sum(seconds.values()), 1e-9)
        print(f"{secs:8.0f} {share:6.1%} {count[name]:6d}  {name}")
    print(
        f"{sum(seconds.values()):8.0f}         total (cores x wall x busy: "
        f"{(os.cpu_count() or 1) * wall * busy:.0f})"
    )
    if args.json:
        figures = {
            "wall_s": round(wall),
            "busy": round(busy, 3),
            "exit": code,
            "cpu_s": {k: round(v) for k, v in seconds.most_common()},
            "processes": dict(count),
            "every_process": list(procs.values()),
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
