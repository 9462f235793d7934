"""The coding tools' hot paths are dispatched before Litestar's router (service/app.py,
`CodeplanApp`): what Litestar's layers did for them still happens. The app is driven in-process
over ASGI with its state set by hand (no database): a failure inside the handler is answered in
the caller's protocol by the app's exception handlers, a throttled address is refused before the
handler, and a path that is not exactly a hot one still reaches Litestar's router."""
from __future__ import annotations

import json

import pytest

from service import config as config_module
from service.app import create_app
from service.throttle import AuthThrottle


class Exploding:
    """A journey whose every request fails unexpectedly (a bug, as far as the app can tell)."""

    calls = 0

    async def handle(self, surface, key, read_body):
        Exploding.calls += 1
        raise RuntimeError("boom with a secret cp_not_for_clients")


def _app(throttle: AuthThrottle | None = None):
    app = create_app(config_module.load({}), "postgresql://nobody@/nowhere", "http://127.0.0.1:9", ("k",))
    app.state.journey = Exploding()
    app.state.max_body = 1 << 20
    app.state.auth = type("Auth", (), {"throttle": throttle or AuthThrottle()})()
    return app


async def _call(app, path: str, *, key: str = "cp_somekey", method: str = "POST") -> tuple[int, dict, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", b"Bearer " + key.encode())],
             "client": ("10.1.2.3", 5555), "server": ("127.0.0.1", 8080)}
    body = [{"type": "http.request", "body": b'{"model": "glm-4.6", "messages": []}', "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return body.pop(0) if body else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path, shape", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"),
                                         ("/v1/responses", "openai"), ("/api/anthropic/v1/messages", "anthropic")])
async def test_a_failure_in_a_hot_handler_is_a_500_in_the_callers_shape(path, shape):
    status, headers, body = await _call(_app(), path)
    assert status == 500
    assert headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    if shape == "anthropic":
        assert answer["type"] == "error" and answer["error"]["message"]
    else:
        assert answer["error"]["message"]
    assert b"cp_not_for_clients" not in body and b"boom" not in body  # the detail stays in the log


async def test_a_throttled_address_is_refused_before_the_handler():
    throttle = AuthThrottle(limit=1, window=60)
    throttle.failed("10.1.2.3", b"some other key's hash")
    calls = Exploding.calls
    status, headers, body = await _call(_app(throttle), "/v1/chat/completions")
    assert status == 429 and headers["retry-after"]
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert Exploding.calls == calls  # the journey never saw it


async def test_a_path_that_is_not_exactly_hot_still_reaches_litestar():
    calls = Exploding.calls
    # a trailing slash: Litestar's router normalises it to the same route, which fails the same way
    status, _, _ = await _call(_app(), "/v1/chat/completions/")
    assert status == 500 and Exploding.calls == calls + 1
    status, _, body = await _call(_app(), "/v1/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"
