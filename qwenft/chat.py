"""`qwenft chat`: talk to a merged model, a full fine-tune, base + adapter, or any Qwen model.

Loads with transformers (and peft for an unmerged adapter), applies the model's chat template with
the system prompt and thinking mode the run was trained with, and decodes greedily by default.

A reply's reasoning (a Qwen3 ``<think>`` block) is kept apart from its answer (Reply.reasoning),
and not carried into the history (as Qwen3's chat template drops past thoughts). With tools (an
OpenAI tools list, ``--tools``) the conversation goes through LLaMA-Factory's own chat engine, so
the prompt is built by the run's template and tool format exactly as in training and serving, and
the model's calls are parsed by that template's tool extractor (Reply.calls); the caller answers
them with tool_results().
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenft.choices import Template
from qwenft.data.images import IMAGE_PLACEHOLDER
from qwenft.errors import QwenftError
from qwenft.models import inference
from qwenft.models.target import ModelTarget, thinking_mode

_OPEN, _CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply: a leading <think> ... </think> block is the reasoning (a block
    never closed, e.g. cut by max_new_tokens, is all reasoning)."""
    stripped = text.lstrip()
    if not stripped.startswith(_OPEN):
        return "", text.strip()
    body = stripped[len(_OPEN) :]
    if _CLOSE not in body:
        return body.strip(), ""
    reasoning, answer = body.split(_CLOSE, 1)
    return reasoning.strip(), answer.strip()


class _ThoughtRouter:
    """Routes streamed pieces: the text of a leading <think> block to on_reasoning, the rest to
    on_text (either may be None)."""

    def __init__(
        self,
        on_text: Callable[[str], None] | None,
        on_reasoning: Callable[[str], None] | None,
    ) -> None:
        self.on_text, self.on_reasoning = on_text, on_reasoning
        self.buffer = ""
        self.state = "start"  # start -> thinking -> answer, or start -> answer
        self.after_thought = False  # the newlines after </think> are not part of the answer

    def _emit(self, sink: Callable[[str], None] | None, text: str) -> None:
        if sink and text:
            sink(text)

    def feed(self, piece: str) -> None:
        self.buffer += piece
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(_OPEN):
                self.state, self.buffer = "thinking", head[len(_OPEN) :]
            elif _OPEN.startswith(head):
                return  # not decided yet
            else:
                self.state = "answer"
        if self.state == "thinking":
            if _CLOSE in self.buffer:
                thought, rest = self.buffer.split(_CLOSE, 1)
                self._emit(self.on_reasoning, thought)
                self.state, self.buffer, self.after_thought = "answer", rest, True
            else:  # keep a tail that may be the start of </think>
                keep = len(_CLOSE) - 1
                out, self.buffer = self.buffer[:-keep], self.buffer[-keep:]
                self._emit(self.on_reasoning, out)
                return
        if self.state == "answer":
            if self.after_thought:
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    return
                self.after_thought = False
            self._emit(self.on_text, self.buffer)
            self.buffer = ""

    def close(self) -> None:
        sink = self.on_reasoning if self.state == "thinking" else self.on_text
        self._emit(sink, self.buffer)
        self.buffer = ""


@dataclass
class Reply:
    """One model turn: its answer text, its reasoning (Qwen3 <think>, may be empty), and the tool
    calls it makes as (name, arguments JSON text), empty when it answers."""

    answer: str
    reasoning: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)


