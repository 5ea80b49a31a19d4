"""What decides a run's tokens and what they measure: the two types of the tokenize-before-launch
pipeline.

- DataFiles: the files a run reads: its training files in train.yaml's `dataset` order and its
  evaluation files (`eval_dataset`); one file for most runs.
- DataSpec: a run's data arguments, read once from its train.yaml values (template, cutoff_len,
  system prompt, thinking mode, packing, prompt and history masking, the stage and its data kind,
  the split and batching that shape the written dataset, the cache folder, --overlength). Its
  `encoder()` is the one way an encoder is built from a run's settings: `qwenft train` (before
  launching, qwenft.data.prepare) and `qwenft data check --model` (from_settings) both go through
  it, so they count the same tokens.
- TokenStats: the token statistics of a data file under a spec (lengths, what cutoff_len cuts,
  loss tokens, a suggested cutoff_len), as `data check --model` shows them and `train` holds the
  run to its --overlength policy with them; to_dict() is their JSON (`data check --json`, the
  cache's sidecar).

qwenft.data.tokens reproduces LLaMA-Factory's preprocessing; qwenft.data.prepare writes its
tokenized dataset and runs the steps before launch.
"""

from __future__ import annotations

import functools
import math
from array import array
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenft.choices import DEFAULT_OVERLENGTH, LF_STAGE_DATA, DataKind, Template
from qwenft.data import parallel, tokens
from qwenft.data.check import file_has_images
from qwenft.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    IMAGE_PAD,
    LF_TOKENIZES_WHY,
    ImageStats,
    ImageTokens,
    VisionProcessor,
    image_paths,
    image_size,
)
from qwenft.data.kinds import PREFERENCE, PT, SFT, detect_file_kind
from qwenft.data.reader import Problem
from qwenft.data.tokens import LLAMAFACTORY_TESTED, LlamaFactoryEncoder, iter_token_sides
from qwenft.errors import QwenftError

if TYPE_CHECKING:
    from qwenft.settings import RunSettings

DEFAULT_BATCH = 1000  # LLaMA-Factory's preprocessing_batch_size
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")  # the ones reproduced


@dataclass(frozen=True)
class DataFiles:
    """The data files of a run: `train` in train.yaml's `dataset` order, `evals` in its
    `eval_dataset` order (qwenft.data.mixture makes them from --data and --eval-data)."""

    train: tuple[Path, ...]
    evals: tuple[Path, ...] = ()

    @classmethod
    def of(cls, data: Path | str | DataFiles) -> DataFiles:
        """The files of `data`: a DataFiles as it is, a path as the one training file."""
        return data if isinstance(data, DataFiles) else cls((Path(data),))

    @property
    def all(self) -> tuple[Path, ...]:
        return (*self.train, *self.evals)

    @property
    def mixed(self) -> bool:
        """Several files, or evaluation files: LLaMA-Factory merges them (mix_strategy)."""
        return len(self.train) > 1 or bool(self.evals)


def not_reproduced(config: dict[str, Any]) -> str | None:
    """Why qwenft cannot write this train.yaml's tokenized data itself (LLaMA-Factory then does),
    or None when it can."""
    version = tokens.llamafactory_version()
    if version not in LLAMAFACTORY_TESTED:
        return (
            f"LLaMA-Factory {version or '(not installed)'} is not a version qwenft's tokenizer "
            f"was tested against ({', '.join(LLAMAFACTORY_TESTED)})"
        )
    stage = config.get("stage")
    if stage not in LF_STAGE_DATA:
        return f"stage {stage!r}"
    if config.get("template") not in Template.values():
        return f"template {config.get('template')!r}"
    for key, why in (
        ("tool_format", "a tool_format"),
        ("neat_packing", "neat_packing"),
        ("streaming", "streaming"),
        ("predict_with_generate", "predict_with_generate"),
    ):
        if config.get(key):
            return why
    if stage == "sft" and config.get("packing"):
        return "packed sft"
    if config.get("mix_strategy", "concat") not in MIX_STRATEGIES:
        return f"mix_strategy {config.get('mix_strategy')}"
    return None


