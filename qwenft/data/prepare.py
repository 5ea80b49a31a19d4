"""LLaMA-Factory's tokenized dataset, written by qwenft before the training job starts.

LLaMA-Factory loads a non-empty `tokenized_path` as is and skips its own preprocessing. qwenft
writes that folder itself, in the launching process, before torchrun starts: the same
`datasets.DatasetDict` LLaMA-Factory's get_dataset would save there (its splits, columns, types and
rows, sample by sample), built with qwenft.data.tokens' reproduction of its preprocessing. So no
rank of a distributed job waits on tokenizing, and the first run pays a fraction of what
LLaMA-Factory's preprocessing costs (docs/benchmarks.md).

What LLaMA-Factory 0.9.5 does, and so what this module does:
- rows are read in file order (`max_samples`: the first N);
- `val_size` splits the rows before tokenizing, with `datasets`' train_test_split and the run's
  seed (the same permutation: the same library call on the same row count);
- each split is tokenized in `datasets.map` batches: `preprocessing_num_workers` contiguous
  shards, each cut into batches of `preprocessing_batch_size` rows. Only two things depend on the
  batches, and both are reproduced: KTO pairs each row with the answer of the row before it in the
  batch (its KL sample), and pt packing concatenates a batch's texts into cutoff_len blocks;
- with `packing: true` in the YAML, DataArguments shortens cutoff_len by one (pt's default
  packing, set later by the parser, does not).

Configurations outside what is reproduced (another LLaMA-Factory version, packed sft, a
tool_format, several datasets, streaming) are named by `not_reproduced`; LLaMA-Factory then
tokenizes the data itself, as before.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qwenft.choices import Template
from qwenft.data import tokens
from qwenft.data.kinds import KTO, PREFERENCE, PT, SFT
from qwenft.data.reader import BAD, BOM, Collector, iter_rows, open_data_file
from qwenft.data.tokens import (
    LLAMAFACTORY_TESTED,
    LlamaFactoryEncoder,
    align,
    encode_pipelined,
    measure,
    side_counts,
)
from qwenft.errors import QwenftError

STAGE_KIND = {"sft": SFT, "pt": PT, "dpo": PREFERENCE, "kto": KTO}  # LLaMA-Factory stage -> data
_MEDIA = ("images", "videos", "audios")  # the processors' media columns: None for text data
# LLaMA-Factory's DataArguments and stage defaults for the keys that shape the tokens
DEFAULT_BATCH = 1000  # preprocessing_batch_size

# The arrow type of each column as `datasets.map` writes LLaMA-Factory's processor output: it
# stores "input_ids" as int32 and "attention_mask" as int8 (its OptimizedTypedSequence), every
# other integer column as int64.
_TYPES = {"input_ids": "int32", "attention_mask": "int8", "kto_tags": "bool"}


def _loads(raw: bytes) -> Any:
    """A row's JSON: orjson where it is installed (3x faster), else the standard library; rows
    orjson refuses (integers over 64 bits, lone surrogates) go to the standard library."""
    try:
        return _orjson_loads(raw)
    except ValueError:
        return json.loads(raw)


try:
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - orjson comes with LLaMA-Factory's dependencies
    _orjson_loads = json.loads


def not_reproduced(config: dict[str, Any]) -> str | None:
    """Why qwenft cannot write this config's tokenized data itself (LLaMA-Factory then does), or
    None when it can."""
    version = tokens.llamafactory_version()
    if version not in LLAMAFACTORY_TESTED:
        return (
            f"LLaMA-Factory {version or '(not installed)'} is not a version qwenft's tokenizer "
            f"was tested against ({', '.join(LLAMAFACTORY_TESTED)})"
        )
    stage = config.get("stage")
    if stage not in STAGE_KIND:
        return f"stage {stage!r}"
    if config.get("template") not in Template.values():
        return f"template {config.get('template')!r}"
    for key, why in (
        ("tool_format", "a tool_format"),
        ("neat_packing", "neat_packing"),
        ("streaming", "streaming"),
        ("eval_dataset", "an eval_dataset"),
        ("predict_with_generate", "predict_with_generate"),
    ):
        if config.get(key):
            return why
    if stage == "sft" and config.get("packing"):
        return "packed sft"
    if "," in str(config.get("dataset", "")):
        return "several datasets"
    return None


def packing_and_cutoff(config: dict[str, Any]) -> tuple[bool, int]:
    """(whether the texts are packed, the cutoff_len LLaMA-Factory's processors use: one less
    than train.yaml's when it sets packing, a packed block's length)."""
    cutoff = int(config["cutoff_len"])
    packing = config.get("packing")
    if packing:  # DataArguments.__post_init__: `cutoff_len -= 1` when packing is set
        return True, cutoff - 1
    return (packing is None and config.get("stage") == "pt"), cutoff


def encoder_for(model_dir: Path | str, config: dict[str, Any]) -> LlamaFactoryEncoder:
    """The encoder of a train.yaml's data arguments."""
    packing, cutoff = packing_and_cutoff(config)
    return LlamaFactoryEncoder(
        model_dir,
        config["template"],
        cutoff,
        default_system=config.get("default_system"),
        enable_thinking=config.get("enable_thinking", True),
        train_on_prompt=bool(config.get("train_on_prompt")),
        mask_history=bool(config.get("mask_history")),
        preserve_thinking=bool(config.get("preserve_thinking")),
        kind=STAGE_KIND[config.get("stage", "sft")],
        packing=packing,
    )


