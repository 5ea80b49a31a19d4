"""qwenft serve's guard (qwenft/serve_guard.py): browser origins, Host names, the key and the limits,
on a small ASGI app behind the same permissive CORS middleware both backends add. The real servers
(both backends, over HTTP) are checked in test_serve_eval.py and test_export.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from qwenft.errors import QwenftError
from qwenft.serve_guard import (
    GUARD_ENV,
    GuardSettings,
    ServeGuard,
    host_name,
    key_matches,
    normal_origin,
)
from tests.helpers.cli import invoke

EVIL = "https://evil.example"
UI = "http://localhost:3000"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


class Backend:
    """The served app as LLaMA-Factory's and llama.cpp's are built: starlette's CORSMiddleware
    with allow_origins=["*"] and credentials around an app that answers 200 and records what
    reached it. `gate`: requests wait for it; `stream`: a first chunk, then nothing."""

    def __init__(self, gate: asyncio.Event | None = None, stream: bool = False, sleep: float = 0):
        from starlette.middleware.cors import CORSMiddleware

        self.seen: list[bytes] = []
        self.gate, self.stream, self.sleep = gate, stream, sleep
        self.app = CORSMiddleware(
            self._app,
            allow_origins=["*"],
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    async def _app(self, scope: dict, receive: Any, send: Any) -> None:
        body, more = b"", scope["method"] == "POST"
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.seen.append(body)
        if self.gate is not None:
            await self.gate.wait()
        if self.stream:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await asyncio.sleep(30)
        await asyncio.sleep(self.sleep)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})


class Reply:
    def __init__(self, sent: list[dict], received: int) -> None:
        start = sent[0]
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        self.body = b"".join(m.get("body", b"") for m in sent[1:])
        self.ended = not sent[-1].get("more_body", False)
        self.received = received  # receive() calls the guard and the app made

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        return self.json()["error"]["code"]


async def request(
    app: Any,
    method: str = "POST",
    body: object = None,
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
    host: str = "127.0.0.1:8000",
) -> Reply:
    """One request through an ASGI app; the body in `chunks` (default: one chunk of JSON)."""
    if chunks is None:
        raw = b"" if body is None else json.dumps(body).encode()
        chunks = [raw]
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if pending:
            return pending.pop(0)
        await asyncio.sleep(60)  # a client that stays connected
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    head = {"host": host, **{k.lower(): v for k, v in (headers or {}).items()}}
    scope = {
        "type": "http",
        "method": method,
        "path": CHAT,
        "headers": [(k.encode(), v.encode()) for k, v in head.items()],
    }
    await app(scope, receive, send)
    return Reply(sent, calls)


def call(app: Any, *args: Any, **kwargs: Any) -> Reply:
    return asyncio.run(request(app, *args, **kwargs))


def guarded(settings: GuardSettings | None = None, key: str | None = None, **backend: Any):
    inner = Backend(**backend)
    return ServeGuard(inner.app, settings or GuardSettings(), key), inner


def no_cors(reply: Reply) -> bool:
    return not [k for k in reply.headers if k.startswith("access-control-")]


# ------------------------------------------------------------------------------------------------
# origins and host names


def test_a_foreign_page_is_refused_preflight_and_request_and_reaches_nothing() -> None:
    guard, inner = guarded()
    preflight = call(
        guard,
        "OPTIONS",
        headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status == 403 and preflight.code == "origin_not_allowed" and no_cors(preflight)
    post = call(guard, body={"model": "m", "messages": MSGS}, headers={"Origin": EVIL})
    assert post.status == 403 and no_cors(post)
    assert f"from {EVIL!r} are refused" in post.json()["error"]["message"]
    assert "--cors-origin" in post.json()["error"]["message"]
    assert inner.seen == []
    # the backend's own CORS headers never leave, even for a client that is no browser page
    plain = call(guard, body={"model": "m", "messages": MSGS})
    assert plain.status == 200 and no_cors(plain) and plain.headers["x-app"] == "1"


@pytest.mark.parametrize(
    ("bound", "host", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1:8000", True),
        ("127.0.0.1", "localhost:8000", True),
        ("127.0.0.1", "LOCALHOST.:8000", True),
        ("127.0.0.1", "evil.example:8000", False),  # DNS rebinding: a name that resolves here
        ("127.0.0.1", "127.0.0.2:8000", False),
        ("127.0.0.1", "", False),
        ("127.0.0.1", "my-box.lan:8000", True),  # --allowed-host my-box.lan
        ("::1", "[::1]:8000", True),
        ("localhost", "127.0.0.1:8000", True),
        ("0.0.0.0", "192.168.1.20:8000", True),  # any address: an address cannot be rebound
        ("0.0.0.0", "[fe80::1]:8000", True),
        ("0.0.0.0", "evil.example", False),
    ],
)
def test_host_names(bound: str, host: str, allowed: bool) -> None:
    guard, inner = guarded(GuardSettings(host=bound, allowed_hosts=("my-box.lan",)))
    reply = call(guard, "GET", host=host)
    if allowed:
        assert reply.status == 200 and len(inner.seen) == 1
    else:
        assert reply.status == 403 and reply.code == "host_not_allowed" and inner.seen == []
        message = reply.json()["error"]["message"]
        assert "--allowed-host" in message and "localhost" in message


def test_named_origins_get_their_header_and_nothing_more() -> None:
    guard, inner = guarded(GuardSettings(cors_origins=(UI,)))
    preflight = call(
        guard,
        "OPTIONS",
        headers={
            "Origin": UI,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status == 204 and inner.seen == []
    assert preflight.headers["access-control-allow-origin"] == UI
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "access-control-allow-credentials" not in preflight.headers
    post = call(guard, body={"messages": MSGS}, headers={"Origin": UI})
    assert post.status == 200 and post.headers["access-control-allow-origin"] == UI
    assert "access-control-allow-credentials" not in post.headers  # the backend's is stripped
    assert call(guard, "GET", headers={"Origin": EVIL}).status == 403
    # a page of the server itself (same origin) needs no option
    assert call(guard, "GET", headers={"Origin": "http://127.0.0.1:8000"}).status == 200


def test_any_origin_only_when_asked_and_warned_about_without_a_key() -> None:
    settings = GuardSettings.from_options({"cors_origins": ["*"]})
    guard, _ = guarded(settings)
    reply = call(guard, "GET", headers={"Origin": EVIL})
    assert reply.status == 200 and reply.headers["access-control-allow-origin"] == "*"
    warning = [line for line in settings.summary(None) if line.startswith("warning:")]
    assert len(warning) == 1 and "every web page you open" in warning[0]
    assert "QWENFT_API_KEY" in warning[0]
    assert not [line for line in settings.summary("sk-1") if line.startswith("warning:")]
    assert not [line for line in GuardSettings().summary(None) if line.startswith("warning:")]


# ------------------------------------------------------------------------------------------------
# the key


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer sk-1", True),
        ("bearer sk-1", True),
        ("Bearer  sk-1 ", True),
        ("Bearer sk-2", False),
        ("Bearer sk-1x", False),
        ("Basic sk-1", False),
        ("sk-1", False),
        (None, False),
        ("Bearer sk-\udcff", False),  # undecodable bytes compare unequal, never raise
    ],
)
def test_key_matches(header: str | None, ok: bool) -> None:
    assert key_matches(header, "sk-1") is ok


def test_the_key_is_checked_before_the_backend_and_preflights_need_none() -> None:
    guard, inner = guarded(GuardSettings(cors_origins=(UI,)), key="sk-1")
    missing = call(guard, body={"messages": MSGS})
    assert missing.status == 401 and missing.code == "invalid_api_key" and inner.seen == []
    assert "sk-1" not in missing.body.decode()
    assert (
        call(guard, body={"messages": MSGS}, headers={"Authorization": "Bearer sk-1"}).status == 200
    )
    preflight = call(
        guard, "OPTIONS", headers={"Origin": UI, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status == 204  # a browser sends no key with a preflight


# ------------------------------------------------------------------------------------------------
# limits


def test_an_oversized_body_is_refused_without_being_read() -> None:
    guard, inner = guarded(GuardSettings(max_body_mb=1))
    by_length = call(guard, chunks=[b"x" * 1000] * 3, headers={"Content-Length": str(20 * 2**20)})
    assert by_length.status == 413 and by_length.code == "request_too_large"
    assert by_length.received == 0 and "--max-body-mb" in by_length.json()["error"]["message"]
    # no Content-Length (chunked): refused once the count passes the limit, the rest never read
    chunk = b"x" * 2**18
    streamed = call(guard, chunks=[chunk] * 80)  # 20 MB
    assert streamed.status == 413 and streamed.received == 5  # 5 x 256 KiB > 1 MiB
    assert call(guard, headers={"Content-Length": "12abc"}).status == 413
    assert inner.seen == []
    assert call(guard, chunks=[chunk, chunk]).status == 200  # 512 KiB, in two chunks
    assert inner.seen == [chunk * 2]


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"messages": MSGS, "max_tokens": 101}, "max_tokens", "at most 100 tokens"),
        ({"messages": MSGS, "max_completion_tokens": 500}, "max_completion_tokens", "--max-tokens"),
        ({"messages": MSGS * 4}, "messages", "4 messages; this server takes at most 3"),
    ],
)
def test_requests_over_the_caps_get_a_400(body: dict, param: str, needle: str) -> None:
    guard, inner = guarded(GuardSettings(max_tokens=100, max_messages=3))
    reply = call(guard, body=body)
    assert reply.status == 400 and reply.json()["error"]["param"] == param
    assert needle in reply.json()["error"]["message"] and inner.seen == []


def test_a_request_without_max_tokens_gets_the_cap_only_where_the_backend_would_give_more() -> None:
    ok = {"model": "m", "messages": MSGS * 3, "max_tokens": 100}
    for default_tokens, expected in [(4096, 100), (50, None)]:
        settings = GuardSettings(max_tokens=100, max_messages=3, default_tokens=default_tokens)
        guard, inner = guarded(settings)
        assert call(guard, body=ok).status == 200 and json.loads(inner.seen[-1]) == ok
        assert call(guard, body={"messages": MSGS}).status == 200
        assert json.loads(inner.seen[-1]).get("max_tokens") == expected
        assert call(guard, chunks=[b"{not json"]).status == 200  # the backend's checks answer it


def test_beyond_the_queue_429_with_retry_after_and_answers_again_afterwards() -> None:
    async def scenario() -> tuple[list[Reply], Reply, int]:
        gate = asyncio.Event()
        guard, inner = guarded(GuardSettings(max_concurrent=1, max_queue=4), gate=gate)
        tasks = [asyncio.create_task(request(guard, body={"messages": MSGS})) for _ in range(32)]
        while len(inner.seen) < 1 or guard.admitted < 5:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(inner.seen) == 1  # one generates, four wait
        gate.set()
        replies = await asyncio.gather(*tasks)
        return replies, await request(guard, body={"messages": MSGS}), guard.admitted

    replies, after, admitted = asyncio.run(scenario())
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] * 5 + [429] * 27
    busy = [r for r in replies if r.status == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
    assert busy[0].code == "rate_limit_exceeded" and "--max-queue 4" in busy[0].body.decode()
    assert after.status == 200 and admitted == 0


def test_a_request_over_its_time_gets_504_and_a_stream_ends() -> None:
    guard, _ = guarded(GuardSettings(request_timeout=0.2), sleep=5)
    slow = call(guard, body={"messages": MSGS})
    assert (
        slow.status == 504 and slow.code == "timeout" and "--request-timeout" in slow.body.decode()
    )
    guard, _ = guarded(GuardSettings(request_timeout=0.2), stream=True)
    cut = call(guard, body={"messages": MSGS})
    assert cut.status == 200 and cut.body == b"data: 1\n\n" and cut.ended
    assert guard.admitted == 0


# ------------------------------------------------------------------------------------------------
# the settings: options, checks, what the server is given


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("http://localhost:3000", "http://localhost:3000"),
        ("HTTP://LocalHost:3000/", "http://localhost:3000"),
        ("https://ui.example:443", "https://ui.example"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("chrome-extension://abcdef", "chrome-extension://abcdef"),
        ("null", None),
        ("http://ui.example/app", None),
        ("ui.example", None),
    ],
)
def test_normal_origin(text: str, origin: str | None) -> None:
    assert normal_origin(text) == origin


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:8000", "localhost"), ("[::1]:8000", "::1"), ("Example.COM.", "example.com")],
)
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"cors_origins": ["http://ui.example/app"]},
            "--cors-origin 'http://ui.example/app' is not an origin",
        ),
        ({"cors_origins": ["null"]}, "--cors-origin 'null' is not an origin"),
        (
            {"allowed_hosts": ["http://proxy.lan"]},
            "--allowed-host 'http://proxy.lan' is not a host name",
        ),
        ({"max_body_mb": 0}, "--max-body-mb must be positive (got 0)"),
        ({"max_tokens": 0}, "--max-tokens must be a positive whole number (got 0)"),
        ({"max_messages": -1}, "--max-messages must be a positive whole number (got -1)"),
        ({"max_concurrent": 0}, "--max-concurrent must be a positive whole number (got 0)"),
        ({"max_queue": -1}, "--max-queue must be 0 or more (got -1)"),
        ({"request_timeout": -5}, "--request-timeout must be positive (got -5)"),
    ],
)
def test_bad_options_are_refused(values: dict, error: str) -> None:
    with pytest.raises(QwenftError) as caught:
        GuardSettings.from_options(values)
    assert caught.value.message == error and caught.value.hint


def test_bad_options_exit_2_on_the_command_line_before_anything() -> None:
    result = invoke("serve", "no-such-model", "--cors-origin", "evil.example")
    assert (
        result.exit_code == 2 and "--cors-origin 'evil.example' is not an origin" in result.output
    )
    assert "hint:" in result.output and "no-such-model" not in result.output


def test_settings_reach_the_server_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = GuardSettings.from_options(
        {
            "cors_origins": [UI, "http://LOCALHOST:3000"],
            "allowed_hosts": ["Box.lan."],
            "max_queue": 0,
        },
        host="::1",
    )
    assert settings.cors_origins == (UI,) and settings.allowed_hosts == ("box.lan",)
    monkeypatch.setenv(GUARD_ENV, settings.to_env())
    monkeypatch.setenv("API_KEY", "sk-env")
    guard = ServeGuard(Backend().app)  # as the server's app builds it: from the environment
    assert guard.settings == settings and guard.api_key == "sk-env"
    monkeypatch.setenv("API_KEY", "")
    assert ServeGuard(Backend().app).api_key is None  # qwenft's "no key"
    summary = "\n".join(GuardSettings().summary(None))
    for shown in (
        "none, same-origin only",
        "127.0.0.1, localhost",
        "body 16 MB",
        "max_tokens 4096",
        "256 messages",
        "1 generating",
        "16 waiting (then 429)",
        "600 s per request",
    ):
        assert shown in summary, shown
