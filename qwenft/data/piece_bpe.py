"""Qwen's byte-level BPE for a tokenizer on one thread: its split and byte mapping done in Python,
each piece's ids remembered.

The Rust tokenizer spends most of its time on machinery around the BPE, not in it: it splits a
text with the pre-tokenizer's regex, maps every byte to its byte-level character, both with
alignment bookkeeping per character, and builds an Encoding (tokens as strings, offsets, masks)
that is then turned back into Python ints. A piece recurs: chat text is mostly the same few
thousand words. Splitting with the same regex (the `regex` module) and looking each piece's ids up
in a dict, the Rust BPE asked only for a piece not seen before, costs less than half the CPU time
(scripts/bench_data.py; docs/data.md "Where the CPU goes").

Batch calls of the Rust tokenizer run on every core, this on one: the encoder uses it only where
the Rust tokenizer would have one thread too (a tokenizing worker process, or a process allowed
one core; LlamaFactoryEncoder.parts).

The ids are the Rust tokenizer's, by construction, for the texts `takes` accepts:
- the tokenizer is a Qwen one: the pre-tokenizer is QWEN_SPLIT's regex (Isolated) followed by a
  ByteLevel without prefix space or regex, and the model a BPE without dropout (`of`);
- the added tokens are matched on the raw text and split out first, as the Rust tokenizer does
  (leftmost-longest; none strips spaces or needs a whole word, as in every Qwen tokenizer), and
  the text between them encoded piece by piece;
- NFC leaves it as it is (the encoder's NfcStable; the normalizer is then a no-op);
- every character is one both regex engines class alike: ASCII, or a BMP character assigned in
  Unicode 3.2 and in this Python's data. Run over every code point in 18 contexts, the Rust regex
  (Oniguruma) and `regex` split differently only around characters one of them does not know yet
  (docs/data.md); tests/test_piece_bpe.py runs both over every character taken;
- each piece then goes through the BPE model alone, as the Rust tokenizer hands it each piece.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from typing import Any

# Qwen1.5/2/2.5/3's pre-tokenizer regex (tokenizer.json: pre_tokenizer.pretokenizers[0])
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {"Regex": QWEN_SPLIT},
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
# What is remembered: pieces of at most MAX_PIECE_CHARS characters (words; a run of CJK text is
# one piece, seldom seen twice), MAX_PIECES of them (38 MiB when full, on natural text). Past that,
# a piece goes to the Rust BPE every time; those met first, which fill it, are mostly frequent.
MAX_PIECE_CHARS = 16
MAX_PIECES = 100_000


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet (the ByteLevel pre-tokenizer's): byte b -> its character."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(0x100, 0x200))
    return {b: chr(b) if b in kept else chr(next(shifted)) for b in range(0x100)}


@functools.cache
def unassigned(*databases: Any) -> re.Pattern:
    """Matches a character that one of these Unicode databases (`unicodedata`, its `ucd_3_2_0`)
    does not know (an unassigned BMP code point, a surrogate), or any character beyond the BMP."""
    ranges: list[list[int]] = []
    for cp in range(0x80, 0x10000):  # ASCII is assigned in every version
        c = chr(cp)
        if any(db.category(c) in ("Cn", "Cs") for db in databases):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    ranges.append([0x10000, sys.maxunicode])
    return re.compile(
        "[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]"
    )


def unknown_to_either() -> re.Pattern:
    """Matches a character that is not ASCII nor a BMP character assigned both in Unicode 3.2 and
    in this Python's data: what both regex engines may class differently."""
    return unassigned(unicodedata.ucd_3_2_0, unicodedata)


class PieceEncoder:
    """Encodes the texts `takes` accepts as the Rust tokenizer does (see the module's docstring)."""

    def __init__(self, tokenizer: Any, split: Any) -> None:
        self._model = tokenizer.model
        self._findall = split.findall
        self._table = str.maketrans(_byte_chars())
        added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._added = added
        # the longest first: at each place the longest token that starts there, as the Rust
        # tokenizer's leftmost-longest matching finds it
        longest_first = sorted(added, key=len, reverse=True)
        self._split_added = re.compile(f"({'|'.join(map(re.escape, longest_first))})").split
        self._unknown = unknown_to_either().search
        self._pieces: dict[str, list[int]] = {}

    @classmethod
    def of(cls, tokenizer: Any) -> PieceEncoder | None:
        """One for a Qwen tokenizer (the pre-tokenizer and model above, added tokens matched on
        the raw text as they are) where `regex` is installed (it comes with transformers); else
        None."""
        try:
            import regex
        except ImportError:  # pragma: no cover - transformers depends on it
            return None
        pre = tokenizer.pre_tokenizer
        model = tokenizer.model
        if pre is None or type(model).__name__ != "BPE" or model.dropout:
            return None
        if json.loads(pre.__getstate__()) != _PRE_TOKENIZER or tokenizer.encode_special_tokens:
            return None
        added = tokenizer.get_added_tokens_decoder().values()
        if not added or any(  # (none at all: no split pattern; every Qwen tokenizer has them)
            t.normalized or t.lstrip or t.rstrip or t.single_word or not t.content for t in added
        ):
            return None
        return cls(tokenizer, regex.compile(QWEN_SPLIT))

    def takes(self, text: str) -> bool:
        """Whether the text qualifies (given that NFC leaves it as it is)."""
        return text.isascii() or self._unknown(text) is None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids: its added tokens split out, the text between them pre-tokenized."""
        findall = self._findall
        known = self._pieces.get
        added = self._added
        out = []
        for text in texts:
            ids: list[int] = []
            token = False  # split() alternates: text, added token, text, ...
            for segment in self._split_added(text):
                if token:
                    ids.append(added[segment])
                elif segment:
                    for piece in findall(segment):
                        piece_ids = known(piece)
                        if piece_ids is None:
                            piece_ids = self._bpe(piece)
                        ids += piece_ids
                token = not token
            out.append(ids)
        return out

    def _bpe(self, piece: str) -> list[int]:
        mapped = piece.encode("utf-8").decode("latin-1").translate(self._table)
        ids = [token.id for token in self._model.tokenize(mapped)]
        if len(piece) <= MAX_PIECE_CHARS and len(self._pieces) < MAX_PIECES:
            self._pieces[piece] = ids
        return ids
