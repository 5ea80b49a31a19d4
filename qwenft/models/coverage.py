"""What a run trains of its model, from the architecture numbers: which linear layers and which
parameters an adapter covers, how many parameters that is, and what share of the model.

Pure arithmetic over `qwenft.models.presets.Arch` (no torch): `plan` counts with it, `train` says
it before launch and records it in the manifest, and qwenft.models.moe_adapter builds the initial
adapter of a mixture-of-experts run from the same targets.

A mixture-of-experts model (Qwen1.5-MoE, Qwen2-MoE, Qwen3-MoE) has, in transformers 5, its routed
experts as two fused parameters per sparse layer (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) and its router as a bare parameter (`mlp.gate.weight`), none of them an
`nn.Linear`: LLaMA-Factory's `lora_target: all` finds the attention projections (and Qwen2-MoE's
shared expert) only. PEFT (>= 0.17) puts LoRA on parameters (`target_parameters`): per expert a
rank-r pair, r x (in + out) for each expert of each fused parameter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from qwenft.errors import QwenftError
from qwenft.models.presets import Arch

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = LORA_MODULES[:4]
SHARED_EXPERT_GATE = "shared_expert_gate"  # Qwen1.5/2-MoE: the shared expert's sigmoid gate
# The fused expert parameters and the router, as PEFT's target_parameters names them (a suffix of
# the parameter's full name) and as transformers 5 builds Qwen2-MoE and Qwen3-MoE.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ROUTER_PARAMETER = "mlp.gate.weight"


def linear_shapes(arch: Arch) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each nn.Linear in one decoder layer, by the name LoRA
    targets it with. A mixture-of-experts layer has the attention projections and, where it has
    one, the shared expert's gate/up/down and its gate; its routed experts are parameters
    (expert_shapes)."""
    h, i = arch.hidden_size, arch.intermediate_size
    hd = arch.head_dim or h // arch.num_attention_heads
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    moe = arch.moe
    if moe is None:
        return {**shapes, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    s = moe.shared_expert_intermediate_size
    if s:
        shapes.update(gate_proj=(h, s), up_proj=(h, s), down_proj=(s, h), shared_expert_gate=(h, 1))
    return shapes


def layer_kinds(arch: Arch) -> list[tuple[int, dict[str, tuple[int, int]]]]:
    """(how many layers, their linear_shapes) for each kind of decoder layer: a dense model's one
    kind; an MoE model's sparse layers, and its dense ones (mlp_only_layers: an ordinary MLP)."""
    layers = arch.num_hidden_layers
    if arch.moe is None:
        return [(layers, linear_shapes(arch))]
    sparse = arch.moe.sparse_layers(layers)
    kinds = [(sparse, linear_shapes(arch))]
    if sparse < layers:
        kinds.append((layers - sparse, linear_shapes(replace(arch, moe=None))))
    return kinds


def linear_weight_params(arch: Arch) -> int:
    """Parameters in the decoder's nn.Linear weights (what bitsandbytes quantizes; an MoE model's
    experts and router are parameters, not nn.Linear)."""
    return sum(n * sum(a * b for a, b in shapes.values()) for n, shapes in layer_kinds(arch))


def expert_shapes(arch: Arch) -> dict[str, tuple[int, int, int]]:
    """(experts, dim 1, dim 2) of each fused expert parameter of one sparse layer, as
    transformers 5 stores them: gate_up_proj [E, 2 x moe_intermediate, hidden], down_proj
    [E, hidden, moe_intermediate]. Empty for a dense model."""
    if arch.moe is None:
        return {}
    e, m, h = arch.moe.num_experts, arch.moe.moe_intermediate_size, arch.hidden_size
    return {EXPERT_PARAMETERS[0]: (e, 2 * m, h), EXPERT_PARAMETERS[1]: (e, h, m)}


def lora_names(arch: Arch) -> tuple[str, ...]:
    """The linear layers `lora_target: all` finds in the decoder (LLaMA-Factory's
    find_all_linear_modules: every nn.Linear but lm_head)."""
    return tuple(dict.fromkeys(name for _, shapes in layer_kinds(arch) for name in shapes))


def parse_lora_target(target: str, arch: Arch | None = None) -> tuple[str, ...]:
    """'all' or a comma list of linear layer names -> the modules; QwenftError if one is not a
    linear layer of the model (a mixture-of-experts model's experts are not: --lora-experts)."""
    known = lora_names(arch) if arch is not None else LORA_MODULES
    text = target.strip()
    if text == "all":
        return known
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in known]
    if not names or bad:
        moe = arch is not None and arch.moe is not None
        raise QwenftError(
            f"unknown --lora-target {', '.join(bad) or repr(target)}"
            + (" (this mixture-of-experts model's experts are parameters, not linear layers)"
               if moe else ""),
            f"use all, or a comma list of {','.join(known)}"
            + ("; --lora-experts on|off covers the experts" if moe else ""),
        )  # fmt: skip
    return names


def lora_params(arch: Arch, rank: int, targets: tuple[str, ...] = LORA_MODULES) -> int:
    """Adapter parameters on linear layers: rank x (in + out) per targeted linear, per layer."""
    return sum(
        n * sum(rank * sum(shapes[t]) for t in targets if t in shapes)
        for n, shapes in layer_kinds(arch)
    )


