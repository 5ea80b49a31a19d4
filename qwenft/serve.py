"""`qwenft serve`: LLaMA-Factory's OpenAI-compatible API (`llamafactory-cli api`) for a run or model.

plan_serve() checks everything (target, host/key, port) and renders the config without writing
anything; execute_serve() writes serve.yaml, starts the server under the launcher's supervisor (a
killed `qwenft serve` leaves no server behind: the port is free again within seconds), waits until
GET /v1/models answers, prints the base URL and a ready curl line, and on Ctrl-C / SIGTERM / SIGHUP
stops the server before returning. The server's own output goes to its log (RUN/serve.log, or
QWENFT_HOME/logs/serve-NAME.log for a model that is not a run; `-v` streams it too); the terminal
gets one line per request (RequestLog, RequestLines).

The server is LLaMA-Factory's own (`llamafactory-cli api`), started through this module
(`python -m qwenft.serve CLI api YAML`, see `guarded_api`), which adds request checks to its app:
an invalid request (malformed JSON, no messages, `max_tokens` <= 0, a prompt longer than the
model's context) gets a 400 with an OpenAI-style error body naming the problem, never a 500 with a
traceback; a model name other than the served one gets OpenAI's 404 (code model_not_found), on
llama.cpp's server too (`python -m qwenft.serve llama_cpp.server ARGS`). The checks themselves
(`check_chat_request`, `check_model`, `check_context`) are pure functions.

In front of either backend's app, outside its own CORS middleware, sits qwenft.serve_guard's
ServeGuard (installed with the checks): no browser page of another origin (unless named with
--cors-origin) and no Host name but the bound address, localhost or an --allowed-host reaches the
model (a DNS-rebinding page would otherwise), the key is compared in constant time, and a request
body, max_tokens, the messages, the requests at once and the time per request are bounded. Its
settings travel to the server as JSON in QWENFT_SERVE_GUARD; the key only ever in API_KEY (the
printed curl line reads it from $QWENFT_API_KEY).

Tool calls (docs/agents.md): LLaMA-Factory's API already answers a request with `tools` with
`tool_calls` (finish_reason "tool_calls", arguments as a JSON string) when the run's template finds
them in the reply. The wrapper fills two gaps so a standard OpenAI client's loop works: the
`role: "tool"` replies to one turn's calls are merged into one message in the calls' order
(matched by tool_call_id; LLaMA-Factory takes one message per turn), and the calls sent back in the
history get their arguments decoded, so the prompt shows them as the run was trained.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwenft.choices import Template
from qwenft.errors import Interrupted, JobFailed, QwenftError
from qwenft.lf import launcher as lf_launcher
from qwenft.lf import render
from qwenft.models.target import ModelTarget, refuse_reward_model, resolve_target
from qwenft.proc import launcher
from qwenft.runs.progress import surface_log
from qwenft.serve_guard import (
    GUARD_ENV,
    KEY_ENV,
    GuardSettings,
    ServeGuard,
    error_body,
    key_matches,
    read_body,
    replay,
    send_json,
)


@dataclass
class ServePlan:
    target: ModelTarget
    template: str
    run_dir: Path | None  # the run folder served, if any (serve.yaml and serve.log go there)
    host: str
    port: int
    api_key: str | None
    model_name: str
    config: dict[str, Any]
    yaml_text: str
    argv: list[str]
    env: dict[str, str]
    timeout_s: float
    backend: str = "transformers"  # LLaMA-Factory's API server; "llama.cpp": the run's GGUF
    guard: GuardSettings = field(default_factory=GuardSettings)  # origins, host names, limits

    @property
    def base_url(self) -> str:
        """The URL a client on this machine uses (a wildcard bind is reached through loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    def curl_line(self) -> str:
        """A curl command to paste; it reads the key (never shown) from $QWENFT_API_KEY."""
        body = json.dumps(
            {"model": self.model_name, "messages": [{"role": "user", "content": "Hello!"}]},
            ensure_ascii=False,
        )
        parts = [
            "curl",
            f"{self.base_url}/chat/completions",
            "-H",
            "Content-Type: application/json",
        ]
        line = " ".join(shlex.quote(p) for p in parts)
        if self.api_key:  # double quotes: the shell puts the variable in
            line += f' -H "Authorization: Bearer ${KEY_ENV}"'
        return f"{line} -d {shlex.quote(body)}"


def is_loopback(host: str) -> bool:
    """Whether host only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None) -> str:
    """Refuse a non-loopback bind without an API key (LLaMA-Factory's own default is 0.0.0.0, no key)."""
    host = host.strip().strip("[]")
    if not host:
        raise QwenftError(
            "--host must not be empty", "use 127.0.0.1 (the default) to serve this machine only"
        )
    if not is_loopback(host) and not api_key:
        raise QwenftError(
            f"refusing to serve on {host} without an API key: anyone who can reach this machine "
            "could use the model",
            "pass --api-key KEY (or set QWENFT_API_KEY), or keep the default --host 127.0.0.1",
        )
    return host


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> int:
    """port (a free one for 0), if this process could bind host:port now; QwenftError otherwise."""
    if not 0 <= port <= 65535:
        raise QwenftError(f"--port must be between 1 and 65535 (got {port})", "the default is 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise QwenftError(
            f"cannot resolve --host {host}: {exc.strerror}", "pass an IP address such as 127.0.0.1"
        ) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except PermissionError:
            raise QwenftError(
                f"no permission to bind {host}:{port}", "use a port above 1023"
            ) from None
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise QwenftError(
                    f"port {port} on {host} is already in use",
                    f"stop what listens there, or pass another free port, e.g. --port {free_port(host)}",
                ) from None
            raise QwenftError(
                f"cannot bind {host}:{port}: {exc.strerror or exc}",
                "pass an address of this machine, e.g. 127.0.0.1",
            ) from None
        return int(s.getsockname()[1]) if port == 0 else port


def resolve_serve_target(
    spec: str, adapter: Path | None = None, template: str | None = None, force: bool = False
) -> tuple[ModelTarget, str, Path | None]:
    """The model (and adapter) to serve, its template, and its run folder when spec is one.

    A --template other than the run's trained one is refused unless force."""
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise QwenftError(
            f"{spec} is a file, not a model or run folder",
            "pass a run folder made by `qwenft train`, a model folder, or a preset",
        )
    target = resolve_target(spec, adapter, template, force)  # QwenftError: neither run nor model
    refuse_reward_model(target, "serve chat completions")
    return target, target.template, target.run_dir


def model_name_for(spec: str, run_dir: Path | None) -> str:
    """The id /v1/models reports: the run folder's or model's name."""
    if run_dir is not None:
        return run_dir.name
    return Path(spec.rstrip("/")).name or spec


def build_serve_config(target: ModelTarget, template: str) -> dict[str, Any]:
    """The `llamafactory-cli api` config: model, adapter, template and system prompt of the run."""
    cfg: dict[str, Any] = {"model_name_or_path": target.model_path}
    if target.adapter_path:
        cfg["adapter_name_or_path"] = target.adapter_path
        cfg["finetuning_type"] = "lora"
    cfg.update(template=template, default_system=target.system, infer_backend="huggingface")
    if target.enable_thinking is not None:
        cfg["enable_thinking"] = target.enable_thinking
    return cfg


VISION_ENV = "QWENFT_SERVE_VISION"  # 1: the served model takes images (check_image_parts)
LOCAL_FILES_ENV = "QWENFT_SERVE_LOCAL_FILES"  # 1: on loopback, local image paths may be read


def _has_images(body: dict[str, Any]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") == "image_url"
        for m in body.get("messages") or []
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
    )


def build_serve_command(
    cli: str,
    yaml_path: Path,
    host: str,
    port: int,
    api_key: str | None,
    model_name: str,
    model_kind: str,
    vision: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for `llamafactory-cli api`. API_KEY is always set (empty = no key) so a
    key in the caller's environment never silently applies."""
    env = {
        **lf_launcher.offline_env(model_kind),
        "API_HOST": host,
        "API_PORT": str(port),
        "API_KEY": api_key or "",
        "API_MODEL_NAME": model_name,
        VISION_ENV: "1" if vision else "0",
        LOCAL_FILES_ENV: "1" if is_loopback(host) else "0",
    }
    return [cli, "api", str(yaml_path)], env


def plan_serve(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    adapter: Path | None = None,
    timeout_s: float = 300.0,
    template: str | None = None,
    force: bool = False,
    backend: str = "transformers",
    guard: GuardSettings | None = None,
) -> ServePlan:
    """Check every input and render the config; raise QwenftError (writing nothing) otherwise.
    `guard`: origins, host names and limits (serve_guard; the bound host is filled in here)."""
    host = check_host(host, api_key)
    if timeout_s <= 0:
        raise QwenftError(f"--timeout must be positive (got {timeout_s})")
    if backend not in SERVE_BACKENDS:
        raise QwenftError(
            f"unknown --backend {backend!r}", f"choose one of {', '.join(SERVE_BACKENDS)}"
        )
    target, template, run_dir = resolve_serve_target(spec, adapter, template, force)
    port = check_port(host, port)
    model_name = model_name_for(spec, run_dir)
    guard = guard or GuardSettings()
    if backend == "llama.cpp":
        guard = replace(guard, host=host, default_tokens=LLAMACPP_CONTEXT)
        return _plan_llamacpp(
            target, template, run_dir, host, port, api_key, model_name, timeout_s, guard
        )
    guard = replace(guard, host=host, default_tokens=LF_DEFAULT_NEW_TOKENS)
    cli = lf_launcher.find_llamafactory_cli()
    config = build_serve_config(target, template)
    yaml_text = render.to_yaml(config, header=f"qwenft serve {target.source}")
    yaml_path = (run_dir or Path("<temp>")) / "serve.yaml"
    argv, env = build_serve_command(
        cli,
        yaml_path,
        host,
        port,
        api_key,
        model_name,
        target.model_kind,
        vision=Template(template).vision,
    )
    env[GUARD_ENV] = guard.to_env()
    env["MAX_CONCURRENT"] = str(guard.max_concurrent)  # LLaMA-Factory's engine: at once
    return ServePlan(
        target,
        template,
        run_dir,
        host,
        port,
        api_key,
        model_name,
        config,
        yaml_text,
        argv,
        env,
        timeout_s,
        guard=guard,
    )


SERVE_BACKENDS = ("transformers", "llama.cpp")
LLAMACPP_CONTEXT = 4096
# LLaMA-Factory's reply length for a request without max_tokens (GeneratingArguments.max_new_tokens)
LF_DEFAULT_NEW_TOKENS = 1024


def _plan_llamacpp(
    target: ModelTarget,
    template: str,
    run_dir: Path | None,
    host: str,
    port: int,
    api_key: str | None,
    model_name: str,
    timeout_s: float,
    guard: GuardSettings,
) -> ServePlan:
    """`qwenft serve --backend llama.cpp`: llama-cpp-python's OpenAI-compatible server over the
    run's GGUF export (its chat template is the one the export embedded and verified). The key
    goes in the environment (API_KEY), never on the command line."""
    from qwenft.models.llamacpp import require_llama_cpp
    from qwenft.runs.gguf import exported_gguf

    gguf = exported_gguf(run_dir, target.manifest)
    require_llama_cpp("--backend llama.cpp")
    config = {"model": str(gguf), "model_alias": model_name, "n_ctx": LLAMACPP_CONTEXT}
    argv = [sys.executable, "-m", "llama_cpp.server", "--host", host, "--port", str(port)]
    argv += [f"--{k}={v}" for k, v in config.items()] + ["--verbose=False"]
    env = {"API_MODEL_NAME": model_name, **({"API_KEY": api_key} if api_key else {})}
    # llama_cpp.server lets HOST and PORT in the environment override --host and --port
    env.update(HOST=host, PORT=str(port))
    env[GUARD_ENV] = guard.to_env()
    return ServePlan(
        target,
        template,
        run_dir,
        host,
        port,
        api_key,
        model_name,
        config,
        render.to_yaml(config, header=f"qwenft serve --backend llama.cpp {gguf.name}"),
        argv,
        env,
        timeout_s,
        backend="llama.cpp",
        guard=guard,
    )


PROBE_AGENT = "qwenft-ready-probe"  # RequestLog leaves qwenft's own readiness probes out


def probe(url: str, api_key: str | None, timeout_s: float = 2.0) -> int | None:
    """The HTTP status of GET url (None when nothing answers); never through a proxy."""
    headers = {"User-Agent": PROBE_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_ready(
    proc: launcher.Process,
    url: str,
    api_key: str | None,
    timeout_s: float,
    progress: Callable[[str], None],
    every_s: float = 10.0,
    poll_s: float = 0.5,
) -> float:
    """Poll url until it answers 200; return the seconds it took. Raises when the server exits,
    a signal arrives (Interrupted) or timeout_s passes (JobFailed; the server is stopped)."""
    started = time.monotonic()
    next_note = started + every_s
    while True:
        if proc.signalled is not None:
            raise Interrupted("stopped before the server was ready")
        code = proc.poll()
        if code is not None:
            raise JobFailed(
                f"the server exited with code {code} before it was ready", returncode=code or 1
            )
        status = probe(url, api_key)
        if status == 200:
            return time.monotonic() - started
        if status == 401:
            raise JobFailed(f"the server at {url} refused qwenft's own API key (401)")
        now = time.monotonic()
        if now - started > timeout_s:
            raise JobFailed(
                f"the server did not answer within {timeout_s:.0f} s",
                "a large model may need longer: pass --timeout SECONDS",
            )
        if now >= next_note:
            progress(f"waiting for the server to load the model ... {now - started:.0f} s")
            next_note = now + every_s
        time.sleep(poll_s)


def serve_log_path(plan: ServePlan) -> Path:
    """Where the server's whole output goes: RUN/serve.log for a run; for a model that is not a
    run, QWENFT_HOME/logs/serve-NAME.log (appended to, one server after another)."""
    if plan.run_dir is not None:
        return plan.run_dir / "serve.log"
    from qwenft.paths import qwenft_home

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in plan.model_name) or "model"
    return qwenft_home() / "logs" / f"serve-{name}.log"


def execute_serve(
    plan: ServePlan,
    progress: Callable[[str], None] = print,
    announce: Callable[[str], None] = print,
    verbose: bool = False,
) -> dict[str, Any]:
    """Write serve.yaml, start the server, wait until it answers, serve until Ctrl-C / SIGTERM.

    The server's output (LLaMA-Factory's or llama.cpp's INFO lines, uvicorn's access log) goes to
    serve_log_path(plan) only (to stderr too when `verbose`); the terminal gets what is served,
    where, and one line per request (RequestLog: method, path, status, time) on stderr.

    Returns how it ended ({"stopped_by": signal name, ...}). JobFailed when the server fails to
    start or exits on its own; Interrupted when stopped before it was ready.
    """
    plan.target.ensure_built(progress)
    temp_dir = None
    log_path = serve_log_path(plan)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if plan.run_dir is not None:
        yaml_path = plan.run_dir / "serve.yaml"
    else:
        temp_dir = Path(tempfile.mkdtemp(prefix="qwenft-serve-"))
        yaml_path = temp_dir / "serve.yaml"
    if plan.backend == "llama.cpp":
        argv = guarded_argv(plan.argv[2:])  # python -m qwenft.serve llama_cpp.server ARGS
        if not plan.api_key:  # no key asked for: one inherited from the environment must not apply
            os.environ.pop("API_KEY", None)
    else:
        argv = guarded_argv([*plan.argv[:-1], str(yaml_path)])
    echo = RequestLines(sys.stderr.buffer, verbose)
    try:
        from qwenft.fsutil import atomic_write_text

        atomic_write_text(yaml_path, plan.yaml_text)
        what = plan.config["model"] if plan.backend == "llama.cpp" else plan.target.source
        progress(f"serving {what} (template {plan.template}, {plan.backend})")
        progress(f"launching: {launcher.format_command(argv, _shown_env(plan.env))}")
        progress(f"log: {log_path}" + ("" if verbose else " (-v shows it here too)"))
        for line in plan.guard.summary(plan.api_key):
            progress(line)
        with launcher.start(argv, plan.env, log_path, cwd=plan.run_dir, echo=echo) as proc:
            try:
                took = wait_ready(
                    proc, f"{plan.base_url}/models", plan.api_key, plan.timeout_s, progress
                )
            except JobFailed as exc:
                proc.close()  # the whole log is written before it is read
                if not verbose:
                    surface_log(log_path, progress)
                exc.hint = exc.hint or f"read the log: {log_path}"
                raise
            where = "every interface" if not is_loopback(plan.host) else "this machine only"
            key = "Bearer key required" if plan.api_key else "no key"
            announce(
                f"ready in {took:.0f} s: {plan.base_url} (model {plan.model_name!r}, {where}, {key})"
            )
            announce(plan.curl_line())
            if plan.api_key:
                progress(
                    f"the curl line reads the key from ${KEY_ENV}: set it in the client's shell"
                )
            announce("press Ctrl-C to stop")
            progress("one line per request (time, method, path, status, seconds) follows")
            code = proc.wait()
            if proc.signalled is None:
                proc.close()
                if not verbose:
                    surface_log(log_path, progress)
                raise JobFailed(
                    f"the server exited on its own with code {code}",
                    f"read the log: {log_path}",
                    returncode=code or 1,
                )
            import signal

            stopped_by = signal.Signals(proc.signalled).name
        progress(f"server stopped ({stopped_by}); no processes left")
        return {"stopped_by": stopped_by, "base_url": plan.base_url, "log": str(log_path)}
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _shown_env(env: dict[str, str]) -> dict[str, str]:
    """The environment as printed: the key itself is never echoed into logs."""
    return {k: ("***" if k == "API_KEY" and v else v) for k, v in env.items()}


# --------------------------------------------------------------------------------------------------
# one line per request: RequestLog (in the server) writes it into the server's output, marked;
# RequestLines (in qwenft) shows the marked lines on the terminal and the rest only in the log

REQUEST_MARK = "qwenft-request: "


class RequestLines:
    """The `echo` of the server's output (its log gets all of it): with `verbose` all of it goes
    to `out` (a binary stream), else only RequestLog's lines, without their mark."""

    def __init__(self, out: Any, verbose: bool = False) -> None:
        self.out, self.verbose = out, verbose
        self._pending = b""

    def write(self, data: bytes) -> int:
        if self.verbose:
            self.out.write(data)
            return len(data)
        *lines, self._pending = (self._pending + data).split(b"\n")
        mark = REQUEST_MARK.encode()
        for line in lines:
            at = line.find(mark)  # a line may carry a log prefix or a carriage return before it
            if at >= 0:
                self.out.write(line[at + len(mark) :].rstrip() + b"\n")
        return len(data)

    def flush(self) -> None:
        self.out.flush()


class RequestLog:
    """ASGI middleware (outermost): after each HTTP request, one line in the server's output:
    REQUEST_MARK, the time, method, path, status and seconds until the response ended (a stream's
    last chunk). qwenft's own readiness probes (PROBE_AGENT) are left out."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        agent = dict(scope.get("headers") or []).get(b"user-agent", b"").decode("latin-1")
        if agent == PROBE_AGENT:
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 0

        async def timed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            took = time.monotonic() - started
            line = (
                f"{REQUEST_MARK}{time.strftime('%H:%M:%S')} {scope['method']} {scope['path']} "
                f"{status or '-'} {took:.2f} s\n"
            )
            os.write(sys.stdout.fileno(), line.encode())  # one write: never split by other output


# --------------------------------------------------------------------------------------------------
# request checks: 400 with a clear message for what LLaMA-Factory would answer with a 500 (or 422)


class Problem(tuple):
    """What is wrong with a request: (message, param), and the HTTP status and OpenAI error code
    it is answered with (400 and no code, unless said otherwise)."""

    status: int
    code: str | None

    def __new__(
        cls, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> Problem:
        self = super().__new__(cls, (message, param))
        self.status, self.code = status, code
        return self

    @property
    def message(self) -> str:
        return str(self[0])

    @property
    def param(self) -> str | None:
        return self[1]


def check_model(body: dict[str, Any], served_model: str, required: bool = True) -> Problem | None:
    """A request for another model than the served one gets OpenAI's answer: 404, code
    model_not_found (openai clients raise NotFoundError); a missing model a 400 when required."""
    model = body.get("model")
    if model is None and not required:
        return None
    if not isinstance(model, str) or not model:
        return Problem(f"'model' is required: this server serves {served_model!r}", "model")
    if model != served_model:
        return Problem(
            f"unknown model {model!r}: this server serves {served_model!r} (GET /v1/models)",
            "model",
            status=404,
            code="model_not_found",
        )
    return None


def _is_positive_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and value > 0


def check_chat_request(body: Any, served_model: str) -> tuple[str, str | None] | None:
    """(message, param) when a /v1/chat/completions body is invalid, None when it may go on.

    Checks what LLaMA-Factory does not (or answers with a 500 or 422): the body is an object, `model`
    names the served model (the one GET /v1/models lists; another one is a 404, see check_model),
    `messages` is a non-empty list of objects with a role, `max_tokens` and `n` are positive
    integers."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object", None
    problem = check_model(body, served_model)
    if problem:
        return problem
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects", "messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{i}] must be an object with a 'role' and a 'content'", "messages"
    for key in ("max_tokens", "n"):
        if body.get(key) is not None and not _is_positive_int(body[key]):
            return f"'{key}' must be a positive integer (got {body[key]!r})", key
    return None


# Images in a request (vision-language models): what LLaMA-Factory's API decodes itself (its data
# URL pattern), and the most a request's image may weigh, decoded.
DATA_URL_TYPES = ("png", "jpg", "jpeg", "gif", "bmp")
MAX_IMAGE_BYTES = 20 * 2**20


def check_image_parts(
    body: dict[str, Any], vision: bool, local_files: bool
) -> tuple[str, str | None] | None:
    """(message, param) when an image part of a chat request cannot be served, None otherwise.

    Each `image_url` part must be a data URL of a PNG, JPEG, GIF or BMP image of at most
    MAX_IMAGE_BYTES that decodes; a local path (or file:// URL) is read only where the server
    listens on loopback (`local_files`: the client is on this machine), and is handed on as a
    data URL; a remote URL is refused (this server fetches nothing). Any image on a text model
    is refused. Good parts are rewritten in place."""
    import base64
    import binascii
    import io

    from qwenft.data.images import ImageProblem, undecodable, verify_image

    for i, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        for k, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            where = f"messages[{i}].content[{k}]"
            if not vision:
                return f"{where}: the served model is a text model and cannot see images", where
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                return f"{where}: image_url.url must be a data URL", where
            if url.startswith(("http://", "https://")):
                return (
                    f"{where}: this server fetches no remote images; send the image as a data "
                    "URL (data:image/png;base64,...)",
                    where,
                )
            if url.startswith("data:"):
                head, _, payload = url.partition(",")
                kind = (
                    head[len("data:image/") :].split(";")[0]
                    if head.startswith("data:image/")
                    else ""
                )
                if kind not in DATA_URL_TYPES or not head.endswith(";base64"):
                    return (
                        f"{where}: a data URL must be a base64 {', '.join(DATA_URL_TYPES)} image "
                        f"(got {head[:40]!r})",
                        where,
                    )
                if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
                    return f"{where}: the image is over {MAX_IMAGE_BYTES // 2**20} MB", where
                try:
                    data = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError):
                    return f"{where}: the data URL is not valid base64", where
                problem = undecodable(io.BytesIO(data))
                if problem:
                    return f"{where}: the image cannot be decoded ({problem})", where
                continue
            path = Path(url.removeprefix("file://")).expanduser()
            if not local_files:
                return (
                    f"{where}: local image paths are read only by a server on loopback; send "
                    "the image as a data URL",
                    where,
                )
            try:
                verify_image(path)
            except ImageProblem as exc:
                return f"{where}: {exc.message}", where
            if path.stat().st_size > MAX_IMAGE_BYTES:
                return f"{where}: the image is over {MAX_IMAGE_BYTES // 2**20} MB", where
            kind = _image_format(path)
            encoded = base64.b64encode(path.read_bytes()).decode()
            part["image_url"] = {"url": f"data:image/{kind};base64,{encoded}"}
    return None


def _image_format(path: Path) -> str:
    """The data URL type LLaMA-Factory decodes for an image file (its format, as Pillow reads it)."""
    from PIL import Image

    with Image.open(path) as im:
        kind = (im.format or "png").lower()
    return kind if kind in DATA_URL_TYPES else "png"


def check_context(prompt_tokens: int, max_tokens: int | None, context: int) -> str | None:
    """The message when a prompt (and the tokens asked for) do not fit the model's context."""
    if prompt_tokens >= context:
        return (
            f"the prompt is {prompt_tokens} tokens, longer than the model's context of {context} "
            "tokens (max_position_embeddings): shorten the messages"
        )
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        return (
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {context} tokens: ask for at most {context - prompt_tokens} tokens"
        )
    return None


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One line from FastAPI's RequestValidationError.errors()."""
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts or ["the body does not match the chat API"])


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(x.get("text") or "" for x in content if isinstance(x, dict))
    return ""


