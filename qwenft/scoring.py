"""Log-probabilities of answers under a model: what preference, KTO and pre-training evaluations
measure (`qwenft eval RUN --data pairs.jsonl`), in-process with transformers.

The tokens are LLaMA-Factory's own (qwenft.data.tokens.LlamaFactoryEncoder reproduces its
converter, template and dataset processor of the data kind), so the prompt/answer split is
exactly the one training used: a sequence's score is the sum of log p(token | the tokens before it) over the
positions whose label is not IGNORE_INDEX (the answer tokens; every token for pt), which is
LLaMA-Factory's get_batch_logps (the DPO and KTO trainers' log-probability).

API (kept stable; other modules and tests call it):

- ``load_scorer(target) -> Scorer``; ``Scorer.logprobs(rows) -> list[float]`` and
  ``Scorer.token_logprobs(rows) -> list[(sum, n_tokens)]``, a row being ``(input_ids, labels)``
  or an encoder side ``(untruncated_length, input_ids, labels)``;
- ``encode_rows(path, encoder, max_samples)``: the file's valid rows with their encoded sides;
- ``Scorer.expert_load(rows)``: how a mixture-of-experts model routes the rows' tokens;
- ``Scorer.rewards(rows, ValueHead.of(target))`` and ``reward_scores``: a reward model's scores
  (a run of --stage rm: `qwenft score`, and `qwenft eval` of such a run);
- ``preference_margins``, ``feedback_shift``, ``text_perplexity``: a data file scored under the
  tuned model and (optionally) its starting model, as plain dicts (see each function).

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.choices import DataKind
from qwenft.errors import QwenftError
from qwenft.models.inference import ValueHead, padded_batches, value_scores
from qwenft.models.target import ModelTarget

IGNORE_INDEX = -100  # LLaMA-Factory's (llamafactory.extras.constants.IGNORE_INDEX)
DEFAULT_BATCH = 8

Row = Sequence[Any]  # (input_ids, labels) or (untruncated length, input_ids, labels)


def _ids_labels(row: Row) -> tuple[list[int], list[int]]:
    if len(row) == 3:
        return list(row[1]), list(row[2])
    if len(row) == 2:
        return list(row[0]), list(row[1])
    raise ValueError("a row is (input_ids, labels) or (untruncated length, input_ids, labels)")


@dataclass
class Scorer:
    """A loaded causal LM that sums the log-probabilities of the labelled tokens of sequences."""

    target: ModelTarget
    model: Any
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH
    pad_id: int = 0

    def token_logprobs(self, rows: Iterable[Row]) -> list[tuple[float, int]]:
        """(sum of log p over the labelled tokens, how many) for each row, as LLaMA-Factory's
        get_batch_logps: the label at position t+1 is scored by the logits at position t."""
        import torch

        rows = [_ids_labels(r) for r in rows]
        if any(len(seq) != len(lab) for seq, lab in rows):
            raise ValueError("input_ids and labels differ in length")
        results: dict[int, tuple[float, int]] = {}
        seqs = [seq for seq, _ in rows]
        for idx, ids, mask in padded_batches(seqs, self.batch_size, self.pad_id):
            labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
            for k, i in enumerate(idx):
                labels[k, : len(rows[i][1])] = torch.tensor(rows[i][1], dtype=torch.long)
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                ).logits
                target = labels[:, 1:].to(self.device)
                keep = target != IGNORE_INDEX
                logps = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
                picked = torch.gather(logps, 2, target.clamp(min=0).unsqueeze(2)).squeeze(2)
                sums = (picked * keep).sum(-1).double().cpu().tolist()
                counts = keep.sum(-1).cpu().tolist()
            for k, i in enumerate(idx):
                results[i] = (float(sums[k]), int(counts[k]))
            del logits, logps, picked
        return [results[i] for i in range(len(rows))]

    def expert_load(self, rows: Sequence[Row]) -> dict[str, Any] | None:
        """How a mixture-of-experts model routes the rows' tokens, one row at a time: per MoE
        layer the tokens each expert took (each token goes to top_k of them: hooks on the
        routers, transformers' *TopKRouter modules), and the router's load-balancing loss as
        the model computes it (output_router_logits). None for a model without routers."""
        import torch

        routers = [
            (name, m)
            for name, m in self.model.named_modules()
            if type(m).__name__.endswith("TopKRouter") and hasattr(m, "num_experts")
        ]
        if not routers:
            return None
        counts = {name: torch.zeros(m.num_experts, dtype=torch.long) for name, m in routers}

        def hook(name: str) -> Callable[..., None]:
            def record(_module: Any, _args: Any, output: Any) -> None:
                counts[name] += torch.bincount(
                    output[2].flatten().cpu(), minlength=len(counts[name])
                )

            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in routers]
        aux, tokens = [], 0
        try:
            for row in rows:
                ids, _ = _ids_labels(row)
                tokens += len(ids)
                with torch.no_grad():
                    out = self.model(
                        input_ids=torch.tensor([ids], device=self.device),
                        output_router_logits=True,
                        use_cache=False,
                    )
                if getattr(out, "aux_loss", None) is not None:
                    aux.append(float(out.aux_loss))
        finally:
            for h in handles:
                h.remove()
        first = routers[0][1]
        total = torch.stack(list(counts.values())).sum(0)
        return {
            "samples": len(rows),
            "tokens": tokens,
            "experts": int(first.num_experts),
            "top_k": int(getattr(first, "top_k", 0)),
            "layers": {name: c.tolist() for name, c in counts.items()},
            "total": total.tolist(),
            "aux_loss": sum(aux) / len(aux) if aux else None,
        }

    def rewards(self, rows: Iterable[Row], head: ValueHead) -> list[float]:
        """A reward model's score of each row (inference.value_scores)."""
        seqs = [_ids_labels(r)[0] for r in rows]
        return value_scores(
            self.model,
            seqs,
            head,
            device=self.device,
            batch_size=self.batch_size,
            pad_id=self.pad_id,
        )

    def logprobs(self, rows: Iterable[Row]) -> list[float]:
        """The sum of the labelled tokens' log-probabilities of each row."""
        return [s for s, _ in self.token_logprobs(rows)]

    def close(self) -> None:
        """Drop the model (the next load then has the memory)."""
        self.model = None
        gc.collect()


def load_scorer(target: ModelTarget, *, batch_size: int = DEFAULT_BATCH) -> Scorer:
    """Load the target as `qwenft chat` does (qwenft.models.inference: transformers; peft for
    base + adapter), in eval mode, on the GPU when one is visible."""
    import torch

    from qwenft.models import inference

    with contextlib.redirect_stdout(sys.stderr):
        inference.prepare(target)
        tokenizer = inference.load_tokenizer(target)
        model = inference.load_model(target)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        model = model.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Scorer(target, model.eval(), device, batch_size, int(pad or 0))


# --- reading a file as LLaMA-Factory encodes it -------------------------------------------------


def make_encoder(
    target: ModelTarget,
    kind: str,
    *,
    template: str,
    default_system: str | None,
    enable_thinking: bool | None,
    cutoff_len: int,
) -> Any:
    """LLaMA-Factory's encoder of this kind of data with the target's tokenizer."""
    from qwenft.data.tokens import LlamaFactoryEncoder

    target.ensure_built(lambda _msg: None)
    return LlamaFactoryEncoder(
        target.model_path,
        template,
        cutoff_len,
        default_system=default_system,
        enable_thinking=enable_thinking,
        kind=kind,
    )


def encode_rows(
    path: Path, encoder: Any, max_samples: int | None = None, batch: int = 256
) -> list[tuple[int, dict, list[tuple[int, list[int], list[int]]]]]:
    """(line, row, sides) of the file's first max_samples rows that LLaMA-Factory trains on
    (rows with check errors or that its processor drops are skipped), a side being (untruncated
    length, input_ids, labels): one for sft, kto and pt, chosen then rejected for a pair."""
    from qwenft.data.kinds import RowRules
    from qwenft.data.reader import BAD, Collector, iter_rows, open_data_file

    path, fh, mode = open_data_file(Path(path))
    col = Collector()
    checker = RowRules(col, encoder.kind, mode)
    out: list[tuple[int, dict, list]] = []
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        for (line, row), sides in zip(
            pending, encoder.encode_sides([r for _, r in pending]), strict=True
        ):
            if sides is not None and (max_samples is None or len(out) < max_samples):
                out.append((line, row, sides))
        pending.clear()

    with fh:
        for line, value, raw in iter_rows(fh, mode, col):
            if max_samples is not None and len(out) >= max_samples:
                break
            if value is BAD or not checker.check(value, line, raw):
                continue
            pending.append((line, value))
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    return out


# --- scoring a file under the tuned and the starting model ---------------------------------------


def _score_models(
    targets: dict[str, ModelTarget | None],
    rows: list[Row],
    batch_size: int,
    progress: Callable[[str], None],
    what: str,
) -> dict[str, list[tuple[float, int]] | None]:
    """token_logprobs of the rows under each model, one model loaded at a time."""
    out: dict[str, list[tuple[float, int]] | None] = {}
    for role, target in targets.items():
        if target is None:
            out[role] = None
            continue
        progress(f"scoring {what} with the {role} model ({target.source or target.model_path}) ...")
        scorer = load_scorer(target, batch_size=batch_size)
        try:
            out[role] = scorer.token_logprobs(rows)
        finally:
            scorer.close()
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _prepare(
    target: ModelTarget,
    path: Path,
    kind: str,
    template: str,
    default_system: str | None,
    enable_thinking: bool | None,
    cutoff_len: int,
    max_samples: int | None,
) -> list[tuple[int, dict, list]]:
    encoder = make_encoder(
        target,
        kind,
        template=template,
        default_system=default_system,
        enable_thinking=enable_thinking,
        cutoff_len=cutoff_len,
    )
    rows = encode_rows(path, encoder, max_samples)
    if not rows:
        raise QwenftError(
            f"{path} has no {kind} sample that LLaMA-Factory would use",
            f"`qwenft data check {path}` shows the rows and their problems",
        )
    return rows


def _silent(_msg: str) -> None:
    pass


def preference_margins(
    target: ModelTarget,
    start: ModelTarget | None,
    path: Path,
    *,
    template: str,
    default_system: str | None,
    enable_thinking: bool | None,
    cutoff_len: int,
    max_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[str], None] = _silent,
) -> dict[str, Any]:
    """Each pair's margin = log p(chosen) - log p(rejected) (sums over the answer tokens) under
    the tuned model and the starting model (None: not measured).

    Returns {"pairs": n, "tuned": stats, "start": stats | None, "reward_accuracy": fraction of
    pairs whose tuned margin exceeds the starting margin, "reward_margin": mean(tuned margin -
    start margin), "rows": [{"line", "tuned": {"chosen", "rejected", "margin"}, "start": ...}]},
    stats = {"mean_margin", "accuracy" (fraction with margin > 0), "mean_chosen_logp",
    "mean_rejected_logp"}. DPO's implicit reward is beta x (tuned - start margin), so
    reward_accuracy is what DPO's rewards/accuracies means, measured on this data.
    """
    encoded = _prepare(
        target,
        path,
        DataKind.PREFERENCE.value,
        template,
        default_system,
        enable_thinking,
        cutoff_len,
        max_samples,
    )
    seqs = [side for _, _, sides in encoded for side in sides]  # chosen, rejected, chosen, ...
    scores = _score_models(
        {"tuned": target, "start": start}, seqs, batch_size, progress, f"{len(encoded)} pairs"
    )
    per_model: dict[str, list[dict[str, float]] | None] = {}
    for role, sc in scores.items():
        if sc is None:
            per_model[role] = None
            continue
        per_model[role] = [
            {"chosen": c, "rejected": r, "margin": c - r}
            for (c, _), (r, _) in zip(sc[0::2], sc[1::2], strict=True)
        ]

    def stats(items: list[dict[str, float]] | None) -> dict[str, float | None] | None:
        if items is None:
            return None
        margins = [x["margin"] for x in items]
        return {
            "mean_margin": _mean(margins),
            "accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_chosen_logp": _mean([x["chosen"] for x in items]),
            "mean_rejected_logp": _mean([x["rejected"] for x in items]),
        }

    tuned, begun = per_model["tuned"], per_model["start"]
    assert tuned is not None
    gains = (
        [t["margin"] - s["margin"] for t, s in zip(tuned, begun, strict=True)] if begun else None
    )
    return {
        "pairs": len(encoded),
        "tuned": stats(tuned),
        "start": stats(begun),
        "reward_accuracy": sum(g > 0 for g in gains) / len(gains) if gains else None,
        "reward_margin": _mean(gains) if gains else None,
        "rows": [
            {"line": line, "tuned": tuned[k], "start": begun[k] if begun else None}
            for k, (line, _, _) in enumerate(encoded)
        ],
    }