def expert_lora_params(arch: Arch, rank: int) -> int:
    """PEFT's LoRA on the fused expert parameters: r x (dim 1 + dim 2) per expert, for each."""
    if arch.moe is None:
        return 0
    per_layer = sum(rank * e * (a + b) for e, a, b in expert_shapes(arch).values())
    return arch.moe.sparse_layers(arch.num_hidden_layers) * per_layer


def router_lora_params(arch: Arch, rank: int) -> int:
    """PEFT's LoRA on the router weight [experts, hidden]: r x (hidden + experts) per layer."""
    if arch.moe is None:
        return 0
    sparse = arch.moe.sparse_layers(arch.num_hidden_layers)
    return sparse * rank * (arch.hidden_size + arch.moe.num_experts)


@dataclass(frozen=True)
class Coverage:
    """What a run trains: the linear layers and parameters an adapter covers (or a full/freeze
    run's weights), the base parameters under it, the trainable parameters, of `total`."""

    method: str
    modules: tuple[str, ...]  # LoRA: the linear layers (target_modules)
    parameters: tuple[str, ...]  # LoRA: the parameters (PEFT's target_parameters)
    covered: int  # base parameters the adapter adapts (full/freeze: the weights trained)
    trainable: int  # parameters the optimizer steps (LoRA: the adapter's)
    total: int
    experts: bool | None = None  # a mixture-of-experts model: are its experts trained?
    router: bool | None = None  # ... and its router?
    rank: int | None = None
    layers: int | None = None  # freeze: the decoder layers trained

    @property
    def covered_share(self) -> float:
        return self.covered / self.total if self.total else 0.0

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "covered_share": round(self.covered_share, 6),
            "trainable_share": round(self.trainable_share, 6),
            "line": self.line(),
        }

    def line(self) -> str:
        """What the run trains, in one line (`train` and `plan` print it after "trains: ")."""
        share = (
            f"{_count(self.covered)} of {_count(self.total)} parameters "
            f"({100 * self.covered_share:.1f}%)"
        )
        if self.method in ("full", "freeze"):
            what = (
                "every weight"
                if self.method == "full"
                else f"the {'last' if (self.layers or 0) > 0 else 'first'} "
                f"{abs(self.layers or 0)} decoder layer(s), all their weights"
            )
            moe = ", the experts and the router included" if self.experts else ""
            return f"{what}{moe}: {share}"
        targets = ",".join(self.modules) or "no linear layer"
        parts = [f"LoRA r{self.rank} covers {targets}"]
        if self.experts is not None:
            experts = [p for p in self.parameters if p in EXPERT_PARAMETERS]
            parts.append(
                f"the experts ({', '.join(experts)})" if experts else "not the experts (off)"
            )
            parts.append("the router (mlp.gate, LoRA)" if self.router else "the router frozen")
        return (
            "; ".join(parts) + f": {share} under the adapter, {_count(self.trainable)} trainable "
            f"({100 * self.trainable_share:.2f}%)"
        )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{3 if n < 10 * size else 1}f}{unit}"
    return str(n)


def coverage(
    arch: Arch,
    method: str,
    rank: int = 16,
    target: str = "all",
    experts: bool = True,
    router: bool = False,
    trainable_layers: int = 2,
) -> Coverage:
    """What `method` trains of `arch`: LoRA/QLoRA on `target`'s linear layers, and on a
    mixture-of-experts model on the experts (`experts`) and the router (`router`) too; full every
    weight; freeze the last (first, if negative) `trainable_layers` decoder layers."""
    total = arch.params
    moe = arch.moe is not None
    if method == "full":
        return Coverage(method, (), (), total, total, total, moe or None, moe or None)
    if method == "freeze":
        layers = min(abs(trainable_layers), arch.num_hidden_layers)
        per_layer = (total - embedding_params(arch) - arch.hidden_size) // arch.num_hidden_layers
        n = layers * per_layer
        sign = 1 if trainable_layers > 0 else -1
        return Coverage(method, (), (), n, n, total, moe or None, moe or None, layers=sign * layers)
    modules = parse_lora_target(target, arch)
    covered = sum(
        n * sum(shapes[m][0] * shapes[m][1] for m in modules if m in shapes)
        for n, shapes in layer_kinds(arch)
    )
    trainable = lora_params(arch, rank, modules)
    parameters: tuple[str, ...] = ()
    if moe:
        assert arch.moe is not None
        sparse = arch.moe.sparse_layers(arch.num_hidden_layers)
        if experts:
            parameters += EXPERT_PARAMETERS
            covered += sparse * arch.moe.num_experts * arch.moe.expert_params(arch.hidden_size)
            trainable += expert_lora_params(arch, rank)
        if router:
            parameters += (ROUTER_PARAMETER,)
            covered += sparse * arch.moe.router_params(arch.hidden_size)
            trainable += router_lora_params(arch, rank)
    return Coverage(
        method,
        modules,
        parameters,
        covered,
        trainable,
        total,
        experts if moe else None,
        router if moe else None,
        rank=rank,
    )


def embedding_params(arch: Arch) -> int:
    """embed_tokens plus lm_head (one matrix when tied); they stay bf16 under QLoRA."""
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
