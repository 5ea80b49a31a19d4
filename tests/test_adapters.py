"""Adapters, attention and kernels as options (issue 22, parts 1, 2 and 5): --dora, --rslora,
--pissa, --loraplus-ratio, --attn, --liger, --unsloth, each one row of the knob table, and the
values LLaMA-Factory 0.9.5 would refuse, ignore in silence or crash on (LongLoRA, Mixture-of-Depths,
FlashAttention-3, ...) refused before launch whichever layer set them. Fast tier: the recording
llamafactory-cli stands in (tests/test_e2e_adapters.py trains for real)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwenft import knobs, settings
from qwenft.errors import QwenftError
from qwenft.lf import args_snapshot
from tests.helpers.builders import read_calls, written
from tests.helpers.cli import dry_run, invoke

pytestmark = pytest.mark.usefixtures("no_token_stats")

OPTIONS = ("--dora", "--rslora", "--pissa", "--loraplus-ratio", "--attn", "--liger", "--unsloth")


@pytest.fixture
def gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with a CUDA GPU and every package a knob may need."""
    monkeypatch.setattr(settings, "cuda_gpus", lambda: [{"compute_cap": 9.0}])
    monkeypatch.setattr(settings, "has_module", lambda module: True)


@pytest.fixture
def cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a GPU or any of those packages (whatever this one has)."""
    monkeypatch.setattr(settings, "cuda_gpus", lambda: [])
    monkeypatch.setattr(settings, "has_module", lambda module: False)


def test_train_offers_each_option_and_plan_only_liger() -> None:
    train = invoke("train", "--help").output
    for option in OPTIONS:
        assert option in train, option
    assert "[auto|sdpa|eager|fa2]" in train
    plan = invoke("plan", "--help").output
    assert "--liger" in plan
    assert "--dora" not in plan and "--attn" not in plan


# option arguments -> the keys train.yaml carries (and the same keys through --set / --config)
RENDERED = [
    (["--dora"], {"use_dora": True}),
    (["--rslora"], {"use_rslora": True}),
    (["--pissa"], {"pissa_init": True, "pissa_convert": True}),
    (["--loraplus-ratio", "16"], {"loraplus_lr_ratio": 16.0}),
    (["--attn", "sdpa"], {"flash_attn": "sdpa"}),
    (["--attn", "eager"], {"flash_attn": "disabled"}),
    (["--attn", "fa2"], {"flash_attn": "fa2"}),
    (["--liger"], {"enable_liger_kernel": True}),
    (["--unsloth"], {"use_unsloth": True}),
    (["--method", "qlora", "--dora", "--rslora"], {"use_dora": True, "use_rslora": True}),
    (
        ["--method", "freeze", "--llama-pro", "4"],
        {"use_llama_pro": True, "freeze_trainable_layers": 4},
    ),
    (["--llama-pro", "2"], {"use_llama_pro": True, "freeze_trainable_layers": 2}),  # LoRA on them
]


@pytest.mark.usefixtures("gpu_machine")
@pytest.mark.parametrize(("args", "keys"), RENDERED, ids=[" ".join(a) for a, _ in RENDERED])
def test_dry_run_renders_each_option(
    args: list[str], keys: dict[str, Any], fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    config, _, result = dry_run("--model", local_model, "--data", chat_file, *args)
    assert {k: config.get(k) for k in keys} == keys
    # the keys sit in a section of train.yaml (model or method), not under "other"
    text = result.output.split("# --- train.yaml ---")[1].split("# --- environment ---")[0]
    other = text.split("### other")[1] if "### other" in text else ""
    assert not [k for k in keys if f"{k}:" in other], other
    assert read_calls(fake_cli) == []


@pytest.mark.usefixtures("gpu_machine")
def test_set_and_config_reach_the_same_yaml(
    fake_cli: Path, local_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "extra.yaml"
    config.write_text("use_dora: true\nflash_attn: disabled\nloraplus_lr_ratio: 4\n")
    base = ("--model", local_model, "--data", chat_file)
    by_option, *_ = dry_run(*base, "--dora", "--attn", "eager", "--loraplus-ratio", "4")
    by_set, *_ = dry_run(
        *base, "--set", "use_dora=true", "--set", "flash_attn=disabled", "--set",
        "loraplus_lr_ratio=4",
    )  # fmt: skip
    by_config, *_ = dry_run(*base, "--config", config)
    keys = ("use_dora", "flash_attn", "loraplus_lr_ratio")
    assert [c["use_dora"] for c in (by_option, by_set, by_config)] == [True] * 3
    assert {k: by_option[k] for k in keys} == {k: by_set[k] for k in keys}
    assert {k: by_set[k] for k in keys} == {k: by_config[k] for k in keys}
    # --set pissa_init=true brings pissa_convert with it, as --pissa does
    pissa, *_ = dry_run(*base, "--set", "pissa_init=true")
    assert pissa["pissa_convert"] is True


# (how it is set: option, --set, --config) -> the refusal's message parts and hint
REFUSED = [
    (["--attn", "fa3"], "flash_attn: fa3", ["--attn fa3: ", "NotImplementedError", "--attn fa2"]),
    (["--set", "shift_attn=true"], "shift_attn: true", ["shift_attn: true: ", "llama models only"]),
    (
        ["--set", "mixture_of_depths=convert"],
        "mixture_of_depths: convert",
        ["mixture_of_depths: convert: ", "Current model is not supported", "drop mixture_of"],
    ),
    (["--pissa", "--dora"], "pissa_init: true\nuse_dora: true", ["--pissa with --dora", "lora_A"]),
    (["--loraplus-ratio", "0"], "loraplus_lr_ratio: 0", ["--loraplus-ratio must be positive"]),
    (["--dora", "--method", "full"], "use_dora: true", ["--dora (use_dora) does nothing for"]),
    (["--pissa", "--method", "qlora"], "pissa_init: true", ["does nothing for --method qlora"]),
    (
        ["--pissa", "--deepspeed", "z3"],
        "pissa_init: true",
        ["--pissa with --deepspeed z3", "ZeRO-3", "--deepspeed z2"],
    ),
    (
        ["--unsloth", "--method", "full"],  # --deepspeed auto: ZeRO-3 for full
        "use_unsloth: true",
        ["--unsloth with --deepspeed z3: ", "refuses Unsloth under DeepSpeed ZeRO-3"],
    ),
    (
        ["--dora", "--method", "qlora", "--set", "quantization_method=hqq"],
        "use_dora: true\nquantization_method: hqq",
        ["--dora with quantization_method: hqq", "PTQ-quantized"],
    ),
    (
        ["--pissa", "--set", "pissa_convert=false"],
        "pissa_init: true\npissa_convert: false",
        ["--pissa with pissa_convert: false: ", "plain-LoRA copy", "drop pissa_convert"],
    ),
]


@pytest.mark.usefixtures("gpu_machine")
@pytest.mark.parametrize("layer", ["option", "config"])
@pytest.mark.parametrize(
    ("args", "config", "parts"), REFUSED, ids=[" ".join(a) for a, _, _ in REFUSED]
)
def test_refused_before_launch_whichever_layer_sets_it(
    layer: str,
    args: list[str],
    config: str,
    parts: list[str],
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
    tmp_path: Path,
    isolated: Path,
) -> None:
    """Exit 2, nothing written, nothing launched, the fix named: through the option (or --set),
    and through --config for the keys a file can carry."""
    if layer == "config":
        file = tmp_path / "extra.yaml"
        file.write_text(config + "\n")
        keep = [
            a for a in args if a in ("--method", "full", "qlora", "freeze", "--deepspeed", "z3")
        ]
        args = [*keep, "--config", str(file)]
    before = written(Path.cwd(), isolated)
    for dry in ([], ["--dry-run"]):
        result = invoke(
            "train", "--model", local_model, "--data", chat_file, "-o", "r", *args, *dry
        )
        assert result.exit_code == 2, (args, result.output)
        for part in parts:  # a key is named by its option whichever layer set it
            assert part in result.output, (part, result.output)
        assert "hint: " in result.output
    assert written(Path.cwd(), isolated) == before
    assert read_calls(fake_cli) == []


def test_pissa_is_refused_where_lf_keeps_a_reference_model() -> None:
    for stage in ("dpo", "kto"):
        with pytest.raises(QwenftError) as info:
            settings.resolve(
                settings.RunRequest(
                    model="qwen2-7b-instruct", stage=stage, knobs={"pissa_init": True}
                )
            )
        assert f"--pissa with --stage {stage}" in info.value.message
        assert "Cannot use PiSSA for current training stage" in info.value.message
    run = settings.resolve(
        settings.RunRequest(model="qwen2-7b-instruct", stage="orpo", knobs={"pissa_init": True})
    )
    assert run.overrides["pissa_convert"] is True


@pytest.mark.usefixtures("cpu_machine")
@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (
            ["--attn", "fa2"],
            ["--attn fa2 needs a CUDA GPU (nvidia-smi sees none here) and the flash-attn package"],
        ),
        (["--liger"], ["--liger needs a CUDA GPU", "the liger-kernel package (not installed)"]),
        (["--unsloth"], ["--unsloth needs a CUDA GPU", "the unsloth package"]),
        (["--set", "enable_liger_kernel=true"], ["--liger needs a CUDA GPU"]),
    ],
)
def test_what_a_kernel_needs_is_checked_before_launch(
    args: list[str], parts: list[str], fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    """On a machine without a GPU (or the package), train refuses naming what is missing, with
    --dry-run too, instead of LLaMA-Factory falling back in silence (fa2) or stopping late."""
    for dry in ([], ["--dry-run"]):
        result = invoke("train", "--model", local_model, "--data", chat_file, *args, *dry)
        assert result.exit_code == 2, result.output
        for part in parts:
            assert part in result.output, (part, result.output)
        assert "hint: train on a machine that has a CUDA GPU, or drop " in result.output
    assert read_calls(fake_cli) == []


def test_a_missing_package_on_a_gpu_machine_names_the_install(
    monkeypatch: pytest.MonkeyPatch, fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    monkeypatch.setattr(settings, "cuda_gpus", lambda: [{"compute_cap": 9.0}])
    monkeypatch.setattr(settings, "has_module", lambda module: module != "liger_kernel")
    result = invoke(
        "train", "--model", local_model, "--data", chat_file, "--liger", "--attn", "fa2"
    )
    assert result.exit_code == 2, result.output
    assert "--liger needs the liger-kernel package (not installed)" in result.output
    assert "hint: pip install liger-kernel, or drop --liger" in result.output
    assert "--attn fa2 needs" not in result.output


def test_this_machine_refuses_the_gpu_kernels_it_cannot_run(
    fake_cli: Path, local_model: Path, chat_file: Path
) -> None:
    """Unpatched: on this CPU machine (no liger-kernel, flash-attn or unsloth) each is refused."""
    if settings.cuda_gpus():
        pytest.skip("a GPU machine: scripts/bench_gpu.sh runs these")
    for args in (["--attn", "fa2"], ["--liger"], ["--unsloth"]):
        result = invoke("train", "--model", local_model, "--data", chat_file, *args)
        assert result.exit_code == 2 and "needs a CUDA GPU" in result.output, result.output


def test_plan_liger_still_estimates_on_a_machine_without_gpu(cpu_machine: None) -> None:
    """plan plans for the machine that will train: --liger is not refused, and it lowers the
    estimate (fused logits and loss)."""

    def peak(*extra: str) -> float:
        out = invoke("plan", "-m", "qwen2-7b-instruct", "--cutoff-len", "4096", "--json", *extra)
        assert out.exit_code == 0, out.output
        return json.loads(out.output)["breakdown"]["logits_and_loss"]

    assert peak("--liger") < peak()


def test_refusals_are_rows_of_the_table() -> None:
    """Each refusal and need is declared on its knob: a with_key (and each key of `also`) is a
    LLaMA-Factory argument or one of the run's choices, a Needs names a pip package and its
    module."""
    names = {*args_snapshot.TABLE["fields"], *knobs.RUN_CHOICES}
    for knob in knobs.KNOBS:
        for rule in knob.refuse:
            assert rule.why and rule.fix, knob.key
            assert {rule.with_key or "stage", *dict(rule.also)} <= names, knob.key
        for need in knob.needs:
            assert need.cuda or need.packages, knob.key
    assert knobs.BY_KEY["flash_attn"].lf_value("eager") == "disabled"
    assert knobs.BY_KEY["flash_attn"].lf_choices == ("auto", "sdpa", "disabled", "fa2")
    assert knobs.refused({"flash_attn": "sdpa", "use_dora": True, "shift_attn": False}) == []
    assert knobs.implied({"pissa_init": True}) == {"pissa_convert": True}
    assert knobs.implied({"pissa_init": False}) == {}


def test_fa2_needs_an_ampere_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashAttention-2 runs on compute capability 8.0 and up: a Turing GPU (7.5) is named."""
    monkeypatch.setattr(settings, "cuda_gpus", lambda: [{"compute_cap": 7.5}])
    monkeypatch.setattr(settings, "has_module", lambda module: True)
    (problem,) = settings.unmet_needs({"flash_attn": "fa2", "enable_liger_kernel": True})
    assert problem.message == "--attn fa2 needs a GPU of compute capability 8.0 or more (Ampere)"
    assert settings.unmet_needs({"flash_attn": "sdpa", "use_unsloth": False}) == []


