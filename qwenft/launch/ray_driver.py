"""LLaMA-Factory's Ray training with its resource requests fixed: what `qwenft train --launcher ray`
runs (qwenft.launch.ray.ray_command) in place of `USE_RAY=1 llamafactory-cli train RUN/train.yaml`.

    USE_RAY=1 python -m qwenft.launch.ray_driver RUN/train.yaml [key=value ...]

with `ray_num_workers: N` in the yaml.

Why (qwenft issue 24; LLaMA-Factory issue #10348): LLaMA-Factory 0.9.5's
tuner._ray_training_function asks trainer_utils.get_placement_group(total_devices) for a bundle
per device of the WHOLE cluster, each {"CPU": 10} (+1 GPU), whatever ray_num_workers says, and
get_ray_remote_config_for_worker has every worker ask num_cpus=10. With CPU workers the placement
group wants ten times the cluster's CPUs, so `ray.get(pg.ready())` never returns (the run hangs
before step 1, tests/test_e2e_ray.py shows it); on a GPU cluster it reserves every GPU. And its
get_ray_head_node_ip reads the dashboard's state API (ray.util.state.list_nodes), which the plain
`ray` package (qwenft's ray extra) does not run.

The fix replaces those three names inside llamafactory.train.tuner (it imported them by name, so
patching trainer_utils would not reach it): N bundles of {"CPU": 1} (+1 GPU, or the device
LLaMA-Factory trains on), each worker asking exactly its bundle, and the head node read from the
GCS (ray.nodes()). Then run_exp() reads the yaml from sys.argv as `llamafactory-cli train` does.
Only 0.9.5 is patched: another version is refused, its tuner may differ.

Ray itself: with `ray_init_kwargs` in the yaml, RAY_ADDRESS, or a cluster `ray start` left
running on this machine, LLaMA-Factory's ray.init() joins it; otherwise this starts a local Ray
with this machine's CPUs and no dashboard.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

LF_VERSION = "0.9.5"  # the tuner these patches were written against
PATCHED = ("get_placement_group", "get_ray_remote_config_for_worker", "get_ray_head_node_ip")
HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives the head node only


def check_versions() -> str | None:
    """Why the patch cannot run here, or None."""
    try:
        lf = version("llamafactory")
    except PackageNotFoundError:
        return "llamafactory is not installed (scripts/setup_env.sh installs it)"
    if lf != LF_VERSION:
        return (
            f"qwenft's Ray launch patches LLaMA-Factory {LF_VERSION}'s tuner "
            f"(LLaMA-Factory issue #10348) and llamafactory {lf} is installed; install "
            f"llamafactory=={LF_VERSION} (requirements/cpu.lock) or train without --launcher ray"
        )
    if find_spec("ray") is None:
        return (
            "ray is not installed: QWENFT_EXTRAS=ray scripts/setup_env.sh "
            "(or pip install 'qwenft[ray]')"
        )
    return None


def patch_tuner(tuner: Any, num_workers: int) -> None:
    """Replace get_placement_group, get_ray_remote_config_for_worker and get_ray_head_node_ip in
    llamafactory.train.tuner (its module namespace is where _ray_training_function looks them up)."""
    missing = [name for name in (*PATCHED, "get_device_name") if not hasattr(tuner, name)]
    if missing:
        raise RuntimeError(f"llamafactory.train.tuner has no {', '.join(missing)}: not 0.9.5's")
    import ray
    from ray.util.placement_group import placement_group

    lf_remote_config = tuner.get_ray_remote_config_for_worker

    def bundle() -> dict[str, int]:
        # one CPU, plus one of the device LLaMA-Factory trains on ("GPU", "NPU"...)
        device = tuner.get_device_name().upper()
        return {"CPU": 1} if device == "CPU" else {"CPU": 1, device: 1}

    def get_placement_group(_total_devices: int) -> tuple[Any, dict[str, int]]:
        # LLaMA-Factory passes the cluster's device count: N workers need N bundles
        pg = placement_group([bundle() for _ in range(num_workers)], strategy="PACK")
        return pg, bundle()

    def get_ray_remote_config_for_worker(**kw: Any) -> dict[str, Any]:
        # LLaMA-Factory's config (placement, env, num_gpus=1 or NPU: 1) with one CPU, not 10:
        # exactly the bundle the worker is placed in
        config = lf_remote_config(**kw)
        config["num_cpus"] = 1
        return config

    def get_ray_head_node_ip() -> str:
        # the GCS knows the head node; the state API (list_nodes) needs ray[default]'s dashboard
        for node in ray.nodes():
            if node.get("Alive") and HEAD_RESOURCE in node.get("Resources", {}):
                return str(node["NodeManagerAddress"])
        raise RuntimeError("the Ray cluster has no live head node")

    tuner.get_placement_group = get_placement_group
    tuner.get_ray_remote_config_for_worker = get_ray_remote_config_for_worker
    tuner.get_ray_head_node_ip = get_ray_head_node_ip


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cluster_address() -> str | None:
    """The cluster a plain ray.init() joins: RAY_ADDRESS, else the one `ray start` recorded on
    this machine; None: it would start a local Ray. (Not ray.init(address="auto"), which also
    joins a local Ray another driver started, e.g. another qwenft run, and dies with it.)"""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return address
    # ray.init's own rule (private API of ray 2.60, which the ray extra pins)
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment(None, None)


def init_ray(ray_init_kwargs: Any) -> None:
    """Start a local Ray (this machine's CPUs, its GPUs as Ray detects them, no dashboard) unless
    LLaMA-Factory's own ray.init() has a cluster to join: ray_init_kwargs in the yaml, RAY_ADDRESS
    or a cluster left running here by `ray start`."""
    if ray_init_kwargs is not None or cluster_address() is not None:
        return
    import ray

    ray.init(num_cpus=local_cpus(), include_dashboard=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or not args[0].endswith((".yaml", ".yml")):
        print(
            "usage: python -m qwenft.launch.ray_driver RUN/train.yaml [key=value ...]",
            file=sys.stderr,
        )
        return 2
    problem = check_versions()
    if problem:
        print(f"qwenft ray driver: {problem}", file=sys.stderr)
        return 2
    # LLaMA-Factory reads the yaml and key=value overrides from sys.argv[1:] (hparams.read_args),
    # as after `llamafactory-cli train` popped its command; USE_RAY picks its Ray branch.
    sys.argv = [sys.argv[0], *args]
    os.environ["USE_RAY"] = "1"

    from llamafactory.hparams import get_ray_args, read_args
    from llamafactory.train import tuner

    ray_args = get_ray_args(read_args())
    if ray_args.ray_num_workers < 1:
        print("qwenft ray driver: ray_num_workers must be at least 1", file=sys.stderr)
        return 2
    patch_tuner(tuner, ray_args.ray_num_workers)
    init_ray(ray_args.ray_init_kwargs)
    tuner.run_exp()
    return 0


if __name__ == "__main__":
    sys.exit(main())