ROLES = {"user": "user", "assistant": "assistant", "function": "function", "tool": "observation"}
# LLaMA-Factory's separator of parallel tool results in one observation turn (as it trains them)
TOOL_RESULT_SEP = "\n</tool_response>\n<tool_response>\n"


def merge_tool_replies(body: dict[str, Any]) -> tuple[str, str | None] | None:
    """Put the role "tool" replies to one assistant turn's tool_calls into one message, in the
    calls' order (matched by tool_call_id, else by order), joined as LLaMA-Factory trains parallel
    results. LLaMA-Factory's API takes one message per turn (u/a/u/a...): an OpenAI client sends
    one per call. Changes body["messages"] in place; returns (message, param) for a reply that
    answers no call (an unknown tool_call_id, a reply twice, a reply with no call before it)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    out: list[Any] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        if not (isinstance(m, dict) and m.get("role") in ("tool", "function")):
            out.append(m)
            i += 1
            continue
        run = []
        while (
            i < len(messages)
            and isinstance(messages[i], dict)
            and messages[i].get("role")
            in (
                "tool",
                "function",
            )
        ):
            run.append((i, messages[i]))
            i += 1
        prev = out[-1] if out else None
        calls = prev.get("tool_calls") if isinstance(prev, dict) else None
        calls = calls if isinstance(calls, list) and calls else None
        if calls is None:
            if len(run) > 1:
                return (
                    f"messages[{run[0][0]}]: {len(run)} tool replies follow a turn without "
                    "tool_calls",
                    "messages",
                )
            out.append(run[0][1])
            continue
        ids = [c.get("id") if isinstance(c, dict) else None for c in calls]
        slots: list[str | None] = [None] * len(calls)
        for k, reply in run:
            cid = reply.get("tool_call_id")
            if cid is not None and cid in ids:
                slot = ids.index(cid)
            elif cid is not None:
                known = ", ".join(repr(x) for x in ids if x is not None) or "none"
                return (
                    f"messages[{k}].tool_call_id {cid!r} answers no call of the assistant turn "
                    f"before it (its call ids: {known})",
                    "messages",
                )
            else:
                slot = next((n for n, v in enumerate(slots) if v is None), None)
                if slot is None:
                    return f"messages[{k}]: more tool replies than calls", "messages"
            if slots[slot] is not None:
                return f"messages[{k}]: call {ids[slot] or slot + 1} is answered twice", "messages"
            slots[slot] = _text(reply.get("content"))
        results = [x for x in slots if x is not None]
        out.append({"role": "tool", "content": TOOL_RESULT_SEP.join(results)})
    body["messages"] = out
    return None


def decode_call_arguments(input_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LLaMA-Factory's API puts an assistant turn's tool_calls back into the prompt with each
    call's arguments as OpenAI sends them, a JSON string, which its template then writes as a
    quoted string: not the {"name": ..., "arguments": {...}} object the model was trained on.
    Decode them (in place) so the prompt matches training."""
    for m in input_messages:
        if m.get("role") != "function" or not isinstance(m.get("content"), str):
            continue
        try:
            calls = json.loads(m["content"])
        except ValueError:
            continue
        if not isinstance(calls, list):
            continue
        for call in calls:
            if isinstance(call, dict) and isinstance(call.get("arguments"), str):
                try:
                    call["arguments"] = json.loads(call["arguments"])
                except ValueError:
                    pass
        m["content"] = json.dumps(calls, ensure_ascii=False)
    return input_messages


