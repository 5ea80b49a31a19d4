"""Experiment trackers (`train --report-to`, the knob table's report_to row): what each one gets so
that it writes inside the run folder, offline, and where to look afterwards (the manifest's
`tracking`, shown by `qwenft runs RUN`). A variable the person's environment already sets is
theirs: kept, and said before launch (MLFLOW_TRACKING_URI of their server, WANDB_MODE=online or
a WANDB_API_KEY, their own folders). Every tracker names its run after the run folder (run_name).

- tensorboard: TENSORBOARD_LOGGING_DIR=RUN/tb (transformers 5 reads it; logging_dir is deprecated);
- mlflow: MLFLOW_TRACKING_URI=sqlite:///RUN/mlflow.db (mlflow 3 refuses a file: store unless
  MLFLOW_ALLOW_FILE_STORE is set);
- wandb: WANDB_MODE=offline, WANDB_DIR=RUN (RUN/wandb/offline-run-*), WANDB_RUN_ID the run's
  tracking id with WANDB_RESUME=allow, so `qwenft resume` continues the same run;
- swanlab: use_swanlab in local mode, logs in RUN/swanlog (`report_to: swanlab` crashes LLaMA-Factory
  0.9.5 with "No active Run", its issue #10704; with use_swanlab it drops swanlab from report_to
  and runs its own callback);
- trackio: TRACKIO_DIR=RUN/trackio (no trackio_space_id: no Space on the Hub).

One MLflow run per training: transformers' MLflowCallback ends its run in on_train_end, and
LLaMA-Factory evaluates after trainer.train() returns (do_eval, with a held-out split); that
evaluation's metrics find no active run, and mlflow's fluent API starts another one, with a
random name. MLFLOW_RUN_ID cannot carry the first over (mlflow's start_run removes it from the
environment once used), so every run the training starts carries the tag `qwenft.run` (the run's
tracking id, through MLFLOW_RUN_CONTEXT), and after each launch (`resume` too) qwenft folds the
later runs into the first: their metrics copied over, the runs deleted (fold_mlflow_runs).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenft.choices import Tracker
from qwenft.knobs import BY_KEY

TAG = "qwenft.run"  # the MLflow tag every run of one training carries
RUN_CONTEXT = "MLFLOW_RUN_CONTEXT"  # mlflow's variable of tags for every run a process starts


@dataclass
class Tracking:
    """What the chosen trackers add to a run: train.yaml keys (beside report_to), launch
    variables, where to look (tracker -> a command or a place) and what the environment decided."""

    keys: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    look: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def chosen(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The trackers a train.yaml reports to."""
    return BY_KEY["report_to"].given(config.get("report_to"))


def plan(
    config: Mapping[str, Any], run_dir: Path, environ: Mapping[str, str] | None = None
) -> Tracking:
    """The trackers' keys and variables for a run folder; keys the config sets are left as set.
    environ: the person's environment (None: os.environ as it is now, read at the call: a library
    may have replaced the os.environ object since import)."""
    environ = os.environ if environ is None else environ
    out = Tracking()
    trackers = chosen(config)
    if not trackers:
        return out
    name, token = config.get("run_name", run_dir.name), secrets.token_hex(8)
    out.keys["run_name"] = name

    def own(var: str, value: str) -> str:
        """qwenft's value of var, unless the environment has one (said, and kept)."""
        if var in environ:
            out.notes.append(f"{var}={environ[var]} from your environment")
            return environ[var]
        out.env[var] = value
        return value

    for tracker in trackers:
        if tracker == Tracker.TENSORBOARD:
            where = own("TENSORBOARD_LOGGING_DIR", str(run_dir / "tb"))
            out.look[tracker] = f"tensorboard --logdir {where}"
        elif tracker == Tracker.MLFLOW:
            uri = own("MLFLOW_TRACKING_URI", f"sqlite:///{run_dir / 'mlflow.db'}")
            out.env[RUN_CONTEXT] = json.dumps({TAG: token})
            ui = "mlflow ui --backend-store-uri " if uri.startswith("sqlite:") else ""
            out.look[tracker] = f"{ui}{uri} (run {name})"
        elif tracker == Tracker.WANDB:
            where = own("WANDB_DIR", str(run_dir))
            if "WANDB_MODE" not in environ and "WANDB_API_KEY" in environ:
                out.notes.append("WANDB_API_KEY from your environment: wandb runs online")
                mode = "online"
            else:
                mode = own("WANDB_MODE", "offline")
            out.env.update(WANDB_RUN_ID=token, WANDB_RESUME="allow")
            project = environ.get("WANDB_PROJECT", "llamafactory")  # LLaMA-Factory's default
            out.look[tracker] = (
                f"wandb sync {where}/wandb/offline-run-*-{token}"
                if mode == "offline"
                else f"W&B project {project}, run {name} (id {token})"
            )
        elif tracker == Tracker.SWANLAB:
            out.keys.update(
                use_swanlab=True,
                swanlab_mode="local",
                swanlab_logdir=str(run_dir / "swanlog"),
                swanlab_run_name=name,
            )
            swan = {**out.keys, **config}
            out.look[tracker] = (
                f"swanlab watch {swan['swanlab_logdir']}"
                if swan["swanlab_mode"] == "local"
                else f"SwanLab ({swan['swanlab_mode']}), experiment {swan['swanlab_run_name']}"
            )
        elif tracker == Tracker.TRACKIO:
            where = own("TRACKIO_DIR", str(run_dir / "trackio"))
            out.look[tracker] = f"TRACKIO_DIR={where} trackio show"
    out.keys = {k: v for k, v in out.keys.items() if k not in config}
    return out


def fold_mlflow_runs(env: Mapping[str, str], progress: Callable[[str], None]) -> None:
    """After a launch that reported to MLflow: fold the runs this training started after its first
    (LLaMA-Factory's evaluation after training, a resume) into the first. A store that cannot be
    reached is said, not fatal: the training itself is done."""
    if RUN_CONTEXT not in env:
        return
    from mlflow import MlflowClient

    token = json.loads(env[RUN_CONTEXT])[TAG]
    try:
        client = MlflowClient(env.get("MLFLOW_TRACKING_URI"))  # None: the person's own
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`{TAG}` = '{token}'",
            order_by=["attributes.start_time ASC"],
        )
        first, *later = runs or [None]
        for run in later:
            for key in run.data.metrics:
                history = client.get_metric_history(run.info.run_id, key)
                client.log_batch(first.info.run_id, metrics=history)
            client.delete_run(run.info.run_id)
    except Exception as exc:  # the person's server, any failure of mlflow's
        progress(f"warning: mlflow: the runs tagged {TAG}={token} were not folded into one: {exc}")
        return
    if later:
        progress(
            f"mlflow: folded {len(later)} more run(s) of this training (LLaMA-Factory's "
            f"evaluation after training starts one) into run {first.info.run_name}"
        )
