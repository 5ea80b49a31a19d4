"""`qwenft chat`: talk to a merged model, a full fine-tune, base + adapter, or any Qwen model.

Loads with transformers (and peft for an unmerged adapter), applies the model's chat template with
the system prompt and thinking mode the run was trained with, and decodes greedily by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwenft.errors import QwenftError
from qwenft.models.target import ModelTarget


@dataclass
class ChatSession:
    """A loaded model and the running conversation."""

    target: ModelTarget
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    system: str | None = None
    backend: str = "transformers"  # or "vllm" (through LLaMA-Factory's vLLM engine)
    history: list[dict[str, str]] = field(default_factory=list)
    _model: Any = None
    _tokenizer: Any = None

    def load(self) -> None:
        import importlib.util
        import os

        if self.backend not in ("transformers", "vllm"):
            raise QwenftError(f"unknown backend {self.backend!r}", "choose transformers or vllm")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise QwenftError(
                "--backend vllm needs the vllm package, which is not installed",
                "on a CUDA machine: pip install vllm; or use the default --backend transformers",
            )
        if self.target.model_kind in ("tiny", "local"):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.target.ensure_built()
        if self.system is None:
            self.system = self.target.system
        if self.backend == "vllm":
            from llamafactory.chat import ChatModel

            args = {
                "model_name_or_path": self.target.model_path,
                "template": self.target.template,
                "infer_backend": "vllm",
                "default_system": self.system or None,
                "do_sample": self.temperature > 0,
                "max_new_tokens": self.max_new_tokens,
            }
            if self.target.adapter_path:
                args.update(adapter_name_or_path=self.target.adapter_path, finetuning_type="lora")
            if self.target.enable_thinking is not None:
                args["enable_thinking"] = self.target.enable_thinking
            self._model = ChatModel(args)
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.target.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.target.model_path, dtype="auto")
        if self.target.adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.target.adapter_path)
        self._model = model.eval()

    def reset(self) -> None:
        self.history.clear()

    def ask(self, prompt: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer prompt given the conversation so far; stream pieces to on_text if given."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        if self._model is None:
            self.load()
        if self.backend == "vllm":
            return self._ask_llamafactory(prompt, on_text)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [*self.history, {"role": "user", "content": prompt}]
        kwargs: dict[str, Any] = {}
        if self.target.enable_thinking is not None:
            kwargs["enable_thinking"] = self.target.enable_thinking
        inputs = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, **kwargs
        )
        stop_ids = [
            t
            for t in (
                self._tokenizer.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<|endoftext|>")
            )
            if t is not None
        ]
        gen: dict[str, Any] = {
            **inputs,
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": stop_ids,
            "pad_token_id": self._tokenizer.pad_token_id,
        }
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.no_grad():
                    self._model.generate(**gen, streamer=streamer)
            except BaseException as exc:  # surfaced in the caller's thread
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if on_text:
                on_text(piece)
        worker.join()
        if errors:
            raise errors[0]
        answer = "".join(pieces).strip()
        self.history += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        return answer

    def _ask_llamafactory(self, prompt: str, on_text: Callable[[str], None] | None) -> str:
        """The same turn through LLaMA-Factory's ChatModel (used for its vLLM engine)."""
        messages = [*self.history, {"role": "user", "content": prompt}]
        pieces = []
        for piece in self._model.stream_chat(messages, system=self.system or None):
            pieces.append(piece)
            if on_text:
                on_text(piece)
        answer = "".join(pieces).strip()
        self.history += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        return answer
