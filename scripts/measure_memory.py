#!/usr/bin/env python
"""Measure the real peak GPU memory of a few LLaMA-Factory training steps next to `qwenft plan`.

On a machine with a CUDA GPU it builds a randomly initialised model of a preset's exact shape from
its config (no download: memory does not depend on the weight values), writes chat samples long
enough that every one reaches --cutoff-len (the worst case the plan predicts), runs --steps real
LLaMA-Factory steps with the same settings, and records torch.cuda.max_memory_allocated /
max_memory_reserved and the device's used memory (what nvidia-smi shows, CUDA context included)
next to the prediction, as JSON.

On a machine without a CUDA GPU it says so and exits 0 without measuring anything.

    python scripts/measure_memory.py --model qwen2.5-0.5b-instruct --method lora --out m.json
    python scripts/measure_memory.py --model qwen2-7b-instruct --method full --gpus 4 --deepspeed z3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORDS = (
    "the model learns to answer questions about memory planning for fine tuning large language "
    "models on graphics cards with limited space and many layers of attention and feed forward "
    "networks that keep activations for the backward pass"
).split()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b-instruct", help="a preset from `qwenft models`")
    p.add_argument("--method", default="lora", choices=["full", "freeze", "lora", "qlora"])
    p.add_argument("--bits", type=int, default=None, choices=[4, 8])
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument(
        "--deepspeed",
        default="none",
        choices=["none", "z0", "z2", "z3", "z2-offload", "z3-offload"],
    )
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-target", default="all")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--liger", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("memory-measurement.json"))
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep model/data here (default: temp)"
    )
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def cuda_status() -> tuple[bool, str]:
    """(available, reason or device name) without failing when torch is missing."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, torch.cuda.get_device_name(0)


# --- preparation (parent process) ---------------------------------------------------------------


