"""`qwenft train --launcher ray` (issue 24, part 3): the driver's command, its train.yaml keys, the
refusals of --workers, and the patch of LLaMA-Factory's tuner on stand-ins. Fast tier: no torch,
transformers or llamafactory; ray only where installed (and never in the CLI process). The real
Ray runs are in test_e2e_ray.py."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qwenft.errors import QwenftError
from qwenft.launch import ray as ray_launch
from qwenft.launch import ray_driver

GPU = {"name": "H100", "memory_gib": 80.0, "compute_cap": 9.0}
RAY_INSTALLED = ray_launch.find_spec("ray") is not None


def test_ray_command_runs_the_driver_with_use_ray() -> None:
    argv, env = ray_launch.ray_command(Path("/runs/r/train.yaml"), 2)
    assert argv == [sys.executable, "-m", "qwenft.launch.ray_driver", "/runs/r/train.yaml"]
    assert env["USE_RAY"] == "1"
    assert "FORCE_TORCHRUN" not in env and "NPROC_PER_NODE" not in env


def test_config_keys_hold_the_worker_count() -> None:
    assert ray_launch.config_keys(3) == {"ray_num_workers": 3}


def local(monkeypatch: pytest.MonkeyPatch, cpus: int) -> None:
    """No cluster to join (the driver would start a local Ray), on a machine with `cpus` CPUs."""
    monkeypatch.setattr(ray_launch, "find_spec", lambda name: object())
    monkeypatch.setattr(ray_launch, "probe_cluster", lambda: {"cluster": None})
    monkeypatch.setattr(ray_launch, "local_cpus", lambda: cpus)


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_one_refused(workers: int) -> None:
    with pytest.raises(QwenftError, match="--workers must be at least 1") as exc:
        ray_launch.check_workers(workers, [])
    assert exc.value.exit_code == 2


def test_missing_ray_extra_refused_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_launch, "find_spec", lambda name: None if name == "ray" else object())
    with pytest.raises(QwenftError, match="needs Ray") as exc:
        ray_launch.check_workers(2, [])
    assert exc.value.exit_code == 2
    assert "QWENFT_EXTRAS=ray scripts/setup_env.sh" in (exc.value.hint or "")
    assert "pip install 'qwenft[ray]'" in (exc.value.hint or "")


def test_local_cluster_counts_cpus_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    local(monkeypatch, cpus=2)
    notes = ray_launch.check_workers(2, [])
    assert notes == [
        "ray: 2 workers, one CPU process (gloo) each, on a local Ray started on this machine "
        "(2 CPUs)"
    ]
    with pytest.raises(QwenftError, match="has 2 CPUs, and each worker takes one") as exc:
        ray_launch.check_workers(3, [])
    assert exc.value.hint == "--workers 2"


def test_local_cluster_counts_gpus_where_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    local(monkeypatch, cpus=64)
    assert "one GPU each" in ray_launch.check_workers(2, [GPU, GPU])[0]
    with pytest.raises(QwenftError, match="has 2 GPUs") as exc:
        ray_launch.check_workers(3, [GPU, GPU])
    assert exc.value.hint == "--workers 2"


def test_running_cluster_counts_its_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    found = {"cluster": {"CPU": 32.0, "GPU": 4.0}, "nodes": 2, "address": "10.0.0.1:6379"}
    monkeypatch.setattr(ray_launch, "find_spec", lambda name: object())
    monkeypatch.setattr(ray_launch, "probe_cluster", lambda: found)
    monkeypatch.setattr(ray_launch, "local_cpus", lambda: 1)  # not this machine's
    note = ray_launch.check_workers(4, [GPU])[0]
    assert "the Ray cluster at 10.0.0.1:6379 (2 nodes) (4 GPUs)" in note
    with pytest.raises(QwenftError, match=r"10\.0\.0\.1:6379 \(2 nodes\) has 4 GPUs"):
        ray_launch.check_workers(5, [GPU])
    # CPU workers (no GPU here): the cluster's CPUs
    assert "(32 CPUs)" in ray_launch.check_workers(32, [])[0]
    # a cluster without GPUs for GPU workers
    monkeypatch.setattr(ray_launch, "probe_cluster", lambda: {**found, "cluster": {"CPU": 8.0}})
    with pytest.raises(QwenftError, match="has 0 GPUs") as exc:
        ray_launch.check_workers(1, [GPU])
    assert "RAY_ADDRESS" in (exc.value.hint or "")


def fake_run(stdout: str = "", returncode: int = 0, stderr: str = "") -> Any:
    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        assert argv[:2] == [sys.executable, "-c"] and kw["timeout"] == ray_launch.PROBE_TIMEOUT_S
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    return run


def test_probe_reads_the_child_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = {"cluster": {"CPU": 4.0}, "nodes": 1, "address": "1.2.3.4:6379"}
    monkeypatch.setattr(subprocess, "run", fake_run("ray log line\n" + json.dumps(answer)))
    assert ray_launch.probe_cluster() == answer


def test_probe_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")

    def timeout(argv: list[str], **kw: Any) -> None:
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    monkeypatch.setattr(subprocess, "run", timeout)
    with pytest.raises(QwenftError, match="RAY_ADDRESS=10.9.9.9:6379 did not answer in 20 s"):
        ray_launch.probe_cluster()
    gone = {"cluster": None, "address": "10.9.9.9:6379", "error": "Failed to connect"}
    monkeypatch.setattr(subprocess, "run", fake_run(json.dumps(gone)))
    with pytest.raises(QwenftError, match="cannot be reached: Failed to connect") as exc:
        ray_launch.probe_cluster()
    assert "unset RAY_ADDRESS" in (exc.value.hint or "")
    monkeypatch.setattr(subprocess, "run", fake_run("", 1, "Traceback\nImportError: boom"))
    with pytest.raises(QwenftError, match="cannot ask .* for its resources: ImportError: boom"):
        ray_launch.probe_cluster()


@pytest.mark.skipif(not RAY_INSTALLED, reason="the ray extra is not installed")
def test_probe_child_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe script in its child: no cluster here (a local Ray would be started), or the
    resources of one `ray start` left running on this machine."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    found = ray_launch.probe_cluster()
    assert found["cluster"] is None or found["cluster"]["CPU"] >= 1


def test_helpers_import_neither_ray_nor_torch() -> None:
    code = (
        "import sys, qwenft.launch.ray, qwenft.launch.ray_driver; "
        "print(sorted(m for m in ('ray', 'torch', 'llamafactory') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# the driver


def test_driver_usage_and_version_refusals(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ray_driver.main([]) == 2
    assert ray_driver.main(["train.json"]) == 2
    assert "usage: python -m qwenft.launch.ray_driver" in capsys.readouterr().err
    monkeypatch.setattr(ray_driver, "version", lambda name: "0.9.6")
    assert ray_driver.main(["x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "patches LLaMA-Factory 0.9.5's tuner" in err and "llamafactory 0.9.6 is installed" in err
    monkeypatch.setattr(ray_driver, "version", lambda name: "0.9.5")
    monkeypatch.setattr(ray_driver, "find_spec", lambda name: None)
    assert ray_driver.main(["x.yaml"]) == 2
    assert "QWENFT_EXTRAS=ray scripts/setup_env.sh" in capsys.readouterr().err


@pytest.mark.skipif(not RAY_INSTALLED, reason="the ray extra is not installed")
@pytest.mark.parametrize(
    ("device", "bundle", "lf_extra"),
    [
        ("cpu", {"CPU": 1}, {}),
        ("gpu", {"CPU": 1, "GPU": 1}, {"num_gpus": 1}),
        ("npu", {"CPU": 1, "NPU": 1}, {"resources": {"NPU": 1}}),
    ],
)
def test_patch_asks_n_bundles_of_one_device(
    monkeypatch: pytest.MonkeyPatch, device: str, bundle: dict, lf_extra: dict
) -> None:
    """A stand-in for llamafactory.train.tuner: N bundles of one CPU (+ the device) whatever the
    cluster's device count LLaMA-Factory passes, each worker asking one CPU, not 10."""
    import ray

    pg_module = importlib.import_module(
        "ray.util.placement_group"
    )  # ray.util's name is the function

    made: list[tuple[list[dict], str]] = []
    monkeypatch.setattr(
        pg_module, "placement_group", lambda b, strategy: made.append((b, strategy))
    )
    tuner = SimpleNamespace(
        get_device_name=lambda: device,
        get_ray_remote_config_for_worker=lambda **kw: {"num_cpus": 10, "env": kw, **lf_extra},
        get_placement_group=None,
        get_ray_head_node_ip=None,
    )
    ray_driver.patch_tuner(tuner, 3)
    _, got = tuner.get_placement_group(64)  # LLaMA-Factory passes the whole cluster's devices
    assert made == [([bundle] * 3, "PACK")] and got == bundle
    config = tuner.get_ray_remote_config_for_worker(rank=1, world_size=3)
    assert config == {"num_cpus": 1, "env": {"rank": 1, "world_size": 3}, **lf_extra}
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0}, "NodeManagerAddress": "10.0.0.2"},
        {"Alive": False, "Resources": {ray_driver.HEAD_RESOURCE: 1.0}, "NodeManagerAddress": "x"},
        {
            "Alive": True,
            "Resources": {ray_driver.HEAD_RESOURCE: 1.0},
            "NodeManagerAddress": "10.0.0.1",
        },
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert tuner.get_ray_head_node_ip() == "10.0.0.1"


def test_patch_refuses_a_tuner_without_the_names() -> None:
    tuner = SimpleNamespace(get_device_name=lambda: "cpu", get_placement_group=None)
    with pytest.raises(RuntimeError, match="has no get_ray_remote_config_for_worker, get_ray_head"):
        ray_driver.patch_tuner(tuner, 2)
