"""Bad input is refused before any time is spent (issue 11, items 4-6): every knob, --set and
--config key is checked against LLaMA-Factory's own argument dataclasses (qwenft.lf.args) and the
ranges in qwenft.settings, --gpus needs GPUs, and a missing folder says "not found". Each refusal:
exit 2, a message that names the qwenft option, and nothing written.

The fast tests run the real CLI against the stand-in llamafactory-cli; the model-tier tests prove
the argument table is LLaMA-Factory's (read from its dataclasses) and refuse a cutoff_len that
cuts every sample, measured with the tiny model's tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qwenft import knobs, settings
from qwenft.errors import QwenftError
from qwenft.lf import args as lf_args
from qwenft.lf import render
from tests.helpers.builders import (
    chat_rows,
    kto_rows,
    pair_rows,
    read_calls,
    text_rows,
    write_jsonl,
    written,
)
from tests.helpers.cli import invoke


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without GPUs, whatever this one has (the --gpus refusal depends on it)."""
    monkeypatch.setattr("qwenft.proc.launcher.detect_gpus", lambda: [])


BAD_TRAIN = [
    (["--max-steps", "0"], ["--max-steps must be a positive whole number, got 0"]),
    (["--max-steps", "-1"], ["--max-steps must be a positive whole number, got -1"]),
    (["--lr", "0"], ["--lr must be positive", "learning_rate"]),
    (["--lr", "-1e-4"], ["--lr must be positive", "-0.0001"]),
    (["--batch-size", "0"], ["--batch-size must be a positive whole number"]),
    (["--grad-accum", "0"], ["--grad-accum must be a positive whole number"]),
    (["--val-size", "1"], ["--val-size must be in [0, 1)", "got 1.0"]),
    (["--val-size", "-0.1"], ["--val-size must be in [0, 1)"]),
    (["--epochs", "0"], ["--epochs must be positive", "num_train_epochs"]),
    (["--cutoff-len", "0"], ["--cutoff-len must be a positive whole number"]),
    (["--lora-rank", "0"], ["--lora-rank must be a positive whole number"]),
    # the same ranges whichever layer sets the key, and the message says where it came from
    (["--set", "max_steps=0"], ["--max-steps must be", "from --set max_steps=0"]),
    (["--set", "learning_rate=-1"], ["--lr must be positive", "from --set learning_rate=-1"]),
    (["--config", "{epochs0}"], ["--epochs must be positive", "from --config"]),
    # keys LLaMA-Factory does not know, with a did-you-mean from its own list
    (["--set", "lora_rnak=8"], ["no training argument 'lora_rnak'", "--lora-rank (lora_rank)"]),
    (["--config", "{unknown}"], ["no training argument 'lerning_rate'", "from --config", "--lr"]),
    (["--set", "no_such_key_at_all=1"], ["no training argument 'no_such_key_at_all'"]),
    # values of the wrong type for the dataclass field
    (["--set", "learning_rate=abc"], ["--lr must be a number", "'abc'"]),
    (["--set", "max_steps=1.5"], ["--max-steps must be a whole number"]),
    (["--set", "max_steps=null"], ["--max-steps must be a whole number", "null"]),
    (["--set", "bf16=maybe"], ["bf16 must be true or false"]),
    (["--set", "lr_scheduler_type=cosin"], ["lr_scheduler_type must be one of", "cosine"]),
    (["--set", "stage=dpo2"], ["stage must be one of", "sft"]),
    # --gpus needs GPUs to launch here (--dry-run renders for a GPU node: LAUNCH_ONLY); CPU
    # processes are asked for by name
    (["--gpus", "2"], ["--gpus 2: no GPU is visible", "--cpu-procs 2"]),
    (["--gpus", "1"], ["--gpus 1: no GPU is visible", "--cpu-procs 1"]),
    (["--gpus", "0"], ["--gpus must be at least 1"]),
    (["--cpu-procs", "0"], ["--cpu-procs must be at least 1"]),
    (["--gpus", "2", "--cpu-procs", "2"], ["--gpus and --cpu-procs exclude each other"]),
    # the stage knobs (issue 12): ranges, and keys the run's stage or method would not read
    (["--stage", "rlhf"], ["unknown --stage 'rlhf'", "sft, pt, dpo, orpo, simpo, kto"]),
    (["--beta", "0"], ["--beta must be positive, got 0.0 (pref_beta)"]),
    (["--sft-weight", "-1"], ["--sft-weight must be 0 or more", "pref_ftx"]),
    (["--trainable-layers", "0"], ["--trainable-layers must be a whole number other than 0"]),
    # the bit widths each quantization method takes (LLaMA-Factory's own limits)
    (
        ["--method", "qlora", "--set", "quantization_bit=3"],
        ["--bits 3 with quantization_method: bnb"],
    ),
    (
        ["--method", "qlora", "--set", "quantization_bit=7"],
        ["--bits must be 1, 2, 3, 4, 5, 6 or 8"],
    ),
    (
        ["--method", "qlora", "--set", "quantization_method=eetq", "--set", "quantization_bit=4"],
        ["--bits 4 with quantization_method: eetq", "EETQ quantizes to 8 bits only"],
    ),
    (["--beta", "0.2"], ["--beta (pref_beta) does nothing for --stage sft", "dpo, orpo"]),
    (["--sft-weight", "1"], ["--sft-weight (pref_ftx) does nothing for --stage sft"]),
    (["--pref-loss", "ipo"], ["--pref-loss (pref_loss) does nothing for --stage sft"]),
    (["--set", "simpo_gamma=1"], ["simpo_gamma does nothing for --stage sft", "simpo"]),
    (["--trainable-layers", "1"], ["does nothing for --method lora", "--method freeze"]),
    (["--method", "full", "--lora-rank", "8"], ["--lora-rank (lora_rank) does nothing for"]),
    (["--method", "freeze", "--trainable-layers", "30"], ["has 24 decoder layers"]),
    (["--set", "stage=dpo"], ["may not set stage", "--stage"]),
]


