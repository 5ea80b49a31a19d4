"""The knob table: every LLaMA-Factory key qwenft names, declared once.

A knob is one row of `KNOBS`: the LLaMA-Factory key, the qwenft option that sets it (if any) and
the commands that offer that option, its type and help, the range a value must be in, and the
stages and methods that read it. Everything else is derived from the table:

- the options of `train`, `plan`, `eval` and `data check` (qwenft.cli.common.knob_options);
- the range checks, whichever layer set the key (--config, an option, --set) and whichever
  command it came through (`problems`);
- the applicability checks: a key that the run's stage or method would ignore in silence is
  refused (`inapplicable`);
- how messages name a key: with the qwenft option that sets it (`key_label`, `bad_value`);
- the values and combinations refused before launch because LLaMA-Factory would refuse them, ignore
  them in silence or crash on them (`Refusal`, `refused`), the keys a knob needs beside it
  (`implies`), and what a value needs of the machine that trains: a CUDA device, a package
  (`Needs`; train checks them, qwenft.settings.unmet_needs).

Adding a knob is one `Knob(...)` row (plus its tests). Pure data: imports only choices and errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qwenft.choices import DPO_LOSSES, DeepSpeed, Method, Stage
from qwenft.errors import QwenftError

# The commands that offer knob options (their names as a person types them).
TRAIN, PLAN, EVAL, DATA_CHECK = "train", "plan", "eval", "data check"


@dataclass(frozen=True)
class Rule:
    """The range a knob's value must be in: `test` passes, else "OPTION must be `must`"."""

    test: Callable[[float], bool]
    must: str
    hint: str = ""

    def __call__(self, hint: str) -> Rule:
        """The same rule with the knob's own hint."""
        return Rule(self.test, self.must, hint)


WHOLE = "a positive whole number"
POSITIVE_WHOLE = Rule(lambda v: v >= 1, WHOLE)
ABOVE_ZERO_WHOLE = Rule(lambda v: v > 0, WHOLE)  # max_steps: 0 or less means "by epochs"
POSITIVE = Rule(lambda v: v > 0, "positive")
AT_LEAST_ZERO = Rule(lambda v: v >= 0, "0 or more")
FRACTION = Rule(lambda v: 0 <= v < 1, "in [0, 1)")
WHOLE_NOT_ZERO = Rule(lambda v: v != 0 and float(v).is_integer(), "a whole number other than 0")

PREFERENCE = tuple(s for s in Stage if s.facts.paired)
ADAPTERS = tuple(m for m in Method if m.facts.adapter)
ZERO3 = (DeepSpeed.Z3.value, DeepSpeed.Z3_OFFLOAD.value)
LF = "LLaMA-Factory 0.9.5"


@dataclass(frozen=True)
class Refusal:
    """Values of a knob refused before launch, because LLaMA-Factory would refuse them, ignore them
    in silence or crash on them: "OPTION VALUE: `why`", with `fix` as the hint. `values` (): every
    value that is set (not None, not false). With `with_key`, only together with that key set to
    one of `with_values` ((): to any value that is set); the key is another knob's, or one of the
    run's choices `refused` is given (deepspeed, stage, method)."""

    why: str
    fix: str
    values: tuple[Any, ...] = ()
    with_key: str = ""
    with_values: tuple[Any, ...] = ()

    def applies(self, value: Any, context: Mapping[str, Any]) -> bool:
        if not (value in self.values if self.values else _is_set(value)):
            return False
        if not self.with_key:
            return True
        other = context.get(self.with_key)
        return other in self.with_values if self.with_values else _is_set(other)


@dataclass(frozen=True)
class Needs:
    """What a knob's `values` need of the machine that trains: an NVIDIA GPU, packages as
    (the name pip installs, the module it imports). `train` checks them before launch
    (qwenft.settings.unmet_needs); `plan` does not (it plans for another machine)."""

    values: tuple[Any, ...] = (True,)
    cuda: bool = False
    compute_cap: float = 0.0  # the least CUDA compute capability (FlashAttention-2: 8.0, Ampere)
    packages: tuple[tuple[str, str], ...] = ()


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


