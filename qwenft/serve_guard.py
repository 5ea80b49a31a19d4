"""The guard in front of `qwenft serve`'s server: who may call it and how much one client may ask.

Both backends (LLaMA-Factory's API, llama-cpp-python's server) add
`CORSMiddleware(allow_origins=["*"], allow_credentials=True, ...)` and accept any `Host` header,
so a server on loopback without a key is open to every web page the user opens (a cross-origin
`fetch` may read the answers) and to DNS rebinding (a page whose own name resolves to 127.0.0.1).
`ServeGuard`, one ASGI middleware that qwenft.serve installs outside everything but its request
log, closes that and bounds the work one client can cause:

- Host: a request whose `Host` is not the bound address, `localhost` or a name given with
  `--allowed-host` gets a 403 (host_not_allowed). Bound to a wildcard (0.0.0.0, ::), any IP
  address is also accepted: an address cannot be rebound, only a name can.
- Origin: a request from a browser page of another origin gets a 403 (origin_not_allowed), its
  preflight too, unless the origin is named with `--cors-origin` (or `*`). The backends' own CORS
  headers are stripped from every response; an allowed origin gets `Access-Control-Allow-Origin`
  for itself (never with credentials: the API takes a Bearer key, not cookies).
- The key: compared in constant time (`key_matches`), before the backend sees the request.
- Limits: a body over `--max-body-mb` gets a 413 as soon as its Content-Length or the bytes read
  so far say so; `max_tokens` over `--max-tokens` or more than `--max-messages` messages a 400;
  POST requests beyond `--max-concurrent` generating and `--max-queue` waiting a 429 with
  `Retry-After`; a request still running after `--request-timeout` seconds (its wait included) a
  504, or the end of its stream.

`GUARD_OPTIONS` is the table of serve's options for all this (cli.common.guard_options makes them,
`GuardSettings.from_options` checks them, `summary` prints them); the settings reach the server's
process as JSON in the environment (GUARD_ENV), the key as API_KEY. Standard library only: the
command line imports this module.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qwenft.errors import QwenftError
from qwenft.knobs import AT_LEAST_ZERO, POSITIVE, POSITIVE_WHOLE, Rule

GUARD_ENV = "QWENFT_SERVE_GUARD"  # the server's GuardSettings, as JSON
KEY_ENV = "QWENFT_API_KEY"  # where qwenft reads the key from (the printed curl line too)
MB = 2**20


@dataclass(frozen=True)
class GuardOption:
    """One option of `qwenft serve`'s guard: the GuardSettings field and Typer parameter, the
    option, its type, default, help, the rule a value must pass and how a summary shows it."""

    param: str
    option: str
    type: Any
    default: Any
    help: str
    rule: Rule | None = None
    show: str = "{}"  # the value in the summary printed at start

    @property
    def help_text(self) -> str:
        """The help with the default (--help)."""
        return f"{self.help} Default: {f'{self.default:g}' if self.default != () else 'none'}."


GUARD_OPTIONS = (
    GuardOption(
        "cors_origins",
        "--cors-origin",
        list[str],
        (),
        "A web page origin (scheme://host[:port]) whose scripts may call the API from a browser "
        "(repeatable); '*' allows every page (warned about without --api-key).",
    ),
    GuardOption(
        "allowed_hosts",
        "--allowed-host",
        list[str],
        (),
        "Another name clients reach the server by (the Host header, e.g. a proxy's), besides the "
        "bound address and localhost (repeatable); other names get a 403 (DNS rebinding).",
    ),
    GuardOption(
        "max_body_mb",
        "--max-body-mb",
        float,
        16.0,
        "Largest request body in MB (images count); bigger ones get a 413.",
        POSITIVE("e.g. --max-body-mb 16"),
        "body {:g} MB",
    ),
    GuardOption(
        "max_tokens",
        "--max-tokens",
        int,
        4096,
        "Most tokens one request may ask for (max_tokens above it: 400).",
        POSITIVE_WHOLE("e.g. --max-tokens 4096"),
        "max_tokens {}",
    ),
    GuardOption(
        "max_messages",
        "--max-messages",
        int,
        256,
        "Most messages in one request (more: 400).",
        POSITIVE_WHOLE("e.g. --max-messages 256"),
        "{} messages",
    ),
    GuardOption(
        "max_concurrent",
        "--max-concurrent",
        int,
        1,
        "Requests generating at once.",
        POSITIVE_WHOLE("e.g. --max-concurrent 1"),
        "{} generating",
    ),
    GuardOption(
        "max_queue",
        "--max-queue",
        int,
        16,
        "Requests waiting for their turn; beyond them a 429 with Retry-After.",
        AT_LEAST_ZERO("e.g. --max-queue 16"),
        "{} waiting (then 429)",
    ),
    GuardOption(
        "request_timeout",
        "--request-timeout",
        float,
        600.0,
        "Seconds one request may take, its wait included (then 504, or its stream ends).",
        POSITIVE("e.g. --request-timeout 600"),
        "{:g} s per request",
    ),
)
_BY_PARAM = {o.param: o for o in GUARD_OPTIONS}


@dataclass(frozen=True)
class GuardSettings:
    """What the guard enforces (defaults: GUARD_OPTIONS). `host` is the bound address;
    `default_tokens` the backend's own reply length for a chat request without max_tokens (when
    it is above max_tokens, such a request is given max_tokens; 0: unknown, never)."""

    host: str = "127.0.0.1"
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_body_mb: float = _BY_PARAM["max_body_mb"].default
    max_tokens: int = _BY_PARAM["max_tokens"].default
    max_messages: int = _BY_PARAM["max_messages"].default
    max_concurrent: int = _BY_PARAM["max_concurrent"].default
    max_queue: int = _BY_PARAM["max_queue"].default
    request_timeout: float = _BY_PARAM["request_timeout"].default
    default_tokens: int = 0

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * MB)

    @classmethod
    def from_options(cls, values: Mapping[str, Any], host: str = "127.0.0.1") -> GuardSettings:
        """The settings from serve's options (None: the default); QwenftError for a bad value."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - set(_BY_PARAM)
        if unknown:
            raise ValueError(f"not guard options: {sorted(unknown)}")
        for param, value in given.items():
            opt = _BY_PARAM[param]
            if opt.rule is not None and not opt.rule.test(value):
                raise QwenftError(
                    f"{opt.option} must be {opt.rule.must} (got {value:g})", opt.rule.hint
                )
        origins = tuple(_checked_origin(o) for o in given.get("cors_origins") or ())
        hosts = tuple(_checked_host(h) for h in given.get("allowed_hosts") or ())
        rest = {k: v for k, v in given.items() if k not in ("cors_origins", "allowed_hosts")}
        return cls(
            host=host,
            cors_origins=tuple(dict.fromkeys(origins)),
            allowed_hosts=tuple(dict.fromkeys(hosts)),
            **rest,
        )

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> GuardSettings:
        """The settings qwenft serve gave the server (GUARD_ENV); the defaults without it."""
        raw = os.getenv(GUARD_ENV)
        if not raw:
            return cls(host=os.getenv("API_HOST", "127.0.0.1"))
        data = json.loads(raw)
        for key in ("cors_origins", "allowed_hosts"):
            data[key] = tuple(data.get(key) or ())
        return cls(**data)

    def host_names(self) -> frozenset[str]:
        """The Host names accepted by name: the bound address, localhost, --allowed-host."""
        bound = self.host.strip("[]").lower()
        names = {bound, "localhost", *(h.lower() for h in self.allowed_hosts)}
        if bound in ("localhost", "localhost."):
            names |= {"127.0.0.1", "::1"}
        return frozenset(names - {""})

    @property
    def wildcard(self) -> bool:
        """Bound to every interface: clients may use any of the machine's addresses."""
        return self.host.strip("[]") in ("0.0.0.0", "::", "")

    def summary(self, api_key: str | None) -> list[str]:
        """What is enforced, with the options that change it (printed when serve starts)."""
        origins = ", ".join(self.cors_origins) or "none, same-origin only"
        names = sorted(self.host_names()) + (["any IP address"] if self.wildcard else [])
        numbers = [o for o in GUARD_OPTIONS if o.rule is not None]
        limits = ", ".join(o.show.format(getattr(self, o.param)) for o in numbers)
        lines = [
            f"browser origins allowed (--cors-origin): {origins}; Host names (--allowed-host): "
            f"{', '.join(names)}",
            f"limits: {limits} ({', '.join(o.option for o in numbers)})",
        ]
        if "*" in self.cors_origins and not api_key:
            lines.append(
                "warning: --cors-origin '*' without an API key: every web page you open in a "
                "browser can send prompts to this model and read its answers; pass --api-key "
                f"(or set {KEY_ENV}) to require a key"
            )
        return lines


