#!/usr/bin/env python3
"""A stand-in for llamafactory-cli in unit tests of command building: it records argv, the
variables of the environment named in $FAKE_LF_VARS and the YAML it was given into $FAKE_LF_RECORD (JSON lines), writes the files a real
run would leave behind, prints $FAKE_LF_SAY (if set) and exits with $FAKE_LF_EXIT (default 0).

- `train` with do_train (the default): trainer_log.jsonl, all_results.json, trainer_state.json
  (its log_history with rewards/accuracies and rewards/margins for the dpo and kto stages; and
  adapter_config.json for LoRA) in output_dir;
- `train` with do_train: false (what `qwenft eval` launches): eval_results.json (eval_loss 0.5
  with an adapter, 2.0 without) or, with do_predict, predict_results.json and
  generated_predictions.jsonl;
- `export`: a merged model's files in export_dir.

It proves nothing about training: the end-to-end tests drive the real LLaMA-Factory."""

import json
import os
import sys
from pathlib import Path

import yaml

argv = sys.argv[1:]
cfg = yaml.safe_load(Path(argv[1]).read_text()) if len(argv) > 1 else {}
keys = os.environ["FAKE_LF_VARS"].split(",")  # the variables to record (conftest)
record = {"argv": argv, "env": {k: os.environ[k] for k in keys if k in os.environ}, "yaml": cfg}
with open(os.environ["FAKE_LF_RECORD"], "a") as fh:
    fh.write(json.dumps(record) + "\n")
print("fake llamafactory-cli", " ".join(argv), flush=True)
if os.environ.get("FAKE_LF_SAY"):  # what a failing run would print (the log scan's input)
    print(os.environ["FAKE_LF_SAY"], flush=True)
code = int(os.environ.get("FAKE_LF_EXIT", "0"))
if code == 0 and argv and argv[0] == "train" and cfg.get("do_train", True) is False:
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("do_predict"):
        scores = {"bleu-4": 50.0, "rouge-1": 60.0, "rouge-2": 40.0, "rouge-l": 55.0}
        (out / "predict_results.json").write_text(
            json.dumps({f"predict_{k}": v for k, v in scores.items()})
        )
        (out / "generated_predictions.jsonl").write_text(
            json.dumps({"prompt": "p", "predict": "a", "label": "a"}) + "\n"
        )
    else:
        loss = 0.5 if cfg.get("adapter_name_or_path") else 2.0
        (out / "eval_results.json").write_text(
            json.dumps({"eval_loss": loss, "eval_accuracy": 0.25})
        )
elif code == 0 and argv and argv[0] == "train":
    out = Path(cfg["output_dir"])
    with open(out / "trainer_log.jsonl", "w") as fh:
        for step, loss in ((1, 4.0), (2, 2.0)):
            fh.write(json.dumps({"current_steps": step, "total_steps": 2, "loss": loss}) + "\n")
    (out / "all_results.json").write_text(
        json.dumps({"train_loss": 3.0, "effective_tokens_per_sec": 123.0})
    )
    history = [{"step": step, "loss": loss} for step, loss in ((1, 4.0), (2, 2.0))]
    if cfg.get("stage") in ("dpo", "kto"):  # the preference trainers' own figures
        for row, acc, margin in zip(history, (0.5, 1.0), (0.25, 1.5), strict=True):
            row.update({"rewards/accuracies": acc, "rewards/margins": margin})
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": history}))
    if cfg.get("finetuning_type") == "lora":
        (out / "adapter_config.json").write_text("{}")
if code == 0 and argv and argv[0] == "export":
    out = Path(cfg["export_dir"])
    (out / "model.safetensors").write_bytes(b"0")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
sys.exit(code)
