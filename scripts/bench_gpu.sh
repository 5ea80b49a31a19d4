#!/usr/bin/env bash
# The recipe benchmark of issue 7 on a CUDA GPU: the Qwen guide's LoRA recipe (micro-batch 1 x
# gradient accumulation 16, no packing) against qwenft's defaults (configs/lora.yaml: 4 x 4 with
# length-grouped batches, plus flash attention and Liger kernels where they are installed), on
# randomly initialised models of the exact Qwen2.5-0.5B and Qwen2.5-7B shapes (no download: speed
# and memory do not depend on the weight values), with the tiny Qwen tokenizer (real vocabulary).
# Records real (non-padding) tokens/s and peak GPU memory (nvidia-smi, polled) for each side.
#
#   scripts/bench_gpu.sh [--models qwen2.5-0.5b-instruct,qwen2.5-7b-instruct] [--rows 256]
#                        [--out bench-gpu.json] [--work DIR]
#   scripts/bench_gpu.sh --kernels [WORK_DIR]
#   scripts/bench_gpu.sh --quantized [WORK_DIR]
#   scripts/bench_gpu.sh --grpo [WORK_DIR]
#
# --kernels (issue 22): `qwenft train --attn fa2`, `--liger` and `--unsloth` on the tiny model, each
# a --dry-run (the key is in train.yaml) and then 3 training steps whose train.log shows the kernel
# took effect; where its package is missing, qwenft's refusal (exit 2, the package named) is the
# expected result and is reported as such. Exits 1 if any check fails.
# --quantized (issue 22): the same for a LoRA on Qwen's own GPTQ and AWQ releases of
# Qwen2.5-0.5B-Instruct (downloaded from the hub): train.yaml has no quantization_bit of qwenft's
# and LLaMA-Factory's log shows it loaded the base's own quantization.
# --grpo (issue 27): `qwenft train --stage grpo` on the tiny model, 4 steps of 8 completions, with
# transformers' generate and then with --vllm (vLLM colocated in the GRPO process); each side's
# wall time, or qwenft's refusal where vllm is not installed. Exits 1 if a run fails.
#
# On a machine without a CUDA GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

if ! command -v nvidia-smi >/dev/null 2>&1 || \
   ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench_gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False or no nvidia-smi);"
    echo "bench_gpu: nothing to measure. Run it on a machine with an NVIDIA GPU (make setup picks the CUDA install)."
    exit 0
fi

if [ "${1:-}" = "--grpo" ]; then
    WORK="$(realpath -m "${2:-$(mktemp -d -t qwenft-grpo-XXXX)}")"
    mkdir -p "$WORK"
    "$PY" -c '
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Count to {i % 5 + 3}."}]}) + "\n")
' "$WORK/prompts.jsonl"
    fails=0
    for option in "" "--vllm"; do
        name="grpo${option//-/}"
        # shellcheck disable=SC2206  # an empty option adds nothing
        cmd=(-m qwenft train --stage grpo --model tiny-qwen2 --data "$WORK/prompts.jsonl"
             --reward length:8 --max-steps 4 --batch-size 8 --grad-accum 1 --generations 8
             --completion-len 16 --set save_steps=1000 $option -o "$WORK/runs/$name")
        start=$(date +%s)
        if "$PY" "${cmd[@]}" >"$WORK/$name.out" 2>&1; then
            echo "grpo ${option:-generate}: ok in $(( $(date +%s) - start )) s ($(grep -m1 '^grpo:' "$WORK/$name.out"))"
        elif [ -n "$option" ] && grep -q "needs .*vllm package" "$WORK/$name.out"; then
            echo "grpo $option: refused as expected: $(grep -m1 '^error:' "$WORK/$name.out")"
        else
            echo "grpo ${option:-generate}: FAIL: $(tail -n 3 "$WORK/$name.out")"
            fails=1
        fi
    done
    echo "grpo: logs in $WORK"
    exit "$fails"
fi

if [ "${1:-}" = "--kernels" ] || [ "${1:-}" = "--quantized" ]; then
    WORK="$(realpath -m "${2:-$(mktemp -d -t qwenft-kernels-XXXX)}")"
    mkdir -p "$WORK"
    "$PY" -c '
import json, sys
rows = [("What is the capital of France?", "Paris."), ("2+2?", "4."),
        ("Color of the sky?", "Blue."), ("Opposite of hot?", "Cold.")]