def feedback_shift(
    target: ModelTarget,
    start: ModelTarget | None,
    path: Path,
    *,
    template: str,
    default_system: str | None,
    enable_thinking: bool | None,
    cutoff_len: int,
    max_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[str], None] = _silent,
) -> dict[str, Any]:
    """KTO data: each answer's log p (sum over its tokens) under the tuned and starting model.

    Returns {"samples", "desirable", "undesirable" (counts), "tuned": stats, "start": stats |
    None, "desirable_shift": mean(tuned - start) of desirable answers, "undesirable_shift": the
    same of undesirable ones, "shift_gap": desirable_shift - undesirable_shift (> 0: desirable
    answers rose relative to undesirable ones), "rows": [{"line", "label", "tuned", "start"}]},
    stats = {"desirable_logp", "undesirable_logp" (means), "gap": their difference}.
    """
    encoded = _prepare(
        target,
        path,
        DataKind.KTO.value,
        template,
        default_system,
        enable_thinking,
        cutoff_len,
        max_samples,
    )
    labels = [bool(row.get("label")) for _, row, _ in encoded]
    seqs = [sides[0] for _, _, sides in encoded]
    scores = _score_models(
        {"tuned": target, "start": start}, seqs, batch_size, progress, f"{len(encoded)} answers"
    )
    logp = {role: None if sc is None else [s for s, _ in sc] for role, sc in scores.items()}

    def by_label(values: list[float], want: bool) -> list[float]:
        return [v for v, lab in zip(values, labels, strict=True) if lab is want]

    def stats(values: list[float] | None) -> dict[str, float | None] | None:
        if values is None:
            return None
        d, u = _mean(by_label(values, True)), _mean(by_label(values, False))
        return {
            "desirable_logp": d,
            "undesirable_logp": u,
            "gap": d - u if d is not None and u is not None else None,
        }

    tuned, begun = logp["tuned"], logp["start"]
    assert tuned is not None
    shift_d = shift_u = gap = None
    if begun is not None:
        diff = [t - s for t, s in zip(tuned, begun, strict=True)]
        shift_d, shift_u = _mean(by_label(diff, True)), _mean(by_label(diff, False))
        if shift_d is not None and shift_u is not None:
            gap = shift_d - shift_u
    return {
        "samples": len(encoded),
        "desirable": sum(labels),
        "undesirable": len(labels) - sum(labels),
        "tuned": stats(tuned),
        "start": stats(begun),
        "desirable_shift": shift_d,
        "undesirable_shift": shift_u,
        "shift_gap": gap,
        "rows": [
            {
                "line": line,
                "label": labels[k],
                "tuned": tuned[k],
                "start": begun[k] if begun is not None else None,
            }
            for k, (line, _, _) in enumerate(encoded)
        ],
    }