def _names(value: Any) -> tuple[str, ...]:
    """A `dataset` / `eval_dataset` value's names (a comma list, as LLaMA-Factory splits it)."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(v).strip() for v in items)


def data_not_reproduced(data: Path | str) -> str | None:
    """Why qwenft cannot write this data file's tokenized dataset itself whatever the config (it
    has images: LLaMA-Factory's vision processor tokenizes them in the job), or None."""
    path = Path(data)
    try:
        st = path.stat()
    except OSError:
        return None
    return _images_why(str(path.absolute()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _images_why(path: str, mtime_ns: int, size: int) -> str | None:
    """data_not_reproduced of a file as it is (one scan per version of the file)."""
    return LF_TOKENIZES_WHY if Path(path).is_file() and file_has_images(Path(path)) else None


@dataclass(frozen=True)
class DataSpec:
    """A run's data arguments: everything that decides its tokens, and what train does about
    samples longer than cutoff_len. Build it with from_config (a train.yaml's values) or
    from_settings (resolved settings, before train.yaml exists)."""

    template: str
    cutoff_len: int  # train.yaml's (see seq_cutoff_len for the processors')
    kind: str = SFT  # the data kind the stage's processor takes
    stage: str = "sft"  # LLaMA-Factory's stage (orpo and simpo are dpo)
    default_system: str | None = None  # None: the template's
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool | None = None  # train.yaml's; None: LLaMA-Factory's default (pt packs)
    max_samples: int | None = None  # the first N rows
    val_size: float = 0.0
    seed: int = 42
    num_workers: int | None = None  # preprocessing_num_workers: the map's shards
    batch_size: int = DEFAULT_BATCH  # preprocessing_batch_size
    tokenized_path: Path | None = None  # the cache folder LLaMA-Factory loads
    overlength: str = DEFAULT_OVERLENGTH.value  # --overlength: warn, drop or fail
    lf_tokenizes: str | None = None  # why qwenft does not write the tokens itself (not_reproduced)
    image_max_pixels: int = DEFAULT_MAX_PIXELS  # how images are scaled (qwenft.data.images)
    image_min_pixels: int = DEFAULT_MIN_PIXELS
    media_dir: str | None = None  # where image paths are looked for (None: the data's folder)
    # several files: how LLaMA-Factory merges them (qwenft.data.mixture), and how many it reads
    mix_strategy: str = "concat"
    interleave_probs: tuple[float, ...] | None = None
    n_datasets: int = 1  # train.yaml's `dataset` names
    n_evals: int = 0  # its `eval_dataset` names

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, overlength: str | None = None, kind: str | None = None
    ) -> DataSpec:
        """The spec of train.yaml's values (kind: the stage's, unless given)."""
        stage = str(config.get("stage", "sft"))
        packing = config.get("packing")
        workers = config.get("preprocessing_num_workers")
        tokenized = config.get("tokenized_path")
        max_samples = config.get("max_samples")
        probs = config.get("interleave_probs")
        return cls(
            template=config["template"],
            cutoff_len=config["cutoff_len"],
            kind=DataKind.parse(kind, "data kind") if kind else LF_STAGE_DATA.get(stage, SFT),
            stage=stage,
            default_system=config.get("default_system"),
            enable_thinking=config.get("enable_thinking", True),
            preserve_thinking=bool(config.get("preserve_thinking")),
            train_on_prompt=bool(config.get("train_on_prompt")),
            mask_history=bool(config.get("mask_history")),
            packing=None if packing is None else bool(packing),
            max_samples=None if max_samples is None else int(max_samples),
            val_size=config.get("val_size") or 0.0,
            seed=int(config.get("seed", 42)),
            num_workers=workers,
            batch_size=int(config.get("preprocessing_batch_size") or DEFAULT_BATCH),
            tokenized_path=Path(tokenized) if tokenized else None,
            overlength=overlength or DEFAULT_OVERLENGTH.value,
            lf_tokenizes=not_reproduced(config),
            image_max_pixels=int(config.get("image_max_pixels") or DEFAULT_MAX_PIXELS),
            image_min_pixels=int(config.get("image_min_pixels") or DEFAULT_MIN_PIXELS),
            media_dir=config.get("media_dir"),
            mix_strategy=str(config.get("mix_strategy") or "concat"),
            interleave_probs=tuple(float(p) for p in _names(probs)) if probs else None,
            n_datasets=len(_names(config.get("dataset"))) or 1,
            n_evals=len(_names(config.get("eval_dataset"))),
        )

    def for_data(self, data: Path | str | DataFiles) -> DataSpec:
        """The spec for these data files (a path: the one training file): LLaMA-Factory
        tokenizes a file with images itself (data_not_reproduced), and files that are not the
        ones train.yaml names (another count) are left to it too; lf_tokenizes then says why.
        Otherwise the spec as it is."""
        if self.lf_tokenizes:
            return self
        files = DataFiles.of(data)
        if (len(files.train), len(files.evals)) != (self.n_datasets, self.n_evals):
            why = (
                f"train.yaml names {self.n_datasets} dataset(s) and {self.n_evals} eval "
                f"dataset(s), and {len(files.train)} + {len(files.evals)} files were given"
            )
            return replace(self, lf_tokenizes=why)
        why = next((w for f in files.all if (w := data_not_reproduced(f))), None)
        return replace(self, lf_tokenizes=why) if why else self

    @classmethod
    def from_settings(cls, run: RunSettings, *, kind: str | None = None) -> DataSpec:
        """The spec of resolved settings (qwenft.settings.RunSettings): their values with the
        model's template, system prompt and thinking mode over them, as train.yaml gets them
        (qwenft.lf.render.build_train_config)."""
        config = {**run.values, "template": run.template, "default_system": run.default_system}
        if run.enable_thinking is not None:
            config["enable_thinking"] = run.enable_thinking
        return cls.from_config(config, kind=kind)

    @property
    def packs(self) -> bool:
        """Whether the processors pack the texts: packing set, or pt's default."""
        return bool(self.packing) or (self.packing is None and self.stage == "pt")

    @property
    def packed(self) -> bool:
        """Packed pre-training: texts run on in blocks of seq_cutoff_len, none is cut."""
        return self.kind == PT and self.packs

    @property
    def seq_cutoff_len(self) -> int:
        """The cutoff_len LLaMA-Factory's processors use: one less than train.yaml's when it
        sets packing (DataArguments.__post_init__; pt's default packing, set later, does not),
        a packed block's length."""
        return self.cutoff_len - 1 if self.packing else self.cutoff_len

    def image_tokens(self, model_dir: Path | str | None) -> ImageTokens:
        """How images become tokens under these data arguments, for this model's image processor
        (its preprocessor_config.json; Qwen2-VL's where it has none)."""
        return ImageTokens(
            self.image_max_pixels, self.image_min_pixels, VisionProcessor.from_model(model_dir)
        )

    def encoder(
        self, model_dir: Path | str, media_dir: Path | str | None = None
    ) -> LlamaFactoryEncoder:
        """The encoder of these data arguments with the model's tokenizer; a row's images are
        looked for in the spec's media_dir, else in media_dir (the data file's folder)."""
        return LlamaFactoryEncoder(
            model_dir,
            self.template,
            self.seq_cutoff_len,
            default_system=self.default_system,
            enable_thinking=self.enable_thinking,
            train_on_prompt=self.train_on_prompt,
            mask_history=self.mask_history,
            preserve_thinking=self.preserve_thinking,
            kind=self.kind,
            packing=self.packs,
            images=self.image_tokens(model_dir),
            media_dir=self.media_dir or media_dir,
        )


# --- the statistics -------------------------------------------------------------------------------


def _percentile(sorted_vals: Any, q: float) -> int:
    """Nearest-rank percentile of a sorted sequence."""
    if not len(sorted_vals):
        return 0
    k = max(math.ceil(q / 100 * len(sorted_vals)) - 1, 0)
    return int(sorted_vals[k])


def suggest_cutoff_len(p99: int, multiple: int = 64) -> int:
    """p99 of the sample lengths rounded up to a multiple of 64 (at least 64)."""
    return max(multiple, math.ceil(p99 / multiple) * multiple)


@dataclass(frozen=True)
class Lengths:
    """The spread of sample lengths in tokens (nearest-rank percentiles)."""

    min: int = 0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0
    mean: float = 0.0

    @classmethod
    def of(cls, lengths: Any) -> Lengths:
        srt = sorted(lengths)
        n = len(srt)
        return cls(
            min=int(srt[0]) if n else 0,
            p50=_percentile(srt, 50),
            p90=_percentile(srt, 90),
            p99=_percentile(srt, 99),
            max=int(srt[-1]) if n else 0,
            mean=round(sum(srt) / n, 1) if n else 0.0,
        )


@dataclass(frozen=True)
class SideStats:
    """One side of preference pairs (prompt + chosen, or prompt + rejected)."""

    length: Lengths = field(default_factory=Lengths)
    n_over_cutoff: int = 0
    tokens_after_cutoff: int = 0
    loss_tokens: int = 0


@dataclass(frozen=True)
class TokenStats:
    """Token statistics of a data file under a spec, exactly as LLaMA-Factory's preprocessing
    counts them. Lengths are untruncated; a preference pair counts as its longer side for the
    length and the over-length lines, as both sides for the token totals (`pairs` has each
    side's own numbers); pt as each text with its end-of-text token, measured against
    cutoff_len (packed, they run on into the next block instead of being cut)."""

    path: str = ""
    model: str = ""
    template: str = ""
    cutoff_len: int = 0  # the processors' cutoff_len the lengths are measured against
    kind: str = SFT
    n_samples: int = 0
    length: Lengths = field(default_factory=Lengths)
    n_over_cutoff: int = 0
    over_cutoff_lines: list[int] = field(default_factory=list)  # the first max_lines of them
    tokens_total: int | None = None  # None: not measured (an older cache's record)
    tokens_after_cutoff: int = 0
    tokens_cut: int = 0
    loss_tokens: int = 0
    suggested_cutoff_len: int | None = None  # p99 rounded up to 64; None without samples
    pairs: dict[str, SideStats] | None = None  # preference: "chosen" and "rejected"
    n_skipped: int = 0  # samples with check errors, or that LLaMA-Factory drops
    splits: dict[str, int] | None = None  # rows per split (as qwenft wrote the dataset)
    written: dict[str, int] | None = None  # rows written per split (pt packed: blocks)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`data check --json`'s "tokens", the cache's sidecar)."""
        out = asdict(self)
        for key in ("pairs", "splits", "written"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenStats:
        """The record of to_dict's JSON (keys it does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("length"), dict):
            values["length"] = Lengths(**values["length"])
        if isinstance(values.get("pairs"), dict):
            values["pairs"] = {
                side: SideStats(**{**s, "length": Lengths(**s["length"])})
                for side, s in values["pairs"].items()
            }
        return cls(**values)


def measure(
    sides_by_line: Any, *, cutoff_len: int, kind: str, max_lines: int | None = None
) -> TokenStats:
    """Token statistics of (line, sides) pairs in file order (tokens.iter_token_sides' items):
    lengths, what cutoff_len cuts, loss tokens. The file's path, model, template and skipped
    rows are the caller's to add."""
    lengths = array("q")
    side_lengths = [array("q"), array("q")]
    side_totals = [[0, 0, 0], [0, 0, 0]]  # kept, loss, over cutoff
    tokens_total = tokens_kept = loss_tokens = 0
    over_lines: list[int] = []
    n_over = 0
    for line, sides in sides_by_line:
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
    spread = Lengths.of(lengths)
    pairs = None
    if kind == PREFERENCE:
        pairs = {
            side: SideStats(
                length=Lengths.of(side_lengths[k]),
                n_over_cutoff=side_totals[k][2],
                tokens_after_cutoff=side_totals[k][0],
                loss_tokens=side_totals[k][1],
            )
            for k, side in enumerate(("chosen", "rejected"))
        }
    return TokenStats(
        cutoff_len=cutoff_len,
        kind=kind,
        n_samples=n,
        length=spread,
        n_over_cutoff=n_over,
        over_cutoff_lines=over_lines,
        tokens_total=tokens_total,
        tokens_after_cutoff=tokens_kept,
        tokens_cut=tokens_total - tokens_kept,
        loss_tokens=loss_tokens,
        suggested_cutoff_len=suggest_cutoff_len(spread.p99) if n else None,
        pairs=pairs,
    )


def file_stats(
    path: Path,
    spec: DataSpec,
    model_dir: Path | str,
    *,
    model: str | None = None,
    max_lines: int | None = 1000,
    encoder: LlamaFactoryEncoder | None = None,
    checked: bool = False,
) -> TokenStats:
    """Token statistics of a data file under a spec, with the model's tokenizer (model: how the
    record names it, by default model_dir). Rows are checked as the spec's kind: those with check
    errors, and those LLaMA-Factory's processor drops, are skipped (n_skipped). Over-long samples
    are listed by line: the first max_lines (None: all).

    Measured on every core the spec's num_workers allows (qwenft.data.parallel, as qwenft writes
    the tokenized data), or in this process with encoder, a loaded one of this spec. checked: the
    file has just passed the check as the spec's kind (tokens.checked_batches)."""
    path = Path(path)
    counts: dict[str, int] = {}
    if encoder is None:
        workers = parallel.worker_count(spec.num_workers, path.stat().st_size)
        build = functools.partial(spec.encoder, str(model_dir), str(path.absolute().parent))
    else:
        workers, build = 1, functools.partial(_given, encoder)
    measured = measure(
        iter_token_sides(path, spec.kind, build, counts=counts, workers=workers, checked=checked),
        cutoff_len=spec.seq_cutoff_len,
        kind=spec.kind,
        max_lines=max_lines,
    )
    return replace(
        measured,
        path=str(path),
        model=str(model_dir) if model is None else model,
        template=spec.template,
        n_skipped=counts["skipped"] + counts["dropped"],
    )


def _given(encoder: LlamaFactoryEncoder) -> LlamaFactoryEncoder:
    return encoder


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
) -> TokenStats:
    """file_stats for data arguments given one by one (a DataSpec of them, without packing).
    kind None: the encoder's, else the file's (qwenft.data.kinds.detect_file_kind). Pass an
    encoder to reuse a loaded tokenizer (its model, template, cutoff_len and kind then win over
    the arguments)."""
    path = Path(path)
    if encoder is not None:
        if kind is not None and DataKind.parse(kind, "data kind") != encoder.kind:
            raise QwenftError(f"the encoder measures {encoder.kind} data, not {kind}")
        template, cutoff_len, kind = encoder.template.name, encoder.cutoff_len, encoder.kind
    spec = DataSpec(
        template=template,
        cutoff_len=cutoff_len,
        kind=DataKind.parse(kind or detect_file_kind(path) or SFT, "data kind"),
        default_system=default_system,
        enable_thinking=enable_thinking,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
        packing=False,
    )
    return file_stats(path, spec, model_dir, max_lines=max_lines, encoder=encoder)


# --- images ---------------------------------------------------------------------------------------


@dataclass
class ImageMeasure:
    """The images of a data file under a spec and a model: their sizes and tokens (with the
    model's image processor), and the samples that cutoff_len cuts inside their image tokens
    (image_cut errors: LLaMA-Factory keeps every image of a sample but only the tokens before the
    cut, and its training fails on such a sample, "Image features and image tokens do not
    match")."""

    stats: ImageStats
    problems: list[Problem]  # image_cut errors, in file order (the first max_lines)
    n_cut: int = 0  # all of them

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.stats.to_dict(),
            "n_cut": self.n_cut,
            "cut_lines": [p.line for p in self.problems],
        }


def measure_images(
    path: Path,
    spec: DataSpec,
    model_dir: Path | str,
    *,
    encoder: LlamaFactoryEncoder | None = None,
    max_lines: int | None = 1000,
) -> ImageMeasure:
    """The images of a data file's valid rows (rows with check errors are skipped), measured with
    the model's tokenizer, template and image processor under the spec: each sample with images
    is tokenized as LLaMA-Factory tokenizes it (its <image>s expanded) and truncated at
    cutoff_len; a sample that loses any image token is an image_cut error naming the cutoff_len
    that keeps it whole. encoder: a loaded one of this spec (its media_dir then wins)."""
    path = Path(path)
    enc = encoder or spec.encoder(str(model_dir), str(path.absolute().parent))
    counter = enc.images or spec.image_tokens(model_dir)
    pad = enc.tokenizer.token_to_id(IMAGE_PAD)
    if pad is None:
        raise QwenftError(
            f"the tokenizer of {model_dir} has no {IMAGE_PAD} token: it is not a Qwen "
            "vision-language tokenizer",
            "check image data with a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model",
        )
    stats = ImageStats(settings=counter.describe())
    problems: list[Problem] = []
    n_cut = 0
    extra = spec.cutoff_len - spec.seq_cutoff_len  # packing: train.yaml's is one more
    for lines, payloads in tokens.checked_batches(path, spec.kind):
        picked = []
        for line, payload in zip(lines, payloads, strict=True):
            row = tokens.row_value(payload)
            if isinstance(row, dict) and row.get("images"):
                picked.append((line, row))
        if not picked:
            continue
        sides = enc.encode_sides([row for _, row in picked])
        for (line, row), side in zip(picked, sides, strict=True):
            sizes = [image_size(p) for p in image_paths(row, enc.media_dir)]
            counts = [counter.of_size(*size) for size in sizes]
            stats.n_rows += 1
            for size, n in zip(sizes, counts, strict=True):
                stats.add(size, n)
            if side is None:  # LLaMA-Factory's processor drops the row
                continue
            full, ids, _ = side[0]
            kept, expected = ids.count(pad), sum(counts)
            if kept >= expected:
                continue
            n_cut += 1
            if max_lines is not None and len(problems) >= max_lines:
                continue
            fits = suggest_cutoff_len(full + extra + 1)
            problems.append(
                Problem(
                    "error",
                    "image_cut",
                    line,
                    "images",
                    f"cutoff_len {spec.cutoff_len} cuts this sample ({full} tokens with its "
                    f"{len(counts)} image{'s' if len(counts) != 1 else ''}) inside its image "
                    f"tokens: {kept} of {expected} kept; LLaMA-Factory keeps every image but not "
                    'its tokens, and training fails on the sample ("Image features and image '
                    f'tokens do not match"); cutoff_len {fits} keeps it whole, or smaller '
                    f"images take fewer tokens (image_max_pixels, now {counter.max_pixels})",
                )
            )
    return ImageMeasure(stats=stats, problems=problems, n_cut=n_cut)
