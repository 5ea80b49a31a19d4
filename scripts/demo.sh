#!/usr/bin/env bash
# The main job on the embedded default: LoRA fine-tune of tiny-qwen2 on data/sample_chat.jsonl,
# merge the adapter, and print one chat answer. Runs in about a minute on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
QWENFT=${QWENFT:-.venv/bin/qwenft}
RUN=runs/demo-$(date +%Y%m%d-%H%M%S)

# lr and steps sized so the 10M-parameter tiny model shows its loss falling within a minute of training.
"$QWENFT" train --model tiny-qwen2 --method lora --data data/sample_chat.jsonl --output-dir "$RUN" \
  --max-steps 60 --lr 5e-3 --batch-size 4 --grad-accum 1 --lora-rank 32 --cutoff-len 256 --val-size 0 \
  --set lora_alpha=64 --set lr_scheduler_type=constant --set warmup_ratio=0 --set logging_steps=10 \
  --set save_steps=1000
"$QWENFT" merge "$RUN"
echo
echo "Q: What is the capital of France?"
echo -n "A: "
"$QWENFT" chat "$RUN" --prompt "What is the capital of France?" --max-new-tokens 40
"$QWENFT" runs
