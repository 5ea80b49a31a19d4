"""Predict peak GPU memory per device for a LLaMA-Factory fine-tuning run, before launching it.

Plain arithmetic over the architecture numbers in `qwenft.models.presets.Arch`: no torch, no typer.
The model and its constants are explained, with the calibration table, in docs/memory.md.

Units: every internal quantity is in bytes. "GB" is decimal (1e9 bytes), "GiB" is binary (2**30).
`--gpu-mem`/`gpu_mem_gb` is decimal GB, like `peak_gb`: a card sold as "24 GB" has 24 GiB =
25.8 GB, so typing 24 leaves about 7% of headroom, which is about the estimator's error.

Peak per device = static (weights + trainable states) + max(forward/backward transient,
optimizer-step transient) + allocator slack + CUDA context.

The training stage (`PlanInput.stage`) changes what one step holds: dpo/orpo/simpo run chosen and
rejected sequences together (LLaMA-Factory's pairwise collator: a batch of 2B sequences); dpo and
kto score every batch under a reference model too (full/freeze: a frozen bf16 copy of the model;
LoRA/QLoRA: the same model with the adapter disabled, so no second copy; orpo/simpo: none); kto
also runs a no-grad forward of its KL batch (each sample's prompt with another sample's answer).

The optimizer (`PlanInput.optimizer`) changes what the trained weights hold: AdamW (the default)
keeps two fp32 moments per trainable weight; GaLore and APOLLO keep them for each decoder linear
weight projected to a low rank (rank x its longer side each, plus the rank x shorter-side
projection), and layer-wise they step each weight as its gradient arrives (about one gradient
held at a time); layer-wise BAdam trains one decoder layer at a time, with the model kept in bf16
(its gradients, an fp32 copy and AdamW's moments for that layer only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qwenft.choices import DeepSpeed, Engine, Method, Stage
from qwenft.data.images import DEFAULT_MAX_PIXELS
from qwenft.errors import QwenftError
from qwenft.models.coverage import (
    LORA_MODULES,
    coverage,
    embedding_params,
    expert_shapes,
    linear_shapes,
    linear_weight_params,
    lora_params,
    parse_lora_target,
)
from qwenft.models.presets import Arch

__all__ = ["LORA_MODULES", "embedding_params", "linear_shapes", "lora_params", "parse_lora_target"]

GB = 1e9
GIB = 2**30

QUANT_BITS = (4, 8)

# --- constants (each one is explained in docs/memory.md) ------------------------------------
BF16 = 2  # bytes per bf16 value
FP32 = 4
NF4_BITS_PER_PARAM = 4.127  # QLoRA paper: NF4 + double quantization (4 + 0.127 for the scales)
INT8_SCALE_BYTES_PER_ROW = 4  # LLM.int8: one fp32 scale per output row
LOGIT_BYTES = 14  # per (token x vocab) entry: bf16 logits + fp32 upcast, log-softmax, gradient
NO_GRAD_LOGIT_BYTES = 8  # a no-grad forward's logits at its peak: fp32 upcast + fp32 log-softmax
CUDA_CONTEXT_BYTES = 1.0e9  # CUDA context, cuBLAS/cuDNN workspaces, kernels of loaded libraries
NCCL_BYTES = 0.5e9  # NCCL communicator buffers when more than one GPU takes part
ALLOCATOR_SLACK = 0.10  # PyTorch caching allocator: reserved - allocated at the peak
DS_BUCKET_ELEMENTS = 5e8  # reduce/allgather bucket of configs/deepspeed/z0,z2*.json
DS_SUB_GROUP_ELEMENTS = 1e9  # sub_group_size of configs/deepspeed/z3*.json
FREEZE_TRAINABLE_LAYERS = 2  # LLaMA-Factory's freeze_trainable_layers default
AUTO_BATCH_SIZES = (8, 4, 2, 1)
# PlanInput.optimizer -> its name: AdamW (LLaMA-Factory's default) or the optimizers extra's
OPTIMIZERS = {"adamw": "AdamW", "galore": "GaLore", "apollo": "APOLLO", "badam": "BAdam"}
ADAPTER_METHODS = tuple(m.value for m in Method if m.facts.adapter)  # the others: own weights
LOW_RANK = ("galore", "apollo")

_ZERO_STAGE = {"none": 0, "z0": 0, "z2": 2, "z3": 3, "z2-offload": 2, "z3-offload": 3}

# Per training stage (the stage table, choices.STAGE_FACTS): sequences per sample in the trained
# (with-grad) batch, whether a reference model scores each batch (LLaMA-Factory: use_ref_model =
# dpo stage with a pref_loss other than orpo/simpo; kto always), and the sequences per sample of
# its largest no-grad forward.


def stage_sequences(stage: str) -> int:
    """Sequences per sample the trained forward holds: 2 (chosen + rejected) for pairs, else 1."""
    return 2 if Stage(stage).facts.paired else 1


def no_grad_sequences(stage: str) -> int:
    """Sequences per sample of the largest no-grad forward of a step: dpo's reference pass over
    chosen + rejected (2), kto's KL pass and reference passes (1 each, one after the other),
    none for sft/pt/orpo/simpo."""
    if stage == Stage.DPO.value:
        return 2
    return 1 if stage == Stage.KTO.value else 0


def has_reference_copy(stage: str, method: str) -> bool:
    """A frozen reference model in memory: dpo/kto with full or freeze fine-tuning. LoRA and QLoRA
    disable the adapter for the reference pass (no second copy); orpo/simpo have no reference."""
    return Stage(stage).facts.reference and Method(method).facts.own_weights


@dataclass(frozen=True)
class VisionCost:
    """What a step's images cost in the vision tower: bytes kept for backward while the language
    model's activations are alive (kept), and the line that says so."""

    kept: float = 0.0
    note: str = ""


