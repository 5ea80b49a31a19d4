"""Several data files in one run: the sources, their shares, and what LLaMA-Factory makes of them.

`qwenft train --data a.jsonl:0.8 --data b.jsonl:0.2 --mix interleave --eval-data held.jsonl`
registers each file under its own dataset_info.json entry and renders LLaMA-Factory 0.9.5's keys:
`dataset: a,b`, `mix_strategy`, `interleave_probs` and `eval_dataset`. How LLaMA-Factory mixes
(llamafactory.data.data_utils.merge_dataset, after each file is cut to `max_samples`):

- concat: every row of each file once, the files one after the other;
- interleave (interleave_under): `datasets.interleave_datasets(probabilities, seed,
  "first_exhausted")`: rows drawn at random from the files at their shares (evenly, round-robin,
  without shares) until the first file runs out;
- interleave-over (interleave_over): the same with "all_exhausted": on, repeating the files that
  ran out, until every file has been read once.

The evaluation files are merged the same way, and LLaMA-Factory requires one share per
evaluation file too when shares are given (DataArguments.__post_init__); `val_size` and
`eval_dataset` exclude each other there. This module checks those rules before anything is written
and computes each source's expected share of the training samples and tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.choices import Mix
from qwenft.errors import QwenftError, raise_all

SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Source:
    """One --data file and its share of the mixture (None: no share given)."""

    path: Path
    share: float | None = None

    @classmethod
    def parse(cls, text: str | Path) -> Source:
        """`FILE` or `FILE:SHARE` (a file whose own name ends in `:<number>` is taken whole)."""
        text = str(text)
        head, sep, tail = text.rpartition(":")
        if sep and head and not Path(text).expanduser().exists():
            try:
                share = float(tail)
            except ValueError:
                share = None
            if share is not None:
                return cls(Path(head).expanduser(), share)
        return cls(Path(text).expanduser())


@dataclass(frozen=True)
class Mixture:
    """The run's data files and how they mix. One source and no evaluation file: a plain run."""

    sources: tuple[Source, ...]
    mix: Mix = Mix.CONCAT
    eval_paths: tuple[Path, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(s.path for s in self.sources)

    @property
    def shares(self) -> tuple[float, ...] | None:
        given = [s.share for s in self.sources]
        return None if None in given else tuple(float(s) for s in given)  # type: ignore[arg-type]

    @property
    def several(self) -> bool:
        return len(self.sources) > 1

    def lf_keys(self, eval_names: Sequence[str] = ()) -> dict[str, Any]:
        """train.yaml's mixing and evaluation keys (beside `dataset`, which names the sources)."""
        keys: dict[str, Any] = {}
        if self.several:
            keys["mix_strategy"] = self.mix.lf_value
            if self.shares:
                keys["interleave_probs"] = ",".join(f"{p:g}" for p in self.shares)
        if eval_names:
            keys["eval_dataset"] = ",".join(eval_names)
            keys["val_size"] = 0.0  # LLaMA-Factory refuses both
        return keys


def mixture_of(
    data: Sequence[str | Path],
    mix: str | None = None,
    eval_data: Sequence[str | Path] = (),
) -> Mixture:
    """The run's mixture from `--data` (FILE or FILE:SHARE, repeatable), `--mix` and
    `--eval-data`; every problem is refused at once (QwenftError, exit 2), before anything is
    read or written."""
    sources = tuple(Source.parse(d) for d in data)
    evals = tuple(Path(e).expanduser() for e in eval_data)
    problems: list[QwenftError] = []
    seen: dict[Path, str] = {}
    for option, path in [
        *(("--data", s.path) for s in sources),
        *(("--eval-data", e) for e in evals),
    ]:
        key = path.absolute()
        if key in seen:
            where = "twice" if seen[key] == option else f"as {seen[key]} and as {option}"
            problems.append(
                QwenftError(
                    f"{path} is given {where}",
                    "give each file once"
                    + (
                        "" if seen[key] == option else ": evaluation data is held out from training"
                    ),
                )
            )
        seen.setdefault(key, option)
    given = [s.share for s in sources if s.share is not None]
    chosen = Mix(Mix.parse(mix, "--mix")) if mix else None
    if given:
        if len(sources) < 2:
            problems.append(
                QwenftError(
                    f"a share ({sources[0].path}:{given[0]:g}) needs two or more --data files",
                    f"drop the share: --data {sources[0].path}",
                )
            )
        elif len(given) < len(sources):
            bare = next(s.path for s in sources if s.share is None)
            problems.append(
                QwenftError(
                    f"{bare} has no share, and other --data files have one",
                    "give every file a share (--data FILE:SHARE), or none",
                )
            )
        elif any(not 0 < p <= 1 for p in given):
            bad = next(s for s in sources if not 0 < (s.share or 0) <= 1)
            problems.append(
                QwenftError(f"the share of {bad.path} ({bad.share:g}) must be in (0, 1]")
            )
        elif abs(sum(given) - 1) > SHARE_TOLERANCE:
            total = sum(given)
            fixed = " ".join(f"--data {s.path}:{(s.share or 0) / total:.3g}" for s in sources)
            problems.append(
                QwenftError(
                    f"the shares add up to {total:g}, not 1",
                    f"normalised: {fixed}",
                )
            )
        if chosen == Mix.CONCAT:
            problems.append(
                QwenftError(
                    "--mix concat reads every row of each file once: shares need --mix interleave",
                    "drop the shares, or use --mix interleave (or interleave-over)",
                )
            )
    if evals and given and len(given) == len(sources) > 1 and len(evals) != len(sources):
        problems.append(
            QwenftError(
                f"with shares, LLaMA-Factory mixes the evaluation files at the same shares, so it "
                f"needs {len(sources)} --eval-data files (one per --data file), not {len(evals)}",
                "give one --eval-data file per --data file, in the same order, or drop the "
                "shares (--mix interleave alone mixes the files evenly)",
            )
        )
    raise_all(problems)
    return Mixture(sources, chosen or (Mix.INTERLEAVE if given else Mix.CONCAT), evals)


def check_split(mixture: Mixture, val_size: Any) -> None:
    """--eval-data excludes a held-out split the person asked for (--val-size, --set, --config):
    LLaMA-Factory refuses both."""
    if mixture.eval_paths and val_size:
        raise QwenftError(
            f"--eval-data and val_size {val_size:g} exclude each other: the evaluation set is "
            "the --eval-data files",
            "drop --val-size (or drop --eval-data to hold out a share of --data)",
        )


def expected_samples(
    rows: Sequence[int], mix: Mix, shares: Sequence[float] | None, max_samples: int | None = None
) -> list[float]:
    """The training samples expected from each source: its rows (cut to max_samples, as
    LLaMA-Factory cuts each file) under the mixing. Interleaving without shares goes round-robin;
    with shares it draws at random, so the counts are expectations."""
    n = [min(r, max_samples) if max_samples else r for r in rows]
    if mix == Mix.CONCAT or len(n) < 2:
        return [float(x) for x in n]
    if not shares:  # round-robin: until the first (or the last) runs out
        per = min(n) if mix == Mix.INTERLEAVE else max(n)
        return [float(per)] * len(n)
    draws = [x / p for x, p in zip(n, shares, strict=True)]
    total = min(draws) if mix == Mix.INTERLEAVE else max(draws)
    return [p * total for p in shares]


def token_shares(
    samples: Sequence[float], tokens: Sequence[int], rows: Sequence[int]
) -> list[float]:
    """Each source's expected share of the training tokens: its expected samples times its mean
    tokens per row, over the total."""
    weights = [s * (t / r if r else 0) for s, t, r in zip(samples, tokens, rows, strict=True)]
    total = sum(weights)
    return [w / total if total else 0.0 for w in weights]


def source_lines(
    names: Sequence[str],
    rows: Sequence[int],
    samples: Sequence[float],
    tokens: Sequence[int] | None = None,
) -> list[str]:
    """One line per source: rows, expected samples and, with tokens, the expected share of the
    training tokens (else of the samples)."""
    total = sum(samples) or 1
    shares = token_shares(samples, tokens, rows) if tokens else [s / total for s in samples]
    lines = []
    for i, name in enumerate(names):
        used = samples[i]
        took = f"{math.floor(used + 0.5):,} samples" + (
            f" of {rows[i]:,} rows" if used != rows[i] else " (every row)"
        )
        size = f", {tokens[i]:,} tokens" if tokens else ""
        what = "tokens" if tokens else "samples"
        lines.append(f"source {name}: {took}{size}, ~{shares[i]:.0%} of the training {what}")
    return lines
