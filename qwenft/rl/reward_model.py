"""`--reward run:RUN`: a reward model (a run of --stage rm) as a GRPO reward, in the GRPO process.

Each completion is scored as the conversation it ends: the prompt's messages, then the completion
as the assistant's turn, encoded with the reward run's template, system prompt and thinking mode as
LLaMA-Factory encoded that run's training pairs (qwenft.data.tokens.LlamaFactoryEncoder), and read
by its value head at the last token (models.inference.value_scores, what `qwenft score` reads).
The reward model is loaded once, beside the policy (on the GPU when there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qwenft.choices import DataKind
from qwenft.data.tokens import LlamaFactoryEncoder
from qwenft.models import inference
from qwenft.models.target import resolve_target

DEFAULT_CUTOFF = 2048  # when the reward run's train.yaml has none


class RunReward:
    """A reward run's scores of (messages + completion) conversations."""

    def __init__(self, run_dir: Path, batch_size: int = 8) -> None:
        import torch

        target = resolve_target(str(run_dir))
        m = target.manifest
        assert m is not None  # parse_spec checked it is a reward run
        inference.prepare(target, lambda _msg: None)
        tokenizer = inference.load_tokenizer(target)
        self.pad_id = int(tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = inference.load_model(target).to(self.device)
        self.head = inference.ValueHead.of(target)
        config = yaml.safe_load((Path(run_dir) / "train.yaml").read_text(encoding="utf-8")) or {}
        self.encoder = LlamaFactoryEncoder(
            target.model_path,
            m.template,
            int(config.get("cutoff_len") or DEFAULT_CUTOFF),
            default_system=m.default_system,
            enable_thinking=m.enable_thinking,
            kind=DataKind.SFT.value,
        )
        self.batch_size = batch_size

    def __call__(
        self, completions: list[str], messages: list[list[dict]], **_kw: Any
    ) -> list[float | None]:
        """One score per completion; None where LLaMA-Factory would drop the conversation (an
        empty completion)."""
        samples = [
            {"messages": [*msgs, {"role": "assistant", "content": text}]}
            for msgs, text in zip(messages, completions, strict=True)
        ]
        sides = self.encoder.encode(samples)
        kept = [i for i, side in enumerate(sides) if side is not None]
        values = inference.value_scores(
            self.model,
            [sides[i][1] for i in kept],
            self.head,
            device=self.device,
            batch_size=self.batch_size,
            pad_id=self.pad_id,
        )
        out: list[float | None] = [None] * len(samples)
        for i, value in zip(kept, values, strict=True):
            out[i] = value
        return out
