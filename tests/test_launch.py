"""Past one machine (issue 24): the schedulers' variables mapped onto LLaMA-Factory's launch
variables, the Slurm script and its job control, the Kubeflow and SkyPilot files, rendering on a
login node, and the refusals. Fast tier: the recording llamafactory-cli and stand-in Slurm
commands; tests/test_e2e_launch.py runs the Slurm path for real."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from qwenft.launch import manifests, schedulers, slurm
from tests.helpers.builders import read_calls, written
from tests.helpers.cli import invoke

pytestmark = pytest.mark.usefixtures("no_token_stats")

# --------------------------------------------------------------------------------------------------
# the schedulers' variables

SLURM_STEP = {
    "SLURM_JOB_ID": "4711",
    "SLURM_STEP_NODELIST": "gpu[07-10]",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_GPUS_ON_NODE": "8",
}
MAPPINGS = [
    # env, scheduler, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, RDZV_ID
    (SLURM_STEP, "slurm", 4, 2, "gpu07", 29500 + 4711, 8, "4711"),
    (
        {**SLURM_STEP, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "30000"},
        "slurm",
        4,
        2,
        "10.1.1.1",
        30000,
        8,
        "4711",
    ),
    (  # Kubeflow TrainJob / PyTorchJob with nprocPerNode
        {
            "PET_NNODES": "2",
            "PET_NODE_RANK": "1",
            "PET_NPROC_PER_NODE": "8",
            "PET_MASTER_ADDR": "job-master-0",
            "PET_MASTER_PORT": "23456",
        },
        "kubeflow",
        2,
        1,
        "job-master-0",
        23456,
        8,
        None,
    ),
    (  # PyTorchJob: pod-level WORLD_SIZE / RANK, nprocPerNode "auto"
        {
            "PET_NPROC_PER_NODE": "auto",
            "WORLD_SIZE": "3",
            "RANK": "2",
            "MASTER_ADDR": "job-master-0",
            "MASTER_PORT": "23456",
        },
        "kubeflow",
        3,
        2,
        "job-master-0",
        23456,
        None,
        None,
    ),
    (
        {
            "SKYPILOT_NODE_RANK": "1",
            "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n",
            "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NUM_GPUS_PER_NODE": "4",
        },
        "skypilot",
        2,
        1,
        "10.0.0.5",
        29500,
        4,
        None,
    ),
    (
        {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "dlc-master", "MASTER_PORT": "29511"},
        "dlc",
        2,
        0,
        "dlc-master",
        29511,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("env", "scheduler", "nnodes", "rank", "addr", "port", "nproc", "rdzv"), MAPPINGS
)
def test_scheduler_variables_map_onto_the_launch_variables(
    env: dict, scheduler: str, nnodes: int, rank: int, addr: str, port: int, nproc, rdzv
) -> None:
    found = schedulers.detect({"PATH": "/bin", "HOME": "/root", **env})
    assert found is not None and found.scheduler == scheduler
    assert (found.nnodes, found.node_rank, found.master_addr, found.master_port) == (
        nnodes,
        rank,
        addr,
        port,
    )
    assert (found.nproc_per_node, found.rdzv_id) == (nproc, rdzv)
    assert set(found.read) <= set(env) and "PATH" not in found.read
    assert found.describe().startswith(f"{scheduler}: NNODES={nnodes}, NODE_RANK={rank}")


def test_no_scheduler_and_the_batch_script_itself_place_nothing() -> None:
    assert schedulers.detect({"PATH": "/bin"}) is None
    # inside the batch script (not a step started by srun) the step variables are absent
    assert schedulers.detect({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2"}) is None


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("n1", "n1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a[1-2]-ib", "a1-ib"), ("x,y", "x")],
)
def test_first_host_of_a_slurm_hostlist(nodelist: str, first: str) -> None:
    assert schedulers.first_host(nodelist) == first


def test_a_scheduler_variable_that_is_not_a_number_is_named() -> None:
    with pytest.raises(Exception, match="PET_NNODES='two'"):
        schedulers.detect({"PET_NNODES": "two"})


# --------------------------------------------------------------------------------------------------
# a login node renders for the GPU nodes


def test_login_node_dry_run_renders_for_gpus_it_does_not_have(
    fake_cli: Path, local_model: Path, chat_file: Path, isolated: Path
) -> None:
    before = written(Path.cwd(), isolated)
    args = ["--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]
    result = invoke("train", "--model", local_model, "--data", chat_file, *args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "NNODES=2" in result.output and "NODE_RANK=1" in result.output
    assert "NPROC_PER_NODE=8" in result.output
    assert "no GPU is visible on this machine: rendered for 8 GPU(s) per node" in result.output
    assert "bf16: true" in result.output
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []
    # a launch here is still refused
    bad = invoke("train", "--model", local_model, "--data", chat_file, "--gpus", "8")
    assert bad.exit_code == 2 and "no GPU is visible" in bad.output


def test_train_inside_a_scheduler_job_reads_its_place(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in MAPPINGS[2][0].items():  # a Kubeflow pod, rank 1 of 2
        monkeypatch.setenv(key, value)
    result = invoke("train", "--model", local_model, "--data", chat_file, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "placement from kubeflow: NNODES=2, NODE_RANK=1, MASTER_ADDR=job-master-0" in (
        result.output
    )
    assert "NNODES=2" in result.output and "MASTER_PORT=23456" in result.output
    # no GPU here: PET_NPROC_PER_NODE 8 becomes 8 CPU processes
    assert "NPROC_PER_NODE=8" in result.output
    given = invoke(
        "train", "--model", local_model, "--data", chat_file, "--nnodes", "1", "--dry-run"
    )
    assert given.exit_code == 0 and "the command line's are used" in given.output
    assert "NNODES=" not in given.output


# --------------------------------------------------------------------------------------------------
# Slurm


def _bin(tmp_path: Path, name: str, script: str) -> Path:
    """A stand-in command on PATH (sbatch, squeue, ...) that records its argv."""
    folder = tmp_path / "slurm-bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(
        f"#!{sys.executable}\nimport sys, json\n"
        f"open({str(tmp_path / 'slurm-calls.jsonl')!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
        + script
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def calls_of(tmp_path: Path) -> list[list[str]]:
    """The argv of each stand-in Slurm command run, in order."""
    return [json.loads(x) for x in (tmp_path / "slurm-calls.jsonl").read_text().splitlines()]


SLURM_ARGS = [
    "--launcher",
    "slurm",
    "--nodes",
    "4",
    "--gpus-per-node",
    "8",
    "--partition",
    "gpu",
    "--time",
    "04:00:00",
    "--account",
    "mylab",
    "--sbatch-arg=--qos=high",
]


def test_slurm_prepares_the_run_folder_and_its_script(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "-o", "runs/s", *SLURM_ARGS
    )
    assert result.exit_code == 0, result.output
    run = Path("runs/s").absolute()
    assert result.stdout.strip().splitlines()[-1] == str(run)
    assert read_calls(fake_cli) == []  # nothing trained here
    script = (run / "launch.sbatch").read_text()
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        f"#SBATCH --job-name=qwenft-{run.name}",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --account=mylab",
        "#SBATCH --qos=high",
        f"#SBATCH --output={run}/slurm-%j.out",
    ]
    assert all("$" not in line for line in sbatch)  # sbatch never expands a variable there
    assert f"-m qwenft start {run}" in script and "srun --ntasks-per-node=1" in script
    m = json.loads((run / "qwenft.json").read_text())
    assert m["status"] == "prepared" and m["launch"] == {
        "launcher": "slurm",
        "script": "launch.sbatch",
    }
    assert (m["nnodes"], m["gpus"]) == (4, 8)
    assert yaml.safe_load((run / "train.yaml").read_text())["bf16"] is True
    assert "sbatch" in result.stderr and "launch.sbatch" in result.stderr


def test_slurm_submit_records_the_job_and_runs_shows_its_state(
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    count = tmp_path / "jobs"  # sbatch answers 4242, then 4243, ...
    count.write_text("4242")
    folder = _bin(
        tmp_path,
        "sbatch",
        f"n = int(open({str(count)!r}).read()); print(n); open({str(count)!r}, 'w').write(str(n + 1))\n",
    )
    state = tmp_path / "state"
    state.write_text("PENDING")
    _bin(tmp_path, "squeue", f"print(open({str(state)!r}).read())\n")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "-o",
        "runs/s",
        *SLURM_ARGS,
        "--submit",
    )
    assert result.exit_code == 0, result.output
    run = Path("runs/s").absolute()
    m = json.loads((run / "qwenft.json").read_text())
    assert m["status"] == "submitted" and m["launch"]["job_id"] == "4242"
    assert calls_of(tmp_path)[0][1:] == ["--parsable", str(run / "launch.sbatch")]
    listed = invoke("runs", "--json")
    assert [r["status"] for r in json.loads(listed.stdout)] == ["pending"]
    state.write_text("RUNNING")
    assert json.loads(invoke("runs", str(run), "--json").stdout)["status"] == "running"
    state.write_text("")  # gone from the queue; no sacct or scontrol here: as recorded
    assert json.loads(invoke("runs", str(run), "--json").stdout)["status"] == "submitted"
    # a job still queued is not submitted twice
    state.write_text("PENDING")
    again = invoke("resume", str(run), "--submit")
    assert again.exit_code == 2 and "job 4242 is pending" in again.output
    # the job ended (here: failed) after a checkpoint: resubmitted, it goes on from there
    state.write_text("FAILED")
    checkpoint = run / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    # an adapter with no tensors: a safetensors header of "{}" (8 bytes of length, then it)
    (checkpoint / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    local = invoke("resume", str(run))
    assert local.exit_code == 2 and f"qwenft resume {run} --submit" in local.output
    again = invoke("resume", str(run), "--submit")
    assert again.exit_code == 0, again.output
    m = json.loads((run / "qwenft.json").read_text())
    assert m["launch"]["job_id"] == "4243" and m["resumes"][-1]["from"] == "checkpoint-2"
    assert calls_of(tmp_path)[-1][1:] == ["--parsable", str(run / "launch.sbatch")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--launcher", "slurm"], "--launcher slurm needs --nodes"),
        (["--launcher", "slurm", "--nodes", "0"], "--nnodes at least 1"),
        (["--launcher", "slurm", "--nodes", "2", "--partition", "gpu a"], "--partition 'gpu a'"),
        (["--launcher", "slurm", "--nodes", "2", "--time", "4h"], "--time '4h'"),
        (["--launcher", "slurm", "--nodes", "2", "--submit"], "sbatch was not found"),
        (["--workers", "2"], "--workers is for --launcher ray, not --launcher local"),
        (["--launcher", "ray", "--partition", "gpu", "--workers", "1"], "--partition is for"),
        (["--launcher", "kubeflow", "--nodes", "2"], "only renders its pytorchjob.yaml"),
        (["--launcher", "moon"], "unknown --launcher 'moon'"),
    ],
)
def test_launch_refusals_write_and_submit_nothing(
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
    isolated: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    # no sbatch: the recording llamafactory-cli and this interpreter's folder only
    monkeypatch.setenv(
        "PATH", f"{fake_cli.parent / 'bin'}{os.pathsep}{Path(sys.executable).parent}"
    )
    before = written(Path.cwd(), isolated)
    result = invoke("train", "--model", local_model, "--data", chat_file, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []


def test_every_problem_of_the_launch_options_at_once(local_model: Path, chat_file: Path) -> None:
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "--launcher",
        "slurm",
        "--partition",
        "a b",
        "--image",
        "x",
    )
    assert result.exit_code == 2
    assert "3 problems" in result.output and "--launcher slurm needs --nodes" in result.output


def test_sbatch_script_for_one_cpu_node_has_no_gpu_line(tmp_path: Path) -> None:
    text = slurm.render_sbatch(slurm.SlurmJob("j", 1, None), tmp_path / "run dir", python="/py")
    assert "--gpus-per-node" not in text
    assert (
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 /py -m qwenft start '{tmp_path}/run dir'"
        in text
    )


def test_start_outside_a_job_step_is_refused(tmp_path: Path) -> None:
    result = invoke("start", str(tmp_path))
    assert result.exit_code == 2


@pytest.mark.parametrize("rank", [0, 1])
def test_start_runs_this_node_with_the_steps_variables(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    prepared = invoke(
        "train", "--model", local_model, "--data", chat_file, "-o", "runs/s",
        "--launcher", "slurm", "--nodes", "2", "--cpu-procs", "2",
    )  # fmt: skip
    assert prepared.exit_code == 0, prepared.output
    run = Path("runs/s").absolute()
    step = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": str(rank),
        "MASTER_ADDR": "node1",
        "MASTER_PORT": "29577",
    }
    for key, value in step.items():
        monkeypatch.setenv(key, value)
    result = invoke("start", str(run))
    assert result.exit_code == 0, result.output
    (call,) = read_calls(fake_cli)
    assert {
        k: call["env"][k] for k in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR")
    } == {
        "NNODES": "2",
        "NODE_RANK": str(rank),
        "NPROC_PER_NODE": "2",
        "MASTER_ADDR": "node1",
    }
    m = json.loads((run / "qwenft.json").read_text())
    if rank == 0:
        assert m["status"] == "completed" and m["launch"]["job_id"] == "77"
        assert m["env"]["RDZV_ID"] == "77"
    else:
        assert m["status"] == "prepared" and (run / "train.node1.log").is_file()


# --------------------------------------------------------------------------------------------------
# Kubeflow and SkyPilot

# The published fields used (kubeflow.org/v1 PyTorchJob: training-operator's PyTorchJobSpec and
# ReplicaSpec; SkyPilot's task YAML reference).
PYTORCHJOB_SPEC = {"nprocPerNode", "pytorchReplicaSpecs", "runPolicy", "elasticPolicy"}
REPLICA_SPEC = {"replicas", "restartPolicy", "template"}
SKYPILOT_TASK = {
    "name",
    "workdir",
    "num_nodes",
    "resources",
    "envs",
    "file_mounts",
    "setup",
    "run",
}


def test_kubeflow_dry_run_prints_a_pytorchjob_running_the_same_command(
    fake_cli: Path, local_model: Path, chat_file: Path, isolated: Path
) -> None:
    before = written(Path.cwd(), isolated)
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "--max-steps", "5",
        "--launcher", "kubeflow", "--nodes", "3", "--gpus-per-node", "8",
        "--image", "reg.example.com/qwenft:1", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.stdout)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert set(job["spec"]) <= PYTORCHJOB_SPEC and job["spec"]["nprocPerNode"] == "8"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 2)
    for spec in specs.values():
        assert set(spec) <= REPLICA_SPEC
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["image"] == "reg.example.com/qwenft:1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        command = container["command"]
        assert command[:2] == ["qwenft", "train"] and "--max-steps" in command
        assert str(chat_file) in command and "--gpus-per-node" in command
        for gone in ("--launcher", "--image", "--dry-run", "--nodes", "kubeflow", "3"):
            assert gone not in command
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []


def test_skypilot_dry_run_prints_a_task(fake_cli: Path, local_model: Path, chat_file: Path) -> None:
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "--launcher", "skypilot",
        "--nodes", "2", "--gpus", "4", "--accelerators", "H100:4", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    task = yaml.safe_load(result.stdout)
    assert set(task) <= SKYPILOT_TASK
    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:4"}
    assert task["run"].startswith("qwenft train --model") and "--launcher" not in task["run"]


def test_pod_command_drops_this_launchs_options() -> None:
    argv = ["train", "--launcher=ray", "--workers", "2", "--submit", "--data", "d.jsonl"]
    drop = {"--launcher": True, "--workers": True, "--submit": False}
    assert manifests.pod_command(argv, drop) == ["qwenft", "train", "--data", "d.jsonl"]
    assert (
        manifests.k8s_name("qwenft-Tiny_Qwen2-lora-20261203") == "qwenft-tiny-qwen2-lora-20261203"
    )


def test_ray_with_deepspeed_is_refused(
    fake_cli: Path, local_model: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qwenft.launch.ray.check_workers", lambda workers, gpus: [])
    args = ["--launcher", "ray", "--workers", "2", "--method", "full", "--dry-run"]
    result = invoke("train", "--model", local_model, "--data", chat_file, *args)
    assert result.exit_code == 2
    assert "--launcher ray runs without DeepSpeed (--deepspeed z3: full's auto is z3)" in (
        result.output
    )
    ok = invoke("train", "--model", local_model, "--data", chat_file, *args, "--deepspeed", "none")
    assert ok.exit_code == 0, ok.output
    assert "USE_RAY=1" in ok.output and "ray_num_workers: 2" in ok.output