def _perplexity(nll: float | None) -> float | None:
    if nll is None:
        return None
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def text_perplexity(
    target: ModelTarget,
    start: ModelTarget | None,
    path: Path,
    *,
    template: str,
    default_system: str | None = None,
    enable_thinking: bool | None = None,
    cutoff_len: int,
    max_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[str], None] = _silent,
) -> dict[str, Any]:
    """Pre-training text: perplexity = exp(mean negative log-likelihood per token) over every
    predicted token of the texts (each text as LLaMA-Factory's pt stage reads it, then its
    end-of-text token, cut at cutoff_len; no packing), under the tuned and the starting model.

    Returns {"texts", "tuned": stats, "start": stats | None, "perplexity_change": tuned - start
    perplexity, "rows": [{"line", "tokens", "tuned": logp, "start": logp}]}, stats = {"nll",
    "perplexity", "tokens"}.
    """
    encoded = _prepare(
        target,
        path,
        DataKind.PT.value,
        template,
        default_system,
        enable_thinking,
        cutoff_len,
        max_samples,
    )
    seqs = [sides[0] for _, _, sides in encoded]
    scores = _score_models(
        {"tuned": target, "start": start}, seqs, batch_size, progress, f"{len(encoded)} texts"
    )

    def stats(sc: list[tuple[float, int]] | None) -> dict[str, float | int | None] | None:
        if sc is None:
            return None
        tokens = sum(n for _, n in sc)
        nll = -sum(s for s, _ in sc) / tokens if tokens else None
        return {"nll": nll, "perplexity": _perplexity(nll), "tokens": tokens}

    tuned, begun = stats(scores["tuned"]), stats(scores["start"])
    assert tuned is not None and scores["tuned"] is not None
    change = None
    if begun is not None and tuned["perplexity"] is not None and begun["perplexity"] is not None:
        change = tuned["perplexity"] - begun["perplexity"]
    start_scores = scores["start"]
    return {
        "texts": len(encoded),
        "tuned": tuned,
        "start": begun,
        "perplexity_change": change,
        "rows": [
            {
                "line": line,
                "tokens": scores["tuned"][k][1],
                "tuned": scores["tuned"][k][0],
                "start": start_scores[k][0] if start_scores is not None else None,
            }
            for k, (line, _, _) in enumerate(encoded)
        ],
    }


