"""`qwenft export --format gguf`: the Modelfile's chat template, refusals, and end to end with the
real llama.cpp converter and llama-cpp-python on trained tiny runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from qwenft.export import chat_template, modelfile
from qwenft.runs.folder import create_run_dir
from qwenft.runs.manifest import MANIFEST, update_manifest
from tests.helpers.builders import QA, run_manifest
from tests.helpers.cli import invoke
from tests.helpers.e2e import LEARN, Qwenft, copy_run, free_port, http_request, manifest
from tests.helpers.gotemplate import render

SYSTEM = "You are a helpful assistant."
CONVERSATION = [{"Role": "user", "Content": QA[0][0]}, {"Role": "assistant", "Content": QA[0][1]}]


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


# --------------------------------------------------------------------------------------------------
# the Modelfile (fast)


def test_modelfile_template_renders_the_trained_chat_format() -> None:
    plain = chat_template(tools=False, thinking=None)
    full = render(plain, {"System": SYSTEM, "Messages": CONVERSATION})
    assert full + "<|im_end|>\n" == chatml(
        ("system", SYSTEM), ("user", QA[0][0]), ("assistant", QA[0][1])
    )
    prompt = render(plain, {"System": SYSTEM, "Messages": CONVERSATION[:1]})
    assert prompt == chatml(("system", SYSTEM), ("user", QA[0][0])) + "<|im_start|>assistant\n"
    # a Qwen3 run trained without thinking answers after an empty think block, as it was prompted
    nothink = render(
        chat_template(tools=False, thinking=False), {"System": "", "Messages": CONVERSATION[:1]}
    )
    assert nothink == chatml(("user", QA[0][0])) + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_modelfile_template_carries_tool_calls_in_the_trained_format() -> None:
    tools = [{"Function": json.dumps({"name": "get_weather", "parameters": {}})}]
    call = {"Function": {"Name": "get_weather", "Arguments": '{"city": "Paris"}'}}
    text = render(
        chat_template(tools=True, thinking=None),
        {
            "System": SYSTEM,
            "Tools": tools,
            "Messages": [
                {"Role": "user", "Content": "Weather in Paris?"},
                {"Role": "assistant", "Content": "", "ToolCalls": [call]},
                {"Role": "tool", "Content": "21 C"},
            ],
        },
    )
    # LLaMA-Factory's qwen tool prompt (QWEN_TOOL_PROMPT) after the system prompt
    assert text.startswith(
        f"<|im_start|>system\n{SYSTEM}\n\n# Tools\n\nYou may call one or more functions"
    )
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_modelfile_names_the_gguf_system_and_both_stops() -> None:
    text = modelfile("run-q8_0.gguf", run_manifest(), tools=False)
    lines = text.splitlines()
    assert "FROM ./run-q8_0.gguf" in lines
    assert f'SYSTEM """{SYSTEM}"""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert 'TEMPLATE """' + chat_template(tools=False, thinking=None) + '"""' in text


# --------------------------------------------------------------------------------------------------
# refusals (fast): exit 2, nothing written


def _run(path: Path, **fields: object) -> Path:
    run = create_run_dir(path, {MANIFEST: run_manifest().to_json()})
    update_manifest(run, **fields)
    return run


@pytest.mark.parametrize(
    "status,args,message",
    [
        ("failed", [], "is failed, not completed"),
        ("running", [], "is running, not completed"),
        ("completed", ["--quant", "q3"], "unknown --quant 'q3'"),
        ("completed", ["--format", "onnx"], "unknown --format 'onnx'"),
    ],
)
def test_export_refuses_before_writing(
    tmp_path: Path, status: str, args: list[str], message: str
) -> None:
    run = _run(tmp_path / "r", status=status)
    before = sorted(p.name for p in run.iterdir())
    result = invoke("export", run, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(p.name for p in run.iterdir()) == before


def test_export_refuses_a_missing_run_and_an_existing_file(tmp_path: Path) -> None:
    missing = invoke("export", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "run folder not found" in missing.output
    run = _run(tmp_path / "r", status="completed", method="full")
    (run / "export").mkdir()
    (run / "export" / "r-f16.gguf").write_bytes(b"GGUF")
    again = invoke("export", run)
    assert again.exit_code == 2 and "r-f16.gguf" in again.output and "--force" in again.output
    assert (run / "export" / "r-f16.gguf").read_bytes() == b"GGUF"


@pytest.mark.parametrize("installed", [True, False])
def test_llamacpp_backend_looks_for_the_export_before_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: bool
) -> None:
    """With llama-cpp-python or without it (`make setup` leaves it out): a run with no GGUF
    export is told to export first; once it has one, a missing install is named."""
    monkeypatch.setattr("qwenft.models.llamacpp.llama_cpp_available", lambda: installed)
    run = _run(tmp_path / "r", status="completed", method="full")
    (run / "config.json").write_text('{"model_type": "qwen2"}')
    commands = (["chat", run, "--prompt", "hi"], ["serve", run])
    for command in commands:
        result = invoke(*command, "--backend", "llama.cpp")
        assert result.exit_code == 2, result.output
        assert "has no GGUF export yet" in result.output
    if installed:
        return
    gguf = run / "export" / "r-f16.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    update_manifest(run, exports=[{"file": str(gguf), "quant": "f16"}])
    for command in commands:
        result = invoke(*command, "--backend", "llama.cpp")
        assert result.exit_code == 2, result.output
        assert (
            "needs llama-cpp-python" in result.output
            and "llama-cpp-python==0.3.36" in result.output
        )


def test_export_without_llama_cpp_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qwenft.models.llamacpp.llama_cpp_available", lambda: False)
    run = _run(tmp_path / "r", status="completed", method="full")
    result = invoke("export", run)
    assert result.exit_code == 2 and "llama-cpp-python==0.3.36" in result.output
    assert not (run / "export").exists()


# --------------------------------------------------------------------------------------------------
# the template against LLaMA-Factory's own (model tier)


@pytest.mark.parametrize("preset,template", [("tiny-qwen2", "qwen"), ("tiny-qwen3", "qwen3")])
def test_modelfile_template_equals_llamafactory_template(
    tiny_home: Path, preset: str, template: str
) -> None:
    from qwenft.data.tokens import LlamaFactoryEncoder
    from qwenft.models.presets import resolve_model
    from qwenft.models.target import base_target

    model = resolve_model(preset)
    base_target(model).ensure_built(lambda _: None)
    thinking = False if template == "qwen3" else None
    enc = LlamaFactoryEncoder(
        model.path, template, 512, default_system=SYSTEM, enable_thinking=thinking
    )
    row = {
        "messages": [
            {"role": "user", "content": QA[0][0]},
            {"role": "assistant", "content": QA[0][1]},
        ]
    }
    _, input_ids, _ = enc.encode([row])[0]
    trained = enc.decode(input_ids)
    rendered = render(
        chat_template(tools=False, thinking=thinking), {"System": SYSTEM, "Messages": CONVERSATION}
    )
    assert rendered + "<|im_end|>\n" == trained


# --------------------------------------------------------------------------------------------------
# end to end: the real converter, llama-cpp-python, trained tiny runs


def _embedded_template_ids(gguf: Path, messages: list[dict], **variables: object) -> list[int]:
    """The GGUF's own chat template (tokenizer.chat_template) rendered and tokenized by llama.cpp."""
    import jinja2
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False, vocab_only=True)
    template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])
    text = template.render(messages=messages, add_generation_prompt=True, **variables)
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def _check_export(qwenft: Qwenft, run: Path, quant: str, *, stops: bool = True) -> dict:
    result = qwenft("export", run, "--quant", quant)
    gguf = Path(result.stdout.strip())
    assert gguf == run / "export" / f"{run.name}-{quant}.gguf" and gguf.is_file()
    [record] = [e for e in manifest(run)["exports"] if e["quant"] == quant]
    assert record["size_bytes"] == gguf.stat().st_size and len(record["sha256"]) == 64
    checks = record["checks"]
    assert checks["stop_tokens"]["eos"] == "<|im_end|>"
    assert checks["stop_tokens"]["eog"] == {"<|im_end|>": True, "<|endoftext|>": True}
    stopping = checks["stopping"]  # reported, never a refusal
    assert stopping["answers"] == 3 and stopping["window"] == 64
    assert (stopping["stopped"] == 3) is stops, stopping
    assert manifest(run)["stopping"]["stopped"] == stopping["stopped"]
    assert ("not stopping yet" in result.stderr) is not stops, result.stderr
    if quant == "f16":
        assert checks["identical"] is True and checks["agreement"] == 1.0
        for row in checks["prompts"]:  # the GGUF stops exactly where the merged model stops
            assert row["gguf_stop"] == row["merged_stop"], row
    assert (run / "export" / f"{run.name}-{quant}.Modelfile").is_file()
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".stage")]
    return record