def _read_rows(path: Path) -> tuple[list[Any], list[int]]:
    """(each row as LLaMA-Factory loads it: its JSON text for .jsonl, else the parsed value; its
    line). Parsing .jsonl rows batch by batch keeps memory at the size of the file."""
    path, fh, mode = open_data_file(path)
    rows: list[Any] = []
    lines: list[int] = []
    with fh:
        if mode == "jsonl":
            for lineno, raw in enumerate(fh, 1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[3:]
                raw = raw.strip()
                if raw:
                    rows.append(raw)
                    lines.append(lineno)
        else:
            col = Collector()
            for lineno, value, _ in iter_rows(fh, mode, col):
                if value is BAD:
                    raise QwenftError(f"{path}:{lineno}: not a valid row", "run qwenft data check")
                rows.append(value)
                lines.append(lineno)
    return rows, lines


def _splits(n: int, val_size: Any, seed: int) -> dict[str, list[int]]:
    """Row indices of each split, as LLaMA-Factory's split_dataset orders them."""
    if not val_size or val_size <= 1e-6:
        return {"train": list(range(n))}
    from datasets import Dataset

    test_size = int(val_size) if val_size > 1 else val_size
    try:
        split = Dataset.from_dict({"i": list(range(n))}).train_test_split(
            test_size=test_size, seed=seed
        )
    except ValueError as exc:  # LLaMA-Factory would fail the same way, inside the job
        raise QwenftError(f"val_size {val_size} cannot split {n} samples: {exc}") from None
    return {"train": split["train"]["i"], "validation": split["test"]["i"]}


def map_batches(n: int, num_proc: int | None, batch_size: int) -> Iterator[range]:
    """The row ranges of `datasets.map(batched=True, num_proc=...)`: contiguous shards (fewer when
    there are fewer rows), each cut into batches."""
    shards = min(num_proc, n) if num_proc and num_proc > 1 else 1
    for index in range(shards):
        div, mod = divmod(n, shards)
        start = div * index + min(index, mod)
        end = start + div + (1 if index < mod else 0)
        for b in range(start, end, batch_size):
            yield range(b, min(b + batch_size, end))


def _features(kind: str) -> Any:
    from datasets import Features, List, Value

    names = {
        SFT: ["input_ids", "attention_mask", "labels"],
        PREFERENCE: [
            f"{side}_{c}"
            for side in ("chosen", "rejected")
            for c in ("input_ids", "attention_mask", "labels")
        ],
        KTO: ["input_ids", "attention_mask", "labels"]
        + ["kl_input_ids", "kl_attention_mask", "kl_labels", "kto_tags"],
        PT: ["input_ids", "attention_mask"],
    }[kind]
    spec = {
        n: Value("bool") if n == "kto_tags" else List(Value(_TYPES.get(n, "int64"))) for n in names
    }
    if kind != PT:
        spec.update({m: Value("null") for m in _MEDIA})
    return Features(spec)


class _SplitWriter:
    """One split folder in `save_to_disk`'s layout, written batch by batch (memory stays flat)."""

    def __init__(self, folder: Path, features: Any) -> None:
        import pyarrow as pa

        self.pa = pa
        self.folder = folder
        self.features = features
        self.schema = features.arrow_schema
        folder.mkdir(parents=True)
        self.file = "data-00000-of-00001.arrow"
        self.sink = pa.OSFile(str(folder / self.file), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        """Append one batch: the encoder's columns (ids as (row offsets, values) numpy arrays);
        attention masks and media columns added."""
        import numpy as np

        pa = self.pa
        tags = columns.get("kto_tags")
        ids = columns.get("input_ids") or columns.get("chosen_input_ids")
        n = len(tags) if tags is not None else len(ids[0]) - 1 if ids else 0
        if not n:
            return
        arrays = []
        for name, field in zip(self.schema.names, self.schema, strict=True):
            if name in _MEDIA:
                arrays.append(pa.nulls(n))
                continue
            if name == "kto_tags":
                arrays.append(pa.array(tags, type=field.type))
                continue
            dtype = field.type.value_type.to_pandas_dtype()
            if name.endswith("attention_mask"):
                offsets, ids = columns[name.replace("attention_mask", "input_ids")]
                values = np.ones(len(ids), dtype)
            else:
                offsets, values = columns[name]
            values = pa.array(values.astype(dtype, copy=False))
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), values))
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.rows += n

    def close(self) -> None:
        from dataclasses import asdict

        from datasets import DatasetInfo

        self.writer.close()
        self.sink.close()
        state = {
            "_data_files": [{"filename": self.file}],
            "_fingerprint": secrets.token_hex(8),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = asdict(DatasetInfo(features=self.features))
        (self.folder / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def write_tokenized(
    data: Path,
    model_dir: Path | str,
    config: dict[str, Any],
    out_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    marker: str | None = None,
) -> dict[str, Any]:
    """Write at out_dir the tokenized DatasetDict LLaMA-Factory would save at `tokenized_path`
    for train.yaml's `config` and this data file; return the data's token statistics (as
    qwenft.data.tokens.token_stats measures the file).

    Written beside out_dir and renamed into place when complete, so out_dir holds a whole
    dataset or nothing (marker: an empty file of that name written in it last, before the
    rename); if it appears meanwhile (another node or run wrote it first), that one
    is kept. QwenftError if out_dir already exists or the config is not reproduced."""
    why = not_reproduced(config)
    if why:
        raise QwenftError(f"qwenft cannot tokenize this run's data itself: {why}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise QwenftError(f"{out_dir} already exists", "a tokenized dataset is never overwritten")
    encoder = encoder_for(model_dir, config)
    kind = encoder.kind
    rows, lines = _read_rows(Path(data))
    if config.get("max_samples") is not None:
        del rows[int(config["max_samples"]) :]
    splits = _splits(len(rows), config.get("val_size"), int(config.get("seed", 42)))
    num_proc = config.get("preprocessing_num_workers")
    batch_size = int(config.get("preprocessing_batch_size") or DEFAULT_BATCH)
    # unique across processes and hosts sharing the folder
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    measured: list[tuple[int, list[tuple[int, int, int]]]] = []
    writers: dict[str, _SplitWriter] = {}
    done = 0

    def writer(name: str) -> _SplitWriter:
        # made at the first write: importing datasets and pyarrow then overlaps the tokenizer
        if name not in writers:
            features = next(iter(writers.values())).features if writers else _features(kind)
            writers[name] = _SplitWriter(staging / name, features)
        return writers[name]

    def batches() -> Iterator[tuple[tuple[str, list[int]], list[Any]]]:
        for name, order in splits.items():
            for batch in map_batches(len(order), num_proc, batch_size):
                picked = [order[k] for k in batch]
                samples = (rows[i] for i in picked)
                yield (
                    (name, picked),
                    [align(_loads(r) if isinstance(r, bytes) else r, kind) for r in samples],
                )

    try:
        for (name, picked), sides, columns in encode_pipelined(encoder, batches()):
            writer(name).write(columns)
            for i, enc in zip(picked, sides, strict=True):
                if enc is not None:
                    measured.append((lines[i], [side_counts(side) for side in enc]))
            done += len(picked)
            if progress and done % 20_000 < len(picked):
                progress(f"tokenized {done}/{len(rows)} samples")
        for name in splits:
            writer(name).close()
        (staging / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
        if marker:
            (staging / marker).write_text("")
        try:
            os.rename(staging, out_dir)
        except OSError:  # out_dir appeared meanwhile: keep the one already there
            if not out_dir.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    measured.sort()
    stats = measure(iter(measured), cutoff_len=encoder.cutoff_len, kind=kind, max_lines=None)
    stats.update(
        path=str(data),
        model=str(model_dir),
        template=encoder.template.name,
        n_skipped=len(rows) - len(measured),
        splits={name: len(order) for name, order in splits.items()},
        written={name: writer.rows for name, writer in writers.items()},  # rows (pt: blocks)
    )
    return stats