LAUNCH_ONLY = [["--gpus", "2"], ["--gpus", "1"]]  # refused for a launch here, not a --dry-run


@pytest.mark.parametrize(
    ("bad", "message", "dry_run"),
    [
        pytest.param(bad, message, dry, id=f"{' '.join(bad)}-{'dry-run' if dry else 'launch'}")
        for bad, message in BAD_TRAIN
        for dry in (False, True)
        if not (dry and bad in LAUNCH_ONLY)  # test_launch.py: a login node's --dry-run
    ],
)
def test_train_refuses_bad_input_and_writes_nothing(
    fake_cli: Path,
    no_token_stats: None,
    local_model: Path,
    chat_file: Path,
    tmp_path: Path,
    isolated: Path,
    bad: list[str],
    message: list[str],
    dry_run: bool,
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "unknown.yaml").write_text("lerning_rate: 1.0e-4\nlora_rank: 8\n")
    (configs / "epochs0.yaml").write_text("num_train_epochs: 0\n")
    bad = [str(configs / f"{a[1:-1]}.yaml") if a.startswith("{") else a for a in bad]
    before = written(Path.cwd(), isolated, chat_file.parent)
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "-o",
        "runs/x",
        *bad,
        *(["--dry-run"] if dry_run else []),
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    for part in message:
        assert part in result.output, (part, result.output)
    assert written(Path.cwd(), isolated, chat_file.parent) == before
    assert not Path("runs").exists()
    assert not (isolated / "datasets" / "dataset_info.json").exists()
    assert read_calls(fake_cli) == []


