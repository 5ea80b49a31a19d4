#!/usr/bin/env python
"""qwenft benchmarks: start-up, wrapper overhead, tokenized-data cache, default recipe vs the guide.

Run by `make bench` (or `.venv/bin/python scripts/bench.py [--quick]`). Every comparison runs both
sides interleaved in this one process (A, B, A, B, ... after a warm-up of each), and reports
medians and the ratio of medians: absolute times are never compared across runs. Results go to
docs/benchmarks.md (prose, then a table) and docs/benchmarks.json, written by bench_report.py.

Everything is offline: the embedded tiny Qwen (10M parameters, real Qwen vocabulary) is built in a
private QWENFT_HOME from the Qwen vocabulary already on this machine; the chat data is generated.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_report import findings, machine_short, write_report

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

BIN = Path(sys.executable).parent  # .venv/bin when run as .venv/bin/python scripts/bench.py
TINY = "tiny-qwen2"
PAD_ID = 151643  # <|endoftext|>: the pad token of the tiny Qwen (and of real Qwen2/2.5)
DEFAULT_SYSTEM = "You are a helpful assistant."
HELDOUT_CUTOFF_LEN = 4096  # over any generated row (each stays under 1,000 tokens): none is cut

# The Qwen guide's qwen2-7b-lora-sft.yaml recipe keys that issue 7 compares against qwenft's
# defaults: micro-batch 1 x gradient accumulation 16, no packing, 16 preprocessing workers.
GUIDE_RECIPE: dict[str, Any] = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "preprocessing_num_workers": 16,
    "packing": False,
    "neat_packing": False,
    "train_sampling_strategy": "random",
}
RECIPE_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "preprocessing_num_workers",
    "packing",
    "neat_packing",
    "train_sampling_strategy",
)
# Alternatives tried once each with --explore, next to the guide and the default.
CANDIDATES: dict[str, dict[str, Any]] = {
    "batch 4 x GA 4, random order": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "train_sampling_strategy": "random",
    },
    "packing, batch 1 x GA 4": {
        "packing": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "train_sampling_strategy": "random",
    },
}
RECIPE_LR = 5.0e-3  # see bench_recipe: at the shipped 1e-4 the tiny model's loss barely moves


# --------------------------------------------------------------------------------------------
# small helpers


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class BenchError(RuntimeError):
    pass


def loadavg() -> list[float]:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return []


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    versions = {}
    for pkg in ("llamafactory", "transformers", "torch", "peft", "datasets"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    from qwenft.proc.launcher import detect_gpus

    gpu = "\n".join(g["name"] for g in detect_gpus()) or None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": gpu,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


def run_timed(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    *,
    watch: Path | None = None,
    cwd: Path | None = None,
    timeout: float = 1800,
) -> dict[str, float | None]:
    """Run argv to completion; wall seconds, and seconds until `watch` exists and is non-empty."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        first = None
        if watch is None:
            proc.wait(timeout=timeout)
        else:
            while proc.poll() is None:
                if first is None and watch.is_file() and watch.stat().st_size > 0:
                    first = time.perf_counter() - t0
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    break
                time.sleep(0.02)
        wall = time.perf_counter() - t0
    if proc.wait() != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchError(f"{' '.join(map(str, argv))} exited {proc.returncode}\n{tail}")
    return {"wall": wall, "first_step": first}


