#!/usr/bin/env bash
# `make demo`: the main job on the embedded default, end to end: about 80 s on a quiet 2-core CPU
# (training 34 s of it), 2 min with other jobs beside it.
#   1. LoRA fine-tune of tiny-qwen2 (docs/tiny-models.md) on data/demo_chat.jsonl, four
#      question/answer rows, until it has learned them (120 steps, seed 42: the same run every time);
#   2. merge the adapter into the base model; merge's own check must pass: the merged model's
#      greedy answer to the first trained question stops on <|im_end|>;
#   3. ask the base model and the tuned one every question of the data (scripts/demo_compare.py)
#      and print a table, one line a question: the base model's answer (only newlines: it is
#      untrained) beside the tuned one's, which is the trained answer word for word.
# Exit 1 when a tuned answer differs or the merge check fails. tests/test_demo.py runs this very
# script (the settings live here only) and checks the same.
#
# Environment: QWENFT (the qwenft command, default .venv/bin/qwenft), PYTHON (default: the python
# beside it), DEMO_RUN (the run folder, default runs/demo-<time>), DEMO_JSON (also write the
# results there, for the test), QWENFT_HOME (where the tiny model is built, as for qwenft).
#
# Why these settings: the tiny model has only 65k LoRA parameters to train (rank 32 on a 64-wide,
# 2-layer model), so it memorises a few rows quickly and many rows slowly: four rows take the loss
# from about 19 to about 0.02 in 120 steps (greedy answers are right from about step 80), while
# the 18 rows of data/sample_chat.jsonl stay above loss 12 after 200 steps. lr 5e-3 constant, no
# warm-up, batch 4 (the whole set each step) and LoRA alpha 2x rank are the test suite's LEARN.
set -euo pipefail
cd "$(dirname "$0")/.."
QWENFT=${QWENFT:-.venv/bin/qwenft}
PYTHON=${PYTHON:-$(dirname "$QWENFT")/python}
RUN=${DEMO_RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
DATA=data/demo_chat.jsonl
STEPS=120
SEED=42

"$QWENFT" train --model tiny-qwen2 --method lora --data "$DATA" --output-dir "$RUN" \
  --max-steps "$STEPS" --lr 5e-3 --batch-size 4 --grad-accum 1 --lora-rank 32 --cutoff-len 128 \
  --val-size 0 --set lora_alpha=64 --set lr_scheduler_type=constant --set warmup_ratio=0 \
  --set seed="$SEED"
"$QWENFT" merge "$RUN"
"$PYTHON" scripts/demo_compare.py "$DATA" "$RUN" --base tiny-qwen2 ${DEMO_JSON:+--json "$DEMO_JSON"}
echo
echo "Talk to it yourself: $QWENFT chat $RUN"
