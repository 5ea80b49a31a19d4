"""llama-cpp-python, the optional `gguf` extra: the pinned version, whether it is installed, and
the install hint that `export`, `chat`/`serve --backend llama.cpp` and `doctor` all give."""

from __future__ import annotations

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
