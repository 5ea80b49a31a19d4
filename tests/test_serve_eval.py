"""`qwenft serve` and `qwenft eval`: refusals and report assembly through typer's CliRunner (with
stand-in llamafactory-cli scripts), then end to end with the real LLaMA-Factory on the tiny Qwen."""

from __future__ import annotations

import json
import math
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qwenft import serve as serve_mod
from qwenft.models.presets import resolve_model
from qwenft.runs.lock import LOCK_NAME
from qwenft.runs.manifest import DatasetRecord, Manifest
from tests.helpers.builders import QA, kto_rows, pair_rows, read_calls, write_jsonl, written
from tests.helpers.cli import invoke
from tests.helpers.e2e import Qwenft, copy_run, http_request


@pytest.fixture
def run_dir(tmp_path: Path, local_model: Path, chat_file: Path) -> Path:
    """A completed LoRA run folder as `qwenft train` leaves it (no real weights)."""
    d = tmp_path / "runs" / "lora"
    d.mkdir(parents=True)
    manifest = Manifest(
        method="lora",
        model=resolve_model(str(local_model)),
        template="qwen",
        default_system="You are a helpful assistant.",
        enable_thinking=None,
        dataset=DatasetRecord(str(chat_file), "0" * 64, "chat-00000000", str(tmp_path / "ds")),
        command=["llamafactory-cli", "train", str(d / "train.yaml")],
        env={},
        status="completed",
    )
    (d / "qwenft.json").write_text(manifest.to_json())
    (d / "adapter_config.json").write_text("{}")
    (d / "train.yaml").write_text("cutoff_len: 128\nbf16: false\n")
    return d


def test_help_exits_zero() -> None:
    for cmd in ("serve", "eval"):
        result = invoke(cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, result.output


# ------------------------------------------------------------------------------------------------
# serve: pure parts


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert serve_mod.is_loopback(host) is loopback


def test_serve_config_and_env_from_run_manifest(run_dir: Path, local_model: Path) -> None:
    target, template, rd = serve_mod.resolve_serve_target(str(run_dir))
    assert rd == run_dir and template == "qwen"
    cfg = serve_mod.build_serve_config(target, template)
    assert cfg == {
        "model_name_or_path": str(local_model),
        "adapter_name_or_path": str(run_dir),
        "finetuning_type": "lora",
        "template": "qwen",
        "default_system": "You are a helpful assistant.",
        "infer_backend": "huggingface",
    }
    argv, env = serve_mod.build_serve_command(
        "lf", Path("s.yaml"), "127.0.0.1", 8000, None, "lora", "local"
    )
    assert argv == ["lf", "api", "s.yaml"]
    # an API_KEY in the caller's environment must not silently apply: always set, empty = no key
    assert env["API_KEY"] == "" and env["API_HOST"] == "127.0.0.1" and env["API_PORT"] == "8000"
    assert env["API_MODEL_NAME"] == "lora" and env["HF_HUB_OFFLINE"] == "1"


def test_serve_merged_model_is_preferred(run_dir: Path, local_model: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    m = json.loads((run_dir / "qwenft.json").read_text())
    (run_dir / "qwenft.json").write_text(json.dumps({**m, "merged": str(merged)}))
    target, template, _ = serve_mod.resolve_serve_target(str(run_dir))
    cfg = serve_mod.build_serve_config(target, template)
    assert cfg["model_name_or_path"] == str(merged) and "adapter_name_or_path" not in cfg


def test_plan_serve_curl_line_and_free_port(run_dir: Path, fake_cli: Path) -> None:
    plan = serve_mod.plan_serve(str(run_dir), host="127.0.0.1", port=0, api_key="sk-test")
    assert 0 < plan.port < 65536 and plan.base_url == f"http://127.0.0.1:{plan.port}/v1"
    line = plan.curl_line()
    assert f"http://127.0.0.1:{plan.port}/v1/chat/completions" in line
    # the key is never shown: the shell takes it from the environment
    assert '-H "Authorization: Bearer $QWENFT_API_KEY"' in line and '"model": "lora"' in line
    assert "sk-test" not in line and "sk-test" not in plan.yaml_text
    assert not (run_dir / "serve.yaml").exists()  # planning writes nothing


# ------------------------------------------------------------------------------------------------
# serve: invalid requests get a 400 naming the problem (checks added to LLaMA-Factory's app)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ([1], "must be a JSON object", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, "'model' is required", "model"),
        (
            {"model": "gpt-4", "messages": []},
            "unknown model 'gpt-4': this server serves 'lora'",
            "model",
        ),
        ({"model": "lora"}, "'messages' must be a non-empty list", "messages"),
        ({"model": "lora", "messages": ["hi"]}, "messages[0] must be an object", "messages"),
        (
            {"model": "lora", "messages": [{"role": "user"}], "max_tokens": 0},
            "'max_tokens' must be a positive integer (got 0)",
            "max_tokens",
        ),
        (
            {"model": "lora", "messages": [{"role": "user"}], "max_tokens": -5},
            "(got -5)",
            "max_tokens",
        ),
        (
            {"model": "lora", "messages": [{"role": "user"}], "max_tokens": "8"},
            "(got '8')",
            "max_tokens",
        ),
        (
            {"model": "lora", "messages": [{"role": "user"}], "max_tokens": True},
            "(got True)",
            "max_tokens",
        ),
        (
            {"model": "lora", "messages": [{"role": "user"}], "n": 0},
            "'n' must be a positive integer",
            "n",
        ),
    ],
)
def test_invalid_chat_requests_are_named(body: object, message: str, param: str | None) -> None:
    got = serve_mod.check_chat_request(body, "lora")
    assert got is not None and message in got[0] and got[1] == param


