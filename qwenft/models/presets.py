"""Qwen model knowledge as data: families, templates, default system prompts, architecture numbers.

Pure data and lookups; nothing here touches the network or imports torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qwenft.choices import Template
from qwenft.errors import QwenftError
from qwenft.knobs import Needs


@dataclass(frozen=True)
class Family:
    """What LLaMA-Factory needs to know about a Qwen family to train and chat with it."""

    name: str
    template: str  # LLaMA-Factory template name
    default_system: str  # the system prompt the model's own chat template inserts ("" = none)
    thinking: str  # "none" | "hybrid" (Qwen3: <think> blocks, switchable) | "always"
    vision: bool = False  # a vision-language model: images and videos in, text out


# The LLaMA-Factory `qwen` template's own default system ("You are Qwen, created by Alibaba Cloud...")
# is Qwen2.5's; Qwen1.5 and Qwen2 chat templates insert "You are a helpful assistant." Setting
# `default_system` per family makes training see the same prompt as inference.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("qwen1.5", "qwen", "You are a helpful assistant.", "none"),
        Family("qwen2", "qwen", "You are a helpful assistant.", "none"),
        Family(
            "qwen2.5",
            "qwen",
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            "none",
        ),
        Family("qwen3", "qwen3", "", "hybrid"),
        Family("qwen3-instruct-2507", "qwen3_nothink", "", "none"),
        Family("qwen3-thinking-2507", "qwen3", "", "always"),
        # Qwen2-VL's and Qwen2.5-VL's chat templates insert "You are a helpful assistant." (so does
        # LLaMA-Factory's qwen2_vl template); Qwen3-VL's insert none. Qwen3-VL Instruct answers
        # directly (qwen3_vl_nothink), Qwen3-VL Thinking always opens a <think> block (qwen3_vl).
        Family("qwen2-vl", "qwen2_vl", "You are a helpful assistant.", "none", vision=True),
        Family("qwen2.5-vl", "qwen2_vl", "You are a helpful assistant.", "none", vision=True),
        Family("qwen3-vl", "qwen3_vl_nothink", "", "none", vision=True),
        Family("qwen3-vl-thinking", "qwen3_vl", "", "always", vision=True),
    ]
}


def vision_params(model_type: str, vision: dict, out_hidden: int) -> int:
    """Parameters of a Qwen-VL vision encoder (its ViT and the merger into the language model),
    from its config.json's vision_config, as transformers builds it: Qwen2-VL (LayerNorm, GELU MLP
    of mlp_ratio), Qwen2.5-VL (RMSNorm, gated SiLU MLP), Qwen3-VL (a learned position embedding,
    and a merger for each deepstack layer besides the final one). 0 for other model types."""
    merge = vision.get("spatial_merge_size", 2)
    stem = vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2)
    stem *= vision.get("patch_size", 14) ** 2
    kind = model_type.removesuffix("_moe")
    if kind == "qwen2_vl":
        e = vision["embed_dim"]
        i = e * vision.get("mlp_ratio", 4)
        block = 4 * e + 4 * e * e + 4 * e + 2 * e * i + i + e
        ctx = e * merge**2
        merger = 2 * e + ctx * ctx + ctx + ctx * out_hidden + out_hidden
        return vision["depth"] * block + stem * e + merger
    if kind == "qwen2_5_vl":
        e, i = vision["hidden_size"], vision["intermediate_size"]
        block = 2 * e + 4 * e * e + 4 * e + 3 * e * i + 2 * i + e
        ctx = e * merge**2
        merger = e + ctx * ctx + ctx + ctx * out_hidden + out_hidden
        return vision["depth"] * block + stem * e + merger
    if kind == "qwen3_vl":
        e, i = vision["hidden_size"], vision["intermediate_size"]
        block = 4 * e + 4 * e * e + 4 * e + 2 * e * i + i + e
        ctx = e * merge**2
        mlp = ctx * ctx + ctx + ctx * out_hidden + out_hidden
        deepstack = len(vision.get("deepstack_visual_indexes", ())) * (2 * ctx + mlp)
        position = vision.get("num_position_embeddings", 2304) * e
        return vision["depth"] * block + stem * e + e + position + 2 * e + mlp + deepstack
    return 0


@dataclass(frozen=True)
class VisionDims:
    """What a Qwen-VL vision encoder's activations scale with (its config.json's vision_config)."""

    depth: int  # ViT blocks
    hidden: int
    intermediate: int
    patch: int  # pixels on a patch's side
    merge: int  # spatial_merge_size: merge x merge patches make one image token
    gated: bool  # a gated (SwiGLU) MLP: three intermediate-wide tensors, else two

    @classmethod
    def of(cls, model_type: str, vision: dict) -> VisionDims | None:
        kind = model_type.removesuffix("_moe")
        if kind == "qwen2_vl":
            e = vision["embed_dim"]
            i = e * vision.get("mlp_ratio", 4)
        elif kind in ("qwen2_5_vl", "qwen3_vl"):
            e, i = vision["hidden_size"], vision["intermediate_size"]
        else:
            return None
        return cls(
            vision["depth"],
            e,
            i,
            vision.get("patch_size", 14),
            vision.get("spatial_merge_size", 2),
            kind == "qwen2_5_vl",
        )


@dataclass(frozen=True)
class Arch:
    """Architecture numbers, as in the model's config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None  # Qwen3 sets it explicitly; otherwise hidden / heads
    vision_params: int = 0  # a vision-language model's vision encoder (vision_params())
    moe: Moe | None = None  # a mixture-of-experts model's experts (None: a dense model)
    vision: VisionDims | None = None  # a vision-language model's encoder shape (plan's activations)

    @property
    def params(self) -> int:
        """Parameter count (dense decoder, biases on q/k/v for Qwen1.5/2/2.5 ignored: <0.1%; a
        vision-language model's vision encoder included). A mixture-of-experts model counts every
        expert, and exactly: its q/k/v biases and Qwen3's q/k norms included."""
        return self._count(active=False)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: a mixture-of-experts model's routed experts count
        experts_per_token of num_experts; a dense model's equal `params`."""
        return self._count(active=True)

    @property
    def attention_params(self) -> int:
        """One decoder layer's attention (q, k, v, o; an MoE model's q/k/v biases and q/k norms)."""
        hd = self.head_dim or self.hidden_size // self.num_attention_heads
        heads = 2 * self.num_attention_heads + 2 * self.num_key_value_heads
        attn = self.hidden_size * hd * heads
        if self.moe is not None:
            attn += (self.moe.qkv_bias * (heads - self.num_attention_heads) * hd) + (
                2 * hd if self.moe.qk_norm else 0
            )
        return attn

    def _count(self, active: bool) -> int:
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        layers = self.num_hidden_layers * (self.attention_params + norms)
        if self.moe is None:
            layers += self.num_hidden_layers * mlp
        else:
            sparse = self.moe.sparse_layers(self.num_hidden_layers)
            experts = self.moe.experts_per_token if active else self.moe.num_experts
            per_sparse = experts * self.moe.expert_params(self.hidden_size)
            per_sparse += self.moe.router_params(self.hidden_size)
            per_sparse += self.moe.shared_params(self.hidden_size)
            layers += sparse * per_sparse + (self.num_hidden_layers - sparse) * mlp
        return layers + embed + self.hidden_size + self.vision_params


