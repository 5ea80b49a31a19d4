"""What training guarantees, measured in-process: the criteria of the learning tests.

A tiny model trained a fixed number of steps lands on slightly different weights on another CPU
(float kernels differ), so its greedy text can differ after a near tie ("144." on one machine,
"1444." on another). The learning tests assert margins that hold on any machine instead, on the
very tokens training saw (LLaMA-Factory's own tokenized rows of the run's data, helpers.lf_reference),
teacher-forced:

- `Scores.worst_margin`: every trained token (each answer and the <|im_end|> that ends it) ranked
  first, its logit above every other token's by at least this much (> 0: greedy decoding after the
  same prompt produces exactly the trained answer and stops);
- `Scores.logprob`: the trained tokens' summed log-probability, to compare a chosen answer with a
  rejected one, or the tuned model with its base.

`LM(folder)` loads a model folder (a merged run, a full run, a tiny preset), `LM(base, adapter=run)`
base + a LoRA adapter, `LM.of_run(run)` either from the run's manifest. Imports torch, transformers
and llamafactory: for model-tier tests only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.helpers.e2e import manifest
from tests.helpers.lf_reference import lf_rows, load_splits

IGNORE_INDEX = -100  # LLaMA-Factory's label of a token without a loss
# The logit lead that "learned" asks of every trained token (teacher-forced, over the next best
# token). On this machine the learning runs measure at least 3 (lora_run: 3.3-5.9 after 80
# steps); a third of that is left for another CPU's training to land elsewhere.
LEARNED_MARGIN = 1.0
# The train.yaml keys that decide how LLaMA-Factory tokenizes a run's data.
DATA_KEYS = ("stage", "template", "cutoff_len", "default_system", "enable_thinking", "tool_format")


@dataclass(frozen=True)
class Scores:
    """The labelled tokens of one tokenized sequence, teacher-forced."""

    logprob: float  # sum of log p(token | everything before it)
    n_tokens: int
    ranks: tuple[int, ...]  # each labelled token's rank in the vocabulary (0: first)
    worst_margin: float  # min over them of (its logit - the best other token's logit)

    @property
    def greedy(self) -> bool:
        """Every labelled token ranked first: greedy decoding reproduces them."""
        return self.worst_margin > 0

    def __str__(self) -> str:
        return (
            f"logp {self.logprob:.2f} over {self.n_tokens} tokens, worst margin "
            f"{self.worst_margin:.2f}, ranks {list(self.ranks)}"
        )


class LM:
    """A causal LM (float32, eval mode) that scores tokenized sequences."""

    def __init__(self, folder: Path | str, adapter: Path | str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()

    @classmethod
    def of_run(cls, run: Path, *, merged: bool = True) -> LM:
        """A run's merged model (merged=True and merged), its base + adapter (a LoRA run), or
        its own weights (a full or freeze run)."""
        m = manifest(run)  # as qwenft reads it: the merged folder under the run as it is now
        if merged and m.get("merged"):
            return cls(m["merged"])
        if (run / "adapter_config.json").is_file():
            return cls(m["model"]["path"], adapter=run)
        return cls(run)

    def score(self, input_ids: list[int], labels: list[int]) -> Scores:
        """The tokens whose label is not IGNORE_INDEX, each predicted from the ones before it."""
        import torch

        ids = torch.tensor([input_ids])
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        target = torch.tensor(labels[1:])
        keep = target != IGNORE_INDEX
        logits, wanted = logits[keep], target[keep]
        picked = logits.gather(1, wanted[:, None])[:, 0]
        others = logits.clone()
        others[torch.arange(len(wanted)), wanted] = float("-inf")
        return Scores(
            logprob=float(torch.log_softmax(logits, -1).gather(1, wanted[:, None]).sum()),
            n_tokens=len(wanted),
            ranks=tuple(int(r) for r in (logits > picked[:, None]).sum(-1)),
            worst_margin=float((picked - others.max(-1).values).min()),
        )

    def score_row(self, row: dict, side: str = "") -> Scores:
        """A row of LLaMA-Factory's tokenized dataset; side "chosen" or "rejected" for a pair."""
        prefix = f"{side}_" if side else ""
        return self.score(row[f"{prefix}input_ids"], row[f"{prefix}labels"])

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def trained_rows(run: Path, data: Path, work: Path) -> list[dict]:
    """The rows LLaMA-Factory trained the run on, in the data's order: input_ids and labels
    (chosen_* and rejected_* for pairs). They are the tokenized dataset the run loaded (the
    manifest's tokenized_cache) when it is there, else LLaMA-Factory's own preprocessing of `data`
    with the run's data settings (train.yaml), in-process (about 20 s: it imports llamafactory)."""
    cache = (json.loads((run / "qwenft.json").read_text()).get("tokenized_cache") or {}).get("path")
    if cache and Path(cache).is_dir():
        return load_splits(Path(cache))["train"][1]
    cfg = yaml.safe_load((run / "train.yaml").read_text())
    config = {k: cfg[k] for k in DATA_KEYS if k in cfg}
    return lf_rows(data, Path(cfg["model_name_or_path"]), config, work)


def assert_learned(lm: LM, rows: list[dict], margin: float = LEARNED_MARGIN) -> None:
    """Every trained token of every row ranked first, by more than `margin` logits."""
    for i, row in enumerate(rows):
        scores = lm.score_row(row)
        text = lm.tokenizer.decode(row["input_ids"])
        assert scores.worst_margin > margin, f"row {i} not learned: {scores}\n{text}"


def scores_text(scores: dict[str, Scores]) -> str:
    """Several scores, a line each: for assertion messages."""
    return "\n".join(f"{name}: {s}" for name, s in scores.items())