def test_valid_chat_requests_pass_and_context_is_checked() -> None:
    ok = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8.0}
    assert serve_mod.check_chat_request(ok, "lora") is None
    assert serve_mod.check_context(10, None, 100) is None
    assert serve_mod.check_context(10, 90, 100) is None
    assert "longer than the model's context of 100" in (
        serve_mod.check_context(100, None, 100) or ""
    )
    assert "ask for at most 90 tokens" in (serve_mod.check_context(10, 91, 100) or "")


class FakeEngine:
    """What RequestChecks reads of LLaMA-Factory's HF engine: one token per word of the prompt."""

    class template:  # noqa: N801
        @staticmethod
        def encode_oneturn(tokenizer, messages, system, tools):  # noqa: ANN001, ANN205
            words = sum(len(m["content"].split()) for m in messages) + len((system or "").split())
            return list(range(words)), []

    tokenizer = None
    model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 50})()})()


def asgi_post(app: object, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST body to /v1/chat/completions of an ASGI app in two chunks; (status, JSON body)."""
    import asyncio

    chunks = [
        {"type": "http.request", "body": body[:5], "more_body": True},
        {"type": "http.request", "body": body[5:], "more_body": False},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_request_checks_answer_400_and_pass_good_requests_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_MODEL_NAME", "lora")
    monkeypatch.setenv("API_KEY", "sk-1")
    seen: list[bytes] = []

    async def app(scope: dict, receive, send) -> None:  # noqa: ANN001 - LLaMA-Factory's app
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message.get("more_body", False)
        seen.append(body)
        if b"boom" in body:
            raise RuntimeError("generation failed")
        assert (await receive())["type"] == "http.disconnect"  # as a streaming response listens
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    checks = serve_mod.RequestChecks(app, type("ChatModel", (), {"engine": FakeEngine()})())
    key = {"Authorization": "Bearer sk-1"}

    def post(body: object, headers: dict | None = key) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return asgi_post(checks, raw, headers)

    status, out = post(b'{"model": "lora", "messages": [')
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    # another model: OpenAI's 404 (openai clients raise NotFoundError)
    status, out = post({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and out["error"] == {
        "message": "unknown model 'gpt-4o': this server serves 'lora' (GET /v1/models)",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    status, out = post(
        {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}
    )
    assert (status, out["error"]["param"]) == (400, "max_tokens")
    assert out["error"]["type"] == "invalid_request_error"
    status, out = post({"model": "lora", "messages": [{"role": "user", "content": "w " * 60}]})
    assert (
        status == 400
        and "60 tokens, longer than the model's context of 50" in out["error"]["message"]
    )
    status, out = post(
        {"model": "lora", "messages": [{"role": "user", "content": "w " * 10}], "max_tokens": 41}
    )
    assert status == 400 and "ask for at most 40 tokens" in out["error"]["message"]
    assert seen == []  # none of them reached the app

    good = {"model": "lora", "messages": [{"role": "user", "content": "w " * 10}], "max_tokens": 40}
    assert post(good) == (200, {"ok": True})
    assert json.loads(seen[-1]) == good  # the body reached the app whole
    status, out = post({**good, "messages": [{"role": "user", "content": "boom"}]})
    assert status == 500 and out["error"]["message"] == (
        "the server failed on this request (RuntimeError: generation failed)"
    )
    # without the key the app answers (its own 401), unchecked
    assert post({"model": "x"}, headers={}) == (200, {"ok": True})


def test_llamacpp_checks_only_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's server answers any model name with its one model: the checks add the 404 and
    leave everything else (a missing model, a body it judges itself) to it."""
    monkeypatch.setenv("API_MODEL_NAME", "lora")
    monkeypatch.delenv("API_KEY", raising=False)

    async def app(scope: dict, receive, send) -> None:  # noqa: ANN001 - llama.cpp's app
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    checks = serve_mod.RequestChecks(app, only_model=True)
    msgs = [{"role": "user", "content": "hi"}]
    status, out = asgi_post(checks, json.dumps({"model": "gpt-4o", "messages": msgs}).encode())
    assert status == 404 and out["error"]["code"] == "model_not_found"
    for body in ({"model": "lora", "messages": msgs}, {"messages": msgs}, {"model": "lora"}):
        assert asgi_post(checks, json.dumps(body).encode()) == (200, {"ok": True})
    assert asgi_post(checks, b"{not json") == (200, {"ok": True})


def test_request_log_writes_one_marked_line_and_the_terminal_shows_only_those(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RequestLog (in the server) writes one marked line per request into the server's output,
    leaving qwenft's readiness probes out; RequestLines (in qwenft) shows only those lines, or all
    of the output with -v."""
    import io
    import os

    read_fd, write_fd = os.pipe()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(os.fdopen(write_fd, "wb", 0)))

    async def app(scope: dict, receive, send) -> None:  # noqa: ANN001
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    logged = serve_mod.RequestLog(app)
    asgi_post(logged, b"{}")
    asgi_post(logged, b"{}", {"User-Agent": serve_mod.PROBE_AGENT})
    os.close(write_fd)
    output = os.read(read_fd, 65536)
    os.close(read_fd)
    lines = output.decode().splitlines()
    assert len(lines) == 1, lines
    pattern = r"\d\d:\d\d:\d\d POST /v1/chat/completions 201 \d+\.\d\d s"
    assert re.fullmatch(re.escape(serve_mod.REQUEST_MARK) + pattern, lines[0]), lines

    server_output = b"[INFO|loader.py:1] >> Model config Qwen2Config {\n" + output + b"INFO: ok\n"
    shown = io.BytesIO()
    echo = serve_mod.RequestLines(shown)
    for i in range(0, len(server_output), 7):  # in pieces, as a pipe delivers them
        echo.write(server_output[i : i + 7])
    assert shown.getvalue().decode() == lines[0][len(serve_mod.REQUEST_MARK) :] + "\n"
    everything = io.BytesIO()
    serve_mod.RequestLines(everything, verbose=True).write(server_output)
    assert everything.getvalue() == server_output


# ------------------------------------------------------------------------------------------------
# serve: bad input -> exit 2, nothing started or written


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path: Path, fake_cli: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    before = written(tmp_path)
    result = invoke("serve", folder)
    assert result.exit_code == 2, result.output
    assert "not a Hugging Face model folder" in result.output
    assert read_calls(fake_cli) == [] and written(tmp_path) == before


def test_serve_refuses_a_missing_folder_and_a_run_without_adapter(
    tmp_path: Path, run_dir: Path, fake_cli: Path
) -> None:
    result = invoke("serve", tmp_path / "nope")
    assert result.exit_code == 2 and "not found" in result.output
    (run_dir / "adapter_config.json").unlink()
    result = invoke("serve", run_dir)
    assert result.exit_code == 2 and "has no adapter" in result.output
    assert read_calls(fake_cli) == [] and not (run_dir / "serve.yaml").exists()


def test_serve_refuses_a_port_in_use(run_dir: Path, fake_cli: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("serve", run_dir, "--port", port)
    assert result.exit_code == 2, result.output
    assert (
        f"port {port} on 127.0.0.1 is already in use" in result.output and "hint: " in result.output
    )
    assert read_calls(fake_cli) == [] and not (run_dir / "serve.yaml").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_serve_refuses_a_public_host_without_key(
    run_dir: Path, fake_cli: Path, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QWENFT_API_KEY", raising=False)
    result = invoke("serve", run_dir, "--host", host)
    assert result.exit_code == 2, result.output
    assert f"refusing to serve on {host} without an API key" in result.output
    assert "--api-key" in result.output
    assert read_calls(fake_cli) == [] and not (run_dir / "serve.yaml").exists()


def test_serve_reports_a_server_that_dies_while_loading(
    run_dir: Path, fake_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LF_EXIT", "3")
    result = invoke("serve", run_dir, "--port", 0)
    assert result.exit_code == 1, result.output
    assert "exited with code 3 before it was ready" in result.output
    assert f"read the log: {run_dir / 'serve.log'}" in result.output
    call = read_calls(fake_cli)[0]
    assert call["argv"] == ["api", str(run_dir / "serve.yaml")]
    assert (
        call["yaml"]["adapter_name_or_path"] == str(run_dir) and call["yaml"]["template"] == "qwen"
    )


def test_serve_hands_its_guard_to_the_server_and_never_shows_the_key(
    run_dir: Path, fake_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's options reach the server's environment (QWENFT_SERVE_GUARD, LLaMA-Factory's
    MAX_CONCURRENT), what is in force is printed, and the key (QWENFT_API_KEY) only goes to the
    server as API_KEY: not on the terminal, not into the run folder."""
    import os

    key = "sk-cli-secret-7e21"
    monkeypatch.setenv("FAKE_LF_EXIT", "3")
    recorded = ("QWENFT_SERVE_GUARD", "MAX_CONCURRENT", "API_KEY")
    monkeypatch.setenv("FAKE_LF_VARS", ",".join([os.environ["FAKE_LF_VARS"], *recorded]))
    monkeypatch.setenv("QWENFT_API_KEY", key)
    result = invoke(
        "serve",
        run_dir,
        "--port",
        0,
        "--cors-origin",
        "http://LocalHost:3000/",
        "--allowed-host",
        "box.lan",
        "--max-concurrent",
        2,
        "--max-queue",
        3,
    )
    assert result.exit_code == 1, result.output  # the stand-in server exits at once
    env = read_calls(fake_cli)[0]["env"]
    guard = json.loads(env["QWENFT_SERVE_GUARD"])
    assert guard["cors_origins"] == ["http://localhost:3000"]
    assert guard["allowed_hosts"] == ["box.lan"] and guard["host"] == "127.0.0.1"
    assert (guard["max_concurrent"], guard["max_queue"], guard["max_tokens"]) == (2, 3, 4096)
    assert guard["default_tokens"] == serve_mod.LF_DEFAULT_NEW_TOKENS
    assert env["MAX_CONCURRENT"] == "2" and env["API_KEY"] == key
    assert "browser origins allowed (--cors-origin): http://localhost:3000;" in result.output
    assert "Host names (--allowed-host): 127.0.0.1, box.lan, localhost" in result.output
    assert "2 generating, 3 waiting (then 429)" in result.output
    assert "API_KEY='***'" in result.output  # the launching line
    assert key not in result.output
    assert [p for p in run_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()] == []


# ------------------------------------------------------------------------------------------------
# eval


def test_eval_refuses_data_that_fails_the_check(
    run_dir: Path, tmp_path: Path, fake_cli: Path, isolated: Path
) -> None:
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"messages": [{"role": "assistant", "content": "hi"}]}, {"text": "no messages"}],
    )
    before = written(tmp_path)
    result = invoke("eval", run_dir, "--data", bad)
    assert result.exit_code == 2, result.output
    assert (
        "data error(s); nothing was evaluated" in result.output
        and "qwenft data check" in result.output
    )
    assert read_calls(fake_cli) == [] and written(tmp_path) == before


