"""Figures for the hostile-traffic defences (SECURITY.md):

- the per-request cost of the HTTP limits: uvicorn's own httptools protocol against the limited
  subclass, both driven in this process over an in-memory transport with the same trivial ASGI
  app, so only the protocol's work differs (keep-alive GETs, and POSTs with a 75 KB body as
  Claude Code sends);
- the JSON depth guard's throughput on a Claude-Code-like body, a long agent history and the
  worst case (a body that is nothing but brackets);
- what the authentication throttle adds per request (its gate, and its authenticator wrapper
  around a cache hit).

    python -m bench.hostile
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from bridge import depth
from service.http_limits import HttpLimits, protocol_class


class _Transport:
    """Enough of an asyncio transport for uvicorn's protocol: writes are counted, not sent."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_protocol(self, protocol) -> None:
        pass


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def _serve(protocol_cls, request: bytes, n: int, chunk: int) -> float:
    """CPU seconds for `n` requests on one kept-alive connection, fed `chunk` bytes at a time."""
    config = Config(_app, http=protocol_cls, lifespan="off", log_config=None, access_log=False)
    config.load()
    state = ServerState()
    protocol = protocol_cls(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    pieces = [request[i:i + chunk] for i in range(0, len(request), chunk)]
    started = time.process_time()
    for _ in range(n):
        for piece in pieces:
            protocol.data_received(piece)
        while state.tasks:
            await asyncio.sleep(0)
    spent = time.process_time() - started
    assert transport.written > 0 and not transport.closing
    protocol.connection_lost(None)
    return spent


def limits_cost(rounds: int = 7, n: int = 20_000) -> dict[str, float]:
    limited = protocol_class(HttpLimits())
    get = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer cp_x\r\n" \
          b"User-Agent: claude-cli/2.0\r\nAccept: application/json\r\n\r\n"
    body = b'{"x": "' + b"a" * 75_000 + b'"}'
    post = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
            b"x-api-key: cp_x\r\nanthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    figures = {}
    for name, request, count, chunk in (("GET", get, n, 65536), ("POST 75 KB", post, n // 10, 65536)):
        plain, guarded = [], []
        for _ in range(rounds):  # on uvloop, as `codeplan run` serves
            plain.append(uvloop.run(_serve(HttpToolsProtocol, request, count, chunk)) / count)
            guarded.append(uvloop.run(_serve(limited, request, count, chunk)) / count)
        base, mine = statistics.median(plain), statistics.median(guarded)
        figures[f"{name}: uvicorn httptools us/request"] = base * 1e6
        figures[f"{name}: with the limits us/request"] = mine * 1e6
        figures[f"{name}: added us/request"] = (mine - base) * 1e6
    return figures


def _claude_code_body() -> bytes:
    schema = {"type": "object", "properties": {
        "file_path": {"type": "string", "description": "The absolute path to the file to modify"},
        "edits": {"type": "array", "items": {"type": "object", "properties": {
            "old_string": {"type": "string"}, "new_string": {"type": "string"},
            "replace_all": {"type": "boolean", "default": False}}, "required": ["old_string"]}}},
        "required": ["file_path", "edits"], "additionalProperties": False,
        "$schema": "http://json-schema.org/draft-07/schema#"}
    tools = [{"name": f"Tool{i}", "description": "Performs an operation. Usage notes:\n- " * 20,
              "input_schema": schema} for i in range(18)]
    code = 'def f(x):\n    return {"a": [x, x[0]], "b": "\\\\n"}\n' * 30
    messages = []
    for i in range(12):
        messages.append({"role": "user", "content": [{"type": "text", "text": "Fix the failing test " * 10}]})
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_{i}", "name": "Tool1", "input": {"file_path": "/src/app.py"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": code}]})
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 32000, "tools": tools,
                       "system": [{"type": "text", "text": "You are Claude Code. " * 200}],
                       "messages": messages, "stream": True}).encode()


def depth_throughput() -> dict[str, float]:
    claude = _claude_code_body()
    history = json.loads(claude)
    history["messages"] = history["messages"] * 60
    agent = json.dumps(history).encode()
    flood = b"[]" * (16 * 1024 * 1024)  # 32 MB of brackets, nested 1 deep: the slowest case
    deep = b"[" * (32 * 1024 * 1024)  # 32 MB nested as deep as it goes: stopped at once
    figures = {}
    for name, body, reps in (("Claude Code body", claude, 200), ("agent history", agent, 5),
                             ("32 MB of [] pairs", flood, 1), ("32 MB of [", deep, 1)):
        assert depth.too_deep(body) is (body is deep)
        seconds = float("inf")
        for _ in range(3):  # the best of three: this machine is shared
            started = time.perf_counter()
            for _ in range(reps):
                depth.too_deep(body)
            seconds = min(seconds, (time.perf_counter() - started) / reps)
        figures[f"depth guard, {name} ({len(body) / 1e6:.2f} MB): ms"] = seconds * 1e3
        figures[f"depth guard, {name}: MB/s"] = len(body) / seconds / 1e6
    return figures


def throttle_cost(n: int = 200_000) -> dict[str, float]:
    """What the throttle adds per request: the gate in front of a hot POST, and the
    GuardedAuthenticator around an authenticator whose cache holds the key."""
    from service.throttle import AuthThrottle, GuardedAuthenticator
    from service.throttle_gate import throttle_gate

    throttle = AuthThrottle()

    async def app(scope, receive, send) -> None:
        return None

    gate = throttle_gate(["/v1/messages"], lambda scope: throttle)(app)
    # an address with failures on record, as under attack, and the key a real user sends
    throttle.failed("127.0.0.1", b"x" * 32)
    scope = {"type": "http", "method": "POST", "path": "/v1/messages", "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"x-api-key", b"cp_" + b"k" * 40), (b"anthropic-version", b"2023-06-01")]}

    class Cached:
        async def authenticate(self, key):
            return key  # stands for the authenticator's cache hit

    guarded = GuardedAuthenticator(Cached(), throttle)

    async def measure() -> dict[str, float]:
        figures = {}
        await guarded.authenticate("cp_" + "k" * 40)  # a key that worked once
        for name, call in (("throttle gate", lambda: gate(scope, None, None)),
                           ("bare ASGI call", lambda: app(scope, None, None)),
                           ("GuardedAuthenticator", lambda: guarded.authenticate("cp_" + "k" * 40)),
                           ("authenticator alone", lambda: Cached().authenticate("cp_" + "k" * 40))):
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(n):
                    await call()
                best = min(best, (time.perf_counter() - started) / n)
            figures[f"{name}: us/request"] = best * 1e6
        return figures

    return uvloop.run(measure())


def main() -> None:
    for name, value in {**depth_throughput(), **limits_cost(), **throttle_cost()}.items():
        print(f"{name:60s} {value:12,.2f}")


if __name__ == "__main__":
    main()
