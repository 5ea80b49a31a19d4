"""The piece encoder (qwenft.data.piece_bpe) gives the Rust tokenizer's ids for every text it
takes: both regex engines split every character it takes alike, and random texts over a wide
alphabet (contractions, every kind of space, digits, CJK, added tokens and broken ones) encode to
the same ids, remembered or not. The whole pipeline's arrays against LLaMA-Factory's, with the
piece encoder in its worker processes, are tests/test_tokenize.py's two-worker cases."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from qwenft.data import parallel, piece_bpe

# Each character is put in these places: alone, after and before a letter, a digit, spaces, a
# newline, an apostrophe (the contractions), punctuation; doubled. A character the two engines
# class differently (letter, digit, space, newline, a contraction's letter) splits differently in
# one of them.
CONTEXTS = [
    "{c}", "a{c}", "{c}a", "1{c}", "{c}1", " {c}", "{c} ", "  {c}", "\n{c}", "{c}\n", "'{c}",
    "x'{c}", "{c}{c} x", "!{c}", "{c}!", "{c}'s", " {c}{c}", "{c}\n\n",
]  # fmt: skip


def test_both_regex_engines_split_alike_every_character_the_encoder_takes() -> None:
    """Every code point the piece encoder may meet (ASCII, and the BMP characters assigned in
    Unicode 3.2 and in this Python's data), in every context: the `regex` module's split equals
    the Rust tokenizer's Split pre-tokenizer's."""
    import regex
    from tokenizers import Regex
    from tokenizers.pre_tokenizers import Split

    rust = Split(Regex(piece_bpe.QWEN_SPLIT), behavior="isolated", invert=False)
    findall = regex.compile(piece_bpe.QWEN_SPLIT).findall
    unknown = piece_bpe.unknown_to_either().search
    taken = [chr(c) for c in range(0x10000) if c < 0x80 or unknown(chr(c)) is None]
    assert len(taken) > 40_000  # CJK included
    differ = []
    for c in taken:
        for context in CONTEXTS:
            text = context.format(c=c)
            if [p for p, _ in rust.pre_tokenize_str(text)] != findall(text):
                differ.append((text, hex(ord(c))))
    assert differ == []


def test_the_encoder_refuses_what_it_cannot_prove() -> None:
    assert piece_bpe.unknown_to_either().search("plain ascii, 北京 数据 café Ελληνικά 모델") is None
    for text in ("emoji 😀", "\u0378 unassigned", "rupee \u20b9 (Unicode 6.0)", "tag \U000e0001"):
        assert piece_bpe.unknown_to_either().search(text) is not None, text


def test_one_thread_is_where_the_rust_tokenizer_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    assert not parallel.one_thread()
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    assert not parallel.one_thread()
    for off in ("false", "0", "OFF", ""):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", off)
        assert parallel.one_thread(), off
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # a tokenizing worker (parallel._start)
    assert parallel.one_thread()
    monkeypatch.delenv("RAYON_NUM_THREADS")
    monkeypatch.setattr(parallel, "cores", lambda: 1)
    assert parallel.one_thread()


# --------------------------------------------------------------------------------------------------
# the ids (model tier: the real Qwen vocabulary)

ATOMS = [
    "the", " The", " model", "DATA", " x", "'s", "'S", "'ll", "'LL", "'re", "'ve", "'m", "'d",
    "'t", "’s", " don't", "0", "12", "345", " 6789", "3.14", "-", " --", "...", "!?", "(", ")",
    "{", "}", "[]", "\"", "`", "#", "@", "_", "__init__", "\\", "/", ":", ";", ",", ".", " ",
    "  ", "   ", "\t", " \t ", "\n", "\n\n", "\r\n", " \n ", "\x0b", "\x0c", "\x1c", "\x85", "\xa0",
    "\u3000", "\u2003", "北京", "数据", "模型训练", "，", "。", "「", "」", "１２", "ＡＢ", "café",
    "straße", "ſ", "Ελληνικά", "русский", "모델", "カタカナ", "ひらがな", "½", "²", "Ⅷ", "€",
    "<", ">", "<|", "|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>",
    "<tool_call>", "<|im_", "im_start", "<<|im_end|>>",
]  # fmt: skip


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ATOMS, k=rng.randint(1, 40))) for _ in range(n)]


def _tokenizer(name: str) -> Any:
    from qwenft.data.tokens import load_tokenizer
    from qwenft.models.tiny import ensure_tiny_model

    tokenizer, _ = load_tokenizer(ensure_tiny_model(name, progress=None))
    return tokenizer


@pytest.mark.parametrize("remembered", [True, False], ids=["remembered", "every-piece-anew"])
def test_random_texts_encode_to_the_rust_tokenizers_ids(
    tiny_home: Path, monkeypatch: pytest.MonkeyPatch, remembered: bool
) -> None:
    """3,000 random texts: the piece encoder's ids equal the Rust tokenizer's (normalizer
    included), for the texts it takes; with the memo, and with none (every piece through the
    BPE); and it takes almost all of them (not the ones with NFC-changing or unknown text)."""
    from qwenft.data.tokens import NfcStable

    if not remembered:
        monkeypatch.setattr(piece_bpe, "MAX_PIECES", 0)
    tokenizer = _tokenizer("tiny-qwen2")
    encoder = piece_bpe.PieceEncoder.of(tokenizer)
    assert encoder is not None
    stable = NfcStable()
    texts = _random_texts(3000)
    taken = [t for t in texts if stable(t) and encoder.takes(t)]
    assert len(taken) > 2500
    expected = [e.ids for e in tokenizer.encode_batch(taken, add_special_tokens=False)]
    assert encoder.encode(taken) == expected
    assert bool(encoder._pieces) is remembered


def test_qwen_tokenizers_qualify_and_others_do_not(tiny_home: Path) -> None:
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel

    for name in ("tiny-qwen2", "tiny-qwen3"):
        assert piece_bpe.PieceEncoder.of(_tokenizer(name)) is not None, name
    gpt2_style = _tokenizer("tiny-qwen2")
    gpt2_style.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    assert piece_bpe.PieceEncoder.of(gpt2_style) is None
    stripping = _tokenizer("tiny-qwen2")
    stripping.add_tokens([AddedToken("<sep>", lstrip=True)])
    assert piece_bpe.PieceEncoder.of(stripping) is None
    kept_special = _tokenizer("tiny-qwen2")
    kept_special.encode_special_tokens = True
    assert piece_bpe.PieceEncoder.of(kept_special) is None


def test_the_encoder_uses_it_only_on_one_thread(
    tiny_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LlamaFactoryEncoder sends the texts to the piece encoder only where the Rust tokenizer
    would run on one thread, and the batch's ids are the same either way."""
    from qwenft.data.tokens import Encoded, LlamaFactoryEncoder
    from qwenft.models.tiny import ensure_tiny_model

    encoder = LlamaFactoryEncoder(ensure_tiny_model("tiny-qwen2", progress=None), "qwen", 64)
    texts = set(_random_texts(300, seed=1))
    monkeypatch.setattr(parallel, "one_thread", lambda: False)
    rust = encoder.parts(texts)
    assert rust[2] == []
    monkeypatch.setattr(parallel, "one_thread", lambda: True)
    pieces = encoder.parts(texts)
    assert len(pieces[2]) > 250 and pieces[0] == rust[0]

    def ids(parts: tuple) -> dict[str, list[int]]:
        encoded = Encoded(*encoder.encode_parts(parts))
        return {t: encoded.flat[s : s + n].tolist() for t, (s, n) in encoded.at.items()}

    assert ids(pieces) == ids(rust)
