"""Experiment tracking (issue 22, part 4): `train --report-to tensorboard,mlflow,wandb,swanlab,
trackio`, the knob table's report_to row (a `many` knob: a comma list or a YAML list, each value
checked against its choices), every tracker writing inside the run folder and offline unless the
person's environment says otherwise (qwenft.runs.tracking), the choice in the manifest and
`qwenft runs RUN`. Refusals exit 2 with nothing written, whichever layer set the key. Fast tier: the
recording llamafactory-cli stands in (tests/test_e2e_tracking.py trains for real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from qwenft import knobs, settings
from qwenft.runs.manifest import read_manifest
from tests.helpers.builders import TRACKER_VARS, read_calls, table, written
from tests.helpers.cli import dry_run, invoke

pytestmark = pytest.mark.usefixtures("no_token_stats")

REPORT_TO = knobs.BY_KEY["report_to"]
MODULES = {module for need in REPORT_TO.needs for _, module in need.packages}


@pytest.fixture(autouse=True)
def machine(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """No GPU, none of the trackers' variables set, and every tracker's package installed
    (whatever this machine has) but for the modules a test adds to the returned set."""
    missing: set[str] = set()
    monkeypatch.setattr("qwenft.proc.launcher.detect_gpus", lambda: [])
    real = settings.has_module
    monkeypatch.setattr(
        settings,
        "has_module",
        lambda module: module not in missing and (module in MODULES or real(module)),
    )
    for var in TRACKER_VARS:
        monkeypatch.delenv(var, raising=False)
    return missing


@pytest.fixture
def train(local_model: Path, chat_file: Path, tmp_path: Path) -> tuple[Any, ...]:
    """`train` arguments up to the knobs: the model, the data, the run folder RUN (tmp/my-run)."""
    return ("--model", local_model, "--data", chat_file, "-o", tmp_path / "my-run")


def tracker_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in TRACKER_VARS}


def test_train_offers_report_to_with_its_choices() -> None:
    text = invoke("train", "--help").output
    assert "--report-to" in text and "[tensorboard|mlflow|wandb|swanlab|trackio],..." in text
    assert "--report-to" not in invoke("plan", "--help").output


def test_the_knob_takes_a_comma_list_or_a_list() -> None:
    assert REPORT_TO.given("tensorboard, mlflow,tensorboard,") == ("tensorboard", "mlflow")
    assert REPORT_TO.given(["wandb", "mlflow"]) == ("wandb", "mlflow")
    assert REPORT_TO.given("none") == REPORT_TO.given(None) == REPORT_TO.given([]) == ()
    assert knobs.as_lists({"report_to": "mlflow,wandb", "lora_rank": 8}) == {
        "report_to": ["mlflow", "wandb"]
    }
    assert knobs.as_lists({"report_to": "none"}) == {"report_to": "none"}


# how --report-to is set: the option, --set (a comma list, a YAML list), --config
LAYERS = [
    ("option", ["--report-to", "tensorboard,mlflow,wandb"]),
    ("set", ["--set", "report_to=tensorboard,mlflow,wandb"]),
    ("set-list", ["--set", "report_to=[tensorboard, mlflow, wandb]"]),
    ("config", ["--config", "report_to: [tensorboard, mlflow, wandb]"]),
    ("repeated", ["--report-to", "tensorboard,tensorboard,mlflow,wandb"]),
]


@table("layer, args", LAYERS)
def test_every_layer_sets_the_trackers_alike(
    layer: str, args: list[str], train: tuple[Any, ...], tmp_path: Path, fake_cli: Path
) -> None:
    if layer == "config":
        (tmp_path / "extra.yaml").write_text(args[1])
        args = ["--config", str(tmp_path / "extra.yaml")]
    config, env, result = dry_run(*train, *args)
    run = tmp_path / "my-run"
    assert config["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert config["run_name"] == "my-run"  # each tracker's run is named after the run folder
    token = env["WANDB_RUN_ID"]
    assert tracker_env(env) == {
        "TENSORBOARD_LOGGING_DIR": f"{run}/tb",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run}/mlflow.db",
        "MLFLOW_RUN_CONTEXT": f'{{"qwenft.run": "{token}"}}',
        "WANDB_DIR": str(run),
        "WANDB_MODE": "offline",
        "WANDB_RUN_ID": token,
        "WANDB_RESUME": "allow",
    }
    assert f"tracking: tensorboard --logdir {run}/tb" in result.output
    assert f"tracking: mlflow ui --backend-store-uri sqlite:///{run}/mlflow.db" in result.output
    assert f"tracking: wandb sync {run}/wandb/offline-run-*-{token}" in result.output
    assert read_calls(fake_cli) == [] and not run.exists()


# each tracker alone: the train.yaml keys and the variables it brings (RUN: the run folder)
TRACKERS = [
    ("tensorboard", {}, {"TENSORBOARD_LOGGING_DIR": "RUN/tb"}),
    ("mlflow", {}, {"MLFLOW_TRACKING_URI": "sqlite:///RUN/mlflow.db", "MLFLOW_RUN_CONTEXT": ...}),
    (
        "wandb",
        {},
        {"WANDB_DIR": "RUN", "WANDB_MODE": "offline", "WANDB_RUN_ID": ..., "WANDB_RESUME": "allow"},
    ),
    (
        "swanlab",  # report_to: swanlab crashes LLaMA-Factory 0.9.5; use_swanlab does not
        {
            "use_swanlab": True,
            "swanlab_mode": "local",
            "swanlab_logdir": "RUN/swanlog",
            "swanlab_run_name": "my-run",
        },
        {},
    ),
    ("trackio", {}, {"TRACKIO_DIR": "RUN/trackio"}),
]


@table("tracker, keys, variables", TRACKERS)
def test_each_tracker_writes_inside_the_run_folder(
    tracker: str,
    keys: dict[str, Any],
    variables: dict[str, Any],
    train: tuple[Any, ...],
    tmp_path: Path,
    fake_cli: Path,
) -> None:
    config, env, _ = dry_run(*train, "--report-to", tracker)
    run = str(tmp_path / "my-run")
    assert config["report_to"] == [tracker] and config["run_name"] == "my-run"
    assert {k: config.get(k) for k in keys} == {
        k: v.replace("RUN", run) if isinstance(v, str) else v for k, v in keys.items()
    }
    assert {k: env.get(k) for k in variables if variables[k] is not ...} == {
        k: v.replace("RUN", run) for k, v in variables.items() if v is not ...
    }
    assert set(tracker_env(env)) == set(variables)


def test_no_tracker_by_default(train: tuple[Any, ...], fake_cli: Path) -> None:
    for args in ([], ["--report-to", "none"], ["--set", "report_to=none"]):
        config, env, result = dry_run(*train, *args)
        assert config["report_to"] == "none" and "run_name" not in config
        assert tracker_env(env) == {} and "tracking:" not in result.output


# the person's own variables: kept (not overridden, not repeated in the launch's), and said
ENVIRONMENTS = [
    (
        "mlflow-server",
        "mlflow",
        {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"},
        ["tracking: http://mlflow.example:5000 (run my-run)", "MLFLOW_TRACKING_URI=http://"],
    ),
    (
        "wandb-key",
        "wandb",
        {"WANDB_API_KEY": "secret"},
        ["WANDB_API_KEY from your environment: wandb runs online", "W&B project llamafactory"],
    ),
    (
        "wandb-online",
        "wandb",
        {"WANDB_MODE": "online", "WANDB_DIR": "/elsewhere"},
        ["WANDB_MODE=online from your environment", "WANDB_DIR=/elsewhere from your"],
    ),
    (
        "tensorboard-dir",
        "tensorboard",
        {"TENSORBOARD_LOGGING_DIR": "/tb"},
        ["tracking: tensorboard --logdir /tb", "TENSORBOARD_LOGGING_DIR=/tb from your"],
    ),
]


@table("case, tracker, environ, said", ENVIRONMENTS)
def test_the_persons_environment_is_kept_and_said(
    case: str,
    tracker: str,
    environ: dict[str, str],
    said: list[str],
    train: tuple[Any, ...],
    monkeypatch: pytest.MonkeyPatch,
    fake_cli: Path,
) -> None:
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    _, env, result = dry_run(*train, "--report-to", tracker)
    assert not set(environ) & set(env), env
    assert "WANDB_MODE" not in env or tracker != "wandb"
    for part in said:
        assert part in result.output, result.output


OFFERED = "(tensorboard, mlflow, wandb, swanlab, trackio)"
# (how it is set) -> what the refusal says
REFUSED = [
    ("option", ["--report-to", "comet_ml"], ["--report-to comet_ml is not one of the", OFFERED]),
    ("set-all", ["--set", "report_to=all"], ["--report-to all is not one of", "a comma list"]),
    ("none-and-more", ["--report-to", "none,mlflow"], ["--report-to none is not one of"]),
    (
        "config",
        ["--config", "report_to: [tensorboard, neptune, clearml]"],
        ["--report-to neptune is not", "--report-to clearml is not", OFFERED],
    ),
    (
        "swanlab-callback",  # transformers' own SwanLab callback: LLaMA-Factory 0.9.5 crashes
        ["--report-to", "wandb,swanlab", "--set", "use_swanlab=false"],
        ["--report-to swanlab with use_swanlab: false", "No active Run", "#10704"],
    ),
]


@table("case, args, said", REFUSED)
def test_other_trackers_are_refused_and_nothing_written(
    case: str,
    args: list[str],
    said: list[str],
    train: tuple[Any, ...],
    tmp_path: Path,
    fake_cli: Path,
) -> None:
    if args[0] == "--config":
        (tmp_path / "extra.yaml").write_text(args[1])
        args = ["--config", str(tmp_path / "extra.yaml")]
    before = written(tmp_path, Path.cwd())
    result = invoke("train", *train, *args)
    assert result.exit_code == 2, result.output
    for part in said:
        assert part in result.output, result.output
    assert written(tmp_path, Path.cwd()) == before and read_calls(fake_cli) == []


# a tracker, the module missing -> what the refusal names
MISSING = [
    ("mlflow", "mlflow", ["the mlflow-skinny package (not installed)", "QWENFT_EXTRAS=tracking"]),
    ("mlflow", "alembic", ["the alembic package (not installed)", "qwenft[tracking]"]),
    ("tensorboard", "tensorboard", ["--report-to tensorboard needs the tensorboard package"]),
    ("wandb", "wandb", ["--report-to wandb needs the wandb package"]),
    ("swanlab", "swanlab", ["the swanlab package (not installed)", "pip install swanlab"]),
    ("trackio", "trackio", ["the trackio package (not installed)", "pip install trackio"]),
]


@pytest.mark.parametrize(("tracker", "module", "said"), MISSING, ids=[m for _, m, _ in MISSING])
def test_a_missing_package_is_named_before_launch(
    tracker: str,
    module: str,
    said: list[str],
    machine: set[str],
    train: tuple[Any, ...],
    tmp_path: Path,
    fake_cli: Path,
) -> None:
    machine.add(module)
    before = written(tmp_path, Path.cwd())
    for args in (
        ["--report-to", tracker],
        ["--set", f"report_to={tracker}"],
        ["--report-to", tracker, "--dry-run"],
    ):
        result = invoke("train", *train, *args)
        assert result.exit_code == 2, result.output
        for part in said:
            assert part in result.output, result.output
    assert written(tmp_path, Path.cwd()) == before and read_calls(fake_cli) == []


def test_the_manifest_records_the_trackers_and_runs_says_where_to_look(
    train: tuple[Any, ...], tmp_path: Path, fake_cli: Path
) -> None:
    result = invoke("train", *train, "--report-to", "tensorboard,wandb")
    assert result.exit_code == 0, result.output
    run = tmp_path / "my-run"
    (call,) = read_calls(fake_cli)
    token = call["env"]["WANDB_RUN_ID"]
    assert call["env"]["TENSORBOARD_LOGGING_DIR"] == f"{run}/tb"
    assert call["yaml"]["report_to"] == ["tensorboard", "wandb"]
    looks = {
        "tensorboard": f"tensorboard --logdir {run}/tb",
        "wandb": f"wandb sync {run}/wandb/offline-run-*-{token}",
    }
    assert read_manifest(run).tracking == looks
    assert yaml.safe_load((run / "train.yaml").read_text())["run_name"] == "my-run"
    shown = invoke("runs", run)
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[1].endswith(str(run))  # its line of the list
    for tracker, look in looks.items():
        assert f"{tracker}: {look}" in shown.output.splitlines()
    assert invoke("runs", "show", run, "--json").output.count('"tensorboard --logdir') == 1
    # a run without trackers shows none, and the list itself is unchanged
    plain = invoke("train", "--model", train[1], "--data", train[3], "-o", tmp_path / "plain")
    assert plain.exit_code == 0 and read_manifest(tmp_path / "plain").tracking is None
    assert "tensorboard" not in invoke("runs", tmp_path / "plain").output
    assert str(run) in invoke("runs", "--dir", tmp_path).output
