"""LLaMA-Factory's tokenized dataset, written by qwenft before the training job starts.

LLaMA-Factory loads a non-empty `tokenized_path` as is and skips its own preprocessing. qwenft
writes that folder itself, in the launching process, before torchrun starts: the same
`datasets.DatasetDict` LLaMA-Factory's get_dataset would save there (its splits, columns, types and
rows, sample by sample), built with qwenft.data.tokens' reproduction of its preprocessing. So no
rank of a distributed job waits on tokenizing, and the first run pays a fraction of what
LLaMA-Factory's preprocessing costs (docs/benchmarks.md).

What LLaMA-Factory 0.9.5 does, and so what this module does:
- rows are read in file order (`max_samples`: the first N of each file);
- several files (`dataset: a,b`) are merged by `mix_strategy` (llamafactory.data.merge_dataset):
  concat puts them one after the other; interleave_under / interleave_over draw rows as
  `datasets.interleave_datasets(probabilities=interleave_probs, seed, first_exhausted /
  all_exhausted)` does: its draws depend only on the files' row counts, the shares and the seed,
  so they are taken from that call on row indices; `eval_dataset` files are merged the same way
  into the validation split (then there is no `val_size`);
- `val_size` splits the rows before tokenizing, with `datasets`' train_test_split and the run's
  seed (the same permutation: the same library call on the same row count);
- each split is tokenized in `datasets.map` batches: `preprocessing_num_workers` contiguous
  shards, each cut into batches of `preprocessing_batch_size` rows. Only two things depend on the
  batches, and both are reproduced: KTO pairs each row with the answer of the row before it in the
  batch (its KL sample), and pt packing concatenates a batch's texts into cutoff_len blocks. Runs
  of whole batches (parts) are tokenized by worker processes on every core (qwenft.data.parallel;
  in-process for small data), each part written as one shard of its split, in order;
- with `packing: true` in the YAML, DataArguments shortens cutoff_len by one (pt's default
  packing, set later by the parser, does not).

Configurations outside what is reproduced (another LLaMA-Factory version, packed sft, a
tool_format, streaming) are named by `pipeline.not_reproduced`, and data with
images by `pipeline.data_not_reproduced` (LLaMA-Factory's vision processor reads every image and
expands its placeholders: qwenft does not redo that); LLaMA-Factory then tokenizes the data
itself, as before.

The steps `qwenft train` and `qwenft resume` take before launching are here too, each on the run's
DataSpec (qwenft.data.pipeline): the state of the tokenized cache (cache_state), writing it
(tokenize_ahead), the data's token statistics (run_stats) and what --overlength or packing makes
of them (length_record, the manifest's overlength record, or a refusal).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from qwenft.choices import Overlength
from qwenft.data import cache, parallel
from qwenft.data.kinds import KTO, PREFERENCE, PT, SFT
from qwenft.data.pipeline import DataFiles, DataSpec, TokenStats, file_stats, measure
from qwenft.data.reader import BAD, Collector, iter_rows, jsonl_payloads, open_data_file
from qwenft.data.tokens import LlamaFactoryEncoder, measure_part
from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, staged_dir

_MEDIA = ("images", "videos", "audios")  # the processors' media columns: None for text data

# The arrow type of each column as `datasets.map` writes LLaMA-Factory's processor output: it
# stores "input_ids" as int32 and "attention_mask" as int8 (its OptimizedTypedSequence), every
# other integer column as int64.
_TYPES = {"input_ids": "int32", "attention_mask": "int8", "kto_tags": "bool"}


def _read_rows(path: Path) -> tuple[list[Any], list[int]]:
    """(each row as LLaMA-Factory loads it: its JSON text for .jsonl, else the parsed value; its
    line). Parsing .jsonl rows batch by batch keeps memory at the size of the file."""
    path, fh, mode = open_data_file(path)
    rows: list[Any] = []
    lines: list[int] = []
    with fh:
        if mode == "jsonl":
            for lineno, raw in jsonl_payloads(fh):
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


def merge_order(
    sizes: list[int], strategy: str, probs: tuple[float, ...] | None, seed: int
) -> list[tuple[int, int]]:
    """(file, row) of each merged row, in the order LLaMA-Factory's merge_dataset makes: concat,
    or `datasets.interleave_datasets` (the same call, on row indices)."""
    if len(sizes) == 1 or strategy == "concat":
        return [(k, i) for k, n in enumerate(sizes) for i in range(n)]
    from datasets import Dataset, interleave_datasets

    parts = [Dataset.from_dict({"k": [k] * n, "i": list(range(n))}) for k, n in enumerate(sizes)]
    stopping = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}
    mixed = interleave_datasets(
        parts,
        probabilities=list(probs) if probs else None,
        seed=seed,
        stopping_strategy=stopping[strategy],
    )
    return list(zip(mixed["k"], mixed["i"], strict=True))


def _read_data(files: DataFiles, spec: DataSpec) -> tuple[list[Any], list[int], dict, int]:
    """The rows LLaMA-Factory tokenizes for these files, their lines (in a mixture: each row's
    line in its own file), the row indices of each split (each file cut to max_samples, the
    training files merged (merge_order), then split by val_size, or the evaluation files merged
    as the validation split) and about how many bytes of the files they are."""
    parts = [_read_rows(path) for path in files.all]
    used = 0
    for path, (rows, lines) in zip(files.all, parts, strict=True):
        total = len(rows)
        if spec.max_samples is not None:
            del rows[spec.max_samples :], lines[spec.max_samples :]
        used += path.stat().st_size * len(rows) // (total or 1)
    rows: list[Any] = []
    lines: list[int] = []
    splits: dict[str, list[int]] = {}
    n_train = len(files.train)
    for name, group in (("train", parts[:n_train]), ("validation", parts[n_train:])):
        if not group:
            continue
        start = len(rows)
        order = merge_order(
            [len(r) for r, _ in group], spec.mix_strategy, spec.interleave_probs, spec.seed
        )
        rows += [group[k][0][i] for k, i in order]
        lines += [group[k][1][i] for k, i in order]
        splits[name] = list(range(start, len(rows)))
    if not files.evals:
        splits = _splits(len(rows), spec.val_size, spec.seed)
    return rows, lines, splits, used


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


# The fields of the dataset_info.json that `save_to_disk` writes beside a split (DatasetInfo's, all
# empty here), besides its features.
_INFO = {
    "builder_name": None,
    "citation": "",
    "config_name": None,
    "dataset_name": None,
    "dataset_size": None,
    "description": "",
    "download_checksums": None,
    "download_size": None,
    "homepage": "",
    "license": "",
    "post_processed": None,
    "post_processing_size": None,
    "size_in_bytes": None,
    "splits": None,
    "supervised_keys": None,
    "version": None,
}


@dataclass(frozen=True)
class _Features:
    """The columns of a kind's tokenized dataset as `datasets.Features` declares them (a list of
    integers, a bool, or null for a media column), written with pyarrow alone: importing
    `datasets` costs 1.5 CPU-seconds, 6 % of tokenizing 100,000 samples. A test
    (test_pipeline.py) holds the schema and the info equal to what `datasets` makes of them."""

    columns: tuple[tuple[str, str, bool], ...]  # (name, element dtype, a list of them)

    @property
    def arrow_schema(self) -> Any:
        import pyarrow as pa

        def arrow(dtype: str, listed: bool) -> Any:
            element = pa.null() if dtype == "null" else pa.from_numpy_dtype(dtype)
            return pa.list_(element) if listed else element

        meta = {"info": {"features": self.to_dict(ids=False)}}
        return pa.schema(
            [pa.field(name, arrow(dtype, listed)) for name, dtype, listed in self.columns],
            metadata={"huggingface": json.dumps(meta)},
        )

    def to_dict(self, *, ids: bool = True) -> dict[str, Any]:
        """datasets' serialized Features: in dataset_info.json (ids) or the schema's metadata."""
        out = {}
        for name, dtype, listed in self.columns:
            value = {"dtype": dtype, "_type": "Value", **({"id": None} if ids else {})}
            out[name] = (
                {"feature": value, "_type": "List", **({"id": None, "length": -1} if ids else {})}
                if listed
                else value
            )
        return out


def _features(kind: str) -> _Features:
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
    columns = [
        (n, "bool", False) if n == "kto_tags" else (n, _TYPES.get(n, "int64"), True) for n in names
    ]
    if kind != PT:
        columns += [(m, "null", False) for m in _MEDIA]
    return _Features(tuple(columns))


def _arrow(pa: Any, values: Any, dtype: Any) -> Any:
    """A numpy array as an arrow array of dtype, from its buffer: pa.array() would import pandas
    (0.27 CPU-seconds and 50 MB in each tokenizing worker) to ask whether it is a Series."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype)
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(dtype), len(values), [None, pa.py_buffer(values)]
    )