def test_eval_writes_report_and_refuses_to_overwrite(
    run_dir: Path, chat_file: Path, fake_cli: Path, isolated: Path
) -> None:
    result = invoke("eval", run_dir, "--data", chat_file, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    calls = read_calls(fake_cli)
    assert [c["yaml"].get("do_predict", False) for c in calls] == [False, False, True]
    tuned, base, predict = (c["yaml"] for c in calls)
    assert tuned["adapter_name_or_path"] == str(run_dir) and "adapter_name_or_path" not in base
    for cfg in (tuned, base, predict):
        assert cfg["do_train"] is False and cfg["template"] == "qwen" and cfg["cutoff_len"] == 128
        assert cfg["eval_dataset"].startswith("chat-") and cfg["per_device_eval_batch_size"] == 2
    assert predict["predict_with_generate"] is True and predict["do_sample"] is False
    info = json.loads((isolated / "datasets" / "dataset_info.json").read_text())
    assert tuned["eval_dataset"] in info

    out = run_dir / "eval"
    assert sorted(p.name for p in out.iterdir()) == [
        "eval.json",
        "eval.md",
        "predictions.jsonl",
        "raw",
    ]
    report = json.loads((out / "eval.json").read_text())
    assert report["models"]["fine-tuned"]["eval_loss"] == 0.5
    assert report["models"]["fine-tuned"]["perplexity"] == pytest.approx(math.exp(0.5))
    assert report["models"]["base"]["perplexity"] == pytest.approx(math.exp(2.0))
    assert report["loss_change"] == pytest.approx(-1.5)
    assert report["generation"]["bleu-4"] == 50.0 and report["generation"]["rouge-l"] == 55.0
    md = (out / "eval.md").read_text()
    assert "| fine-tuned" in md and "| base" in md and md in result.stdout
    # inside the run folder: relative to it
    assert (
        json.loads((run_dir / "qwenft.json").read_text())["last_eval"]["report"] == "eval/eval.json"
    )
    assert not [
        p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME
    ]  # no staging left

    again = invoke("eval", run_dir, "--data", chat_file)
    assert again.exit_code == 2 and "already holds an evaluation report" in again.output
    assert len(read_calls(fake_cli)) == 3
    forced = invoke("eval", run_dir, "--data", chat_file, "--force", "--no-base", "--json")
    assert forced.exit_code == 0, forced.output
    assert len(read_calls(fake_cli)) == 5
    assert "base" not in json.loads((out / "eval.json").read_text())["models"]


def test_eval_failure_leaves_old_report_and_names_log(
    run_dir: Path, chat_file: Path, fake_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LF_EXIT", "1")
    result = invoke("eval", run_dir, "--data", chat_file)
    assert result.exit_code == 1, result.output
    assert f"read the log: {run_dir / 'eval.log'}" in result.output
    assert not (run_dir / "eval").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]


# the preference, kto and pt kinds: scored in-process (qwenft.scoring), stubbed here


def qa_texts() -> list[dict]:
    """Pre-training rows: each QA question and its answer as one text."""
    return [{"text": f"{q} {a}"} for q, a in QA]


FAKE_SCORES = {
    "preference": {
        "pairs": 4,
        "tuned": {
            "mean_margin": 6.0,
            "accuracy": 1.0,
            "mean_chosen_logp": -2.0,
            "mean_rejected_logp": -8.0,
        },
        "start": {
            "mean_margin": 1.0,
            "accuracy": 0.5,
            "mean_chosen_logp": -9.0,
            "mean_rejected_logp": -10.0,
        },
        "reward_accuracy": 0.75,
        "reward_margin": 5.0,
        "rows": [{"line": 1, "tuned": {"margin": 6.0}, "start": {"margin": 1.0}}],
    },
    "kto": {
        "samples": 8,
        "desirable": 4,
        "undesirable": 4,
        "tuned": {"desirable_logp": -2.0, "undesirable_logp": -9.0, "gap": 7.0},
        "start": {"desirable_logp": -8.0, "undesirable_logp": -9.5, "gap": 1.5},
        "desirable_shift": 6.0,
        "undesirable_shift": 0.5,
        "shift_gap": 5.5,
        "rows": [{"line": 1, "label": True, "tuned": -2.0, "start": -8.0}],
    },
    "pt": {
        "texts": 4,
        "tuned": {"nll": 1.0, "perplexity": math.exp(1.0), "tokens": 40},
        "start": {"nll": 2.0, "perplexity": math.exp(2.0), "tokens": 40},
        "perplexity_change": math.exp(1.0) - math.exp(2.0),
        "rows": [{"line": 1, "tokens": 10, "tuned": -10.0, "start": -20.0}],
    },
}
KIND_ROWS = {"preference": pair_rows, "kto": kto_rows, "pt": qa_texts}
KIND_LINES = {
    "preference": "Reward accuracy 75.0% (3 of 4 pairs: the fine-tuned model prefers chosen by "
    "more than the base model does); reward margin +5.000",
    "kto": "desirable answers' log p moved by +6.000 and undesirable ones' by +0.500: a "
    "difference of +5.500",
    "pt": "Perplexity fell by 4.671 against the base model.",
}


@pytest.fixture
def stub_scores(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the three scorers (which load the models) with canned results; returns the calls."""
    import copy

    from qwenft import scoring

    calls: list[dict] = []
    for kind in FAKE_SCORES:

        def fake(target, start, path, _kind=kind, **kw):  # noqa: ANN001, ANN202
            calls.append({"kind": _kind, "target": target, "start": start, "path": path, **kw})
            result = copy.deepcopy(FAKE_SCORES[_kind])
            if start is None:
                result.update(start=None)
            return result

        monkeypatch.setitem(scoring.SCORERS, kind, fake)
    return calls


@pytest.mark.parametrize("kind", ["preference", "kto", "pt"])
def test_eval_scores_each_kind_next_to_the_starting_model(
    kind: str,
    run_dir: Path,
    local_model: Path,
    tmp_path: Path,
    fake_cli: Path,
    stub_scores: list[dict],
) -> None:
    data = write_jsonl(tmp_path / f"{kind}.jsonl", KIND_ROWS[kind]())
    result = invoke("eval", run_dir, "--data", data, "--max-samples", 3, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert read_calls(fake_cli) == []  # no LLaMA-Factory launch: scored in-process
    [call] = stub_scores
    assert call["kind"] == kind and call["path"] == data.resolve()
    assert call["target"].adapter_path == str(run_dir)  # the fine-tuned model: base + adapter
    # the starting model: the run's base without the adapter
    assert call["start"].adapter_path is None and call["start"].model_path == str(local_model)
    assert (call["template"], call["cutoff_len"], call["max_samples"], call["batch_size"]) == (
        "qwen",
        128,
        3,
        2,
    )
    assert call["default_system"] == "You are a helpful assistant."

    out = run_dir / "eval"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "scores.jsonl"]
    report = json.loads((out / "eval.json").read_text())
    assert report["kind"] == kind and report["scores"] == "scores.jsonl"
    assert set(report["models"]) == {"fine-tuned", "base"}
    assert report["models"]["base"]["adapter"] is None
    assert report["data"]["samples"] == len(KIND_ROWS[kind]())
    assert "rows" not in report and "tuned" not in report
    assert json.loads((out / "scores.jsonl").read_text().splitlines()[0])["line"] == 1
    md = (out / "eval.md").read_text()
    assert KIND_LINES[kind] in md and md in result.stdout
    assert "| fine-tuned" in md and "| base" in md
    manifest = json.loads((run_dir / "qwenft.json").read_text())
    assert manifest["last_eval"]["report"] == "eval/eval.json"  # inside the run: relative
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]


def test_eval_preference_report_json_without_a_start_and_refusals(
    run_dir: Path, tmp_path: Path, fake_cli: Path, stub_scores: list[dict]
) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    first = invoke("eval", run_dir, "--data", pairs, "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["reward_accuracy"] == 0.75 and report["reward_margin"] == 5.0
    assert report["models"]["fine-tuned"]["mean_margin"] == 6.0
    assert report["models"]["base"]["accuracy"] == 0.5
    assert report["data"]["scored"] == 4 and report["settings"]["max_samples"] is None

    again = invoke("eval", run_dir, "--data", pairs)
    assert again.exit_code == 2 and "already holds an evaluation report" in again.output
    assert len(stub_scores) == 1

    alone = invoke("eval", run_dir, "--data", pairs, "--force", "--no-base", "--json")
    assert alone.exit_code == 0, alone.output
    assert stub_scores[-1]["start"] is None
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert set(report["models"]) == {"fine-tuned"}
    assert read_calls(fake_cli) == []


def test_eval_scoring_failure_leaves_the_old_report(
    run_dir: Path, tmp_path: Path, fake_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenft import scoring
    from qwenft.errors import QwenftError

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text('{"old": true}')

    def broken(*_a: object, **_k: object) -> dict:
        raise QwenftError("cannot load the model")

    monkeypatch.setitem(scoring.SCORERS, "preference", broken)
    result = invoke("eval", run_dir, "--data", pairs, "--force")
    assert result.exit_code == 2 and "cannot load the model" in result.output
    assert json.loads((run_dir / "eval" / "eval.json").read_text()) == {"old": True}
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
    assert "last_eval" not in json.loads((run_dir / "qwenft.json").read_text())


# ------------------------------------------------------------------------------------------------
# end to end: the real LLaMA-Factory on the tiny Qwen


def test_serve_openai_client_end_to_end(lora_run: Path, qwenft: Qwenft, tmp_path: Path) -> None:
    """A served run, through the openai client: answers, streams, OpenAI's errors (400s naming
    the problem, 404 NotFoundError for another model, 401); the terminal shows one line per
    request, LLaMA-Factory's output only RUN/serve.log. The guard over real HTTP (_guard_checks);
    the key (from QWENFT_API_KEY) is never shown nor written into the run folder."""
    import openai
    import psutil

    run = copy_run(lora_run, tmp_path / "served")  # serve writes serve.yaml and serve.log into it
    port, key = serve_mod.free_port(), "sk-qwenft-test-3f9a1c"
    err_log = open(tmp_path / "serve.err", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        qwenft.argv(
            "serve",
            run,
            "--port",
            port,
            "--cors-origin",
            UI_ORIGIN,
            "--max-queue",
            4,
            "--max-tokens",
            40000,  # the model's context check below answers first (the cap: _guard_checks)
        ),
        env={**qwenft.env, "QWENFT_API_KEY": key},
        cwd=qwenft.cwd,
        stdout=subprocess.PIPE,
        stderr=err_log,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        got: list[str] = []
        deadline = time.monotonic() + 240
        while not any(x.startswith("press Ctrl-C") for x in got):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.err"
            ).read_text()[-3000:]
            try:
                got.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert got[0].startswith("ready in") and f"http://127.0.0.1:{port}/v1" in got[0]
        assert "model 'served'" in got[0] and "Bearer key required" in got[0]
        assert got[1].startswith("curl ") and "Bearer $QWENFT_API_KEY" in got[1]
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family  # the llamafactory-cli api server
        _guard_checks(port, key, max(family, key=lambda p: p.memory_info().rss), "served")

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60
        )
        assert [m.id for m in client.models.list().data] == ["served"]
        msgs = [{"role": "user", "content": "Hello"}]
        reply = client.chat.completions.create(
            model="served", messages=msgs, max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        chunks = list(
            client.chat.completions.create(
                model="served", messages=msgs, max_tokens=8, temperature=0, stream=True
            )
        )
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
        # invalid requests: a 400 naming the problem, never a 500
        too_long = [{"role": "user", "content": "hi " * 33000}]  # tiny-qwen2: 32768 positions
        for kwargs, needle in [
            ({"max_tokens": 0}, "'max_tokens' must be a positive integer"),
            ({"messages": too_long}, "longer than the model's context of 32768 tokens"),
            ({"max_tokens": 40000}, "exceeds the model's context of 32768 tokens"),
            ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid request: messages"),
        ]:
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(
                    **{"model": "served", "messages": msgs, "max_tokens": 8, **kwargs}
                )
            assert bad.value.status_code == 400 and needle in bad.value.message, bad.value
        # another model: OpenAI's own answer, 404 model_not_found
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=8)
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
        assert "unknown model 'gpt-4o': this server serves 'served'" in missing.value.message
        raw = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=b'{"model": "served", "messages": [',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(raw, timeout=30)
        assert http.value.code == 400
        assert "not valid JSON" in json.loads(http.value.read())["error"]["message"]
        assert client.chat.completions.create(model="served", messages=msgs, max_tokens=2)

        wrong = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.status_code == 401

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.2)  # the reader thread's last lines
        got += [lines.get() for _ in range(lines.qsize())]
    finally:
        if proc.poll() is None:
            proc.kill()
        err_log.close()
    time.sleep(0.5)
    assert [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    terminal = (tmp_path / "serve.err").read_text()
    assert "server stopped (SIGTERM); no processes left" in terminal
    # the limits in force, with their options, before the server starts
    assert f"browser origins allowed (--cors-origin): {UI_ORIGIN};" in terminal
    assert "body 16 MB, max_tokens 40000, 256 messages, 1 generating, 4 waiting" in terminal
    # the key: not on the terminal, not in the run folder (serve.yaml, serve.log, ...)
    assert key not in terminal and key not in "".join(got)
    written_files = [p for p in run.rglob("*") if p.is_file()]
    assert {"serve.yaml", "serve.log"} <= {p.name for p in written_files}
    assert [p for p in written_files if key.encode() in p.read_bytes()] == []
    assert ("OPTIONS", "/v1/chat/completions", "403") in re.findall(
        r"^\d\d:\d\d:\d\d (\w+) (\S+) (\d+) \d+\.\d\d s$", terminal, re.M
    )
    # the terminal: one line per request; LLaMA-Factory's output (config dumps, uvicorn) only in
    # the log
    assert f"log: {run / 'serve.log'}" in terminal
    requests = re.findall(r"^\d\d:\d\d:\d\d (\w+) (\S+) (\d+) \d+\.\d\d s$", terminal, re.M)
    assert ("POST", "/v1/chat/completions", "200") in requests
    assert ("POST", "/v1/chat/completions", "404") in requests
    assert ("GET", "/v1/models", "401") in requests  # the wrong key
    for noise in ("Model config", "[INFO|", "Uvicorn running", "Loading weights", "%|"):
        assert noise not in terminal, noise
    log = (run / "serve.log").read_text()
    assert "Model config" in log and "Uvicorn running" in log
    assert f"{serve_mod.REQUEST_MARK}" in log
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


UI_ORIGIN = "http://ui.example:3000"  # the served test's --cors-origin


def _guard_checks(port: int, key: str, server: object, model: str) -> None:
    """Issue 30 over real HTTP: pages of other origins and other Host names (DNS rebinding) are
    refused, a --cors-origin gets its header, a 20 MB body a 413 without the server growing by
    it, 32 requests at once against a queue of 4 answers or 429s and the server answers after."""
    import threading

    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    chat = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    ).encode()
    evil, path = "https://evil.example", "/v1/chat/completions"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    status, head, _ = http_request(port, "OPTIONS", path, headers={"Origin": evil, **preflight})
    assert status == 403 and "access-control-allow-origin" not in head
    status, head, body = http_request(
        port, "POST", path, chat, {**auth, "Origin": evil, "Host": f"evil.example:{port}"}
    )
    assert status == 403 and "access-control-allow-origin" not in head
    assert json.loads(body)["error"]["code"] == "host_not_allowed"
    status, head, body = http_request(port, "POST", path, chat, {**auth, "Origin": evil})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
    # the web UI named with --cors-origin
    status, head, _ = http_request(
        port, "OPTIONS", path, headers={"Origin": UI_ORIGIN, **preflight}
    )
    assert status == 204 and head["access-control-allow-origin"] == UI_ORIGIN
    status, head, body = http_request(port, "POST", path, chat, {**auth, "Origin": UI_ORIGIN})
    assert status == 200 and head["access-control-allow-origin"] == UI_ORIGIN, body
    assert "access-control-allow-credentials" not in head
    # DNS rebinding: a name that resolves to 127.0.0.1 is not one this server answers to
    for host, expected in [(f"evil.example:{port}", 403), (f"localhost:{port}", 200)]:
        status, _, body = http_request(port, "GET", "/v1/models", headers={**auth, "Host": host})
        assert status == expected, (host, body)
    # the caps
    over = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40001}
    )
    status, _, body = http_request(port, "POST", path, over.encode(), auth)
    assert status == 400 and "at most 40000 tokens" in json.loads(body)["error"]["message"]
    # 20 MB: a 413 from its Content-Length; the server does not keep it
    rss = server.memory_info().rss  # type: ignore[attr-defined]
    status, _, body = http_request(port, "POST", path, b"x" * (20 * 2**20), auth)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    grew = server.memory_info().rss - rss  # type: ignore[attr-defined]
    assert grew < 5 * 2**20, f"the server grew by {grew / 2**20:.1f} MB"
    # 32 at once against 1 generating + 4 waiting: answers or 429s, never a 500 or a hang
    start, replies = threading.Barrier(32), []

    def one() -> None:
        start.wait()
        replies.append(http_request(port, "POST", path, chat, auth))

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not [t for t in threads if t.is_alive()] and len(replies) == 32
    statuses = sorted(r[0] for r in replies)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    assert all(int(h["retry-after"]) >= 1 for s, h, _ in replies if s == 429)
    status, _, body = http_request(port, "POST", path, chat, auth)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"


def test_serve_killed_with_sigkill_leaves_nothing_and_frees_its_port(
    qwenft: Qwenft, tmp_path: Path
) -> None:
    import psutil

    from qwenft.models.tiny import ensure_tiny_model

    ensure_tiny_model("tiny-qwen2", progress=None)
    port = serve_mod.free_port()
    err_log = open(tmp_path / "serve.err", "w")  # noqa: SIM115
    proc = qwenft.popen(
        "serve", "tiny-qwen2", "--port", port, stdout=subprocess.PIPE, stderr=err_log, text=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # "ready in ...", the curl line, "press Ctrl-C to stop"
            if line.startswith("press Ctrl-C"):
                break
            assert time.monotonic() < deadline
        assert proc.poll() is None, (tmp_path / "serve.err").read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # the supervisor and the server
        # a model that is not a run: its server's log goes to QWENFT_HOME/logs
        log = tmp_path / "home" / "logs" / "serve-tiny-qwen2.log"
        assert f"log: {log}" in (tmp_path / "serve.err").read_text()
        assert "Uvicorn running" in log.read_text()
        proc.kill()  # kill -9: qwenft runs no cleanup at all
        proc.wait()
        killed = time.monotonic()
        while time.monotonic() - killed < 5 and any(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family
        ):
            time.sleep(0.1)
        left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"still running 5 s after qwenft was killed: {left}"
        assert serve_mod.probe(f"http://127.0.0.1:{port}/v1/models", None, 1.0) is None
        with socket.socket() as s:  # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
        err_log.close()


def test_eval_lora_run_beats_its_base_end_to_end(
    lora_run: Path, qwenft: Qwenft, chat_file: Path, tmp_path: Path
) -> None:
    run = copy_run(lora_run, tmp_path / "lora")  # eval writes its report into the run folder
    out = qwenft(
        "eval",
        run,
        "--data",
        chat_file,
        "--batch-size",
        "4",
        "--max-new-tokens",
        "16",
        "--json",
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    printed = json.loads(
        out.stdout
    )  # stdout holds only the report; LLaMA-Factory's output is on stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert printed["models"] == report["models"]
    tuned, base = report["models"]["fine-tuned"], report["models"]["base"]
    assert math.isfinite(tuned["eval_loss"]) and math.isfinite(base["eval_loss"])
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["eval_loss"]))
    for metric in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert 0 <= report["generation"][metric] <= 100
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(QA) and {"prompt", "predict", "label"} <= set(preds[0])
    md = (run / "eval" / "eval.md").read_text()
    assert "| fine-tuned" in md and "| base" in md and "BLEU-4" in md


def test_eval_pairs_kto_and_text_on_lora_run_end_to_end(
    lora_run: Path, qwenft: Qwenft, tmp_path: Path
) -> None:
    """lora_run learned the QA answers (SFT): on pairs of (its answer, a wrong one) it prefers the
    learned answer by more than its base does on every pair, its learned answers' log p rises
    relative to the wrong ones', and the answers' text is less perplexing to it. No LLaMA-Factory
    launch: the scores are log-probabilities in-process (qwenft.scoring)."""
    run = copy_run(lora_run, tmp_path / "lora")
    reports = {}
    for kind, rows in (("preference", pair_rows()), ("kto", kto_rows()), ("pt", qa_texts())):
        data = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        out = tmp_path / f"eval-{kind}"
        done = qwenft("eval", run, "--data", data, "-o", out, "--json", timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        reports[kind] = json.loads(done.stdout)
        assert json.loads((out / "eval.json").read_text())["models"] == reports[kind]["models"]

    pref = reports["preference"]
    tuned, base = pref["models"]["fine-tuned"], pref["models"]["base"]
    assert pref["data"]["scored"] == len(QA)
    assert pref["reward_accuracy"] == 1.0 and pref["reward_margin"] > 0
    assert tuned["mean_margin"] > base["mean_margin"] and tuned["accuracy"] == 1.0
    assert tuned["mean_chosen_logp"] > base["mean_chosen_logp"]

    kto = reports["kto"]
    assert (kto["data"]["desirable"], kto["data"]["undesirable"]) == (4, 4)
    assert kto["shift_gap"] > 0 and kto["desirable_shift"] > kto["undesirable_shift"]
    assert kto["models"]["fine-tuned"]["gap"] > kto["models"]["base"]["gap"]

    pt = reports["pt"]
    assert pt["models"]["fine-tuned"]["perplexity"] < pt["models"]["base"]["perplexity"]
    assert pt["perplexity_change"] < 0


def test_serve_and_eval_refuse_a_template_other_than_the_trained_one(
    run_dir: Path, chat_file: Path, fake_cli: Path
) -> None:
    for cmd in (["serve", str(run_dir)], ["eval", str(run_dir), "--data", str(chat_file)]):
        result = invoke(*cmd, "--template", "qwen3")
        assert result.exit_code == 2, result.output
        assert "trained with template 'qwen', not 'qwen3'" in result.output
    assert read_calls(fake_cli) == []
