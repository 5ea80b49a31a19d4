"""`qwenft eval`: how good is the fine-tune, next to its base, on held-out data.

The data's kind (qwenft.data.check: sft, preference, kto, pt) decides what is measured.

sft (chat data): three LLaMA-Factory runs, each through launcher.run: `do_eval` of the fine-tuned
model (eval loss, perplexity = exp(loss), next-token accuracy), the same for its base model on the
same data, and `do_predict` with `predict_with_generate` for the fine-tuned model (BLEU-4,
ROUGE-1/2/L against the reference answers, predictions saved as jsonl).

preference, kto, pt: in-process log-probabilities (qwenft.scoring) under the fine-tuned model and
its starting model (the run's base: for LoRA the model without the adapter; for a run trained
`--from` another, that run's model): preference pairs get each model's margin log p(chosen) -
log p(rejected), the reward accuracy (fraction of pairs whose margin grew) and reward margin (its
mean growth); KTO answers the log-p shift of desirable vs undesirable ones; pt text the perplexity.
Per-row scores go to scores.jsonl.

A reward model (a run of --stage rm) is measured by its own value head on held-out pairs: each
pair's score(chosen) - score(rejected) and the share of pairs whose chosen answer scored higher.
`qwenft score` (plan_score, execute_score) reads it too: a file of conversations or pairs, scored
as the run was trained (the chat template applied by LLaMA-Factory's encoder).

Everything is staged in a hidden folder beside the report folder and renamed into place when
complete, so a report is whole or absent.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qwenft import __version__
from qwenft import settings as run_settings
from qwenft.choices import DataKind, Stage, Template, Thinking
from qwenft.data import check, images, reader, registry
from qwenft.errors import JobFailed, QwenftError, raise_all
from qwenft.fsutil import atomic_write_json, atomic_write_text, refuse_existing, staged_dir
from qwenft.knobs import EVAL, SCORE, KnobValues, out_of_range
from qwenft.lf import launcher as lf_launcher
from qwenft.lf import render
from qwenft.models import presets
from qwenft.models.target import (
    ModelTarget,
    base_target,
    resolve_target,
    run_base_path,
    thinking_mode,
    value_head_path,
)
from qwenft.paths import default_dataset_dir
from qwenft.proc import launcher
from qwenft.runs.lock import RunLock
from qwenft.runs.manifest import MANIFEST, now_iso, read_manifest, update_manifest
from qwenft.runs.progress import surface_log

REPLACE_HINT = "pass --force to replace it, or --output-dir for a new folder"
REPORT_JSON, REPORT_MD, PREDICTIONS = "eval.json", "eval.md", "predictions.jsonl"
SCORES = "scores.jsonl"  # per-row log-probabilities of the preference, kto and pt evaluations
GEN_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@dataclass
class EvalPlan:
    spec: str
    run_dir: Path | None
    out_dir: Path
    log_path: Path
    data_path: Path
    sha256: str
    n_samples: int
    dataset_name: str
    dataset_dir: Path
    template: str
    default_system: str
    enable_thinking: bool | None
    tuned: ModelTarget
    base: ModelTarget | None
    settings: dict[str, Any]
    cli: str
    force: bool
    notes: list[str] = field(default_factory=list)
    kind: str = DataKind.SFT.value  # the data's kind: sft runs LLaMA-Factory, the others score
    reward: bool = False  # the run is a reward model (--stage rm): its value head scores the pairs

    @property
    def scored(self) -> bool:
        """True when the evaluation is log-probabilities in-process (preference, kto, pt)."""
        return self.kind != DataKind.SFT.value

    def jobs(self, stage: Path) -> list[tuple[str, ModelTarget, dict[str, Any]]]:
        """(name, model, LLaMA-Factory config) of each run, in order; output_dirs under stage."""
        out = [
            (
                "tuned-eval",
                self.tuned,
                build_eval_config(self, self.tuned, stage / "tuned-eval", False),
            )
        ]
        if self.base is not None:
            out.append(
                (
                    "base-eval",
                    self.base,
                    build_eval_config(self, self.base, stage / "base-eval", False),
                )
            )
        out.append(
            (
                "tuned-predict",
                self.tuned,
                build_eval_config(self, self.tuned, stage / "tuned-predict", True),
            )
        )
        return out


def _slug(text: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text.rstrip("/")).name).strip("-.").lower() or "model"
    )


def _run_train_config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "train.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def run_eval_data(spec: str) -> Path:
    """`qwenft eval RUN` without --data: the run's --eval-data file (the first, where it had
    several), else QwenftError saying to pass --data."""
    run_dir = Path(spec).expanduser()
    manifest = read_manifest(run_dir) if (run_dir / MANIFEST).is_file() else None
    if manifest is None or not manifest.eval_data:
        raise QwenftError(
            "--data is required"
            + (f": {run_dir} was trained without --eval-data" if manifest else ""),
            f"qwenft eval {spec} --data HELD_OUT.jsonl",
        )
    return Path(manifest.eval_data[0].path)


def plan_eval(
    spec: str,
    data: Path | None,
    *,
    output_dir: Path | None = None,
    base: str | None = None,
    no_base: bool = False,
    force: bool = False,
    knobs: Mapping[str, Any] | None = None,
    dataset_dir: Path | None = None,
    template: str | None = None,
    thinking: str = Thinking.AUTO.value,
) -> EvalPlan:
    """Check every input; raise QwenftError (writing nothing) when the evaluation cannot work.
    `knobs`: the eval options of the knob table (qwenft.knobs: cutoff_len,
    per_device_eval_batch_size, max_new_tokens, max_samples), checked against its ranges."""
    chosen = KnobValues(knobs)
    raise_all(out_of_range(chosen, command=EVAL))
    cutoff_len = chosen.get("cutoff_len")
    batch_size = chosen.get("per_device_eval_batch_size", 1)
    max_new_tokens = chosen.get("max_new_tokens", 256)
    max_samples = chosen.get("max_samples")
    if base and no_base:
        raise QwenftError("--base and --no-base contradict each other", "pass one of them")

    notes: list[str] = []
    if data is None:
        data = run_eval_data(spec)
        notes.append(f"evaluating on the run's --eval-data: {data}")
    # any kind: the file's own (sft runs LLaMA-Factory's evaluation, the others are scored)
    report = check.require_valid(Path(data).expanduser(), "nothing was evaluated", kind=None)
    kind = report.kind
    cli = lf_launcher.find_llamafactory_cli() if kind == DataKind.SFT.value else ""
    data = report.path.resolve()
    sha = reader.file_sha256(data)

    # QwenftError for a folder that is neither a run nor a model, or a --template other than the
    # run's trained one (unless --force)
    tuned = resolve_target(spec, None, template, force)
    run_dir, manifest = tuned.run_dir, tuned.manifest
    reward = manifest is not None and Stage(manifest.stage).facts.reward
    if reward:
        if kind != DataKind.PREFERENCE.value:
            raise QwenftError(
                f"{spec} is a reward model (--stage rm), evaluated on chosen/rejected pairs, and "
                f"{Path(data).name} holds {kind} data; nothing was evaluated",
                f"give held-out pairs with --data; `qwenft score {spec} FILE` scores conversations",
            )
        if base:
            raise QwenftError(
                "--base compares log-probabilities with another model; a reward model is "
                "measured by its own scores (the untrained head it started from ranks pairs "
                "by chance)",
                "drop --base",
            )
        no_base = True
        notes.append(
            "a reward model has no base to compare with: the untrained value head it started from "
            "ranks pairs by chance"
        )
    train_cfg: dict[str, Any] = {}
    base_model: ModelTarget | None = None
    if manifest is None:
        # A model as it comes: its own mode is the one `train` would choose on this data; a
        # --thinking is then checked by the rule chat and serve use (models.target.thinking_mode)
        own = run_settings.thinking_choice(
            Thinking.AUTO.value, run_settings.model_for(spec, template), data
        )
        tuned.enable_thinking = thinking_mode(own, thinking, force, trained=False)
    else:
        tuned.enable_thinking = thinking_mode(manifest.enable_thinking, thinking, force)
        train_cfg = _run_train_config(tuned.run_dir)
        if not no_base and not base:
            assert tuned.run_dir is not None
            own_base = run_base_path(tuned.run_dir, manifest)  # gone: named, with what to do
            base_model = base_target(replace(manifest.model, path=own_base), tuned.template)
            base_model.source = manifest.model.spec
        if manifest.dataset.sha256 == sha:
            notes.append(
                "this is the data the run was trained on: the numbers measure fit, not "
                "generalisation (use held-out data, e.g. from `qwenft data split`)"
            )
    if base:
        base_model = base_target(presets.resolve_model(base))
    if kind != DataKind.SFT.value and base_model is None and not no_base:
        notes.append(
            "no starting model to compare with (not a run folder): pass --base MODEL for the "
            "reward accuracy and margin"
            if kind == DataKind.PREFERENCE.value
            else "no starting model to compare with (not a run folder): pass --base MODEL"
        )

    out_dir = (
        Path(output_dir).expanduser()
        if output_dir
        else (run_dir / "eval" if run_dir else Path(f"eval-{_slug(spec)}"))
    )
    out_dir = out_dir.absolute()
    if not force:
        refuse_existing(out_dir, REPLACE_HINT, "already holds an evaluation report")
    cutoff_default = train_cfg.get("cutoff_len") or run_settings.default_cutoff_len()
    if kind == DataKind.SFT.value:
        settings = {
            "cutoff_len": cutoff_len or int(cutoff_default),
            "per_device_eval_batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_samples": max_samples,
            "bf16": bool(train_cfg.get("bf16", False)),
        }
    else:
        settings = {
            "cutoff_len": cutoff_len or int(cutoff_default),
            "batch_size": batch_size,
            "max_samples": max_samples,
        }
    if report.has_images:
        if not Template(tuned.template).vision:
            raise QwenftError(
                f"{data.name} holds images, and {spec} is a text model (template "
                f"{tuned.template}); nothing was evaluated",
                "evaluate image data on a vision-language model or run (docs/vision.md)",
            )
        # where the images are (relative to the data file), scaled as the run trained them
        settings["media_dir"] = images.media_dir(data)
        for key in ("image_max_pixels", "image_min_pixels"):
            if train_cfg.get(key):
                settings[key] = train_cfg[key]
    ddir = (dataset_dir or default_dataset_dir()).expanduser().absolute()
    return EvalPlan(
        spec=spec,
        run_dir=run_dir,
        out_dir=out_dir,
        log_path=out_dir.parent / f"{out_dir.name}.log",
        data_path=data,
        sha256=sha,
        n_samples=report.n_valid,
        dataset_name=registry.auto_dataset_name(data, sha, ddir) if cli else "",  # sft only
        dataset_dir=ddir,
        template=tuned.template,
        default_system=tuned.system,
        enable_thinking=tuned.enable_thinking,
        tuned=tuned,
        base=base_model,
        settings=settings,
        cli=cli,
        force=force,
        notes=notes,
        kind=kind,
        reward=reward,
    )


def build_eval_config(
    plan: EvalPlan, model: ModelTarget, output_dir: Path, predict: bool
) -> dict[str, Any]:
    """The LLaMA-Factory config of one evaluation run: do_eval (loss) or do_predict (generation)."""
    s = plan.settings
    cfg: dict[str, Any] = {"model_name_or_path": model.model_path}
    if model.adapter_path:
        cfg["adapter_name_or_path"] = model.adapter_path
    cfg.update(
        stage="sft",
        do_train=False,
        finetuning_type="lora" if model.adapter_path else "full",
        eval_dataset=plan.dataset_name,
        dataset_dir=str(plan.dataset_dir),
        template=plan.template,
        default_system=plan.default_system,
    )
    if plan.enable_thinking is not None:
        cfg["enable_thinking"] = plan.enable_thinking
    cfg["cutoff_len"] = s["cutoff_len"]
    for key in ("max_samples", "media_dir", "image_max_pixels", "image_min_pixels"):
        if s.get(key):
            cfg[key] = s[key]
    cfg.update(
        overwrite_cache=True,
        output_dir=str(output_dir),
        report_to="none",
        per_device_eval_batch_size=s["per_device_eval_batch_size"],
        bf16=s["bf16"],
    )
    if predict:
        cfg.update(
            do_predict=True,
            predict_with_generate=True,
            do_sample=False,
            max_new_tokens=s["max_new_tokens"],
        )
    else:
        cfg.update(do_eval=True, compute_accuracy=True)
    return cfg


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def perplexity(loss: float | None) -> float | None:
    """exp(loss); None for a missing loss, inf where it overflows."""
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _loss_row(model: ModelTarget, results: dict[str, Any]) -> dict[str, Any]:
    loss = results.get("eval_loss")
    return {
        **model.to_dict(),
        "eval_loss": loss,
        "perplexity": perplexity(loss),
        "token_accuracy": results.get("eval_accuracy"),
        "runtime_s": results.get("eval_runtime"),
    }


def build_report(plan: EvalPlan, raw: Path, took_s: float) -> dict[str, Any]:
    """eval.json's content from the files the LLaMA-Factory runs left under raw/."""
    models = {
        "fine-tuned": _loss_row(plan.tuned, _read_json(raw / "tuned-eval" / "eval_results.json"))
    }
    if plan.base is not None:
        models["base"] = _loss_row(plan.base, _read_json(raw / "base-eval" / "eval_results.json"))
    pred = _read_json(raw / "tuned-predict" / "predict_results.json")
    generation = {k: pred.get(f"predict_{k}") for k in GEN_METRICS}
    generation.update(
        model="fine-tuned",
        predictions=PREDICTIONS,
        max_new_tokens=plan.settings["max_new_tokens"],
        runtime_s=pred.get("predict_runtime"),
    )
    tuned_loss, base_loss = (
        models["fine-tuned"]["eval_loss"],
        (models.get("base") or {}).get("eval_loss"),
    )
    delta = (
        tuned_loss - base_loss
        if isinstance(tuned_loss, int | float) and isinstance(base_loss, int | float)
        else None
    )
    return {
        "qwenft_version": __version__,
        "created": now_iso(),
        "target": plan.spec,
        "run_dir": str(plan.run_dir) if plan.run_dir else None,
        "template": plan.template,
        "data": {
            "path": str(plan.data_path),
            "sha256": plan.sha256,
            "samples": plan.n_samples,
            "dataset": plan.dataset_name,
        },
        "settings": plan.settings,
        "models": models,
        "loss_change": delta,
        "generation": generation,
        "notes": plan.notes,
        "wall_s": round(took_s, 1),
    }


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if spec == "ppl":
        return f"{value:.4g}" if value < 1e6 else f"{value:.3e}"
    return format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """The report as a short markdown table (eval.md and what `qwenft eval` prints)."""
    if report.get("kind", DataKind.SFT.value) != DataKind.SFT.value:
        return format_score_table(report)
    gen = report["generation"]
    data = report["data"]
    lines = [
        f"# Evaluation of {report['target']}",
        "",
        f"Data: {data['path']} ({data['samples']} samples, sha256 {data['sha256'][:12]}), "
        f"template {report['template']}.",
        "",
        "| model | eval loss | perplexity | token acc. | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role, row in report["models"].items():
        g = gen if gen.get("model") == role else {}
        acc = row.get("token_accuracy")
        cells = [
            f"{role} ({row['source']})",
            _fmt(row["eval_loss"], ".4f"),
            _fmt(row["perplexity"], "ppl"),
            _fmt(acc * 100 if isinstance(acc, int | float) else None, ".1f"),
            *(_fmt(g.get(k), ".2f") for k in GEN_METRICS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report.get("loss_change") is not None:
        change = report["loss_change"]
        lines.append(
            f"Eval loss {'fell' if change < 0 else 'rose'} by {abs(change):.4f} against the base model."
        )
    lines.append(
        f"BLEU-4 and ROUGE (0-100) compare greedy answers (at most {gen['max_new_tokens']} new tokens) "
        f"with the references; predictions: {gen['predictions']}."
    )
    for note in report.get("notes") or []:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def execute_eval(
    plan: EvalPlan, progress: Callable[[str], None] = print, *, verbose: bool = False
) -> dict[str, Any]:
    """Run the evaluation jobs in a staging folder, write the report, rename it into place.
    LLaMA-Factory's output goes to plan.log_path (and to stderr too when `verbose`). A run folder
    is locked meanwhile: evaluating a run that is still training is refused."""
    with RunLock(plan.run_dir, "eval") if plan.run_dir else contextlib.nullcontext():
        if plan.scored:
            return _score_locked(plan, progress)
        return _eval_locked(plan, progress, verbose)


def _eval_locked(plan: EvalPlan, progress: Callable[[str], None], verbose: bool) -> dict[str, Any]:
    for model in (plan.tuned, plan.base):
        if model is not None:
            model.ensure_built(progress)
    registry.register_dataset(plan.data_path, plan.dataset_name, plan.dataset_dir)
    for note in plan.notes:
        progress(f"note: {note}")
    with staged_dir(plan.out_dir, replace=plan.force, hint=REPLACE_HINT) as stage:
        started = time.monotonic()
        plan.log_path.write_bytes(b"")
        jobs = plan.jobs(stage / "raw")
        progress(
            f"measuring {min(plan.n_samples, plan.settings.get('max_samples') or plan.n_samples)} "
            f"samples of {plan.data_path.name}; log: {plan.log_path}"
            + ("" if verbose else " (-v shows it here too)")
        )
        for i, (name, model, cfg) in enumerate(jobs, 1):
            what = "generation metrics" if cfg.get("do_predict") else "eval loss"
            role = "fine-tuned" if model is plan.tuned else "base"
            progress(f"[{i}/{len(jobs)}] {what} of the {role} model ({model.source}) ...")
            yaml_path = stage / "raw" / f"{name}.yaml"
            atomic_write_text(yaml_path, render.to_yaml(cfg, header=f"qwenft eval: {name}"))
            argv = [plan.cli, "train", str(yaml_path)]
            env = lf_launcher.offline_env(model.model_kind)
            job_started = time.monotonic()
            code = launcher.run(
                argv, env, plan.log_path, cwd=stage, echo=launcher.child_echo(verbose)
            )
            if code == 0:
                progress(f"[{i}/{len(jobs)}] done in {time.monotonic() - job_started:.0f} s")
            if code != 0:
                surface_log(plan.log_path, progress)
                raise JobFailed(
                    f"llamafactory-cli ({name}) exited with code {code}",
                    f"read the log: {plan.log_path}",
                    returncode=code,
                )
        predictions = stage / "raw" / "tuned-predict" / "generated_predictions.jsonl"
        if not predictions.is_file():
            raise JobFailed(
                "the prediction run wrote no generated_predictions.jsonl",
                f"read the log: {plan.log_path}",
            )
        os.replace(predictions, stage / PREDICTIONS)
        report = build_report(plan, stage / "raw", time.monotonic() - started)
        if report["models"]["fine-tuned"]["eval_loss"] is None:
            raise JobFailed(
                "the evaluation run reported no eval_loss", f"read the log: {plan.log_path}"
            )
        atomic_write_json(stage / REPORT_JSON, report)
        atomic_write_text(stage / REPORT_MD, format_table(report))
    return _recorded(plan, report)


# --- preference, kto and pt data: log-probabilities in-process (qwenft.scoring) -----------------

# The count each scorer returns, and the per-model numbers each kind's report row shows.
_SCORED_COUNT = {"preference": "pairs", "kto": "samples", "pt": "texts"}


def build_score_report(plan: EvalPlan, result: dict[str, Any], took_s: float) -> dict[str, Any]:
    """eval.json's content for a scored kind, from what qwenft.scoring returned (without rows)."""
    models = {"fine-tuned": {**plan.tuned.to_dict(), **(result["tuned"] or {})}}
    if plan.base is not None and result.get("start") is not None:
        models["base"] = {**plan.base.to_dict(), **result["start"]}
    count_key = _SCORED_COUNT[plan.kind]
    data: dict[str, Any] = {
        "path": str(plan.data_path),
        "sha256": plan.sha256,
        "samples": plan.n_samples,
        "scored": result[count_key],
    }
    if plan.kind == DataKind.KTO.value:
        data.update(desirable=result["desirable"], undesirable=result["undesirable"])
    summary = {
        k: v
        for k, v in result.items()
        if k not in ("tuned", "start", "rows", count_key, "desirable", "undesirable")
    }
    return {
        "qwenft_version": __version__,
        "created": now_iso(),
        "target": plan.spec,
        "run_dir": str(plan.run_dir) if plan.run_dir else None,
        "template": plan.template,
        "kind": plan.kind,
        "reward_model": plan.reward,
        "data": data,
        "settings": plan.settings,
        "models": models,
        **summary,
        "scores": SCORES,
        "notes": plan.notes,
        "wall_s": round(took_s, 1),
    }


def _signed(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, "+" + spec)


def format_score_table(report: dict[str, Any]) -> str:
    """The markdown of a preference, kto or pt report."""
    kind, data = report["kind"], report["data"]
    unit = {"preference": "pairs", "kto": "answers", "pt": "texts"}[kind]
    lines = [
        f"# Evaluation of {report['target']}",
        "",
        f"Data: {data['path']} ({kind}, {data['scored']} {unit} scored of {data['samples']}, "
        f"sha256 {data['sha256'][:12]}), template {report['template']}.",
        "",
    ]
    if report.get("reward_model"):
        head = ["mean margin", "chosen scored higher", "score(chosen)", "score(rejected)"]
        cols = [
            ("mean_margin", ".3f"),
            ("accuracy", "%"),
            ("mean_chosen_score", ".3f"),
            ("mean_rejected_score", ".3f"),
        ]
    elif kind == DataKind.PREFERENCE.value:
        head = ["mean margin", "margin > 0", "log p(chosen)", "log p(rejected)"]
        cols = [
            ("mean_margin", ".3f"),
            ("accuracy", "%"),
            ("mean_chosen_logp", ".3f"),
            ("mean_rejected_logp", ".3f"),
        ]
    elif kind == DataKind.KTO.value:
        head = ["log p(desirable)", "log p(undesirable)", "gap"]
        cols = [("desirable_logp", ".3f"), ("undesirable_logp", ".3f"), ("gap", ".3f")]
    else:
        head = ["perplexity", "NLL per token", "tokens"]
        cols = [("perplexity", "ppl"), ("nll", ".4f"), ("tokens", "d")]
    lines += [
        "| model | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for role, row in report["models"].items():
        cells = [f"{role} ({row['source']})"]
        for key, spec in cols:
            value = row.get(key)
            if spec == "%":
                cells.append("-" if value is None else f"{value * 100:.1f}%")
            else:
                cells.append(_fmt(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report.get("reward_model"):
        lines.append(
            "Margin = score(chosen) - score(rejected), a score being the value head's output at "
            "the sequence's last token, as LLaMA-Factory's reward trainer scores it; per-pair "
            f"scores: {report['scores']}."
        )
    elif kind == DataKind.PREFERENCE.value:
        acc, margin = report.get("reward_accuracy"), report.get("reward_margin")
        if acc is not None:
            n = data["scored"]
            lines.append(
                f"Reward accuracy {acc * 100:.1f}% ({round(acc * n)} of {n} pairs: the fine-tuned "
                f"model prefers chosen by more than the base model does); reward margin "
                f"{_signed(margin)} (mean of fine-tuned minus base margin)."
            )
        lines.append(
            "Margin = log p(chosen) - log p(rejected), each summed over the answer's tokens as "
            f"LLaMA-Factory's DPO trainer does; per-pair scores: {report['scores']}."
        )
    elif kind == DataKind.KTO.value:
        if report.get("shift_gap") is not None:
            lines.append(
                f"Against the base model, desirable answers' log p moved by "
                f"{_signed(report['desirable_shift'])} and undesirable ones' by "
                f"{_signed(report['undesirable_shift'])}: a difference of "
                f"{_signed(report['shift_gap'])} ({data['desirable']} desirable, "
                f"{data['undesirable']} undesirable)."
            )
        lines.append(
            "log p is summed over each answer's tokens as LLaMA-Factory's KTO trainer does; "
            f"per-answer scores: {report['scores']}."
        )
    else:
        change = report.get("perplexity_change")
        if change is not None:
            lines.append(
                f"Perplexity {'fell' if change < 0 else 'rose'} by {abs(change):.4g} against the "
                "base model."
            )
        lines.append(
            "Perplexity = exp(mean negative log-likelihood per token) over every predicted token "
            f"of the texts (cut at cutoff_len, no packing); per-text scores: {report['scores']}."
        )
    for note in report.get("notes") or []:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def _score_locked(plan: EvalPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    from qwenft import scoring

    for model in (plan.tuned, plan.base):
        if model is not None:
            model.ensure_built(progress)
    for note in plan.notes:
        progress(f"note: {note}")
    s = plan.settings
    with staged_dir(plan.out_dir, replace=plan.force, hint=REPLACE_HINT) as stage:
        started = time.monotonic()
        n = min(plan.n_samples, s.get("max_samples") or plan.n_samples)
        progress(f"scoring {n} {plan.kind} samples of {plan.data_path.name}")
        score = (
            functools.partial(scoring.reward_scores, kind=plan.kind)
            if plan.reward
            else functools.partial(scoring.SCORERS[plan.kind], start=plan.base)
        )
        result = score(
            plan.tuned,
            path=plan.data_path,
            template=plan.template,
            default_system=plan.default_system,
            enable_thinking=plan.enable_thinking,
            cutoff_len=s["cutoff_len"],
            max_samples=s.get("max_samples"),
            batch_size=s["batch_size"],
            progress=progress,
        )
        rows = result.pop("rows")
        atomic_write_text(stage / SCORES, score_lines(rows))
        report = build_score_report(plan, result, time.monotonic() - started)
        atomic_write_json(stage / REPORT_JSON, report)
        atomic_write_text(stage / REPORT_MD, format_table(report))
    return _recorded(plan, report)


def _recorded(plan: EvalPlan, report: dict[str, Any]) -> dict[str, Any]:
    """Record the report (now in place) as the run's last eval; return it with its folder."""
    if plan.run_dir is not None:
        update_manifest(
            plan.run_dir,
            last_eval={"report": str(plan.out_dir / REPORT_JSON), "at": report["created"]},
        )
    report["report_dir"] = str(plan.out_dir)
    return report


# --- qwenft score: a reward model's scores of a file ------------------------------------------

DEFAULT_SCORE_BATCH = 8  # sequences per forward


@dataclass
class ScorePlan:
    target: ModelTarget
    data_path: Path
    kind: str  # sft (conversations) or preference (pairs)
    settings: dict[str, Any]  # cutoff_len, batch_size, max_samples
    output: Path | None  # the per-row scores' file (None: the caller prints them)


def plan_score(
    spec: str,
    data: Path,
    *,
    output: Path | None = None,
    force: bool = False,
    knobs: Mapping[str, Any] | None = None,
    template: str | None = None,
    thinking: str = Thinking.AUTO.value,
) -> ScorePlan:
    """Check every input; raise QwenftError (writing nothing) when scoring cannot work. `knobs`:
    the score options of the knob table (cutoff_len, per_device_eval_batch_size, max_samples)."""
    chosen = KnobValues(knobs)
    raise_all(out_of_range(chosen, command=SCORE))
    report = check.require_valid(Path(data).expanduser(), "nothing was scored", kind=None)
    if report.kind not in (DataKind.SFT.value, DataKind.PREFERENCE.value):
        raise QwenftError(
            f"{report.path.name} holds {report.kind} data: a reward model scores conversations "
            "(messages ending with an assistant turn) or chosen/rejected pairs; nothing was scored",
            "docs/data.md shows both shapes",
        )
    if report.has_images:
        raise QwenftError(
            f"{report.path.name} holds images: qwenft trains and scores text reward models only",
            "keep the image rows out",
        )
    target = resolve_target(spec, None, template, force)
    value_head_path(target)  # QwenftError: not a reward model
    own = target.manifest.enable_thinking if target.manifest else target.enable_thinking
    target.enable_thinking = thinking_mode(own, thinking, force)
    cutoff = chosen.get("cutoff_len")
    if cutoff is None and target.run_dir is not None:
        cutoff = _run_train_config(target.run_dir).get("cutoff_len")
    out = Path(output).expanduser().absolute() if output else None
    if out is not None and not force:
        refuse_existing(out, "pass --force to replace it, or another --output")
    return ScorePlan(
        target=target,
        data_path=report.path.resolve(),
        kind=report.kind,
        settings={
            "cutoff_len": int(cutoff or run_settings.default_cutoff_len()),
            "batch_size": chosen.get("per_device_eval_batch_size", DEFAULT_SCORE_BATCH),
            "max_samples": chosen.get("max_samples"),
        },
        output=out,
    )


def execute_score(plan: ScorePlan, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The file's scores (qwenft.scoring.reward_scores), the rows written to plan.output
    (atomically) when there is one."""
    from qwenft import scoring

    plan.target.ensure_built(progress)
    s = plan.settings
    result = scoring.reward_scores(
        plan.target,
        plan.data_path,
        plan.kind,
        template=plan.target.template,
        default_system=plan.target.system,
        enable_thinking=plan.target.enable_thinking,
        cutoff_len=s["cutoff_len"],
        max_samples=s.get("max_samples"),
        batch_size=s["batch_size"],
        progress=progress,
    )
    if plan.output is not None:
        atomic_write_text(plan.output, score_lines(result["rows"]))
    return result


def score_lines(rows: list[dict[str, Any]]) -> str:
    """Per-row scores as JSON lines."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def score_summary(result: dict[str, Any]) -> str:
    """One line: what `qwenft score` found."""
    t = result["tuned"]
    if "pairs" in result:
        n = result["pairs"]
        return (
            f"{n} pairs: chosen scored higher in {round(t['accuracy'] * n)} ({t['accuracy']:.1%}), "
            f"mean margin {t['mean_margin']:+.3f} (chosen {t['mean_chosen_score']:.3f}, "
            f"rejected {t['mean_rejected_score']:.3f})"
        )
    return (
        f"{result['conversations']} conversations: mean score {t['mean_score']:.3f} "
        f"(min {t['min_score']:.3f}, max {t['max_score']:.3f})"
    )