# --llama-pro N is qwenft's own: it expands the base. Through --config or --set, use_llama_pro is
# LLaMA-Factory's switch for a base that its scripts/llama_pro.py expanded, which is refused.
LLAMA_PRO_REFUSED = [
    (
        ["--llama-pro", "5", "--method", "freeze"],
        ["--llama-pro 5: the base has 24 decoder layers", "divides 24: 1, 2, 3, 4, 6, 8, 12, 24"],
    ),
    (["--llama-pro", "2", "--method", "full"], ["--llama-pro (use_llama_pro) does nothing for"]),
    (
        ["--llama-pro", "2", "--method", "freeze", "--trainable-layers", "1"],
        ["--llama-pro 2 with --trainable-layers 1", "drop --trainable-layers"],
    ),
    (["--set", "use_llama_pro=true"], ["--llama-pro must be a number, got True", "expands"]),
    (["--loftq"], ["--loftq (loftq) does nothing for --method lora"]),
    (["--loftq", "--method", "qlora", "--dora"], ["--loftq with --dora", "drop --dora or --loftq"]),
    (["--loftq", "--method", "qlora", "--set", "quantization_bit=8"], ["--loftq with --bits 8"]),
    (["--loftq", "--method", "auto"], ["--method auto picks the method", "--method qlora"]),
    (["--llama-pro", "2", "--method", "auto"], ["--llama-pro needs --method freeze or lora"]),
]


