"""The training stages end to end (issue 12) with the real LLaMA-Factory on the tiny Qwen models:
DPO chained from an SFT run, ORPO that teaches the chosen answers, KTO with its labels, pt on a
text corpus, freeze tuning of the last layer only. Each launch costs about 25 s before its first
step, so every run is as short as its proof allows."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.builders import QA, WRONG, chat_rows, pair_rows, write_jsonl
from tests.helpers.e2e import LEARN, Qwenft, copy_run, losses, manifest

# Short runs: every step logged, no checkpoints, no held-out split.
FEW = (
    "--batch-size 4 --grad-accum 1 --cutoff-len 128 --val-size 0 "
    "--set logging_steps=1 --set save_steps=1000 --set lr_scheduler_type=constant "
    "--set warmup_ratio=0"
).split()


def log_history(run: Path) -> list[dict]:
    """The Trainer's training log rows (the stage's own figures are there, not in trainer_log)."""
    state = json.loads((run / "trainer_state.json").read_text())
    return [r for r in state["log_history"] if "loss" in r]


def test_dpo_from_an_sft_run_separates_the_pairs(
    lora_run: Path, qwenft: Qwenft, tmp_path: Path
) -> None:
    sft = copy_run(lora_run, tmp_path / "sft")  # the shared run stays as it is
    qwenft("merge", sft, "--no-check")
    # LLaMA-Factory's dpo_en_demo shape: sharegpt with chosen/rejected turns
    demo = [
        {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": a},
            "rejected": {"from": "gpt", "value": w},
        }
        for (q, a), w in zip(QA, WRONG, strict=True)
    ]
    pairs = tmp_path / "pairs.jsonl"
    qwenft("data", "convert", write_jsonl(tmp_path / "dpo_en_demo.jsonl", demo), "-o", pairs)
    assert [json.loads(x) for x in pairs.read_text().splitlines()] == pair_rows()
    run = tmp_path / "dpo"
    out = qwenft(
        "train", "--stage", "dpo", "--from", sft, "--data", pairs, "-o", run,
        "--max-steps", "10", "--lr", "1e-3", *FEW,
    )
    m = manifest(run)
    assert m["stage"] == "dpo" and m["status"] == "completed"
    assert m["parent_run"] == str(sft) and m["model"]["path"] == str(sft / "merged")
    parent = manifest(sft)
    assert (m["template"], m["default_system"]) == (parent["template"], parent["default_system"])
    rows = log_history(run)
    accuracies = [r["rewards/accuracies"] for r in rows]
    margins = [r["rewards/margins"] for r in rows]
    assert accuracies[-1] == 1.0, accuracies
    assert margins[-1] > margins[0] and margins[-1] > 0, margins
    assert m["summary"]["stage_figures"]["rewards/accuracies"][1] == 1.0
    assert "dpo: rewards/accuracies" in out.stderr
    assert "<- sft" in qwenft("runs", "--dir", tmp_path).stdout


def test_orpo_teaches_the_chosen_answers(qwenft: Qwenft, tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    run = tmp_path / "orpo"
    qwenft(
        "train", "--stage", "orpo", "--model", "tiny-qwen2", "--data", pairs, "-o", run,
        "--max-steps", "80", *LEARN,
    )
    cfg = (run / "train.yaml").read_text()
    assert "stage: dpo" in cfg and "pref_loss: orpo" in cfg
    rows = log_history(run)
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["sft_loss"] < rows[0]["sft_loss"]
    qwenft("merge", run, "--no-check")
    for (question, answer), wrong in zip(QA, WRONG, strict=True):
        said = qwenft("chat", run, "--prompt", question, "--max-new-tokens", "30").stdout.strip()
        assert said == answer, (question, said, wrong)


def test_kto_trains_on_labels_converted_from_llamafactorys_demo_shape(
    qwenft: Qwenft, tmp_path: Path
) -> None:
    # LLaMA-Factory's kto_en_demo: sharegpt conversations with a boolean kto_tag
    demo = [
        {
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}],
            "kto_tag": tag,
        }
        for (q, a), w in zip(QA, WRONG, strict=True)
        for answer, tag in ((a, True), (w, False))
    ]
    src = write_jsonl(tmp_path / "kto_en_demo.jsonl", demo)
    data = tmp_path / "kto.jsonl"
    qwenft("data", "convert", src, "-o", data)
    qwenft("data", "check", data)
    run = tmp_path / "kto"
    out = qwenft(
        "train", "--stage", "kto", "--model", "tiny-qwen2", "--data", data, "-o", run,
        "--max-steps", "3", "--lr", "1e-3", *FEW,
    )
    rows = log_history(run)
    # both labels reached LLaMA-Factory's KTO trainer: it logs each side and the KL term
    assert all("kl" in r for r in rows), rows
    assert any("rewards/chosen" in r for r in rows) and any("rewards/rejected" in r for r in rows)
    assert manifest(run)["stage"] == "kto" and "kto: " in out.stderr


def test_pt_on_a_text_corpus_lowers_the_loss(qwenft: Qwenft, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(a for _ in range(12) for _, a in QA) + "\n", encoding="utf-8")
    run = tmp_path / "pt"
    out = qwenft(
        "train", "--stage", "pt", "--model", "tiny-qwen2", "--data", corpus, "-o", run,
        "--max-steps", "12", "--lr", "5e-3", *FEW[:4], "--cutoff-len", "32", *FEW[6:],
    )
    assert "packed into" in out.stderr
    curve = losses(run)
    assert curve[-1] < curve[0] / 2, curve
    assert (run / "data.pt.jsonl").is_file() and manifest(run)["overlength"]["blocks"] > 4


def test_freeze_trains_only_the_last_layers(qwenft: Qwenft, tmp_path: Path, tiny_home: Path) -> None:
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    run = tmp_path / "freeze"
    out = qwenft(
        "train", "--method", "freeze", "--trainable-layers", "1", "--model", "tiny-qwen2",
        "--data", data, "-o", run, "--max-steps", "3", "--lr", "1e-3", *FEW,
    )
    assert "next: qwenft chat" in out.stderr
    base = load_file(str(tiny_home / "models" / "tiny-qwen2" / "model.safetensors"))
    tuned = load_file(str(run / "model.safetensors"))
    assert base.keys() == tuned.keys()
    layers = 1 + max(int(k.split(".")[2]) for k in base if k.startswith("model.layers."))
    last = f"model.layers.{layers - 1}."
    changed = {k for k in base if not base[k].to(tuned[k].dtype).equal(tuned[k])}
    assert changed and all(k.startswith(last) for k in changed), sorted(changed)
    assert {k for k in base if k.startswith(last) and k.endswith(".weight")} & changed