def load_tools(text: str, source: str = "--tools") -> list[dict[str, Any]]:
    """An OpenAI tools list (or a list of bare function definitions), checked."""
    try:
        tools = json.loads(text)
    except ValueError as exc:
        raise QwenftError(f"{source} is not valid JSON: {exc}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not tools:
        raise QwenftError(
            f"{source} must hold a JSON list of tools",
            'e.g. [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]',
        )
    for k, tool in enumerate(tools):
        fn = (
            tool.get("function")
            if isinstance(tool, dict) and tool.get("type") == "function"
            else tool
        )
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise QwenftError(f"{source}: tool {k + 1} has no function name")
    return tools


@dataclass
class ChatSession:
    """A loaded model and the running conversation."""

    target: ModelTarget
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    system: str | None = None
    backend: str = "transformers"  # "vllm" (LLaMA-Factory's vLLM engine), "llama.cpp" (the GGUF)
    history: list[dict[str, str]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # an OpenAI tools list: calls are parsed (--tools)
    enable_thinking: bool | None = None  # None: the run's own mode (target.enable_thinking)
    images: list[str] = field(default_factory=list)  # the conversation's, in order (<image>s)
    _model: Any = None
    _tokenizer: Any = None

    @property
    def thinking(self) -> bool | None:
        return self.target.enable_thinking if self.enable_thinking is None else self.enable_thinking

    @property
    def vision(self) -> bool:
        """A vision-language model: it takes images (send's `images`)."""
        return Template(self.target.template).vision

    @property
    def via_llamafactory(self) -> bool:
        """Through LLaMA-Factory's chat engine: vLLM, tools (the run's tool format), or a
        vision-language model (its mm_plugin turns images into vision tokens as in training)."""
        return self.backend == "vllm" or bool(self.tools) or self.vision

    def load(self) -> None:
        import importlib.util

        if self.backend not in BACKENDS:
            raise QwenftError(
                f"unknown backend {self.backend!r}", f"choose one of {', '.join(BACKENDS)}"
            )
        if self.backend == "llama.cpp" and self.tools:
            raise QwenftError(
                "--tools goes through LLaMA-Factory's engine, not --backend llama.cpp",
                "drop --backend llama.cpp to chat with tools",
            )
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise QwenftError(
                "--backend vllm needs the vllm package, which is not installed",
                "on a CUDA machine: pip install vllm; or use the default --backend transformers",
            )
        inference.prepare(self.target)
        if self.system is None:
            self.system = self.target.system
        if self.via_llamafactory:
            inference.quiet_unless_set()  # no loading bars or library warnings between the turns
            from llamafactory.chat import ChatModel

            args = {
                "model_name_or_path": self.target.model_path,
                "template": self.target.template,
                "infer_backend": "vllm" if self.backend == "vllm" else "huggingface",
                "default_system": self.system or None,
                "do_sample": self.temperature > 0,
                "max_new_tokens": self.max_new_tokens,
            }
            if self.temperature > 0:
                args.update(temperature=self.temperature, top_p=self.top_p)
            if self.target.adapter_path:
                args.update(adapter_name_or_path=self.target.adapter_path, finetuning_type="lora")
            if self.thinking is not None:
                args["enable_thinking"] = self.thinking
            self._model = ChatModel(args)
            return
        if self.backend == "llama.cpp":  # the GGUF alone: its tokenizer and chat template
            self._model = _load_gguf(self.target)
            return
        self._tokenizer = inference.load_tokenizer(self.target)
        self._model = inference.load_model(self.target)

    def reset(self) -> None:
        self.history.clear()
        self.images.clear()

    def ask(
        self,
        prompt: str,
        on_text: Callable[[str], None] | None = None,
        on_reasoning: Callable[[str], None] | None = None,
    ) -> str:
        """Answer prompt given the conversation so far; stream pieces to on_text (the reasoning's
        to on_reasoning) if given. The answer (with tools: see send)."""
        return self.send(prompt, on_text, on_reasoning).answer

    def send(
        self,
        prompt: str,
        on_text: Callable[[str], None] | None = None,
        on_reasoning: Callable[[str], None] | None = None,
        images: list[str] | None = None,
    ) -> Reply:
        """The model's turn after the user's prompt (with `images`, local files, shown before
        it): an answer, or tool calls (with tools) that tool_results() answers."""
        images = self.checked_images(images or [])
        if self._model is None:
            self.load()
        content = IMAGE_PLACEHOLDER * len(images) + prompt
        self.history.append({"role": "user", "content": content})
        self.images += images
        try:
            return self._turn(on_text, on_reasoning)
        except BaseException:
            del self.images[len(self.images) - len(images) :]
            raise

    def checked_images(self, images: list[str] | list[Path]) -> list[str]:
        """The images as a message shows them (absolute paths), each a local file that decodes;
        QwenftError for a bad one, or any on a text model."""
        if images and not self.vision:
            raise QwenftError(
                f"{self.target.source} is a text model (template {self.target.template}): it "
                "cannot see images",
                "chat with a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)",
            )
        return [check_image(path) for path in images]

    def tool_results(
        self,
        results: list[str],
        on_text: Callable[[str], None] | None = None,
        on_reasoning: Callable[[str], None] | None = None,
    ) -> Reply:
        """Give the results of the last reply's calls (in their order) and let the model go on."""
        if not self.history or self.history[-1]["role"] != "function":
            raise QwenftError("no tool call is waiting for a result")
        # parallel results in one turn, as LLaMA-Factory trains them
        content = "\n</tool_response>\n<tool_response>\n".join(results)
        self.history.append({"role": "observation", "content": content})
        return self._turn(on_text, on_reasoning)

    def _turn(
        self, on_text: Callable[[str], None] | None, on_reasoning: Callable[[str], None] | None
    ) -> Reply:
        # with tools the answer is shown once it is known not to be a call
        router = _ThoughtRouter(None if self.tools else on_text, on_reasoning)
        pieces: list[str] = []

        def collect(piece: str) -> None:
            pieces.append(piece)
            router.feed(piece)

        try:
            if self.via_llamafactory:
                self._generate_llamafactory(collect)
            elif self.backend == "llama.cpp":
                self._generate_llamacpp(collect)
            else:
                self._generate_transformers(collect)
        except BaseException:
            self.history.pop()  # the turn that got no answer
            raise
        router.close()
        reasoning, answer = split_reasoning("".join(pieces))
        calls: list[tuple[str, str]] = []
        if self.tools:
            found = self._model.engine.template.extract_tool(answer)
            if isinstance(found, list) and found:
                calls = [(c.name, c.arguments) for c in found]
        if calls:
            content = json.dumps(
                [{"name": n, "arguments": json.loads(a)} for n, a in calls], ensure_ascii=False
            )
            self.history.append({"role": "function", "content": content})
            return Reply("", reasoning, calls)
        if self.tools and on_text and answer:
            on_text(answer)
        self.history.append({"role": "assistant", "content": answer})
        return Reply(answer, reasoning)

    def _prompt(self, **kwargs: Any) -> Any:
        """The conversation through the model's chat template, in the run's thinking mode."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += self.history
        if self.thinking is not None:
            kwargs["enable_thinking"] = self.thinking
        return self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, **kwargs
        )

    def _stop_ids(self) -> list[int]:
        return [
            t
            for t in (
                self._tokenizer.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<|endoftext|>")
            )
            if t is not None
        ]

    def _conversation(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] * bool(self.system) + self.history

    def _generate_llamacpp(self, collect: Callable[[str], None]) -> None:
        """The turn from the run's GGUF export (llama-cpp-python) alone: prompted with the chat
        template the GGUF carries (tokenizer.chat_template, the run's own) in the run's system
        prompt and thinking mode, tokenized by llama.cpp, stopped on the GGUF's stop tokens."""
        import codecs

        from qwenft.models.llamacpp import gguf_stop_tokens

        ids = _gguf_prompt_ids(self._model, self._conversation(), self.thinking)
        stop = {i for i in gguf_stop_tokens(self._model)["ids"].values() if i is not None}
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        greedy = self.temperature <= 0
        self._model.reset()
        for n, token in enumerate(
            self._model.generate(
                ids,
                temp=0.0 if greedy else self.temperature,
                top_k=1 if greedy else 0,
                top_p=1.0 if greedy else self.top_p,
                repeat_penalty=1.0,
            )
        ):
            if token in stop or n >= self.max_new_tokens:
                break
            collect(decoder.decode(self._model.detokenize([token])))
        collect(decoder.decode(b"", final=True))

    def _generate_transformers(self, collect: Callable[[str], None]) -> None:
        import threading

        import torch
        from transformers import TextIteratorStreamer

        inputs = self._prompt(return_tensors="pt")
        stop_ids = self._stop_ids()
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
        for piece in streamer:
            collect(piece)
        worker.join()
        if errors:
            raise errors[0]

    def _generate_llamafactory(self, collect: Callable[[str], None]) -> None:
        """The same turn through LLaMA-Factory's ChatModel (its vLLM engine, or tools)."""
        tools = None
        if self.tools:
            tools = json.dumps(
                [t.get("function", t) if t.get("type") == "function" else t for t in self.tools],
                ensure_ascii=False,
            )
        import threading

        before = set(threading.enumerate())
        for piece in self._model.stream_chat(
            list(self.history),
            system=self.system or None,
            tools=tools,
            images=list(self.images) or None,
        ):
            collect(piece)
        # Its engine runs model.generate in a daemon thread ("Thread-N (generate)") that is
        # still returning, inside torch, when the stream ends: a process that exits then kills it
        # there and aborts ("terminate called without an active exception"). Wait for it, as
        # _generate_transformers does (not for the engine's idle executor threads).
        for thread in set(threading.enumerate()) - before:
            if thread.name.endswith("(generate)"):
                thread.join(timeout=60)


BACKENDS = ("transformers", "vllm", "llama.cpp")


def check_image(path: str | Path) -> str:
    """An image file a message may show: it exists and decodes (its absolute path), else
    QwenftError naming it (data.images.verify_image, the check `data check` makes)."""
    from qwenft.data.images import ImageProblem, verify_image

    file = Path(path).expanduser().absolute()
    try:
        verify_image(file)
    except ImageProblem as exc:
        raise QwenftError(exc.message, "give a local image file (PNG, JPEG, ...)") from None
    return str(file)


def gguf_target(spec: str, template: str | None = None, force: bool = False) -> ModelTarget:
    """`chat RUN --backend llama.cpp`: the run's GGUF export, with the run's system prompt and
    thinking mode from its manifest; nothing else of the run is needed (no merged model, no
    base model: a run folder copied with only its export/ and qwenft.json). The export is looked
    for first (as `serve` does): without one, installing llama-cpp-python would not help yet."""
    from pathlib import Path

    from qwenft.models.llamacpp import require_llama_cpp
    from qwenft.models.target import check_template
    from qwenft.runs.gguf import exported_gguf
    from qwenft.runs.manifest import MANIFEST, read_manifest

    run_dir = Path(spec).expanduser().absolute()
    m = read_manifest(run_dir) if (run_dir / MANIFEST).is_file() else None
    gguf = exported_gguf(run_dir if m else None, m)
    require_llama_cpp("--backend llama.cpp")
    assert m is not None
    return ModelTarget(
        str(gguf),
        None,
        system=m.default_system,
        enable_thinking=m.enable_thinking,
        model_kind="local",
        source=f"GGUF {gguf}",
        template=check_template(m.template, template, force),
        run_dir=run_dir,
        manifest=m,
    )


def _load_gguf(target: ModelTarget) -> Any:
    """llama-cpp-python's Llama over the GGUF (target.model_path, from gguf_target; for a target
    made otherwise, its run's export)."""
    from qwenft.models.llamacpp import open_gguf, require_llama_cpp
    from qwenft.runs.gguf import exported_gguf

    gguf = (
        target.model_path
        if target.model_path.endswith(".gguf")
        else exported_gguf(target.run_dir, target.manifest)
    )
    require_llama_cpp("--backend llama.cpp")
    return open_gguf(gguf, n_ctx=4096)


def _gguf_prompt_ids(llm: Any, messages: list[dict[str, str]], thinking: bool | None) -> list[int]:
    """The conversation through the GGUF's own chat template (tokenizer.chat_template, rendered as
    transformers renders it), tokenized by llama.cpp."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise QwenftError(
            "the GGUF carries no chat template (tokenizer.chat_template)",
            "export the run again with qwenft export (--force)",
        )

    def raise_exception(message: str) -> None:
        raise QwenftError(f"the GGUF's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    extra = {} if thinking is None else {"enable_thinking": thinking}
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True, **extra)
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


# --------------------------------------------------------------------------------------------------
# the command's conversation (qwenft.cli: `chat`)


def chat_thinking(
    own: bool | None, requested: str, force: bool = False, *, trained: bool = True
) -> bool | None:
    """The thinking mode to chat in, by the rule `serve` and `eval` use
    (qwenft.models.target.thinking_mode; trained: `own` is a run's trained mode, not a base
    model's); None (auto) keeps the target's."""
    mode = thinking_mode(own, requested, force, trained=trained)
    return None if str(requested).lower() == "auto" else mode


def _dim(text: str, stream: Any) -> str:
    return f"\033[2m{text}\033[0m" if getattr(stream, "isatty", lambda: False)() else text


class ReasoningPrinter:
    """Prints streamed reasoning on stderr as `thinking: ...` (dim on a terminal), apart from the
    answer on stdout."""

    def __init__(self, stream: Any = None) -> None:
        import sys

        self.stream = stream or sys.stderr
        self.started = False

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip("\n")
            if not piece:
                return
            self.stream.write(_dim("thinking: ", self.stream))
            self.started = True
        self.stream.write(_dim(piece.replace("\n", "\nthinking: "), self.stream))
        self.stream.flush()

    def end(self) -> None:
        if self.started:
            self.stream.write("\n")
            self.stream.flush()
        self.started = False


def read_result(prompt: str) -> str:
    """A tool's result typed by the user; the prompt goes to stderr (stdout carries the
    conversation)."""
    import sys

    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def run_turn(
    session: ChatSession,
    prompt: str,
    out: Callable[[str], None],
    read: Callable[[str], str] = read_result,
    stream: bool = True,
    images: list[str] | None = None,
) -> Reply:
    """One user turn of `qwenft chat`: the reasoning on stderr, the answer through out (streamed
    when stream); each tool call shown as `tool call: NAME ARGUMENTS`, its result read with
    read(`result of NAME> `), until the model answers. EOFError from read ends the turn at the
    call."""
    thinking = ReasoningPrinter()
    on_text = out if stream else None
    reply = session.send(prompt, on_text, thinking, images=images)
    thinking.end()
    while reply.calls:
        for name, arguments in reply.calls:
            out(f"tool call: {name} {arguments}\n")
        results = [read(f"result of {name}> ") for name, _ in reply.calls]
        reply = session.tool_results(results, on_text, thinking)
        thinking.end()
    if not stream:
        out(reply.answer)
    return reply
