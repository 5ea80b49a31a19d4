"""The knob table: every LLaMA-Factory key qwenft names, declared once.

A knob is one row of `KNOBS`: the LLaMA-Factory key, the qwenft option that sets it (if any) and
the commands that offer that option, its type and help, the range a value must be in, and the
stages and methods that read it. Everything else is derived from the table:

- the options of `train`, `plan`, `eval` and `data check` (qwenft.cli.common.knob_options);
- the range checks, whichever layer set the key (--config, an option, --set) and whichever
  command it came through (`problems`);
- the applicability checks: a key that the run's stage or method would ignore in silence, or
  that is set without the switch it belongs to (`requires`), is refused (`inapplicable`);
- how messages name a key: with the qwenft option that sets it (`key_label`, `bad_value`);
- the values and combinations refused before launch because LLaMA-Factory would refuse them, ignore
  them in silence or crash on them (`Refusal`, `refused`), the keys a knob writes beside it unless
  they are set (`implies`), and what a value needs of the machine that trains: a CUDA device, a
  package (`Needs`; train checks them, qwenft.settings.unmet_needs).

Adding a knob is one `Knob(...)` row (plus its tests). Pure data: imports only choices and errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from qwenft.choices import DPO_LOSSES, DeepSpeed, Engine, Method, Stage, Tracker
from qwenft.errors import QwenftError

# The commands that offer knob options (their names as a person types them).
TRAIN, PLAN, EVAL, DATA_CHECK, SCORE = "train", "plan", "eval", "data check", "score"


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

# the stages of LLaMA-Factory's dpo stage (a pair loss with pref_beta; rm trains on pairs too)
PREFERENCE = tuple(s for s in Stage if s.facts.lf_stage == Stage.DPO.value)
ADAPTERS = tuple(m for m in Method if m.facts.adapter)
ZERO3 = (DeepSpeed.Z3.value, DeepSpeed.Z3_OFFLOAD.value)
WITH_DEEPSPEED = tuple(d.value for d in DeepSpeed if d != DeepSpeed.NONE)
OWN_WEIGHTS = tuple(m for m in Method if m.facts.own_weights)
LF = "LLaMA-Factory 0.9.5"
# The run's choices a Refusal may name beside the keys it sets (`refused`'s context): processes is
# the count of processes in all (--gpus or --cpu-procs, times --nnodes).
RUN_CHOICES = ("deepspeed", "stage", "method", "processes")


@dataclass(frozen=True)
class Refusal:
    """Values of a knob refused before launch, because LLaMA-Factory would refuse them, ignore them
    in silence or crash on them: "OPTION VALUE: `why`", with `fix` as the hint. `values` (): every
    value that is set (not None, not false). With `with_key`, only together with that key set to
    one of `with_values` ((): to any value that is set; `other_than`: to a value that is set and
    not one of them); the key is another key the run sets, or one of the run's choices `refused`
    is given (RUN_CHOICES). `also`: more (key, values) that must all hold (the key set to one of
    the values)."""

    why: str
    fix: str
    values: tuple[Any, ...] = ()
    with_key: str = ""
    with_values: tuple[Any, ...] = ()
    other_than: bool = False
    also: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def applies(self, value: Any, context: Mapping[str, Any]) -> bool:
        if not (value in self.values if self.values else _is_set(value)):
            return False
        if not all(context.get(key) in values for key, values in self.also):
            return False
        if not self.with_key:
            return True
        other = context.get(self.with_key)
        if self.other_than:
            return _is_set(other) and other not in self.with_values
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
    extra: str = ""  # qwenft's extra that installs them (pyproject.toml, requirements/<extra>.lock)


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


@dataclass(frozen=True)
class Knob:
    """One LLaMA-Factory key as qwenft knows it."""

    key: str  # LLaMA-Factory's name (or qwenft's own, with own=True)
    option: str | None = None  # the qwenft option ("--a/--no-a": a switch); None: --set only
    type: type = int  # int | float | str | bool | list (a repeatable text option)
    help: str = ""
    rule: Rule | None = None  # the range; None: any value of the type
    stages: tuple[Stage, ...] = ()  # the stages that read it; (): every stage
    methods: tuple[Method, ...] = ()  # the methods that read it; (): every method
    requires: str = ""  # the switch (a knob's key) it does nothing without: --galore-rank, --galore
    # (its methods, stages and section default to the switch's: _with_switch)
    commands: tuple[str, ...] = (TRAIN,)  # the commands that offer the option
    choices: tuple[str, ...] = ()  # allowed values of a text knob
    many: bool = False  # a text knob taking several choices: a comma list (or a YAML list)
    invert: bool = False  # a switch that sets the key to its negation (--no-gradient-checkpointing)
    section: str = ""  # train.yaml's section for a key lf.render.SECTIONS does not place
    aliases: tuple[tuple[str, str], ...] = ()  # option value -> LLaMA-Factory's (eager: disabled)
    refuse: tuple[Refusal, ...] = ()  # values (and combinations) refused before launch
    implies: tuple[tuple[str, Any], ...] = ()  # keys written beside a set value, unless set
    needs: tuple[Needs, ...] = ()  # what a value needs of the machine that trains
    # LLaMA-Factory has no such key: qwenft carries it out before launch, or its GRPO process reads
    # it (a TRL stage's: TRL_READS)
    own: bool = False
    vision: bool = False  # read only for vision-language models (a *_vl template): vision_keys

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

    def given(self, value: Any) -> tuple[Any, ...]:
        """The values set: a `many` knob's each, in order, once (none for null or "none",
        LLaMA-Factory's word for none); any other knob's value alone."""
        if not self.many:
            return (value,)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            items = [] if items is None else [items]
        names = tuple(dict.fromkeys(n for n in (str(v).strip() for v in items) if n))
        return () if names == ("none",) else names


# The optimizers' shared refusals (their rows are below).
GALORE_OPTIMS = ("adamw_torch", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor")
NO_DEEPSPEED = Refusal(
    f'{LF} refuses GaLore and APOLLO under DeepSpeed ("GaLore and APOLLO are incompatible with '
    'DeepSpeed yet")',
    "--deepspeed none (--method full's auto is z3)",
    with_key="deepspeed",
    with_values=WITH_DEEPSPEED,
)


def _one_optimizer(key: str, fix: str) -> Refusal:
    """Two of GaLore, APOLLO and BAdam (each pair refused once, on the first one's row)."""
    return Refusal(
        f'{LF} runs one of them ("Cannot use GaLore, APOLLO or BAdam together")', fix, with_key=key
    )


def _layerwise(name: str) -> tuple[Refusal, ...]:
    """Layer-wise GaLore and APOLLO step each weight in its gradient hook: one process, no
    gradient accumulation (LLaMA-Factory's parser and its optimizer factory)."""
    flag = f"--{name.lower()}-layerwise"
    return (
        Refusal(
            f'{LF} refuses layer-wise {name} in distributed training ("Distributed training does '
            f'not support layer-wise {name}.")',
            f"train on one process, or drop {flag}",
            with_key="processes",
            with_values=(1,),
            other_than=True,
        ),
        Refusal(
            f'{LF} steps each weight during the backward pass ("Per-layer {name} does not support '
            'gradient accumulation.")',
            f"drop --grad-accum ({flag} sets 1); a larger --batch-size keeps more samples a step",
            with_key="gradient_accumulation_steps",
            with_values=(1,),
            other_than=True,
        ),
    )


def _badam_mode_only(mode: str) -> Refusal:
    """A BAdam key that LLaMA-Factory reads in one --badam-mode only (ignored in the other)."""
    return Refusal(
        f"{LF} reads it in BAdam's {mode} mode only",
        f"drop it, or --badam-mode {mode}",
        with_key="badam_mode",
        with_values=("ratio" if mode == "layer" else "layer",),
    )


_ROWS: tuple[Knob, ...] = (
    Knob(
        "cutoff_len",
        "--cutoff-len",
        help="Max tokens per sample; longer ones are cut (default: the recipe's; eval: the run's).",
        rule=POSITIVE_WHOLE("`qwenft data check --model M` suggests one"),
        commands=(TRAIN, PLAN, EVAL, DATA_CHECK, SCORE),
    ),
    Knob(
        "preprocessing_num_workers",
        "--data-workers",
        help="Processes that tokenize the data, at most the cores; small data takes one "
        "(preprocessing_num_workers; default: the recipe's 16, capped at the cores).",
        rule=POSITIVE_WHOLE("e.g. --data-workers 8"),
        commands=(TRAIN, DATA_CHECK),
    ),
    Knob(
        "image_max_pixels",
        "--image-max-pixels",
        help="Images over this many pixels are scaled down before the vision encoder: fewer "
        "pixels, fewer tokens per image (image_max_pixels; default LLaMA-Factory's 589824, "
        "768*768).",
        rule=POSITIVE_WHOLE("e.g. --image-max-pixels 262144 (512*512)"),
        commands=(TRAIN, PLAN, DATA_CHECK),
        section="model",
        vision=True,
    ),
    Knob(
        "image_min_pixels",
        "--image-min-pixels",
        help="Images under this many pixels are scaled up (image_min_pixels; default "
        "LLaMA-Factory's 1024, 32*32).",
        rule=POSITIVE_WHOLE("e.g. --image-min-pixels 3136 (56*56)"),
        commands=(TRAIN, PLAN, DATA_CHECK),
        section="model",
        vision=True,
    ),
    Knob(
        "freeze_vision_tower",
        "--train-vision/--freeze-vision",
        bool,
        "Vision-language models: train the vision tower too (its linears under LoRA); frozen by "
        "default (freeze_vision_tower).",
        invert=True,
        commands=(TRAIN, PLAN),
        section="method",
        vision=True,
    ),
    Knob(
        "freeze_multi_modal_projector",
        "--train-projector/--freeze-projector",
        bool,
        "Vision-language models, full or freeze: train the projector (merger) between the vision "
        "tower and the language model; frozen by default (freeze_multi_modal_projector).",
        invert=True,
        commands=(TRAIN, PLAN),
        section="method",
        vision=True,
        refuse=(
            Refusal(
                f"{LF} trains no projector under LoRA: it reads freeze_multi_modal_projector for "
                "full and freeze only, and LoRA's targets leave the merger out (LLaMA-Factory "
                "issue #8334)",
                "--set additional_target=merger trains the merger fully beside the adapter; or "
                "--method full / freeze",
                values=(False,),
                with_key="method",
                with_values=ADAPTERS,
            ),
        ),
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
    # Mixture-of-experts models (issue 29, qwenft.models.coverage): their experts and router are
    # parameters, not linear layers; qwenft makes the initial adapter that covers them.
    Knob(
        "lora_experts",
        "--lora-experts",
        str,
        "Mixture-of-experts models: LoRA on the experts too (on, the default), or off: the "
        "attention and other linear layers only (lora, qlora).",
        methods=ADAPTERS,
        commands=(TRAIN, PLAN),
        choices=("on", "off"),
        section="method",
        own=True,  # qwenft makes the adapter (PEFT target_parameters) before launch
    ),
    Knob(
        "train_router",
        "--train-router/--freeze-router",
        bool,
        "Mixture-of-experts models: LoRA on the router (mlp.gate) too; frozen by default "
        "(lora, qlora).",
        methods=ADAPTERS,
        commands=(TRAIN, PLAN),
        section="method",
        own=True,
    ),
    Knob(
        "moe_aux_loss_coef",
        "--moe-aux-loss",
        float,
        "Mixture-of-experts models: weight of the router's load-balancing loss, added to the "
        "training loss (moe_aux_loss_coef; it turns on the router logits).",
        AT_LEAST_ZERO("e.g. --moe-aux-loss 0.001 (Qwen3-MoE's own router_aux_loss_coef)"),
        section="model",
    ),
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
            Refusal(
                "merge, chat, serve and eval apply the plain-LoRA copy LLaMA-Factory writes with "
                "pissa_convert (the run's own adapter is relative to PiSSA's residual base)",
                "drop pissa_convert (--pissa sets it)",
                with_key="pissa_convert",
                with_values=(False,),
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
        "loftq",
        "--loftq",
        bool,
        "LoftQ: start QLoRA from a 4-bit base and adapter that together approximate the base "
        "(qwenft computes them once, into its cache; qlora).",
        methods=(Method.QLORA,),
        own=True,  # LLaMA-Factory 0.9.5 takes LoftQ only from its repository's scripts
        refuse=(
            Refusal(
                "LoftQ's initial adapter is a plain LoRA, which LLaMA-Factory trains as it is "
                "(DoRA would be ignored)",
                "drop --dora or --loftq",
                with_key="use_dora",
            ),
            Refusal(
                "qwenft computes LoftQ for 4-bit NF4, the quantization LLaMA-Factory's QLoRA "
                "loads on bitsandbytes",
                "drop quantization_bit (4, the default)",
                with_key="quantization_bit",
                with_values=(2, 3, 5, 6, 8),
            ),
            Refusal(
                "the LoftQ adapter is the run's starting point, and it would replace another one",
                "drop adapter_name_or_path or --loftq",
                with_key="adapter_name_or_path",
            ),
        ),
    ),
    Knob(
        "use_llama_pro",
        "--llama-pro",
        help="LLaMA Pro: add N identity blocks to the base (qwenft expands it once, into its "
        "cache) and train only them (use_llama_pro; freeze, lora). N must divide the base's "
        "decoder layers.",
        rule=POSITIVE_WHOLE(
            "e.g. --llama-pro 2: qwenft expands the base, a new block after each half of its "
            "layers (a base expanded by LLaMA-Factory's scripts/llama_pro.py is not taken)"
        ),
        methods=(Method.FREEZE, Method.LORA),
        section="method",
        refuse=(
            Refusal(
                "LLaMA Pro trains the new blocks, and sets freeze_trainable_layers to their "
                "number itself",
                "drop --trainable-layers",
                with_key="freeze_trainable_layers",
            ),
        ),
    ),
    Knob(
        "quantization_bit",
        "--bits",
        help="QLoRA quantization: 4 (default) or 8 (bitsandbytes; HQQ and EETQ through --set "
        "quantization_method).",
        rule=Rule(lambda v: v in (1, 2, 3, 4, 5, 6, 8), "1, 2, 3, 4, 5, 6 or 8", "e.g. --bits 4"),
        methods=ADAPTERS,
        commands=(PLAN,),
        refuse=(
            Refusal(
                f'bitsandbytes quantizes to 4 or 8 bits ({LF}: "Bitsandbytes only accepts 4-bit '
                'or 8-bit quantization")',
                "--bits 4 or 8, or --set quantization_method=hqq for 1 to 6 bits",
                values=(1, 2, 3, 5, 6),
                with_key="quantization_method",
                with_values=("bnb",),
            ),
            Refusal(
                f'EETQ quantizes to 8 bits only ({LF}: "EETQ only accepts 8-bit quantization")',
                "--bits 8",
                values=(1, 2, 3, 4, 5, 6),
                with_key="quantization_method",
                with_values=("eetq",),
            ),
        ),
    ),
    Knob(
        "quantization_method",
        type=str,
        methods=ADAPTERS,
        needs=(
            Needs(("hqq",), packages=(("hqq", "hqq"),)),
            Needs(("eetq",), cuda=True, packages=(("eetq", "eetq"),)),
        ),
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
    # The optimizers (issue 22): GaLore, APOLLO and BAdam train the model's own weights (LoRA:
    # "Cannot use LoRA with GaLore, APOLLO or BAdam together"), one at a time, with the packages
    # of the optimizers extra. LLaMA-Factory runs distributed whenever torchrun launches it, and
    # qwenft launches through torchrun with DeepSpeed or with more than one process.
    Knob(
        "use_galore",
        "--galore",
        bool,
        "GaLore: AdamW on gradients projected to a low rank (use_galore; full, freeze; the "
        "optimizers extra; --deepspeed none).",
        methods=OWN_WEIGHTS,
        commands=(TRAIN, PLAN),
        section="method",
        implies=(("optim", "adamw_torch"),),
        needs=(Needs(packages=(("galore-torch", "galore_torch"),), extra="optimizers"),),
        refuse=(
            NO_DEEPSPEED,
            _one_optimizer("use_apollo", "drop --galore or --apollo"),
            _one_optimizer("use_badam", "drop --galore or --badam"),
            Refusal(
                f"{LF} builds GaLore on AdamW, 8-bit AdamW or Adafactor only (another optim: "
                "NotImplementedError once the model is loaded)",
                "drop optim (--galore sets adamw_torch), or set one of " + ", ".join(GALORE_OPTIMS),
                with_key="optim",
                with_values=GALORE_OPTIMS,
                other_than=True,
            ),
        ),
    ),
    Knob(
        "galore_rank",
        "--galore-rank",
        help="GaLore's projection rank (galore_rank, default 16).",
        rule=POSITIVE_WHOLE("e.g. --galore-rank 128"),
        requires="use_galore",
        commands=(TRAIN, PLAN),
    ),
    Knob(
        "galore_layerwise",
        "--galore-layerwise",
        bool,
        "GaLore: step each weight as its gradient arrives, so gradients are not held (one "
        "process, no gradient accumulation).",
        requires="use_galore",
        commands=(TRAIN, PLAN),
        implies=(("gradient_accumulation_steps", 1),),
        refuse=_layerwise("GaLore"),
    ),
    Knob("galore_target", type=str, requires="use_galore"),
    Knob(
        "galore_update_interval",
        rule=POSITIVE_WHOLE("steps between projection updates, e.g. 200 (the default)"),
        requires="use_galore",
    ),
    Knob(
        "galore_scale",
        type=float,
        rule=POSITIVE("the update's scale, e.g. 2.0 (the default)"),
        requires="use_galore",
    ),
    Knob("galore_proj_type", type=str, requires="use_galore"),
    Knob(
        "use_apollo",
        "--apollo",
        bool,
        "APOLLO: AdamW with low-rank, channel-wise scaled updates (use_apollo; full, freeze; the "
        "optimizers extra; --deepspeed none).",
        methods=OWN_WEIGHTS,
        commands=(TRAIN, PLAN),
        section="method",
        implies=(("optim", "adamw_torch"),),
        needs=(Needs(packages=(("apollo-torch", "apollo_torch"),), extra="optimizers"),),
        refuse=(
            NO_DEEPSPEED,
            _one_optimizer("use_badam", "drop --apollo or --badam"),
            Refusal(
                f"{LF} builds APOLLO on AdamW only (another optim: NotImplementedError once the "
                "model is loaded)",
                "drop optim (--apollo sets adamw_torch)",
                with_key="optim",
                with_values=("adamw_torch",),
                other_than=True,
            ),
        ),
    ),
    Knob(
        "apollo_rank",
        "--apollo-rank",
        help="APOLLO's projection rank (apollo_rank, default 16).",
        rule=POSITIVE_WHOLE("e.g. --apollo-rank 128"),
        requires="use_apollo",
        commands=(TRAIN, PLAN),
    ),
    Knob(
        "apollo_layerwise",
        "--apollo-layerwise",
        bool,
        "APOLLO: step each weight as its gradient arrives, so gradients are not held (one "
        "process, no gradient accumulation).",
        requires="use_apollo",
        commands=(TRAIN, PLAN),
        implies=(("gradient_accumulation_steps", 1),),
        refuse=_layerwise("APOLLO"),
    ),
    Knob("apollo_target", type=str, requires="use_apollo"),
    Knob(
        "apollo_update_interval",
        rule=POSITIVE_WHOLE("steps between projection updates, e.g. 200 (the default)"),
        requires="use_apollo",
    ),
    Knob(
        "apollo_scale",
        type=float,
        rule=POSITIVE("the update's scale, e.g. 32.0 (the default)"),
        requires="use_apollo",
    ),
    *(
        Knob(key, type=str, requires="use_apollo")
        for key in ("apollo_proj", "apollo_proj_type", "apollo_scale_type")
    ),
    Knob(
        "apollo_scale_front",
        type=bool,
        requires="use_apollo",
    ),
    Knob(
        "use_badam",
        "--badam",
        bool,
        "BAdam: AdamW on one decoder layer at a time (use_badam; full; the optimizers extra).",
        methods=OWN_WEIGHTS,
        commands=(TRAIN, PLAN),
        section="method",
        implies=(("badam_mode", "layer"),),
        needs=(Needs(packages=(("badam", "badam"),), extra="optimizers"),),
    ),
    Knob(
        "badam_mode",
        "--badam-mode",
        str,
        "BAdam: layer (one decoder layer at a time, the default) or ratio (a share of each "
        "weight; one process, no DeepSpeed).",
        requires="use_badam",
        choices=("layer", "ratio"),
        refuse=(
            Refusal(
                "layer-wise BAdam makes the decoder layer it trains trainable itself, so "
                "--method freeze's choice of layers would be ignored in silence",
                "--method full, or --badam-mode ratio (it updates the frozen model's trainable "
                "layers only)",
                values=("layer",),
                with_key="method",
                with_values=(Method.FREEZE.value,),
            ),
            Refusal(
                f'{LF} runs layer-wise BAdam distributed only under ZeRO-3 ("Layer-wise BAdam '
                'only supports DeepSpeed ZeRO-3 training"), and qwenft launches every DeepSpeed '
                "run distributed (torchrun)",
                "--deepspeed z3, or none (on one process)",
                values=("layer",),
                with_key="deepspeed",
                with_values=tuple(d for d in WITH_DEEPSPEED if d not in ZERO3),
            ),
            Refusal(
                f'{LF} runs layer-wise BAdam on several processes only under ZeRO-3 ("Layer-wise '
                'BAdam only supports DeepSpeed ZeRO-3 training")',
                "--deepspeed z3",
                values=("layer",),
                with_key="processes",
                with_values=(1,),
                other_than=True,
                also=(("deepspeed", (DeepSpeed.NONE.value,)),),
            ),
            *(
                Refusal(
                    f'{LF} refuses ratio-based BAdam in distributed training ("Radio-based BAdam '
                    'does not yet support distributed training"); qwenft launches every DeepSpeed '
                    "run, and every run of several processes, distributed (torchrun)",
                    "--deepspeed none on one process, or --badam-mode layer",
                    values=("ratio",),
                    with_key=key,
                    with_values=accepted,
                    other_than=key == "processes",
                )
                for key, accepted in (("deepspeed", WITH_DEEPSPEED), ("processes", (1,)))
            ),
        ),
    ),
    Knob(
        "badam_switch_interval",
        "--badam-switch-interval",
        help="BAdam layer mode: steps before the next decoder layer trains (default 50; -1: "
        "never switch).",
        rule=Rule(
            lambda v: v == -1 or v >= 1,
            "-1 (never switch) or a positive whole number",
            "e.g. --badam-switch-interval 50 (the default)",
        ),
        requires="use_badam",
        refuse=(_badam_mode_only("layer"),),
    ),
    Knob(
        "badam_switch_mode",
        type=str,
        requires="use_badam",
        refuse=(_badam_mode_only("layer"),),
    ),
    Knob(
        "badam_start_block",
        rule=AT_LEAST_ZERO("the decoder layer to start with, e.g. 0"),
        requires="use_badam",
        refuse=(_badam_mode_only("layer"),),
    ),
    Knob(
        "badam_update_ratio",
        type=float,
        rule=Rule(lambda v: 0 < v <= 1, "in (0, 1]", "the share of each weight updated, e.g. 0.05"),
        requires="use_badam",
        refuse=(_badam_mode_only("ratio"),),
    ),
    Knob(
        "badam_mask_mode",
        type=str,
        requires="use_badam",
        refuse=(_badam_mode_only("ratio"),),
    ),
    Knob(
        "badam_verbose",
        rule=Rule(lambda v: v in (0, 1, 2), "0, 1 or 2", "0: quiet, 2: the trainable parameters"),
        requires="use_badam",
    ),
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
        "report_to",
        "--report-to",
        str,
        "Experiment trackers, a comma list, each writing inside the run folder unless your "
        "environment points it elsewhere: tensorboard (RUN/tb), mlflow (RUN/mlflow.db), wandb "
        "(offline, RUN/wandb), swanlab (RUN/swanlog), trackio (RUN/trackio). The tracking extra "
        "installs the first three.",
        choices=Tracker.values(),
        many=True,
        needs=(
            Needs(
                (Tracker.TENSORBOARD,),
                packages=(("tensorboard", "tensorboard"),),
                extra="tracking",
            ),
            Needs(
                (Tracker.MLFLOW,),
                # the run's SQLite store: SQLAlchemy and alembic (mlflow-skinny leaves them out)
                packages=(
                    ("mlflow-skinny", "mlflow"),
                    ("sqlalchemy", "sqlalchemy"),
                    ("alembic", "alembic"),
                ),
                extra="tracking",
            ),
            Needs((Tracker.WANDB,), packages=(("wandb", "wandb"),), extra="tracking"),
            Needs((Tracker.SWANLAB,), packages=(("swanlab", "swanlab"),)),
            Needs((Tracker.TRACKIO,), packages=(("trackio", "trackio"),)),
        ),
        refuse=(
            Refusal(
                f'{LF} crashes on report_to: swanlab ("No active Run", its issue #10704); '
                "qwenft runs SwanLab through use_swanlab, which works",
                "drop use_swanlab (--report-to swanlab sets it)",
                values=(Tracker.SWANLAB,),
                with_key="use_swanlab",
                with_values=(False,),
            ),
        ),
    ),
    Knob(
        "pref_beta",
        "--beta",
        float,
        "pref_beta: dpo/orpo/simpo/kto strength (default 0.1); grpo: the KL coefficient "
        "(default 0: no reference model).",
        POSITIVE("e.g. --beta 0.1 (LLaMA-Factory's default; grpo's 0 is its recipe's default)"),
        stages=(*PREFERENCE, Stage.KTO, Stage.GRPO),
    ),
    # GRPO's own (TRL's GRPOConfig names them; qwenft.rl.grpo passes them on)
    Knob(
        "reward_funcs",
        "--reward",
        list,
        "grpo: a reward (repeat for several): match:FIELD, number:FIELD, regex:PATTERN, "
        "tool_call, length:N, run:RM_RUN (a --stage rm run), or PATH.py:FUNCTION (docs/rl.md).",
        stages=(Stage.GRPO,),
        own=True,
        section="method",
    ),
    Knob(
        "reward_weights",
        "--reward-weights",
        str,
        "grpo: the rewards' weights, a comma list in --reward order (default: all 1).",
        stages=(Stage.GRPO,),
        own=True,
        section="method",
    ),
    Knob(
        "num_generations",
        "--generations",
        help="grpo: completions sampled per prompt, compared within their group (default 8).",
        rule=Rule(lambda v: v >= 2, "2 or more", "e.g. --generations 8 (a group to compare)"),
        stages=(Stage.GRPO,),
        own=True,
        section="method",
    ),
    Knob(
        "max_completion_length",
        "--completion-len",
        help="grpo: most tokens a sampled completion takes (default 256).",
        rule=POSITIVE_WHOLE("e.g. --completion-len 256"),
        stages=(Stage.GRPO,),
        own=True,
        section="method",
    ),
    Knob(
        "temperature",
        "--temperature",
        float,
        "grpo: sampling temperature of the completions (default 1.0).",
        POSITIVE("e.g. --temperature 1.0"),
        stages=(Stage.GRPO,),
        own=True,
        section="method",
    ),
    Knob(
        "use_vllm",
        "--vllm/--no-vllm",
        bool,
        "grpo: sample the completions with vLLM in the training process (a CUDA GPU and vllm; "
        "default: transformers' generate).",
        stages=(Stage.GRPO,),
        own=True,
        section="method",
        needs=(Needs(cuda=True, packages=(("vllm", "vllm"),)),),
    ),
    Knob(
        "loss_type",
        "--grpo-loss",
        str,
        "grpo: TRL's loss: dapo (default), grpo, dr_grpo, bnpo.",
        stages=(Stage.GRPO,),
        own=True,
        choices=("dapo", "grpo", "dr_grpo", "bnpo"),
        section="method",
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
    Knob(
        "load_best_model_at_end",
        type=bool,
        section="eval",
        refuse=(
            Refusal(
                f'{LF} refuses it for a reward model ("RM and PPO stages do not support '
                '`load_best_model_at_end`")',
                "drop load_best_model_at_end; `qwenft eval` scores the run's held-out pairs",
                values=(True,),
                with_key="stage",
                with_values=(Stage.RM.value,),
            ),
        ),
    ),
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
        commands=(EVAL, SCORE),
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
        help="Use only the first N samples (of each --data file).",
        rule=POSITIVE_WHOLE("e.g. --max-samples 100"),
        commands=(TRAIN, EVAL, SCORE),
    ),
)


# The train.yaml keys qwenft's GRPO process (qwenft.rl.grpo, TRL's GRPOTrainer) reads: by
# LLaMA-Factory's name, the GRPOConfig argument it becomes (TRL_ARGS), or read by the process itself
# (TRL_OWN). A --stage grpo run that sets any other key is refused (inapplicable): TRL would never see
# it; the recipe's other keys are left out of its train.yaml.
TRL_ARGS = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler_type",
    "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "num_train_epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "seed": "seed",
    "report_to": "report_to",
    "logging_dir": "logging_dir",
    "run_name": "run_name",
    "num_generations": "num_generations",
    "max_completion_length": "max_completion_length",
    "temperature": "temperature",
    "pref_beta": "beta",
    "loss_type": "loss_type",
    "use_vllm": "use_vllm",  # with vllm_mode colocate (qwenft.rl.grpo): no separate server
}
TRL_OWN = (
    "stage",
    "do_train",
    "model_name_or_path",
    "finetuning_type",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "template",
    "default_system",
    "enable_thinking",
    "max_samples",
    "reward_funcs",
    "reward_weights",
    "bf16",
    "disable_gradient_checkpointing",
    "resume_from_checkpoint",
    "data_file",
)
TRL_READS = frozenset((*TRL_ARGS, *TRL_OWN))


def _with_switch(knob: Knob, rows: Mapping[str, Knob]) -> Knob:
    """A key that belongs to a switch (`requires`) applies where the switch applies and sits in
    its section of train.yaml, unless its own row says otherwise."""
    if not knob.requires:
        return knob
    switch = rows[knob.requires]
    return replace(
        knob,
        methods=knob.methods or switch.methods,
        stages=knob.stages or switch.stages,
        section=knob.section or switch.section,
    )


_BY_ROW_KEY = {r.key: r for r in _ROWS}
KNOBS: tuple[Knob, ...] = tuple(_with_switch(k, _BY_ROW_KEY) for k in _ROWS)
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
        # a repeatable option not given is an empty list: unset, as None
        given = {k: None if v == [] else v for k, v in params.items()}
        return cls({k.key: k.lf_value(given.get(k.param)) for k in offered(command)})

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


def as_lists(values: Mapping[str, Any]) -> dict[str, Any]:
    """The `many` knobs among values as LLaMA-Factory reads them: a list, or "none"."""
    return {
        key: list(BY_KEY[key].given(value)) or "none"
        for key, value in values.items()
        if key in BY_KEY and BY_KEY[key].many and value is not None
    }


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


def vision_keys(keys: Mapping[str, Any], model: str) -> list[QwenftError]:
    """One problem for each key only a vision-language model reads (Knob.vision), set for
    `model`, a text model."""
    return [
        QwenftError(
            f"{key_label(key)} does nothing for {model}: it is a text model, and the key is read "
            "by vision-language models only",
            "drop it, or train a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (`qwenft models`)",
        )
        for key, value in keys.items()
        if key in BY_KEY and BY_KEY[key].vision and value is not None
    ]


def inapplicable(keys: Mapping[str, Any], stage: str, method: str | None) -> list[QwenftError]:
    """One problem for each key the run's stage or method would ignore in silence (method None:
    not chosen yet), and for a --pref-loss that is not a DPO loss qwenft offers."""
    problems = []
    trl = Stage(stage).facts.engine == Engine.TRL
    for key, value in keys.items():
        if trl and key not in TRL_READS:
            problems.append(
                QwenftError(
                    f"{key_label(key)} does nothing for --stage {stage}: TRL trains it, and "
                    "qwenft's GRPO process does not pass that key on",
                    "drop it (docs/rl.md lists the keys a grpo run reads)",
                )
            )
            continue
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
        if knob.requires and _is_set(value) and not _is_set(keys.get(knob.requires)):
            switch = BY_KEY[knob.requires].flag or f"{knob.requires}: true"
            problems.append(
                QwenftError(
                    f"{key_label(key)} does nothing without {switch}",
                    f"add {switch}, or drop {knob.flag or key}",
                )
            )
        refused_values = {v for r in knob.refuse if not r.with_key for v in r.values}
        offered = (None, *knob.lf_choices, *refused_values)
        for given in [v for v in knob.given(value) if v not in offered] if knob.choices else ():
            if given in (Stage.ORPO, Stage.SIMPO):
                hint = f"train --stage {given} (it sets pref_loss: {given} itself)"
            elif given == "kto_pair":
                hint = "for KTO, train --stage kto on labelled data"
            else:
                hint = f"choose {'from' if knob.many else 'one of'} {', '.join(knob.choices)}"
            problems.append(
                QwenftError(
                    f"{knob.flag or key} {given} is not one of the "
                    + ("DPO losses" if key == "pref_loss" else "values")
                    + f" qwenft offers ({', '.join(knob.choices)})",
                    hint + (" (a comma list, or none)" if knob.many else ""),
                )
            )
    return problems


def _label(key: str, value: Any) -> str:
    """A key and its value as a person set them: "--attn fa3", "--dora", "shift_attn: true"."""
    knob = BY_KEY.get(key)
    if key == "processes":
        return f"{value} processes"
    if key in RUN_CHOICES:
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
    """One problem for each value (or combination) the knob table refuses (Knob.refuse).
    `values`: the keys the run sets (with what they imply); `context`: the run's choices a
    refusal may name (RUN_CHOICES), where they are known."""
    seen = {**values, **{k: v for k, v in (context or {}).items() if v is not None}}
    problems = []
    for key, value in values.items():
        knob = BY_KEY.get(key)
        for rule in knob.refuse if knob else ():
            for one in knob.given(value):  # each value of a `many` knob
                if not rule.applies(one, seen):
                    continue
                others = [rule.with_key] if rule.with_key else []
                with_ = " and ".join(_label(k, seen[k]) for k in [*others, *dict(rule.also)])
                problems.append(
                    QwenftError(
                        f"{_label(key, one)}{' with ' + with_ if with_ else ''}: {rule.why}",
                        rule.fix,
                    )
                )
    return problems


def implied(values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys the set knobs need beside them (Knob.implies), for those not set already: a value
    set otherwise is the person's, and a Refusal of the knob says which it refuses."""
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
            out += [(_label(key, v), need) for v in knob.given(value) if v in need.values]
    return out