class _PartWriter:
    """One part of a split: an arrow stream file as `save_to_disk` writes one shard, written batch
    by batch (memory stays flat)."""

    def __init__(self, path: Path, features: _Features) -> None:
        import pyarrow as pa

        self.pa = pa
        self.schema = features.arrow_schema
        self.sink = pa.OSFile(str(path), "wb")
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
                bits = np.packbits(np.asarray(tags, bool), bitorder="little")
                arrays.append(pa.Array.from_buffers(field.type, n, [None, pa.py_buffer(bits)]))
                continue
            dtype = field.type.value_type.to_pandas_dtype()
            if name.endswith("attention_mask"):
                offsets, ids = columns[name.replace("attention_mask", "input_ids")]
                values = np.ones(len(ids), dtype)
            else:
                offsets, values = columns[name]
            arrays.append(
                pa.ListArray.from_arrays(
                    _arrow(pa, offsets, np.int32), _arrow(pa, values, np.dtype(dtype))
                )
            )
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.rows += n

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


@dataclass(frozen=True)
class _Rows:
    """What a part's worker works with: its encoder and every row with its line. Forked workers
    share the rows with this process, so a task names its rows instead of carrying them (sending
    them cost this process 0.36 CPU-seconds per 100,000 samples while the workers tokenized)."""

    encoder: LlamaFactoryEncoder
    rows: list[Any]
    lines: list[int]