# Data that does not fit the stage (issue 12, item 3): what the stage needs, which stages take the
# file, and the way to the right data.
DATA_FILES = {
    "sft": lambda p: write_jsonl(p / "chat.jsonl", chat_rows()),
    "preference": lambda p: write_jsonl(p / "pairs.jsonl", pair_rows()),
    "kto": lambda p: write_jsonl(p / "kto.jsonl", kto_rows()),
    "pt": lambda p: write_jsonl(p / "texts.jsonl", text_rows()),
    "txt": lambda p: (p / "corpus.txt").write_text("One text.\nAnother.\n") and p / "corpus.txt",
}
STAGE_MISMATCH = [
    (
        "dpo",
        "sft",
        [
            "--stage dpo trains on preference pairs",
            "chosen",
            "holds chat conversations",
            "sft data trains with --stage sft",
            "qwenft data convert",
        ],
    ),
    ("orpo", "kto", ["--stage orpo trains on preference pairs", "labelled answers", "--stage kto"]),
    (
        "sft",
        "preference",
        [
            "--stage sft trains on chat conversations",
            "preference pairs",
            "--stage dpo | orpo | simpo",
        ],
    ),
    ("kto", "sft", ["--stage kto trains on labelled answers", 'boolean "label"', "--stage sft"]),
    ("kto", "preference", ["--stage kto", "--stage dpo | orpo | simpo"]),
    ("pt", "sft", ["--stage pt trains on plain text", "--stage sft", "qwenft data convert"]),
    ("sft", "txt", ["--stage sft trains on chat conversations", "plain text", "--stage pt"]),
    ("simpo", "pt", ["--stage simpo trains on preference pairs", "--stage pt"]),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["launch", "dry-run"])
@pytest.mark.parametrize(
    ("stage", "kind", "message"), STAGE_MISMATCH, ids=[f"{s}-on-{k}" for s, k, _ in STAGE_MISMATCH]
)
def test_stage_and_data_that_do_not_fit_are_refused(
    fake_cli: Path,
    no_token_stats: None,
    local_model: Path,
    tmp_path: Path,
    isolated: Path,
    stage: str,
    kind: str,
    message: list[str],
    dry_run: bool,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = DATA_FILES[kind](data_dir)
    before = written(Path.cwd(), isolated, data_dir)
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        data,
        "--stage",
        stage,
        "-o",
        "runs/x",
        *(["--dry-run"] if dry_run else []),
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "nothing was started" in result.output
    for part in message:
        assert part in result.output, (part, result.output)
    assert written(Path.cwd(), isolated, data_dir) == before
    assert read_calls(fake_cli) == []


@pytest.mark.parametrize(
    ("stage", "kind", "args", "message"),
    [
        ("orpo", "preference", ["--pref-loss", "ipo"], "--stage orpo sets pref_loss: orpo itself"),
        ("simpo", "preference", ["--pref-loss", "sigmoid"], "--stage simpo sets pref_loss"),
        ("dpo", "preference", ["--pref-loss", "orpo"], "train --stage orpo"),
        ("dpo", "preference", ["--set", "pref_loss=kto_pair"], "--stage kto"),
        ("dpo", "preference", ["--set", "kto_chosen_weight=2"], "applies to --stage kto"),
        ("kto", "kto", ["--set", "simpo_gamma=1"], "applies to --stage simpo"),
        ("pt", "pt", ["--overlength", "drop"], "does not apply to packed pre-training"),
        ("pt", "txt", ["--overlength", "fail"], "does not apply to packed pre-training"),
        ("pt", "txt", ["--set", "packing=false", "--overlength", "drop"], "qwenft data convert"),
    ],
)
def test_stage_knobs_that_do_not_fit_are_refused(
    fake_cli: Path,
    no_token_stats: None,
    local_model: Path,
    tmp_path: Path,
    stage: str,
    kind: str,
    args: list[str],
    message: str,
) -> None:
    data = DATA_FILES[kind](tmp_path)
    result = invoke("train", "--model", local_model, "--data", data, "--stage", stage, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not Path("runs").exists() and read_calls(fake_cli) == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--cutoff-len", "0", "--cutoff-len must be a positive whole number, got 0"),
        ("--batch-size", "0", "--batch-size must be a positive whole number, got 0"),
        ("--lora-rank", "-3", "--lora-rank must be a positive whole number, got -3"),
    ],
)
def test_plan_and_train_refuse_alike(
    fake_cli: Path,
    no_token_stats: None,
    local_model: Path,
    chat_file: Path,
    option: str,
    value: str,
    message: str,
) -> None:
    plan = invoke("plan", "-m", "qwen2-7b-instruct", option, value)
    train = invoke("train", "-m", local_model, "--data", chat_file, option, value, "--dry-run")
    for result in (plan, train):
        assert result.exit_code == 2 and message in result.output, result.output
    # one home: the same sentence from both commands
    assert plan.output.splitlines()[0] == train.output.splitlines()[0]


