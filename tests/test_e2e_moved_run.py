"""A run folder travels (trained on a cluster, then rsynced to a laptop): a copy of the session's
trained LoRA run, moved under another name so that the folder it was trained in is gone, is
listed, merged, chatted with and exported where it is now, and every path qwenft prints or records
lies under the new folder (qwenft.runs.manifest: what lies inside a run folder is stored relative
to it, and read against the folder the manifest is read from)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import yaml

from tests.helpers.builders import QA
from tests.helpers.e2e import Qwenft, copy_run, manifest


def test_a_moved_run_lists_merges_chats_and_exports_where_it_is_now(
    lora_run: Path, qwenft: Qwenft, tmp_path: Path
) -> None:
    cluster = copy_run(lora_run, tmp_path / "cluster" / "lora")  # the shared run is only read
    moved = Path("runs/laptop-lora").absolute()  # under ./runs: `qwenft runs` lists it
    moved.parent.mkdir()
    os.rename(cluster, moved)
    assert not cluster.exists()
    old = [str(lora_run), str(cluster)]  # where it was: nothing may point there any more

    def said(out: subprocess.CompletedProcess, *, where: Path) -> None:
        """What a command printed names the folder the run is in now, and none it was in."""
        text = out.stdout + out.stderr
        assert not [p for p in old if p in text], text
        assert str(where) in text, text

    # qwenft runs: the list, and the run itself (its log in the folder it is in now)
    rows = json.loads(qwenft("runs", "--json").stdout)
    [row] = [r for r in rows if r["run_dir"] == str(moved)]
    assert row["status"] == "completed" and row["log"] == str(moved / "train.log")
    shown = qwenft("runs", moved)
    said(shown, where=moved)
    assert f"log: {moved / 'train.log'}" in shown.stdout

    # qwenft merge: into the moved folder, from its own adapter
    merged = qwenft("merge", moved)
    said(merged, where=moved)
    assert merged.stdout.strip() == str(moved / "merged")
    assert (moved / "merged" / "model.safetensors").is_file()
    merge_yaml = yaml.safe_load((moved / "merge.yaml").read_text())
    assert merge_yaml["adapter_name_or_path"] == str(moved)
    assert Path(merge_yaml["export_dir"]).parent == moved  # the staging folder beside merged/
    raw = json.loads((moved / "qwenft.json").read_text())
    assert raw["merged"] == "merged" and raw["log"] == "train.log"

    # moved once more after the merge: the merged model follows the folder
    laptop = tmp_path / "laptop" / "lora2"
    laptop.parent.mkdir()
    os.rename(moved, laptop)
    old.append(str(moved))

    chat = qwenft("chat", laptop, "--prompt", QA[0][0], "--max-new-tokens", 30)
    said(chat, where=laptop)
    assert f"loading merged model {laptop / 'merged'}" in chat.stderr, chat.stderr
    assert chat.stdout.strip()

    if importlib.util.find_spec("llama_cpp") is not None:  # the gguf extra
        gguf = laptop / "export" / "lora2-f16.gguf"
        exported = qwenft("export", laptop, "--format", "gguf")
        said(exported, where=laptop)
        assert exported.stdout.strip() == str(gguf) and gguf.is_file()
        assert "merging first" not in exported.stderr  # its merged/ found where it is now
        [record] = manifest(laptop)["exports"]
        assert (record["file"], record["modelfile"]) == (
            str(gguf),
            str(laptop / "export" / "lora2-f16.Modelfile"),
        )
        raw = json.loads((laptop / "qwenft.json").read_text())
        assert raw["exports"][0]["file"] == "export/lora2-f16.gguf"

    # what the manifest records names no folder the run was in: inside paths are relative
    text = (laptop / "qwenft.json").read_text()
    assert not [p for p in [*old, str(laptop)] if p in text], text
    m = manifest(laptop)  # as qwenft reads it: under the folder it is in now
    assert m["log"] == m["summary"]["log"] == str(laptop / "train.log")
    assert m["merged"] == str(laptop / "merged")
    assert m["summary"]["loss_plot"] == str(laptop / "training_loss.png")
    assert m["command"][-1] == str(laptop / "train.yaml")
    [row] = json.loads(qwenft("runs", "--dir", laptop.parent, "--json").stdout)
    assert (row["run_dir"], row["log"]) == (str(laptop), str(laptop / "train.log"))