@pytest.mark.parametrize(
    ("args", "parts"), LLAMA_PRO_REFUSED, ids=[" ".join(a) for a, _ in LLAMA_PRO_REFUSED]
)
def test_llama_pro_refusals(
    args: list[str],
    parts: list[str],
    fake_cli: Path,
    local_model: Path,
    chat_file: Path,
    isolated: Path,
) -> None:
    before = written(Path.cwd(), isolated)
    result = invoke("train", "--model", local_model, "--data", chat_file, "-o", "r", *args)
    assert result.exit_code == 2, result.output
    for part in parts:
        assert part in result.output, (part, result.output)
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []


def test_llama_pro_trains_an_expanded_copy_of_a_base_on_this_machine(
    fake_cli: Path, local_model: Path, chat_file: Path, isolated: Path
) -> None:
    """--dry-run names the expanded base (made by train before launch, in qwenft's cache) and
    writes nothing; a hub model that is not on this machine cannot be expanded."""
    before = written(Path.cwd(), isolated)
    base = ("train", "--model", local_model, "--data", chat_file, "--method", "freeze")
    config, *_ = dry_run(*base[1:], "--llama-pro", "4")
    path = Path(config["model_name_or_path"])
    assert path.parent == isolated / "derived" and path.name.startswith(f"{local_model.name}-pro4-")
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []
    with pytest.raises(QwenftError) as info:
        settings.resolve(
            settings.RunRequest(
                model="qwen2-7b-instruct", method="freeze", knobs={"use_llama_pro": 2}
            )
        )
    assert "--llama-pro derives a base from qwen2-7b-instruct on this machine" in info.value.message
    assert "huggingface-cli download Qwen/Qwen2-7B-Instruct" in info.value.hint


