"""Loading a target (models.target) for inference with transformers: the tokenizer, and the model
(base + adapter through peft) in eval mode. `chat` talks to it, `scoring` (for `eval`) scores with
it; both load it here, the same way. Also the batching every forward pass over many sequences
shares (`padded_batches`), and a reward model's value head and scores (`ValueHead`,
`value_scores`: `qwenft score`, `eval` of a reward run, and a GRPO run's `--reward run:RUN`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.models.target import ModelTarget, value_head_path

# The libraries that talk while a model loads and generates in this process: "Loading weights"
# bars, advisory warnings ("The attention mask is not set ..."), DeepSpeed's "Setting accelerator
# to CPU" (at its import), bitsandbytes' kernel notices, Python warnings.
NOISY_LOGGERS = ("transformers", "DeepSpeed", "bitsandbytes", "peft", "accelerate", "py.warnings")
_handlers: list[logging.Handler] = []


class _BelowError(logging.Filter):
    """On a logger that prints by itself (DeepSpeed's own stdout handler): a record below ERROR
    goes to qwenft's handlers instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        for handler in _handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        return False


def quiet(log_path: Path | None = None) -> None:
    """Keep transformers, DeepSpeed, bitsandbytes and Python warnings off the terminal while qwenft
    loads and runs a model in this process: progress bars off, warnings into log_path (appended:
    the command's own log, e.g. RUN/merge.log) or nowhere without one; errors still reach stderr.
    A later call replaces the log. QWENFT_DEBUG=1 leaves everything as the libraries have it."""
    if os.environ.get("QWENFT_DEBUG"):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before huggingface_hub's import
    for handler in _handlers:
        handler.close()
    to_log: logging.Handler = (
        logging.FileHandler(log_path, encoding="utf-8") if log_path else logging.NullHandler()
    )
    to_log.setLevel(logging.WARNING)
    to_log.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    _handlers[:] = [to_log, errors]
    logging.captureWarnings(True)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_qwenft", False)]
        for handler in _handlers:
            handler._qwenft = True  # type: ignore[attr-defined]
            if name != "DeepSpeed":
                logger.addHandler(handler)
        logger.propagate = False
        if name == "DeepSpeed":  # it adds a stdout handler of its own when imported
            if not any(isinstance(f, _BelowError) for f in logger.filters):
                logger.addFilter(_BelowError())
        elif logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)
    import transformers.utils.logging as hf_logging  # its own stderr handler goes, ours stay

    hf_logging.disable_default_handler()
    hf_logging.disable_progress_bar()


def prepare(target: ModelTarget, progress: Callable[[str], None] = print) -> None:
    """Local and embedded models never need the hub; build the embedded tiny model if needed."""
    if target.model_kind in ("tiny", "local"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target.ensure_built(progress)


def load_tokenizer(target: ModelTarget) -> Any:
    from transformers import AutoTokenizer

    quiet_unless_set()
    return AutoTokenizer.from_pretrained(target.model_path)


def quiet_unless_set() -> None:
    """quiet() without a log, unless the command already made it quiet (into its log)."""
    if not _handlers:
        quiet()


def load_pretrained(model_dir: str | Path, **kwargs: Any) -> Any:
    """A model folder through transformers' Auto class for it: a vision-language model (its
    config has a vision_config: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) as image-text-to-text, any other
    as a causal LM. Every place that loads a model for inference or a check loads it here."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vision = getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is not None
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, **kwargs)


def load_model(target: ModelTarget) -> Any:
    """The model (with its adapter, when the target has one) in eval mode, on the CPU, quietly
    (quiet())."""
    quiet_unless_set()

    model = load_pretrained(target.model_path, dtype="auto")
    if target.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.adapter_path)
    return model.eval()


def padded_batches(
    seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], Any, Any]]:
    """The sequences in batches, longest first so each pads little: (the batch's indexes into
    seqs, input_ids padded on the right with pad_id, attention_mask), as torch tensors."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for k, i in enumerate(idx):
            ids[k, : len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
            mask[k, : len(seqs[i])] = 1
        yield idx, ids, mask


@dataclass
class ValueHead:
    """A reward model's value head: one linear layer, hidden size -> 1 (trl's ValueHead.summary,
    saved by LLaMA-Factory as v_head.summary.weight / .bias in value_head.safetensors)."""

    weight: Any  # torch tensor [1, hidden]
    bias: Any  # torch tensor [1]
    path: Path

    @classmethod
    def of(cls, target: ModelTarget) -> ValueHead:
        """The target's value head: beside its adapter (a LoRA run), in its merged folder (merge
        copies it) or among its own weights (a full or freeze run)."""
        from safetensors.torch import load_file

        path = value_head_path(target)
        try:
            tensors = load_file(str(path))
            weight, bias = tensors["v_head.summary.weight"], tensors["v_head.summary.bias"]
        except (OSError, KeyError, ValueError) as exc:
            raise QwenftError(f"cannot read the value head {path}: {exc}") from exc
        return cls(weight.float(), bias.float(), path)


def value_scores(
    model: Any,
    seqs: Sequence[Sequence[int]],
    head: ValueHead,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[float]:
    """A reward model's score of each sequence: its value head over the last hidden state at the
    sequence's last token, as LLaMA-Factory's reward trainer scores a side (trl's
    AutoModelForCausalLMWithValueHead: the head reads hidden_states[-1]; the pairwise trainer
    gathers it at the last unpadded position)."""
    import torch

    results: dict[int, float] = {}
    weight = head.weight.to(device)
    bias = head.bias.to(device)
    for idx, ids, mask in padded_batches(seqs, batch_size, pad_id):
        with torch.no_grad():
            hidden = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
                use_cache=False,
                logits_to_keep=1,  # the LM head's logits are not needed
            ).hidden_states[-1]
            last = mask.sum(-1).to(device) - 1
            picked = hidden[torch.arange(len(idx), device=device), last]
            values = (picked.to(weight.dtype) @ weight.T + bias).squeeze(-1)
        for k, i in enumerate(idx):
            results[i] = float(values[k])
    return [results[i] for i in range(len(seqs))]