def _with_rows(
    build: Callable[[], LlamaFactoryEncoder], rows: list[Any], lines: list[int]
) -> _Rows:
    return _Rows(build(), rows, lines)


def _write_part(
    context: _Rows, part: list[list[int]], path: Path
) -> tuple[list[tuple[int, list[tuple[int, int, int]]]], int]:
    """One part of a split (its batches, as row indices), tokenized (in a worker process, or in
    this one) and written at path: (tokens.measure_part's (line, sides) of its samples, rows
    written)."""
    rows, lines = context.rows, context.lines
    batches = [([lines[i] for i in batch], [rows[i] for i in batch]) for batch in part]
    writer = _PartWriter(path, _features(context.encoder.kind))
    try:
        measured = measure_part(context.encoder, batches, writer.write)
    finally:
        writer.close()
    return measured, writer.rows


def _finish_split(folder: Path, files: list[str], features: _Features) -> None:
    """A split folder's state and info files, its shards (the parts' files) in order."""
    state = {
        "_data_files": [{"filename": name} for name in files],
        "_fingerprint": secrets.token_hex(8),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {**_INFO, "features": features.to_dict()}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def write_tokenized(
    data: Path | DataFiles,
    model_dir: Path | str,
    config: dict[str, Any] | DataSpec,
    out_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    marker: str | None = None,
) -> TokenStats:
    """Write at out_dir the tokenized DatasetDict LLaMA-Factory would save at `tokenized_path`
    for train.yaml's `config` (or its DataSpec) and this data file (or these files); return the
    data's token statistics (as pipeline.file_stats measures the file; of a mixture, its rows).

    Written in a staging folder beside out_dir and renamed into place when complete
    (fsutil.staged_dir), so out_dir holds a whole dataset or nothing (marker: an empty file of
    that name written in it last, before the rename); if it appears meanwhile (another node or run
    wrote it first), that one is kept. QwenftError if out_dir already exists or the config is not
    reproduced."""
    spec = config if isinstance(config, DataSpec) else DataSpec.from_config(config)
    files = DataFiles.of(data)
    spec = spec.for_data(files)
    if spec.lf_tokenizes:
        raise QwenftError(f"qwenft cannot tokenize this run's data itself: {spec.lf_tokenizes}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise QwenftError(f"{out_dir} already exists", "a tokenized dataset is never overwritten")
    rows, lines, splits, data_bytes = _read_data(files, spec)
    workers = parallel.worker_count(spec.num_workers, data_bytes)
    features = _features(spec.kind)
    parts: list[tuple[str, Path, int]] = []  # each task's split, file and rows, in order
    measured: list[tuple[int, list[tuple[int, int, int]]]] = []
    written: dict[str, list[tuple[str, int]]] = {name: [] for name in splits}  # files, rows
    done = 0
    filled = False  # the staging folder holds the whole dataset
    if progress and workers > 1:
        progress(f"tokenizing in {workers} worker processes ...")
    try:
        with staged_dir(out_dir, hint="a tokenized dataset is never overwritten") as staging:

            def tasks() -> Iterator[tuple[list[list[int]], Path]]:
                for name, order in splits.items():
                    (staging / name).mkdir()
                    batches = [
                        [order[k] for k in batch]
                        for batch in map_batches(len(order), spec.num_workers, spec.batch_size)
                    ]
                    cut = parallel.cut_parts(batches, list(map(len, batches)), workers)
                    for k, part in enumerate(cut):  # the shards save_to_disk would name
                        path = staging / name / f"data-{k:05d}-of-{len(cut):05d}.arrow"
                        parts.append((name, path, sum(map(len, part))))
                        yield part, path

            build = functools.partial(
                _with_rows, functools.partial(spec.encoder, str(model_dir)), rows, lines
            )
            results = parallel.run_parts(_write_part, tasks(), workers, build)
            for k, (part, rows_written) in enumerate(results):  # parts[k]: made as k was sent
                name, path, size = parts[k]
                written[name].append((path.name, rows_written))
                measured += part
                done += size
                if progress and done < len(rows):
                    progress(f"tokenized {done}/{len(rows)} samples")
            for name in splits:
                _finish_split(staging / name, [file for file, _ in written[name]], features)
            (staging / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
            if marker:
                (staging / marker).write_text("")
            filled = True
    except (OSError, QwenftError):  # out_dir appeared meanwhile: keep the one already there
        if not (filled and out_dir.is_dir()):
            raise
    measured.sort()
    stats = measure(iter(measured), cutoff_len=spec.seq_cutoff_len, kind=spec.kind, max_lines=None)
    return replace(
        stats,
        path=str(files.train[0]),
        model=str(model_dir),
        template=spec.template,
        n_skipped=len(rows) - len(measured),
        splits={name: len(order) for name, order in splits.items()},
        written={name: sum(n for _, n in files) for name, files in written.items()},  # pt: blocks
    )


# --- the steps before launch ----------------------------------------------------------------------


@dataclass(frozen=True)
class CacheState:
    """The run's tokenized cache before it runs: its folder, whether it is complete already (a
    hit), and who writes it otherwise: "qwenft" before launching, or "llamafactory" in the job."""

    path: Path
    hit: bool
    by: str

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `tokenized_cache`."""
        return {**asdict(self), "path": str(self.path)}


def cache_state(spec: DataSpec, data: Path | DataFiles | None = None) -> CacheState | None:
    """The state of the run's tokenized cache (train.yaml's tokenized_path; None without one). A
    folder whose save never completed is removed first. data: the file the run trains on (who
    writes the cache depends on it too: DataSpec.for_data)."""
    if spec.tokenized_path is None:
        return None
    if data is not None:
        spec = spec.for_data(data)
    cache.discard_partial(spec.tokenized_path)
    return CacheState(
        path=spec.tokenized_path,
        hit=cache.is_ready(spec.tokenized_path),
        by="llamafactory" if spec.lf_tokenizes else "qwenft",
    )


def tokenize_ahead(
    spec: DataSpec, data: Path | DataFiles, model_path: str, progress: Callable[[str], None]
) -> TokenStats | None:
    """Write the run's tokenized data (train.yaml's tokenized_path) before anything is launched,
    where qwenft reproduces LLaMA-Factory's preprocessing of this config: the data's token
    statistics then. None when the cache is already complete, or when LLaMA-Factory will tokenize
    the data itself (said, with why: the config, or images in the data)."""
    path = spec.tokenized_path
    if path is None:
        return None
    cache.discard_partial(path)
    if cache.is_ready(path):
        return None
    spec = spec.for_data(data)
    if spec.lf_tokenizes:
        progress(f"LLaMA-Factory will tokenize the data itself: {spec.lf_tokenizes}")
        return None
    files = DataFiles.of(data)
    what = (
        files.train[0].name
        if not files.mixed
        else (
            f"the mixture of {len(files.train)} file(s)"
            + (f" and {len(files.evals)} eval file(s)" if files.evals else "")
        )
    )
    progress(f"tokenizing {what} as LLaMA-Factory would, before launching ...")
    started = time.monotonic()
    stats = write_tokenized(files, model_path, spec, path, progress=progress, marker=cache.MARKER)
    progress(
        f"tokenized {stats.n_samples} samples in {time.monotonic() - started:.1f} s "
        "(LLaMA-Factory loads them as they are)"
    )
    return stats


def run_stats(
    spec: DataSpec, data: Path, model_path: str, progress: Callable[[str], None]
) -> TokenStats:
    """Token counts of the run's data file under its data arguments, exactly as LLaMA-Factory
    will preprocess it; cached beside the tokenized data, so repeat runs pay nothing. Where the
    training file is the data (not --overlength drop's filtered copy), they come from writing the
    tokenized data (tokenize_ahead)."""
    tokenized = spec.tokenized_path
    sidecar = Path(f"{tokenized}.overlength.json") if tokenized else None
    if sidecar and sidecar.is_file():
        return TokenStats.from_dict(json.loads(sidecar.read_text()))
    if spec.overlength != Overlength.DROP:  # the training file is the data: measure it once
        stats = tokenize_ahead(spec, data, model_path, progress)
        if stats is not None:
            if sidecar:
                atomic_write_json(sidecar, stats.to_dict())
            return stats
    progress("measuring sample lengths with the run's tokenizer and template ...")
    stats = file_stats(data, spec, model_path, max_lines=None)
    if sidecar:
        atomic_write_json(sidecar, stats.to_dict())
    return stats


def length_record(
    spec: DataSpec, stats: TokenStats, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The manifest's overlength record of the measured data; QwenftError where --overlength
    (or packing) refuses the run."""
    cutoff = spec.cutoff_len
    record: dict[str, Any] = {}
    if spec.packed:
        record = packed_record(spec, stats, progress)
    n_over = 0 if spec.packed else stats.n_over_cutoff  # packed: nothing is cut
    suggested = stats.suggested_cutoff_len
    if n_over and n_over == stats.n_samples and spec.overlength != Overlength.FAIL:
        # Every sample would be truncated (warn) or dropped, leaving nothing to train on (drop).
        raise QwenftError(
            f"all {n_over} samples exceed cutoff_len {cutoff}"
            + (
                ": --overlength drop would leave nothing to train on"
                if spec.overlength == Overlength.DROP
                else ", so every one would be cut short"
            )
            + "; nothing was started",
            f"raise --cutoff-len (suggested: {suggested}, from the longest "
            "samples); `qwenft data check --model M` shows the lengths",
        )
    if n_over and spec.overlength == Overlength.FAIL:
        raise QwenftError(
            f"{n_over} sample(s) exceed cutoff_len {cutoff} (lines {_lines(stats)}); "
            "nothing was started",
            f"raise --cutoff-len (suggested: {suggested}), shorten them, or use --overlength drop",
        )
    if n_over and spec.overlength == Overlength.WARN:
        progress(
            f"warning: {n_over} sample(s) exceed cutoff_len {cutoff} and lose {stats.tokens_cut} "
            f"tokens to truncation (lines {_lines(stats)}); suggested --cutoff-len "
            f"{suggested}, or --overlength drop|fail"
        )
    if not spec.packed:
        record = {
            "mode": spec.overlength,
            "n_over_cutoff": n_over,
            "tokens_cut": stats.tokens_cut,
            "cutoff_len": cutoff,
        }
    return record


def packed_record(
    spec: DataSpec, stats: TokenStats, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Packed pre-training: LLaMA-Factory concatenates the texts of each batch it maps, each with
    its end-of-text token, and cuts the stream into blocks (DataSpec.seq_cutoff_len: train.yaml's
    cutoff_len less one), leaving out each batch's last partial block. Says how many blocks and
    how many tokens are left out (exact when qwenft wrote the tokenized data, else from the token
    total); refuses a corpus that makes no block (it would train on nothing)."""
    block = spec.seq_cutoff_len
    total = stats.tokens_total
    record: dict[str, Any] = {"mode": "packed", "cutoff_len": spec.cutoff_len, "block_len": block}
    if total is None:
        return record
    blocks = sum(stats.written.values()) if stats.written else total // block
    rest = total - blocks * block
    if blocks == 0:
        raise QwenftError(
            f"the {stats.n_samples} texts hold {total} tokens and make no packed "
            f"block of {block} tokens: LLaMA-Factory would train on nothing; nothing was started",
            f"lower --cutoff-len (at most {total}), add text, or --set packing=false",
        )
    record.update(tokens=total, blocks=blocks, tokens_left_out=rest)
    progress(
        f"pt: {total} tokens packed into {blocks} block(s) of {block}; nothing is truncated"
        + (f", {rest} tokens (less than a block, per batch) are left out" if rest else "")
    )
    return record


def _lines(stats: TokenStats, shown: int = 5) -> str:
    lines = stats.over_cutoff_lines
    return ", ".join(map(str, lines[:shown])) + (", ..." if len(lines) > shown else "")