with open(sys.argv[1], "w") as f:
    for q, a in rows * 4:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        f.write(json.dumps({"messages": msgs}) + "\n")
' "$WORK/chat.jsonl"
    fails=0
    # model | option | the key train.yaml carries | what train.log shows when it took effect | its
    # module
    while IFS='|' read -r model option key proof module; do
        name="${model//[^a-z0-9]/}${option//[^a-z0-9]/}"
        # shellcheck disable=SC2206  # the option and its value split on purpose
        base=(-m qwenft train --model "$model" --data "$WORK/chat.jsonl" $option
              --max-steps 3 --batch-size 2 --cutoff-len 64 --val-size 0 --set save_steps=1000)
        if ! "$PY" -c "import $module" 2>/dev/null; then
            if "$PY" "${base[@]}" --dry-run >"$WORK/$name.dry" 2>&1; then
                echo "${1#--}: $model $option: FAIL: $module is not installed and qwenft did not refuse"
                fails=1
            elif grep -q "needs .*package" "$WORK/$name.dry"; then
                echo "${1#--}: $model $option: refused as expected: $(grep -m1 '^error:' "$WORK/$name.dry")"
            else
                echo "${1#--}: $model $option: FAIL: $(tail -n 2 "$WORK/$name.dry")"
                fails=1
            fi
            continue
        fi
        if ! "$PY" "${base[@]}" --dry-run >"$WORK/$name.dry" 2>&1 || ! grep -q "$key" "$WORK/$name.dry"; then
            echo "${1#--}: $model $option: FAIL: --dry-run: $(tail -n 2 "$WORK/$name.dry")"
            fails=1
            continue
        fi
        if "$PY" "${base[@]}" -o "$WORK/runs/$name" >"$WORK/$name.out" 2>&1 &&
           grep -q "$proof" "$WORK/runs/$name/train.log"; then
            echo "${1#--}: $model $option: ok (train.log: $(grep -m1 -o "$proof.*" "$WORK/runs/$name/train.log" | cut -c1-80))"
        else
            echo "${1#--}: $model $option: FAIL: $(tail -n 3 "$WORK/$name.out")"
            fails=1
        fi
    done < <(if [ "$1" = --kernels ]; then cat <<'KERNELS'
tiny-qwen2|--attn fa2|flash_attn: fa2|Using FlashAttention-2|flash_attn
tiny-qwen2|--liger|enable_liger_kernel: true|Liger kernel has been applied|liger_kernel
tiny-qwen2|--unsloth|use_unsloth: true|Unsloth|unsloth
KERNELS
    else cat <<'QUANTIZED'
qwen2.5-0.5b-instruct-gptq-int4|--method qlora|quantization_bit: null|Loading 4-bit GPTQ-quantized model|gptqmodel
qwen2.5-0.5b-instruct-awq|--method qlora|quantization_bit: null|Loading 4-bit AWQ-quantized model|awq
QUANTIZED
    fi)
    echo "${1#--}: logs in $WORK"
    exit "$fails"
fi

exec "$PY" - "$@" <<'PYEOF'
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

sys.path.insert(0, "scripts")
sys.path.insert(0, ".")
import bench  # noqa: E402  (scripts/bench.py: data generator, recipe configs, real-token count)
from qwenft.models.presets import PRESETS  # noqa: E402
from qwenft.models.tiny import build_tokenizer, ensure_vocab  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--models", default="qwen2.5-0.5b-instruct,qwen2.5-7b-instruct")
p.add_argument("--rows", type=int, default=256, help="chat rows per run (one epoch)")
p.add_argument("--out", type=Path, default=Path("bench-gpu.json"))
p.add_argument("--work", type=Path, default=None)
args = p.parse_args()

work = (args.work or Path(tempfile.mkdtemp(prefix="qwenft-bench-gpu-"))).absolute()
work.mkdir(parents=True, exist_ok=True)
b = bench.Bench(work, quick=False)
os.environ["QWENFT_HOME"] = str(b.home)
bench.Bench.prepare_home(b)  # Qwen vocabulary into the private home (no download if present)


