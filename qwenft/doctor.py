"""`qwenft doctor`: what this environment can do, and the fix for what it cannot."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from qwenft import knobs, settings
from qwenft.errors import QwenftError
from qwenft.lf import launcher as lf_launcher
from qwenft.models.llamacpp import INSTALL_HINT as GGUF_INSTALL_HINT
from qwenft.paths import qwenft_home
from qwenft.proc import launcher
from qwenft.rl import engine as rl_engine
from qwenft.runs.manifest import package_versions

SETUP = "run `make setup` (scripts/setup_env.sh) and use .venv/bin/qwenft"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


_IMPORT_PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = [True, str(getattr(importlib.import_module(name), "__version__", "ok"))]
    except Exception as exc:
        out[name] = [False, f"{type(exc).__name__}: {exc}"[:160]]
print(json.dumps(out))
"""


def _imports(*modules: str) -> dict[str, tuple[bool, str]]:
    """Import in one fresh interpreter (a broken CUDA library must not crash this process)."""
    proc = launcher.capture([sys.executable, "-c", _IMPORT_PROBE, *modules], timeout_s=300)
    try:
        return {
            k: (v[0], v[1]) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()
        }
    except (IndexError, ValueError):
        why = (proc.stderr.strip().splitlines() or ["the import probe crashed"])[-1][:160]
        return {m: (False, why) for m in modules}


def run_checks() -> list[Check]:
    checks = [
        Check("python", sys.version_info >= (3, 10), sys.version.split()[0], "use Python 3.10+"),
    ]
    try:
        checks.append(Check("llamafactory-cli", True, lf_launcher.find_llamafactory_cli()))
    except QwenftError:
        checks.append(Check("llamafactory-cli", False, "not found", SETUP))
    versions = package_versions()
    probe = ("torch", "transformers", "llamafactory", "peft")
    has_tv = importlib.util.find_spec("torchvision") is not None
    imported = _imports(*probe, *(["torchvision"] if has_tv else []))
    for module in probe:
        ok, detail = imported[module]
        checks.append(Check(module, ok, detail, SETUP))
    for module, why, fix in (
        ("deepspeed", "full fine-tuning and --deepspeed", "pip install -e '.[deepspeed]'"),
        ("bitsandbytes", "--method qlora", "pip install -e '.[bitsandbytes]'"),
        ("llama-cpp-python", "qwenft export --format gguf", GGUF_INSTALL_HINT),
    ):
        present = versions.get(module) is not None
        checks.append(
            Check(
                module,
                present,
                versions.get(module) or f"missing (needed for {why})",
                fix,
                required=False,
            )
        )
    if has_tv:
        ok, detail = imported["torchvision"]
        checks.append(
            Check(
                "torchvision",
                ok,
                detail,
                "on the CPU install, QWENFT_EXTRAS=vision scripts/setup_env.sh (PyPI's CUDA "
                "torchvision beside CPU torch needs the hook it installs, docs/vision.md), or pip "
                "uninstall torchvision (text fine-tuning does not need it)",
            )
        )
    checks += menu_checks()
    rl = rl_engine.rl_path()
    trl = sorted(rl.glob("trl-*.dist-info"))
    checks.append(
        Check(
            "rl extra (trl)",
            bool(trl),
            f"{trl[0].name.removesuffix('.dist-info').replace('-', ' ')} in {rl}"
            if trl
            else "missing (needed for --stage grpo)",
            rl_engine.RL_HINT,
            required=False,
        )
    )
    gpus = _gpus()
    checks.append(
        Check("gpus", True, ", ".join(gpus) if gpus else "none (CPU training only)", required=False)
    )
    home = qwenft_home()
    writable = os.access(
        home if home.exists() else home.parent if home.parent.exists() else Path.home(), os.W_OK
    )
    checks.append(Check("QWENFT_HOME", writable, str(home), "set QWENFT_HOME to a writable folder"))
    vocab = home / "vocab" / "qwen.tiktoken"
    checks.append(
        Check(
            "qwen vocabulary",
            vocab.is_file(),
            str(vocab)
            if vocab.is_file()
            else "not fetched yet (fetched from PyPI on first use of a tiny preset)",
            "set QWENFT_QWEN_TIKTOKEN to a qwen.tiktoken file when offline",
            required=False,
        )
    )
    return checks


def menu_checks() -> list[Check]:
    """Which options of LLaMA-Factory's menu this machine can use: every knob value that needs
    something of the machine (a CUDA GPU, a package: knobs.Needs), checked as `train` checks it
    before launch (settings.unmet)."""
    gpus = settings.cuda_gpus()
    checks = []
    for knob in knobs.KNOBS:
        for need in knob.needs:
            [label] = [x for x, n in knobs.needs_of({knob.key: need.values[0]}) if n is need]
            problem = settings.unmet(label, need, gpus)
            checks.append(
                Check(
                    label,
                    problem is None,
                    problem.message.removeprefix(f"{label} ") if problem else "usable here",
                    (problem.hint or "") if problem else "",
                    required=False,
                )
            )
    return checks


def _gpus() -> list[str]:
    gpus = launcher.detect_gpus()
    return [f"{g['name']} {g['memory_gib']:.0f} GiB (cc {g['compute_cap']})" for g in gpus]


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