@dataclass(frozen=True)
class Knob:
    """One LLaMA-Factory key as qwenft knows it."""

    key: str  # LLaMA-Factory's name
    option: str | None = None  # the qwenft option ("--a/--no-a": a switch); None: --set only
    type: type = int  # int | float | str | bool
    help: str = ""
    rule: Rule | None = None  # the range; None: any value of the type
    stages: tuple[Stage, ...] = ()  # the stages that read it; (): every stage
    methods: tuple[Method, ...] = ()  # the methods that read it; (): every method
    commands: tuple[str, ...] = (TRAIN,)  # the commands that offer the option
    choices: tuple[str, ...] = ()  # allowed values of a text knob
    invert: bool = False  # a switch that sets the key to its negation (--no-gradient-checkpointing)
    section: str = ""  # train.yaml's section for a key lf.render.SECTIONS does not place
    aliases: tuple[tuple[str, str], ...] = ()  # option value -> LLaMA-Factory's (eager: disabled)
    refuse: tuple[Refusal, ...] = ()  # values (and combinations) refused before launch
    implies: tuple[tuple[str, Any], ...] = ()  # keys LLaMA-Factory needs beside a set value
    needs: tuple[Needs, ...] = ()  # what a value needs of the machine that trains

    @property
    def flag(self) -> str | None:
        """The option as messages name it (the positive form of a switch)."""
        return self.option.split("/")[0] if self.option else None

    @property
    def param(self) -> str:
        """The Python parameter name of the option in a command function."""
        return (self.flag or self.key).lstrip("-").replace("-", "_")

    @property
    def lf_choices(self) -> tuple[str, ...]:
        """The values LLaMA-Factory gets for the option's choices."""
        return tuple(dict(self.aliases).get(c, c) for c in self.choices)

    def lf_value(self, value: Any) -> Any:
        """The value LLaMA-Factory gets for an option value."""
        if self.aliases and value in dict(self.aliases):
            return dict(self.aliases)[value]
        return (not value) if self.invert and value is not None else value


