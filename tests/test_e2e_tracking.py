"""--report-to end to end (issue 22, part 4): one short real training of tiny-qwen2 with a held-out
split, reporting to TensorBoard, MLflow and W&B at once, offline. Each is proved from what it
wrote inside the run folder: TensorBoard's event files in RUN/tb and W&B's offline run in
RUN/wandb hold the run's losses (those of LLaMA-Factory's trainer_log.jsonl), and the MLflow store
RUN/mlflow.db holds exactly one run, named after the run folder, with those losses and the
evaluation LLaMA-Factory runs after training (which would otherwise be a second run with a random
name: qwenft.runs.tracking). `qwenft runs RUN` says where to look. Needs the tracking extra
(`make test` installs it)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers.builders import TRACKER_VARS
from tests.helpers.e2e import QUICK, Qwenft, losses, manifest, trainer_log


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file (run-ID.wandb: LevelDB's log format, 32 KiB
    blocks of chunks with 7-byte headers, after a 7-byte W&B header; each record a protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, header = 32768, 7
    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    rows, chunk, pos = [], b"", header
    while pos + header <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if left < header or (length, kind) == (0, 0):  # the block's zero padding
            pos += left
            continue
        chunk += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # a key with a "/" may come as its parts
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


def test_tensorboard_mlflow_and_wandb_record_one_run_each(
    qwenft: Qwenft, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in TRACKER_VARS:  # offline, whatever this machine's environment says
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "tracked"
    qwenft("train", "--model", "tiny-qwen2", "--data", chat_file, "-o", run, *QUICK,
           "--val-size", "0.5", "--report-to", "tensorboard,mlflow,wandb")  # fmt: skip
    curve = losses(run)
    steps = [r["current_steps"] for r in trainer_log(run) if "loss" in r]
    assert len(curve) == 4, curve
    token = manifest(run)["env"]["WANDB_RUN_ID"]

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tb = events.Scalars("train/loss")
    assert [s.step for s in tb] == steps
    assert [s.value for s in tb] == pytest.approx(curve, abs=1e-4)

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (only,) = client.search_runs(experiments)
    assert only.info.run_name == "tracked" and only.info.status == "FINISHED"
    history = client.get_metric_history(only.info.run_id, "loss")
    assert [m.value for m in history] == pytest.approx(curve, abs=1e-4)
    # the evaluation after training (its own run before the fold) is in the run: LLaMA-Factory
    # evaluates every step here, and once more at the end
    evaluations = client.get_metric_history(only.info.run_id, "eval_loss")
    assert len(evaluations) == len(steps) + 1, evaluations
    folded = client.search_runs(experiments, run_view_type=ViewType.DELETED_ONLY)
    assert [r.data.tags["qwenft.run"] for r in folded] == [token]

    (offline,) = (run / "wandb").glob(f"offline-run-*-{token}")
    rows = [r for r in wandb_history(offline / f"run-{token}.wandb") if "train/loss" in r]
    assert [r["train/global_step"] for r in rows] == steps
    assert [r["train/loss"] for r in rows] == pytest.approx(curve, abs=1e-4)

    shown = qwenft("runs", run).stdout.splitlines()
    assert f"tensorboard: tensorboard --logdir {run}/tb" in shown
    assert f"mlflow: mlflow ui --backend-store-uri sqlite:///{run}/mlflow.db (run tracked)" in shown
    assert f"wandb: wandb sync {run}/wandb/offline-run-*-{token}" in shown