DEFAULT_GUARD = GuardSettings()

_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[^/?#:@\s\[\]]+)(?::(?P<port>\d{1,5}))?/?",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normal_origin(text: str) -> str | None:
    """An origin as a browser sends it (scheme://host[:port], lower case, no default port), or
    None when text is not one (e.g. "null", a URL with a path)."""
    m = _ORIGIN.fullmatch(text.strip())
    if not m:
        return None
    scheme, host, port = m["scheme"].lower(), m["host"].lower(), m["port"]
    if port and port == _DEFAULT_PORTS.get(scheme):
        port = None
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _checked_origin(text: str) -> str:
    if text.strip() == "*":
        return "*"
    origin = normal_origin(text)
    if origin is None:
        raise QwenftError(
            f"--cors-origin {text!r} is not an origin",
            "give a page's scheme, host and port, e.g. --cors-origin http://localhost:3000 (no "
            "path), or '*' for every page",
        )
    return origin


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?", re.I)


def _checked_host(text: str) -> str:
    name = text.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(name):
        raise QwenftError(
            f"--allowed-host {text!r} is not a host name",
            "give the name alone, without scheme or port, e.g. --allowed-host myproxy.lan",
        )
    return name.rstrip(".")


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without port or trailing dot ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if ":" in header else header.rstrip(".")


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an Authorization header (decoded as latin-1, as ASGI servers hand it over)
    carries `Bearer api_key`, compared in constant time."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("latin-1", "replace"), api_key.encode()
    )