KNOBS: tuple[Knob, ...] = (
    Knob(
        "cutoff_len",
        "--cutoff-len",
        help="Max tokens per sample; longer ones are cut (default: the recipe's; eval: the run's).",
        rule=POSITIVE_WHOLE("`qwenft data check --model M` suggests one"),
        commands=(TRAIN, PLAN, EVAL, DATA_CHECK),
    ),
    Knob(
        "num_train_epochs",
        "--epochs",
        float,
        "Passes over the data (num_train_epochs).",
        POSITIVE("e.g. --epochs 3"),
    ),
    Knob(
        "max_steps",
        "--max-steps",
        help="Stop after this many optimizer steps.",
        rule=ABOVE_ZERO_WHOLE("leave it out to train for --epochs"),
    ),
    Knob(
        "learning_rate",
        "--lr",
        float,
        "learning_rate.",
        POSITIVE("e.g. --lr 1e-4 (LoRA) or --lr 1e-5 (full)"),
    ),
    Knob(
        "per_device_train_batch_size",
        "--batch-size",
        help="Samples per device and step (per_device_train_batch_size; plan with --method auto: "
        "the largest that fits).",
        rule=POSITIVE_WHOLE("e.g. --batch-size 4"),
        commands=(TRAIN, PLAN),
    ),
    Knob(
        "gradient_accumulation_steps",
        "--grad-accum",
        help="gradient_accumulation_steps.",
        rule=POSITIVE_WHOLE("e.g. --grad-accum 4"),
    ),
    Knob(
        "lora_rank",
        "--lora-rank",
        help="LoRA rank (default 16).",
        rule=POSITIVE_WHOLE("e.g. --lora-rank 16"),
        methods=ADAPTERS,
        commands=(TRAIN, PLAN),
    ),
    Knob(
        "lora_target",
        "--lora-target",
        str,
        "Modules LoRA adapts: all, or a comma list such as q_proj,v_proj.",
        methods=ADAPTERS,
        commands=(TRAIN, PLAN),
    ),
    Knob("lora_alpha", methods=ADAPTERS),
    Knob("lora_dropout", methods=ADAPTERS),
    Knob(
        "use_dora",
        "--dora",
        bool,
        "DoRA: weight-decomposed LoRA (use_dora; lora, qlora).",
        methods=ADAPTERS,
        section="method",
        refuse=(
            Refusal(
                f'{LF} refuses DoRA on a base quantized by HQQ or EETQ ("DoRA is not compatible '
                'with PTQ-quantized models"); bitsandbytes is the quantization DoRA trains on',
                "drop quantization_method (bitsandbytes, the default), or drop --dora",
                with_key="quantization_method",
                with_values=("hqq", "eetq"),
            ),
        ),
    ),
    Knob(
        "use_rslora",
        "--rslora",
        bool,
        "rsLoRA: scale updates by alpha/sqrt(rank) (use_rslora; lora, qlora).",
        methods=ADAPTERS,
        section="method",
    ),
    Knob(
        "pissa_init",
        "--pissa",
        bool,
        "PiSSA: LoRA started from the principal singular vectors (pissa_init; lora).",
        methods=(Method.LORA,),
        section="method",
        # LLaMA-Factory saves the trained adapter relative to the residual base PiSSA leaves; the
        # converted copy (peft's path_initial_model_for_weight_conversion) is a LoRA over the
        # original base, so merging and chatting on the base give the trained model.
        implies=(("pissa_convert", True),),
        refuse=(
            Refusal(
                f'{LF} refuses PiSSA where a frozen reference model is kept ("Cannot use PiSSA '
                'for current training stage")',
                "drop --pissa, or train --stage sft, pt, orpo or simpo",
                with_key="stage",
                with_values=(Stage.DPO.value, Stage.KTO.value),
            ),
            Refusal(
                f"{LF} initializes PiSSA on a quantized base only with scripts/pissa_init.py, "
                "which is not in its pip package",
                "drop --pissa, or train --method lora (unquantized)",
                with_key="quantization_bit",
            ),
            Refusal(
                f"{LF} refuses PiSSA under DeepSpeed ZeRO-3 (it needs scripts/pissa_init.py)",
                "--deepspeed z2 (or none)",
                with_key="deepspeed",
                with_values=ZERO3,
            ),
            Refusal(
                "the plain-LoRA copy of a PiSSA adapter that merge and chat use (pissa_convert) "
                "keeps only lora_A and lora_B, so DoRA's magnitudes would be lost",
                "drop --dora or --pissa",
                with_key="use_dora",
            ),
        ),
    ),
    Knob(
        "pissa_iter",
        rule=Rule(lambda v: v == -1 or v >= 1, "-1 (exact SVD) or a positive whole number"),
        methods=(Method.LORA,),
        section="method",
    ),
    Knob("pissa_convert", methods=(Method.LORA,), section="method"),  # --pissa sets it
    Knob(
        "loraplus_lr_ratio",
        "--loraplus-ratio",
        float,
        "LoRA+: the B matrices learn R times faster than A (loraplus_lr_ratio; lora, qlora).",
        POSITIVE("e.g. --loraplus-ratio 16 (the LoRA+ paper's)"),
        methods=ADAPTERS,
        section="method",
    ),
    Knob(
        "quantization_bit",
        "--bits",
        help="QLoRA quantization: 4 (default) or 8.",
        commands=(PLAN,),
    ),
    Knob(
        "freeze_trainable_layers",
        "--trainable-layers",
        help="--method freeze: train the last N decoder layers (-N: the first N).",
        rule=WHOLE_NOT_ZERO("N > 0 trains the last N decoder layers, N < 0 the first N"),
        methods=(Method.FREEZE,),
        commands=(TRAIN, PLAN),
    ),
    Knob("freeze_trainable_modules", methods=(Method.FREEZE,), section="method"),
    Knob("freeze_extra_modules", methods=(Method.FREEZE,), section="method"),
    Knob(
        "val_size",
        "--val-size",
        float,
        "Held-out fraction (0 = no eval).",
        FRACTION("a share of the samples held out, e.g. 0.1; 0 = none"),
    ),
    Knob(
        "save_steps",
        "--save-steps",
        help="Steps between checkpoints (default: ~10 % of the run).",
        rule=POSITIVE("steps between checkpoints, e.g. 500"),
    ),
    Knob(
        "logging_steps",
        "--logging-steps",
        help="Steps between loss points (default: ~2 % of the run).",
        rule=POSITIVE("steps between loss lines, e.g. 10"),
    ),
    Knob(
        "pref_beta",
        "--beta",
        float,
        "pref_beta: dpo/orpo/simpo/kto strength (default 0.1).",
        POSITIVE("e.g. --beta 0.1 (LLaMA-Factory's default)"),
        stages=(*PREFERENCE, Stage.KTO),
    ),
    Knob(
        "pref_loss",
        "--pref-loss",
        str,
        "--stage dpo's loss (default sigmoid).",
        stages=(Stage.DPO,),
        choices=DPO_LOSSES,
    ),
    Knob(
        "pref_ftx",
        "--sft-weight",
        float,
        "pref_ftx: weight of an added SFT loss (dpo/orpo/simpo/kto).",
        AT_LEAST_ZERO("0 = no added SFT loss, e.g. --sft-weight 0.5"),
        stages=(*PREFERENCE, Stage.KTO),
    ),
    Knob("pref_bco_weight", stages=(Stage.DPO,), section="method"),
    Knob("dpo_label_smoothing", stages=(Stage.DPO,), section="method"),
    Knob(
        "simpo_gamma",
        rule=AT_LEAST_ZERO("the target reward margin, e.g. 0.5"),
        stages=(Stage.SIMPO,),
    ),
    Knob("kto_chosen_weight", rule=AT_LEAST_ZERO("e.g. 1.0"), stages=(Stage.KTO,)),
    Knob("kto_rejected_weight", rule=AT_LEAST_ZERO("e.g. 1.0"), stages=(Stage.KTO,)),
    Knob("ref_model", stages=(Stage.DPO, Stage.KTO), section="method"),
    Knob("packing", stages=(Stage.SFT, Stage.PT)),
    Knob("neat_packing", stages=(Stage.SFT,)),
    Knob(
        "disable_gradient_checkpointing",
        "--gradient-checkpointing/--no-gradient-checkpointing",
        bool,
        "Recompute activations in the backward pass (LLaMA-Factory's default: on).",
        commands=(PLAN,),
        invert=True,
        section="model",
    ),
    Knob(
        "flash_attn",
        "--attn",
        str,
        "Attention kernel: auto (transformers' choice), sdpa, eager, fa2 (FlashAttention-2: a "
        "CUDA GPU and flash-attn).",
        choices=("auto", "sdpa", "eager", "fa2"),
        aliases=(("eager", "disabled"),),
        needs=(
            Needs(("fa2",), cuda=True, compute_cap=8.0, packages=(("flash-attn", "flash_attn"),)),
        ),
        refuse=(
            Refusal(
                f"{LF} raises NotImplementedError for FlashAttention-3 on every model but gpt-oss",
                "--attn fa2 (FlashAttention-2) or --attn sdpa",
                values=("fa3",),
            ),
        ),
    ),
    Knob(
        "enable_liger_kernel",
        "--liger/--no-liger",
        bool,
        "Liger kernels: fused RMSNorm, RoPE, SwiGLU and cross-entropy (a CUDA GPU and "
        "liger-kernel).",
        commands=(TRAIN, PLAN),
        needs=(Needs(cuda=True, packages=(("liger-kernel", "liger_kernel"),)),),
    ),
    Knob(
        "use_unsloth",
        "--unsloth",
        bool,
        "Unsloth kernels (a CUDA GPU and unsloth; not with ZeRO-3).",
        needs=(Needs(cuda=True, packages=(("unsloth", "unsloth"),)),),
        refuse=(
            Refusal(
                f"{LF} refuses Unsloth under DeepSpeed ZeRO-3",
                "--deepspeed z2 (or none), or drop --unsloth",
                with_key="deepspeed",
                with_values=ZERO3,
            ),
        ),
    ),
    Knob(
        "shift_attn",
        type=bool,
        section="model",
        refuse=(
            Refusal(
                f"LongLoRA's shift short attention is for llama models only in {LF}; on Qwen it "
                "logs a warning and trains without it",
                "drop shift_attn; for long samples raise --cutoff-len (--set rope_scaling=yarn "
                "stretches the context)",
            ),
        ),
    ),
    Knob(
        "mixture_of_depths",
        type=str,
        section="model",
        refuse=(
            Refusal(
                f"{LF} converts only bloom, falcon, gemma, llama, mistral, mixtral, phi and "
                'starcoder2 models to Mixture-of-Depths (on Qwen: "Current model is not '
                'supported"), and its MoD package is not installed',
                "drop mixture_of_depths",
            ),
        ),
    ),
    Knob(
        "per_device_eval_batch_size",
        "--batch-size",
        help="Sequences per forward (per_device_eval_batch_size; default 1).",
        rule=POSITIVE_WHOLE("e.g. 4"),
        commands=(EVAL,),
    ),
    Knob(
        "max_new_tokens",
        "--max-new-tokens",
        help="Longest generated answer (default 256).",
        rule=POSITIVE_WHOLE("e.g. --max-new-tokens 256"),
        commands=(EVAL,),
        section="eval",
    ),
    Knob(
        "max_samples",
        "--max-samples",
        help="Use only the first N samples.",
        rule=POSITIVE_WHOLE("e.g. --max-samples 100"),
        commands=(EVAL,),
    ),
)

