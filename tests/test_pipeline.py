"""The tokenize-before-launch pipeline (qwenft.data.pipeline, qwenft.data.prepare): one DataSpec
for `qwenft train` and `qwenft data check --model`, so both count the same tokens; TokenStats'
JSON round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.builders import write_jsonl
from tests.helpers.cli import invoke

THOUGHT = "<think>\nThe user greets me; a greeting back is polite and short enough.\n</think>\n\n"
LONG = " ".join(f"word{i}" for i in range(60))


def _train_stats(data: Path, model: str, *args: str, stage: str) -> dict[str, Any]:
    """The statistics `qwenft train` measures before launching (plan_train, then the run's
    overlength_stats), as JSON."""
    from qwenft import train

    req = train.TrainRequest(model=model, data=data, stage=stage, set_items=list(args))
    plan = train.plan_train(req, gpus_seen=[])
    return train.overlength_stats(plan, lambda _: None).to_dict()


def _check_stats(data: Path, model: str, *args: str) -> dict[str, Any]:
    result = invoke("data", "check", data, "--model", model, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tokens"]


FIGURES = (
    "cutoff_len",
    "kind",
    "n_samples",
    "length",
    "n_over_cutoff",
    "over_cutoff_lines",
    "tokens_total",
    "tokens_after_cutoff",
    "tokens_cut",
    "loss_tokens",
    "suggested_cutoff_len",
    "pairs",
)


def _figures(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats.get(k) for k in FIGURES}


def test_data_check_counts_packed_text_as_train_does(
    tmp_path: Path, tiny_home: Path, fake_cli: Path
) -> None:
    """pt packs by default (train.yaml `packing: true`): LLaMA-Factory's blocks, and so what it
    measures against, are one token shorter than cutoff_len; data check measures the same."""
    data = write_jsonl(
        tmp_path / "texts.jsonl",
        [{"text": "A short text."}, {"text": LONG}, {"text": LONG + " " + LONG}],
    )
    checked = _check_stats(data, "tiny-qwen2", "--cutoff-len", "64")
    trained = _train_stats(data, "tiny-qwen2", "cutoff_len=64", stage="pt")
    assert trained["cutoff_len"] == 63  # the packed block: cutoff_len less one
    assert _figures(checked) == _figures(trained)
    assert checked["n_over_cutoff"] >= 1


def test_data_check_counts_preserved_thinking_as_train_does(
    tmp_path: Path, tiny_home: Path, fake_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe with preserve_thinking: the earlier turns' thoughts stay in the pairs' prompts,
    in train's counts and in data check's."""
    from qwenft.lf import render

    user = {"role": "user", "content": "Hi"}
    earlier = {"role": "assistant", "content": THOUGHT + "Hello!"}
    rows = [
        {
            "messages": [user, earlier, {"role": "user", "content": "And again?"}],
            "chosen": {"role": "assistant", "content": THOUGHT + "Hello again!"},
            "rejected": {"role": "assistant", "content": "Go away."},
        }
    ] * 3
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    plain = _check_stats(data, "tiny-qwen3")

    real = render.load_recipe

    def preserving(method: str, stage: str = "sft") -> dict[str, Any]:
        return {**real(method, stage), "preserve_thinking": True}

    monkeypatch.setattr(render, "load_recipe", preserving)
    checked = _check_stats(data, "tiny-qwen3")
    trained = _train_stats(data, "tiny-qwen3", stage="dpo")
    assert _figures(checked) == _figures(trained)
    # the earlier thought is kept: longer prompts than without preserve_thinking
    assert checked["tokens_total"] > plain["tokens_total"]
    assert checked["pairs"]["chosen"]["length"]["max"] > plain["pairs"]["chosen"]["length"]["max"]


def test_token_stats_json_round_trip() -> None:
    from qwenft.data.pipeline import TokenStats, measure

    pairs = [(1, [(10, 8, 3), (12, 8, 4)]), (3, [(5, 5, 2), (4, 4, 1)])]
    stats = measure(iter(pairs), cutoff_len=8, kind="preference", max_lines=None)
    assert stats.n_over_cutoff == 1 and stats.over_cutoff_lines == [1]
    assert stats.tokens_total == 31 and stats.tokens_cut == 31 - stats.tokens_after_cutoff
    assert stats.pairs is not None and stats.pairs["rejected"].loss_tokens == 5
    as_json = json.loads(json.dumps(stats.to_dict()))
    assert TokenStats.from_dict(as_json) == stats
    assert "splits" not in as_json and as_json["length"]["max"] == 12


