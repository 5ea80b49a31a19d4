"""Several --data files and --eval-data end to end (issue 28): short real trainings of tiny-qwen2
through the CLI. qwenft writes the mixture's tokenized dataset before launch (its equality with
LLaMA-Factory's own get_dataset for concat, interleave at shares, interleave_over, KTO and packed
pt is test_tokenize.py's test_mixtures_equal_llamafactory); here LLaMA-Factory loads it and trains
and evaluates on it, and what it loaded holds every file's rows as each file alone encodes them:
one file after the other for concat (each cut to --max-samples), at about the shares for
interleave."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from tests.helpers.builders import chat_rows, write_jsonl
from tests.helpers.e2e import QUICK, Qwenft, manifest

ROWS = {
    "general": chat_rows(
        [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(24)]
    ),
    "identity": chat_rows([("Who are you?", "I am Tiny, made by qwenft.")] * 3),
    "held": chat_rows([("What is 7 plus 7?", "7 plus 7 is 14.")] * 2),
    "held2": chat_rows([("Who made you?", "qwenft made me.")] * 2),
}


def _files(tmp: Path) -> dict[str, Path]:
    return {name: write_jsonl(tmp / f"{name}.jsonl", rows) for name, rows in ROWS.items()}


def _encoded(run: Path, path: Path, tmp: Path) -> list[list[int]]:
    """Each row of one file as LLaMA-Factory tokenizes that file alone under the run's
    train.yaml (qwenft's writer, proven equal to LLaMA-Factory's own)."""
    from datasets import load_from_disk

    from qwenft.data.pipeline import DataSpec
    from qwenft.data.prepare import write_tokenized

    config = yaml.safe_load((run / "train.yaml").read_text())
    for key in ("eval_dataset", "mix_strategy", "interleave_probs", "max_samples"):
        config.pop(key, None)
    config.update(dataset="one", tokenized_path=None, val_size=0.0)
    out = tmp / f"alone-{path.stem}"
    write_tokenized(path, config["model_name_or_path"], DataSpec.from_config(config), out)
    return [list(r) for r in load_from_disk(str(out))["train"]["input_ids"]]


def _written(run: Path) -> dict[str, list[list[int]]]:
    """The splits at the run's tokenized_path (what LLaMA-Factory loaded)."""
    from datasets import load_from_disk

    saved = load_from_disk(manifest(run)["tokenized_cache"]["path"])
    return {name: [list(r) for r in saved[name]["input_ids"]] for name in saved}


def test_two_files_interleaved_at_shares_with_eval_files(qwenft: Qwenft, tmp_path: Path) -> None:
    files = _files(tmp_path)
    run = tmp_path / "interleaved"
    proc = qwenft(
        "train", "--model", "tiny-qwen2", "-o", run, *QUICK[:-6], "--set", "logging_steps=1",
        "--set", "save_steps=1000", "--data", f"{files['general']}:0.8",
        "--data", f"{files['identity']}:0.2", "--eval-data", files["held"],
        "--eval-data", files["held2"],
    )  # fmt: skip
    config = yaml.safe_load((run / "train.yaml").read_text())
    assert config["mix_strategy"] == "interleave_under" and config["interleave_probs"] == "0.8,0.2"
    assert "val_size" in config and not config["val_size"]
    # before launch: each source's rows, tokens and expected share of the training tokens
    assert "source general.jsonl: 12 samples of 24 rows" in proc.stderr
    assert "source identity.jsonl: 3 samples (every row)" in proc.stderr
    # the evaluation on the --eval-data files: in the progress line and the summary
    assert "eval loss" in proc.stderr
    summary = manifest(run)["summary"]
    assert math.isfinite(summary["eval_loss"]) and math.isfinite(summary["first_eval_loss"])

    assert "tokenizing the mixture of 2 file(s) and 2 eval file(s)" in proc.stderr
    assert "Loaded tokenized dataset" in (run / "train.log").read_text()
    written = _written(run)
    general, identity = (_encoded(run, files[k], tmp_path) for k in ("general", "identity"))
    # drawn from both files, nothing else (the order: test_tokenize.py)
    assert all(r in general or r in identity for r in written["train"])
    assert any(r in general for r in written["train"]) and identity[0] in written["train"]
    held, held2 = (_encoded(run, files[k], tmp_path) for k in ("held", "held2"))
    assert all(r in held or r in held2 for r in written["validation"])
    listed = qwenft("runs", run).stdout
    assert (
        "general.jsonl 80% + identity.jsonl 20% (interleave); eval held.jsonl, held2.jsonl"
        in listed
    )


def test_two_files_concatenated_each_cut_to_max_samples(qwenft: Qwenft, tmp_path: Path) -> None:
    files = _files(tmp_path)
    run = tmp_path / "concat"
    qwenft(
        "train", "--model", "tiny-qwen2", "-o", run, *QUICK, "--max-samples", "5",
        "--data", files["general"], "--data", files["identity"],
    )  # fmt: skip
    config = yaml.safe_load((run / "train.yaml").read_text())
    assert config["mix_strategy"] == "concat" and config["max_samples"] == 5
    general = _encoded(run, files["general"], tmp_path)
    identity = _encoded(run, files["identity"], tmp_path)
    assert _written(run) == {"train": general[:5] + identity[:5]}
    # eval defaults to the run's --eval-data, and there is none here: said
    proc = qwenft("eval", run, check=False)
    assert proc.returncode == 2 and "trained without --eval-data" in proc.stderr