def count_prompt_tokens(engine: Any, body: dict[str, Any]) -> int:
    """The prompt's length as LLaMA-Factory's HF engine builds it (template.encode_oneturn)."""
    messages = list(body["messages"])
    system = None
    if messages and messages[0].get("role") == "system":
        system = _text(messages.pop(0).get("content"))
    paired = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list) and calls:
            content = json.dumps(
                [
                    {
                        "name": c["function"]["name"],
                        "arguments": c["function"].get("arguments", "{}"),
                    }
                    for c in calls
                ],
                ensure_ascii=False,
            )
            paired.append({"role": "function", "content": content})
        else:
            paired.append(
                {"role": ROLES.get(m["role"], m["role"]), "content": _text(m.get("content"))}
            )
    decode_call_arguments(paired)
    paired.append({"role": "assistant", "content": ""})
    tools = body.get("tools")
    tools_json = (
        json.dumps([t.get("function") for t in tools if isinstance(t, dict)], ensure_ascii=False)
        if isinstance(tools, list) and tools
        else None
    )
    prompt_ids, _ = engine.template.encode_oneturn(engine.tokenizer, paired, system, tools_json)
    return len(prompt_ids)


def model_context(engine: Any) -> int | None:
    """max_position_embeddings of the served model's config (None when unknown)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class RequestChecks:
    """ASGI middleware (inside LLaMA-Factory's app): checks POST .../chat/completions bodies from an
    authorized client before the app sees them, and turns an exception raised before the response
    started into a JSON 500 without a traceback (the traceback goes to the server's log).

    `only_model` (llama.cpp's server, which checks the rest itself but answers any model name
    with its one model): POST .../completions bodies only get the model check (check_model)."""

    def __init__(self, app: Any, chat_model: Any = None, only_model: bool = False) -> None:
        import os

        self.app, self.chat_model, self.only_model = app, chat_model, only_model
        self.api_key = os.getenv("API_KEY")
        self.served_model = os.getenv("API_MODEL_NAME", "gpt-3.5-turbo")  # LLaMA-Factory's default
        self.vision = os.getenv(VISION_ENV) == "1"  # build_serve_command says
        self.local_files = os.getenv(LOCAL_FILES_ENV) == "1"

    def _authorized(self, scope: dict[str, Any]) -> bool:
        if not self.api_key:
            return True
        headers = dict(scope.get("headers") or [])
        return key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)

    def problem(self, raw: bytes) -> tuple[str, str | None] | None:
        return self.prepare(raw)[0]

    def prepare(self, raw: bytes) -> tuple[tuple[str, str | None] | None, bytes]:
        """(problem, body to pass on): the request checks, and the tool replies merged into one
        message per turn (merge_tool_replies)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            if self.only_model:
                return None, raw
            return (f"the request body is not valid JSON: {exc}", None), raw
        if self.only_model:
            return (
                check_model(body, self.served_model, False) if isinstance(body, dict) else None
            ), raw
        problem = check_chat_request(body, self.served_model)
        if problem:
            return problem, raw
        if _has_images(body):
            problem = check_image_parts(body, self.vision, self.local_files)
            if problem:
                return problem, raw
            raw = json.dumps(body, ensure_ascii=False).encode()
        if any(
            isinstance(m, dict) and m.get("role") in ("tool", "function") for m in body["messages"]
        ):
            problem = merge_tool_replies(body)
            if problem:
                return problem, raw
            raw = json.dumps(body, ensure_ascii=False).encode()
        engine = getattr(self.chat_model, "engine", None)
        try:
            context = model_context(engine)
            prompt = count_prompt_tokens(engine, body) if context else None
        except Exception:  # noqa: BLE001 - counting is best effort; LLaMA-Factory checks the rest
            return None, raw
        if context and prompt is not None:
            max_tokens = body.get("max_tokens")
            message = check_context(prompt, int(max_tokens) if max_tokens else None, context)
            if message:
                return (message, "messages"), raw
        return None, raw

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        path = scope["path"].rstrip("/")
        checked = (
            path.endswith("/completions") if self.only_model else path.endswith("/chat/completions")
        )
        if scope["method"] == "POST" and checked and self._authorized(scope):
            body = await read_body(receive)
            if body is None:
                return
            problem, raw = self.prepare(body)
            if problem:
                status, code = getattr(problem, "status", 400), getattr(problem, "code", None)
                await send_json(send, status, error_body(*problem, code=code))
                return
            receive = replay(raw, receive)
        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:
                raise
            import traceback

            traceback.print_exc()
            message = f"the server failed on this request ({type(exc).__name__}: {exc})"
            await send_json(send, 500, error_body(message, kind="server_error"))


def install_request_checks(app: Any, chat_model: Any) -> None:
    """Add RequestChecks (inside the CORS middleware), ServeGuard (outside it), RequestLog
    (outside everything) and a 400 for FastAPI's validation errors (its default is 422) to
    LLaMA-Factory's app."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.middleware import Middleware

    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content=error_body(validation_message(exc.errors())))

    app.add_exception_handler(RequestValidationError, invalid)
    app.user_middleware.append(Middleware(RequestChecks, chat_model=chat_model))
    _install_guard(app)


def install_llamacpp_checks(app: Any) -> None:
    """llama-cpp-python's app: RequestLog, ServeGuard, and the model check (404 for another model
    name)."""
    from starlette.middleware import Middleware

    app.user_middleware.append(Middleware(RequestChecks, only_model=True))
    _install_guard(app)


def _install_guard(app: Any) -> None:
    """ServeGuard outside the app's own middleware (its CORS included), RequestLog outside it so
    that refusals get their line too."""
    from starlette.middleware import Middleware

    app.user_middleware.insert(0, Middleware(ServeGuard))
    app.user_middleware.insert(0, Middleware(RequestLog))


def guarded_argv(argv: list[str]) -> list[str]:
    """`llamafactory-cli api YAML` (or `llama_cpp.server ARGS`) run through guarded_api (this
    module as a script)."""
    return [sys.executable, "-m", "qwenft.serve", *argv]


def _install_lf(app: Any, chat_model: Any) -> None:
    install_request_checks(app, chat_model)
    _patch_process_request()


class _PatchApp:
    """A meta-path finder: when `name` (llamafactory.api.app, llama_cpp.server.app) is imported,
    wrap its create_app so that the app it builds gets `install(app, *create_app's arguments)`.
    Nothing is imported before the server itself imports it."""

    def __init__(
        self, name: str = "llamafactory.api.app", install: Callable[..., None] = _install_lf
    ) -> None:
        self.name, self.install = name, install

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, install = spec.loader.exec_module, self.install

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            create_app = module.create_app

            def guarded_create_app(*args: Any, **kwargs: Any) -> Any:
                app = create_app(*args, **kwargs)
                install(app, *args, **kwargs)
                return app

            module.create_app = guarded_create_app

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _patch_process_request() -> None:
    """Decode the string arguments of tool calls sent back in the history (decode_call_arguments)
    after LLaMA-Factory's API turns a request into its messages."""
    import llamafactory.api.chat as lf_chat

    original = lf_chat._process_request
    if getattr(original, "_qwenft", False):
        return

    def process_request(request: Any) -> Any:
        input_messages, *rest = original(request)
        return (decode_call_arguments(input_messages), *rest)

    process_request._qwenft = True  # type: ignore[attr-defined]
    lf_chat._process_request = process_request


def guarded_api(args: list[str]) -> int:
    """`python -m qwenft.serve CLI api YAML`: run llamafactory-cli (a Python script) in this
    process with the request checks installed; anything else is exec'd unchanged."""
    import os
    import runpy

    if not args:
        print("usage: python -m qwenft.serve LLAMAFACTORY_CLI api YAML", file=sys.stderr)
        return 2
    if args[0] == "llama_cpp.server":  # `python -m llama_cpp.server ARGS`, with the checks
        sys.meta_path.insert(
            0,
            _PatchApp("llama_cpp.server.app", lambda app, *_a, **_k: install_llamacpp_checks(app)),
        )
        sys.argv = [args[0], *args[1:]]
        from qwenft.models.llamacpp import plain_cpu_kernels

        with plain_cpu_kernels():  # as export's verify and chat load it (AMX crash otherwise)
            runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
        return 0
    cli = args[0]
    try:
        with open(cli, "rb") as fh:
            first = fh.readline()
    except OSError:
        first = b""
    if not (first.startswith(b"#!") and b"python" in first):
        os.execvp(cli, args)  # not a Python entry point: run it as it is, without the checks
    sys.meta_path.insert(0, _PatchApp())
    sys.argv = list(args)
    sys.path[0] = os.path.dirname(os.path.abspath(cli))  # as running the script itself would
    runpy.run_path(cli, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(guarded_api(sys.argv[1:]))
