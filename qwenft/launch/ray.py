"""`qwenft train --launcher ray --workers N`: the command, the train.yaml keys and the checks.

The run is LLaMA-Factory's own Ray training (USE_RAY=1, ray_num_workers: N) started through
qwenft.launch.ray_driver, which fixes the resources LLaMA-Factory 0.9.5 asks of Ray (its
placement group wants ten CPUs per device of the whole cluster and never becomes ready:
LLaMA-Factory issue #10348, qwenft issue 24; that module says how).

Nothing here imports ray or torch: the cluster is asked in a bounded child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.launch.ray_driver import local_cpus

DRIVER = "qwenft.launch.ray_driver"
INSTALL_HINT = "QWENFT_EXTRAS=ray scripts/setup_env.sh (or pip install 'qwenft[ray]')"
PROBE_TIMEOUT_S = 20.0

# Run by check_workers in a child: the resources of the cluster the driver's ray.init() will join
# (RAY_ADDRESS's, or one `ray start` left running here); {"cluster": null} when it would start a
# local Ray. Joined as the driver joins it, by a plain ray.init(): ray 2.60 only finds the auth
# token of a local `ray start` cluster that way (neither `ray status` nor ray.init(address=...)
# gets past its token authentication).
_PROBE = """
import json, ray
from qwenft.launch.ray_driver import cluster_address
address = cluster_address()
if address is None:
    print(json.dumps({"cluster": None}))
else:
    try:
        ray.init(logging_level="ERROR", log_to_driver=False)  # as LLaMA-Factory's ray.init()
    except ConnectionError as exc:
        print(json.dumps({"cluster": None, "address": address, "error": str(exc)}))
    else:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        print(json.dumps({"cluster": ray.cluster_resources(), "nodes": nodes, "address": address}))
"""


@dataclass(frozen=True)
class Cluster:
    """Where the workers would run: resources {"CPU": n, "GPU": n, ...} and a description."""

    resources: dict[str, float]
    where: str
    local: bool  # started by the driver on this machine


def ray_command(yaml_path: Path, workers: int) -> tuple[list[str], dict[str, str]]:
    """argv and the environment variables for the Ray driver (ray_num_workers is in the yaml,
    config_keys). No FORCE_TORCHRUN: Ray starts the workers, each sets up torch.distributed."""
    del workers  # train.yaml carries it
    env = {
        "USE_RAY": "1",  # LLaMA-Factory's Ray branch of run_exp (the driver sets it too)
        "RAY_USAGE_STATS_ENABLED": "0",  # a local Ray would otherwise report usage online
    }
    return [sys.executable, "-m", DRIVER, str(yaml_path)], env


def config_keys(workers: int) -> dict[str, Any]:
    """The train.yaml keys of a Ray run. Only the worker count: where Ray runs (RAY_ADDRESS, a
    cluster running here, else a local one with this machine's CPUs) is the driver's choice when
    it starts, so that a resumed run follows the cluster of that moment; a ray_init_kwargs set
    with --set is passed to ray.init as it is."""
    return {"ray_num_workers": workers}


def probe_cluster(timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """{"cluster": resources, "nodes": n, "address": a} of the cluster the driver will join, or
    {"cluster": None} when it will start a local Ray; asked in a child Python (importing ray here
    would slow the CLI). QwenftError when the cluster cannot be asked."""
    env_address = os.environ.get("RAY_ADDRESS")
    where = f"the Ray cluster at RAY_ADDRESS={env_address}" if env_address else "Ray"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    except subprocess.TimeoutExpired:
        raise QwenftError(
            f"{where} did not answer in {timeout_s:g} s",
            "check that the cluster is up (ray status) and the address",
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        found = None
    if not isinstance(found, dict) or "cluster" not in found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QwenftError(f"cannot ask {where} for its resources: {tail}", "ray status")
    if found["cluster"] is None and found.get("address"):
        raise QwenftError(
            f"the Ray cluster at {found['address']} cannot be reached: {found.get('error', '')}",
            "start it (ray start), or train on a local Ray: unset RAY_ADDRESS, and `ray stop` "
            "forgets a cluster `ray start` left recorded here",
        )
    return found


def find_cluster(gpus_seen: list[dict[str, Any]]) -> Cluster:
    """The cluster the driver will use: RAY_ADDRESS's, else one `ray start` left running here,
    else the local Ray it starts (this machine's GPUs, or its CPUs)."""
    found = probe_cluster()
    if found["cluster"] is not None:
        nodes = found.get("nodes") or 1
        where = f"the Ray cluster at {found.get('address')} ({nodes} node{'s' * (nodes != 1)})"
        return Cluster(found["cluster"], where, False)
    resources: dict[str, float] = {"CPU": float(local_cpus())}
    if gpus_seen:
        resources["GPU"] = float(len(gpus_seen))
    return Cluster(resources, "a local Ray started on this machine", True)


def check_workers(workers: int, gpus_seen: list[dict[str, Any]]) -> list[str]:
    """Refuse --workers below 1, past the cluster's devices (GPUs where this machine trains on
    GPUs, else CPUs: a worker is one CPU process), or without the ray extra; the notes to print."""
    if workers < 1:
        raise QwenftError(
            f"--workers must be at least 1 (got {workers})", "--workers 2: two Ray workers"
        )
    if find_spec("ray") is None:
        raise QwenftError("--launcher ray needs Ray, which is not installed", INSTALL_HINT)
    cluster = find_cluster(gpus_seen)
    device = "GPU" if gpus_seen else "CPU"
    have = int(cluster.resources.get(device, 0))
    devices = f"{have} {device}{'s' * (have != 1)}"
    if workers > have:
        raise QwenftError(
            f"--workers {workers}: {cluster.where} has {devices}, and each worker takes one",
            f"--workers {have}" if have else "start Ray where the devices are (RAY_ADDRESS)",
        )
    each = "one GPU" if gpus_seen else "one CPU process (gloo)"
    plural = "s" * (workers != 1)
    return [f"ray: {workers} worker{plural}, {each} each, on {cluster.where} ({devices})"]