def test_export_gguf_of_a_lora_run_end_to_end(
    merged_lora: Path, qwenft: Qwenft, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    run = copy_run(merged_lora, tmp_path / "lora")  # a copy: export writes into the run
    f16 = _check_export(qwenft, run, "f16")
    q8 = _check_export(qwenft, run, "q8_0")
    assert q8["size_bytes"] < f16["size_bytes"]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QA[1][0]}]
    ids = AutoTokenizer.from_pretrained(run / "merged").apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert _embedded_template_ids(Path(f16["file"]), messages) == list(ids)
    again = qwenft("export", run, check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    # use it without leaving qwenft: chat and serve the GGUF (the newest export: q8_0). What the
    # model learned is lora_run's test (test_e2e.py); that the GGUF's greedy answers stop, and the
    # f16 file's equal the merged model's token for token, is export's own check (above)
    chat = qwenft(
        "chat", run, "--backend", "llama.cpp", "--prompt", QA[1][0], "--max-new-tokens", 30
    )
    said = chat.stdout.strip()  # an answer that stops before the token limit
    assert said and len(AutoTokenizer.from_pretrained(run / "merged")(said)["input_ids"]) < 30
    # from the GGUF alone (issue 23): a run folder with only its export/ and qwenft.json
    laptop = tmp_path / "laptop" / run.name
    laptop.mkdir(parents=True)
    shutil.copytree(run / "export", laptop / "export")
    shutil.copy(run / "qwenft.json", laptop / "qwenft.json")
    alone = qwenft(
        "chat", laptop, "--backend", "llama.cpp", "--prompt", QA[1][0], "--max-new-tokens", 30
    )
    assert f"loading GGUF {laptop / 'export' / run.name}-q8_0.gguf" in alone.stderr, alone.stderr
    assert "merged" not in alone.stderr and alone.stdout.strip() == said
    _serve_llamacpp(qwenft, run, tmp_path)


def _serve_llamacpp(qwenft: Qwenft, run: Path, tmp_path: Path) -> None:
    """`qwenft serve --backend llama.cpp`: llama-cpp-python's OpenAI server over the GGUF, with
    serve's key rule and guard (issue 30: other origins and Host names refused, the body limit,
    the key never shown or written); an answer comes back and stops, nothing outlives the server."""
    import openai
    import psutil

    port, key = free_port(), "sk-qwenft-gguf"
    err = open(tmp_path / "serve.err", "w")  # noqa: SIM115
    proc = qwenft.popen(
        "serve",
        run,
        "--backend",
        "llama.cpp",
        "--port",
        port,
        "--api-key",
        key,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while not line.startswith("ready in"):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.err"
            ).read_text()[-3000:]
            line = proc.stdout.readline()
        family = psutil.Process(proc.pid).children(recursive=True)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60
        )
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QA[0][0]},
        ]
        reply = client.chat.completions.create(
            model=run.name, messages=messages, max_tokens=32, temperature=0
        )
        assert reply.choices[0].message.content.strip()
        assert reply.choices[0].finish_reason == "stop"  # within 32 tokens
        wrong = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=run.name, messages=messages, max_tokens=2)
        with pytest.raises(openai.NotFoundError) as unknown:  # OpenAI's answer to a wrong model
            client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
        assert unknown.value.code == "model_not_found"
        # the guard, as on LLaMA-Factory's server (test_serve_eval._guard_checks)
        auth = {"Authorization": f"Bearer {key}"}
        path, evil = "/v1/chat/completions", "https://evil.example"
        ask = {"Origin": evil, "Access-Control-Request-Method": "POST"}
        status, head, _ = http_request(port, "OPTIONS", path, headers=ask)
        assert status == 403 and "access-control-allow-origin" not in head
        for headers, expected in [
            ({**auth, "Origin": evil}, 403),
            ({**auth, "Host": f"evil.example:{port}"}, 403),
            ({**auth, "Host": f"localhost:{port}"}, 200),
        ]:
            status, head, body = http_request(port, "GET", "/v1/models", headers=headers)
            assert status == expected and "access-control-allow-origin" not in head, body
        status, _, _ = http_request(port, "POST", path, b"x" * (20 * 2**20), auth)
        assert status == 413
        big = {"model": run.name, "messages": messages, "max_tokens": 5000}
        status, _, body = http_request(port, "POST", path, json.dumps(big).encode(), auth)
        assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        shown = line + proc.stdout.read() + (tmp_path / "serve.err").read_text()
        assert "Bearer $QWENFT_API_KEY" in shown and key not in shown
        for written in ("serve.yaml", "serve.log"):
            assert key not in (run / written).read_text()
        time.sleep(1)
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()


