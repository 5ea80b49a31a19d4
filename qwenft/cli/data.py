"""`qwenft data`: check, convert, split and register datasets of every kind (sft, preference, kto,
pt: qwenft.data.kinds).

Thin commands: each calls one function of qwenft.data and prints its result. Nothing heavy is
imported here; token statistics (`data check --model`) import LLaMA-Factory when they run.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from qwenft.data.pipeline import ImageMeasure, Lengths, TokenStats
    from qwenft.data.reasoning import ThinkingPlan

from qwenft.choices import ConvertFormat, DataKind, Template, TextDocs, Thinking
from qwenft.cli.common import (
    JsonOpt,
    ThinkingOpt,
    choice_option,
    err,
    handle_errors,
    knob_options,
    print_json,
)
from qwenft.knobs import DATA_CHECK, NO_KNOBS, KnobValues

app = typer.Typer(
    help="Check, convert, split and register datasets (chat, preference pairs, KTO, text).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ForceOpt = Annotated[
    bool, typer.Option("--force", help="Overwrite / replace what is already there.")
]
DataArg = Annotated[
    Path,
    typer.Argument(
        help="A .jsonl file (one JSON object per line), a .json array, or a .txt of pre-training "
        "text (one document per line, as LLaMA-Factory reads it)."
    ),
]
DEFAULT_STATS_MODEL = "tiny-qwen2"


def _token_stats(
    spec: str,
    template: str | None,
    thinking: str,
    knobs: KnobValues,
    data: Path,
    kind: str = "sft",
    images: bool = False,
) -> tuple[TokenStats, ImageMeasure | None, str]:
    """Token statistics of a data file that has passed the check as `kind`, under the settings
    `qwenft train` would use for this model and data (one resolver: the recipe's cutoff_len, the
    family's system prompt, the thinking rule; the first stage that trains on the data's kind, so
    pt's packing too), measured with the encoder train builds (pipeline.DataSpec). With images:
    their tokens with the model's image processor and the samples cutoff_len cuts inside them
    (pipeline.measure_images), and a note when the model has no image processor."""
    from qwenft import settings
    from qwenft.choices import stages_for
    from qwenft.data.pipeline import DataSpec, file_stats, measure_images
    from qwenft.models.target import base_target

    run = settings.resolve(
        settings.RunRequest(
            model=spec,
            template=template,
            thinking=thinking,
            data=data,
            knobs=dict(knobs),
            stage=stages_for(kind)[0],
        )
    )
    target = base_target(run.model)
    target.ensure_built(progress=err)
    data_spec = DataSpec.from_settings(run, kind=kind)
    # data check measures a file that has just passed the check (_check_one)
    stats = file_stats(data, data_spec, target.model_path, model=spec, checked=True)
    if not images:
        return stats, None, ""
    measured = measure_images(data, data_spec, target.model_path)
    note = ""
    if not data_spec.image_tokens(target.model_path).processor.source:
        note = (
            f"note: {spec} has no image processor (preprocessor_config.json): its images were "
            "counted with Qwen2-VL's; LLaMA-Factory trains images on a vision-language model "
            "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) only"
        )
    return stats, measured, note


def _length_line(label: str, ln: Lengths) -> str:
    return (
        f"  {label}  min {ln.min}  p50 {ln.p50}  p90 {ln.p90}  p99 {ln.p99}  "
        f"max {ln.max}  mean {ln.mean}"
    )


def _format_stats(s: TokenStats) -> str:
    n = s.n_samples
    kind = s.kind
    lines = [
        f"tokens ({s.template} template, {s.model}, cutoff_len {s.cutoff_len}): "
        f"{n} {'pair' if kind == 'preference' else 'sample'}{'s' if n != 1 else ''}"
        + (f", {s.n_skipped} skipped (errors)" if s.n_skipped else ""),
    ]
    if s.pairs is not None:
        for side in ("chosen", "rejected"):
            lines.append(_length_line(f"prompt+{side}", s.pairs[side].length))
        lines.append(_length_line("longer side  ", s.length))
    else:
        lines.append(_length_line("length", s.length))
    if s.n_over_cutoff:
        shown = ", ".join(map(str, s.over_cutoff_lines[:10]))
        more = " ..." if s.n_over_cutoff > 10 else ""
        what = "pair" if kind == "preference" else "sample"
        lines.append(
            f"  over cutoff_len: {s.n_over_cutoff} {what}"
            f"{'s' if s.n_over_cutoff != 1 else ''} (lines {shown}{more}), "
            f"{s.tokens_cut} tokens cut silently by LLaMA-Factory"
            + (
                " (without packing; with it, texts run on into the next block)"
                if kind == "pt"
                else ""
            )
        )
    else:
        lines.append("  over cutoff_len: none")
    trained = {
        "preference": "chosen and rejected answers",
        "kto": "the last answer",
        "pt": "every token",
    }.get(kind, "assistant turns")
    lines.append(
        f"  tokens after cutoff: {s.tokens_after_cutoff}, of which {s.loss_tokens} count "
        f"toward the loss ({trained})"
    )
    if s.suggested_cutoff_len is not None:
        lines.append(f"  suggested cutoff_len: {s.suggested_cutoff_len} (p99 rounded up to 64)")
    return "\n".join(lines)


def _reasoning_plan(
    report_path: Path, kind: str, model: str | None, template: str | None, thinking: str
) -> tuple[ThinkingPlan | None, str]:
    """How each kind of sample (reasoning or direct answers) will be trained: for --model, as
    `qwenft train` would train it; without one, for a Qwen3 hybrid model (shown only when the file
    holds reasoning). The plan and the model it is for."""
    from qwenft.data.reasoning import thinking_plan

    if kind not in ("sft", "preference", "kto"):
        return None, ""
    if model is None:
        plan = thinking_plan(report_path, "hybrid", thinking, "qwen3")
        if not plan.counts.reasoning:
            return None, ""
        return plan, "a Qwen3 hybrid model"
    from qwenft import settings

    resolved = settings.model_for(model, template)
    plan = thinking_plan(report_path, resolved.thinking, thinking, resolved.template)
    return plan, f"{model} (template {resolved.template})"


def _format_plan(plan: ThinkingPlan, what: str) -> str:
    c = plan.counts
    mode = {None: "no switch", True: "enable_thinking: true", False: "enable_thinking: false"}[
        plan.enable_thinking
    ]
    lines = [f"reasoning: {c.reasoning} of {c.total} samples reason; for {what}: {mode}"]
    lines += [f"  {note}" for note in plan.notes]
    if plan.warning:
        lines.append(f"warning think_without_template: {plan.warning}")
    return "\n".join(lines)


@app.command()
@handle_errors
@knob_options(DATA_CHECK)
def check(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Data files: .jsonl (one JSON object per line), a .json array, or a .txt of "
            "pre-training text (one document per line, as LLaMA-Factory reads it); several: each "
            "checked, then a total (the files of a mixture, `train --data A --data B`)."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Also count tokens with this model's tokenizer and chat template: a preset "
            f"(default {DEFAULT_STATS_MODEL} when --cutoff-len is given), hub id or local folder.",
        ),
    ] = None,
    knobs: KnobValues = NO_KNOBS,  # --cutoff-len (implies token statistics), --data-workers
    template: Annotated[
        str | None,
        choice_option("--template", Template.values(), "Override the model's template (as train)."),
    ] = None,
    thinking: ThinkingOpt = Thinking.AUTO.value,
    kind: Annotated[
        str | None,
        choice_option(
            "--kind",
            DataKind.values(),
            "Check as this kind (default: told from the rows); grpo's prompt files: --kind prompt.",
        ),
    ] = None,
    max_shown: Annotated[
        int, typer.Option("--max-shown", min=1, help="Problems shown per kind.")
    ] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Check data files; exit 2 on errors in any.

    Names the file's data kind (sft, preference, kto, pt), streams FILE and reports every problem
    with file:line and field, grouped by kind. With --model or --cutoff-len it also counts tokens
    as LLaMA-Factory will for that kind (chat template included; pairs as prompt+chosen and
    prompt+rejected): lengths, samples over cutoff_len, tokens cut, loss tokens and a suggested
    cutoff_len. Chat data with <think> reasoning also gets how each kind of sample (reasoning,
    direct answers) will be trained (docs/agents.md). Chat data with images (an "images" list of
    paths beside the file, an <image> per image in the user turns): every image must exist and
    decode; their sizes and tokens per image are shown (--image-max-pixels), and with --model a
    sample cut inside its image tokens by cutoff_len is an error (docs/data.md).
    """
    from qwenft.errors import raise_all
    from qwenft.knobs import out_of_range

    pixels = {k: knobs[k] for k in ("image_max_pixels", "image_min_pixels") if k in knobs}
    raise_all(out_of_range(pixels, command=DATA_CHECK))
    results = []
    for file in files:
        if len(files) > 1 and not as_json:
            typer.echo(f"== {file}")
        results.append(
            _check_one(file, model, knobs, pixels, template, thinking, max_shown, as_json, kind)
        )
    if len(files) > 1:
        total = {
            "files": len(files),
            "samples": sum(r["samples"] for r in results),
            "valid": sum(r["valid"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "warnings": sum(r["warnings"] for r in results),
            "tokens": sum(r["tokens"] or 0 for r in results)
            if all(r["tokens"] is not None for r in results)
            else None,
        }
        kinds = sorted({r["json"]["kind"] for r in results})
        total["kinds"] = kinds
        if as_json:
            print_json({"files": [r["json"] for r in results], "total": total})
        else:
            typer.echo(
                f"== total: {total['files']} files, {total['samples']} samples "
                f"({total['valid']} valid), {total['errors']} error(s), "
                f"{total['warnings']} warning(s)"
                + (f", {total['tokens']:,} tokens" if total["tokens"] is not None else "")
            )
            if len(kinds) > 1:
                typer.echo(
                    f"warning: the files hold different kinds of data ({', '.join(kinds)}); "
                    "one run trains on one kind (docs/data.md)"
                )
    elif as_json:
        print_json(results[0]["json"])
    if not all(r["ok"] for r in results):
        raise typer.Exit(2)


def _check_one(
    file: Path,
    model: str | None,
    knobs: KnobValues,
    pixels: dict[str, int],
    template: str | None,
    thinking: str,
    max_shown: int,
    as_json: bool,
    kind: str | None = None,
) -> dict[str, Any]:
    """`data check` of one file: its report printed (unless as_json); its counts and JSON."""
    from qwenft.data.check import check_file, format_report
    from qwenft.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageTokens

    image_tokens = ImageTokens(
        pixels.get("image_max_pixels", DEFAULT_MAX_PIXELS),
        pixels.get("image_min_pixels", DEFAULT_MIN_PIXELS),
    )
    report = check_file(file, kind, image_tokens=image_tokens)
    cutoff_len = knobs.get("cutoff_len")
    stats = None
    note = ""
    want_stats = model is not None or cutoff_len is not None
    if want_stats and report.kind == DataKind.PROMPT:
        # a prompt's completions are sampled in training: there is no trained text to count
        want_stats = False
        note = "prompt data: tokens are not counted (the completions are sampled in training)"
    plan, plan_for = (None, "")
    if report.ok:
        plan, plan_for = _reasoning_plan(
            report.path,
            report.kind,
            (model or DEFAULT_STATS_MODEL) if want_stats else None,
            template,
            thinking,
        )
    if want_stats and report.ok:
        # Building the tiny model and loading LLaMA-Factory print to stdout: keep it for results.
        with contextlib.redirect_stdout(sys.stderr):
            stats, measured, note = _token_stats(
                model or DEFAULT_STATS_MODEL,
                template,
                thinking,
                knobs,
                report.path,
                report.kind,
                images=report.has_images,
            )
        if measured is not None:  # the model's image processor; cuts inside image tokens
            report.images = measured.stats
            report.add(measured.problems)
    data = report.to_dict()
    data["tokens"] = stats.to_dict() if stats else None
    data["reasoning"] = plan.to_dict() | {"model": plan_for} if plan else None
    if not as_json:
        typer.echo(format_report(report, max_per_kind=max_shown))
        if plan is not None:
            typer.echo(_format_plan(plan, plan_for))
        if stats is not None:
            typer.echo(_format_stats(stats))
            if note:
                typer.echo(note)
        elif want_stats:
            typer.echo("token statistics skipped: fix the errors first")
        elif note:
            typer.echo(note)
    return {
        "json": data,
        "ok": report.ok,
        "samples": report.n_samples,
        "valid": report.n_valid,
        "errors": report.n_errors,
        "warnings": report.n_warnings,
        "tokens": stats.tokens_total if stats else None,
    }


@app.command()
@handle_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Input .jsonl, .json or .txt file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl file.")],
    fmt: Annotated[
        str,
        choice_option(
            "--from",
            ConvertFormat.values(),
            "Input format (auto: detect from the first row). alpaca and sharegpt include "
            "LLaMA-Factory's ranking and KTO variants; trl (= ultrafeedback) reads prompt + "
            "chosen/rejected or prompt/completion/label; openai includes LLaMA-Factory's "
            "content-part messages and chosen_messages/rejected_messages pairs; text reads "
            '{"text"} rows or .txt.',
        ),
    ] = "auto",
    text_docs: Annotated[
        str | None,
        choice_option(
            "--text-docs",
            TextDocs.values(),
            "How a .txt becomes documents: lines (default; LLaMA-Factory's reading, one document "
            "per line) or blocks (one document per blank-line-separated block).",
        ),
    ] = None,
    fill: Annotated[
        list[str] | None,
        typer.Option(
            "--fill",
            metavar="NAME=VALUE",
            help="Replace {{NAME}} placeholders (LLaMA-Factory's identity.json) with VALUE; "
            "repeatable.",
        ),
    ] = None,
    force: ForceOpt = False,
    skip_invalid: Annotated[
        bool,
        typer.Option("--skip-invalid", help="Write the rows that convert and report the others."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert alpaca/sharegpt/OpenAI/TRL/text data to qwenft's shapes.

    Chat rows become messages (sft), pairs become messages + chosen + rejected (preference),
    labelled rows messages + label (kto), text {"text"} rows (pt). Writes OUT atomically; rows that
    cannot be converted are listed with their lines, and then nothing is written unless
    --skip-invalid.
    """
    from qwenft.data.check import format_problems
    from qwenft.data.convert import convert_file, parse_fill

    report = convert_file(
        src,
        out,
        fmt,
        force=force,
        skip_invalid=skip_invalid,
        fill=parse_fill(fill),
        text_docs=text_docs,
    )
    if as_json:
        print_json(report.to_dict())
    else:
        if report.written:
            read = {
                "lines": ", one document per line as LLaMA-Factory reads a .txt",
                "blocks": ", one document per blank-line-separated block",
            }.get(report.reading or "", "")
            typer.echo(
                f"converted {report.n_out} of {report.n_in} rows ({report.format}{read} -> "
                f"{report.kind} data) to {report.out}"
            )
            if report.n_images:
                typer.echo(
                    f"images: {report.n_images} in the rows written"
                    + (
                        f", {report.images_written} data URLs written out as files in "
                        f"{report.images_dir}"
                        if report.images_written
                        else ""
                    )
                )
        for line in format_problems(report.problems, str(report.src)):
            typer.echo(line)
    if not report.written:
        n = report.n_errors
        err(
            f"error: {n} row{'s' if n != 1 else ''} of {report.src} could not be converted; "
            f"nothing was written"
        )
        err("hint: fix those rows, or pass --skip-invalid to write the others")
        raise typer.Exit(2)


@app.command()
@handle_errors
def split(
    file: DataArg,
    val_ratio: Annotated[
        float, typer.Option("--val-ratio", help="Share of rows for validation, in (0, 1).")
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same split.")] = 42,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Where to write (default: beside FILE).")
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Split into train and val files (seeded).

    Writes <stem>.train.jsonl and <stem>.val.jsonl; the same seed gives the same split.
    """
    from qwenft.data.split import split_file

    train_path, val_path = split_file(file, val_ratio, seed, out_dir, force=force)
    counts = {p: _count_lines(p) for p in (train_path, val_path)}
    if as_json:
        print_json(
            {
                "train": str(train_path),
                "val": str(val_path),
                "n_train": counts[train_path],
                "n_val": counts[val_path],
                "seed": seed,
                "val_ratio": val_ratio,
            }
        )
    else:
        typer.echo(f"train: {train_path} ({counts[train_path]} rows)")
        typer.echo(f"val:   {val_path} ({counts[val_path]} rows)")


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


@app.command()
@handle_errors
def register(
    file: DataArg,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Dataset name (letters, digits, _-.); default <stem>-<sha8>."),
    ] = None,
    dataset_dir: Annotated[
        Path | None,
        typer.Option(
            "--dataset-dir", help="Folder of dataset_info.json (default $QWENFT_HOME/datasets)."
        ),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Check a dataset, then add it to dataset_info.json.

    The entry (absolute path; for chat kinds sharegpt formatting with role/content tags, plus
    ranking and chosen/rejected for pairs or the label as kto_tag; the text column for pt) is what
    LLaMA-Factory's `dataset:` and `dataset_dir:` keys read. Chat data with images maps the images
    column too; LLaMA-Factory finds them with `media_dir:` set to the file's folder (printed). A
    .txt file is refused: convert it to jsonl first. Safe to run from several shells at once.
    """
    from qwenft.data.check import require_valid
    from qwenft.data.images import media_dir
    from qwenft.data.reader import file_sha256
    from qwenft.data.registry import auto_dataset_name, check_dataset_name, register_dataset
    from qwenft.paths import default_dataset_dir

    if name is not None:
        check_dataset_name(name)
    report = require_valid(file, "it was not registered", kind=None)
    folder = dataset_dir if dataset_dir is not None else default_dataset_dir()
    name = name or auto_dataset_name(report.path, file_sha256(report.path), folder)
    entry = register_dataset(
        report.path,
        name,
        folder,
        force=force,
        has_tools=report.has_tools,
        kind=report.kind,
        has_images=report.has_images,
    )
    folder = Path(folder).expanduser().absolute()
    images_at = media_dir(report.path) if report.has_images else None
    if as_json:
        print_json(
            {
                "name": name,
                "dataset_dir": str(folder),
                "kind": report.kind,
                "entry": entry,
                "media_dir": images_at,
            }
        )
    else:
        typer.echo(f"registered {name} ({report.kind} data) -> {entry['file_name']}")
        typer.echo(f"in {folder / 'dataset_info.json'}")
        use = f"use it with: dataset: {name}  dataset_dir: {folder}"
        if images_at:  # LLaMA-Factory looks for images in media_dir (default: dataset_dir)
            use += f"  media_dir: {images_at}"
        typer.echo(use)
