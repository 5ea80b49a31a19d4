"""qwenft: fine-tune Qwen models with LLaMA-Factory."""

__version__ = "0.1.0"
