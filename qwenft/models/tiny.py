"""Tiny Qwen models with the real Qwen vocabulary, built offline.

A tiny model ("tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2-vl") has the architecture,
config layout, tokenizer and chat template of a real Qwen2-Instruct / Qwen3 / Qwen3-MoE /
Qwen2-VL-Instruct model, but only
~9.8 M parameters, so LLaMA-Factory can train, export and chat with it on a CPU in seconds. The
tokenizer is the real one: Qwen's 151,643 byte-level BPE ranks (shared by Qwen, Qwen1.5, Qwen2,
Qwen2.5 and Qwen3) plus Qwen's added tokens, the vision ones (<|vision_start|>, <|image_pad|> ...)
included. tiny-qwen2-vl also has Qwen2-VL's image processor config (preprocessor_config.json, as
Qwen publishes it): loading its processor needs torchvision (the `vision` extra), building it
does not.

The ranks file (``qwen.tiktoken``) ships inside Alibaba's ``dashscope`` 2.0.2 wheel. It is fetched
once with pip (or taken from $QWENFT_QWEN_TIKTOKEN), sha256-checked and kept in
``$QWENFT_HOME/vocab``; after that every build is offline and deterministic.

torch and transformers are imported inside the functions only: ``qwenft --help`` stays light.
"""

# ruff: noqa: E501  (the Qwen3 chat template below is kept line for line as Qwen publishes it)
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, atomic_write_text, file_lock, staged_dir, umask_mode
from qwenft.paths import qwenft_home
from qwenft.proc import launcher

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
DASHSCOPE_REQUIREMENT = "dashscope==2.0.2"
DASHSCOPE_MEMBER = "dashscope/resources/qwen.tiktoken"
VOCAB_ENV = "QWENFT_QWEN_TIKTOKEN"

# Bump when the built files change, so caches built by an older qwenft are rebuilt.
# 2: tokenizer.json with its merges as "a b" strings, compact (_write_merges_as_strings).
BUILD_VERSION = 2
MARKER_NAME = ".qwenft-tiny.json"
SEED = 1234
# Embeddings of std 0.5: with the default 0.02 and tied embeddings, logits stay within about
# +-1.3, so LoRA cannot lower the loss below ~10.7 (ln 151936 - 1.3); at 0.5 the tiny model learns
# a few question/answer rows word for word (docs/tiny-models.md).
EMBED_STD = 0.5
# tiny-qwen2-vl's vision encoder. At transformers' init (std 0.02) its features for one-colour
# images are nearly linear in the RGB value and 20 times smaller than a word embedding, and LoRA
# cannot learn to name 8 colours (docs/tiny-models.md). So its weights get std VISION_GAIN /
# sqrt(fan_in) (nonlinear enough to tell the colours apart), and the merger's output layer std
# EMBED_STD / (GELU_RMS * sqrt(fan_in)): an image token enters the language model at about a
# word's scale (norm 6-9, a word's 4).
VISION_GAIN = 2.0
GELU_RMS = 0.6523  # the RMS of GELU(z) for z ~ N(0, 1): the merger's hidden activations

# Qwen's pre-tokenizer: like cl100k but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BASE_VOCAB_SIZE = 151643  # ranks in qwen.tiktoken; added tokens start here
# Added tokens, in id order from 151643. The first 14 are special, the rest are not.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
NON_SPECIAL_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
ADDED_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645

# The chat template of Qwen2-Instruct (Qwen/Qwen2-*-Instruct tokenizer_config.json).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The chat template of the Qwen3 hybrid (thinking / non-thinking) models, e.g. Qwen/Qwen3-8B.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# The chat template of Qwen2-VL-Instruct (Qwen/Qwen2-VL-*-Instruct chat_template.json, the same in
# its tokenizer_config.json): a content list's image and video parts become vision placeholders.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT_TEMPLATES = {
    "qwen2": QWEN2_CHAT_TEMPLATE,
    "qwen3": QWEN3_CHAT_TEMPLATE,
    "qwen2-vl": QWEN2_VL_CHAT_TEMPLATE,
}

VISION_START_ID = 151652
IMAGE_PAD_ID = 151655
# Qwen2-VL-Instruct's preprocessor_config.json: images are resized to a multiple of 28 pixels
# (patch 14 x merge 2) between min_pixels and max_pixels, in CLIP's mean and std.
QWEN2_VL_PREPROCESSOR: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