@dataclass(frozen=True)
class Moe:
    """A mixture-of-experts decoder's numbers, as in its config.json (Qwen1.5-MoE, Qwen2-MoE,
    Qwen3-MoE). In transformers 5 each sparse layer's experts are two fused parameters,
    mlp.experts.gate_up_proj [experts, 2 x moe_intermediate, hidden] and mlp.experts.down_proj
    [experts, hidden, moe_intermediate], routed by mlp.gate.weight [experts, hidden]; Qwen1.5/2-MoE
    add a shared expert (an ordinary SwiGLU MLP) and its sigmoid gate (a hidden -> 1 linear)."""

    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen3-MoE)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k (head_dim weights each)
    qkv_bias: bool = False  # Qwen1.5/2: biases on q, k and v
    decoder_sparse_step: int = 1  # config.json: every Nth layer is sparse ...
    mlp_only_layers: tuple[int, ...] = ()  # ... except these, which keep a dense MLP

    def sparse_layers(self, layers: int) -> int:
        """How many of the decoder's layers have experts (transformers' rule)."""
        step = max(1, self.decoder_sparse_step)
        return sum(
            1 for i in range(layers) if i not in self.mlp_only_layers and (i + 1) % step == 0
        )

    def expert_params(self, hidden: int) -> int:
        """One expert: gate, up and down of moe_intermediate_size."""
        return 3 * hidden * self.moe_intermediate_size

    def router_params(self, hidden: int) -> int:
        return self.num_experts * hidden

    def shared_params(self, hidden: int) -> int:
        """The shared expert and its gate (0 without one)."""
        if not self.shared_expert_intermediate_size:
            return 0
        return 3 * hidden * self.shared_expert_intermediate_size + hidden

    @classmethod
    def from_config(cls, text: dict) -> Moe | None:
        """The MoE numbers of a config.json (its text part); None for a dense model."""
        # transformers 5 writes num_experts as num_local_experts (its attribute_map)
        experts = text.get("num_experts") or text.get("num_local_experts")
        if not experts or not str(text.get("model_type", "")).endswith("_moe"):
            return None
        model_type = str(text.get("model_type"))
        return cls(
            int(experts),
            int(text["num_experts_per_tok"]),
            int(text["moe_intermediate_size"]),
            int(text.get("shared_expert_intermediate_size") or 0),
            qk_norm=model_type.startswith("qwen3"),
            qkv_bias=bool(text.get("qkv_bias", model_type == "qwen2_moe")),
            decoder_sparse_step=int(text.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(text.get("mlp_only_layers") or ()),
        )


@dataclass(frozen=True)
class ModelPreset:
    name: str  # short name users may type, e.g. "qwen2.5-7b-instruct"
    hub_id: str | None  # None for the embedded tiny models
    family: str
    arch: Arch
    quantization: tuple[str, int] | None = None  # a pre-quantized release: (method, bits)


def _a(h, i, layers, heads, kv, vocab, tied, head_dim=None) -> Arch:  # noqa: ANN001 - table helper
    return Arch(h, i, layers, heads, kv, vocab, tied, head_dim)


# Shapes shared by several releases (from the models' config.json files).
_Q15_05, _Q15_18, _Q15_4, _Q15_7, _Q15_14 = (
    _a(1024, 2816, 24, 16, 16, 151936, True),
    _a(2048, 5504, 24, 16, 16, 151936, False),
    _a(2560, 6912, 40, 20, 20, 151936, False),
    _a(4096, 11008, 32, 32, 32, 151936, False),
    _a(5120, 13696, 40, 40, 40, 152064, False),
)
_Q2_05, _Q2_15, _Q25_3, _Q2_7, _Q25_14, _Q25_32, _Q2_72 = (
    _a(896, 4864, 24, 14, 2, 151936, True),
    _a(1536, 8960, 28, 12, 2, 151936, True),
    _a(2048, 11008, 36, 16, 2, 151936, True),
    _a(3584, 18944, 28, 28, 4, 152064, False),
    _a(5120, 13824, 48, 40, 8, 152064, False),
    _a(5120, 27648, 64, 40, 8, 152064, False),
    _a(8192, 29568, 80, 64, 8, 152064, False),
)
_Q3_06, _Q3_17, _Q3_4, _Q3_8, _Q3_14, _Q3_32 = (
    _a(1024, 3072, 28, 16, 8, 151936, True, 128),
    _a(2048, 6144, 28, 16, 8, 151936, True, 128),
    _a(2560, 9728, 36, 32, 8, 151936, True, 128),
    _a(4096, 12288, 36, 32, 8, 151936, False, 128),
    _a(5120, 17408, 40, 40, 8, 151936, False, 128),
    _a(5120, 25600, 64, 64, 8, 151936, False, 128),
)
TINY_ARCH = _a(64, 128, 2, 4, 2, 151936, True)
TINY_ARCH_QWEN3 = _a(64, 128, 2, 4, 2, 151936, True, 16)

# Mixture-of-experts releases (config.json as published). intermediate_size is the dense MLP's,
# which no layer of these releases has (every layer is sparse); the experts are moe_intermediate.
_MOE_Q3 = Moe(128, 8, 768, qk_norm=True)
_Q3_30A3 = replace(_a(2048, 6144, 48, 32, 4, 151936, False, 128), moe=_MOE_Q3)  # 30.5B / 3.3B
_Q3_235A22 = replace(  # 235B total / 22B active
    _a(4096, 12288, 94, 64, 4, 151936, False, 128), moe=replace(_MOE_Q3, moe_intermediate_size=1536)
)
_Q2_57A14 = replace(  # 57.4B / 14.2B
    _a(3584, 18944, 28, 28, 4, 151936, False), moe=Moe(64, 8, 2560, 20480, qkv_bias=True)
)
_Q15_A27 = replace(  # 14.3B / 2.7B
    _a(2048, 5632, 24, 16, 16, 151936, False), moe=Moe(60, 4, 1408, 5632, qkv_bias=True)
)
# qwenft.models.tiny's tiny-qwen3-moe: 2 layers, 4 experts (top-2) of moe_intermediate 64
TINY_ARCH_QWEN3_MOE = replace(TINY_ARCH_QWEN3, moe=Moe(4, 2, 64, qk_norm=True))

# The vision encoders of the Qwen-VL releases (their config.json's vision_config; the language
# models have the shapes of the text releases above). Qwen2-VL and Qwen2.5-VL use one 32-block
# ViT in every size; Qwen3-VL a SigLIP-2 one, the large for 2B and 4B, the so400m above.
VIT_QWEN2_VL = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "patch_size": 14}
VIT_QWEN2_5_VL = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16}
VIT_QWEN3_VL_LARGE = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "patch_size": 16,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}
VIT_QWEN3_VL_SO400M = {
    **VIT_QWEN3_VL_LARGE,
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "deepstack_visual_indexes": [8, 16, 24],
}
TINY_VISION_QWEN2_VL = {
    "depth": 2,
    "embed_dim": 32,
    "mlp_ratio": 4,
    "num_heads": 2,
    "patch_size": 14,
}  # qwenft.models.tiny's tiny-qwen2-vl