BY_KEY: dict[str, Knob] = {k.key: k for k in KNOBS}


def offered(command: str) -> tuple[Knob, ...]:
    """The knobs whose options `command` offers, in table order."""
    return tuple(k for k in KNOBS if k.option and command in k.commands)


def _option_of(key: str, command: str | None = None) -> str | None:
    """The option that sets `key` (on `command`, when given; else on any command)."""
    knob = BY_KEY.get(key)
    if knob is None or knob.option is None:
        return None
    if command is not None and command not in knob.commands:
        return None
    return knob.flag


# The LLaMA-Factory keys that options of `train` and `plan` set: messages name the option.
KEY_OPTIONS: dict[str, str] = {
    k.key: k.flag for k in KNOBS if k.flag and ({TRAIN, PLAN} & set(k.commands))
}
# key -> (test, what it must be, hint), for every knob with a range.
RANGES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    k.key: (k.rule.test, k.rule.must, k.rule.hint) for k in KNOBS if k.rule
}


def key_label(key: str) -> str:
    """How messages name a LLaMA-Factory key: with the qwenft option that sets it, if any."""
    option = KEY_OPTIONS.get(key)
    return f"{option} ({key})" if option else key


def bad_value(key: str, must: str, value: Any, origin: str = "", command: str = TRAIN) -> str:
    """The refusal of a value, naming the qwenft option first, then the key and where the value
    came from: "--lr must be positive, got 0.0 (learning_rate, from --set learning_rate=0)"."""
    option = _option_of(key, command) or KEY_OPTIONS.get(key)
    notes = ", ".join(n for n in (key if option else "", origin) if n)
    shown = "null" if value is None else repr(value)
    return f"{option or key} must be {must}, got {shown}" + (f" ({notes})" if notes else "")