_COMMON_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,  # 151,669 used ids padded to a multiple of 128, as in real Qwen
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "use_cache": True,
    "attention_dropout": 0.0,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
}
# Qwen3's layout over the common numbers (tiny-qwen3, and tiny-qwen3-moe with its experts)
_QWEN3_CONFIG: dict[str, Any] = {
    **_COMMON_CONFIG,
    "head_dim": 16,
    "attention_bias": False,
    "max_position_embeddings": 40960,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
}

TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen2": {
        "family": "qwen2",
        "model_type": "qwen2",
        "architecture": "Qwen2ForCausalLM",
        # LLaMA-Factory template; pair it with default_system "You are a helpful assistant."
        "template": "qwen",
        "description": "Qwen2-Instruct layout, 2 layers, hidden 64, real Qwen vocabulary, 9.8M params",
        "config": {
            **_COMMON_CONFIG,
            "max_position_embeddings": 32768,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": 2,
        },
    },
    "tiny-qwen3": {
        "family": "qwen3",
        "model_type": "qwen3",
        "architecture": "Qwen3ForCausalLM",
        "template": "qwen3",  # LLaMA-Factory template for Qwen3 hybrid-thinking models
        "description": "Qwen3 hybrid layout, 2 layers, hidden 64, head_dim 16, real Qwen vocab",
        "config": _QWEN3_CONFIG,
    },
    "tiny-qwen3-moe": {
        "family": "qwen3",
        "model_type": "qwen3_moe",
        "architecture": "Qwen3MoeForCausalLM",
        "template": "qwen3",
        "description": "Qwen3-MoE layout (as Qwen3-30B-A3B): 2 layers, hidden 64, 4 experts of "
        "intermediate 64, 2 per token, real Qwen vocab, 9.8M params",
        "config": {
            **_QWEN3_CONFIG,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,  # as Qwen3-30B-A3B
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
        },
    },
    "tiny-qwen2-vl": {
        "family": "qwen2-vl",
        "model_type": "qwen2_vl",
        "architecture": "Qwen2VLForConditionalGeneration",
        "template": "qwen2_vl",  # LLaMA-Factory template (its mm_plugin expands <image>)
        "description": "Qwen2-VL-Instruct layout: 2 layers, hidden 64, a 2-block ViT (embed 32, "
        "patch 14, merge 2), real Qwen vocab, 9.9M params",
        "config": {
            "text_config": {
                **_COMMON_CONFIG,
                "max_position_embeddings": 32768,
                "use_sliding_window": False,
                "max_window_layers": 2,
                # M-RoPE: head_dim 16 -> 8 rotary pairs split over time, height, width (Qwen's
                # 128-wide heads use [16, 24, 24])
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [2, 3, 3],
                },
            },
            "vision_config": {
                "depth": 2,
                "embed_dim": 32,
                "num_heads": 2,
                "mlp_ratio": 4,
                "hidden_size": 64,  # the merger's output: the language model's width
                "in_channels": 3,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "tie_word_embeddings": True,
            "image_token_id": IMAGE_PAD_ID,
            "video_token_id": IMAGE_PAD_ID + 1,
            "vision_start_token_id": VISION_START_ID,
            "vision_end_token_id": VISION_START_ID + 1,
        },
        "preprocessor": QWEN2_VL_PREPROCESSOR,
    },
}


def is_tiny_preset(name: str) -> bool:
    """True when name is one of TINY_PRESETS (e.g. "tiny-qwen2")."""
    return name in TINY_PRESETS


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_hint() -> str:
    return (
        f"Allow pip to reach a package index (qwenft runs `pip download --no-deps "
        f"{DASHSCOPE_REQUIREMENT}` to get Qwen's vocabulary), or set {VOCAB_ENV} to a copy of "
        f"qwen.tiktoken (sha256 {QWEN_TIKTOKEN_SHA256}, the file {DASHSCOPE_MEMBER} inside the "
        f"{DASHSCOPE_REQUIREMENT} wheel)."
    )


def _vocab_bytes_from_env(src: str) -> bytes:
    path = Path(src).expanduser()
    if not path.is_file():
        raise QwenftError(f"{VOCAB_ENV} points to {path}, which is not a file.", _fetch_hint())
    return path.read_bytes()


