"""The schedulers' variables, mapped onto LLaMA-Factory's launch variables.

Inside a job step, pod or task that a scheduler started, `qwenft train` reads where it runs from
the scheduler (how many nodes, this node's rank, the master's address and port, processes per
node) instead of --nnodes / --node-rank / --master-addr. One row per scheduler, tried in order;
the first whose marker variable is set wins. A value the scheduler does not give stays unset
(the command line's, or qwenft's default).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from qwenft.errors import QwenftError

DEFAULT_PORT = 29500  # torchrun's: every node must agree on it, so never a random free port


@dataclass(frozen=True)
class Placement:
    """Where this process runs, as a scheduler tells it (None: not told)."""

    scheduler: str
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    nproc_per_node: int | None = None
    rdzv_id: str | None = None  # a job id: torchrun's c10d rendezvous (LLaMA-Factory's RDZV_ID)
    read: dict[str, str] = field(default_factory=dict)  # the variables it was read from

    def describe(self) -> str:
        """One line: what was found and from which variables."""
        got = [
            f"{name}={value}"
            for name, value in (
                ("NNODES", self.nnodes),
                ("NODE_RANK", self.node_rank),
                ("MASTER_ADDR", self.master_addr),
                ("MASTER_PORT", self.master_port),
                ("NPROC_PER_NODE", self.nproc_per_node),
                ("RDZV_ID", self.rdzv_id),
            )
            if value is not None
        ]
        return f"{self.scheduler}: {', '.join(got)} (from {', '.join(sorted(self.read))})"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: `gpu[03-05,9],cpu1` -> `gpu03` (what `scontrol show
    hostnames` prints first)."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if head is None or not head.group(0):
        raise QwenftError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges, suffix = head.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + re.split(r"[-,]", ranges)[0] + suffix


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise QwenftError(
            f"{name}={value!r} is not a whole number",
            "qwenft reads the scheduler's variables to place this node; fix the job's settings",
        )
    return int(value)


def _slurm(env: Mapping[str, str]) -> Placement:
    # One torchrun per task of the step (launch.sbatch: one task per node): the step's tasks are
    # the "nodes", the task's rank is the node's. Outside a step (the batch script itself) the
    # step variables are absent and nothing is distributed.
    return Placement(
        "slurm",
        nnodes=_int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS"),
        node_rank=_int(env, "SLURM_PROCID"),
        master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_STEP_NODELIST"]),
        master_port=_int(env, "MASTER_PORT") or DEFAULT_PORT + _int(env, "SLURM_JOB_ID") % 10000,
        nproc_per_node=_int(env, "SLURM_GPUS_ON_NODE"),
        rdzv_id=env.get("SLURM_JOB_ID"),
    )


def _kubeflow(env: Mapping[str, str]) -> Placement:
    # Kubeflow's PyTorchJob (training-operator) and TrainJob set torchrun's PET_* variables; a
    # PyTorchJob without nprocPerNode sets only the pod-level WORLD_SIZE / RANK.
    return Placement(
        "kubeflow",
        nnodes=_int(env, "PET_NNODES") or _int(env, "WORLD_SIZE"),
        node_rank=_int(env, "PET_NODE_RANK") if "PET_NODE_RANK" in env else _int(env, "RANK"),
        master_addr=env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR"),
        master_port=_int(env, "PET_MASTER_PORT") or _int(env, "MASTER_PORT") or DEFAULT_PORT,
        nproc_per_node=_int(env, "PET_NPROC_PER_NODE")
        if env.get("PET_NPROC_PER_NODE", "").isdigit()
        else None,
    )


def _skypilot(env: Mapping[str, str]) -> Placement:
    ips = env.get("SKYPILOT_NODE_IPS", "").split()
    return Placement(
        "skypilot",
        nnodes=_int(env, "SKYPILOT_NUM_NODES") or len(ips) or None,
        node_rank=_int(env, "SKYPILOT_NODE_RANK"),
        master_addr=ips[0] if ips else None,
        master_port=_int(env, "MASTER_PORT") or DEFAULT_PORT,
        nproc_per_node=_int(env, "SKYPILOT_NUM_GPUS_PER_NODE") or None,
    )


def _dlc(env: Mapping[str, str]) -> Placement:
    # Alibaba PAI-DLC (and any launcher in its style): one process per node, WORLD_SIZE nodes.
    return Placement(
        "dlc",
        nnodes=_int(env, "WORLD_SIZE"),
        node_rank=_int(env, "RANK"),
        master_addr=env.get("MASTER_ADDR"),
        master_port=_int(env, "MASTER_PORT") or DEFAULT_PORT,
    )


@dataclass(frozen=True)
class Scheduler:
    name: str
    marker: Callable[[Mapping[str, str]], bool]  # is this process in one of its jobs?
    read: Callable[[Mapping[str, str]], Placement]
    variables: tuple[str, ...]  # what `read` looks at (named in the mapping's report)


SCHEDULERS = (
    Scheduler(
        "slurm",
        lambda env: "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env,
        _slurm,
        (
            "SLURM_STEP_NUM_TASKS",
            "SLURM_NTASKS",
            "SLURM_PROCID",
            "SLURM_STEP_NODELIST",
            "SLURM_JOB_ID",
            "SLURM_GPUS_ON_NODE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ),
    ),
    Scheduler(
        "kubeflow",
        lambda env: any(k.startswith("PET_") for k in env),
        _kubeflow,
        (
            "PET_NNODES",
            "PET_NODE_RANK",
            "PET_MASTER_ADDR",
            "PET_MASTER_PORT",
            "PET_NPROC_PER_NODE",
            "WORLD_SIZE",
            "RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ),
    ),
    Scheduler(
        "skypilot",
        lambda env: "SKYPILOT_NODE_RANK" in env,
        _skypilot,
        (
            "SKYPILOT_NUM_NODES",
            "SKYPILOT_NODE_IPS",
            "SKYPILOT_NODE_RANK",
            "SKYPILOT_NUM_GPUS_PER_NODE",
            "MASTER_PORT",
        ),
    ),
    # last: its variables are torch's own, which the others may set too
    Scheduler(
        "dlc",
        lambda env: all(k in env for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR")),
        _dlc,
        ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"),
    ),
)
NAMES = tuple(s.name for s in SCHEDULERS)


def detect(env: Mapping[str, str]) -> Placement | None:
    """Where this process runs according to the first scheduler whose job it is in, or None."""
    for scheduler in SCHEDULERS:
        if scheduler.marker(env):
            read = {k: env[k] for k in scheduler.variables if k in env}
            return replace(scheduler.read(env), read=read)
    return None