def test_knobs_in_range_still_train(
    fake_cli: Path, no_token_stats: None, local_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("learning_rate: 1e-4\nlora_alpha: 32\nrun_name: 2024\n")  # YAML 1.1 texts
    result = invoke(
        "train",
        "--model",
        local_model,
        "--data",
        chat_file,
        "-o",
        "runs/ok",
        "--max-steps",
        "1",
        "--val-size",
        "0",
        "--config",
        extra,
        "--set",
        "lr_scheduler_type=constant",
        "--set",
        "weight_decay=0.01",
    )
    assert result.exit_code == 0, result.output
    cfg = read_calls(fake_cli)[-1]["yaml"]
    assert cfg["max_steps"] == 1 and cfg["lr_scheduler_type"] == "constant"
    # as LLaMA-Factory needs them: 1e-4 a number, run_name text
    assert cfg["learning_rate"] == 1e-4 and cfg["run_name"] == "2024"


def test_cpu_procs_runs_processes_without_gpus(
    fake_cli: Path, no_token_stats: None, local_model: Path, chat_file: Path
) -> None:
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "--cpu-procs", "2", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "FORCE_TORCHRUN=1" in result.output and "NPROC_PER_NODE=2" in result.output


def test_processes_per_node() -> None:
    gpu = {"name": "H100", "memory_gib": 80.0, "compute_cap": 9.0}
    assert settings.processes_per_node(None, None, []) == 1
    assert settings.processes_per_node(None, None, [gpu, gpu]) == 2
    assert settings.processes_per_node(2, None, [gpu, gpu]) == 2
    assert settings.processes_per_node(None, 3, []) == 3
    with pytest.raises(QwenftError, match="--cpu-procs is for machines without GPUs") as info:
        settings.processes_per_node(None, 2, [gpu])
    assert info.value.hint == "use --gpus 2"
    with pytest.raises(QwenftError, match="no GPU is visible"):
        settings.processes_per_node(4, None, [])


def test_gpus_on_a_gpu_machine_still_plans(fake_cli: Path, chat_file: Path) -> None:
    from qwenft.train import TrainRequest, plan_train

    gpus = [{"name": "A100", "memory_gib": 80.0, "compute_cap": 8.0}] * 2
    req = TrainRequest(model="Qwen/Qwen2.5-0.5B-Instruct", data=chat_file, gpus=2)
    assert plan_train(req, gpus_seen=gpus).env["NPROC_PER_NODE"] == "2"
    with pytest.raises(QwenftError, match="--cpu-procs is for machines without GPUs"):
        plan_train(TrainRequest(model="Qwen/Qwen2.5-0.5B", data=chat_file, cpu_procs=2), gpus)


def test_key_options_are_real_options() -> None:
    """Every option the messages name exists (train's knobs, or plan's --bits/--lora-target)."""
    helps = invoke("train", "--help").output + invoke("plan", "--help").output
    missing = [o for o in settings.KEY_OPTIONS.values() if o not in helps]
    # --save-steps / --logging-steps arrive with train's step options (issue 11, item 3)
    assert set(missing) <= {"--save-steps", "--logging-steps"}, missing
    assert "--cpu-procs" in invoke("train", "--help").output


# --------------------------------------------------------------------------------------------------
# the argument table: where it comes from (fast: no LLaMA-Factory import in this process)


def _fake_table() -> lf_args.ArgTable:
    versions = lf_args.installed_versions() or {"llamafactory": "0", "transformers": "0"}
    return lf_args.ArgTable(
        versions, {"lora_rank": lf_args.Arg("int"), "learning_rate": lf_args.Arg("float")}
    )


def test_table_is_computed_once_then_cached_in_home(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if lf_args.installed_versions() is None:
        pytest.skip("LLaMA-Factory is not installed beside qwenft")
    calls: list[int] = []

    def read() -> lf_args.ArgTable:
        calls.append(1)
        return _fake_table()

    monkeypatch.setattr(lf_args, "_snapshot", lambda: None)  # versions the snapshot lacks
    monkeypatch.setattr(lf_args, "read_dataclasses", read)
    monkeypatch.setattr(lf_args, "_memo", {})
    first = lf_args.table()
    cached = lf_args.cache_path(first.versions)
    assert cached.is_relative_to(isolated) and cached.is_file()
    monkeypatch.setattr(lf_args, "_memo", {})  # a new process: read from the file
    again = lf_args.table()
    assert calls == [1] and again.fields == first.fields and again.source == str(cached)
    cached.write_text("{damaged")
    monkeypatch.setattr(lf_args, "_memo", {})
    assert lf_args.table() is not None and calls == [1, 1]  # read again, rewritten
    assert json.loads(cached.read_text())["fields"]["lora_rank"][0] == "int"


def test_without_llamafactory_keys_go_unchecked_but_ranges_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lf_args, "installed_versions", lambda: None)
    req = settings.RunRequest(model="qwen2-7b-instruct", set_items=["lora_rnak=8"])
    assert settings.resolve(req).overrides["lora_rnak"] == 8
    with pytest.raises(QwenftError, match="--lr must be positive"):
        settings.resolve(settings.RunRequest(model="qwen2-7b-instruct", knobs={"learning_rate": 0}))


def test_allow_extra_args_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory ignores unknown keys under ALLOW_EXTRA_ARGS=1; so does the check."""
    req = settings.RunRequest(model="qwen2-7b-instruct", set_items=["lora_rnak=8"])
    with pytest.raises(QwenftError, match="lora_rnak"):
        settings.resolve(req)
    monkeypatch.setenv("ALLOW_EXTRA_ARGS", "1")
    assert settings.resolve(req).overrides["lora_rnak"] == 8


def test_coerce() -> None:
    arg = lf_args.Arg
    assert lf_args.coerce(arg("float"), "1e-4") == 1e-4
    assert lf_args.coerce(arg("float"), 3) == 3
    assert lf_args.coerce(arg("str"), 2024) == "2024"
    assert lf_args.coerce(arg("int", nullable=True), None) is None
    assert lf_args.coerce(arg("choice", choices=("no", "steps")), "steps") == "steps"
    for a, value in [
        (arg("int"), True),
        (arg("int"), 1.5),
        (arg("float"), "nan"),
        (arg("bool"), "yes please"),
        (arg("str"), True),
        (arg("choice", choices=("no", "steps")), "epoch"),
        (arg("int"), None),
    ]:
        with pytest.raises(lf_args.BadValue):
            lf_args.coerce(a, value)


# --------------------------------------------------------------------------------------------------
# item 6: a missing folder says "not found"


def test_missing_run_folder_is_not_found(fake_cli: Path) -> None:
    Path("runs").mkdir()
    for spec in ("runs/typo", "./runs/typo", str(Path("runs/typo").absolute())):
        result = invoke("chat", spec, "--prompt", "hi")
        assert result.exit_code == 2 and "not found" in result.output, result.output
        assert "not a Qwen model" not in result.output
    for command in (["merge"], ["resume"], ["runs", "rm"]):
        result = invoke(*command, "runs/typo")
        assert result.exit_code == 2 and "run folder not found" in result.output, result.output
    adapter = invoke("chat", "tiny-qwen2", "--adapter", "nowhere", "--prompt", "hi")
    assert adapter.exit_code == 2 and "adapter folder not found" in adapter.output
    # a hub id is still a hub id (no folder named like its organisation here)
    other = invoke("chat", "meta-llama/Llama-3-8B", "--prompt", "hi")
    assert other.exit_code == 2 and "not a Qwen model" in other.output


# --------------------------------------------------------------------------------------------------
# model tier: the real LLaMA-Factory dataclasses and the real length measurement


def test_table_comes_from_llamafactorys_dataclasses(vocab_file: Path) -> None:
    """Read in a child process from LLaMA-Factory's _TRAIN_ARGS: the snapshot qwenft ships is that
    table for the installed versions, every recipe key and knob is in it, and a misspelling is
    refused with LLaMA-Factory's own key as the suggestion."""
    started = time.monotonic()
    real = lf_args.read_dataclasses()
    seconds = time.monotonic() - started
    assert real is not None and real.source == "dataclasses"
    print(f"read LLaMA-Factory's argument table in {seconds:.1f} s: {len(real.fields)} keys")
    assert real.versions == lf_args.installed_versions()
    owners = {a.owner for a in real.fields.values()}
    assert {"ModelArguments", "DataArguments", "TrainingArguments", "FinetuningArguments"} <= owners
    assert real.fields["pref_beta"].kind == "float"  # FinetuningArguments (DPO)
    assert real.fields["lora_rank"].kind == "int"
    assert real.fields["learning_rate"].kind == "float"  # transformers' TrainingArguments
    assert real.fields["bf16"].kind == "bool"
    assert "cosine" in real.fields["lr_scheduler_type"].choices
    assert real.suggest("lora_rnak")[0] == "lora_rank"
    snapshot = lf_args._snapshot()
    if snapshot is not None and snapshot.versions == real.versions:
        assert snapshot.fields == real.fields, (
            "regenerate: python -m qwenft.lf.args --write-snapshot"
        )
    for method in ("lora", "qlora", "full", "freeze", "merge"):
        for key, value in render.load_template(method).items():
            assert key in real, (method, key)
            real.coerce(key, value)
    for key in [*settings.KEY_OPTIONS, *settings.RANGES, *render.OWNED_KEYS]:
        assert key in real or knobs.BY_KEY[key].own, key  # own: qwenft's, never in train.yaml
    with pytest.raises(QwenftError) as info:
        settings.resolve(settings.RunRequest(model="qwen2-7b-instruct", set_items=["lora_rnak=8"]))
    assert "lora_rnak" in info.value.message and "--lora-rank (lora_rank)" in (
        info.value.hint or ""
    )


@pytest.mark.parametrize("overlength", ["warn", "drop"])
def test_cutoff_that_cuts_every_sample_is_refused(
    tiny_home: Path, fake_cli: Path, chat_file: Path, isolated: Path, overlength: str
) -> None:
    """Measured with the tiny model's tokenizer before the run folder exists: cutoff_len 4 cuts
    every sample (warn would train on stubs, drop on nothing)."""
    before = written(Path.cwd())
    result = invoke(
        "train",
        "--model",
        "tiny-qwen2",
        "--data",
        chat_file,
        "-o",
        "runs/cut",
        "--cutoff-len",
        "4",
        "--overlength",
        overlength,
    )
    assert result.exit_code == 2, result.output
    assert "all 4 samples exceed cutoff_len 4" in result.output
    assert "raise --cutoff-len (suggested: " in result.output
    if overlength == "drop":
        assert "leave nothing to train on" in result.output
    assert written(Path.cwd()) == before and not Path("runs").exists()
    assert not (isolated / "datasets" / "dataset_info.json").exists()
    assert read_calls(fake_cli) == []


def test_the_shipped_snapshot_serves_the_installed_versions() -> None:
    """With the pinned LLaMA-Factory and the transformers the setup installs, the check costs no
    child process (the fast tier's guard in conftest.py also fails any in-process import)."""
    versions = lf_args.installed_versions()
    snapshot = lf_args._snapshot()
    if versions is None or snapshot is None or snapshot.versions != versions:
        pytest.skip(f"the snapshot is for {snapshot and snapshot.versions}, not {versions}")
    assert lf_args.table(compute=False) is snapshot or lf_args.table().source == "snapshot"
