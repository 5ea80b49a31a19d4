"""Bases qwenft derives from a model before training, where LLaMA-Factory 0.9.5 needs a script
from its repository that is not in its pip package: LLaMA Pro's expanded model
(`scripts/llama_pro.py`) and LoftQ's initialization (`scripts/loftq_init.py`).

Each derived base is made once and cached by what it was made from, in `QWENFT_HOME/derived/`:
written whole or not at all (fsutil.staged_dir) under a lock, made again when its base changed
(the files' sizes and times), streamed one tensor at a time from the base's safetensors (never the
whole model in memory).

- **LLaMA Pro** (`--llama-pro N`): the decoder layers are split into N equal groups and after each
  group a copy of its last layer is inserted with its output projections (`o_proj`, `down_proj`)
  zeroed, so each new block adds nothing to the residual stream and the expanded model computes
  exactly what the base computes. LLaMA-Factory then trains only the new blocks: with
  `use_llama_pro` and `freeze_trainable_layers: N` it picks layers stride-1, 2*stride-1, ...
  (stride = the expanded depth / N), which are the inserted ones.
- **LoftQ** (`--loftq`, QLoRA): each weight W that LoRA adapts is split into Q, its 4-bit NF4
  quantization, and a rank-r LoRA B·A of what Q misses, alternating `iters` times: Q = nf4(W - B·A),
  then B·A = the best rank-r approximation of W - Q (SVD). The derived base holds Q (dequantized;
  bitsandbytes quantizes it again at load to the same 4-bit codes, up to the double quantization of
  the block scales) and `loftq_init/` the
  adapter LLaMA-Factory starts from (`adapter_name_or_path`); B is divided by the LoRA scaling
  (alpha / r, or alpha / sqrt(r) with rsLoRA), so that Q + scaling·B·A is the approximation at step
  0 whatever the run's alpha (peft's own LoftQ assumes a scaling of 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, file_lock, staged_dir
from qwenft.paths import qwenft_home

LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
ZEROED = ("o_proj", "down_proj")  # the projections back into the residual stream
WEIGHTS = ("*.safetensors", "model.safetensors.index.json")
SIGNATURE = ".qwenft-derived.json"  # what the copy was made from
SHARD_BYTES = 2 << 30  # the derived model's shards: at most about 2 GiB each
LOFTQ_ADAPTER = "loftq_init"
LOFTQ_BLOCK = 64  # bitsandbytes' NF4 block size, which LLaMA-Factory's QLoRA loads with
Log = Callable[[str], None]


def layer_count(model_dir: Path) -> int:
    """The decoder depth of a model folder (config.json's num_hidden_layers)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("text_config", config)["num_hidden_layers"])


def derived_path(model_dir: str | Path, what: str) -> Path:
    """Where the base derived from model_dir as `what` ("pro2", "loftq-r16-...") lives."""
    model_dir = Path(model_dir).expanduser().absolute()
    digest = hashlib.sha256(f"{model_dir}\0{what}".encode()).hexdigest()[:12]
    return qwenft_home() / "derived" / f"{model_dir.name}-{what}-{digest}"


def _derive(model_dir: Path, what: str, recipe: dict, build: Callable[[Path], None]) -> Path:
    """The cached base derived from model_dir by build(folder), made again when the base or the
    recipe changed."""
    model_dir = Path(model_dir).expanduser().absolute()
    target = derived_path(model_dir, what)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in model_dir.iterdir()}
    signature = {"base": str(model_dir), "recipe": recipe, "files": dict(sorted(files.items()))}
    with file_lock(target.parent / f".{target.name}.lock"):
        made = target / SIGNATURE
        if made.is_file() and json.loads(made.read_text(encoding="utf-8")) == signature:
            return target
        with staged_dir(target, replace=True) as stage:
            for item in model_dir.iterdir():  # tokenizer, generation config, chat template ...
                side = not any(item.match(p) for p in WEIGHTS) and not item.name.startswith(".")
                if item.is_file() and side:
                    shutil.copy2(item, stage / item.name)
            build(stage)
            atomic_write_json(stage / SIGNATURE, signature)
    return target


class _Shards:
    """Tensors written into safetensors shards of about SHARD_BYTES, then the index."""

    def __init__(self, out: Path) -> None:
        self.out, self.index, self.shard, self.size = out, {}, {}, 0

    def put(self, name: str, tensor: Any) -> None:
        self.shard[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            name = f"model-{len(set(self.index.values())) + 1:05d}.safetensors"
            save_file(self.shard, self.out / name, metadata={"format": "pt"})
            self.index.update(dict.fromkeys(self.shard, name))
            self.shard, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        total = sum((self.out / f).stat().st_size for f in set(self.index.values()))
        atomic_write_json(
            self.out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.index.items()))},
        )


def _tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the base's safetensors, one at a time."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QwenftError(
            f"qwenft derives a base from the weights as safetensors; {model_dir} has none",
            "convert the model to safetensors first (transformers: save_pretrained)",
        )
    for file in files:
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, fh.get_tensor(name)


# --------------------------------------------------------------------------------------------------
# LLaMA Pro


def check_blocks(depth: int, blocks: int) -> None:
    """QwenftError unless `blocks` divides the base's depth (LLaMA-Factory's own condition)."""
    if depth % blocks:
        fits = ", ".join(str(n) for n in range(1, depth + 1) if depth % n == 0)
        raise QwenftError(
            f"--llama-pro {blocks}: the base has {depth} decoder layers, which {blocks} new "
            "blocks do not split into equal groups",
            f"choose a number of blocks that divides {depth}: {fits}",
        )


