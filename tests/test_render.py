"""Rendering: every shipped config renders, parses and matches its golden file; layering rules."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import pytest
import yaml

from qwenft import settings
from qwenft.choices import DeepSpeed, Engine, Method, Stage
from qwenft.errors import QwenftError
from qwenft.lf import render

GOLDEN = Path(__file__).parent / "golden"


def spec(method: str, **kw) -> render.TrainSpec:
    base = dict(
        method=method,
        model_path="/models/qwen",
        template="qwen",
        default_system="You are a helpful assistant.",
        dataset="chat-0123abcd",
        dataset_dir="/data/qwenft",
        output_dir="/runs/r1",
        deepspeed_path="/runs/r1/deepspeed.json" if method == "full" else None,
    )
    base.update(kw)
    return render.TrainSpec(**base)


@pytest.mark.parametrize("method", Method.values())
def test_method_renders_golden_yaml(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    text = render.to_yaml(render.build_train_config(spec(method)), header=f"golden {method}")
    golden = GOLDEN / f"{method}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    cfg = yaml.safe_load(text)
    assert "overwrite_output_dir" not in cfg
    assert cfg["report_to"] == "none"
    assert cfg["bf16"] is False
    assert cfg["default_system"] == "You are a helpful assistant."
    assert cfg["preprocessing_num_workers"] == 2
    for section in (
        "### model",
        "### method",
        "### dataset",
        "### output",
        "### train",
        "### eval",
    ):
        assert section in text


# LLaMA-Factory's stages (grpo is TRL's: its train.yaml is tests/test_grpo.py's)
@pytest.mark.parametrize(
    "stage", [s.value for s in Stage if s != "sft" and s.facts.engine == Engine.LLAMAFACTORY]
)
def test_stage_renders_golden_yaml(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stage's keys (configs/stages/<stage>.yaml) over the LoRA recipe, in LLaMA-Factory's
    own words: the golden file is what `train --dry-run --stage STAGE` prints."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = render.build_train_config(spec("lora", stage=stage))
    text = render.to_yaml(cfg, header=f"golden {stage} lora")
    golden = GOLDEN / f"stage-{stage}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    lf_stage, loss = {
        "pt": ("pt", None),
        "dpo": ("dpo", "sigmoid"),
        "orpo": ("dpo", "orpo"),
        "simpo": ("dpo", "simpo"),
        "kto": ("kto", None),
        "rm": ("rm", None),
    }[stage]
    assert cfg["stage"] == lf_stage and cfg.get("pref_loss") == loss
    assert ("simpo_gamma" in cfg) == (stage == "simpo")
    assert ("kto_chosen_weight" in cfg) == ("kto_rejected_weight" in cfg) == (stage == "kto")
    if stage == "pt":
        assert cfg["packing"] is True
    if Stage(stage).facts.paired:  # length grouping needs `input_ids`, which pairs lack
        assert cfg["train_sampling_strategy"] == "random"
    # one home: what settings resolves for the stage is what renders
    assert (
        settings.recipe("lora", stage).items()
        >= {k: v for k, v in render.load_template(f"stages/{stage}").items()}.items()
    )


def test_freeze_trainable_layers_renders() -> None:
    cfg = render.build_train_config(spec("freeze", overrides={"freeze_trainable_layers": 1}))
    assert cfg["finetuning_type"] == "freeze" and cfg["freeze_trainable_layers"] == 1


def test_qlora_uses_bnb_and_full_uses_deepspeed() -> None:
    q = render.build_train_config(spec("qlora"))
    assert (q["quantization_bit"], q["quantization_method"]) == (4, "bnb")
    f = render.build_train_config(spec("full"))
    assert f["finetuning_type"] == "full" and f["deepspeed"] == "/runs/r1/deepspeed.json"
    fixed = render.build_train_config(
        spec("qlora", overrides={"quantization_method": "bitsandbytes"})
    )
    assert fixed["quantization_method"] == "bnb"


def test_layering_template_config_knobs_set(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("learning_rate: 1.0\nlogging_steps: 7\nlora_alpha: 3\n")
    run = settings.resolve(
        settings.RunRequest(
            model="qwen2-7b-instruct",
            config_file=extra,
            knobs={"learning_rate": 2.0, "cutoff_len": None},
            set_items=["lora_alpha=64"],
        )
    )
    cfg = render.build_train_config(spec("lora", overrides=run.overrides))
    # what the resolver shows is what renders
    assert (
        all(cfg[k] == v for k, v in run.overrides.items()) and cfg["cutoff_len"] == run.cutoff_len
    )
    assert cfg["learning_rate"] == 2.0  # knob beats --config
    assert cfg["logging_steps"] == 7  # --config beats template
    assert cfg["lora_alpha"] == 64  # --set beats everything
    assert cfg["cutoff_len"] == 1024  # None knob keeps the template


def test_no_val_size_turns_eval_off() -> None:
    cfg = render.build_train_config(spec("lora", overrides={"val_size": 0}))
    assert cfg["eval_strategy"] == "no" and "eval_steps" not in cfg


@pytest.mark.parametrize(
    ("items", "expected", "error"),
    [
        (["a=1"], {"a": 1}, None),
        (["lr=1e-4", "flag=true", "name=x y"], {"lr": 1e-4, "flag": True, "name": "x y"}, None),
        (["noequals"], None, "malformed --set"),
        (["=3"], None, "malformed --set"),
        (["bad key=3"], None, "malformed --set"),
        (["a=[1,"], None, "not valid YAML"),
    ],
)
def test_parse_set(items: list[str], expected: dict | None, error: str | None) -> None:
    if error:
        with pytest.raises(QwenftError, match=error):
            render.parse_set(items)
    else:
        assert render.parse_set(items) == expected


@pytest.mark.parametrize("key", ["output_dir", "dataset", "model_name_or_path", "template"])
def test_owned_keys_cannot_be_overridden(key: str) -> None:
    with pytest.raises(QwenftError, match=f"may not set {key}"):
        render.build_train_config(spec("lora", overrides={key: "x"}))


def test_overwrite_output_dir_refused() -> None:
    with pytest.raises(QwenftError, match="disable resuming"):
        render.build_train_config(spec("lora", overrides={"overwrite_output_dir": True}))


@pytest.mark.parametrize("stage", [s for s in DeepSpeed.values() if s != "none"])
def test_every_deepspeed_config_parses(stage: str) -> None:
    cfg = json.loads(render.deepspeed_config_text(stage))
    want = int(stage[1])
    assert cfg["zero_optimization"]["stage"] == want
    assert ("offload_optimizer" in cfg["zero_optimization"]) == stage.endswith("offload")


def test_every_shipped_template_is_package_data() -> None:
    names = {p.name for p in resources.files("qwenft.configs").iterdir()}
    assert {"lora.yaml", "qlora.yaml", "full.yaml", "merge.yaml"} <= names
    stages = {p.name for p in resources.files("qwenft.configs").joinpath("stages").iterdir()}
    assert {f"{s}.yaml" for s in Stage.values()} <= stages
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"stages/*.yaml"' in pyproject  # shipped in the wheel too


def test_merge_config_has_no_quantization() -> None:
    cfg = render.build_merge_config("/m", "/runs/r1", "qwen", "sys", "/out")
    assert cfg["finetuning_type"] == "lora" and cfg["export_legacy_format"] is False
    assert "quantization_bit" not in cfg