def _vl(arch: Arch, model_type: str, vision: dict, out_hidden: int | None = None) -> Arch:
    return replace(
        arch,
        vision_params=vision_params(model_type, vision, out_hidden or arch.hidden_size),
        vision=VisionDims.of(model_type, vision),
    )


TINY_ARCH_QWEN2_VL = _vl(TINY_ARCH, "qwen2_vl", TINY_VISION_QWEN2_VL)


def _presets() -> list[ModelPreset]:
    out = [
        ModelPreset("tiny-qwen2", None, "qwen2", TINY_ARCH),
        ModelPreset("tiny-qwen3", None, "qwen3", TINY_ARCH_QWEN3),
        ModelPreset("tiny-qwen2-vl", None, "qwen2-vl", TINY_ARCH_QWEN2_VL),
        ModelPreset("tiny-qwen3-moe", None, "qwen3", TINY_ARCH_QWEN3_MOE),
    ]
    for size, arch in [
        ("0.5B", _Q15_05),
        ("1.8B", _Q15_18),
        ("4B", _Q15_4),
        ("7B", _Q15_7),
        ("14B", _Q15_14),
    ]:
        for suffix in ("", "-Chat"):
            out.append(ModelPreset("", f"Qwen/Qwen1.5-{size}{suffix}", "qwen1.5", arch))
    for size, arch in [("0.5B", _Q2_05), ("1.5B", _Q2_15), ("7B", _Q2_7), ("72B", _Q2_72)]:
        for suffix in ("", "-Instruct"):
            out.append(ModelPreset("", f"Qwen/Qwen2-{size}{suffix}", "qwen2", arch))
    for size, arch in [
        ("0.5B", _Q2_05),
        ("1.5B", _Q2_15),
        ("3B", _Q25_3),
        ("7B", _Q2_7),
        ("14B", _Q25_14),
        ("32B", _Q25_32),
        ("72B", _Q2_72),
    ]:
        for suffix in ("", "-Instruct"):
            out.append(ModelPreset("", f"Qwen/Qwen2.5-{size}{suffix}", "qwen2.5", arch))
        # Qwen's own quantized releases of the instruct models (LoRA trains on them as they are)
        for suffix, quant in (
            ("-GPTQ-Int4", ("gptq", 4)),
            ("-GPTQ-Int8", ("gptq", 8)),
            ("-AWQ", ("awq", 4)),
        ):
            name = f"Qwen/Qwen2.5-{size}-Instruct{suffix}"
            out.append(ModelPreset("", name, "qwen2.5", arch, quant))
    for kind in ("Coder", "Math"):
        for suffix in ("", "-Instruct"):
            out.append(ModelPreset("", f"Qwen/Qwen2.5-{kind}-7B{suffix}", "qwen2.5", _Q2_7))
    for size, arch in [
        ("0.6B", _Q3_06),
        ("1.7B", _Q3_17),
        ("4B", _Q3_4),
        ("8B", _Q3_8),
        ("14B", _Q3_14),
        ("32B", _Q3_32),
    ]:
        for suffix in ("", "-Base"):
            out.append(ModelPreset("", f"Qwen/Qwen3-{size}{suffix}", "qwen3", arch))
        if size in ("4B", "8B", "14B", "32B"):
            out.append(ModelPreset("", f"Qwen/Qwen3-{size}-AWQ", "qwen3", arch, ("awq", 4)))
    out.append(ModelPreset("", "Qwen/Qwen3-4B-Instruct-2507", "qwen3-instruct-2507", _Q3_4))
    out.append(ModelPreset("", "Qwen/Qwen3-4B-Thinking-2507", "qwen3-thinking-2507", _Q3_4))
    # mixture-of-experts models (qwenft.models.moe: what LoRA covers of them)
    out.append(ModelPreset("", "Qwen/Qwen1.5-MoE-A2.7B", "qwen1.5", _Q15_A27))
    out.append(ModelPreset("", "Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen1.5", _Q15_A27))
    out.append(ModelPreset("", "Qwen/Qwen2-57B-A14B", "qwen2", _Q2_57A14))
    out.append(ModelPreset("", "Qwen/Qwen2-57B-A14B-Instruct", "qwen2", _Q2_57A14))
    out.append(ModelPreset("", "Qwen/Qwen3-30B-A3B-Base", "qwen3", _Q3_30A3))
    for size, arch in [("30B-A3B", _Q3_30A3), ("235B-A22B", _Q3_235A22)]:
        out.append(ModelPreset("", f"Qwen/Qwen3-{size}", "qwen3", arch))
        out.append(ModelPreset("", f"Qwen/Qwen3-{size}-Instruct-2507", "qwen3-instruct-2507", arch))
        out.append(ModelPreset("", f"Qwen/Qwen3-{size}-Thinking-2507", "qwen3-thinking-2507", arch))
    # Qwen3-Coder answers directly (no thinking mode): the 2507 Instruct template
    out.append(
        ModelPreset("", "Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3-instruct-2507", _Q3_30A3)
    )
    # vision-language models (LLaMA-Factory 0.9.5's qwen2_vl / qwen3_vl(_nothink) templates)
    for size, arch in [("2B", _Q2_15), ("7B", _Q2_7), ("72B", _Q2_72)]:
        vl = _vl(arch, "qwen2_vl", VIT_QWEN2_VL)
        out.append(ModelPreset("", f"Qwen/Qwen2-VL-{size}-Instruct", "qwen2-vl", vl))
    for size, arch in [("3B", _Q25_3), ("7B", _Q2_7), ("32B", _Q25_32), ("72B", _Q2_72)]:
        vl = _vl(arch, "qwen2_5_vl", VIT_QWEN2_5_VL)
        out.append(ModelPreset("", f"Qwen/Qwen2.5-VL-{size}-Instruct", "qwen2.5-vl", vl))
    for size, arch, vit in [
        ("2B", _Q3_17, VIT_QWEN3_VL_LARGE),
        ("4B", _Q3_4, VIT_QWEN3_VL_LARGE),
        ("8B", _Q3_8, VIT_QWEN3_VL_SO400M),
        ("32B", _Q3_32, VIT_QWEN3_VL_SO400M),
    ]:
        vl = _vl(arch, "qwen3_vl", vit)
        out.append(ModelPreset("", f"Qwen/Qwen3-VL-{size}-Instruct", "qwen3-vl", vl))
        out.append(ModelPreset("", f"Qwen/Qwen3-VL-{size}-Thinking", "qwen3-vl-thinking", vl))
    return [p if p.name else replace(p, name=p.hub_id.split("/", 1)[1].lower()) for p in out]