def test_a_prequantized_base_trains_a_lora_as_it_is(
    fake_cli: Path, chat_file: Path, tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder whose config.json has a quantization_config (GPTQ here): LoRA on it with no
    quantization of qwenft's own; what LLaMA-Factory refuses on it is refused before launch, all
    problems at once; its package is named when missing."""
    from tests.helpers.builders import write_model_folder

    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    model = write_model_folder(
        tmp_path / "Qwen2.5-7B-Instruct-GPTQ-Int4", {"quantization_config": gptq}
    )
    base = ("--model", model, "--data", chat_file)
    monkeypatch.setattr(settings, "has_module", lambda module: module == "gptqmodel")
    config, *_ = dry_run(*base, "--method", "qlora")
    assert config["finetuning_type"] == "lora" and config["quantization_bit"] is None
    before = written(Path.cwd(), isolated)
    full = invoke("train", *base, "--method", "full")
    assert full.exit_code == 2 and "Quantized models can only be used for the LoRA" in full.output
    lora = ("--method", "qlora", "--deepspeed", "z3", "--dora", "--set", "quantization_bit=4")
    refused = invoke("train", *base, *lora)
    assert refused.exit_code == 2 and "3 problems" in refused.output, refused.output
    for part in ("4-bit GPTQ-quantized; LLaMA-Factory ignores", "refuses ZeRO-3", "refuses DoRA"):
        assert part in refused.output, part
    monkeypatch.setattr(settings, "has_module", lambda module: False)
    missing = invoke("train", *base, "--method", "qlora", "--dry-run")
    assert missing.exit_code == 2 and "needs the gptqmodel package" in missing.output
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []
