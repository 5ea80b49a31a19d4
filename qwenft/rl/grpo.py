"""The GRPO process: `python -m qwenft.rl.grpo RUN/train.yaml`, what `qwenft train --stage grpo`
launches in place of `llamafactory-cli train`.

It runs TRL's GRPOTrainer (the `rl` extra: trl 1.x and the datasets it needs, installed beside the
venv and put first on PYTHONPATH for this process only: qwenft.rl.engine), reading the same
train.yaml keys LLaMA-Factory reads (model, method, LoRA, optimizer, schedule, output) plus GRPO's
own (`num_generations`, `max_completion_length`, `temperature`, `pref_beta` as the KL coefficient,
`loss_type`, `reward_funcs`, `reward_weights`), and leaves in the run folder what LLaMA-Factory
leaves: the adapter (or the whole model), the tokenizer, checkpoints, trainer_state.json,
all_results.json and trainer_log.jsonl (one row per logging step, LLaMA-Factory's keys plus the
reward figures), so qwenft's progress line, loss watch, resume, merge, chat and serve read a GRPO
run as any other.

Prompts are the data rows' messages (ending with a user turn) through the model's chat template,
with the run's system prompt and thinking mode, as `qwenft chat` prompts the trained model; every
other field of a row goes to the rewards (qwenft.rl.rewards).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from qwenft.data.reader import BAD, Collector, iter_rows, open_data_file
from qwenft.errors import QwenftError
from qwenft.knobs import TRL_ARGS, as_number
from qwenft.rl import rewards

STOP = "<|im_end|>"  # every Qwen chat template ends a turn with it (LLaMA-Factory's stop word)
FLOATS = ("learning_rate", "warmup_ratio", "num_train_epochs", "temperature", "beta")
FIGURES = ("reward", "reward_std", "kl", "completions/mean_length", "entropy")


def prompt_rows(config: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
    """The data file's rows as GRPO's dataset: `prompt` (the text the model continues) and each
    other field of the row, plus the data line (rewards.LINE)."""
    system = config.get("default_system")
    thinking = config.get("enable_thinking")
    limit = config.get("max_samples")
    kwargs = {} if thinking is None else {"enable_thinking": bool(thinking)}
    rows = []
    path, fh, mode = open_data_file(Path(config["data_file"]))  # .jsonl or a .json array
    with fh:
        for line_no, row, _raw in iter_rows(fh, mode, Collector()):
            if row is BAD:  # `train` checked the file: only a file changed since gets here
                raise QwenftError(f"{path}:{line_no} is not valid JSON (the file changed?)")
            original = row.pop("messages")  # as the data has it: a reward model's conversation
            messages = list(original)
            if system and not (messages and messages[0].get("role") == "system"):
                messages.insert(0, {"role": "system", "content": system})
            tools = row.get("tools")
            if isinstance(tools, str):
                tools = json.loads(tools) if tools.strip() else None
            prompt = tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=True, **kwargs
            )
            rows.append(
                {
                    "prompt": prompt,
                    rewards.LINE: line_no,
                    rewards.MESSAGES: json.dumps(original, ensure_ascii=False),
                    **row,
                }
            )
            if limit and len(rows) >= limit:
                break
    return rows


def lora_targets(value: Any) -> Any:
    """LLaMA-Factory's lora_target ("all", or a comma list) as PEFT's target_modules."""
    if value in (None, "all"):
        return "all-linear"
    return [t.strip() for t in str(value).split(",")] if isinstance(value, str) else value


def grpo_args(config: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """GRPOConfig's arguments from train.yaml's keys (knobs.TRL_ARGS names them)."""
    args = {
        trl: as_number(config[lf]) for lf, trl in TRL_ARGS.items() if config.get(lf) is not None
    }
    for key in FLOATS:
        if key in args:
            args[key] = float(args[key])
    args.update(
        reward_weights=rewards.parse_weights(
            config.get("reward_weights"), len(config["reward_funcs"])
        ),
        gradient_checkpointing=not config.get("disable_gradient_checkpointing", False),
        bf16=bool(config.get("bf16")) and cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    args.setdefault("report_to", "none")
    if args.get("use_vllm"):  # vLLM inside this process, sharing the GPU with training
        args["vllm_mode"] = "colocate"
    return args


class TrainerLog:
    """LLaMA-Factory's trainer_log.jsonl, row by row, with GRPO's figures (a TrainerCallback)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "trainer_log.jsonl"
        self.started = time.monotonic()

    def __call__(self, state: Any, logs: dict[str, Any]) -> None:
        if "loss" not in logs and "reward" not in logs:
            return
        total = state.max_steps or 0
        step = state.global_step
        elapsed = time.monotonic() - self.started
        left = elapsed / step * (total - step) if step and total else 0.0
        row = {
            "current_steps": step,
            "total_steps": total,
            "loss": logs.get("loss"),
            "lr": logs.get("learning_rate"),
            "epoch": round(state.epoch or 0.0, 2),
            "percentage": round(100 * step / total, 2) if total else None,
            "elapsed_time": str(timedelta(seconds=int(elapsed))),
            "remaining_time": str(timedelta(seconds=int(left))),
            **{k: logs[k] for k in FIGURES if k in logs},
            **{k: v for k, v in logs.items() if k.startswith("rewards/") and k.endswith("/mean")},
        }
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Train the run train.yaml describes; 3 (and the reason on stderr, as `qwenft: ...`, which
    `train` reports as the run's) when a reward or the data stops it."""
    argv = sys.argv[1:] if argv is None else argv
    config = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        train(config)
    except (rewards.RewardError, QwenftError) as exc:
        print(f"qwenft: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


def train(config: dict[str, Any]) -> None:
    run_dir = Path(config["output_dir"])
    reward_funcs = [rewards.build(rewards.parse_spec(s)) for s in config["reward_funcs"]]

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    model_path = config["model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.eos_token = STOP  # a completion ends where the turn does, as LLaMA-Factory sets it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if config.get("bf16") and cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    peft_config = None
    if config.get("finetuning_type") == "lora":
        from peft import LoraConfig

        rank = int(config.get("lora_rank", 8))
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=int(config.get("lora_alpha") or 2 * rank),
            lora_dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=lora_targets(config.get("lora_target")),
            task_type="CAUSAL_LM",
        )
    dataset = Dataset.from_list(prompt_rows(config, tokenizer))
    log = TrainerLog(run_dir)

    class Logged(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if state.is_world_process_zero and logs:
                log(state, logs)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=GRPOConfig(**grpo_args(config, cuda)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Logged()],
    )
    # as LLaMA-Factory does: a run folder with checkpoints continues from the newest
    resume = config.get("resume_from_checkpoint") or get_last_checkpoint(str(run_dir))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir))
    tokenizer.save_pretrained(str(run_dir))
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


if __name__ == "__main__":
    sys.exit(main())