PRESETS: dict[str, ModelPreset] = {p.name: p for p in _presets()}
_BY_HUB_ID: dict[str, ModelPreset] = {p.hub_id.lower(): p for p in PRESETS.values() if p.hub_id}


def family_from_name(name: str, model_type: str | None = None) -> str | None:
    """Guess the Qwen family from a hub id or folder name (and config.json's model_type)."""
    n = name.lower()
    mt = model_type or ""
    if "qwen3-vl" in n or "qwen3_vl" in n or mt.startswith("qwen3_vl"):
        return "qwen3-vl-thinking" if "thinking" in n else "qwen3-vl"
    if "qwen2.5-vl" in n or "qwen2_5_vl" in n or mt == "qwen2_5_vl":
        return "qwen2.5-vl"
    if "qwen2-vl" in n or "qwen2_vl" in n or mt == "qwen2_vl":
        return "qwen2-vl"
    if "qwen3" in n or mt.startswith("qwen3"):
        if "2507" in n and "thinking" in n:
            return "qwen3-thinking-2507"
        if ("2507" in n or "coder" in n) and "instruct" in n:
            return "qwen3-instruct-2507"  # Qwen3-Coder Instruct has no thinking mode either
        return "qwen3"
    if "qwen2.5" in n or "qwen2_5" in n:
        return "qwen2.5"
    if "qwen1.5" in n or "qwen1_5" in n:
        return "qwen1.5"
    if "qwen2" in n or mt.startswith("qwen2"):
        return "qwen2"
    return None


@dataclass
class ResolvedModel:
    """A model argument made concrete: where LLaMA-Factory loads it from and how to talk to it."""

    spec: str  # what the user typed
    kind: str  # "tiny" | "hub" | "local"
    path: str  # model_name_or_path for LLaMA-Factory (hub id or absolute folder)
    family: str
    template: str
    default_system: str
    thinking: str
    arch: Arch | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ResolvedModel:
        """The inverse of to_dict (as a run manifest stores it)."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        arch = fields.get("arch")
        if isinstance(arch, dict):
            moe = arch.get("moe")
            if isinstance(moe, dict):
                moe = Moe(**{**moe, "mlp_only_layers": tuple(moe.get("mlp_only_layers") or ())})
            vision = arch.get("vision")
            if isinstance(vision, dict):
                vision = VisionDims(**vision)
            fields["arch"] = Arch(**{**arch, "moe": moe, "vision": vision})
        return cls(**fields)


def _from_family(
    spec: str,
    kind: str,
    path: str,
    family: str,
    arch: Arch | None,
    quantization: tuple[str, int | None] | None = None,
) -> ResolvedModel:
    fam = FAMILIES[family]
    extra = (
        {"quantization": {"method": quantization[0], "bits": quantization[1]}}
        if quantization
        else {}
    )
    return ResolvedModel(
        spec, kind, path, family, fam.template, fam.default_system, fam.thinking, arch, extra
    )


# What loading a pre-quantized base needs of the machine, by quant_method (LLaMA-Factory 0.9.5's
# check_version calls; AWQ's and EETQ's kernels are CUDA's): settings.quantized_base_needs.
QUANTIZED_BASE_NEEDS: dict[str, Needs] = {
    "gptq": Needs(packages=(("gptqmodel", "gptqmodel"),)),
    "awq": Needs(cuda=True, packages=(("autoawq", "awq"),)),
    "aqlm": Needs(packages=(("aqlm", "aqlm"),)),
    "hqq": Needs(packages=(("hqq", "hqq"),)),
    "eetq": Needs(cuda=True, packages=(("eetq", "eetq"),)),
    "bitsandbytes": Needs(packages=(("bitsandbytes", "bitsandbytes"),)),
}


def quantization_label(quant: dict) -> str:
    """ "4-bit GPTQ" (for messages)."""
    method = quant["method"].upper() if quant["method"] != "bitsandbytes" else "bitsandbytes"
    return f"{quant['bits']}-bit {method}" if quant["bits"] else method


def quantization_of(config: dict) -> tuple[str, int | None] | None:
    """A pre-quantized base's (method, bits), from config.json's quantization_config (GPTQ, AWQ,
    AQLM, HQQ, EETQ, bitsandbytes, FP8, ...); None for an unquantized one."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or "").lower()
    if method == "bitsandbytes" or q.get("load_in_4bit") or q.get("load_in_8bit"):
        return "bitsandbytes", 4 if q.get("load_in_4bit") else 8
    bits = (
        q.get("bits")
        or q.get("w_bit")
        or q.get("nbits")
        or {"aqlm": 2, "eetq": 8, "fp8": 8}.get(method)
    )
    return method, int(bits) if bits else None


