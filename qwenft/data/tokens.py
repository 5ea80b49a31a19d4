"""Token statistics: per-sample lengths exactly as LLaMA-Factory's supervised preprocessing.

The only qwenft module that imports LLaMA-Factory internals (its sharegpt converter, template,
SupervisedDatasetProcessor and tokenizer loader): after a LLaMA-Factory upgrade, start here.
torch, transformers and llamafactory are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenft.data.check import Checker
from qwenft.data.reader import BAD, Collector, iter_rows, open_data_file
from qwenft.data.registry import dataset_entry
from qwenft.errors import QwenftError


def _percentile(sorted_vals: Any, q: float) -> int:
    """Nearest-rank percentile of a sorted sequence."""
    if not len(sorted_vals):
        return 0
    k = max(math.ceil(q / 100 * len(sorted_vals)) - 1, 0)
    return int(sorted_vals[k])


def suggest_cutoff_len(p99: int, multiple: int = 64) -> int:
    """p99 of the sample lengths rounded up to a multiple of 64 (at least 64)."""
    return max(multiple, math.ceil(p99 / multiple) * multiple)


class _CachedTokenizer:
    """The real tokenizer, with encode() answered from ids batch-encoded ahead of time."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if not add_special_tokens and not kwargs:
            ids = self.cache.get(text)
            if ids is not None:
                return ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens, **kwargs)