def _vocab_bytes_from_pip() -> bytes:
    with tempfile.TemporaryDirectory(prefix="qwenft-dashscope-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", DASHSCOPE_REQUIREMENT, "-d", tmp,
        ]  # fmt: skip
        proc = launcher.capture(cmd, timeout_s=600)
        wheels = sorted(Path(tmp).glob("dashscope-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            errors = [line for line in lines if line.startswith("ERROR")]
            tail = "\n".join(errors[-5:] or lines[-5:])
            raise QwenftError(
                f"Could not fetch Qwen's vocabulary: `pip download {DASHSCOPE_REQUIREMENT}` failed"
                f" (exit {proc.returncode}).\n{tail}".rstrip(),
                _fetch_hint(),
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                return zf.read(DASHSCOPE_MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise QwenftError(
                f"{wheels[0].name} has no usable {DASHSCOPE_MEMBER}: {exc}", _fetch_hint()
            ) from exc


def ensure_vocab(home: Path | None = None) -> Path:
    """Path to home/vocab/qwen.tiktoken (Qwen's BPE ranks), fetched once and sha256-checked.

    Taken from $QWENFT_QWEN_TIKTOKEN when set, else extracted from the dashscope 2.0.2 wheel that
    `pip download` fetches. Raises QwenftError when it cannot be fetched or its sha256 is wrong.
    """
    home = Path(home) if home is not None else qwenft_home()
    dest = home / "vocab" / "qwen.tiktoken"
    if dest.is_file() and _sha256(dest) == QWEN_TIKTOKEN_SHA256:
        return dest
    with file_lock(dest.parent / ".qwen.tiktoken.lock"):
        if dest.is_file() and _sha256(dest) == QWEN_TIKTOKEN_SHA256:
            return dest  # another process fetched it while we waited
        src = os.environ.get(VOCAB_ENV)
        if src:
            data, origin = _vocab_bytes_from_env(src), f"{VOCAB_ENV}={src}"
        else:
            data, origin = _vocab_bytes_from_pip(), f"the {DASHSCOPE_REQUIREMENT} wheel"
        digest = hashlib.sha256(data).hexdigest()
        if digest != QWEN_TIKTOKEN_SHA256:
            raise QwenftError(
                f"Qwen vocabulary from {origin} has sha256 {digest}, expected "
                f"{QWEN_TIKTOKEN_SHA256}.",
                _fetch_hint(),
            )
        fd, tmp = tempfile.mkstemp(prefix=".qwen.tiktoken.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, umask_mode(0o666))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def build_tokenizer(vocab_file: Path, family: str):
    """A Qwen2Tokenizer (fast, tokenizers backend) from qwen.tiktoken, with the family's template.

    family "qwen2" gets the Qwen2-Instruct chat template, "qwen3" the Qwen3 hybrid one. Ids match
    tiktoken's for the same ranks and pattern; added tokens sit at 151643..151668.
    """
    if family not in CHAT_TEMPLATES:
        raise QwenftError(
            f"Unknown tokenizer family {family!r}.", f"Use one of: {', '.join(CHAT_TEMPLATES)}."
        )
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    converter = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_PATTERN)
    vocab, merges = converter.extract_vocab_merges_from_model(str(vocab_file))
    if len(vocab) != BASE_VOCAB_SIZE:
        raise QwenftError(f"{vocab_file} has {len(vocab)} ranks, expected {BASE_VOCAB_SIZE}.")
    added = {
        BASE_VOCAB_SIZE + i: AddedToken(
            tok,
            special=tok in SPECIAL_TOKENS,
            normalized=False,
            lstrip=False,
            rstrip=False,
            single_word=False,
        )  # fmt: skip
        for i, tok in enumerate(ADDED_TOKENS)
    }
    # Qwen2Tokenizer builds the same backend (BPE, NFC, Qwen's split regex, byte-level) that
    # AutoTokenizer rebuilds when it loads the saved folder, so what we test is what trains.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder=added,
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATES[family],
    )
    ids = tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    if ids != list(range(BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + len(ADDED_TOKENS))):
        raise RuntimeError(f"added token ids came out wrong: {ids}")
    return tokenizer


def _marker(preset: str) -> dict[str, Any]:
    return {
        "preset": preset,
        "build_version": BUILD_VERSION,
        "architecture": TINY_PRESETS[preset]["architecture"],
        "vocab_sha256": QWEN_TIKTOKEN_SHA256,
        "seed": SEED,
    }


def _is_complete(model_dir: Path, preset: str) -> bool:
    import json

    marker = model_dir / MARKER_NAME
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("preset") == preset
        and data.get("build_version") == BUILD_VERSION
    )


def _init_vision(visual: Any, gen: Any) -> None:
    """tiny-qwen2-vl's vision encoder weights (VISION_GAIN, GELU_RMS above); biases stay 0."""
    import torch

    last = visual.merger.mlp[-1].weight
    for _name, param in visual.named_parameters():
        if param.dim() < 2:
            continue
        fan_in = param[0].numel()
        std = VISION_GAIN / fan_in**0.5
        if param is last:
            std = EMBED_STD / (GELU_RMS * fan_in**0.5)
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def _build_into(out: Path, preset: str, vocab_file: Path) -> None:
    import torch
    import transformers

    spec = TINY_PRESETS[preset]
    config_name = re.sub(r"For(CausalLM|ConditionalGeneration)$", "Config", spec["architecture"])
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, spec["architecture"])
    config = config_cls(**spec["config"], architectures=[spec["architecture"]])
    config.dtype = torch.float32  # written as "dtype": "float32"

    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        # Std 0.02 embeddings (tied to the output layer) keep logits within about +-1.3 and LoRA
        # stalls near ln(151936); std 0.5 lets a frozen-embedding LoRA actually learn.
        gen = torch.Generator().manual_seed(SEED + 1)
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=gen, dtype=torch.float32) * EMBED_STD)
        visual = getattr(getattr(model, "model", None), "visual", None)
        if visual is not None:
            _init_vision(visual, torch.Generator().manual_seed(SEED + 2))
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
        do_sample=False,  # greedy by default: a tiny test model should answer the same each time
    )
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    tokenizer = build_tokenizer(vocab_file, spec["family"])
    tokenizer.save_pretrained(out)
    _write_merges_as_strings(out / "tokenizer.json")
    if "preprocessor" in spec:  # written as Qwen publishes it: no torchvision needed to build
        atomic_write_json(out / "preprocessor_config.json", spec["preprocessor"])
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors in {out}")


