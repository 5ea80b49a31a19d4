"""`make demo` visibly learns: scripts/demo.sh itself (its data, steps and seed, which live in the
script only) trains tiny-qwen2, merges, and asks base and tuned model the questions of its data.

The tuned model must rank every token of each trained answer first with a logit margin (so its
greedy answers are the trained ones, on any CPU), answer every question where the base model
does not, and merge's own check must pass (the merged model's greedy answer ends on <|im_end|>).
The demo's own verdict (word for word, exit 1 otherwise) must match what it printed. One
training of 120 steps: about 2 minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.builders import env_without_fake
from tests.helpers.e2e import Qwenft, manifest
from tests.helpers.learning import LM, assert_learned, trained_rows

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"


def test_demo_learns_its_data_and_the_merged_model_stops(qwenft: Qwenft, tmp_path: Path) -> None:
    # the demo calls `qwenft`: this interpreter's, in this test's home (QWENFT_HOME, tiny models)
    shim = tmp_path / "qwenft"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qwenft "$@"\n')
    shim.chmod(0o755)
    run, out = tmp_path / "demo-run", tmp_path / "demo.json"
    env = env_without_fake(  # COLUMNS: the table's width, wide enough for every answer whole
        QWENFT=str(shim),
        PYTHON=sys.executable,
        DEMO_RUN=str(run),
        DEMO_JSON=str(out),
        COLUMNS="160",
    )
    proc = subprocess.run(
        [str(DEMO)], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert out.is_file(), (
        f"demo.sh exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )

    data_file = REPO / "data" / "demo_chat.jsonl"
    data = [json.loads(line) for line in data_file.read_text("utf-8").splitlines()]
    trained = [(row["messages"][-2]["content"], row["messages"][-1]["content"]) for row in data]
    result = json.loads(out.read_text(encoding="utf-8"))
    asked = [(r["question"], r["trained"]) for r in result["rows"]]
    assert asked == trained, "the demo asks every question of its data"
    # the base model (untrained) does not know them; the tuned one answers each
    assert all(r["tuned"] and r["base"] != r["tuned"] for r in result["rows"]), result["rows"]

    # merge's own check passed: the merged model's greedy answer ends on <|im_end|>
    check = manifest(run)["merge_checks"]["generation"]
    assert check["stopped"], check
    assert result["run"]["merge_check"] == check

    # what the training guarantees: the merged model ranks every token of each trained answer
    # first, with a logit margin (greedy answers are then the trained ones on any CPU)
    assert_learned(LM.of_run(run), trained_rows(run, data_file, tmp_path / "lf"))

    # the demo's table and verdict: each tuned answer shown, the count of word-for-word ones, and
    # the exit status that goes with it (1 when one differs or the merge check failed)
    same = sum(r["same"] for r in result["rows"])
    assert f"{same} of {len(trained)} tuned answers are the trained ones" in proc.stdout
    assert proc.returncode == (0 if same == len(trained) else 1), proc.stderr[-4000:]
    for r in result["rows"]:
        assert " ".join(r["tuned"].split()) in proc.stdout
