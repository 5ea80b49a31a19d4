"""The optimizers as options (issue 22, part 1): --galore, --apollo and --badam with their keys,
each one row of the knob table (the rest --set rows, still range and applicability checked), and
what LLaMA-Factory 0.9.5 refuses for them (its parser and optimizer factory) refused before launch
whichever layer set it: exit 2, nothing written, the fix named. Their packages are the
`optimizers` extra, which train names when it is missing. Fast tier: the recording
llamafactory-cli stands in (tests/test_e2e_optimizers.py trains for real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qwenft import settings
from tests.helpers.builders import QWEN2_05B_CONFIG, read_calls, write_model_folder, written
from tests.helpers.cli import dry_run, invoke

pytestmark = pytest.mark.usefixtures("no_token_stats")

MODULES = ("galore_torch", "apollo_torch", "badam")
FULL = ["--method", "full", "--deepspeed", "none"]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """A machine without GPUs whose optimizer packages are installed or not, as a test says:
    machine["installed"] = False takes them away (whatever this one has)."""
    state = {"installed": True}
    monkeypatch.setattr("qwenft.proc.launcher.detect_gpus", lambda: [])
    real = settings.has_module
    monkeypatch.setattr(
        settings,
        "has_module",
        lambda module: state["installed"] if module in MODULES else real(module),
    )
    return state


@pytest.fixture
def untied_model(tmp_path: Path) -> Path:
    """A config-only Qwen2 folder whose lm_head is its own (not tied to the embedding)."""
    return write_model_folder(
        tmp_path / "Qwen2-untied", {**QWEN2_05B_CONFIG, "tie_word_embeddings": False}
    )


def test_train_and_plan_offer_the_options() -> None:
    train = invoke("train", "--help").output
    plan = invoke("plan", "--help").output
    both = ("--galore ", "--galore-rank", "--galore-layerwise", "--apollo ", "--apollo-rank")
    for option in (*both, "--apollo-layerwise", "--badam "):
        assert option in train and option in plan, option
    for option in ("--badam-mode", "--badam-switch-interval"):
        assert option in train and option not in plan, option
    assert "[layer|ratio]" in train


# option arguments -> the keys train.yaml carries (beside the method's recipe)
RENDERED = [
    ([*FULL, "--galore"], {"use_galore": True, "optim": "adamw_torch"}),
    (
        [*FULL, "--galore", "--galore-rank", "8", "--galore-layerwise"],
        {"galore_rank": 8, "galore_layerwise": True, "gradient_accumulation_steps": 1},
    ),
    (
        ["--method", "freeze", "--galore", "--set", "galore_target=mlp,self_attn", "--set",
         "galore_scale=0.5", "--set", "galore_proj_type=left", "--set", "galore_update_interval=5"],
        {"galore_target": "mlp,self_attn", "galore_scale": 0.5, "galore_proj_type": "left",
         "galore_update_interval": 5},
    ),
    ([*FULL, "--galore", "--set", "optim=adamw_8bit"], {"optim": "adamw_8bit"}),
    (
        [*FULL, "--apollo", "--apollo-rank", "1", "--apollo-layerwise", "--set",
         "apollo_scale=128", "--set", "apollo_proj=svd"],
        {"use_apollo": True, "apollo_rank": 1, "apollo_layerwise": True, "apollo_scale": 128.0,
         "apollo_proj": "svd", "optim": "adamw_torch", "gradient_accumulation_steps": 1},
    ),
    ([*FULL, "--badam"], {"use_badam": True, "badam_mode": "layer"}),
    (
        ["--method", "full", "--badam", "--badam-switch-interval", "-1", "--set",
         "badam_switch_mode=descending", "--set", "badam_start_block=3"],
        {"badam_mode": "layer", "badam_switch_interval": -1, "badam_switch_mode": "descending",
         "badam_start_block": 3},
    ),
    (
        ["--method", "freeze", "--badam", "--badam-mode", "ratio", "--set",
         "badam_update_ratio=0.1", "--set", "badam_mask_mode=scatter"],
        {"badam_mode": "ratio", "badam_update_ratio": 0.1, "badam_mask_mode": "scatter"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("args", "keys"), RENDERED, ids=[" ".join(a) for a, _ in RENDERED])
def test_dry_run_renders_each_option(
    args: list[str],
    keys: dict[str, Any],
    machine: dict[str, bool],
    fake_cli: Path,
    untied_model: Path,
    chat_file: Path,
) -> None:
    config, _, result = dry_run("--model", untied_model, "--data", chat_file, *args)
    text = result.output.split("# --- train.yaml ---\n", 1)[1].split("# --- environment ---")[0]
    assert {k: config.get(k) for k in keys} == keys
    other = text.split("### other")[1] if "### other" in text else ""
    assert not [k for k in keys if f"{k}:" in other], other  # each in its section
    assert read_calls(fake_cli) == []


def test_set_and_config_reach_the_same_yaml(
    machine: dict[str, bool], fake_cli: Path, local_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("use_galore: true\ngalore_rank: 4\ngalore_layerwise: true\n")
    # one run folder named for all three (the default's name holds the time: a second may pass)
    base = ("--model", local_model, "--data", chat_file, "-o", tmp_path / "run", *FULL)
    by_option, *_ = dry_run(*base, "--galore", "--galore-rank", "4", "--galore-layerwise")
    by_set, *_ = dry_run(
        *base, "--set", "use_galore=true", "--set", "galore_rank=4", "--set",
        "galore_layerwise=true",
    )  # fmt: skip
    by_config, *_ = dry_run(*base, "--config", extra)
    assert by_option == by_set == by_config
    assert by_config["optim"] == "adamw_torch" and by_config["gradient_accumulation_steps"] == 1


# (the run's choices, the knobs as options or --set, the same knobs as a --config file) -> the
# refusal's parts
REFUSED = [
    # LoRA: "Cannot use LoRA with GaLore, APOLLO or BAdam together"
    ("", "--galore", "use_galore: true", ["--galore (use_galore) does nothing for --method lora"]),
    ("--method qlora", "--badam", "use_badam: true", ["--badam (use_badam) does nothing for"]),
    # "GaLore and APOLLO are incompatible with DeepSpeed yet" (--method full's auto: ZeRO-3)
    (
        "--method full",
        "--galore",
        "use_galore: true",
        ["--galore with --deepspeed z3: ", "incompatible with DeepSpeed", "--deepspeed none"],
    ),
    ("--method freeze --deepspeed z2", "--apollo", "use_apollo: true", ["--apollo with --deeps"]),
    # "Cannot use GaLore, APOLLO or BAdam together"
    (
        "--method full --deepspeed none",
        "--galore --apollo --badam",
        "use_galore: true\nuse_apollo: true\nuse_badam: true",
        ["3 problems", "--galore with --apollo: ", "--galore with --badam: ",
         "--apollo with --badam: ", "Cannot use GaLore, APOLLO or BAdam together"],
    ),
    # "Distributed training does not support layer-wise GaLore/APOLLO."
    (
        "--method full --deepspeed none --cpu-procs 2",
        "--galore --galore-layerwise",
        "use_galore: true\ngalore_layerwise: true",
        ["--galore-layerwise with 2 processes: ", "does not support layer-wise GaLore",
         "train on one process"],
    ),
    (
        "--method full --deepspeed none --nnodes 2 --master-addr 10.0.0.1",
        "--apollo --apollo-layerwise",
        "use_apollo: true\napollo_layerwise: true",
        ["--apollo-layerwise with 2 processes: ", "does not support layer-wise APOLLO"],
    ),
    # "Per-layer GaLore does not support gradient accumulation."
    (
        "--method full --deepspeed none",
        "--galore --galore-layerwise --grad-accum 4",
        "use_galore: true\ngalore_layerwise: true\ngradient_accumulation_steps: 4",
        ["--galore-layerwise with --grad-accum 4: ", "does not support gradient accumulation",
         "drop --grad-accum"],
    ),
    # the optimizer factory: "Unknown optim" (NotImplementedError) once the model is loaded
    (
        "--method full --deepspeed none",
        "--galore --set optim=sgd",
        "use_galore: true\noptim: sgd",
        ["--galore with optim: sgd: ", "AdamW, 8-bit AdamW or Adafactor", "adafactor"],
    ),
    (
        "--method full --deepspeed none",
        "--apollo --set optim=adafactor",
        "use_apollo: true\noptim: adafactor",
        ["--apollo with optim: adafactor: ", "APOLLO on AdamW only"],
    ),
    # "Layer-wise BAdam only supports DeepSpeed ZeRO-3 training."
    (
        "--method full --deepspeed z2",
        "--badam",
        "use_badam: true",
        ["--badam-mode layer with --deepspeed z2: ", "only supports DeepSpeed ZeRO-3"],
    ),
    (
        "--method full --deepspeed none --cpu-procs 2",
        "--badam",
        "use_badam: true",
        ["--badam-mode layer with 2 processes and --deepspeed none: ", "--deepspeed z3"],
    ),
    # "Radio-based BAdam does not yet support distributed training, use layer-wise BAdam."
    (
        "--method full --deepspeed z3",
        "--badam --badam-mode ratio",
        "use_badam: true\nbadam_mode: ratio",
        ["--badam-mode ratio with --deepspeed z3: ", "does not yet support distributed"],
    ),
    (
        "--method full --deepspeed none --cpu-procs 2",
        "--badam --badam-mode ratio",
        "use_badam: true\nbadam_mode: ratio",
        ["--badam-mode ratio with 2 processes: ", "--badam-mode layer"],
    ),
    # layer-wise BAdam picks the trainable layer itself: freeze's layers would be ignored
    ("--method freeze", "--badam", "use_badam: true", ["--badam-mode layer with --method freeze"]),
    # keys that do nothing without their switch, or in the other BAdam mode
    (
        "--method full --deepspeed none",
        "--galore-rank 8 --set apollo_scale=2",
        "galore_rank: 8\napollo_scale: 2.0",
        ["--galore-rank (galore_rank) does nothing without --galore",
         "apollo_scale does nothing without --apollo"],
    ),
    (
        "--method full --deepspeed none",
        "--badam --set badam_update_ratio=0.1",
        "use_badam: true\nbadam_update_ratio: 0.1",
        ["badam_update_ratio: 0.1 with --badam-mode layer: ", "ratio mode only"],
    ),
    (
        "--method full --deepspeed none",
        "--badam --badam-mode ratio --badam-switch-interval 5",
        "use_badam: true\nbadam_mode: ratio\nbadam_switch_interval: 5",
        ["--badam-switch-interval 5 with --badam-mode ratio: ", "layer mode only"],
    ),
    # ranges
    (
        "--method full --deepspeed none",
        "--galore --galore-rank 0",
        "use_galore: true\ngalore_rank: 0",
        ["--galore-rank must be a positive whole number, got 0"],
    ),
    (
        "--method full --deepspeed none",
        "--badam --badam-switch-interval 0",
        "use_badam: true\nbadam_switch_interval: 0",
        ["--badam-switch-interval must be -1 (never switch) or a positive whole number, got 0"],
    ),
    (
        "--method full --deepspeed none",
        "--badam --badam-mode ratio --set badam_update_ratio=1.5",
        "use_badam: true\nbadam_mode: ratio\nbadam_update_ratio: 1.5",
        ["badam_update_ratio must be in (0, 1], got 1.5"],
    ),
    (
        "--method full --deepspeed none",
        "--galore --set galore_scale=0",
        "use_galore: true\ngalore_scale: 0",
        ["galore_scale must be positive, got 0"],
    ),
]  # fmt: skip


@pytest.mark.parametrize("layer", ["option", "config"])
@pytest.mark.parametrize(
    ("choices", "knobs", "config", "parts"), REFUSED, ids=[f"{c} {k}" for c, k, _, _ in REFUSED]
)
def test_refused_before_launch_whichever_layer_sets_it(
    layer: str,
    choices: str,
    knobs: str,
    config: str,
    parts: list[str],
    machine: dict[str, bool],
    fake_cli: Path,
    untied_model: Path,
    chat_file: Path,
    tmp_path: Path,
    isolated: Path,
) -> None:
    """Exit 2, nothing written, nothing launched, the fix named, through the options (or --set)
    and through --config; --dry-run too. Messages name a key by its option whichever layer set
    it."""
    args = [*choices.split(), *knobs.split()]
    if layer == "config":
        file = tmp_path / "extra.yaml"
        file.write_text(config + "\n")
        args = [*choices.split(), "--config", str(file)]
    before = written(Path.cwd(), isolated)
    for dry in ([], ["--dry-run"]):
        result = invoke(
            "train", "--model", untied_model, "--data", chat_file, "-o", "r", *args, *dry
        )
        assert result.exit_code == 2, (args, result.output)
        for part in parts:
            assert part in result.output, (part, result.output)
        assert "hint: " in result.output
    assert written(Path.cwd(), isolated) == before
    assert read_calls(fake_cli) == []


def test_ratio_badam_is_refused_on_a_model_with_tied_embeddings(
    machine: dict[str, bool], fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    """badam 1.4's ratio optimizer freezes the lm_head by name: a tied model (Qwen2.5-0.5B, the
    tiny models) has none, and it stops with AttributeError after loading the model."""
    args = ("--model", local_model, "--data", chat_file, *FULL, "--badam", "--badam-mode", "ratio")
    result = invoke("train", *args, "--dry-run")
    assert result.exit_code == 2, result.output
    assert "ties its lm_head to its embedding" in result.output
    assert "hint: --badam-mode layer" in result.output
    assert dry_run(*args[:-2])[0]["badam_mode"] == "layer"  # layer mode trains it


@pytest.mark.parametrize(
    ("option", "package"),
    [("--galore", "galore-torch"), ("--apollo", "apollo-torch"), ("--badam", "badam")],
)
def test_without_the_extra_train_names_it(
    option: str,
    package: str,
    machine: dict[str, bool],
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
) -> None:
    """Without the optimizers extra train refuses before launch (--dry-run too), naming the package
    and how to install it; plan plans for the machine that will train, and does not ask."""
    machine["installed"] = False
    for dry in ([], ["--dry-run"]):
        result = invoke("train", "--model", local_model, "--data", chat_file, *FULL, option, *dry)
        assert result.exit_code == 2, result.output
        assert f"{option} needs the {package} package (not installed)" in result.output
        assert (
            "hint: install the optimizers extra: QWENFT_EXTRAS=optimizers scripts/setup_env.sh "
            f"(or pip install 'qwenft[optimizers]'), or drop {option}"
        ) in result.output
    assert not Path("runs").exists() and read_calls(fake_cli) == []
    plan = invoke("plan", "-m", "qwen2-7b-instruct", *FULL, option)
    assert plan.exit_code == 0, plan.output


def test_plan_accounts_for_the_optimizer(machine: dict[str, bool]) -> None:
    """plan says which optimizer its estimate assumes (AdamW unless one is chosen), and the
    chosen one shrinks the optimizer states (qwenft.memory: tests/test_memory.py has the
    arithmetic)."""

    def plan(*args: str) -> str:
        result = invoke("plan", "-m", "qwen2-7b-instruct", *FULL, "--batch-size", "1", *args)
        assert result.exit_code == 0, result.output
        return result.output

    def states(output: str) -> float:
        return float(output.split("optimizer states")[1].split()[0])

    adamw = plan()
    assert "gradient checkpointing, AdamW optimizer" in adamw
    galore = plan("--galore", "--galore-rank", "128")
    assert "GaLore optimizer" in galore and "rank 128 (as galore_target all)" in galore
    assert states(galore) < states(adamw) / 4
    apollo = plan("--apollo", "--apollo-rank", "1", "--apollo-layerwise")
    assert "APOLLO optimizer" in apollo and "about one gradient held at a time" in apollo
    badam = plan("--badam")
    assert "BAdam optimizer" in badam and "one decoder layer trains at a time" in badam
    assert states(badam) < states(galore)
    refused = invoke("plan", "-m", "qwen2-7b-instruct", "--galore")  # LoRA: nothing to project
    assert refused.exit_code == 2 and "does nothing for --method lora" in refused.output