def build_model(preset_name: str, out: Path) -> str:
    """Save a random bf16 model of the preset's exact shape, with the real Qwen tokenizer."""
    import torch
    import transformers

    from qwenft.models.presets import FAMILIES, PRESETS
    from qwenft.models.tiny import build_tokenizer, ensure_vocab

    preset = PRESETS[preset_name]
    a = preset.arch
    qwen3 = preset.family.startswith("qwen3")
    cfg_cls = transformers.Qwen3Config if qwen3 else transformers.Qwen2Config
    kwargs = dict(
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        vocab_size=a.vocab_size,
        tie_word_embeddings=a.tie_word_embeddings,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        architectures=["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
    )
    if a.head_dim:
        kwargs["head_dim"] = a.head_dim
    config = cfg_cls(**kwargs)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    build_tokenizer(ensure_vocab(), preset.family).save_pretrained(out)
    return FAMILIES[preset.family].template


def write_data(folder: Path, n: int, cutoff_len: int) -> None:
    """Chat samples longer than cutoff_len tokens (LLaMA-Factory truncates them to it)."""
    rows = []
    for k in range(n):
        words = [WORDS[(k + j) % len(WORDS)] for j in range(int(cutoff_len * 1.3))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {k}: tell me about memory."},
                    {"role": "assistant", "content": " ".join(words)},
                ]
            }
        )
    (folder / "measure.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {
        "measure": {
            "file_name": str(folder / "measure.jsonl"),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def lf_args(args: argparse.Namespace, model_dir: Path, template: str, work: Path) -> dict:
    """The LLaMA-Factory arguments of the measured run (same settings as the plan)."""
    cfg = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora" if args.method == "qlora" else args.method,
        "dataset": "measure",
        "dataset_dir": str(work),
        "template": template,
        "cutoff_len": args.cutoff_len,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(work / "out"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "bf16": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_gradient_checkpointing": args.no_gradient_checkpointing,
        "enable_liger_kernel": args.liger,
    }
    if args.method in ("lora", "qlora"):
        cfg.update(
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_rank,
            lora_dropout=0.05,
            lora_target=args.lora_target,
        )
    if args.method == "qlora":
        cfg.update(quantization_bit=args.bits or 4, quantization_method="bnb")
    if args.deepspeed != "none":
        src = ROOT / "configs" / "deepspeed" / f"{args.deepspeed}.json"
        (work / "deepspeed.json").write_text(src.read_text())
        cfg["deepspeed"] = str(work / "deepspeed.json")
    return cfg


def predict(args: argparse.Namespace) -> dict:
    from qwenft.memory import PlanInput, estimate
    from qwenft.models.presets import PRESETS

    plan = estimate(
        PlanInput(
            arch=PRESETS[args.model].arch,
            method=args.method,
            bits=args.bits,
            gpus=args.gpus,
            deepspeed=args.deepspeed,
            cutoff_len=args.cutoff_len,
            batch_size=args.batch_size,
            lora_rank=args.lora_rank,
            lora_target=args.lora_target,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            liger=args.liger,
        )
    )
    return plan.to_dict()


# --- the measured run (worker: in-process, or one per rank under torchrun) ------------------------


def worker(spec_file: Path) -> int:
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    spec = json.loads(spec_file.read_text())
    rank = int(os.environ.get("RANK", "0"))
    peaks = {"max_allocated": 0, "max_reserved": 0, "device_used": 0, "steps": 0}

    class PeakMemory(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):  # noqa: ANN002, ANN003
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            peaks["max_allocated"] = max(peaks["max_allocated"], torch.cuda.max_memory_allocated())
            peaks["max_reserved"] = max(peaks["max_reserved"], torch.cuda.max_memory_reserved())
            peaks["device_used"] = max(peaks["device_used"], total - free)
            peaks["total"] = total
            peaks["steps"] += 1

    run_exp(args=spec["lf_args"], callbacks=[PeakMemory()])
    peaks["device"] = torch.cuda.get_device_name()
    Path(spec["results"], f"rank{rank}.json").write_text(json.dumps(peaks))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    ok, why = cuda_status()
    if not ok:
        print(f"measure_memory: needs a CUDA GPU ({why}); nothing was measured.")
        return 0
    from qwenft.models.presets import PRESETS

    if args.model not in PRESETS or PRESETS[args.model].hub_id is None:
        print(
            f"measure_memory: --model must be a hub preset from `qwenft models` (got {args.model})",
            file=sys.stderr,
        )
        return 2

    import shutil

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qwenft-measure-"))
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    model_dir = work / "model"
    print(f"building a random {args.model} in {model_dir} ...", flush=True)
    template = build_model(args.model, model_dir)
    write_data(work, n=args.steps * args.batch_size * args.gpus + 8, cutoff_len=args.cutoff_len)
    spec = {"lf_args": lf_args(args, model_dir, template, work), "results": str(results)}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))

    if args.gpus == 1 and args.deepspeed == "none":
        worker(spec_file)
    else:
        cmd = [
            "torchrun",
            f"--nproc_per_node={args.gpus}",
            str(Path(__file__).resolve()),
            "--worker",
            str(spec_file),
        ]
        rc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        if rc != 0:
            print(f"measure_memory: the training run failed (exit {rc})", file=sys.stderr)
            return 1

    ranks = [json.loads(f.read_text()) for f in sorted(results.glob("rank*.json"))]
    if not ranks:
        print("measure_memory: no rank reported its memory", file=sys.stderr)
        return 1
    worst = max(ranks, key=lambda r: r["device_used"])
    predicted = predict(args)
    measured_gb = worst["device_used"] / 1e9
    record = {
        "model": args.model,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "out", "workdir")
        },
        "predicted": predicted,
        "measured": {
            "device": worst.get("device"),
            "device_total_gb": round(worst.get("total", 0) / 1e9, 3),
            "max_allocated_gb": round(worst["max_allocated"] / 1e9, 3),
            "max_reserved_gb": round(worst["max_reserved"] / 1e9, 3),
            "device_used_gb": round(measured_gb, 3),  # reserved + CUDA context, as nvidia-smi
            "steps": worst["steps"],
            "per_rank": ranks,
        },
        "error_pct": round((predicted["peak_gb"] - measured_gb) / measured_gb * 100, 1),
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(
        f"predicted {predicted['peak_gb']:.2f} GB, measured {measured_gb:.2f} GB "
        f"(allocated {record['measured']['max_allocated_gb']:.2f}, reserved "
        f"{record['measured']['max_reserved_gb']:.2f}); error {record['error_pct']:+.1f}% "
        f"-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
