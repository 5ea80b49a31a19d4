"""Token statistics: per-sample lengths exactly as LLaMA-Factory's preprocessing of each kind.

sft: its SupervisedDatasetProcessor; preference: PairwiseDatasetProcessor (prompt + chosen and
prompt + rejected); kto: FeedbackDatasetProcessor (the sample itself, not its KL pairing); pt:
PretrainDatasetProcessor without packing (the text, then the end-of-text token).

The only qwenft module that imports LLaMA-Factory internals (its converters, template, dataset
processors and tokenizer loader): after a LLaMA-Factory upgrade, start here.
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

from qwenft.choices import DataKind
from qwenft.data.kinds import PREFERENCE, PT, SFT, RowRules, detect_file_kind
from qwenft.data.reader import BAD, Collector, iter_rows, open_data_file
from qwenft.data.registry import dataset_entry
from qwenft.errors import QwenftError

# The columns of a row each kind's dataset entry maps (what the converter reads).
_COLUMNS = {
    DataKind.SFT.value: ("messages", "tools"),
    DataKind.PREFERENCE.value: ("messages", "chosen", "rejected", "tools"),
    DataKind.KTO.value: ("messages", "label", "tools"),
    DataKind.PT.value: ("text",),
}


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
    untruncated length of the pairs it returns (in .last_full), and whose encode_oneturn notes
    the untruncated prompt + response length of each call (in .oneturn_full)."""
    import copy

    measuring = copy.copy(template)
    encode_multiturn = template.encode_multiturn
    encode_oneturn = template.encode_oneturn

    def measured(*args: Any, **kwargs: Any) -> Any:
        pairs = encode_multiturn(*args, **kwargs)
        measuring.last_full = sum(len(s) + len(t) for s, t in pairs)
        return pairs

    def measured_oneturn(*args: Any, **kwargs: Any) -> Any:
        prompt_ids, response_ids = encode_oneturn(*args, **kwargs)
        measuring.oneturn_full.append(len(prompt_ids) + len(response_ids))
        return prompt_ids, response_ids

    measuring.encode_multiturn = measured
    measuring.encode_oneturn = measured_oneturn
    measuring.last_full = 0
    measuring.oneturn_full = []
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
    """Tokenizes samples exactly as LLaMA-Factory's preprocessing of the data kind does.

    It runs LLaMA-Factory's own converter (for the entry qwenft registers), template and dataset
    processor (supervised, pairwise, feedback; pretrain's few lines are repeated here); the only
    change is that the strings the template encodes are batch-tokenized ahead of time.
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
        kind: str = SFT,
    ) -> None:
        self.kind = DataKind.parse(kind, "data kind")
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
            from llamafactory.data.converter import (
                AlpacaDatasetConverter,
                SharegptDatasetConverter,
            )
            from llamafactory.data.parser import DatasetAttr
            from llamafactory.data.processor.feedback import FeedbackDatasetProcessor
            from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor
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
        attr.join(dataset_entry(Path("data.jsonl"), kind=self.kind, has_tools=self.kind != PT))
        self.columns = _COLUMNS[self.kind]
        converter = AlpacaDatasetConverter if self.kind == PT else SharegptDatasetConverter
        self.converter = converter(attr, self.data_args)
        self.ignore_index = IGNORE_INDEX
        self.recorder = _RecordingTokenizer(self.tokenizer)
        self.cached = _CachedTokenizer(self.tokenizer)
        self.measuring = _measuring_template(self.template)
        processor = {
            DataKind.PREFERENCE.value: PairwiseDatasetProcessor,
            DataKind.KTO.value: FeedbackDatasetProcessor,
        }.get(self.kind, SupervisedDatasetProcessor)
        self._record = processor(
            template=self.template,
            tokenizer=self.recorder,
            processor=None,
            data_args=self.data_args,
        )
        self._encode = processor(
            template=self.measuring, tokenizer=self.cached, processor=None, data_args=self.data_args
        )
        # as PretrainDatasetProcessor
        self.eos_text = "<|end_of_text|>" if template == "llama3" else self.tokenizer.eos_token
        self.bos_text = (
            self.tokenizer.bos_token if getattr(self.tokenizer, "add_bos_token", False) else ""
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
        """For each sample: (untruncated length, input_ids, labels) of its first sequence (a
        pair's chosen side), or None if LLaMA-Factory would drop it."""
        return [sides and sides[0] for sides in self.encode_sides(samples)]

    def _valid(self, a: dict) -> bool:
        """As the processor's preprocess_dataset: the aligned samples it keeps."""
        if self.kind == PT:
            return True
        if len(a["_prompt"]) % 2 != 1:
            return False
        return len(a["_response"]) == 1 if self.kind == SFT else len(a["_response"]) >= 2

    def _run(self, proc: Any, a: dict) -> tuple:
        if self.kind == DataKind.KTO:  # its KL sample is another row's answer: not measured here
            return proc._encode_data_example(
                a["_prompt"], a["_response"], a["_response"], a["_system"], a["_tools"], [], [], []
            )
        return proc._encode_data_example(
            a["_prompt"], a["_response"], a["_system"], a["_tools"], [], [], []
        )

    def _encode_pt(self, aligned: list[dict | None]) -> list[list[tuple] | None]:
        texts = [self.bos_text + a["_prompt"][0]["content"] + self.eos_text for a in aligned]
        out: list[list[tuple] | None] = []
        cutoff = self.data_args.cutoff_len
        for ids in self._batch_encode(texts):
            out.append([(len(ids), ids[:cutoff], ids[:cutoff])])  # every kept token is trained
        return out

    def encode_sides(
        self, samples: list[dict]
    ) -> list[list[tuple[int, list[int], list[int]]] | None]:
        """For each sample: the sequences LLaMA-Factory trains on, each as (untruncated length,
        input_ids, labels) (a pair: chosen, then rejected), or None if it would drop it."""
        aligned = []
        for s in samples:
            a = self.converter({c: s.get(c) for c in self.columns})
            aligned.append(a if self._valid(a) else None)
        if self.kind == PT:
            return self._encode_pt(aligned)
        self.recorder.seen.clear()
        for a in aligned:
            if a is not None:
                self._run(self._record, a)
        texts = [t for t in self.recorder.seen if t]
        self.cached.cache = dict(zip(texts, self._batch_encode(texts), strict=True))
        eos = 1 if self.template.efficient_eos else 0
        out: list[list[tuple[int, list[int], list[int]]] | None] = []
        for a in aligned:
            if a is None:
                out.append(None)
                continue
            self.measuring.oneturn_full.clear()
            result = self._run(self._encode, a)
            fulls = self.measuring.oneturn_full
            if self.kind == SFT:
                input_ids, labels = result
                out.append([(self.measuring.last_full + eos, input_ids, labels)])
            elif self.kind == PREFERENCE:
                chosen_ids, chosen_labels, rejected_ids, rejected_labels = result
                out.append(
                    [
                        (fulls[0] + eos, chosen_ids, chosen_labels),
                        (fulls[1] + eos, rejected_ids, rejected_labels),
                    ]
                )
            else:  # kto
                input_ids, labels = result[:2]
                out.append([(fulls[0] + eos, input_ids, labels)])
        self.cached.cache = {}
        return out


def iter_token_sides(
    path: Path,
    encoder: LlamaFactoryEncoder,
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    """(line, sides) for each valid sample, a side being (untruncated length, length after
    cutoff_len, loss tokens) of one sequence LLaMA-Factory trains on (a pair has two: chosen,
    rejected). Rows are checked as the encoder's kind; rows of another kind are skipped.

    counts, if given, receives "rows" (rows read), "skipped" (rows with check errors) and
    "dropped" (rows LLaMA-Factory's processor would drop).
    """
    counts = counts if counts is not None else {}
    counts.update(rows=0, skipped=0, dropped=0)
    path, fh, mode = open_data_file(path)
    col = Collector()
    checker = RowRules(col, encoder.kind, mode)
    ignore = encoder.ignore_index

    def flush(batch: list[tuple[int, dict]]) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
        for (line, _), enc in zip(batch, encoder.encode_sides([s for _, s in batch]), strict=True):
            if enc is None:
                counts["dropped"] += 1
                continue
            yield (
                line,
                [(full, len(ids), len(labels) - labels.count(ignore)) for full, ids, labels in enc],
            )

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


def iter_token_lengths(
    path: Path,
    encoder: LlamaFactoryEncoder,
    batch_size: int = 1024,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[int, int, int, int]]:
    """(line, untruncated length, length after cutoff_len, loss tokens) for each valid sample.

    A pair counts as its longer side for the untruncated length (it decides over-length) and as
    both sides for the tokens kept and the loss tokens (iter_token_sides has each side).
    counts: as iter_token_sides.
    """
    for line, sides in iter_token_sides(path, encoder, batch_size, counts):
        if len(sides) == 1:
            yield line, *sides[0]
        else:
            yield (
                line,
                max(s[0] for s in sides),
                sum(s[1] for s in sides),
                sum(s[2] for s in sides),
            )


def _length_stats(lengths: Any) -> dict:
    srt = sorted(lengths)
    n = len(srt)
    return {
        "min": int(srt[0]) if n else 0,
        "p50": _percentile(srt, 50),
        "p90": _percentile(srt, 90),
        "p99": _percentile(srt, 99),
        "max": int(srt[-1]) if n else 0,
        "mean": round(sum(srt) / n, 1) if n else 0.0,
    }


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
    kind: str | None = None,
) -> dict:
    """Per-sample token lengths after LLaMA-Factory's chat template, and what cutoff_len does.

    Counts equal LLaMA-Factory's preprocessing of the data kind for the same file, template and
    cutoff_len. kind None: the encoder's, else the file's (qwenft.data.kinds.detect_file_kind).
    Samples with check errors are skipped (counted in n_skipped). Lengths are untruncated; over-long
    samples are listed by line (the first max_lines of them; None: all). Pass an encoder to reuse a loaded
    tokenizer (its model, template, cutoff_len and kind then win over the arguments).

    A preference pair is measured as LLaMA-Factory builds it, prompt + chosen and prompt +
    rejected: "length" and the over-length lines go by the longer of the two, the token totals
    count both, and "pairs" has each side's own numbers. pt: the text and its end-of-text token,
    without packing (with packing, LLaMA-Factory's pt default, long texts run on into the next
    block instead of being cut).
    """
    path = Path(path)
    if encoder is not None:
        if kind is not None and DataKind.parse(kind, "data kind") != encoder.kind:
            raise QwenftError(f"the encoder measures {encoder.kind} data, not {kind}")
        kind = encoder.kind
    kind = DataKind.parse(kind or detect_file_kind(path) or SFT, "data kind")
    encoder = encoder or LlamaFactoryEncoder(
        model_dir,
        template,
        cutoff_len,
        default_system=default_system,
        enable_thinking=enable_thinking,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
        kind=kind,
    )
    lengths = array("q")
    side_lengths = [array("q"), array("q")]
    side_totals = [[0, 0, 0], [0, 0, 0]]  # kept, loss, over cutoff
    tokens_total = tokens_kept = loss_tokens = 0
    over_lines: list[int] = []
    n_over = 0
    counts: dict[str, int] = {}
    for line, sides in iter_token_sides(path, encoder, counts=counts):
        full = max(s[0] for s in sides)
        lengths.append(full)
        for k, (side_full, kept, loss) in enumerate(sides):
            tokens_total += side_full
            tokens_kept += kept
            loss_tokens += loss
            if len(sides) == 2:
                side_lengths[k].append(side_full)
                side_totals[k][0] += kept
                side_totals[k][1] += loss
                side_totals[k][2] += side_full > cutoff_len
        if full > cutoff_len:
            n_over += 1
            if max_lines is None or len(over_lines) < max_lines:
                over_lines.append(line)
    n = len(lengths)
    stats = _length_stats(lengths)
    result = {
        "path": str(path),
        "model": str(model_dir),
        "template": template,
        "cutoff_len": cutoff_len,
        "kind": kind,
        "n_samples": n,
        "n_skipped": counts["skipped"] + counts["dropped"],
        "length": stats,
        "n_over_cutoff": n_over,
        "over_cutoff_lines": over_lines,
        "tokens_total": tokens_total,
        "tokens_after_cutoff": tokens_kept,
        "tokens_cut": tokens_total - tokens_kept,
        "loss_tokens": loss_tokens,
        "suggested_cutoff_len": suggest_cutoff_len(stats["p99"]) if n else None,
    }
    if kind == PREFERENCE:
        result["pairs"] = {
            side: {
                "length": _length_stats(side_lengths[k]),
                "n_over_cutoff": side_totals[k][2],
                "tokens_after_cutoff": side_totals[k][0],
                "loss_tokens": side_totals[k][1],
            }
            for k, side in enumerate(("chosen", "rejected"))
        }
    return result