class _RecordingTokenizer:
    """Stands in for the tokenizer on a first pass: notes which strings the template encodes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.seen: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        self.seen.add(text)
        return []


def _measuring_template(template: Any) -> Any:
    """A shallow copy of LLaMA-Factory's template whose encode_multiturn also notes the
    untruncated length of the pairs it returns (in .last_full)."""
    import copy

    measuring = copy.copy(template)
    encode_multiturn = template.encode_multiturn

    def measured(*args: Any, **kwargs: Any) -> Any:
        pairs = encode_multiturn(*args, **kwargs)
        measuring.last_full = sum(len(s) + len(t) for s, t in pairs)
        return pairs

    measuring.encode_multiturn = measured
    measuring.last_full = 0
    return measuring


def _load_tokenizer(model_dir: str) -> Any:
    """The tokenizer exactly as LLaMA-Factory's load_tokenizer builds it, without also loading an
    AutoProcessor (a second full tokenizer load; only multimodal models use it)."""
    from llamafactory.hparams import ModelArguments

    model_args = ModelArguments(model_name_or_path=model_dir)
    try:
        from llamafactory.model.loader import _get_init_kwargs
        from llamafactory.model.patcher import patch_tokenizer
        from transformers import AutoTokenizer
    except ImportError:  # another LLaMA-Factory layout: take the slower public path
        from llamafactory.model import load_tokenizer

        return load_tokenizer(model_args)["tokenizer"]
    init_kwargs = _get_init_kwargs(model_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            use_fast=model_args.use_fast_tokenizer,
            split_special_tokens=model_args.split_special_tokens,
            padding_side="right",
            **init_kwargs,
        )
    except ValueError:  # as LLaMA-Factory: try the other kind
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            use_fast=not model_args.use_fast_tokenizer,
            padding_side="right",
            **init_kwargs,
        )
    except Exception as exc:
        raise OSError(f"failed to load the tokenizer: {exc}") from exc
    patch_tokenizer(tokenizer, model_args)
    return tokenizer


class LlamaFactoryEncoder:
    """Tokenizes samples exactly as LLaMA-Factory's supervised (SFT) preprocessing does.

    It runs LLaMA-Factory's own sharegpt converter, template and SupervisedDatasetProcessor; the
    only change is that the strings the template encodes are batch-tokenized ahead of time.
    """

    def __init__(
        self,
        model_dir: Path | str,
        template: str,
        cutoff_len: int,
        *,
        default_system: str | None = None,
        enable_thinking: bool | None = True,
        train_on_prompt: bool = False,
        mask_history: bool = False,
    ) -> None:
        # LLaMA-Factory, transformers and DeepSpeed print to stdout while they load (logging
        # handlers bound to stdout at import time): keep stdout for the caller's results.
        with contextlib.redirect_stdout(sys.stderr):
            self._setup(
                model_dir,
                template,
                cutoff_len,
                default_system=default_system,
                enable_thinking=enable_thinking,
                train_on_prompt=train_on_prompt,
                mask_history=mask_history,
            )

    def _setup(
        self,
        model_dir: Path | str,
        template: str,
        cutoff_len: int,
        *,
        default_system: str | None,
        enable_thinking: bool | None,
        train_on_prompt: bool,
        mask_history: bool,
    ) -> None:
        import copy

        # Quiet LLaMA-Factory's loggers (they read this when first imported), but do not leak
        # the setting into the environment that later child processes (training) inherit.
        previous = os.environ.get("LLAMAFACTORY_VERBOSITY")
        os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
        try:
            from llamafactory.data.converter import SharegptDatasetConverter
            from llamafactory.data.parser import DatasetAttr
            from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
            from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
            from llamafactory.extras.constants import IGNORE_INDEX
            from llamafactory.hparams import DataArguments
        except ImportError as exc:
            raise QwenftError(
                f"token statistics need LLaMA-Factory: {exc}",
                "install the training extras: pip install 'qwenft[train]'",
            ) from None
        finally:
            if previous is None:
                os.environ.pop("LLAMAFACTORY_VERBOSITY", None)
        if template not in TEMPLATES:
            raise QwenftError(
                f"unknown LLaMA-Factory template {template!r}", "use qwen, qwen3 or qwen3_nothink"
            )
        if not isinstance(cutoff_len, int) or cutoff_len < 1:
            raise QwenftError(
                f"--cutoff-len must be a positive integer, got {cutoff_len}",
                "e.g. --cutoff-len 2048",
            )
        try:
            self.tokenizer = _load_tokenizer(str(model_dir))
        except (OSError, ValueError) as exc:
            raise QwenftError(
                f"cannot load the tokenizer of {model_dir}: {exc}",
                "pass --model a preset, a downloaded hub id or a local model folder",
            ) from None
        self.data_args = DataArguments(
            template=template,
            cutoff_len=cutoff_len,
            default_system=default_system,
            enable_thinking=enable_thinking,
            train_on_prompt=train_on_prompt,
            mask_history=mask_history,
        )
        # get_template_and_fix_tokenizer mutates the shared template object: work on a copy.
        original = TEMPLATES[template]
        TEMPLATES[template] = copy.deepcopy(original)
        try:
            self.template = get_template_and_fix_tokenizer(self.tokenizer, self.data_args)
        finally:
            TEMPLATES[template] = original
        attr = DatasetAttr("file", dataset_name="qwenft")
        attr.join(dataset_entry(Path("data.jsonl"), has_tools=True))
        self.converter = SharegptDatasetConverter(attr, self.data_args)
        self.ignore_index = IGNORE_INDEX
        self.recorder = _RecordingTokenizer(self.tokenizer)
        self.cached = _CachedTokenizer(self.tokenizer)
        self.measuring = _measuring_template(self.template)
        self._record = SupervisedDatasetProcessor(
            template=self.template,
            tokenizer=self.recorder,
            processor=None,
            data_args=self.data_args,
        )
        self._encode = SupervisedDatasetProcessor(
            template=self.measuring, tokenizer=self.cached, processor=None, data_args=self.data_args
        )
        # The fast tokenizer's Rust backend, batch-encoding on all cores; encode_batch_fast
        # (tokenizers >= 0.21) skips the offsets LLaMA-Factory never uses.
        backend = getattr(self.tokenizer, "_tokenizer", None)
        self._batch = getattr(backend, "encode_batch_fast", None) or getattr(
            backend, "encode_batch", None
        )

    def _batch_encode(self, texts: list[str]) -> list[list[int]]:
        if self._batch is not None:
            return [e.ids for e in self._batch(texts, add_special_tokens=False)]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def encode(self, samples: list[dict]) -> list[tuple[int, list[int], list[int]] | None]:
        """For each sample: (untruncated length, input_ids, labels), or None if LLaMA-Factory
        would drop it."""
        aligned = []
        for s in samples:
            example = {"messages": s.get("messages"), "tools": s.get("tools")}
            a = self.converter(example)
            ok = len(a["_prompt"]) % 2 == 1 and len(a["_response"]) == 1  # as preprocess_dataset
            aligned.append(a if ok else None)
        self.recorder.seen.clear()
        for a in aligned:
            if a is not None:
                self._record._encode_data_example(
                    a["_prompt"], a["_response"], a["_system"], a["_tools"], [], [], []
                )
        texts = [t for t in self.recorder.seen if t]
        self.cached.cache = dict(zip(texts, self._batch_encode(texts), strict=True))
        out: list[tuple[int, list[int], list[int]] | None] = []
        for a in aligned:
            if a is None:
                out.append(None)
                continue
            input_ids, labels = self._encode._encode_data_example(
                a["_prompt"], a["_response"], a["_system"], a["_tools"], [], [], []
            )
            full = self.measuring.last_full + (1 if self.template.efficient_eos else 0)
            out.append((full, input_ids, labels))
        self.cached.cache = {}
        return out


def iter_token_lengths(
    path: Path,
    encoder: LlamaFactoryEncoder,
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[int, int, int, int]]:
    """(line, untruncated length, length after cutoff_len, loss tokens) for each valid sample.

    counts, if given, receives "rows" (rows read), "skipped" (rows with check errors) and
    "dropped" (rows LLaMA-Factory's processor would drop).
    """
    counts = counts if counts is not None else {}
    counts.update(rows=0, skipped=0, dropped=0)
    path, fh, mode = open_data_file(path)
    col = Collector()
    checker = Checker(col)
    ignore = encoder.ignore_index

    def flush(batch: list[tuple[int, dict]]) -> Iterator[tuple[int, int, int, int]]:
        for (line, _), enc in zip(batch, encoder.encode([s for _, s in batch]), strict=True):
            if enc is None:
                counts["dropped"] += 1
                continue
            full, ids, labels = enc
            yield line, full, len(ids), len(labels) - labels.count(ignore)

    batch: list[tuple[int, dict]] = []
    with fh:
        for line, value, raw in iter_rows(fh, mode, col):
            counts["rows"] += 1
            if value is BAD or not checker.check(value, line, raw):
                counts["skipped"] += 1
                continue
            batch.append((line, value))
            if len(batch) >= batch_size:
                yield from flush(batch)
                batch = []
        if batch:
            yield from flush(batch)


def token_stats(
    path: Path,
    model_dir: Path,
    template: str,
    cutoff_len: int,
    *,
    default_system: str | None = None,
    enable_thinking: bool | None = True,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    max_lines: int | None = 1000,
    encoder: LlamaFactoryEncoder | None = None,
) -> dict:
    """Per-sample token lengths after LLaMA-Factory's chat template, and what cutoff_len does.

    Counts equal LLaMA-Factory's supervised preprocessing for the same file, template and
    cutoff_len.
    Samples with check errors are skipped (counted in n_skipped). Lengths are untruncated; over-long
    samples are listed by line (the first max_lines of them; None: all). Pass an encoder to reuse a loaded
    tokenizer (its model, template and cutoff_len then win over the arguments).
    """
    path = Path(path)
    encoder = encoder or LlamaFactoryEncoder(
        model_dir,
        template,
        cutoff_len,
        default_system=default_system,
        enable_thinking=enable_thinking,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
    )
    lengths = array("q")
    tokens_kept = tokens_cut = loss_tokens = 0
    over_lines: list[int] = []
    n_over = 0
    counts: dict[str, int] = {}
    for line, full, kept, loss in iter_token_lengths(path, encoder, counts=counts):
        lengths.append(full)
        tokens_kept += kept
        tokens_cut += full - kept
        loss_tokens += loss
        if full > cutoff_len:
            n_over += 1
            if max_lines is None or len(over_lines) < max_lines:
                over_lines.append(line)
    n = len(lengths)
    srt = sorted(lengths)
    stats = {
        "min": int(srt[0]) if n else 0,
        "p50": _percentile(srt, 50),
        "p90": _percentile(srt, 90),
        "p99": _percentile(srt, 99),
        "max": int(srt[-1]) if n else 0,
        "mean": round(sum(srt) / n, 1) if n else 0.0,
    }
    return {
        "path": str(path),
        "model": str(model_dir),
        "template": template,
        "cutoff_len": cutoff_len,
        "n_samples": n,
        "n_skipped": counts["skipped"] + counts["dropped"],
        "length": stats,
        "n_over_cutoff": n_over,
        "over_cutoff_lines": over_lines,
        "tokens_total": int(sum(srt)),
        "tokens_after_cutoff": tokens_kept,
        "tokens_cut": tokens_cut,
        "loss_tokens": loss_tokens,
        "suggested_cutoff_len": suggest_cutoff_len(stats["p99"]) if n else None,
    }