def test_a_checked_jsonl_is_read_unparsed_into_the_same_batches(tmp_path: Path) -> None:
    """data check --model measures a file that has just passed the check: its .jsonl rows go to
    the workers as read (reader.jsonl_payloads), the same batches and counts as checking each row
    again would give (a byte-order mark, blank and padded lines, CRLF endings)."""
    from qwenft.data.tokens import checked_batches

    rows = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        )
        for i in range(6)
    ]
    text = (
        "\ufeff" + rows[0] + "\r\n\n  " + "\n".join(rows[1:4]) + "  \r\n\n\n" + "\n".join(rows[4:])
    )
    path = tmp_path / "chat.jsonl"
    path.write_bytes(text.encode("utf-8"))
    read: dict[str, int] = {}
    checked: dict[str, int] = {}
    again = list(checked_batches(path, "sft", 4, read))
    fast = list(checked_batches(path, "sft", 4, checked, checked=True))
    assert fast == again and read == checked == {"rows": 6, "skipped": 0}
    assert [lines for lines, _ in fast] == [[1, 3, 4, 5], [8, 9]]
    assert fast[0][1][0] == rows[0].encode()  # the mark and the line endings are not the row's


def _twice(encoder: None, n: int) -> int:
    return 2 * n


def _exit(encoder: None, code: int) -> None:
    os._exit(code)


def _no_encoder() -> None:
    return None


def test_parts_are_whole_batches_for_at_most_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers: the requested number, at most the cores and one per MIN_BYTES_PER_WORKER of data;
    in-process below MIN_BYTES_FOR_WORKERS; parts: runs of whole batches, as many per worker."""
    from qwenft.data import parallel

    monkeypatch.setattr(parallel, "cores", lambda: 2)
    assert parallel.worker_count(16, 10**9) == 2
    assert parallel.worker_count(None, 10**9) == parallel.worker_count(1, 10**9) == 1
    assert parallel.worker_count(16, parallel.MIN_BYTES_FOR_WORKERS - 1) == 1  # in-process
    monkeypatch.setattr(parallel, "MIN_BYTES_FOR_WORKERS", 0)
    assert parallel.worker_count(16, 2 * parallel.MIN_BYTES_PER_WORKER - 1) == 1
    assert parallel.cut_parts(list("abcd"), [3, 3, 3, 2], 2) == [["a", "b"], ["c", "d"]]
    monkeypatch.setattr(parallel, "PART_ROWS", 3)
    assert parallel.cut_parts(list("abcd"), [3, 3, 3, 2], 2) == [["a"], ["b"], ["c"], ["d"]]
    assert parallel.cut_parts(list("abc"), [1, 1, 5], 1) == [["a", "b"], ["c"]]
    assert parallel.cut_parts([], [], 2) == [[]]  # an empty split still gets its one shard


def test_worker_processes_answer_in_order_and_a_dead_one_is_an_error() -> None:
    from qwenft.data import parallel
    from qwenft.errors import QwenftError

    tasks = [(n,) for n in range(7)]
    assert list(parallel.run_parts(_twice, tasks, 2, _no_encoder)) == [2 * n for n in range(7)]
    with pytest.raises(QwenftError, match="worker process died"):
        list(parallel.run_parts(_exit, [(1,)] * 3, 2, _no_encoder))


@pytest.mark.parametrize("kind", ["sft", "preference", "kto", "pt"])
def test_tokenized_columns_are_declared_as_datasets_declares_them(kind: str) -> None:
    """qwenft writes the tokenized dataset's schema and dataset_info.json without importing
    `datasets`: what `datasets` makes of the same features (read back from that schema) is the
    same schema, metadata included, and the same info. The column types themselves are held equal
    to LLaMA-Factory's saved datasets by test_tokenize.py."""
    from dataclasses import asdict

    from datasets import DatasetInfo, Features

    from qwenft.data.prepare import _INFO, _features

    ours = _features(kind)
    theirs = Features.from_arrow_schema(ours.arrow_schema)
    assert ours.arrow_schema.equals(theirs.arrow_schema, check_metadata=True)
    assert list(theirs) == [name for name, _, _ in ours.columns]
    info = json.loads(json.dumps(asdict(DatasetInfo(features=theirs))))
    assert {**_INFO, "features": ours.to_dict()} == info
