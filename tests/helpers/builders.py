"""Builders shared by the test modules: data files, stand-in model folders, the fake CLI's record.

Nothing here imports torch, transformers or llamafactory (the fast tier must not)."""

from __future__ import annotations

import json
import os
from pathlib import Path

QWEN2_05B_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("Name three primary colors.", "Red, blue and yellow."),
    ("What is 12 times 12?", "12 times 12 is 144."),
]


def chat_rows(pairs: list[tuple[str, str]] = QA) -> list[dict]:
    """One user/assistant conversation per (question, answer) pair."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]


# A wrong answer for each QA question: the rejected side of the preference pairs.
WRONG = [
    "The capital of France is Berlin.",
    "中国的首都是上海。",
    "Green, purple and orange.",
    "12 times 12 is 124.",
]


def pair_rows(pairs: list[tuple[str, str]] = QA, wrong: list[str] = WRONG) -> list[dict]:
    """Preference pairs: each question, its answer chosen and a wrong one rejected."""
    return [
        {
            "messages": [{"role": "user", "content": q}],
            "chosen": {"role": "assistant", "content": a},
            "rejected": {"role": "assistant", "content": w},
        }
        for (q, a), w in zip(pairs, wrong, strict=True)
    ]


# Reward-model pairs: sums answered (chosen) or dodged (rejected) - a feature a tiny reward model
# learns in a few steps and carries to sums it never saw.
DODGES = ["I don't know.", "No idea, sorry.", "Ask someone else.", "Why would I tell you?"]


def reward_pairs(seed: int, n: int) -> list[dict]:
    """n preference pairs "What is A plus B?": chosen answers it, rejected dodges it."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append(
            {
                "messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "chosen": {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                "rejected": {"role": "assistant", "content": rng.choice(DODGES)},
            }
        )
    return rows


WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "lamp",
    "tiger",
    "candle",
    "music",
    "paper",
    "forest",
    "glass",
    "bread",
    "piano",
    "ocean",
    "shadow",
    "silver",
    "winter",
    "garden",
    "rocket",
]


def yes_no_question(rng: object) -> str:
    return f"Is {rng.choice(WORDS)} like {rng.choice(WORDS)}? Answer yes or no."  # type: ignore[attr-defined]


def yes_no_rows(seed: int, n: int, yes_every: int = 4) -> list[dict]:
    """sft rows asking "Is A like B? Answer yes or no.", answered "yes." on every yes_every-th row
    and "no." on the others: a model trained on them answers no, and samples yes now and then
    (the start of the GRPO test)."""
    import random

    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": yes_no_question(rng)},
                {"role": "assistant", "content": "yes." if i % yes_every == 0 else "no."},
            ]
        }
        for i in range(n)
    ]


def yes_prompts(seed: int, n: int) -> list[dict]:
    """grpo prompt rows asking the same kind of question, with the reference answer "yes"."""
    import random

    rng = random.Random(seed)
    return [
        {"messages": [{"role": "user", "content": yes_no_question(rng)}], "answer": "yes"}
        for _ in range(n)
    ]


def kto_rows(pairs: list[tuple[str, str]] = QA, wrong: list[str] = WRONG) -> list[dict]:
    """KTO rows: each question with its answer (label true) and with a wrong one (false)."""
    return [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
            "label": label,
        }
        for (q, a), w in zip(pairs, wrong, strict=True)
        for answer, label in ((a, True), (w, False))
    ]


def text_rows(pairs: list[tuple[str, str]] = QA) -> list[dict]:
    """Pre-training rows: each QA answer as a text."""
    return [{"text": a} for _, a in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def write_model_folder(folder: Path, config: dict | None = None) -> Path:
    """A folder that looks like a checkpoint: config.json only (nothing here loads weights)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or QWEN2_05B_CONFIG))
    return folder


def read_calls(record: Path) -> list[dict]:
    """The fake llamafactory-cli's record: one dict (argv, env, yaml) per launch."""
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


# Every variable qwenft sets for a --report-to tracker or takes from the person's environment
# (qwenft.runs.tracking): tests clear them, so trackers run offline whatever this machine says.
TRACKER_VARS = (
    "TENSORBOARD_LOGGING_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_CONTEXT",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_API_KEY",
    "TRACKIO_DIR",
)
# What the stand-in llamafactory-cli records of its environment (the fake_cli fixture): the
# launcher's variables and the trackers'.
RECORDED_VARS = (
    "FORCE_TORCHRUN",
    "NPROC_PER_NODE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "HF_HUB_OFFLINE",
    *TRACKER_VARS,
)


def env_without_fake(**overrides: str) -> dict[str, str]:
    """The environment for a real end-to-end child: without the stand-in CLI's record file."""
    env = {k: v for k, v in os.environ.items() if k not in ("FAKE_LF_RECORD", "QWENFT_API_KEY")}
    env.update(overrides)
    return env


def run_manifest(**changes: object):
    """A complete run manifest (qwenft.runs.manifest.Manifest) of a LoRA run, fields changed."""
    from qwenft.models.presets import resolve_model
    from qwenft.runs.manifest import DatasetRecord, Manifest

    m = Manifest(
        method="lora",
        model=resolve_model("qwen2-0.5b-instruct"),
        template="qwen",
        default_system="You are a helpful assistant.",
        enable_thinking=None,
        dataset=DatasetRecord("/data/chat.jsonl", "ab" * 32, "chat-abababab", "/ds"),
        command=["llamafactory-cli", "train", "train.yaml"],
        env={"HF_HUB_OFFLINE": "1"},
    )
    for key, value in changes.items():
        setattr(m, key, value)
    return m


def write_safetensors(path: Path, nbytes: int = 8, truncate: int = 0) -> None:
    """A .safetensors file holding one tensor of nbytes (its last `truncate` bytes cut off)."""
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}
    )
    data = len(header).to_bytes(8, "little") + header.encode() + b"\0" * nbytes
    path.write_bytes(data[: len(data) - truncate])


def write_checkpoint(
    run: Path, step: int, *, state: str | None = '{"global_step": 1}', **kw: int
) -> Path:
    """A LoRA checkpoint-<step> folder as transformers writes it (state None: cut short before
    trainer_state.json, which it writes last)."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", **kw)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def written(*roots: Path) -> list[str]:
    """Everything under the given folders (the working folder, QWENFT_HOME, the data's folder):
    compare it before and after a command to show the command wrote nothing."""
    return sorted(str(p) for root in roots for p in root.rglob("*"))


def lines(*rows: bytes | dict) -> bytes:
    """JSON lines: each dict dumped on a line of its own (non-ASCII kept), bytes as they are (for
    malformed lines)."""
    out = b""
    for r in rows:
        out += r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() + b"\n"
    return out


def write(folder: Path, content: bytes, name: str = "data.jsonl") -> Path:
    """content written to folder/name, byte for byte."""
    path = folder / name
    path.write_bytes(content)
    return path


def table(names: str, rows: list[tuple]):  # noqa: ANN201 - a pytest mark
    """pytest.mark.parametrize over a flat table whose first column names each case."""
    import pytest

    return pytest.mark.parametrize(names, rows, ids=[r[0] for r in rows])