def test_export_gguf_of_a_tiny_qwen3_run(qwenft: Qwenft, chat_file: Path) -> None:
    from transformers import AutoTokenizer

    run = Path("runs/q3").absolute()
    qwenft(
        "train",
        "--model",
        "tiny-qwen3",
        "--data",
        chat_file,
        "-o",
        run,
        "--max-steps",
        "100",
        *LEARN,
    )
    record = _check_export(qwenft, run, "f16")
    m = manifest(run)
    assert m["template"] == "qwen3" and m["enable_thinking"] is False  # no <think> in the data
    messages = [
        {"role": "system", "content": m["default_system"]},
        {"role": "user", "content": QA[0][0]},
    ]
    ids = AutoTokenizer.from_pretrained(run / "merged").apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, return_dict=True
    )["input_ids"]
    gguf = Path(record["file"])
    assert _embedded_template_ids(gguf, messages, enable_thinking=False) == list(ids)


def test_a_failed_conversion_leaves_nothing(
    tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter runs out of disk half way: exit 1, its message shown with the log's path,
    no GGUF, no staging folder, no export recorded."""
    from qwenft.export import LLAMA_CPP_PYTHON_VERSION

    monkeypatch.setattr("qwenft.models.llamacpp.llama_cpp_available", lambda: True)
    converter = isolated / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    converter.mkdir(parents=True)
    (converter / "convert_hf_to_gguf.py").write_text(
        "import sys\n"
        "out = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF' * 1000)\n"
        "print('OSError: [Errno 28] No space left on device', flush=True)\n"
        "sys.exit(1)\n"
    )
    run = _run(tmp_path / "r", status="completed", method="full")
    result = invoke("export", run)
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "export.log" in result.output
    assert sorted(p.name for p in (run / "export").iterdir()) == ["export.log"]
    assert json.loads((run / MANIFEST).read_text())["exports"] == []


def test_llamacpp_backend_needs_an_export(tmp_path: Path) -> None:
    run = _run(tmp_path / "r", status="completed", method="full")
    (run / "config.json").write_text('{"model_type": "qwen2"}')
    for command in (["chat", run, "--prompt", "hi"], ["serve", run]):
        result = invoke(*command, "--backend", "llama.cpp")
        assert result.exit_code == 2, result.output
        assert "has no GGUF export yet" in result.output and f"qwenft export {run}" in result.output
    other = invoke("serve", run, "--backend", "onnx")
    assert other.exit_code == 2 and "unknown --backend 'onnx'" in other.output


def test_export_accepts_a_faithful_gguf_of_a_model_that_does_not_stop(
    quick_runs: dict[str, Path], qwenft: Qwenft, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23: a 4-step run never learned to end its turns (its answers run past the verify
    window): the faithful f16 file is accepted and `not stopping` reported (export, manifest,
    `qwenft runs`). A GGUF with a wrong stop token, or a broken tensor, is refused: exit 1, the
    earlier export untouched, nothing else left."""
    run = copy_run(quick_runs["cutoff96"], tmp_path / "c96")
    record = _check_export(qwenft, run, "f16", stops=False)  # merges first
    assert all(r["tokens"] == 64 and r["merged_stop"] is None for r in record["checks"]["prompts"])
    listed = qwenft("runs", "--dir", tmp_path)
    [line] = [x for x in listed.stdout.splitlines() if x.endswith(str(run))]
    assert "STOPS" in listed.stdout and " 0/3 " in line, listed.stdout
    [row] = [
        r
        for r in json.loads(qwenft("runs", "--dir", tmp_path, "--json").stdout)
        if r["run_dir"] == str(run)
    ]
    assert row["stops"]["stopped"] == 0 and row["stops"]["answers"] == 3
    before = sorted(p.name for p in (run / "export").iterdir())
    gguf_py = next((Path.cwd().parent / "home" / "llama.cpp").glob("*/gguf-py"))
    monkeypatch.syspath_prepend(str(gguf_py))
    from gguf import GGUFReader

    import qwenft.export as export

    verify = export.verify_gguf

    def wrong_eos(reader: GGUFReader) -> None:  # <|endoftext|> written as eos
        field = reader.fields["tokenizer.ggml.eos_token_id"]
        field.parts[field.data[0]][0] = 151643

    def zero_embeddings(reader: GGUFReader) -> None:  # a tensor lost in conversion
        [tensor] = [t for t in reader.tensors if t.name == "token_embd.weight"]
        tensor.data[:] = 0

    for quant, damage, message in [
        ("q8_0", wrong_eos, "the GGUF's stop tokens are wrong: eos is '<|endoftext|>'"),
        ("f16", zero_embeddings, "the f16 GGUF's greedy tokens differ from the merged model's"),
    ]:

        def broken(gguf: Path, *args: object, damage=damage) -> dict:
            reader = GGUFReader(gguf, "r+")
            damage(reader)
            reader.data.flush()
            del reader
            return verify(gguf, *args)

        monkeypatch.setattr(export, "verify_gguf", broken)
        result = invoke("export", run, "--quant", quant, "--force")
        assert result.exit_code == 1 and message in result.output, result.output
        assert sorted(p.name for p in (run / "export").iterdir()) == before
        assert [e["quant"] for e in manifest(run)["exports"]] == ["f16"]
        assert manifest(run)["exports"][0]["sha256"] == record["sha256"]


def test_export_of_a_pt_run_is_accepted(pt_run: Path, qwenft: Qwenft, tmp_path: Path) -> None:
    """A continued-pre-training run: prompted with the starts of its own documents, faithful,
    accepted whether or not it ends its text within the window."""
    run = copy_run(pt_run, tmp_path / "pt")
    result = qwenft("export", run)
    record = manifest(run)["exports"][0]
    assert Path(result.stdout.strip()) == Path(record["file"]) and record["checks"]["identical"]
    prompts = [r["prompt"] for r in record["checks"]["prompts"]]
    assert prompts and all(p.startswith(tuple(a.split()[0] for _, a in QA)) for p in prompts)