def have(mod):
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def build_model(preset: str) -> Path:
    import torch
    import transformers

    out = work / "models" / preset
    if (out / "config.json").is_file():
        return out
    a = PRESETS[preset].arch
    cfg = transformers.Qwen2Config(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, tie_word_embeddings=a.tie_word_embeddings,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        architectures=["Qwen2ForCausalLM"], bos_token_id=151643, eos_token_id=151645,
    )
    bench.say(f"building a random {preset} ({a.params / 1e9:.2f} B params) on the GPU")
    with torch.device("cuda"):
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    build_tokenizer(ensure_vocab(b.home), "qwen2").save_pretrained(out)
    return out


class PeakMem:
    """Peak memory.used (MiB) of GPU 0 while the block runs, polled with nvidia-smi."""

    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                     "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, int(out.strip().splitlines()[0]))
            except Exception:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


data_dir = work / "data"
train = bench.write_jsonl(data_dir / "train.jsonl", bench.make_chat_rows(args.rows, seed=5))
(data_dir / "dataset_info.json").write_text(json.dumps({"bench_recipe": {
    "file_name": str(train), "formatting": "sharegpt", "columns": {"messages": "messages"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
             "assistant_tag": "assistant", "system_tag": "system"}}}))

extras = {"bf16": True}
fast = {"flash_attn": "fa2" if have("flash_attn") else "auto"}
if have("liger_kernel"):
    fast["enable_liger_kernel"] = True

results = {"gpu": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                                  "--format=csv,noheader"], capture_output=True,
                                 text=True).stdout.strip(),
           "rows": args.rows, "flash_attn": fast["flash_attn"],
           "liger": fast.get("enable_liger_kernel", False), "models": {}}
for preset in [m.strip() for m in args.models.split(",") if m.strip()]:
    model_dir = build_model(preset)
    probe = bench.recipe_config(b, model_dir, data_dir, work / "probe", {}, 1e-4)
    sides = {
        "guide": dict(bench.GUIDE_RECIPE),
        "qwenft default": {**bench.GUIDE_RECIPE, **bench.recipe_of(probe), **fast},
    }
    per = {}
    for rep in range(2):  # interleaved: guide, default, guide, default
        for name, recipe in sides.items():
            run = work / "runs" / f"{preset}-{name.replace(' ', '_')}-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            cfg = bench.recipe_config(b, model_dir, data_dir, run, {**recipe, **extras}, 1e-4)
            import yaml

            (run / "bench.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            with PeakMem() as mem:
                r = bench.run_timed([b.lfcli, "train", str(run / "bench.yaml")], b.env,
                                    run / "train.log")
            res = json.loads((run / "all_results.json").read_text())
            tokens = bench.real_tokens(run / "tokenized")
            row = {"real_tokens_per_s": tokens * res["epoch"] / res["train_runtime"],
                   "peak_gpu_mib": mem.peak, "wall_s": r["wall"],
                   "train_loss": res.get("train_loss"), "recipe": bench.recipe_of(cfg),
                   "fast": {k: cfg.get(k) for k in ("flash_attn", "enable_liger_kernel")}}
            per.setdefault(name, []).append(row)
            bench.say(f"{preset} {name} #{rep}: {row['real_tokens_per_s']:.0f} real tok/s, "
                      f"peak {mem.peak} MiB")
            for sub in ("tokenized",):
                shutil.rmtree(run / sub, ignore_errors=True)
    summary = {name: {"real_tokens_per_s": bench.median([x["real_tokens_per_s"] for x in rows]),
                      "peak_gpu_mib": max(x["peak_gpu_mib"] for x in rows), "runs": rows}
               for name, rows in per.items()}
    g, q = summary["guide"], summary["qwenft default"]
    summary["speedup"] = q["real_tokens_per_s"] / g["real_tokens_per_s"]
    results["models"][preset] = summary
    bench.say(f"{preset}: qwenft default {summary['speedup']:.2f}x the guide's real tokens/s; "
              f"peak {q['peak_gpu_mib']} vs {g['peak_gpu_mib']} MiB")

args.out.write_text(json.dumps(results, indent=2) + "\n")
print(f"| model | guide tok/s | qwenft tok/s | x | guide peak MiB | qwenft peak MiB |")
print("|---|---|---|---|---|---|")
for preset, s in results["models"].items():
    g, q = s["guide"], s["qwenft default"]
    print(f"| {preset} | {g['real_tokens_per_s']:.0f} | {q['real_tokens_per_s']:.0f} | "
          f"{s['speedup']:.2f} | {g['peak_gpu_mib']} | {q['peak_gpu_mib']} |")
print(f"wrote {args.out}")
PYEOF
