"""Mixture-of-experts Qwen (issue 29): presets with their architecture numbers, what an adapter
covers and what share of the model that is, `plan` counting every expert, the choices and refusals
of `train`; on tiny-qwen3-moe, an exact parameter count, the initial adapter PEFT makes, and one
shared LoRA run (`moe_run`, tests/conftest.py) that learns, merges and exports.

The fast tests below import neither torch nor transformers (tests/conftest.py's tiers)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from qwenft.memory import PlanInput, estimate
from qwenft.models.coverage import (
    EXPERT_PARAMETERS,
    LORA_MODULES,
    ROUTER_PARAMETER,
    coverage,
    expert_lora_params,
    lora_params,
    router_lora_params,
)
from qwenft.models.presets import PRESETS, resolve_model
from tests.helpers.builders import write_model_folder
from tests.helpers.cli import dry_run, invoke

# Qwen/Qwen3-30B-A3B's config.json as published (the keys that shape the model).
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
}

# Published totals (the model cards): (preset, total B, active B).
PUBLISHED = [
    ("qwen3-30b-a3b", 30.5, 3.3),
    ("qwen3-coder-30b-a3b-instruct", 30.5, 3.3),
    ("qwen3-235b-a22b-instruct-2507", 235.0, 22.0),
    ("qwen2-57b-a14b-instruct", 57.4, 14.2),
    ("qwen1.5-moe-a2.7b-chat", 14.3, 2.7),
]


@pytest.mark.parametrize(("name", "total", "active"), PUBLISHED)
def test_moe_presets_match_the_published_totals(name: str, total: float, active: float) -> None:
    arch = PRESETS[name].arch
    assert arch.moe is not None
    assert arch.params / 1e9 == pytest.approx(total, rel=0.01)
    # the cards round the active count to one decimal (3.35B is "3.3B")
    assert arch.active_params / 1e9 == pytest.approx(active, rel=0.03)


def test_a_local_moe_folder_reads_as_its_preset(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "Qwen3-30B-A3B", QWEN3_30B_A3B_CONFIG)
    model = resolve_model(str(folder))
    assert model.arch == PRESETS["qwen3-30b-a3b"].arch
    assert (model.template, model.thinking) == ("qwen3", "hybrid")
    # transformers 5 writes num_experts as num_local_experts
    config = {**QWEN3_30B_A3B_CONFIG, "num_local_experts": 128}
    del config["num_experts"]
    other = write_model_folder(tmp_path / "x" / "Qwen3-30B-A3B", config)
    assert resolve_model(str(other)).arch == model.arch


@pytest.mark.parametrize(
    ("name", "family", "template"),
    [
        ("qwen3-30b-a3b-instruct-2507", "qwen3-instruct-2507", "qwen3_nothink"),
        ("qwen3-30b-a3b-thinking-2507", "qwen3-thinking-2507", "qwen3"),
        ("qwen3-coder-30b-a3b-instruct", "qwen3-instruct-2507", "qwen3_nothink"),
        ("qwen2-57b-a14b-instruct", "qwen2", "qwen"),
        ("tiny-qwen3-moe", "qwen3", "qwen3"),
    ],
)
def test_moe_presets_carry_their_template(name: str, family: str, template: str) -> None:
    model = resolve_model(name)
    assert (model.family, model.template) == (family, template)


def test_models_marks_moe_with_total_and_active_params() -> None:
    rows = {r["name"]: r for r in json.loads(invoke("models", "--json").output)}
    row = rows["qwen3-30b-a3b"]
    assert row["moe"] is True and row["params_b"] == pytest.approx(30.532, abs=1e-3)
    assert row["active_params_b"] == pytest.approx(3.353, abs=1e-3)
    assert rows["qwen3-8b"]["moe"] is False and rows["qwen3-8b"]["active_params_b"] is None
    table = invoke("models").output
    assert re.search(r"qwen3-30b-a3b\s.*30\.532B\s+MoE 3\.35B", table), table


def test_coverage_of_qwen3_30b_a3b_by_choice() -> None:
    arch = PRESETS["qwen3-30b-a3b"].arch
    on = coverage(arch, "lora", 16)
    off = coverage(arch, "lora", 16, experts=False)
    router = coverage(arch, "lora", 16, router=True)
    assert on.modules == off.modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert on.parameters == EXPERT_PARAMETERS and off.parameters == ()
    assert router.parameters == (*EXPERT_PARAMETERS, ROUTER_PARAMETER)
    # attention only: about 3% of the model under the adapter; with the experts, nearly all of it
    assert off.covered_share == pytest.approx(
        48 * 2048 * 128 * (32 + 4 + 4 + 32) / arch.params, rel=1e-9
    )
    assert 0.02 < off.covered_share < 0.04 and 0.97 < on.covered_share < 0.99
    assert on.trainable == off.trainable + expert_lora_params(arch, 16)
    assert router.trainable == on.trainable + router_lora_params(arch, 16)
    # every expert of every layer: rank 16 x (in + out) of each of its two fused matrices
    assert expert_lora_params(arch, 16) == 48 * 128 * 16 * ((2 * 768 + 2048) + (2048 + 768))
    assert "not the experts (off)" in off.line() and "the router frozen" in on.line()
    full = coverage(arch, "full")
    assert full.covered == full.trainable == arch.params


def test_dense_models_keep_their_coverage() -> None:
    arch = PRESETS["qwen2.5-7b-instruct"].arch
    cov = coverage(arch, "lora", 16)
    assert cov.experts is None and cov.parameters == ()
    assert cov.trainable == lora_params(arch, 16)
    assert "experts" not in cov.line()


def test_plan_counts_every_expert_in_the_weights_and_active_ones_in_activations() -> None:
    arch = PRESETS["qwen3-30b-a3b"].arch
    on = estimate(PlanInput(arch=arch, method="lora"))
    off = estimate(PlanInput(arch=arch, method="lora", lora_experts=False))
    assert on.total_params == arch.params and on.active_params == arch.active_params
    # every expert's weights in bf16, beside the adapter in fp32
    for plan in (on, off):
        assert plan.breakdown["weights"] == 2 * arch.params + 4 * plan.trainable_params
    assert on.trainable_params == coverage(arch, "lora", 16).trainable
    assert off.trainable_params == coverage(arch, "lora", 16, experts=False).trainable
    # PEFT rebuilds a sparse layer's expert weights in each forward: buffers only with experts
    assert on.breakdown["buffers"] > off.breakdown["buffers"] == 0
    # activations: 8 routed experts of 128, so far below a dense MLP of all experts' width
    dense_like = estimate(PlanInput(arch=PRESETS["qwen3-32b"].arch, method="lora"))
    assert on.breakdown["activations"] < dense_like.breakdown["activations"]
    assert any("compute per token as a 3.35B dense model" in n for n in on.notes)
    assert on.coverage["covered_share"] > 0.97


def test_plan_cli_says_what_lora_trains() -> None:
    out = invoke("plan", "--model", "qwen3-30b-a3b", "--lora-experts", "off").output
    assert "3.35B active per token" in out
    assert "trains: LoRA r16 covers q_proj,k_proj,v_proj,o_proj; not the experts (off)" in out


# --- train: what it says, renders and refuses (the recording llamafactory-cli) ----------------


@pytest.fixture
def moe_folder(tmp_path: Path) -> Path:
    """A config-only Qwen3-30B-A3B folder (nothing here loads weights)."""
    return write_model_folder(tmp_path / "Qwen3-30B-A3B", QWEN3_30B_A3B_CONFIG)


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
def test_lora_on_an_moe_model_covers_the_experts_by_default(
    moe_folder: Path, chat_file: Path
) -> None:
    config, _, result = dry_run("--model", moe_folder, "--data", chat_file, "-o", "runs/m")
    run = Path("runs/m").absolute()
    assert config["adapter_name_or_path"] == str(run / "adapter_init")
    assert config["lora_dropout"] == 0.0  # PEFT's rule for LoRA on parameters
    assert "lora_experts" not in config and "train_router" not in config  # qwenft's own
    assert (
        "trains: LoRA r16 covers q_proj,k_proj,v_proj,o_proj; the experts "
        "(mlp.experts.gate_up_proj, mlp.experts.down_proj); the router frozen: 29.9B of 30.5B "
        "parameters (97.9%)" in result.output
    )
    assert "lora_dropout 0.05 -> 0" in result.output
    assert not run.exists()


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
def test_lora_experts_off_trains_attention_only_and_says_so(
    moe_folder: Path, chat_file: Path
) -> None:
    config, _, result = dry_run(
        "--model", moe_folder, "--data", chat_file, "--lora-experts", "off", "-o", "runs/m"
    )
    # LLaMA-Factory makes the adapter itself: lora_target all finds the attention projections
    assert "adapter_name_or_path" not in config and config["lora_target"] == "all"
    assert config["lora_dropout"] == 0.05
    assert "not the experts (off); the router frozen: 906.0M of 30.5B parameters (3.0%)" in (
        result.output
    )
    assert "--lora-experts off: LoRA on the attention and other linear layers only" in (
        result.output
    )


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
def test_qlora_says_the_experts_stay_unquantized(moe_folder: Path, chat_file: Path) -> None:
    config, _, result = dry_run("--model", moe_folder, "--data", chat_file, "--method", "qlora")
    assert config["quantization_bit"] == 4 and config["adapter_name_or_path"]
    assert "bitsandbytes quantizes nn.Linear layers only, so the experts" in result.output


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
def test_train_router_puts_lora_on_the_router(moe_folder: Path, chat_file: Path) -> None:
    _, _, result = dry_run(
        "--model", moe_folder, "--data", chat_file, "--lora-experts", "off", "--train-router"
    )
    assert "not the experts (off); the router (mlp.gate, LoRA)" in result.output


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "lora_dropout=0.1"], "PEFT puts no dropout on a LoRA of parameters"),
        (["--dora"], "PEFT has no DoRA on a LoRA of parameters"),
        (["--pissa"], "PiSSA only on an adapter it makes itself"),
        (["--set", "create_new_adapter=true"], "a new adapter of linear layers only"),
    ],
)
def test_what_the_expert_adapter_cannot_do_is_refused(
    moe_folder: Path, chat_file: Path, isolated: Path, extra: list[str], message: str
) -> None:
    result = invoke("train", "--model", moe_folder, "--data", chat_file, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "--lora-experts off" in result.output
    assert not (isolated / "runs").exists()


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
def test_an_older_peft_refuses_rather_than_narrowing(
    moe_folder: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = {"peft": "0.16.0", "llamafactory": "0.9.5"}
    monkeypatch.setattr("qwenft.models.moe_adapter._version", versions.get)
    result = invoke("train", "--model", moe_folder, "--data", chat_file)
    assert result.exit_code == 2
    assert "target_parameters needs PEFT >= 0.17" in result.output
    assert "--lora-experts off trains the attention" in result.output
    # attention only, asked for, still runs
    dry_run("--model", moe_folder, "--data", chat_file, "--lora-experts", "off")


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("local", ["--lora-experts", "off"], "is not a mixture-of-experts model"),
        ("local", ["--moe-aux-loss", "0.01"], "is not a mixture-of-experts model"),
        ("Qwen/Qwen3-Next-80B-A3B-Instruct", [], "looks like a mixture-of-experts model"),
    ],
)
def test_moe_options_on_other_models_are_refused(
    local_model: Path, chat_file: Path, model: str, extra: list[str], message: str
) -> None:
    spec = local_model if model == "local" else model
    result = invoke("train", "--model", spec, "--data", chat_file, *extra, "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_run_says_and_records_what_it_trains(
    local_model: Path, chat_file: Path, method: str
) -> None:
    result = invoke("train", "--model", local_model, "--data", chat_file, "--method", method,
                    "-o", "runs/d", "--max-steps", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    recorded = json.loads(Path("runs/d/qwenft.json").read_text())["trains"]
    assert f"trains: {recorded['line']}" in result.output
    arch = resolve_model(str(local_model)).arch
    assert recorded["experts"] is None and recorded["parameters"] == []  # a dense model
    if method == "lora":
        assert recorded["modules"] == list(LORA_MODULES)
        assert recorded["trainable"] == lora_params(arch, 16)
    else:
        assert recorded["trainable"] == recorded["covered"] == arch.params
        assert recorded["line"].startswith("every weight: ")


@pytest.mark.usefixtures("no_token_stats", "fake_cli")
def test_moe_aux_loss_is_rendered_for_llamafactory(moe_folder: Path, chat_file: Path) -> None:
    config, _, _ = dry_run("--model", moe_folder, "--data", chat_file, "--moe-aux-loss", "0.001")
    assert config["moe_aux_loss_coef"] == 0.001


# --- tiny-qwen3-moe: the real model and PEFT ----------------------------------------------------


def test_tiny_qwen3_moe_count_is_exact_and_its_adapter_as_planned(
    tiny_home: Path, tmp_path: Path
) -> None:
    import transformers

    from qwenft.models.moe_adapter import make_initial_adapter
    from qwenft.models.tiny import ensure_tiny_model

    folder = ensure_tiny_model("tiny-qwen3-moe", progress=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    arch = PRESETS["tiny-qwen3-moe"].arch
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.num_parameters() == arch.params == resolve_model(str(folder)).arch.params
    plan = json.loads(invoke("plan", "--model", "tiny-qwen3-moe", "--json").output)
    assert plan["total_params"] == model.num_parameters()
    # the adapter PEFT makes for each choice has the parameters coverage counts
    for experts, router in ((True, False), (True, True), (False, True)):
        cov = coverage(arch, "lora", 8, experts=experts, router=router)
        recipe = {
            "r": 8,
            "lora_alpha": 16,
            "use_rslora": False,
            "lora_dropout": 0.0,
            "target_modules": list(cov.modules),
            "target_parameters": list(cov.parameters),
        }
        out = tmp_path / f"a-{experts}-{router}"
        made = make_initial_adapter(str(folder), recipe, out, say=lambda _m: None)
        assert made == {
            "linear": lora_params(arch, 8),
            "experts": expert_lora_params(arch, 8) if experts else 0,
            "router": router_lora_params(arch, 8) if router else 0,
        }
        assert sum(made.values()) == cov.trainable
        assert json.loads((out / "adapter_config.json").read_text())["target_parameters"] == (
            list(cov.parameters)
        )


def test_a_qwen2_moe_with_shared_and_dense_layers_counts_exactly(
    tiny_home: Path, tmp_path: Path
) -> None:
    """Qwen2-MoE's shared expert and its gate, q/k/v biases, and a dense layer (mlp_only_layers):
    the count of the model transformers builds, and the adapter PEFT makes, router included."""
    import transformers

    from qwenft.models.moe_adapter import make_initial_adapter

    config = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 80,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
        "qkv_bias": True,
        "mlp_only_layers": [1],
    }
    folder = write_model_folder(tmp_path / "Qwen2-MoE-mini", config)
    arch = resolve_model(str(folder)).arch
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(folder)
    )
    assert model.num_parameters() == arch.params
    cov = coverage(arch, "lora", 4, router=True)
    assert set(cov.modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj", "shared_expert_gate"}  # fmt: skip
    recipe = {"r": 4, "lora_alpha": 8, "use_rslora": False, "lora_dropout": 0.0,
              "target_modules": list(cov.modules), "target_parameters": list(cov.parameters)}  # fmt: skip
    made = make_initial_adapter(str(folder), recipe, tmp_path / "a", say=lambda _m: None)
    assert made["experts"] == expert_lora_params(arch, 4)
    assert made["router"] == router_lora_params(arch, 4)
    assert sum(made.values()) == cov.trainable


def test_moe_lora_learns_with_its_experts_trained(moe_run: Path) -> None:
    from safetensors.torch import load_file

    from tests.helpers.e2e import MOE_LEARN_STEPS, losses, manifest
    from tests.helpers.learning import LM, assert_learned, trained_rows

    curve = losses(moe_run)
    assert all(math.isfinite(x) and x > 0 for x in curve) and curve[-1] < curve[0] / 100, curve
    m = manifest(moe_run)
    assert m["status"] == "completed" and m["summary"]["global_step"] == MOE_LEARN_STEPS
    adapter = m["trains"]
    assert adapter["experts"] is True and adapter["router"] is False
    assert adapter["parameters"] == list(EXPERT_PARAMETERS)
    # what train said at its start, and what LLaMA-Factory trained: the same parameters
    stderr = (moe_run.parent / "moe.stderr").read_text()
    assert f"trains: {adapter['line']}" in stderr
    log = (moe_run / "train.log").read_text()
    assert f"Loaded adapter(s): {moe_run / 'adapter_init'}" in log
    trained = re.search(r"trainable params: ([\d,]+)", log)
    assert trained and int(trained.group(1).replace(",", "")) == adapter["trainable"]
    assert "moe_aux_loss_coef: 0.001" in (moe_run / "train.yaml").read_text()
    # the trained adapter: expert tensors whose B moved off its zero start
    tensors = load_file(moe_run / "adapter_model.safetensors")
    experts = {k: v for k, v in tensors.items() if ".mlp.experts." in k and "lora_B" in k}
    assert len(experts) == 2 * 2  # gate_up_proj and down_proj, in each of the 2 layers
    assert all(float(v.abs().max()) > 0 for v in experts.values())
    data = moe_run.parents[2] / "chat.jsonl"
    assert_learned(LM.of_run(moe_run, merged=False), trained_rows(moe_run, data, Path("lf")))
    # at the end, the tokens each expert took (every token goes to top_k experts in each layer)
    # and the router's balancing loss: said, in the log, per layer in RUN/expert_load.json
    load = json.loads((moe_run / "expert_load.json").read_text())
    assert load["samples"] == 4 and (load["experts"], load["top_k"]) == (4, 2)
    assert len(load["layers"]) == 2
    assert all(sum(c) == load["tokens"] * 2 for c in load["layers"].values()), load
    assert m["summary"]["expert_load"]["total"] == load["total"]
    assert math.isfinite(load["aux_loss"]) and load["aux_loss"] > 0
    assert "expert load (tokens, all layers)" in stderr and "qwenft: expert load" in log


def test_moe_lora_merges_within_tolerance_and_exports_to_gguf(moe_run: Path, qwenft) -> None:  # noqa: ANN001
    from qwenft.export import MOE_F16_LIMITS
    from tests.helpers.e2e import copy_run, manifest
    from tests.helpers.learning import LM, assert_learned, trained_rows

    run = copy_run(moe_run, Path("moe").absolute())  # merge and export write into the run
    qwenft("merge", run, "--verify")
    checks = manifest(run)["merge_checks"]
    assert checks["verify_max_abs_logit_diff"] < 1e-3  # the dense models' tolerance
    data = moe_run.parents[2] / "chat.jsonl"
    assert_learned(LM.of_run(run), trained_rows(run, data, Path("lf")))
    # f16 on an MoE model: held to agreement limits, not identical tokens (export.MOE_F16_LIMITS:
    # llama.cpp's f16 arithmetic flips near-tie routing choices); said as measured
    out = qwenft("export", run, "--format", "gguf")
    assert "answers token-identical to the merged model" in out.stderr, out.stderr
    (export,) = manifest(run)["exports"]
    assert Path(export["file"]).is_file()
    verify = export["checks"]
    assert verify["agreement"] >= MOE_F16_LIMITS[0], verify
    assert verify["mean_abs_logprob_diff"] <= MOE_F16_LIMITS[1], verify
