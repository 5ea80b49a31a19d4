"""Tiny Qwen models: real Qwen tokenizer ids and chat templates, deterministic offline builds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from qwenft.errors import QwenftError
from qwenft.models.tiny import (
    ADDED_TOKENS,
    QWEN_PATTERN,
    QWEN_TIKTOKEN_SHA256,
    SPECIAL_TOKENS,
    TINY_PRESETS,
    VOCAB_ENV,
    ensure_tiny_model,
    ensure_vocab,
    is_tiny_preset,
)

# Checked without importing it: collecting this module must not pull transformers into the fast
# tier (tests/conftest.py); the tests that load it use the vocab_file fixture (tier `model`).
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed", allow_module_level=True)
tiktoken = pytest.importorskip("tiktoken")


# vocab_file (tests/conftest.py): the real vocabulary, fetched once into the default QWENFT_HOME;
# the builds below reuse it via QWENFT_QWEN_TIKTOKEN.
@pytest.fixture(scope="session")
def tiny_env(vocab_file: Path, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VOCAB_ENV, str(vocab_file))
        yield tmp_path_factory


@pytest.fixture(scope="session")
def home_a(tiny_env) -> Path:
    return tiny_env.mktemp("home-a")


@pytest.fixture(scope="session")
def qwen2_dir(home_a: Path) -> Path:
    return ensure_tiny_model("tiny-qwen2", home=home_a, progress=None)


@pytest.fixture(scope="session")
def qwen3_dir(home_a: Path) -> Path:
    return ensure_tiny_model("tiny-qwen3", home=home_a, progress=None)


@pytest.fixture(scope="session")
def tok2(qwen2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen2_dir)


@pytest.fixture(scope="session")
def tok3(qwen3_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir)


@pytest.fixture(scope="session")
def tt(vocab_file: Path):
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(vocab_file))
    return tiktoken.Encoding(
        name="qwen",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={tok: len(ranks) + i for i, tok in enumerate(ADDED_TOKENS)},
    )


TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1,234,567.89 items!",
    "通义千问是阿里云研发的大语言模型。我们今天去北京,天气很好!",
    "日本語のテキストと한국어 텍스트도 섞여 있습니다.",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n\tif n < 2:\n        return n\r\n'
    "    return fib(n-1)+fib(n-2)  # 😀\n\n\n",
    "Emoji 🎉🚀👩‍💻 mixed with 中文, Ελληνικά, русский, العربية and   spaces\t\ttabs  ",
    "{\"key\": [1, 2, 3], 'x': null}\n<html><body>&nbsp;</body></html>",
    "   leading spaces, trailing newlines\n\n",
    "I'M HERE, YOU'RE THERE, THEY'VE GONE, SHE'D SAY, WE'LL SEE",
]


def test_presets_and_names():
    # tiny-qwen2-vl's tests are in test_vision_models.py, tiny-qwen3-moe's in test_moe.py
    assert set(TINY_PRESETS) == {"tiny-qwen2", "tiny-qwen3", "tiny-qwen2-vl", "tiny-qwen3-moe"}
    assert is_tiny_preset("tiny-qwen2") and is_tiny_preset("tiny-qwen3")
    assert not is_tiny_preset("Qwen/Qwen2.5-0.5B-Instruct")


def test_import_stays_light():
    code = (
        "import sys, qwenft.models.tiny; assert 'torch' not in sys.modules, 'torch'; "
        "assert 'transformers' not in sys.modules, 'transformers'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vocab_sha(vocab_file: Path):
    import hashlib

    assert hashlib.sha256(vocab_file.read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256


def test_hello_world(tok2):
    assert type(tok2).__name__ == "Qwen2Tokenizer"
    assert tok2("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken(tok2, tt, text):
    ids = tok2(text, add_special_tokens=True)["input_ids"]
    assert ids == tt.encode(text, disallowed_special=())
    assert tok2.decode(ids) == text


def test_nfc_normalization(tok2, tt):
    decomposed = unicodedata.normalize("NFD", "café naïve Ångström")
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    assert tok2(decomposed)["input_ids"] == tt.encode(unicodedata.normalize("NFC", decomposed))


def test_added_tokens(tok2, tok3, tt):
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<tool_call>": 151657,
        "<think>": 151667,
        "</think>": 151668,
    }
    for tok in (tok2, tok3):
        for text, tid in expected.items():
            assert tok(text)["input_ids"] == [tid]
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
        assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
        assert tok.bos_token is None
        assert len(tok) == 151669
        specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        assert specials == set(SPECIAL_TOKENS)
    text = "<|im_start|>user\n你好<think>\nhmm\n</think><|im_end|>\n<|endoftext|>"
    ids = tok2(text)["input_ids"]
    assert ids == tt.encode(text, allowed_special="all")
    assert tok2.decode(ids) == text
    assert tok2.decode(ids, skip_special_tokens=True) == "user\n你好<think>\nhmm\n</think>\n"


def test_qwen2_chat_template(tok2):
    conv = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Arr, hello."},
    ]
    assert tok2.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nArr, hello.<|im_end|>\n"
    )
    no_system = [{"role": "user", "content": "你好"}]
    assert tok2.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok2.apply_chat_template(no_system, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


def test_qwen3_chat_template(tok3):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    # Real Qwen3 behaviour: the final assistant turn after the last query gets a think block.
    assert tok3.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"
    )
    user = [{"role": "user", "content": "Hi"}]
    assert tok3.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        tok3.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Historical assistant turns lose their reasoning.
    history = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nlong thought\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    assert tok3.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    rendered = tok3.apply_chat_template(user, tools=tools, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n# Tools\n") and '"name": "now"' in rendered


def test_configs(qwen2_dir: Path, qwen3_dir: Path):
    for folder, model_type, arch in (
        (qwen2_dir, "qwen2", "Qwen2ForCausalLM"),
        (qwen3_dir, "qwen3", "Qwen3ForCausalLM"),
    ):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == model_type and cfg["architectures"] == [arch]
        assert cfg["vocab_size"] == 151936 and cfg["hidden_size"] == 64
        assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
        assert cfg["tie_word_embeddings"] is True and cfg["eos_token_id"] == 151645
        assert cfg["max_position_embeddings"] >= 4096
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
        assert (folder / "chat_template.jinja").is_file()
        assert (folder / "model.safetensors").stat().st_size < 45_000_000
    assert json.loads((qwen3_dir / "config.json").read_text())["head_dim"] == 16
    assert (qwen2_dir / "tokenizer.json").read_bytes() == (
        qwen3_dir / "tokenizer.json"
    ).read_bytes()
    # the merges as Qwen writes them (the form Python parses three times faster), all of them
    merges = json.loads((qwen2_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges[0] == "Ġ Ġ" and len(merges) == 294_166
    assert (qwen2_dir / "tokenizer.json").stat().st_size < 8_000_000


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3"])
def test_model_loads_and_runs(preset, qwen2_dir, qwen3_dir, tok2):
    import torch
    from transformers import AutoModelForCausalLM

    folder = {"tiny-qwen2": qwen2_dir, "tiny-qwen3": qwen3_dir}[preset]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == TINY_PRESETS[preset]["architecture"]
    assert model.dtype == torch.float32
    assert 9_000_000 < model.num_parameters() < 11_000_000
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied
    assert abs(emb.std().item() - 0.5) < 0.01  # scaled so LoRA can learn
    ids = torch.tensor([tok2("Hello, world! 你好")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_and_cached(qwen2_dir: Path, tiny_env):
    home_b = tiny_env.mktemp("home-b")
    messages: list[str] = []
    other = ensure_tiny_model("tiny-qwen2", home=home_b, progress=messages.append)
    assert other == home_b / "models" / "tiny-qwen2" and messages
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (other / name).read_bytes() == (qwen2_dir / name).read_bytes(), name
    # Second call: the marker says complete, nothing is rebuilt.
    messages.clear()
    mtime = (other / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("tiny-qwen2", home=home_b, progress=messages.append) == other
    assert messages == [] and (other / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (home_b / "models").iterdir() if p.name.startswith(".tiny-qwen2.build")]


def test_incomplete_build_is_replaced(tiny_env, vocab_file):
    home = tiny_env.mktemp("home-partial")
    partial = home / "models" / "tiny-qwen3"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # no marker: an interrupted build
    out = ensure_tiny_model("tiny-qwen3", home=home, progress=None)
    assert out == partial and (out / ".qwenft-tiny.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def test_unknown_preset(tmp_path: Path):
    with pytest.raises(QwenftError) as err:
        ensure_tiny_model("tiny-llama", home=tmp_path)
    assert "tiny-qwen2" in (err.value.hint or "") and "tiny-qwen3" in (err.value.hint or "")
    assert not (tmp_path / "models").exists()


def test_wrong_vocab_sha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab_file: Path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(vocab_file.read_bytes()[:-10] + b"corrupted\n")
    monkeypatch.setenv(VOCAB_ENV, str(bad))
    with pytest.raises(QwenftError, match="sha256"):
        ensure_vocab(tmp_path / "home")
    assert not (tmp_path / "home" / "vocab" / "qwen.tiktoken").exists()
    monkeypatch.setenv(VOCAB_ENV, str(tmp_path / "missing.tiktoken"))
    with pytest.raises(QwenftError) as err:
        ensure_vocab(tmp_path / "home")
    assert VOCAB_ENV in err.value.hint


def test_vocab_from_env_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab_file):
    monkeypatch.setenv(VOCAB_ENV, str(vocab_file))
    dest = ensure_vocab(tmp_path)
    assert dest == tmp_path / "vocab" / "qwen.tiktoken"
    assert dest.read_bytes() == vocab_file.read_bytes()
    monkeypatch.setenv(VOCAB_ENV, str(tmp_path / "gone"))  # not consulted once cached
    assert ensure_vocab(tmp_path) == dest


def test_vocab_fetch_failure_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(VOCAB_ENV, raising=False)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip "fails" without touching the network
    with pytest.raises(QwenftError) as err:
        ensure_vocab(tmp_path)
    assert "dashscope" in err.value.message
    assert VOCAB_ENV in err.value.hint and "pip" in err.value.hint