def interleaved(
    sides: dict[str, Callable[[int], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call each side warmup times (discarded), then reps rounds of A, B, ... in turn."""
    for w in range(warmup):
        for name, fn in sides.items():
            say(f"  warm-up {name}")
            fn(-1 - w)
    out: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(reps):
        for name, fn in sides.items():
            value = fn(i)
            out[name].append(value)
            say(f"  rep {i + 1}/{reps} {name}: {value:.3f}")
    return out


# --------------------------------------------------------------------------------------------
# generated chat data: varied lengths (most answers short, a long tail), so padding matters

SYLLABLES = (
    "ka ri to mo na se lu pe vi da go fu zen bar tel ion ost ume ral kin dor "
    "ash pri que lon mar cet ul vo sti ne pa hu rek lim tor gan bel"
).split()
TOPICS = (
    "weather river market garden music library bicycle kitchen mountain letter "
    "planet harbor forest lantern window school island bridge museum station"
).split()


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _words(rng: random.Random, n: int) -> list[str]:
    return [_word(rng) for _ in range(n)]


def _target_words(rng: random.Random) -> int:
    """A long-tailed length: most answers short, some long (what makes padding cost)."""
    r = rng.random()
    if r < 0.60:
        return rng.randint(3, 30)
    if r < 0.90:
        return rng.randint(30, 100)
    return rng.randint(100, 200)


def _turn(rng: random.Random, n: int) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        ws = _words(rng, n)
        return f"Repeat these words in order: {' '.join(ws)}", " ".join(ws)
    if kind == 1:
        ws = _words(rng, n)
        return f"Repeat these words backwards: {' '.join(ws)}", " ".join(reversed(ws))
    if kind == 2:
        start, step = rng.randint(1, 500), rng.randint(1, 9)
        nums = [str(start + i * step) for i in range(max(2, n // 3))]
        return f"Count from {start} in steps of {step}, {len(nums)} numbers.", ", ".join(nums)
    topic = rng.choice(TOPICS)
    adjectives = ["quiet", "busy", "old", "new", "bright"]
    sents = [
        f"The {topic} near {_word(rng)} is {rng.choice(adjectives)}." for _ in range(max(1, n // 8))
    ]
    return f"Tell me about the {topic} of {_word(rng)}.", " ".join(sents)


def make_chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """n chat rows; every row stays under 1,000 Qwen tokens (so nothing is cut or dropped)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": f"You are a {rng.choice(TOPICS)} assistant."})
        budget = 150  # words per row: keeps every row under cutoff_len 1024 tokens
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
            n_words = min(_target_words(rng), budget)
            if n_words < 3:
                break
            budget -= n_words
            q, a = _turn(rng, n_words)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# the environment every child gets


class Bench:
    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.quick = quick
        self.home = work / "home"
        self.env = dict(os.environ)
        self.env.update(
            QWENFT_HOME=str(self.home),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_DATASETS_CACHE=str(work / "hf-datasets"),
            TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
            PYTHONWARNINGS="ignore",
        )
        self.env.pop("QWENFT_DEBUG", None)
        self.qwenft = str(BIN / "qwenft")
        self.lfcli = str(BIN / "llamafactory-cli")
        for exe in (self.qwenft, self.lfcli):
            if not Path(exe).is_file():
                raise BenchError(f"{exe} not found: run `make setup` first")

    def prepare_home(self) -> Path:
        """Put Qwen's vocabulary into the private home (no download) and build the tiny model."""
        vocab = self.home / "vocab" / "qwen.tiktoken"
        if not vocab.is_file():
            candidates = [
                os.environ.get("QWENFT_QWEN_TIKTOKEN"),
                os.environ.get("QWENFT_HOME")
                and f"{os.environ['QWENFT_HOME']}/vocab/qwen.tiktoken",
                str(Path.home() / ".cache" / "qwenft" / "vocab" / "qwen.tiktoken"),
            ]
            src = next((c for c in candidates if c and Path(c).is_file()), None)
            vocab.parent.mkdir(parents=True, exist_ok=True)
            if src:
                shutil.copyfile(src, vocab)
        os.environ["QWENFT_HOME"] = str(self.home)
        from qwenft.models.tiny import ensure_tiny_model

        return ensure_tiny_model(TINY, home=self.home, progress=say)

    def wipe(self, *paths: Path) -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# 2. start-up


def bench_startup(b: Bench, reps: int) -> list[dict[str, Any]]:
    say("start-up: qwenft --help, qwenft train --help, llamafactory-cli --help")
    log = b.work / "startup.log"

    def cmd(argv: list[str]) -> Callable[[int], float]:
        return lambda _i: run_timed(argv, b.env, log)["wall"]  # type: ignore[return-value]

    res = interleaved(
        {
            "qwenft --help": cmd([b.qwenft, "--help"]),
            "qwenft train --help": cmd([b.qwenft, "train", "--help"]),
            "llamafactory-cli --help": cmd([b.lfcli, "--help"]),
        },
        reps,
    )
    base = median(res["llamafactory-cli --help"])
    rows = []
    for name in ("qwenft --help", "qwenft train --help"):
        q = median(res[name])
        rows.append(
            {
                "id": "startup_"
                + name.replace("qwenft ", "").replace(" --help", "").replace("--help", "root"),
                "what": f"start-up: `{name}` vs `llamafactory-cli --help`",
                "unit": "s",
                "qwenft": q,
                "baseline": base,
                "ratio": base / q,
                "ratio_means": "baseline / qwenft (x faster)",
                "target": ">= 15x",
                "met": base / q >= 15,
                "reps": reps,
                "samples": {"qwenft": res[name], "baseline": res["llamafactory-cli --help"]},
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# 3. wrapper overhead


def bench_overhead(b: Bench, reps: int, steps: int) -> list[dict[str, Any]]:
    say(f"overhead: qwenft train vs llamafactory-cli train on the same YAML ({steps} steps)")
    d = b.work / "overhead"
    b.wipe(d)
    data = write_jsonl(d / "chat.jsonl", make_chat_rows(200, seed=3))
    common = [
        "--model", TINY, "--method", "lora", "--data", str(data), "--max-steps", str(steps),
        "--batch-size", "2", "--grad-accum", "1", "--cutoff-len", "512", "--val-size", "0",
        "--set", "logging_steps=1", "--set", "save_steps=100000",
    ]  # fmt: skip
    template_yaml: dict[str, str] = {}

    def qwenft_side(i: int) -> float:
        run = d / f"qwenft-{i}"
        r = run_timed([b.qwenft, "train", *common, "-o", str(run)], b.env, d / f"qwenft-{i}.log")
        if not template_yaml:
            template_yaml["text"] = (run / "train.yaml").read_text()
            template_yaml["from"] = str(run)
        return r["wall"]  # type: ignore[return-value]

    def baseline_side(i: int) -> float:
        run = d / f"lf-{i}"
        yaml_path = d / f"lf-{i}.yaml"
        # The very YAML qwenft rendered (tokenized_path included, so both sides read the same warm
        # cache), only output_dir changed; launched the way the guide does it.
        text = template_yaml["text"].replace(template_yaml["from"], str(run))
        yaml_path.write_text(text)
        env = dict(b.env)
        r = run_timed([b.lfcli, "train", str(yaml_path)], env, d / f"lf-{i}.log")
        return r["wall"]  # type: ignore[return-value]

    # qwenft first: its warm-up renders the YAML and fills the tokenized cache both sides read.
    res = interleaved({"qwenft train": qwenft_side, "llamafactory-cli train": baseline_side}, reps)
    q, base = median(res["qwenft train"]), median(res["llamafactory-cli train"])
    hits = [
        json.loads((d / f"qwenft-{i}" / "qwenft.json").read_text()).get("tokenized_cache", {})
        for i in range(reps)
    ]
    return [
        {
            "id": "overhead",
            "what": f"wrapper overhead: `qwenft train` vs `llamafactory-cli train` on its YAML "
            f"(tiny-qwen2 LoRA, {steps} steps, warm tokenized cache on both sides)",
            "unit": "s",
            "qwenft": q,
            "baseline": base,
            "ratio": q / base,
            "ratio_means": "qwenft / baseline (wall time)",
            "target": "<= 1.10",
            "met": q / base <= 1.10,
            "reps": reps,
            "samples": {"qwenft": res["qwenft train"], "baseline": res["llamafactory-cli train"]},
            "cache_hits": [h.get("hit") for h in hits],
        }
    ]


# --------------------------------------------------------------------------------------------
# 4. repeat runs skip preprocessing


def bench_cache(b: Bench, reps: int, rows: int) -> list[dict[str, Any]]:
    say(f"tokenized cache: time to first step, first run vs repeat run ({rows} rows)")
    d = b.work / "cache"
    b.wipe(d)
    data = write_jsonl(d / "chat.jsonl", make_chat_rows(rows, seed=4))
    common = [
        "--model", TINY, "--method", "lora", "--data", str(data), "--max-steps", "2",
        "--batch-size", "2", "--grad-accum", "1", "--val-size", "0",
        "--set", "logging_steps=1", "--set", "save_steps=100000", "--set", "plot_loss=false",
    ]  # fmt: skip
    state: dict[str, Any] = {}

    def one(i: int, tag: str) -> dict[str, Any]:
        run = d / f"{tag}-{i}"
        r = run_timed(
            [b.qwenft, "train", *common, "-o", str(run)],
            b.env,
            d / f"{tag}-{i}.log",
            watch=run / "trainer_log.jsonl",
        )
        m = json.loads((run / "qwenft.json").read_text())
        state["cache"] = Path(m["tokenized_cache"]["path"])
        r["hit"] = m["tokenized_cache"]["hit"]
        return r

    def first_run(i: int) -> float:
        # A first run: no tokenized cache and no datasets cache of the json file either.
        if "cache" in state:
            b.wipe(state["cache"])
        b.wipe(b.work / "hf-datasets")
        r = one(i, "first")
        if r["hit"]:
            raise BenchError("a first run reported a tokenized-cache hit")
        state.setdefault("first_wall", []).append(r["wall"])
        return r["first_step"]

    def repeat_run(i: int) -> float:
        r = one(i, "repeat")
        if not r["hit"]:
            raise BenchError("a repeat run did not reuse the tokenized cache")
        state.setdefault("repeat_wall", []).append(r["wall"])
        return r["first_step"]

    res = interleaved({"first run": first_run, "repeat run": repeat_run}, reps)
    first, repeat = median(res["first run"]), median(res["repeat run"])
    fw, rw = state["first_wall"][-reps:], state["repeat_wall"][-reps:]
    return [
        {
            "id": "cache_first_step",
            "what": f"repeat run: time to first training step, repeat vs first run "
            f"({rows} generated chat rows, tokenized cache reused)",
            "unit": "s",
            "qwenft": repeat,
            "baseline": first,
            "ratio": first / repeat,
            "ratio_means": "first / repeat (x faster)",
            "target": "clearly lower (> 1.0x)",
            "met": first / repeat > 1.0,
            "reps": reps,
            "samples": {"qwenft": res["repeat run"], "baseline": res["first run"]},
            "wall": {"first_median": median(fw), "repeat_median": median(rw)},
            "labels": {"qwenft": "repeat run", "baseline": "first run"},
        }
    ]


# --------------------------------------------------------------------------------------------
# 5. default recipe vs the guide's


def encode_heldout(
    model_dir: Path, rows: list[dict[str, Any]]
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each row as LLaMA-Factory's SFT preprocessing makes them with the
    `qwen` template the recipes train with (prompt tokens masked): qwenft's own encoder."""
    from qwenft.data.tokens import LlamaFactoryEncoder

    encoder = LlamaFactoryEncoder(
        model_dir, "qwen", HELDOUT_CUTOFF_LEN, default_system=DEFAULT_SYSTEM
    )
    out = []
    for k, enc in enumerate(encoder.encode(rows)):
        if enc is None or enc[0] > HELDOUT_CUTOFF_LEN:
            raise BenchError(f"held-out row {k} would be dropped or cut by LLaMA-Factory")
        out.append((enc[1], enc[2]))
    return out


def heldout_loss(
    model_dir: Path, adapter_dir: Path | None, encoded: list[tuple[list[int], list[int]]]
) -> float:
    """Mean per-token loss on the assistant tokens of held-out rows (same for every recipe)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    # The decoder with its LoRA layers (peft injects them in place), then the output layer only
    # at the positions that are scored: the 151,936-wide vocabulary is most of the cost.
    base = model.get_base_model() if adapter_dir is not None else model
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:
            hidden = base.model(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != -100
            logits = base.lm_head(hidden[keep]).float()
            total += float(torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def real_tokens(tokenized: Path) -> int:
    """Non-padding tokens in a saved tokenized dataset (packed rows are padded to cutoff_len)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(tokenized))
    train = ds["train"] if "train" in ds else ds
    return sum(sum(1 for t in ids if t != PAD_ID) for ids in train["input_ids"])


def recipe_config(
    b: Bench, model_dir: Path, dataset_dir: Path, run: Path, recipe: dict[str, Any], lr: float
) -> dict[str, Any]:
    """qwenft's rendered LoRA config, with the recipe keys of `recipe` laid over it."""
    from qwenft.lf import render

    cfg = render.build_train_config(
        render.TrainSpec(
            method="lora",
            model_path=str(model_dir),
            template="qwen",
            default_system=DEFAULT_SYSTEM,
            dataset="bench_recipe",
            dataset_dir=str(dataset_dir),
            output_dir=str(run),
            overrides={
                "val_size": 0,
                "learning_rate": lr,
                "num_train_epochs": 1.0,
                "logging_steps": 1,
                "save_steps": 100000,
                "plot_loss": False,
                "seed": 42,
                "tokenized_path": str(run / "tokenized"),
                "include_effective_tokens_per_second": True,
            },
        )
    )
    cfg.update(recipe)
    return {k: v for k, v in cfg.items() if v is not None}


def recipe_of(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in RECIPE_KEYS if k in cfg}


def bench_recipe(b: Bench, model_dir: Path, reps: int, rows: int, lr: float, explore: bool):
    say(f"recipe: qwenft default LoRA recipe vs the Qwen guide's ({rows} rows, 1 epoch, lr {lr})")
    from qwenft.data.registry import dataset_entry

    d = b.work / "recipe"
    b.wipe(d)
    train = write_jsonl(d / "train.jsonl", make_chat_rows(rows, seed=5))
    heldout = encode_heldout(model_dir, make_chat_rows(48 if b.quick else 96, seed=6))
    info = {"bench_recipe": dataset_entry(train)}
    (d / "dataset_info.json").write_text(json.dumps(info, indent=2))

    # What qwenft renders today (configs/lora.yaml, workers capped to the cores), keys it leaves
    # out taking LLaMA-Factory's defaults (no packing, random order).
    rendered = recipe_config(b, model_dir, d, d / "probe", {}, lr)
    default_recipe = {**GUIDE_RECIPE, **recipe_of(rendered)}
    recipes: dict[str, dict[str, Any]] = {
        "guide": dict(GUIDE_RECIPE),
        "qwenft default": default_recipe,
    }
    if explore:
        for name, extra in CANDIDATES.items():
            if any(recipe_of({**GUIDE_RECIPE, **extra}) == recipe_of(r) for r in recipes.values()):
                continue
            recipes[name] = {**default_recipe, **extra}

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in recipes}

    def run_recipe(name: str, i: int) -> dict[str, Any]:
        run = d / f"{name.replace(' ', '_').replace(',', '')}-{i}"
        b.wipe(run)
        run.mkdir(parents=True)
        cfg = recipe_config(b, model_dir, d, run, recipes[name], lr)
        import yaml

        (run.parent / f"{run.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        r = run_timed(
            [b.lfcli, "train", str(run.parent / f"{run.name}.yaml")],
            b.env,
            run.parent / f"{run.name}.log",
            watch=run / "trainer_log.jsonl",
        )
        res = json.loads((run / "all_results.json").read_text())
        log = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in log if "loss" in x]
        tail = losses[-max(1, len(losses) // 5) :]
        tokens = real_tokens(run / "tokenized")
        out = {
            "wall_s": r["wall"],
            "train_runtime_s": res["train_runtime"],
            "real_tokens": tokens,
            "real_tokens_per_s": tokens * res["epoch"] / res["train_runtime"],
            "lf_effective_tokens_per_s": res.get("effective_tokens_per_sec"),
            "optimizer_steps": len(losses),
            "train_loss_last_20pct": sum(tail) / len(tail),
            "heldout_loss": heldout_loss(model_dir, run, heldout),
        }
        say(
            f"  {name} #{i}: {out['real_tokens_per_s']:.0f} real tok/s, wall {out['wall_s']:.1f} s,"
            f" held-out loss {out['heldout_loss']:.4f}, {out['optimizer_steps']} steps"
        )
        shutil.rmtree(run, ignore_errors=True)  # adapters and tokenized data: ~100 MB a run
        return out

    say(f"  held-out loss of the untrained tiny model: computing on {len(heldout)} rows")
    base_loss = heldout_loss(model_dir, None, heldout)
    say(f"  untrained held-out loss: {base_loss:.4f}")
    # No separate warm-up here: each run lasts minutes and tokens/s is taken from train_runtime,
    # which leaves out the start-up; the two sides alternate so drift in load hits both.
    paired = ["guide", "qwenft default"]
    for i in range(reps):
        for name in paired:
            results[name].append(run_recipe(name, i))
    for name in recipes:
        if name not in paired:
            results[name].append(run_recipe(name, 0))

    def summary(name: str) -> dict[str, Any]:
        rs = results[name]
        return {
            "recipe": recipe_of(recipes[name]),
            "runs": rs,
            "real_tokens_per_s": median([r["real_tokens_per_s"] for r in rs]),
            "wall_s": median([r["wall_s"] for r in rs]),
            "heldout_loss": median([r["heldout_loss"] for r in rs]),
            "train_loss_last_20pct": median([r["train_loss_last_20pct"] for r in rs]),
            "optimizer_steps": rs[0]["optimizer_steps"],
            "real_tokens": rs[0]["real_tokens"],
            "reps": len(rs),
        }

    sums = {name: summary(name) for name in recipes}
    g, q = sums["guide"], sums["qwenft default"]
    speed = q["real_tokens_per_s"] / g["real_tokens_per_s"]
    loss_ratio = q["heldout_loss"] / g["heldout_loss"]
    rows_out = [
        {
            "id": "recipe_tokens_per_s",
            "what": "default LoRA recipe vs the guide's: real (non-padding) tokens/s in training",
            "unit": "tok/s",
            "qwenft": q["real_tokens_per_s"],
            "baseline": g["real_tokens_per_s"],
            "ratio": speed,
            "ratio_means": "qwenft / baseline (x faster)",
            "target": ">= 1.3x",
            "met": speed >= 1.3,
            "reps": reps,
        },
        {
            "id": "recipe_wall",
            "what": "default LoRA recipe vs the guide's: wall time of the whole run (1 epoch)",
            "unit": "s",
            "qwenft": q["wall_s"],
            "baseline": g["wall_s"],
            "ratio": g["wall_s"] / q["wall_s"],
            "ratio_means": "baseline / qwenft (x faster)",
            "target": "(reported)",
            "met": None,
            "reps": reps,
        },
        {
            "id": "recipe_loss",
            "what": "default LoRA recipe vs the guide's: held-out loss after the same training "
            "tokens (1 epoch)",
            "unit": "loss",
            "qwenft": q["heldout_loss"],
            "baseline": g["heldout_loss"],
            "ratio": loss_ratio,
            "ratio_means": "qwenft / baseline (loss)",
            "target": "<= 1.02",
            "met": loss_ratio <= 1.02,
            "reps": reps,
        },
    ]
    detail = {
        "rows": rows,
        "heldout_rows": len(heldout),
        "learning_rate": lr,
        "untrained_heldout_loss": base_loss,
        "recipes": sums,
    }
    return rows_out, detail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and rows (~5 minutes)")
    p.add_argument(
        "--only",
        action="append",
        choices=["startup", "overhead", "cache", "recipe"],
        help="run only these benchmarks (repeatable); the report then holds only them",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="where the report goes")
    p.add_argument("--lr", type=float, default=None, help="recipe benchmark learning rate")
    p.add_argument(
        "--explore", action="store_true", help="also run the alternative recipes once each"
    )
    args = p.parse_args(argv)

    only = set(args.only or ["startup", "overhead", "cache", "recipe"])
    quick = args.quick
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="qwenft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(work.absolute(), quick)
    t_start = time.monotonic()
    say(f"scratch folder {b.work}; {'quick' if quick else 'full'} run; benchmarks: {sorted(only)}")
    mach = machine()
    say(f"machine: {machine_short(mach)}, load average {loadavg()}")
    load_before = loadavg()
    model_dir = b.prepare_home()

    results: list[dict[str, Any]] = []
    recipe = None
    failures: list[str] = []

    def section(name: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
        if name not in only:
            return
        try:
            results.extend(fn())
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other benchmarks
            say(f"{name} FAILED: {exc}")
            failures.append(f"{name}: {str(exc)[:500]}")

    def recipe_section() -> list[dict[str, Any]]:
        nonlocal recipe
        rows_out, recipe = bench_recipe(
            b,
            model_dir,
            reps=1 if quick else 2,
            rows=32 if quick else 48,
            lr=args.lr or RECIPE_LR,
            explore=args.explore,
        )
        return rows_out

    section("startup", lambda: bench_startup(b, reps=3 if quick else 7))
    section("overhead", lambda: bench_overhead(b, reps=2 if quick else 3, steps=10))
    section("cache", lambda: bench_cache(b, reps=1 if quick else 2, rows=2000 if quick else 4000))
    section("recipe", recipe_section)
    data = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "quick": quick,
        "machine": mach,
        "load_before": load_before,
        "load_after": loadavg(),
        "shared_machine": True,
        "duration_s": round(time.monotonic() - t_start, 1),
        "results": results,
        "recipe": recipe,
        "failures": failures,
    }
    data["findings"] = findings(results, recipe) + [f"FAILED: {f}" for f in failures]
    write_report(args.out, data)
    say(f"done in {data['duration_s']:.0f} s; wrote {args.out / 'benchmarks.md'} and .json")
    for f in data["findings"]:
        print("  - " + f)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
