"""qwenft.scoring: log-probabilities of answers under the tiny Qwen, on exactly the tokens
LLaMA-Factory labels (model tier: the tiny model in-process, no LLaMA-Factory launch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.builders import QA, pair_rows, write_jsonl


@pytest.fixture
def tiny(tiny_home: Path):  # noqa: ANN201 - ModelTarget
    from qwenft.models.presets import resolve_model
    from qwenft.models.target import base_target

    target = base_target(resolve_model("tiny-qwen2"))
    target.ensure_built(lambda _msg: None)
    return target


def _encode(target, kind: str, path: Path, **kw):  # noqa: ANN001, ANN202
    from qwenft import scoring

    enc = scoring.make_encoder(
        target,
        kind,
        template=target.template,
        default_system=target.system,
        enable_thinking=target.enable_thinking,
        cutoff_len=kw.pop("cutoff_len", 128),
    )
    return scoring.encode_rows(path, enc, **kw)


def test_scores_exactly_the_answer_tokens_llamafactory_labels(tiny, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenft import scoring

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows()[:1])
    [(line, _, (chosen, rejected))] = _encode(tiny, "preference", path)
    assert line == 1

    # Independently: the Qwen chat template renders the prompt, then the prompt + answer; the
    # answer's tokens (its text, <|im_end|> and the newline) are what LLaMA-Factory labels.
    tok = AutoTokenizer.from_pretrained(tiny.model_path)
    question, answer = QA[0]
    messages = [
        {"role": "system", "content": tiny.system},
        {"role": "user", "content": question},
    ]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
    full_ids = tok.encode(
        tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        ),
        add_special_tokens=False,
    )
    _, ids, labels = chosen
    assert ids == full_ids and full_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [scoring.IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == full_ids[len(prompt_ids) :]
    assert tok.decode(labels[len(prompt_ids) :]) == answer + "<|im_end|>\n"
    assert rejected[1][: len(prompt_ids)] == prompt_ids  # the same prompt, another answer

    model = AutoModelForCausalLM.from_pretrained(tiny.model_path).eval()
    with torch.no_grad():
        logp = model(torch.tensor([full_ids])).logits[0].float().log_softmax(-1)
    manual = sum(float(logp[t - 1, full_ids[t]]) for t in range(len(prompt_ids), len(full_ids)))

    scorer = scoring.load_scorer(tiny, batch_size=2)
    both = scorer.token_logprobs([chosen, rejected])  # padded to the longer side in one batch
    assert both[0][0] == pytest.approx(manual, abs=1e-4)
    assert both[0][1] == len(full_ids) - len(prompt_ids)
    assert scorer.logprobs([(ids, labels)]) == pytest.approx([both[0][0]], abs=1e-4)
    assert scorer.logprobs([rejected]) == pytest.approx([both[1][0]], abs=1e-4)


def test_margins_feedback_and_perplexity_of_a_model_against_itself(tiny, tmp_path: Path) -> None:
    """The tuned and starting model the same: every shift is zero, numbers are consistent."""
    import math

    from qwenft import scoring

    common = dict(
        template=tiny.template,
        default_system=tiny.system,
        enable_thinking=tiny.enable_thinking,
        cutoff_len=128,
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    r = scoring.preference_margins(tiny, tiny, pairs, max_samples=3, **common)
    assert r["pairs"] == 3 and [x["line"] for x in r["rows"]] == [1, 2, 3]
    assert r["reward_accuracy"] == 0 and r["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert r["tuned"]["mean_margin"] == pytest.approx(r["start"]["mean_margin"], abs=1e-6)
    row = r["rows"][0]["tuned"]
    assert row["margin"] == pytest.approx(row["chosen"] - row["rejected"])
    assert r["tuned"]["mean_chosen_logp"] < 0
    alone = scoring.preference_margins(tiny, None, pairs, **common)
    assert alone["start"] is None and alone["reward_accuracy"] is None and alone["pairs"] == 4

    kto = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"messages": [*p["messages"], p[side]], "label": side == "chosen"}
            for p in pair_rows()
            for side in ("chosen", "rejected")
        ],
    )
    k = scoring.feedback_shift(tiny, tiny, kto, **common)
    assert (k["samples"], k["desirable"], k["undesirable"]) == (8, 4, 4)
    assert k["shift_gap"] == pytest.approx(0, abs=1e-6)
    # the KTO answers are the pairs' sides: the same log-probabilities
    assert k["rows"][0]["tuned"] == pytest.approx(alone["rows"][0]["tuned"]["chosen"], abs=1e-4)
    assert k["rows"][1]["tuned"] == pytest.approx(alone["rows"][0]["tuned"]["rejected"], abs=1e-4)

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": a} for _, a in QA])
    t = scoring.text_perplexity(tiny, tiny, text, **common)
    assert t["texts"] == 4 and t["perplexity_change"] == pytest.approx(0, abs=1e-6)
    # pt labels every token: each text's tokens and its end-of-text, less the first (unpredicted)
    [(_, _, [(_, ids, labels)])] = _encode(tiny, "pt", text, max_samples=1)
    assert labels == ids and t["rows"][0]["tokens"] == len(ids) - 1
    assert t["tuned"]["perplexity"] == pytest.approx(math.exp(t["tuned"]["nll"]))
    assert t["tuned"]["tokens"] == sum(x["tokens"] for x in t["rows"])


def test_a_file_with_nothing_usable_is_refused(tiny, tmp_path: Path) -> None:
    from qwenft import scoring
    from qwenft.errors import QwenftError

    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"messages": [], "chosen": 1, "rejected": 2}])
    with pytest.raises(QwenftError, match="no preference sample"):
        scoring.preference_margins(
            tiny,
            None,
            bad,
            template=tiny.template,
            default_system=tiny.system,
            enable_thinking=None,
            cutoff_len=64,
        )