class KnobValues(Mapping[str, Any]):
    """The knobs a person set, by LLaMA-Factory key: every key is a row of KNOBS and every value
    one LLaMA-Factory reads (a switch already inverted where the option says the opposite).
    Knobs left unset (None) are not in it."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        given = dict(values or {})
        unknown = [k for k in given if k not in BY_KEY]
        if unknown:
            raise KeyError(f"not in the knob table (qwenft.knobs.KNOBS): {', '.join(unknown)}")
        self._values = {k: v for k, v in given.items() if v is not None}

    @classmethod
    def from_options(cls, command: str, params: Mapping[str, Any]) -> KnobValues:
        """From the option values of a command (by parameter name, as knob_options passes them)."""
        return cls({k.key: k.lf_value(params.get(k.param)) for k in offered(command)})

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"KnobValues({self._values!r})"


NO_KNOBS = KnobValues()  # the default of a command's `knobs` parameter (knob_options fills it)


def as_number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 as a string; a learning rate typed that way must stay a number."""
    import re

    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        return float(value)
    return value


def out_of_range(
    values: Mapping[str, Any], origin: Mapping[str, str] | None = None, command: str = TRAIN
) -> list[QwenftError]:
    """One problem for each value outside its knob's range (or not a number where one is due)."""
    problems = []
    for key, value in values.items():
        knob = BY_KEY.get(key)
        if knob is None or knob.rule is None or value is None:
            continue
        where = (origin or {}).get(key, "")
        number = as_number(value)  # --config's 1e-4 is YAML 1.1 text
        if not isinstance(number, int | float) or isinstance(number, bool):
            problems.append(
                QwenftError(bad_value(key, "a number", value, where, command), knob.rule.hint)
            )
        elif not knob.rule.test(number):
            problems.append(
                QwenftError(bad_value(key, knob.rule.must, value, where, command), knob.rule.hint)
            )
    return problems