def error_body(
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
) -> dict:
    """The OpenAI error object (openai clients show error.message)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON response."""
    data = json.dumps(body, ensure_ascii=False).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


class TooLarge(Exception):
    """A request body over the limit (read no further)."""


async def read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """A request's whole body (None when the client went away); TooLarge as soon as more than
    `limit` bytes have come."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise TooLarge(size)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(raw: bytes, receive: Receive) -> Receive:
    """An ASGI receive that hands over the body already read, then defers to receive."""
    replayed = False

    async def again() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return again


def check_limits(body: Any, settings: GuardSettings) -> tuple[str, str] | None:
    """(message, param) when a request asks for more than the server gives, else None."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        return (
            f"the request has {len(messages)} messages; this server takes at most "
            f"{settings.max_messages} (qwenft serve --max-messages)",
            "messages",
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value > settings.max_tokens:
                return (
                    f"'{key}' is {value:g}; this server gives at most {settings.max_tokens} "
                    "tokens per request (qwenft serve --max-tokens)",
                    key,
                )
    return None


PREFLIGHT_METHODS = b"GET, POST, OPTIONS"
PREFLIGHT_HEADERS = b"authorization, content-type"
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


class ServeGuard:
    """ASGI middleware (outside the backend's app and its CORS middleware; see the module)."""

    def __init__(
        self, app: Any, settings: GuardSettings | None = None, api_key: str | None = None
    ) -> None:
        self.app = app
        if settings is None:  # in the server: what qwenft serve put in the environment
            settings, api_key = GuardSettings.from_env(), os.getenv("API_KEY") or None
        self.settings, self.api_key = settings, api_key
        self.names = settings.host_names()
        self.origins = {o for o in settings.cors_origins if o != "*"}
        self.any_origin = "*" in settings.cors_origins
        self.admitted = 0  # POST requests generating or waiting
        self.took_s = 1.0  # a running mean of a request's time, for Retry-After
        self._slots: Any = None  # an asyncio.Semaphore, made in the server's event loop

    # -- who may call ------------------------------------------------------------------------------

    def host_allowed(self, header: str | None) -> bool:
        if not header:
            return False
        name = host_name(header)
        if name in self.names:
            return True
        if self.settings.wildcard:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def allowed_origin(self, origin: str, host: str) -> str | None:
        """The Access-Control-Allow-Origin value for a request from origin ("*" or the origin
        itself), or None when that origin is refused. A page of this server itself
        (same origin) is allowed."""
        norm = normal_origin(origin)
        if norm is not None and (norm in self.origins or norm == normal_origin(f"http://{host}")):
            return origin
        return "*" if self.any_origin else None

    # -- the middleware -------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host", "")
        if not self.host_allowed(host):
            await send_json(
                send,
                403,
                error_body(
                    f"this server does not answer to the host name {host_name(host)!r} (Host "
                    "header); it answers to "
                    f"{', '.join(sorted(self.names))} (qwenft serve --allowed-host NAME adds one)",
                    code="host_not_allowed",
                ),
            )
            return
        origin = headers.get("origin")
        allow = None
        if origin is not None:
            allow = self.allowed_origin(origin, host)
            if allow is None:
                await send_json(
                    send,
                    403,
                    error_body(
                        f"cross-origin requests from {origin!r} are refused (qwenft serve "
                        "--cors-origin ORIGIN allows a page's origin)",
                        code="origin_not_allowed",
                    ),
                )
                return
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await self._preflight(send, allow, headers)
                return
        send = _cors_send(send, allow)
        if self.api_key and not key_matches(headers.get("authorization"), self.api_key):
            await send_json(
                send,
                401,
                error_body(
                    "invalid or missing API key: send the header Authorization: Bearer KEY",
                    code="invalid_api_key",
                ),
            )
            return
        limit = self.settings.max_body
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            await self._too_large(send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            raw = await read_body(receive, limit)
        except TooLarge:
            await self._too_large(send)
            return
        if raw is None:
            return
        raw = await self._checked(scope, raw, send)
        if raw is not None:
            await self._admitted(scope, replay(raw, receive), send)

    async def _checked(self, scope: dict[str, Any], raw: bytes, send: Send) -> bytes | None:
        """The body to pass on (max_tokens added where needed), or None once refused (400)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return raw  # the backend's own checks answer it
        problem = check_limits(body, self.settings)
        if problem:
            await send_json(send, 400, error_body(*problem))
            return None
        s = self.settings
        if (
            isinstance(body, dict)
            and scope["path"].rstrip("/").endswith("/chat/completions")
            and body.get("max_tokens") is None
            and body.get("max_completion_tokens") is None
            and s.default_tokens > s.max_tokens
        ):
            body["max_tokens"] = s.max_tokens
            return json.dumps(body, ensure_ascii=False).encode()
        return raw

    async def _admitted(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Run the request when a slot is free (within the queue and the timeout), else 429."""
        import asyncio  # here: the command line imports this module

        s = self.settings
        if self._slots is None:
            self._slots = asyncio.Semaphore(s.max_concurrent)
        if self.admitted >= s.max_concurrent + s.max_queue:
            wait = self.retry_after()
            await send_json(
                send,
                429,
                error_body(
                    f"the server is busy: {self.admitted} requests are generating or waiting "
                    f"(qwenft serve --max-concurrent {s.max_concurrent}, --max-queue "
                    f"{s.max_queue}); retry in {wait} s",
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                ),
                [(b"retry-after", str(wait).encode())],
            )
            return
        started = ended = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        async def run() -> None:
            async with self._slots:
                begun = time.monotonic()
                try:
                    await self.app(scope, receive, tracked)
                finally:
                    self.took_s = 0.7 * self.took_s + 0.3 * (time.monotonic() - begun)

        self.admitted += 1
        try:
            await asyncio.wait_for(run(), s.request_timeout)
        except asyncio.TimeoutError:
            if not started:
                await send_json(
                    send,
                    504,
                    error_body(
                        f"the request took more than {s.request_timeout:g} s (qwenft serve "
                        "--request-timeout)",
                        kind="server_error",
                        code="timeout",
                    ),
                )
            elif not ended:  # a stream: end it where it is
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.admitted -= 1

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free (a running mean of request times)."""
        s = self.settings
        ahead = max(1, self.admitted - s.max_concurrent + 1)
        return int(min(max(1, math.ceil(self.took_s * ahead / s.max_concurrent)), 600))

    async def _preflight(self, send: Send, allow: str, headers: dict[str, str]) -> None:
        asked = headers.get("access-control-request-headers", "").encode("latin-1").strip()
        head = [
            (b"access-control-allow-origin", allow.encode("latin-1")),
            (b"access-control-allow-methods", PREFLIGHT_METHODS),
            (
                b"access-control-allow-headers",
                asked if _HEADER_LIST.fullmatch(asked) else PREFLIGHT_HEADERS,
            ),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": head})
        await send({"type": "http.response.body", "body": b""})

    async def _too_large(self, send: Send) -> None:
        await send_json(
            send,
            413,
            error_body(
                f"the request body is over {self.settings.max_body_mb:g} MB (qwenft serve "
                "--max-body-mb)",
                code="request_too_large",
            ),
        )


def _cors_send(send: Send, allow: str | None) -> Send:
    """send, with the backend's Access-Control-* headers replaced by the guard's own (none when
    allow is None)."""

    async def cors(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            head = [
                (k, v)
                for k, v in message.get("headers") or []
                if not k.lower().startswith(b"access-control-")
            ]
            if allow is not None:
                head += [
                    (b"access-control-allow-origin", allow.encode("latin-1")),
                    (b"access-control-expose-headers", b"Retry-After"),
                    (b"vary", b"Origin"),
                ]
            message = {**message, "headers": head}
        await send(message)

    return cors
