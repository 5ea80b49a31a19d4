"""The optimizers end to end (issue 22, part 1) with the real LLaMA-Factory on the tiny Qwen model,
full fine-tuning without DeepSpeed (GaLore and APOLLO refuse it): layer-wise GaLore, APOLLO and
layer-wise BAdam, one short run each. Each shows the optimizer took effect (LLaMA-Factory's own
log lines; for BAdam, that only the decoder layer it trained changed) and that the loss falls.
They need the optimizers extra (`make test` installs it)."""

from __future__ import annotations

import math
from pathlib import Path

from tests.helpers.e2e import FEW, Qwenft, losses, manifest

STEPS = 10


def train(qwenft: Qwenft, name: str, lr: str, *options: str) -> tuple[Path, str]:
    """Full fine-tuning of tiny-qwen2 with the options; the run and its train.log."""
    run = qwenft.cwd / "runs" / name
    data = qwenft.cwd.parent / "chat.jsonl"
    qwenft(
        "train",
        "--model",
        "tiny-qwen2",
        "--method",
        "full",
        "--deepspeed",
        "none",
        "--data",
        data,
        "-o",
        run,
        "--max-steps",
        STEPS,
        "--lr",
        lr,
        *FEW,
        *options,
    )
    curve = losses(run)
    assert all(math.isfinite(x) for x in curve) and len(curve) == STEPS, curve
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve  # the loss falls
    assert manifest(run)["status"] == "completed"
    return run, (run / "train.log").read_text()


def test_galore_layerwise(e2e_home: Qwenft) -> None:
    run, log = train(e2e_home, "galore", "1e-2", "--galore", "--galore-rank", "8",
                     "--galore-layerwise")  # fmt: skip
    assert "Using GaLore optimizer with args: {'rank': 8, " in log
    assert "The displayed gradient norm will be all zeros in layerwise GaLore." in log
    yaml = (run / "train.yaml").read_text()
    assert "optim: adamw_torch" in yaml and "gradient_accumulation_steps: 1" in yaml


def test_apollo(e2e_home: Qwenft) -> None:
    _, log = train(e2e_home, "apollo", "1e-2", "--apollo", "--apollo-rank", "4")
    assert "Using APOLLO optimizer with args: {'rank': 4, 'proj': 'random', " in log


def test_badam_trains_one_layer(e2e_home: Qwenft) -> None:
    from safetensors.torch import load_file

    run, log = train(e2e_home, "badam", "1e-2", "--badam", "--badam-switch-interval", "100")
    assert "Using BAdam optimizer with layer-wise update, switch mode is ascending" in log
    assert "Parameters with the following prefix will be trainable: ['model.layers.0.']" in log
    base = load_file(str(Path(manifest(run)["model"]["path"]) / "model.safetensors"))
    tuned = load_file(str(run / "model.safetensors"))
    changed = {k for k in base if not base[k].to(tuned[k].dtype).equal(tuned[k])}
    # the first decoder layer's weights, and nothing else (embeddings, the other layer, norm)
    assert changed and all(k.startswith("model.layers.0.") for k in changed), sorted(changed)
    assert {k for k in base if k.startswith("model.layers.0.") and k.endswith("proj.weight")} <= (
        changed
    )