def inapplicable(keys: Mapping[str, Any], stage: str, method: str | None) -> list[QwenftError]:
    """One problem for each key the run's stage or method would ignore in silence (method None:
    not chosen yet), and for a --pref-loss that is not a DPO loss qwenft offers."""
    problems = []
    for key, value in keys.items():
        knob = BY_KEY.get(key)
        if knob is None:
            continue
        if key == "pref_loss" and stage in (Stage.ORPO, Stage.SIMPO):
            problems.append(
                QwenftError(
                    f"--stage {stage} sets pref_loss: {stage} itself; --pref-loss {value} is for "
                    "--stage dpo",
                    f"drop --pref-loss, or train --stage dpo --pref-loss {value}",
                )
            )
            continue
        if knob.stages and stage not in knob.stages:
            problems.append(
                QwenftError(
                    f"{key_label(key)} does nothing for --stage {stage}: it applies to --stage "
                    + ", ".join(knob.stages),
                    f"drop it, or train --stage {knob.stages[0]}",
                )
            )
        if knob.methods and method is not None and method not in knob.methods:
            problems.append(
                QwenftError(
                    f"{key_label(key)} does nothing for --method {method}: it applies to --method "
                    + ", ".join(knob.methods),
                    f"drop it, or train --method {knob.methods[0]}",
                )
            )
        refused_values = {v for r in knob.refuse if not r.with_key for v in r.values}
        if knob.choices and value not in (None, *knob.lf_choices, *refused_values):
            if value in (Stage.ORPO, Stage.SIMPO):
                hint = f"train --stage {value} (it sets pref_loss: {value} itself)"
            elif value == "kto_pair":
                hint = "for KTO, train --stage kto on labelled data"
            else:
                hint = f"choose one of {', '.join(knob.choices)}"
            problems.append(
                QwenftError(
                    f"{knob.flag or key} {value} is not one of the "
                    + ("DPO losses" if key == "pref_loss" else "values")
                    + f" qwenft offers ({', '.join(knob.choices)})",
                    hint,
                )
            )
    return problems


def _label(key: str, value: Any) -> str:
    """A key and its value as a person set them: "--attn fa3", "--dora", "shift_attn: true"."""
    knob = BY_KEY.get(key)
    if key in ("deepspeed", "stage", "method"):
        return f"--{key} {value}"
    if knob is not None and knob.flag and key in KEY_OPTIONS:
        if knob.type is bool:
            return knob.flag if value is True else f"{knob.flag} ({key}: {str(value).lower()})"
        shown = next((o for o, lf in knob.aliases if lf == value), value)
        return f"{knob.flag} {shown}"
    return f"{key}: {str(value).lower() if isinstance(value, bool) else value}"


def refused(
    values: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> list[QwenftError]:
    """One problem for each value (or combination) the knob table refuses (Knob.refuse), and for
    a key set against what a knob implies (Knob.implies). `context`: the run's other choices a
    refusal may name (deepspeed, stage, method), where they are known."""
    seen = {**values, **{k: v for k, v in (context or {}).items() if v is not None}}
    problems = []
    for key, value in values.items():
        knob = BY_KEY.get(key)
        if knob is None:
            continue
        for rule in knob.refuse:
            if rule.applies(value, seen):
                with_ = (
                    f" with {_label(rule.with_key, seen[rule.with_key])}" if rule.with_key else ""
                )
                problems.append(QwenftError(f"{_label(key, value)}{with_}: {rule.why}", rule.fix))
        if _is_set(value):
            for other, needed in knob.implies:
                if other in values and values[other] != needed:
                    problems.append(
                        QwenftError(
                            f"{_label(key, value)} needs {_label(other, needed)}, got "
                            f"{_label(other, values[other])}",
                            f"drop {other} ({knob.flag or key} sets it)",
                        )
                    )
    return problems


def implied(values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys the set knobs need beside them (Knob.implies), for those not set already."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        knob = BY_KEY.get(key)
        if knob is not None and _is_set(value):
            out.update({k: v for k, v in knob.implies if k not in values})
    return out


def needs_of(values: Mapping[str, Any]) -> list[tuple[str, Needs]]:
    """What the set values need of the machine: (how the value is named, its Needs)."""
    out = []
    for key, value in values.items():
        knob = BY_KEY.get(key)
        for need in knob.needs if knob else ():
            if value in need.values:
                out.append((_label(key, value), need))
    return out
