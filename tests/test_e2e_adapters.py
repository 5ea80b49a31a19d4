"""The adapter options end to end (issue 22) with the real LLaMA-Factory on the tiny Qwen model:
DoRA, rsLoRA, LoRA+ and SDPA attention together in one LoRA run, then PiSSA with rsLoRA, LoRA+ and
eager attention in a second one (LLaMA-Factory's plain-LoRA copy of a PiSSA adapter cannot carry
DoRA). Each shows the option took effect
(the adapter config, LLaMA-Factory's own log lines), the loss falls, and merge and chat work; for
PiSSA, the merged weights are the trained model's (residual base + trained adapter), which is
what the converted adapter (RUN/pissa_converted) exists for."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.helpers.builders import QA
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
