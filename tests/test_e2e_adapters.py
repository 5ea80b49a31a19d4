"""The adapter options end to end (issue 22) with the real LLaMA-Factory on the tiny Qwen model:
DoRA, rsLoRA, LoRA+ and SDPA attention together in one LoRA run, then PiSSA with rsLoRA, LoRA+ and
eager attention in a second one (LLaMA-Factory's plain-LoRA copy of a PiSSA adapter cannot carry
DoRA), and LLaMA Pro (freeze tuning of the blocks qwenft added to the base). Each shows the option took effect
(the adapter config, LLaMA-Factory's own log lines), the loss falls, and merge and chat work; for
PiSSA, the merged weights are the trained model's (residual base + trained adapter), which is
what the converted adapter (RUN/pissa_converted) exists for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from tests.helpers.builders import QA, chat_rows, write_jsonl
from tests.helpers.e2e import Qwenft, losses, manifest

# Short learning runs: every step logged, no checkpoints, no held-out split, a constant rate.
STEPS = (
    "--max-steps 10 --lr 2e-3 --batch-size 4 --grad-accum 1 --cutoff-len 96 --val-size 0 "
    "--set logging_steps=1 --set save_steps=1000 --set lr_scheduler_type=constant "
    "--set warmup_ratio=0"
).split()


def train(qwenft: Qwenft, run: Path, *options: str) -> str:
    """Train tiny-qwen2 with LoRA and the options; returns train.log."""
    data = qwenft.cwd.parent / "chat.jsonl"
    qwenft("train", "--model", "tiny-qwen2", "--data", data, "-o", run, *STEPS, *options)
    curve = losses(run)
    assert all(math.isfinite(x) for x in curve) and len(curve) == 10, curve
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3, curve  # the loss falls
    assert manifest(run)["status"] == "completed"
    return (run / "train.log").read_text()


def merge_and_chat(qwenft: Qwenft, run: Path) -> None:
    """merge --verify (merged logits against base + the run's adapter) and chat on the result."""
    qwenft("merge", run, "--verify", "--no-check")
    checks = manifest(run)["merge_checks"]
    assert checks["verify_max_abs_logit_diff"] < 1e-3, checks
    out = qwenft("chat", run, "--prompt", QA[0][0], "--max-new-tokens", "8")
    assert f"loading merged model {run / 'merged'}" in out.stderr, out  # ten steps may answer ""


def test_dora_rslora_loraplus_sdpa_train_merge_and_chat(e2e_home: Qwenft) -> None:
    run = e2e_home.cwd / "runs" / "dora"
    log = train(e2e_home, run, "--dora", "--rslora", "--loraplus-ratio", "4", "--attn", "sdpa")
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True, config
    assert "Fine-tuning method: DoRA" in log
    assert "Using LoRA+ optimizer with loraplus lr ratio 4.00." in log
    assert "Using torch SDPA for faster training and inference." in log
    merge_and_chat(e2e_home, run)


def test_pissa_trains_and_merges_to_the_trained_model(e2e_home: Qwenft) -> None:
    import torch
    from safetensors.torch import load_file

    run = e2e_home.cwd / "runs" / "pissa"
    log = train(e2e_home, run, "--pissa", "--rslora", "--loraplus-ratio", "4", "--attn", "eager")
    assert "Using PiSSA initialization with FSVD steps 16." in log
    assert "Using LoRA+ optimizer with loraplus lr ratio 4.00." in log
    assert "Using vanilla attention implementation." in log
    converted = run / "pissa_converted"
    config = json.loads((converted / "adapter_config.json").read_text())
    own = json.loads((run / "adapter_config.json").read_text())
    assert own["init_lora_weights"] == "pissa_niter_16"  # relative to PiSSA's residual base
    assert config["init_lora_weights"] is True and config["r"] == 2 * own["r"]  # a plain LoRA
    assert own["use_rslora"] is True and config["use_rslora"] is True
    merge_and_chat(e2e_home, run)  # merge applies the converted copy (models.target)

    # The model training ended with is W_res + s*B*A, with W_res = W - s*B0*A0 (PiSSA's start,
    # RUN/pissa_init): the merged weights are that, to float precision.
    scale = own["lora_alpha"] / math.sqrt(own["r"])  # rsLoRA's
    trained = load_file(run / "adapter_model.safetensors")
    start = load_file(run / "pissa_init" / "adapter_model.safetensors")
    base = load_file(Path(manifest(run)["model"]["path"]) / "model.safetensors")
    merged = load_file(run / "merged" / "model.safetensors")
    module = "model.layers.0.self_attn.q_proj"
    a, b = (trained[f"base_model.model.{module}.lora_{x}.weight"].float() for x in "AB")
    a0, b0 = (start[f"base_model.model.{module}.lora_{x}.weight"].float() for x in "AB")
    w = base[f"{module}.weight"].float()
    expected = w - scale * (b0 @ a0) + scale * (b @ a)
    got = merged[f"{module}.weight"].float()
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert (b @ a - b0 @ a0).abs().max() > 1e-4  # and training moved the adapter


def test_llama_pro_expands_the_base_and_trains_only_the_new_blocks(e2e_home: Qwenft) -> None:
    import torch
    from safetensors.torch import load_file

    from tests.helpers.learning import LM

    run = e2e_home.cwd / "runs" / "llama-pro"
    log = train(e2e_home, run, "--method", "freeze", "--llama-pro", "2")
    expanded = Path(manifest(run)["model"]["path"])
    base = Path(manifest(run)["model"]["extra"]["llama_pro"]["base"]["path"])
    assert json.loads((expanded / "config.json").read_text())["num_hidden_layers"] == 4
    assert "Set trainable layers: .1.,.3." in log  # the inserted blocks, nothing else
    # the expanded base computes what the base computes (each new block adds zero) ...
    before, after = LM(base), LM(expanded)
    ids = torch.tensor([before.tokenizer(QA[0][0] + " " + QA[0][1])["input_ids"]])
    with torch.no_grad():
        gap = (before.model(input_ids=ids).logits - after.model(input_ids=ids).logits).abs().max()
    assert gap < 1e-5, gap
    # ... and training changed the new blocks only
    start = {k: v for f in expanded.glob("*.safetensors") for k, v in load_file(f).items()}
    trained = {k: v for f in run.glob("*.safetensors") for k, v in load_file(f).items()}
    moved = {
        k.split(".")[2] for k in start if ".layers." in k and not torch.equal(start[k], trained[k])
    }
    assert moved == {"1", "3"}, moved
    assert all(torch.equal(start[k], trained[k]) for k in start if ".layers." not in k)
    out = e2e_home("chat", run, "--prompt", QA[0][0], "--max-new-tokens", "8")
    assert f"loading {run} ..." in out.stderr, out.stderr  # the run's own weights


def test_loftq_starts_qlora_from_a_closer_approximation_of_the_base(e2e_home: Qwenft) -> None:
    from safetensors.torch import load_file

    run = e2e_home.cwd / "runs" / "loftq"
    # LoftQ starts A and B at the small singular vectors of the quantization error (plain LoRA:
    # B = 0, A at full scale), so its first steps move slowly: a higher rate
    log = train(e2e_home, run, "--method", "qlora", "--loftq", "--lr", "2e-2")
    start = Path(manifest(run)["model"]["path"])  # the derived base: Q of every adapted weight
    base = Path(manifest(run)["model"]["extra"]["loftq"]["base"]["path"])
    assert f"Loaded adapter(s): {start / 'loftq_init'}" in log
    w = load_file(base / "model.safetensors")
    q = {k: v for f in start.glob("*.safetensors") for k, v in load_file(f).items()}
    init = load_file(start / "loftq_init" / "adapter_model.safetensors")
    config = json.loads((start / "loftq_init" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    module = "model.layers.1.mlp.down_proj"
    a, b = (init[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    plain = (w[f"{module}.weight"] - q[f"{module}.weight"]).norm()
    loftq = (w[f"{module}.weight"] - q[f"{module}.weight"] - scale * b @ a).norm()
    # LoftQ's point: the 4-bit base plus its initial adapter is closer to the base than the 4-bit
    # base alone (measured here: 0.51-0.55 of the plain quantization error)
    assert loftq < 0.8 * plain, (float(loftq), float(plain))
    merge_and_chat(e2e_home, run)


def test_lora_trains_on_a_prequantized_base_as_it_is(qwenft: Qwenft, tiny_home: Path) -> None:
    """A base whose config.json carries a quantization_config (bitsandbytes 4-bit here, the kind
    that loads on a CPU; GPTQ and AWQ: scripts/bench_gpu.sh --quantized) trains a LoRA on top as
    LLaMA-Factory loads it, with no quantization of qwenft's own; merging is refused with the
    reason, and chat runs the quantized base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qwenft.models import presets
    from qwenft.models.target import base_target

    tiny = presets.resolve_model("tiny-qwen2")
    base_target(tiny).ensure_built(print)
    folder = tiny_home / "tiny-qwen2-bnb4"
    quantize = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny.path, quantization_config=quantize)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny.path).save_pretrained(folder)

    run = tiny_home / "runs" / "on-bnb4"
    data = write_jsonl(tiny_home / "chat.jsonl", chat_rows())
    qwenft(
        "train",
        "--model",
        folder,
        "--method",
        "qlora",
        "--data",
        data,
        "-o",
        run,
        *STEPS,
        "--lr",
        "1e-2",
    )
    log = (run / "train.log").read_text()
    assert "BITSANDBYTES-quantized model" in log and "Quantizing model to" not in log
    assert yaml.safe_load((run / "train.yaml").read_text())["quantization_bit"] is None
    assert manifest(run)["model"]["extra"]["quantization"] == {"method": "bitsandbytes", "bits": 4}
    curve = losses(run)
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3, curve  # the loss falls
    merge = qwenft("merge", run, check=False)
    assert merge.returncode == 2 and "Cannot merge adapters to a quantized model" in merge.stderr
    assert not (run / "merged").exists()
    out = qwenft("chat", run, "--prompt", QA[0][0], "--max-new-tokens", "8")
    assert f"+ adapter {run}" in out.stderr, out.stderr