def reward_scores(
    target: ModelTarget,
    path: Path,
    kind: str,
    *,
    template: str,
    default_system: str | None,
    enable_thinking: bool | None,
    cutoff_len: int,
    max_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[str], None] = _silent,
) -> dict[str, Any]:
    """A reward model's scores of a file, each sequence encoded as LLaMA-Factory encodes it for
    training (the chat template applied: the scores mean what the model was trained on).

    preference pairs: {"pairs": n, "tuned": {"mean_margin", "accuracy" (fraction of pairs with
    score(chosen) > score(rejected)), "mean_chosen_score", "mean_rejected_score"}, "rows":
    [{"line", "chosen", "rejected", "margin"}]}; conversations (sft): {"conversations": n,
    "tuned": {"mean_score", "min_score", "max_score"}, "rows": [{"line", "score"}]}."""
    if kind not in (DataKind.PREFERENCE.value, DataKind.SFT.value):  # the callers refuse others
        raise ValueError(f"a reward model scores sft or preference data, not {kind}")
    head = ValueHead.of(target)
    encoded = _prepare(
        target, path, kind, template, default_system, enable_thinking, cutoff_len, max_samples
    )
    seqs = [side for _, _, sides in encoded for side in sides]
    what = "pairs" if kind == DataKind.PREFERENCE.value else "conversations"
    progress(f"scoring {len(encoded)} {what} with {target.source or target.model_path} ...")
    scorer = load_scorer(target, batch_size=batch_size)
    try:
        values = scorer.rewards(seqs, head)
    finally:
        scorer.close()
    if kind == DataKind.SFT.value:
        return {
            "conversations": len(encoded),
            "tuned": {
                "mean_score": _mean(values),
                "min_score": min(values),
                "max_score": max(values),
            },
            "rows": [
                {"line": line, "score": v} for (line, _, _), v in zip(encoded, values, strict=True)
            ],
        }
    rows = [
        {"line": line, "chosen": c, "rejected": r, "margin": c - r}
        for (line, _, _), c, r in zip(encoded, values[0::2], values[1::2], strict=True)
    ]
    margins = [x["margin"] for x in rows]
    return {
        "pairs": len(rows),
        "tuned": {
            "mean_margin": _mean(margins),
            "accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_chosen_score": _mean([x["chosen"] for x in rows]),
            "mean_rejected_score": _mean([x["rejected"] for x in rows]),
        },
        "rows": rows,
    }


SCORERS: dict[str, Callable[..., dict[str, Any]]] = {
    DataKind.PREFERENCE.value: preference_margins,
    DataKind.KTO.value: feedback_shift,
    DataKind.PT.value: text_perplexity,
}
