"""Commands for llamafactory-cli, built as pure argv/env (tested apart from running them).

Running them is qwenft.proc.launcher's (process control any layer may use).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qwenft.errors import QwenftError
from qwenft.proc.launcher import SETUP_HINT


def find_llamafactory_cli() -> str:
    """Path of llamafactory-cli: on PATH first, then beside this interpreter (an unactivated venv)."""
    found = shutil.which("llamafactory-cli")
    if found:
        return found
    beside = Path(sys.executable).parent / "llamafactory-cli"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise QwenftError("llamafactory-cli was not found", SETUP_HINT)


@dataclass
class Distributed:
    """How many processes per node and nodes; maps to LLaMA-Factory's torchrun variables."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    force_torchrun: bool = False

    def env(self) -> dict[str, str]:
        if not (self.force_torchrun or self.nproc_per_node > 1 or self.nnodes > 1):
            return {}
        env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(self.nproc_per_node)}
        if self.nnodes > 1:
            env.update(NNODES=str(self.nnodes), NODE_RANK=str(self.node_rank))
        if self.master_addr:
            env["MASTER_ADDR"] = self.master_addr
        if self.master_port:
            env["MASTER_PORT"] = str(self.master_port)
        return env


def offline_env(model_kind: str) -> dict[str, str]:
    """Local and embedded models never need the hub: say so, so nothing waits on the network."""
    if model_kind in ("tiny", "local"):
        return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return {}


def build_train_command(
    cli: str, yaml_path: Path, dist: Distributed, model_kind: str
) -> tuple[list[str], dict[str, str]]:
    """argv and the environment variables qwenft sets for `llamafactory-cli train`."""
    env = {**offline_env(model_kind), **dist.env()}
    return [cli, "train", str(yaml_path)], env


def build_export_command(
    cli: str, yaml_path: Path, model_kind: str
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for `llamafactory-cli export` (merging an adapter)."""
    return [cli, "export", str(yaml_path)], offline_env(model_kind)