def image_patches(pixels: int, patch: int, merge: int) -> int:
    """Patches of an image of at most `pixels` pixels: Qwen-VL's processor resizes it to whole
    merge x merge groups of patch-sided patches (smart_resize), within the pixel budget."""
    group = (patch * merge) ** 2
    return max(1, pixels // group) * merge * merge


def vision_activations(inp: PlanInput) -> VisionCost:
    """The vision tower's activations for the step's images (Qwen2-VL's ViT: each image's patches
    through depth blocks of hidden width, attention within the image; SDPA, so no patches^2
    matrix is kept). Frozen (LLaMA-Factory's default, freeze_vision_tower) it keeps nothing for
    backward: its forward runs one block at a time before the language model's, and its working set
    is freed before the language model builds its own; the note says how large it is. Trained
    (--train-vision): with gradient checkpointing each block's bf16 input is kept; without, every
    block's activations."""
    v = inp.arch.vision
    if v is None:
        return VisionCost()
    if inp.images <= 0:
        return VisionCost(
            note="a vision-language model: its images are not in this plan; pass --data with "
            "the image rows to count their tokens and the vision tower's activations"
        )
    patches = image_patches(inp.image_pixels, v.patch, v.merge)
    images = inp.batch_size * inp.images
    # one block per patch, bf16: two norms, q/k/v, the attention output and projection, the MLP's
    # input, output and its intermediate tensors (three when gated)
    block = BF16 * (8 * v.hidden + (3 if v.gated else 2) * v.intermediate) * patches * images
    what = (
        f"vision: {images} image(s) per device step of up to {patches} patches "
        f"({patches // (v.merge * v.merge)} tokens each, in cutoff_len)"
    )
    if not inp.train_vision:
        return VisionCost(
            note=f"{what}; the vision tower is frozen: it keeps no activations, its forward "
            f"needs {block / GB:.2f} GB at a time before the language model's"
        )
    if inp.gradient_checkpointing:
        kept = v.depth * BF16 * v.hidden * patches * images + block
    else:
        kept = v.depth * block
    return VisionCost(
        kept, f"{what}; the vision tower trains: {kept / GB:.2f} GB kept for backward"
    )


@dataclass
class PlanInput:
    """One training configuration to estimate."""

    arch: Arch
    method: str = "lora"  # full | freeze | lora | qlora
    stage: str = "sft"  # sft | pt | dpo | orpo | simpo | kto (qwenft.choices.Stage)
    bits: int | None = None  # qlora: 4 (default) or 8
    gpus: int = 1
    deepspeed: str = "none"  # none | z0 | z2 | z3 | z2-offload | z3-offload
    cutoff_len: int = 1024
    batch_size: int = 1
    lora_rank: int = 16
    lora_target: str = "all"
    trainable_layers: int = FREEZE_TRAINABLE_LAYERS  # freeze: the last N (N < 0: the first N)
    gradient_checkpointing: bool = True
    liger: bool = False
    gpu_mem_gb: float | None = None  # decimal GB per device
    # torch>=2.8 makes transformers default to the fused AdamW (no step temporaries); the
    # non-fused (foreach) AdamW allocates one fp32 temporary the size of the stepped params.
    fused_optimizer: bool = True
    optimizer: str = "adamw"  # adamw | galore | apollo | badam (OPTIMIZERS)
    optimizer_rank: int = 16  # galore/apollo: the projection rank
    layerwise: bool = False  # galore/apollo: each weight steps as its gradient arrives
    lora_experts: bool = True  # a mixture-of-experts model: LoRA covers its experts too
    train_router: bool = False  # ... and its router
    # a vision-language model: images per sample (plan --data: the most in a row), each at most
    # image_pixels (image_max_pixels), and whether the vision tower trains (--train-vision)
    images: int = 0
    image_pixels: int = DEFAULT_MAX_PIXELS  # LLaMA-Factory's image_max_pixels default
    train_vision: bool = False


@dataclass
class Plan:
    """A predicted per-device peak with its breakdown (bytes)."""

    method: str
    bits: int | None
    deepspeed: str
    gpus: int
    batch_size: int
    cutoff_len: int
    peak_bytes: float
    breakdown: dict[str, float]
    cpu_offload_bytes: float
    fits: bool | None
    margin_gb: float | None
    gpu_mem_gb: float | None
    peak_phase: str  # "forward/backward" | "optimizer step"
    total_params: int
    trainable_params: int
    notes: list[str] = field(default_factory=list)
    stage: str = "sft"
    sequences_per_step: int = 0  # sequences one forward/backward holds: batch x (2 for pairs)
    trainable_layers: int | None = None  # freeze: the decoder layers trained (last N; -N: first N)
    optimizer: str = "adamw"
    active_params: int = 0  # parameters one token runs through (an MoE model's active experts)
    coverage: dict = field(default_factory=dict)  # what the run trains (models.coverage)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("peak_bytes")
        d.pop("breakdown")
        d.pop("cpu_offload_bytes")
        return {
            "method": self.method,
            "peak_gb": round(self.peak_gb, 3),
            "peak_gib": round(self.peak_gib, 3),
            "breakdown": {k: round(v / GB, 3) for k, v in self.breakdown.items()},
            "cpu_offload_gb": round(self.cpu_offload_bytes / GB, 3),
            "units": "GB = 1e9 bytes, GiB = 2**30 bytes; per device",
            **{k: v for k, v in d.items() if k != "method"},
        }


# --- architecture arithmetic ------------------------------------------------------------------


def linear_params(arch: Arch) -> int:
    """Parameters in the decoder's linear layers (what bitsandbytes quantizes; a mixture-of-experts
    model's experts are parameters, not nn.Linear, and stay bf16)."""
    return linear_weight_params(arch)


def zero_model_states(
    psi: float,
    stage: int,
    n: int,
    param_bytes: int = BF16,
    grad_bytes: int = BF16,
    optim_bytes: int = 12,
) -> dict[str, float]:
    """Per-device bytes of parameters, gradients and optimizer states under ZeRO (Rajbhandari
    et al. 2020): stage 0: (2+2+12)Ψ; 1: 4Ψ + 12Ψ/N; 2: 2Ψ + 14Ψ/N; 3: 16Ψ/N."""
    p, g, o = param_bytes * psi, grad_bytes * psi, optim_bytes * psi
    if stage == 0:
        return {"params": p, "grads": g, "optimizer": o}
    if stage == 1:
        return {"params": p, "grads": g, "optimizer": o / n}
    if stage == 2:
        return {"params": p, "grads": g / n, "optimizer": o / n}
    if stage == 3:
        return {"params": p / n, "grads": g / n, "optimizer": o / n}
    raise QwenftError(f"unknown ZeRO stage {stage}")


def layer_activation_bytes_per_token(
    arch: Arch, lora_targets: tuple[str, ...] = (), liger: bool = False
) -> float:
    """Bytes one decoder layer keeps for backward, per token (bf16, SDPA/flash attention).

    Two RMSNorms keep their fp32 upcast input and bf16 output (6h each; Liger: 2h); attention
    keeps q, k, v after RoPE, its output and o_proj's input copy (6q + 4kv); the SwiGLU MLP keeps
    gate, up, silu(gate) and the product (8i; Liger recomputes silu: 6i). Each LoRA-wrapped
    linear adds its dropout mask and bf16 input copy (3 bytes x in_features). A mixture-of-experts
    layer runs each token through its experts_per_token experts only: the router's fp32 logits and
    probabilities (8 per expert), and per active expert its SwiGLU (8m) plus the token's gathered
    input and weighted output (4h); a shared expert is one more SwiGLU (8s).
    """
    shapes = linear_shapes(arch)
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    norms = 2 * (2 * h if liger else 6 * h)
    attn = 6 * q + 4 * kv
    swiglu = 6 if liger else 8
    mlp = swiglu * i
    if arch.moe is not None:
        moe = arch.moe
        per_expert = swiglu * moe.moe_intermediate_size + 4 * h
        shared = swiglu * moe.shared_expert_intermediate_size
        mlp = 8 * moe.num_experts + moe.experts_per_token * per_expert + shared
    lora = sum(3 * shapes[t][0] for t in lora_targets if t in shapes)
    return norms + attn + mlp + lora


# --- the estimator ----------------------------------------------------------------------------


def _validate(inp: PlanInput) -> list[str]:
    problems = []
    if inp.method not in Method.values():
        problems.append(f"unknown method {inp.method!r} (use {', '.join(Method.values())})")
    if inp.stage not in Stage.values():
        problems.append(f"unknown --stage {inp.stage!r} (use {', '.join(Stage.values())})")
    if inp.deepspeed not in DeepSpeed.values():
        problems.append(
            f"unknown --deepspeed {inp.deepspeed!r} (use {', '.join(DeepSpeed.values())})"
        )
    for name in ("gpus", "cutoff_len", "batch_size", "lora_rank"):
        value = getattr(inp, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(
                f"--{name.replace('_', '-')} must be a positive whole number (got {value!r})"
            )
    if inp.bits is not None and inp.method in Method.values():
        if not Method(inp.method).facts.quantized:
            problems.append(
                f"--bits applies to qlora only (got --method {inp.method} --bits {inp.bits})"
            )
        elif inp.bits not in QUANT_BITS:
            problems.append(f"--bits {inp.bits} is not supported by bitsandbytes (use 4 or 8)")
    if inp.gpu_mem_gb is not None and not inp.gpu_mem_gb > 0:
        problems.append(f"--gpu-mem must be above 0 GB (got {inp.gpu_mem_gb!r})")
    if inp.optimizer not in OPTIMIZERS:
        problems.append(f"unknown optimizer {inp.optimizer!r} (use {', '.join(OPTIMIZERS)})")
    elif inp.optimizer != "adamw" and inp.method in ADAPTER_METHODS:
        problems.append(f"{inp.optimizer} trains the model's own weights, not {inp.method}")
    elif inp.optimizer in LOW_RANK and inp.deepspeed != DeepSpeed.NONE:
        problems.append(f"{inp.optimizer} runs without DeepSpeed (got {inp.deepspeed})")
    return problems


def estimate(inp: PlanInput) -> Plan:
    """Predict the peak GPU memory per device for one configuration; QwenftError if invalid."""
    problems = _validate(inp)
    targets: tuple[str, ...] = ()
    if inp.method in Method.values() and Method(inp.method).facts.adapter:
        try:
            targets = parse_lora_target(inp.lora_target, inp.arch)
        except QwenftError as exc:
            problems.append(exc.message)
    if problems:
        raise QwenftError(
            "; ".join(problems),
            "see `qwenft plan --help` for the accepted values",
        )

    arch, n, ds = inp.arch, inp.gpus, inp.deepspeed
    stage, offload, uses_ds = _ZERO_STAGE[ds], ds.endswith("-offload"), ds != "none"
    bits = (inp.bits or 4) if inp.method == "qlora" else None
    seqs = inp.batch_size * stage_sequences(inp.stage)
    tokens = seqs * inp.cutoff_len
    h, L = arch.hidden_size, arch.num_hidden_layers
    total = arch.params
    lin, emb = linear_params(arch), embedding_params(arch)
    layer_params = (total - emb - h) // L
    notes: list[str] = []

    # Which parameters train, and which sit frozen in bf16 (or quantized).
    layers = min(abs(inp.trainable_layers), L) if inp.method == "freeze" else L
    covered = coverage(
        arch,
        "lora" if Method(inp.method).facts.adapter else inp.method,
        inp.lora_rank,
        inp.lora_target,
        inp.lora_experts,
        inp.train_router,
        inp.trainable_layers,
    )
    expert_weights = sum(e * a * b for e, a, b in expert_shapes(arch).values())
    if inp.optimizer == "badam":
        trainable, frozen = layer_params, total - layer_params  # one decoder layer at a time
    elif inp.method == "full":
        trainable, frozen = total, 0
    elif inp.method == "freeze":
        trainable = layers * layer_params
        frozen = total - trainable
    else:
        trainable, frozen = covered.trainable, total
    largest_linear = max(a * b for a, b in linear_shapes(arch).values())
    # the largest weight that trains (full: the embedding) and steps on its own (galore, apollo)
    largest_trained = max(largest_linear, arch.vocab_size * h if inp.method == "full" else 0)

    # Frozen weights: bf16, or the decoder linears quantized (embeddings/lm_head/norms stay bf16).
    if bits == 4:
        frozen_bytes = lin * NF4_BITS_PER_PARAM / 8 + (total - lin) * BF16
    elif bits == 8:
        rows = L * sum(o for _, o in linear_shapes(arch).values())
        frozen_bytes = lin * 1 + rows * INT8_SCALE_BYTES_PER_ROW + (total - lin) * BF16
    else:
        frozen_bytes = frozen * BF16

    # Trainable states. With DeepSpeed (bf16 enabled) the module is bf16 and the optimizer keeps
    # an fp32 master copy: 2 + 2 + 12 bytes; so does BAdam (LLaMA-Factory leaves its weights in
    # half precision, BAdam keeps the fp32 copy of its layer). Without either, LLaMA-Factory
    # upcasts trainable params to fp32: 4 + 4 + 8 bytes. Both are 16 bytes per trainable parameter.
    badam = inp.optimizer == "badam"
    pb, gb_, ob = (BF16, BF16, 12) if uses_ds or badam else (FP32, FP32, 8)
    states = zero_model_states(trainable, stage, n, pb, gb_, ob)
    if inp.optimizer in LOW_RANK:
        # AdamW's moments of each decoder linear weight (a x b) at rank r: 2 r max(a, b), and the
        # projection r min(a, b), fp32, instead of 2 a b (no DeepSpeed: _validate)
        for a, b in linear_shapes(arch).values():
            r = min(inp.optimizer_rank, a, b)
            states["optimizer"] += layers * FP32 * (r * (2 * max(a, b) + min(a, b)) - 2 * a * b)
        if inp.layerwise:
            states["grads"] = FP32 * largest_trained  # about one gradient at a time
    cpu = 0.0
    if stage == 3 and not offload:
        frozen_bytes /= n  # ZeRO-3 partitions every parameter, frozen ones too
    if offload:
        # optimizer states, fp32 master and fp32 gradients live in CPU RAM (per process)
        cpu += states.pop("optimizer") + FP32 * trainable / n
        states.pop("grads")
        if stage == 3:  # z3-offload also offloads the bf16 parameters
            cpu += states.pop("params") + frozen_bytes / n
            frozen_bytes = 0.0
    # The reference model of full/freeze dpo and kto: the whole model again, frozen in bf16
    # (LLaMA-Factory's create_ref_model); DeepSpeed ZeRO-3 partitions it like the model.
    reference = total * BF16 if has_reference_copy(inp.stage, inp.method) else 0.0
    if reference and stage == 3:
        if offload:
            cpu += reference / n
            reference = 0.0
        else:
            reference /= n
    weights = frozen_bytes + states.pop("params", 0.0)
    gradients = states.pop("grads", 0.0)
    optimizer = states.pop("optimizer", 0.0)

    # Activations kept for backward.
    per_layer = layer_activation_bytes_per_token(arch, targets, inp.liger) * tokens
    head = tokens * 6 * h  # final norm (fp32 + bf16) before lm_head
    if inp.gradient_checkpointing:
        # each layer's bf16 input is kept; one layer is recomputed in backward, with its gradients
        activations = L * tokens * BF16 * h + 2 * per_layer + head
    else:
        activations = L * per_layer + head
    # Liger's fused cross-entropy needs labels in the forward; the preference and KTO trainers
    # take the logits themselves (labels popped), so there the logits are always materialised.
    fused = inp.liger and inp.stage in (Stage.SFT.value, Stage.PT.value)
    logits = tokens * FP32 * 2 * h if fused else tokens * arch.vocab_size * LOGIT_BYTES
    # No-grad forwards while the trained graph is alive (reference pass; kto's KL pass): one
    # layer's working set at a time, then the logits, upcast and log-softmax of those sequences.
    ng_tokens = inp.batch_size * no_grad_sequences(inp.stage) * inp.cutoff_len
    no_grad = (
        ng_tokens * (arch.vocab_size * NO_GRAD_LOGIT_BYTES)
        + layer_activation_bytes_per_token(arch, targets, inp.liger) * ng_tokens
        if ng_tokens
        else 0.0
    )

    # Buffers alive during forward/backward.
    buffers = 0.0
    if bits:
        buffers += BF16 * largest_linear  # one dequantized weight at a time
    if uses_ds and stage in (0, 2):
        buffers += BF16 * min(DS_BUCKET_ELEMENTS, trainable)  # contiguous reduce bucket
    if stage == 3:
        # gathered working set: the largest module (lm_head/embedding or one layer), plus its
        # full gradient before reduce-scatter when the base itself trains
        largest = max(arch.vocab_size * h, layer_params)
        buffers += BF16 * largest * (2 if Method(inp.method).facts.own_weights else 1)
    if not uses_ds and n > 1:
        buffers += gb_ * trainable  # DDP gradient buckets
    if expert_weights and covered.experts and Method(inp.method).facts.adapter:
        # PEFT's LoRA on a parameter folds the update into the weight for each forward: a sparse
        # layer's delta and W + delta (every expert, bf16) live while the layer is in the graph
        held = 2 if inp.gradient_checkpointing else arch.moe.sparse_layers(L)
        buffers += held * 2 * BF16 * expert_weights
    fwd_bwd = activations + logits + buffers + no_grad
    vision = vision_activations(inp)
    if vision.kept:
        fwd_bwd += vision.kept

    # Optimizer step transient: DeepSpeed turns the bf16 gradient partition into an fp32 copy;
    # a non-fused AdamW allocates one more fp32 temporary of the stepped size.
    stepped = 0.0 if offload else trainable / (n if stage >= 1 else 1)
    if stage == 3:
        stepped = min(stepped, DS_SUB_GROUP_ELEMENTS)
    step = (FP32 * stepped if uses_ds else 0.0) + (0.0 if inp.fused_optimizer else FP32 * stepped)
    if badam and not uses_ds:
        step += FP32 * stepped  # the layer's gradients turned fp32 for its fp32 copy
    if inp.optimizer in LOW_RANK:
        step = FP32 * largest_trained  # one weight at a time: its full-size update

    static = weights + reference + gradients + optimizer
    breakdown = {
        "weights": weights,
        "reference_model": reference,
        "gradients": gradients,
        "optimizer_states": optimizer,
    }
    if fwd_bwd >= step:
        phase = "forward/backward"
        breakdown.update(
            activations=activations,
            vision_activations=vision.kept,
            logits_and_loss=logits,
            no_grad_forward=no_grad,
            buffers=buffers,
        )
    else:
        phase = "optimizer step"
        breakdown.update(optimizer_step=step)
    allocated = static + max(fwd_bwd, step)
    breakdown["allocator_slack"] = ALLOCATOR_SLACK * allocated
    breakdown["cuda_context"] = CUDA_CONTEXT_BYTES + (NCCL_BYTES if n > 1 else 0.0)
    peak = sum(breakdown.values())

    if uses_ds and n == 1 and not offload and stage >= 2:
        notes.append(
            f"--deepspeed {ds} on one GPU partitions nothing: it buys nothing over none "
            f"(use {ds}-offload to move optimizer states to CPU RAM)"
        )
    if offload:
        notes.append(
            f"offload keeps {cpu / GB:.1f} GB per process in CPU RAM "
            f"({cpu * n / GB:.1f} GB for {n} GPU(s)); steps run on the CPU and are slow"
        )
    if inp.method == "qlora" and stage == 3:
        notes.append("QLoRA with ZeRO-3 needs bitsandbytes>=0.43 and LLaMA-Factory's zero3 support")
    if not inp.gradient_checkpointing:
        notes.append("without gradient checkpointing every layer keeps its activations")
    if Stage(inp.stage).facts.paired:
        notes.append(
            f"{inp.stage}: each step runs chosen and rejected together "
            f"({seqs} sequences of up to {inp.cutoff_len} tokens per device)"
        )
    if Stage(inp.stage).facts.reference:
        if reference or (stage == 3 and offload and has_reference_copy(inp.stage, inp.method)):
            notes.append(f"{inp.stage} {inp.method}: a frozen bf16 reference copy of the model")
        else:
            notes.append(
                f"{inp.stage} {inp.method}: the reference is the model with the adapter disabled "
                "(no second copy)"
            )
    if inp.stage == Stage.KTO.value:
        notes.append("kto also runs a no-grad forward of its KL batch (mismatched answers)")
    if vision.note:
        notes.append(vision.note)
    if Stage(inp.stage).facts.engine == Engine.TRL:
        notes.append(
            f"{inp.stage}: planned as its training pass, {seqs} completions (prompt + completion "
            f"up to {inp.cutoff_len} tokens) per device; sampling them first (generate, no "
            "gradients) needs less, and --beta > 0 on a full run adds a reference copy "
            "(docs/rl.md)"
        )
    if inp.optimizer in LOW_RANK:
        notes.append(
            f"{OPTIMIZERS[inp.optimizer]}: AdamW states of every decoder linear weight at rank "
            f"{inp.optimizer_rank} (as {inp.optimizer}_target all)"
            + ("; layer-wise: about one gradient held at a time" if inp.layerwise else "")
        )
    if badam:
        notes.append(
            "BAdam: one decoder layer trains at a time (its gradients, fp32 copy and AdamW "
            "states); the model stays in bf16 (layer mode; ratio mode is estimated alike)"
        )
    if inp.liger and not fused:
        notes.append(f"--liger does not fuse the logits of {inp.stage}: its trainer reads them")
    if arch.moe is not None:
        moe = arch.moe
        notes.append(
            f"mixture of experts: weights count all {moe.num_experts} experts "
            f"({total / 1e9:.2f}B), activations the {moe.experts_per_token} a token is routed to; "
            f"compute per token as a {arch.active_params / 1e9:.2f}B dense model"
        )
        if bits:
            notes.append(
                "QLoRA quantizes the linear layers only: the experts (fused parameters) stay bf16"
            )
        if covered.experts and Method(inp.method).facts.adapter:
            notes.append(
                "LoRA on the experts (PEFT target_parameters) rebuilds each sparse layer's expert "
                "weights (delta and sum, bf16) in every forward: counted in buffers"
            )
    if not fused and logits > 0.2 * peak:
        fix = (
            "--liger fuses them away"
            if inp.stage in (Stage.SFT.value, Stage.PT.value)
            else "a shorter --completion-len shrinks them"
            if Stage(inp.stage).facts.engine == Engine.TRL
            else "a shorter --cutoff-len shrinks them"
        )
        notes.append(f"logits and loss take {logits / GB:.1f} GB ({arch.vocab_size} vocab); {fix}")

    fits = margin = None
    if inp.gpu_mem_gb is not None:
        margin = inp.gpu_mem_gb - peak / GB
        fits = margin >= 0
        if fits and margin < 0.1 * inp.gpu_mem_gb:
            notes.append("tight: less than 10% headroom, about the estimator's error")

    return Plan(
        method=inp.method,
        bits=bits,
        deepspeed=ds,
        gpus=n,
        batch_size=inp.batch_size,
        cutoff_len=inp.cutoff_len,
        peak_bytes=peak,
        breakdown=breakdown,
        cpu_offload_bytes=cpu,
        fits=fits,
        margin_gb=None if margin is None else round(margin, 3),
        gpu_mem_gb=inp.gpu_mem_gb,
        peak_phase=phase,
        total_params=total,
        trainable_params=int(trainable),
        notes=notes,
        stage=inp.stage,
        sequences_per_step=seqs,
        trainable_layers=inp.trainable_layers if inp.method == Method.FREEZE else None,
        optimizer=inp.optimizer,
        active_params=arch.active_params,
        coverage=covered.to_dict(),
    )


# --- choosing a method ------------------------------------------------------------------------


def _candidates(method: str, gpus: int, deepspeed: str | None, optimizer: str) -> list[str]:
    if deepspeed not in (None, "auto"):
        return [deepspeed]
    if gpus == 1 or optimizer in LOW_RANK:  # GaLore and APOLLO run without DeepSpeed
        return ["none"]
    if optimizer == "badam":
        return ["z3"]  # layer-wise BAdam on several processes: ZeRO-3 only
    if Method(method).facts.own_weights:
        return ["z2", "z3"]  # ZeRO-2 is faster when it fits; ZeRO-3 partitions the weights too
    if method == "lora":
        return ["none", "z3"]
    return ["none"]


def choose_method(
    arch: Arch,
    gpu_mem_gb: float,
    gpus: int = 1,
    cutoff_len: int = 1024,
    batch_size: int | None = None,
    lora_rank: int = 16,
    lora_target: str = "all",
    gradient_checkpointing: bool = True,
    liger: bool = False,
    deepspeed: str | None = None,
    stage: str = "sft",
    optimizer: str = "adamw",
    optimizer_rank: int = 16,
    layerwise: bool = False,
    lora_experts: bool = True,
    train_router: bool = False,
) -> tuple[Plan, str]:
    """The best method that fits: full -> LoRA -> QLoRA 8-bit -> QLoRA 4-bit, each with the
    first DeepSpeed stage that fits and the largest batch size (of 8, 4, 2, 1) that fits; with
    an optimizer other than AdamW (it trains the model's own weights), full only.

    Offload stages are never chosen on their own (they need large CPU RAM and run slowly); pass
    `deepspeed` to force a stage. Returns the plan and a one-line explanation.
    """
    if gpu_mem_gb is None or not gpu_mem_gb > 0:
        raise QwenftError(
            "--method auto needs the memory of one GPU", "pass --gpu-mem GB (e.g. --gpu-mem 24)"
        )
    batches = (batch_size,) if batch_size is not None else AUTO_BATCH_SIZES
    order = [("full", None), ("lora", None), ("qlora", 8), ("qlora", 4)]
    tried: list[str] = []
    smallest: Plan | None = None
    for method, bits in order if optimizer == "adamw" else order[:1]:
        for ds in _candidates(method, gpus, deepspeed, optimizer):
            for b in batches:
                plan = estimate(
                    PlanInput(
                        arch=arch,
                        method=method,
                        stage=stage,
                        bits=bits,
                        gpus=gpus,
                        deepspeed=ds,
                        cutoff_len=cutoff_len,
                        batch_size=b,
                        lora_rank=lora_rank,
                        lora_target=lora_target,
                        gradient_checkpointing=gradient_checkpointing,
                        liger=liger,
                        gpu_mem_gb=gpu_mem_gb,
                        optimizer=optimizer,
                        optimizer_rank=optimizer_rank,
                        layerwise=layerwise,
                        lora_experts=lora_experts,
                        train_router=train_router,
                    )
                )
                if smallest is None or plan.peak_bytes < smallest.peak_bytes:
                    smallest = plan
                if plan.fits:
                    label = _label(plan)
                    skipped = f" ({'; '.join(tried)})" if tried else ""
                    why = f"{label} fits: {plan.peak_gb:.1f} of {gpu_mem_gb:g} GB per GPU{skipped}"
                    return plan, why
            where = "no DeepSpeed" if ds == "none" else ds
            tried.append(f"{_label_of(method, bits)} with {where} needs {plan.peak_gb:.1f} GB")
    assert smallest is not None
    raise QwenftError(
        f"nothing fits in {gpu_mem_gb:g} GB x {gpus} GPU(s): even {_label(smallest)} "
        f"needs {smallest.peak_gb:.1f} GB per GPU",
        "use more GPUs (--gpus), a shorter --cutoff-len, --liger, a smaller model, "
        + (f"or --{optimizer}-layerwise" if optimizer in LOW_RANK else "or --deepspeed z3-offload"),
    )


def _label_of(method: str, bits: int | None) -> str:
    return {"full": "full", "freeze": "freeze", "lora": "LoRA"}.get(method) or f"QLoRA {bits}-bit"


def _label(plan: Plan) -> str:
    ds = "" if plan.deepspeed == "none" else f", DeepSpeed {plan.deepspeed}"
    return f"{_label_of(plan.method, plan.bits)} (batch {plan.batch_size}{ds})"
