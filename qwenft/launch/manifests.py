"""The files Kubernetes (a Kubeflow PyTorchJob) and SkyPilot (a task YAML) run: every pod or node
runs the same `qwenft train` command, which reads its place from the scheduler's variables
(launch.schedulers: Kubeflow's PET_*, SkyPilot's SKYPILOT_*).

Text only: qwenft renders them (`--dry-run`); `kubectl apply -f` and `sky launch` submit them.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from qwenft.launch.schedulers import DEFAULT_PORT

GPU_RESOURCE = "nvidia.com/gpu"


def k8s_name(text: str) -> str:
    """A Kubernetes object name (RFC 1123: lower case, digits and '-', at most 63)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (name or "qwenft")[:63].rstrip("-")


def pytorchjob(
    name: str, nodes: int, gpus_per_node: int | None, image: str, command: list[str]
) -> str:
    """A kubeflow.org/v1 PyTorchJob: one Master pod and nodes-1 Worker pods, each running
    `command` with one process per GPU (nprocPerNode). The training operator sets PET_NNODES,
    PET_NODE_RANK, PET_NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT in every pod."""

    def replica(count: int) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "pytorch",  # the operator finds its container by this name
            "image": image,
            "command": command,
            "ports": [{"name": "pytorchjob-port", "containerPort": DEFAULT_PORT}],
        }
        if gpus_per_node:
            container["resources"] = {"limits": {GPU_RESOURCE: gpus_per_node}}
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"spec": {"containers": [container]}},
        }

    specs = {"Master": replica(1)}
    if nodes > 1:
        specs["Worker"] = replica(nodes - 1)
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": k8s_name(name)},
        "spec": {
            "nprocPerNode": str(gpus_per_node or 1),
            "pytorchReplicaSpecs": specs,
        },
    }
    return "# kubectl apply -f THIS_FILE  (written by `qwenft train --launcher kubeflow`)\n" + (
        yaml.safe_dump(job, sort_keys=False)
    )


def skypilot_task(name: str, nodes: int, accelerators: str | None, command: list[str]) -> str:
    """A SkyPilot task: `num_nodes` nodes, each running `command`; qwenft reads
    SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES and SKYPILOT_NUM_GPUS_PER_NODE."""
    task: dict[str, Any] = {"name": name, "num_nodes": nodes}
    if accelerators:
        task["resources"] = {"accelerators": accelerators}
    task["workdir"] = "."
    task["run"] = shlex.join(command) + "\n"
    return "# sky launch THIS_FILE  (written by `qwenft train --launcher skypilot`)\n" + (
        yaml.safe_dump(task, sort_keys=False)
    )


def pod_command(argv: list[str], drop: dict[str, bool]) -> list[str]:
    """The `qwenft train` command each pod runs: the command line given here without the options
    that only this launch needs (`drop`: option -> whether it takes a value), so every pod
    trains what this machine rendered."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = drop[name] and "=" not in arg
            continue
        out.append(arg)
    return ["qwenft", *out]