def _write_merges_as_strings(path: Path) -> None:
    """Rewrites tokenizer.json with its merges as "a b" strings, as Qwen publishes its own, and
    without indentation. transformers 5 writes each merge as a pair, and the tokenizer.json of the
    Qwen vocabulary's 294,166 merges becomes 18.7 MB that Python's json parses in 0.29 s, where
    this form (6.9 MB) takes 0.10 s: every LLaMA-Factory launch parses it six times (transformers
    loads the tokenizer, then the processor). The tokenizer is the same: byte-level BPE tokens
    hold no space (a space is "Ġ"), so each string splits back into its pair."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    if any(" " in a or " " in b for a, b in merges):
        raise RuntimeError(f"a merge of {path} holds a space: it cannot be written as a string")
    data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def ensure_tiny_model(
    preset: str, home: Path | None = None, progress: Callable[[str], Any] | None = print
) -> Path:
    """home/models/<preset>, built on first use (deterministic, offline once the vocab is there).

    The build happens in a temporary folder beside the target and is renamed into place under a
    file lock; a marker file, written last, tells a complete build from a partial one.
    """
    if not is_tiny_preset(preset):
        raise QwenftError(
            f"Unknown tiny model {preset!r}.", f"Valid tiny models: {', '.join(TINY_PRESETS)}."
        )
    say = progress or (lambda _msg: None)
    home = Path(home) if home is not None else qwenft_home()
    models = home / "models"
    target = models / preset
    if _is_complete(target, preset):
        return target
    vocab_file = ensure_vocab(home)
    models.mkdir(parents=True, exist_ok=True)
    with file_lock(models / f".{preset}.lock"):
        if _is_complete(target, preset):
            return target
        say(f"Building {preset} ({TINY_PRESETS[preset]['architecture']}) in {target} ...")
        start = time.monotonic()
        with staged_dir(target, replace=True) as tmp:  # replaces an incomplete or outdated build
            _build_into(tmp, preset, vocab_file)
            atomic_write_json(tmp / MARKER_NAME, _marker(preset))
        say(f"Built {preset} in {time.monotonic() - start:.1f} s.")
    return target