def _arch_from_config(cfg: dict) -> Arch | None:
    # A vision-language model's language model is in text_config (transformers 5 writes it so,
    # Qwen3-VL ships it so); Qwen2-VL and Qwen2.5-VL releases have it flat, like the text models.
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        arch = Arch(
            text["hidden_size"],
            text["intermediate_size"],
            text["num_hidden_layers"],
            text["num_attention_heads"],
            text.get("num_key_value_heads", text["num_attention_heads"]),
            text["vocab_size"],
            bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            text.get("head_dim"),
            moe=Moe.from_config({"model_type": cfg.get("model_type"), **text}),
        )
        vision = cfg.get("vision_config")
        if isinstance(vision, dict):
            out = vision.get("out_hidden_size", arch.hidden_size)
            arch = _vl(arch, str(cfg.get("model_type")), vision, out)
        return arch
    except (KeyError, TypeError):
        return None


def resolve_model(spec: str, tiny_home: Path | None = None) -> ResolvedModel:
    """Turn a preset name, hub id or local folder into a ResolvedModel; raise QwenftError if unknown.

    Tiny presets resolve to their cache folder under QWENFT_HOME without building them (the
    launcher builds them just before a real run, so that --dry-run writes nothing).
    """
    from qwenft.paths import qwenft_home

    key = spec.strip()
    preset = PRESETS.get(key.lower()) or _BY_HUB_ID.get(key.lower())
    if preset is not None and preset.hub_id is None:
        home = tiny_home or qwenft_home()
        return _from_family(
            spec, "tiny", str(home / "models" / preset.name), preset.family, preset.arch
        )
    if preset is not None:
        return _from_family(
            spec, "hub", preset.hub_id, preset.family, preset.arch, preset.quantization
        )

    path = Path(key).expanduser()
    looks_like_path = path.exists() or key.startswith((".", "/", "~")) or key.count("/") > 1
    if looks_like_path:
        if not path.is_dir():
            raise QwenftError(
                f"model folder not found: {key}",
                "give a preset (see `qwenft models`), a hub id such as Qwen/Qwen2.5-7B-Instruct, "
                "or an existing local model folder",
            )
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise QwenftError(
                f"{key} has no config.json, so it is not a Hugging Face model folder",
                "point --model at the folder that holds config.json and the weights",
            )
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise QwenftError(f"cannot read {cfg_file}: {exc}") from exc
        marker = path / ".qwenft-tiny.json"
        family = None
        if marker.is_file():
            family = PRESETS.get(json.loads(marker.read_text()).get("preset", ""), None)
            family = family.family if family else None
        family = family or family_from_name(path.resolve().name, cfg.get("model_type"))
        if family is None:
            raise QwenftError(
                f"{key} does not look like a Qwen model (model_type {cfg.get('model_type')!r})",
                f"qwenft fine-tunes Qwen models; pass --template {'|'.join(Template.values())} to "
                "force one",
            )
        return _from_family(
            spec,
            "local",
            str(path.resolve()),
            family,
            _arch_from_config(cfg),
            quantization_of(cfg),
        )

    if re.fullmatch(r"[\w.-]+/[\w.-]+", key):
        family = family_from_name(key)
        if family is None:
            raise QwenftError(
                f"{key} is not a Qwen model qwenft knows",
                "use a Qwen hub id (see `qwenft models`), or pass --template "
                f"{'|'.join(Template.values())}",
            )
        return _from_family(spec, "hub", key, family, None)

    names = ", ".join(p.name for p in PRESETS.values() if p.hub_id is None)
    raise QwenftError(
        f"unknown model {key!r}",
        f"use a preset ({names}, or see `qwenft models`), a hub id or a local model folder",
    )


def template_family(template: str) -> str:
    """The family whose defaults a --template override implies (for default_system/thinking)."""
    return {
        Template.QWEN: "qwen2.5",
        Template.QWEN3: "qwen3",
        Template.QWEN3_NOTHINK: "qwen3-instruct-2507",
        Template.QWEN2_VL: "qwen2-vl",
        Template.QWEN3_VL: "qwen3-vl-thinking",
        Template.QWEN3_VL_NOTHINK: "qwen3-vl",
    }[Template(template)]
