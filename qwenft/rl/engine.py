"""How qwenft runs a stage that TRL trains (choices.Engine.TRL: grpo): the `rl` extra, the
train.yaml it reads, and the command that launches it.

The rl extra is trl 1.x with the datasets release it needs (requirements/rl.lock). LLaMA-Factory
0.9.5 pins trl <= 0.24 and datasets <= 4.0 for its own stages, so the extra cannot live in the
venv's site-packages: scripts/setup_env.sh installs it into RL_DIR inside the venv, and only the
GRPO process puts it first on its PYTHONPATH. It shares everything else (torch, transformers,
peft, accelerate) with the venv, so the weights it writes are the ones LLaMA-Factory, `merge`
and `chat` read. Pure: imports no training stack.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.knobs import TRL_READS
from qwenft.rl import rewards

RL_DIR = "qwenft-rl"  # the extra's packages, inside the venv (sys.prefix)
RL_HINT = "add the rl extra: make setup-extras (or QWENFT_EXTRAS=rl scripts/setup_env.sh)"
MODULE = "qwenft.rl.grpo"  # the GRPO process


def rl_path() -> Path:
    """Where the rl extra's packages are (installed or not)."""
    return Path(sys.prefix) / RL_DIR


def require_extra() -> Path:
    """The rl extra's folder; QwenftError when it is not installed."""
    path = rl_path()
    if not (path / "trl").is_dir():
        raise QwenftError(
            f"--stage grpo needs the rl extra (TRL 1.x), not found in {path}", RL_HINT
        )
    return path


def command(yaml_path: Path, env: dict[str, str], rl_dir: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the GRPO process: this interpreter, the rl extra first on its
    PYTHONPATH (ahead of the venv's trl and datasets)."""
    paths = [str(rl_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    return [sys.executable, "-m", MODULE, str(yaml_path)], {
        **env,
        "PYTHONPATH": os.pathsep.join(paths),
    }


def grpo_config(
    config: dict[str, Any], data: Path, base: Path, processes: int = 1
) -> dict[str, Any]:
    """The train.yaml of a GRPO run: the keys the GRPO process reads (knobs.TRL_READS) of the
    rendered config, the data file it reads itself, and the rewards checked (user files resolved
    against base, the working folder). Raises QwenftError."""
    specs = rewards.parse_specs(config.get("reward_funcs") or [], base)
    rewards.parse_weights(config.get("reward_weights"), len(specs))
    rewards.check_fields(specs, data)
    batch = int(config.get("per_device_train_batch_size") or 1)
    accum = int(config.get("gradient_accumulation_steps") or 1)
    generations = int(config.get("num_generations") or 8)
    if (batch * accum * processes) % generations:
        raise QwenftError(
            f"--stage grpo: a step's {batch * accum * processes} completions (batch {batch} x "
            f"grad-accum {accum} x {processes} process(es)) are not whole groups of "
            f"--generations {generations}",
            f"make batch x grad-accum a multiple of {generations}, e.g. --batch-size "
            f"{generations} --grad-accum 1",
        )
    out = {k: v for k, v in config.items() if k in TRL_READS}
    out["reward_funcs"] = [s.yaml_text for s in specs]
    out["data_file"] = str(data)
    return out