def expand(model_dir: Path, blocks: int, log: Log = print) -> Path:
    """LLaMA Pro's base: model_dir with `blocks` identity blocks added (made once)."""
    model_dir = Path(model_dir).expanduser().absolute()
    depth = layer_count(model_dir)
    check_blocks(depth, blocks)

    def build(out: Path) -> None:
        log(f"LLaMA Pro: expanding {model_dir.name} from {depth} to {depth + blocks} layers ...")
        split = depth // blocks
        shards = _Shards(out)
        for name, tensor in _tensors(model_dir):
            m = LAYER.match(name)
            if m is None:
                shards.put(name, tensor)
                continue
            old = int(m.group(2))
            new = old + old // split  # its index after the blocks inserted before it
            shards.put(f"{m.group(1)}{new}{m.group(3)}", tensor)
            if (old + 1) % split == 0:  # the group's last layer: its copy follows it
                zero = any(z in name for z in ZEROED)
                copy = tensor.new_zeros(tensor.shape) if zero else tensor.clone()
                shards.put(f"{m.group(1)}{new + 1}{m.group(3)}", copy)
        shards.close()
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config", config)
        text["num_hidden_layers"] = depth + blocks
        if isinstance(text.get("layer_types"), list):  # Qwen2/Qwen3: one entry per layer
            kinds = text["layer_types"]
            text["layer_types"] = [
                t
                for g in range(blocks)
                for t in (*kinds[g * split : (g + 1) * split], kinds[(g + 1) * split - 1])
            ]
        if isinstance(text.get("max_window_layers"), int):
            text["max_window_layers"] += text["max_window_layers"] // split
        atomic_write_json(out / "config.json", config)

    return _derive(model_dir, f"pro{blocks}", {"llama_pro": blocks}, build)


# --------------------------------------------------------------------------------------------------
# LoftQ


def loftq_recipe(lora: dict[str, Any], iters: int) -> dict[str, Any]:
    """What a LoftQ base is made of: the QLoRA run's LoRA settings (lora_rank, lora_alpha,
    lora_target, use_rslora; LLaMA-Factory's defaults where unset) and the alternating steps."""
    rank = int(lora["lora_rank"])
    return {
        "rank": rank,
        "alpha": float(lora.get("lora_alpha") or 2 * rank),
        "dropout": float(lora.get("lora_dropout") or 0.0),
        "target": str(lora.get("lora_target") or "all"),
        "rslora": bool(lora.get("use_rslora")),
        "bits": 4,
        "iters": iters,
    }


def loftq_what(recipe: dict[str, Any]) -> str:
    """The name of a LoftQ base in the cache (derived_path)."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return f"loftq-r{recipe['rank']}-{digest}"


def loftq(model_dir: Path, recipe: dict[str, Any], log: Log = print) -> Path:
    """LoftQ's base for a QLoRA run, with its initial adapter in RESULT/loftq_init (made once)."""
    model_dir = Path(model_dir).expanduser().absolute()
    rank, iters, target = recipe["rank"], recipe["iters"], recipe["target"]
    scaling = recipe["alpha"] / (math.sqrt(rank) if recipe["rslora"] else rank)
    modules = None if target == "all" else {t.strip() for t in target.split(",")}
    what = loftq_what(recipe)

    def build(out: Path) -> None:
        from peft import LoraConfig

        log(f"LoftQ: initializing {model_dir.name} (rank {rank}, 4-bit NF4, {iters} steps) ...")
        shards, adapter, adapted = _Shards(out), {}, set()
        for name, tensor in _tensors(model_dir):
            module = name.removesuffix(".weight")
            short = module.rsplit(".", 1)[-1]
            linear = tensor.dim() == 2 and LAYER.match(name) and name.endswith(".weight")
            if linear and (modules is None or short in modules):
                q, *lora = (
                    x.to(tensor.dtype).contiguous()
                    for x in _loftq_split(tensor, rank, iters, scaling)
                )
                shards.put(name, q)
                for half, x in zip("AB", lora, strict=True):
                    adapter[f"base_model.model.{module}.lora_{half}.weight"] = x
                adapted.add(short)
            else:
                shards.put(name, tensor)
        shards.close()
        if not adapted:
            raise QwenftError(f"--loftq: no linear layer of {model_dir.name} matches {target}")
        from safetensors.torch import save_file

        (out / LOFTQ_ADAPTER).mkdir()
        save_file(adapter, out / LOFTQ_ADAPTER / "adapter_model.safetensors")
        config = LoraConfig(
            r=rank,
            lora_alpha=recipe["alpha"],
            lora_dropout=recipe["dropout"],
            target_modules=sorted(adapted),
            use_rslora=recipe["rslora"],
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(derived_path(model_dir, what)),
        )
        config.save_pretrained(str(out / LOFTQ_ADAPTER))

    return _derive(model_dir, what, recipe, build)


def _loftq_split(weight: Any, rank: int, iters: int, scaling: float) -> tuple:
    """(Q, A, B) of one weight: Q its NF4 quantization (dequantized), scaling·B·A the rank-r
    approximation of what Q misses."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = weight.float()
    low = torch.zeros_like(w)
    for _ in range(iters):
        codes, state = quantize_4bit(w - low, blocksize=LOFTQ_BLOCK, quant_type="nf4")
        q = dequantize_4bit(codes, state)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = s[:rank].sqrt()
        left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
        low = left @ right
    return q, right, left / scaling
