"""Every choice qwenft offers, in one place: methods, templates, DeepSpeed stages, thinking modes,
over-length policies, training stages and the data kinds they take. The CLI shows these as the choices of every option that takes them, and the
core checks against the same lists, so `plan`, `train`, `data check` and `eval` cannot disagree.

Pure data (it imports only errors): presets, the core and the CLI import it.
"""

from __future__ import annotations

from enum import Enum

from qwenft.errors import QwenftError

AUTO = "auto"


class Choice(str, Enum):
    """A str-valued choice: compares equal to its value and prints as it."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: str | Choice, option: str, *, auto: bool = False) -> str:
        """The value if it is one of the choices (or `auto` where allowed), else QwenftError."""
        text = value.value if isinstance(value, Enum) else str(value)
        allowed = (*((AUTO,) if auto else ()), *cls.values())
        if text not in allowed:
            raise QwenftError(f"unknown {option} {text!r}", f"choose one of {', '.join(allowed)}")
        return text


class Method(Choice):
    """How the weights are trained (LLaMA-Factory's finetuning_type, plus 4-bit/8-bit QLoRA)."""

    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"
    FREEZE = "freeze"


class Template(Choice):
    """LLaMA-Factory's Qwen chat templates."""

    QWEN = "qwen"
    QWEN3 = "qwen3"
    QWEN3_NOTHINK = "qwen3_nothink"


class DeepSpeed(Choice):
    """The DeepSpeed configs shipped in configs/deepspeed/ (none: plain DDP or one process)."""

    NONE = "none"
    Z0 = "z0"
    Z2 = "z2"
    Z3 = "z3"
    Z2_OFFLOAD = "z2-offload"
    Z3_OFFLOAD = "z3-offload"


class Thinking(Choice):
    """Qwen3 hybrid models: train reasoning (<think> blocks) or direct answers; auto: from data."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Overlength(Choice):
    """Samples longer than cutoff_len: warn (count the tokens lost), drop them, or fail."""

    WARN = "warn"
    DROP = "drop"
    FAIL = "fail"


class DataKind(Choice):
    """What a data file holds, by its rows' shape (qwenft.data names it; each stage takes one):
    sft {"messages"}; preference {"messages" ending with a user turn, "chosen", "rejected"};
    kto {"messages" ending with an assistant turn, "label": bool}; pt {"text"} or a .txt file."""

    SFT = "sft"
    PREFERENCE = "preference"
    KTO = "kto"
    PT = "pt"


class Stage(Choice):
    """LLaMA-Factory's training stages qwenft runs (`stage:`; dpo, orpo and simpo are its `dpo`
    stage with another `pref_loss`)."""

    SFT = "sft"
    PT = "pt"
    DPO = "dpo"
    ORPO = "orpo"
    SIMPO = "simpo"
    KTO = "kto"


# The data kind each stage trains on.
STAGE_DATA = {
    Stage.SFT: DataKind.SFT,
    Stage.PT: DataKind.PT,
    Stage.DPO: DataKind.PREFERENCE,
    Stage.ORPO: DataKind.PREFERENCE,
    Stage.SIMPO: DataKind.PREFERENCE,
    Stage.KTO: DataKind.KTO,
}


class GgufQuant(Choice):
    """`qwenft export --format gguf --quant`: GGUF weight types (llama.cpp's names)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"


DEFAULT_METHOD = Method.LORA
DEFAULT_OVERLENGTH = Overlength.WARN


def auto_deepspeed(method: str) -> str:
    """`--deepspeed auto`: ZeRO-3 for full fine-tuning (it partitions the weights, so the largest
    models fit), no DeepSpeed for the parameter-efficient methods."""
    return DeepSpeed.Z3.value if method == Method.FULL else DeepSpeed.NONE.value
