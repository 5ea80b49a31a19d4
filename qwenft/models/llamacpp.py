"""llama-cpp-python, the optional `gguf` extra: the pinned version, whether it is installed, and
the install hint that `export`, `chat`/`serve --backend llama.cpp` and `doctor` all give."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from qwenft.errors import QwenftError

LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
INSTALL_HINT = (
    f"install the gguf extra: .venv/bin/pip install {LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION} "
    "(a source build: 6-12 minutes once on a 2-core CPU, then pip's cache reuses it); "
    "`make test` installs it"
)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(what: str) -> None:
    """QwenftError (exit 2) with the install command when llama-cpp-python is missing."""
    if not llama_cpp_available():
        raise QwenftError(f"{what} needs llama-cpp-python, which is not installed", INSTALL_HINT)


STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Qwen's end of turn, end of text


def gguf_stop_tokens(llm: object) -> dict[str, object]:
    """The stop tokens a GGUF carries, read back from the file as llama.cpp reads it (a
    llama_cpp.Llama, vocab_only is enough): its eos (id and text), each of Qwen's stop tokens'
    ids (as llama.cpp tokenizes them) and whether llama.cpp counts it as end of generation."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)  # type: ignore[attr-defined]
    eos = int(llama_cpp.llama_vocab_eos(vocab))

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", "replace")  # type: ignore[attr-defined]

    ids: dict[str, int | None] = {}
    for name in STOP_TOKENS:
        found = llm.tokenize(name.encode(), add_bos=False, special=True)  # type: ignore[attr-defined]
        ids[name] = int(found[0]) if len(found) == 1 else None
    return {
        "eos_id": eos,
        "eos": text(eos) if eos >= 0 else None,
        "ids": ids,
        "eog": {
            name: bool(i is not None and llama_cpp.llama_vocab_is_eog(vocab, i))
            for name, i in ids.items()
        },
    }


def stop_token_faults(stops: dict, expected: dict[str, int]) -> list[str]:
    """What is wrong with a GGUF's stop tokens (gguf_stop_tokens) against the tokenizer's ids
    (expected: token text -> id): eos must be <|im_end|>, and every stop token must be one token,
    with the tokenizer's id, that llama.cpp ends generation on."""
    faults = []
    if stops["eos"] != STOP_TOKENS[0] or stops["eos_id"] != expected.get(STOP_TOKENS[0]):
        faults.append(
            f"eos is {stops['eos']!r} (id {stops['eos_id']}), not {STOP_TOKENS[0]} "
            f"(id {expected.get(STOP_TOKENS[0])})"
        )
    for name in STOP_TOKENS:
        got = stops["ids"].get(name)
        if got != expected.get(name):
            faults.append(
                f"{name} is token {got} in the GGUF, {expected.get(name)} in the tokenizer"
            )
        elif not stops["eog"].get(name):
            faults.append(f"{name} is not an end-of-generation token in the GGUF")
    return faults


_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def plain_cpu_kernels() -> Iterator[None]:
    """Models opened inside load on llama.cpp's plain CPU kernels: without its extra buffer
    types (weights repacked for AMX / interleaved kernels), whose AMX path in llama.cpp 0.3.36
    crashes (SIGSEGV in llama_decode, batches of more than one token) on small q8_0 tensors such as
    the tiny test models'. The plain kernels compute the same model; only the repacking is left
    out. (`serve --backend llama.cpp` runs its whole server inside it.)"""
    import llama_cpp.llama_cpp as api

    with _OPEN_LOCK:
        default = api.llama_model_default_params

        def params() -> object:
            p = default()
            p.use_extra_bufts = False
            return p

        api.llama_model_default_params = params
        try:
            yield
        finally:
            api.llama_model_default_params = default


def open_gguf(path: object, **kwargs: object) -> object:
    """llama_cpp.Llama over a GGUF, on llama.cpp's plain CPU kernels (plain_cpu_kernels)."""
    import llama_cpp

    with plain_cpu_kernels():
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
