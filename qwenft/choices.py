"""The choices qwenft offers, each an enum with its facts: methods (what each one trains and
writes), templates, DeepSpeed stages, thinking modes, over-length policies, training stages (the
stage table: LLaMA-Factory's stage, data kind, pairs, reference model, figures) and the data kinds
they take, chat backends, GGUF quantizations, experiment trackers, launchers. The CLI shows these as the
choices of every option that takes them, and the core checks against the same lists, so `plan`,
`train`, `data check` and `eval` cannot disagree. The LLaMA-Factory keys (knobs) are in qwenft.knobs.

Pure data (it imports only errors): every other module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class MethodFacts:
    """What a method trains and what its run folder holds."""

    finetuning_type: str  # LLaMA-Factory's finetuning_type
    adapter: bool  # trains a LoRA adapter (merged into the base by `qwenft merge`)
    quantized: bool  # the base is loaded quantized (QLoRA)

    @property
    def own_weights(self) -> bool:
        """The run folder holds the whole model (full, freeze): nothing to merge."""
        return not self.adapter


class Method(Choice):
    """How the weights are trained (LLaMA-Factory's finetuning_type, plus 4-bit/8-bit QLoRA)."""

    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"
    FREEZE = "freeze"

    @property
    def facts(self) -> MethodFacts:
        return METHOD_FACTS[self]


METHOD_FACTS = {
    Method.LORA: MethodFacts("lora", adapter=True, quantized=False),
    Method.QLORA: MethodFacts("lora", adapter=True, quantized=True),
    Method.FULL: MethodFacts("full", adapter=False, quantized=False),
    Method.FREEZE: MethodFacts("freeze", adapter=False, quantized=False),
}


def own_weights(method: str) -> bool:
    """A run of this method holds its own weights (full, freeze), not an adapter to merge."""
    return Method(method).facts.own_weights


class Template(Choice):
    """LLaMA-Factory's Qwen chat templates; the *_vl ones are the vision-language models' (their
    mm_plugin turns each <image> / <video> of a message into the model's vision tokens)."""

    QWEN = "qwen"
    QWEN3 = "qwen3"
    QWEN3_NOTHINK = "qwen3_nothink"
    QWEN2_VL = "qwen2_vl"  # Qwen2-VL and Qwen2.5-VL
    QWEN3_VL = "qwen3_vl"  # Qwen3-VL Thinking (a ReasoningTemplate, like qwen3)
    QWEN3_VL_NOTHINK = "qwen3_vl_nothink"  # Qwen3-VL Instruct

    @property
    def vision(self) -> bool:
        """A vision-language model's template: its data may hold images and videos."""
        return self in VISION_TEMPLATES


VISION_TEMPLATES = frozenset({Template.QWEN2_VL, Template.QWEN3_VL, Template.QWEN3_VL_NOTHINK})


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


class Mix(Choice):
    """How several --data files make one training set (LLaMA-Factory's mix_strategy): concat reads
    every row of each file once, in order; interleave draws rows from the files at random (at the
    --data FILE:SHARE shares, else evenly) until the first file runs out; interleave-over goes on,
    repeating the files that ran out, until every file has been read once."""

    CONCAT = "concat"
    INTERLEAVE = "interleave"
    INTERLEAVE_OVER = "interleave-over"

    @property
    def lf_value(self) -> str:
        return {"concat": "concat", "interleave": "interleave_under"}.get(
            self.value, "interleave_over"
        )


class DataKind(Choice):
    """What a data file holds, by its rows' shape (qwenft.data names it; each stage takes one):
    sft {"messages"}; preference {"messages" ending with a user turn, "chosen", "rejected"};
    kto {"messages" ending with an assistant turn, "label": bool}; pt {"text"} or a .txt file;
    prompt {"messages" ending with a user turn, and fields the rewards read} (grpo)."""

    SFT = "sft"
    PREFERENCE = "preference"
    KTO = "kto"
    PT = "pt"
    PROMPT = "prompt"


class Engine(Choice):
    """What trains a stage: LLaMA-Factory (`llamafactory-cli train`), or TRL's trainer in
    qwenft's own process (`python -m qwenft.rl.grpo`, the rl extra: qwenft.rl)."""

    LLAMAFACTORY = "llamafactory"
    TRL = "trl"

    @property
    def shown(self) -> str:
        """How the progress line names it while it starts."""
        return "LLaMA-Factory" if self is Engine.LLAMAFACTORY else "the GRPO process (TRL)"

    @property
    def program(self) -> str:
        """How a failure names what exited."""
        return "llamafactory-cli train" if self is Engine.LLAMAFACTORY else self.shown


@dataclass(frozen=True)
class StageFacts:
    """What a training stage is to LLaMA-Factory, to the data, to memory and to the summary."""

    lf_stage: str  # LLaMA-Factory's `stage:` (configs/stages/<stage>.yaml writes it)
    data: DataKind  # the kind of data it trains on
    paired: bool = False  # each sample holds chosen + rejected: two sequences per sample
    reference: bool = False  # full/freeze runs hold a frozen reference model beside the policy
    zero_loss_ok: bool = False  # a loss of exactly 0 is a result, not a fault (preference losses)
    # the figures its trainer logs besides the loss (trainer_state.json's log_history; LF's log
    # callback keeps only loss and lr in trainer_log.jsonl): the summary shows first -> last
    figures: tuple[str, ...] = ()
    # trains a reward model (a value head that scores a conversation): it generates nothing, so
    # chat, serve and GGUF export refuse it and `qwenft score` reads it
    reward: bool = False
    engine: Engine = Engine.LLAMAFACTORY  # what trains it


class Stage(Choice):
    """LLaMA-Factory's training stages qwenft runs (`stage:`; dpo, orpo and simpo are its `dpo`
    stage with another `pref_loss`)."""

    SFT = "sft"
    PT = "pt"
    DPO = "dpo"
    ORPO = "orpo"
    SIMPO = "simpo"
    KTO = "kto"
    RM = "rm"
    GRPO = "grpo"

    @property
    def facts(self) -> StageFacts:
        return STAGE_FACTS[self]

    @classmethod
    def parse(cls, value: str | Choice, option: str, *, auto: bool = False) -> str:
        """As Choice.parse, and a stage people ask for that qwenft cannot run is refused with
        the reason and what to use instead (UNSUPPORTED_STAGES)."""
        text = value.value if isinstance(value, Enum) else str(value)
        if text in UNSUPPORTED_STAGES:
            why, fix = UNSUPPORTED_STAGES[text]
            raise QwenftError(f"{option} {text} is not supported: {why}", fix)
        return super().parse(value, option, auto=auto)


_REWARDS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
STAGE_FACTS = {
    Stage.SFT: StageFacts("sft", DataKind.SFT),
    Stage.PT: StageFacts("pt", DataKind.PT),
    Stage.DPO: StageFacts(
        "dpo", DataKind.PREFERENCE, paired=True, reference=True, zero_loss_ok=True, figures=_REWARDS
    ),
    Stage.ORPO: StageFacts(
        "dpo",
        DataKind.PREFERENCE,
        paired=True,
        zero_loss_ok=True,
        figures=("rewards/accuracies", "rewards/margins", "odds_ratio_loss", "sft_loss"),
    ),
    Stage.SIMPO: StageFacts(
        "dpo", DataKind.PREFERENCE, paired=True, zero_loss_ok=True, figures=_REWARDS
    ),
    Stage.KTO: StageFacts(
        "kto",
        DataKind.KTO,
        reference=True,
        zero_loss_ok=True,
        figures=("rewards/margins", "rewards/chosen", "rewards/rejected", "kl"),
    ),
    # a reward model on pairs: LLaMA-Factory's pairwise loss -log sigmoid(score(chosen) -
    # score(rejected)), the score being a value head's output at a sequence's last token; once the
    # pairs separate by ~10 it logs as 0.0 (its trainer log rounds to 4 decimals)
    Stage.RM: StageFacts("rm", DataKind.PREFERENCE, paired=True, zero_loss_ok=True, reward=True),
    # GRPO on prompts with verifiable rewards, run by TRL (LLaMA-Factory 0.9.5 has no such stage):
    # its loss is exactly 0 on a step where every completion of each prompt scored alike
    Stage.GRPO: StageFacts(
        "grpo",
        DataKind.PROMPT,
        zero_loss_ok=True,
        figures=("reward", "reward_std", "kl", "completions/mean_length"),
        engine=Engine.TRL,
    ),
}
# Stages people ask for that qwenft refuses before anything is written: (why, what to use).
UNSUPPORTED_STAGES = {
    "ppo": (
        "LLaMA-Factory 0.9.5's PPO requires trl <= 0.9.6 (a version check that "
        "DISABLE_VERSION_CHECK does not lift), and trl 0.9.6 breaks its other stages and needs "
        "patches to run under transformers 5",
        "--stage grpo (reinforcement with verifiable rewards, on prompts), or a preference "
        "stage: --stage dpo (or orpo, simpo, kto) on chosen/rejected pairs; --stage rm trains a "
        "reward model that `qwenft score` reads",
    ),
}
# The data kind each stage trains on, and each LLaMA-Factory stage's (dpo, orpo, simpo: pairs).
STAGE_DATA = {stage: facts.data for stage, facts in STAGE_FACTS.items()}
LF_STAGE_DATA = {facts.lf_stage: facts.data for facts in STAGE_FACTS.values()}


def stages_for(kind: str) -> list[str]:
    """The stages that train on data of this kind."""
    return [stage.value for stage, facts in STAGE_FACTS.items() if facts.data == kind]


class ConvertFormat(Choice):
    """`qwenft data convert --format`: the shapes it reads (auto: told apart by the rows)."""

    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    OPENAI = "openai"
    TRL = "trl"
    ULTRAFEEDBACK = "ultrafeedback"
    TEXT = "text"
    AUTO = "auto"


class TextDocs(Choice):
    """How a .txt file becomes documents: one per line (LLaMA-Factory's reading, the default
    everywhere) or one per blank-line-separated block (only `qwenft data convert --text-docs`)."""

    LINES = "lines"
    BLOCKS = "blocks"


class Backend(Choice):
    """Where `qwenft chat` runs the model (`serve` takes transformers and llama.cpp)."""

    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"


class GgufQuant(Choice):
    """`qwenft export --format gguf --quant`: GGUF weight types (llama.cpp's names)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"


class Tracker(Choice):
    """`qwenft train --report-to`: the experiment trackers qwenft sets up (qwenft.runs.tracking)."""

    TENSORBOARD = "tensorboard"
    MLFLOW = "mlflow"
    WANDB = "wandb"
    SWANLAB = "swanlab"
    TRACKIO = "trackio"


@dataclass(frozen=True)
class LauncherFacts:
    """How a launcher starts a run: here, or by a file a scheduler runs elsewhere."""

    remote: bool  # renders for other machines: --gpus is theirs, no GPU need be visible here
    file: str | None  # what it writes: into the run folder, or printed by --dry-run (in_run)
    in_run: bool = False  # the file lives in a prepared run folder (data checked and tokenized)
    what: str = ""


class Launcher(Choice):
    """`qwenft train --launcher`: where the run's processes start (qwenft.launch)."""

    LOCAL = "local"
    SLURM = "slurm"
    KUBEFLOW = "kubeflow"
    SKYPILOT = "skypilot"
    RAY = "ray"

    @property
    def facts(self) -> LauncherFacts:
        return LAUNCHER_FACTS[self]


LAUNCHER_FACTS = {
    Launcher.LOCAL: LauncherFacts(
        False, None, what="this machine (torchrun for several processes)"
    ),
    Launcher.SLURM: LauncherFacts(
        True, "launch.sbatch", in_run=True, what="a Slurm batch job, one task per node"
    ),
    Launcher.KUBEFLOW: LauncherFacts(
        True, "pytorchjob.yaml", what="a Kubeflow PyTorchJob running the same command per pod"
    ),
    Launcher.SKYPILOT: LauncherFacts(
        True, "sky.yaml", what="a SkyPilot task running the same command per node"
    ),
    Launcher.RAY: LauncherFacts(False, None, what="Ray workers, one GPU (or CPU process) each"),
}


DEFAULT_METHOD = Method.LORA
DEFAULT_OVERLENGTH = Overlength.WARN


# --pref-loss: the DPO losses qwenft offers (orpo and simpo are stages of their own).
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def auto_deepspeed(method: str, stage: str = "sft") -> str:
    """`--deepspeed auto`: ZeRO-3 for full fine-tuning (it partitions the weights, so the largest
    models fit), no DeepSpeed for the parameter-efficient methods, nor for a stage TRL trains in
    qwenft's one process (grpo)."""
    if Stage(stage).facts.engine == Engine.TRL:
        return DeepSpeed.NONE.value
    return DeepSpeed.Z3.value if method == Method.FULL else DeepSpeed.NONE.value
