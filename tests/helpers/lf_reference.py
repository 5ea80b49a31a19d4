"""LLaMA-Factory 0.9.5's own tokenized dataset, as training builds it: the reference that
qwenft.data.tokens.write_tokenized must equal (tests/test_tokenize.py).

llamafactory, transformers and datasets are imported inside the functions only: the fast tier
imports this module's name space without the model stack."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwenft.data.pipeline import DataFiles
from qwenft.data.registry import register_dataset

# The LLaMA-Factory stage of a training config -> the qwenft data kind its data file holds, and
# the stage get_dataset preprocesses it as (preference pairs: "rm", the pairwise processor).
KINDS = {"sft": "sft", "dpo": "preference", "kto": "kto", "pt": "pt"}
DATASET_STAGES = {"sft": "sft", "dpo": "rm", "kto": "kto", "pt": "pt"}


def lf_tokenized(
    data: Path | DataFiles, model_dir: Path, config: dict, out_dir: Path, work: Path
) -> None:
    """Run LLaMA-Factory's get_dataset in-process on `data` (a file, or training and evaluation
    files: each registered in a dataset_dir under `work`) for the train config `config`; it saves
    the tokenized DatasetDict at `out_dir` (tokenized_path), as a training run with that config
    would.

    It runs in a fresh thread, on a shallow Python stack as in a training process: deep under
    pytest's frames, CPython 3.11 can map and unmap a frame-stack chunk on nearly every call of
    the deep recursion `datasets` makes pickling the tokenizer for its fingerprints (millions of
    mmap/munmap pairs: 3-4 times slower)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(_lf_tokenized, data, model_dir, config, out_dir, work).result()


def _lf_tokenized(
    data: Path | DataFiles, model_dir: Path, config: dict, out_dir: Path, work: Path
) -> None:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    stage = config["stage"]
    dataset_dir = work / "dataset_dir"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    files = DataFiles.of(data)
    names = {}
    for k, path in enumerate(files.all):
        names[path] = "reference" if k == 0 else f"reference{k}"
        register_dataset(path, names[path], dataset_dir, kind=KINDS[stage])
    args = {
        **config,
        "do_train": True,
        "model_name_or_path": str(model_dir),
        "dataset": ",".join(names[p] for p in files.train),
        **({"eval_dataset": ",".join(names[p] for p in files.evals)} if files.evals else {}),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(work / "out"),
        "overwrite_cache": True,
        "tokenized_path": str(out_dir),
        "report_to": "none",
        "cache_dir": str(work / "cache"),
    }
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    # get_template_and_fix_tokenizer mutates the shared template (enable_thinking and more):
    # work on a copy, so that one case's settings do not leak into the next.
    name = data_args.template
    original = TEMPLATES[name]
    TEMPLATES[name] = copy.deepcopy(original)
    try:
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        get_dataset(
            template,
            model_args,
            data_args,
            training_args,
            stage=DATASET_STAGES[stage],
            **tokenizer_module,
        )
    finally:
        TEMPLATES[name] = original


def load_splits(path: Path) -> dict[str, tuple[str, list[dict]]]:
    """The DatasetDict saved at `path`: per split name, (its features as text, its rows)."""
    from datasets import load_from_disk

    saved = load_from_disk(str(path))
    return {split: (str(ds.features), ds.to_list()) for split, ds in saved.items()}


def lf_rows(data: Path, model_dir: Path, config: dict, work: Path) -> list[dict]:
    """The training rows LLaMA-Factory builds from `data` for `config` (lf_tokenized, then the
    saved train split)."""
    lf_tokenized(data, model_dir, config, work / "tokenized", work)
    return load_splits(work / "tokenized")["train"][1]


def lengths_and_loss(rows: list[dict]) -> list[tuple[int, int]]:
    """(len(input_ids), tokens with a loss) of each row."""
    return [(len(r["input_ids"]), sum(1 for x in r["labels"] if x != -100)) for r in rows]
