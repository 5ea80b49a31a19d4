"""Reward models (issue 27): `train --stage rm`, `qwenft score`, `eval` of a reward run, its merge,
and the stage refused with its reason (ppo).

The command-building tests use the recording llamafactory-cli; the end-to-end ones share the
session's reward model (conftest.rm_run: a LoRA with LLaMA-Factory's value head on tiny-qwen2)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from qwenft.runs.manifest import MANIFEST
from tests.helpers.builders import pair_rows, read_calls, run_manifest, write_jsonl
from tests.helpers.cli import dry_run, invoke


@pytest.mark.parametrize("stage", ["ppo"])
def test_unsupported_stages_are_refused_with_the_reason_and_nothing_is_written(
    stage: str, fake_cli: Path, tmp_path: Path
) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    run = tmp_path / "runs" / "r"
    result = invoke("train", "--model", "tiny-qwen2", "--data", pairs, "--stage", stage, "-o", run)
    assert result.exit_code == 2, result.output
    assert f"--stage {stage} is not supported" in result.output
    assert "--stage dpo" in result.output  # what to use instead
    assert "--stage grpo" in result.output
    reason = {"ppo": "trl <= 0.9.6"}[stage]
    assert reason in result.output
    assert not run.exists() and not read_calls(fake_cli)


@pytest.mark.usefixtures("no_token_stats")
def test_rm_renders_lf_rm_stage_and_refuses_what_it_would_ignore(
    local_model: Path, tmp_path: Path
) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg, _, result = dry_run("--model", local_model, "--data", pairs, "--stage", "rm")
    assert cfg["stage"] == "rm" and cfg["train_sampling_strategy"] == "random"
    assert "pref_beta" not in cfg and "pref_loss" not in cfg
    assert "rm lora fine-tune of" in result.output
    for args, message in [
        (("--beta", "0.2"), "does nothing for --stage rm"),
        (("--set", "load_best_model_at_end=true"), "RM and PPO stages do not support"),
    ]:
        bad = invoke(
            "train", "--model", local_model, "--data", pairs, "--stage", "rm", *args, "--dry-run"
        )
        assert bad.exit_code == 2 and message in bad.output, bad.output
    # a reward model trains on pairs: chat data is refused, naming the kind it needs
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    bad = invoke("train", "--model", local_model, "--data", chat, "--stage", "rm", "--dry-run")
    assert bad.exit_code == 2 and "preference pairs" in bad.output, bad.output


def test_merge_config_of_a_reward_model_keeps_its_value_head() -> None:
    from qwenft.lf.render import build_merge_config

    args = ("/m", "/run", "qwen", "You are a helpful assistant.", "/out")
    assert build_merge_config(*args, reward=True)["stage"] == "rm"  # LLaMA-Factory copies the head
    assert "stage" not in build_merge_config(*args)


def _fake_run(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(run_manifest(status="completed", **changes).to_json())
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_a_reward_run_generates_nothing_and_score_needs_a_reward_model(tmp_path: Path) -> None:
    reward = _fake_run(tmp_path / "rm", stage="rm")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    for args, doing in [
        (("chat", reward), "cannot chat"),
        (("serve", reward), "cannot serve chat completions"),
        (("export", reward), "cannot become a GGUF"),
        (("train", "--from", reward, "--data", pairs, "--stage", "dpo"), "start of a later stage"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "is a reward model (--stage rm)" in result.output and doing in result.output
        assert f"qwenft score {reward} FILE" in result.output
    lora = _fake_run(tmp_path / "lora")
    result = invoke("score", lora, pairs)
    assert result.exit_code == 2 and "has no value head" in result.output, result.output
    # a kind a reward model does not score is refused before any model loads
    text = write_jsonl(tmp_path / "pt.jsonl", [{"text": "a document"}])
    result = invoke("score", reward, text)
    assert result.exit_code == 2 and "holds pt data" in result.output, result.output
    # --output is never overwritten without --force
    out = tmp_path / "scores.jsonl"
    out.write_text("kept\n")
    result = invoke("score", reward, pairs, "--output", out)
    assert result.exit_code == 2 and out.read_text() == "kept\n", result.output


# --- end to end: the session's reward model ------------------------------------------------------


def _scores(result_stdout: str) -> list[dict]:
    return [json.loads(line) for line in result_stdout.splitlines() if line.strip()]


def test_reward_model_ranks_held_out_pairs(rm_run: Path, e2e_home, tmp_path: Path) -> None:
    from tests.helpers.e2e import losses, manifest

    m = manifest(rm_run)
    assert m["status"] == "completed" and m["stage"] == "rm"
    assert (rm_run / "value_head.safetensors").is_file()
    curve = losses(rm_run)
    assert curve[-1] < curve[0] / 10, curve  # the pairwise loss starts near log 2
    assert "next: qwenft score" in (rm_run.parent / "rm.stderr").read_text()
    held = rm_run.parents[2] / "rm-held.jsonl"

    # qwenft score: one line per pair, on stdout; the summary on stderr
    out = e2e_home("score", rm_run, held)
    rows = _scores(out.stdout)
    assert [r["line"] for r in rows] == list(range(1, 17))
    assert all(math.isclose(r["margin"], r["chosen"] - r["rejected"]) for r in rows)
    accuracy = sum(r["margin"] > 0 for r in rows) / len(rows)
    assert accuracy >= 0.9, rows
    assert "16 pairs: chosen scored higher in" in out.stderr

    # the same scores as LLaMA-Factory's own value-head model (trl's, as its trainer and API load
    # it) on the very tokens, and better than the untrained head it started from
    lf, untrained = _lf_and_untrained_scores(rm_run, held, tmp_path)
    mine = [s for r in rows for s in (r["chosen"], r["rejected"])]
    assert max(abs(a - b) for a, b in zip(mine, lf, strict=True)) < 1e-3
    assert accuracy > untrained + 0.25, (accuracy, untrained)

    # eval of the run: the same numbers, in a report; the held-out pairs are its own kind
    ev = e2e_home("eval", rm_run, "--data", held, "-o", tmp_path / "eval", "--json")
    report = json.loads(ev.stdout)
    assert report["reward_model"] is True and list(report["models"]) == ["fine-tuned"]
    tuned = report["models"]["fine-tuned"]
    assert tuned["accuracy"] == accuracy
    assert math.isclose(tuned["mean_margin"], sum(r["margin"] for r in rows) / 16, rel_tol=1e-6)
    assert "chosen scored higher" in (tmp_path / "eval" / "eval.md").read_text()

    # it generates nothing: chat refuses the real run too
    chat = e2e_home("chat", rm_run, "--prompt", "hi", check=False)
    assert chat.returncode == 2 and "is a reward model" in chat.stderr


def _lf_and_untrained_scores(run: Path, held: Path, work: Path) -> tuple[list[float], float]:
    """The held-out pairs' scores (chosen, rejected, ...) under LLaMA-Factory's value-head model
    of the run, and the mean pairwise accuracy of 8 untrained heads (trl's ValueHead init: a
    fresh nn.Linear) over the base model - the start of training, whose LoRA is the identity."""
    import torch
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer
    from transformers import AutoModelForCausalLM

    from qwenft import scoring
    from qwenft.models.target import resolve_target

    target = resolve_target(str(run))
    encoded = scoring._prepare(
        target, held, "preference", target.template, target.system, None, 128, None
    )
    sides = [side for _, _, pair in encoded for side in pair]
    model_args, _, finetuning_args, _ = get_infer_args(
        {
            "model_name_or_path": target.model_path,
            "adapter_name_or_path": target.adapter_path,
            "template": "qwen",
            "stage": "rm",
            "finetuning_type": "lora",
            "infer_dtype": "float32",
        }
    )
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    model = load_model(tokenizer, model_args, finetuning_args, add_valuehead=True).eval()
    lf = []
    with torch.no_grad():
        for _, ids, _ in sides:
            values = model(input_ids=torch.tensor([ids]), use_cache=False, return_dict=True)[-1]
            lf.append(float(values[0, -1]))
        # LLaMA-Factory merged the adapter for inference: the start of training is the base
        base = AutoModelForCausalLM.from_pretrained(target.model_path, dtype=torch.float32)
        last = torch.stack(
            [
                base(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][
                    0, -1
                ]
                for _, ids, _ in sides
            ]
        )
    accuracies = []
    for seed in range(8):
        torch.manual_seed(seed)
        head = torch.nn.Linear(last.shape[-1], 1)
        with torch.no_grad():
            values = head(last).squeeze(-1)
        accuracies.append(float((values[0::2] > values[1::2]).float().mean()))
    return lf, sum(accuracies) / len(accuracies)


def test_reward_model_merges_with_its_value_head(rm_run: Path, e2e_home, tmp_path: Path) -> None:
    from tests.helpers.e2e import copy_run

    run = copy_run(rm_run, tmp_path / "rm")
    held = rm_run.parents[2] / "rm-held.jsonl"
    before = _scores(e2e_home("score", run, held).stdout)
    merge = e2e_home("merge", run, "--verify")
    merged = run / "merged"
    assert (merged / "value_head.safetensors").read_bytes() == (
        run / "value_head.safetensors"
    ).read_bytes()
    assert not (merged / "Modelfile").exists()  # no Ollama model file for a model that cannot chat
    assert "no stop check" in merge.stderr and f"next: qwenft score {run}" in merge.stderr
    # the run now scores through its merged model: the same scores
    after = e2e_home("score", run, held, "-o", tmp_path / "s.jsonl")
    assert f"with merged model {merged}" in after.stderr
    rows = _scores((tmp_path / "s.jsonl").read_text())
    worst = max(
        abs(a[k] - b[k]) for a, b in zip(before, rows, strict=True) for k in ("chosen", "rejected")
    )
    assert worst < 1e-3, worst
    # GGUF holds no value head: refused, nothing written
    export = e2e_home("export", run, check=False)
    assert export.returncode == 2 and "cannot become a GGUF" in export.stderr
    assert not (run / "export").exists()
    shutil.rmtree(run)
