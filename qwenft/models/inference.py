"""Loading a target (models.target) for inference with transformers: the tokenizer, and the model
(base + adapter through peft) in eval mode. `chat` talks to it, `scoring` (for `eval`) scores with
it; both load it here, the same way."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from qwenft.models.target import ModelTarget


def prepare(target: ModelTarget, progress: Callable[[str], None] = print) -> None:
    """Local and embedded models never need the hub; build the embedded tiny model if needed."""
    if target.model_kind in ("tiny", "local"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target.ensure_built(progress)


def load_tokenizer(target: ModelTarget) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target.model_path)


def load_model(target: ModelTarget) -> Any:
    """The model (with its adapter, when the target has one) in eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target.model_path, dtype="auto")
    if target.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.adapter_path)
    return model.eval()
