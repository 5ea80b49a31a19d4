"""`make demo` visibly learns: scripts/demo.sh itself (its data, steps and seed, which live in the
script only) trains tiny-qwen2, merges, and asks base and tuned model the questions of its data.

Every tuned answer must be the trained one word for word, and merge's own check must pass (the
merged model's greedy answer ends on <|im_end|>). One training of 120 steps: about 2 minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.builders import env_without_fake
from tests.helpers.e2e import Qwenft, manifest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"


def test_demo_learns_its_data_and_the_merged_model_stops(qwenft: Qwenft, tmp_path: Path) -> None:
    # the demo calls `qwenft`: this interpreter's, in this test's home (QWENFT_HOME, tiny models)
    shim = tmp_path / "qwenft"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qwenft "$@"\n')
    shim.chmod(0o755)
    run, out = tmp_path / "demo-run", tmp_path / "demo.json"
    env = env_without_fake(
        QWENFT=str(shim), PYTHON=sys.executable, DEMO_RUN=str(run), DEMO_JSON=str(out)
    )
    proc = subprocess.run(
        [str(DEMO)], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert proc.returncode == 0, (
        f"demo.sh exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )

    data = [
        json.loads(line)
        for line in (REPO / "data" / "demo_chat.jsonl").read_text("utf-8").splitlines()
    ]
    trained = [(row["messages"][-2]["content"], row["messages"][-1]["content"]) for row in data]
    result = json.loads(out.read_text(encoding="utf-8"))
    asked = [(r["question"], r["trained"]) for r in result["rows"]]
    assert asked == trained, "the demo asks every question of its data"
    assert [r["tuned"] for r in result["rows"]] == [a for _, a in trained]
    assert all(r["base"] != r["tuned"] for r in result["rows"]), "the base model did not know them"

    check = manifest(run)["merge_checks"]["generation"]
    assert check["stopped"], check
    assert check["text"] == trained[0][1]
    assert result["run"]["merge_check"] == check
    assert f"{len(trained)} of {len(trained)} tuned answers are the trained ones" in proc.stdout
    for _, answer in trained:
        assert answer in proc.stdout
