"""A stream whose first event is a refusal is that attempt's failure for the router, exactly as
the same refusal with its status: GLM (and the proxies before it) answer a key out of balance
(1113) or a rate limit (1302) with a 200 `text/event-stream` whose first `data:` is
`{"error": {...}}`. The router counted a stream's success at its headers, so such a key was never
blamed or cooled and kept its turn for ever (every request on it failed, the next one was sent
to it again), and the request was not tried on another key although nothing had reached the
client. The router now decides a stream's success on its first event (`Router._first_event`),
and hands what it read of a stream it accepts on to the relay, byte for byte."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from aiohttp import web

from bridge import wire
from bridge.errors import BridgeError
from bridge.upstreams import ProfileConfig, Router

from .conftest import free_port, new_user, query, run, start_bridge, wait_settled
from .test_router_slots import local_upstream


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "chatcmpl-k2", "object": "chat.completion.chunk", "created": 1, "model": "glm-4.6",
                  "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57}
ANSWER = [_chunk({"role": "assistant", "content": "Served by the second key."}), _chunk({}, "stop", USAGE),
          b"data: [DONE]\n\n"]
OUT_OF_BALANCE = {"error": {"code": "1113", "message": "余额不足或无可用资源包,请充值。"}}

# refusal -> the status the upstream would say it with
REFUSALS = {
    "billing 1113": (429, OUT_OF_BALANCE),
    "concurrency 1302": (429, {"error": {"code": "1302", "message": "您当前使用该API的并发数过高"}}),
    "overloaded 1305": (429, {"error": {"code": "1305", "message": "The service may be temporarily overloaded"}}),
    "credentials 1001": (401, {"error": {"code": "1001", "message": "Authentication parameter not received"}}),
    "vllm's 500": (500, {"error": {"object": "error", "message": "CUDA out of memory", "code": 500}}),
    "model not in the plan 1311": (403, {"error": {"code": "1311", "message": "no access"}}),
}


def _seen_as(outcomes: list[object]) -> list[object]:
    """What each request got, as the client tells it apart (not the words)."""
    return [o if isinstance(o, bytes) else (o.kind, o.status, o.code) for o in outcomes]  # type: ignore[union-attr]


async def _route_streams(answers: dict[str, tuple[int, dict]], requests: int, *, in_a_200: bool,
                         keys: tuple[str, ...] = ("k1", "k2"), attempts: int = 3,
                         ) -> tuple[list[object], list[str], dict[str, tuple[int, bool, str | None]], bool]:
    """Stream requests through a router over one local upstream that answers each key (by its
    bearer) as `answers` says, with that status or (`in_a_200`) as the first event of a 200
    stream, else with ANSWER. Returns what each request got (the stream's bytes as read, or the
    BridgeError), the keys the upstream saw in order, each key's health (failures, cooling, last
    error) and whether the router is usable."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        bearer = request.headers["authorization"].removeprefix("Bearer ")
        seen.append(bearer)
        refusal = answers.get(bearer)
        if refusal is not None and not in_a_200:
            return web.json_response(refusal[1], status=refusal[0])
        response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for piece in ([b"data: " + json.dumps(refusal[1]).encode() + b"\n\n", b"data: [DONE]\n\n"]
                      if refusal is not None else ANSWER):
            await response.write(piece)
        await response.write_eof()
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=keys)],
                    timeout=30, attempts=attempts)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", stream=True, messages=[wire.Message(role="user", content="hi")])
    outcomes: list[object] = []
    try:
        for i in range(requests):
            try:
                response = await router.open(request, f"r{i}")
            except BridgeError as error:
                outcomes.append(error)
                continue
            read = []
            while data := await response.content.readany():
                read.append(data)
            response.end()
            outcomes.append(b"".join(read))
        health = {k.fingerprint: (k.failures, not k.healthy, k.last_error)
                  for p in router.health() for k in p.keys}
        by_key = {p.keys[i].fingerprint: p.keys[i].secret for p in router.profiles for i in range(len(p.keys))}
        return outcomes, seen, {by_key[f]: h for f, h in health.items()}, router.usable()
    finally:
        await router.close()
        await runner.cleanup()


def test_an_out_of_balance_key_answering_a_stream_is_tried_once_then_cools():
    """The defect's case: every request gets the second key's answer, the first key is tried
    once (the first request's first attempt) and cools at once, with 1113 as its last error."""
    outcomes, seen, health, usable = asyncio.run(_route_streams({"k1": (200, OUT_OF_BALANCE)}, 4, in_a_200=True))
    assert outcomes == [b"".join(ANSWER)] * 4, outcomes  # each byte of k2's stream, once
    assert seen == ["k1"] + ["k2"] * 4, seen
    assert health["k1"] == (0, True, "1113") and health["k2"] == (0, False, None), health
    assert usable


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_refusal_as_a_streams_first_event_is_routed_as_the_same_refusal_with_its_status(name):
    """Blamed, cooled, retried elsewhere and finally told exactly as the refusal said with its
    status: on one key of two, and on every key."""
    status, body = REFUSALS[name]
    for refusing in (("k1",), ("k1", "k2")):
        answers = {k: (status, body) for k in refusing}
        with_status = asyncio.run(_route_streams(answers, 3, in_a_200=False))
        in_a_200 = asyncio.run(_route_streams(answers, 3, in_a_200=True))
        told = lambda r: (_seen_as(r[0]), r[1], r[2], r[3])  # noqa: E731
        assert told(in_a_200) == told(with_status), (refusing, told(in_a_200), told(with_status))


# ---- what the relay reads of a stream the router accepted --------------------------------------

# pieces as the wire may cut them: comment pings before the first event, that event's line cut
# in two (and across its CRLF), a multi-line data event, the usage chunk, [DONE]
AWKWARD = [b": OPENROUTER PROCESSING\r\n\r\n", b": ping\n\n", b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,",
           b"\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\r", b"\n\r\n",
           b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\n", b"data: \"delta\":{\"content\":\"lo\"}}]}\n\n",
           _chunk({}, "stop", USAGE), b"data: [DONE]\n\n"]
# a refusal the client's own request earned (content policy): no key's fault and not tried
# elsewhere, so it is the relay's, untouched
CONTENT_POLICY = [b'data: {"error": {"code": "1301", "message": "unsafe content"}}\n\n', b"data: [DONE]\n\n"]


async def _relayed(pieces: list[bytes]) -> tuple[bytes, int]:
    """What a reader of the accepted stream's `content` gets, and how many requests were sent."""
    seen: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        seen.append(1)
        response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.02)  # one read each
        await response.write_eof()
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1", "k2"))],
                    timeout=30, attempts=3)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", stream=True, messages=[wire.Message(role="user", content="hi")])
    try:
        response = await router.open(request, "r1")
        read = []
        while data := await response.content.readany():
            read.append(data)
        response.end()
        return b"".join(read), len(seen)
    finally:
        await router.close()
        await runner.cleanup()


# a first event longer than the router looks at (64 KiB), in pieces
LONG_FIRST = [b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"',
              *[b"y" * 30000] * 3, b'"}}]}\n\n', _chunk({}, "stop", USAGE), b"data: [DONE]\n\n"]


@pytest.mark.parametrize("pieces", [AWKWARD, CONTENT_POLICY, ANSWER, LONG_FIRST],
                         ids=["awkward", "content_policy", "plain", "long_first_event"])
def test_the_relay_reads_exactly_the_upstreams_stream(pieces):
    got, sent = asyncio.run(_relayed(pieces))
    assert got == b"".join(pieces)
    assert sent == 1


# ---- end to end: the bridge, two keys, the first out of balance --------------------------------

ADMIN = "first-event-key-health-admin-" + "q" * 16


class _TwoKeys(BaseHTTPRequestHandler):
    """An upstream on 127.0.0.1 whose key k1 is out of balance (1113 as a stream's first event, as
    GLM says it) and whose key k2 answers."""
    protocol_version = "HTTP/1.1"
    seen: list[str] = []
    thinking = threading.Event()

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):
        said = self.rfile.read(int(self.headers.get("content-length") or 0))
        bearer = self.headers.get("authorization", "").removeprefix("Bearer ")
        _TwoKeys.seen.append(bearer)
        pieces = ([b"data: " + json.dumps(OUT_OF_BALANCE, ensure_ascii=False).encode() + b"\n\n", b"data: [DONE]\n\n"]
                  if bearer == "k1" else CONTENT_POLICY if b"unsafe" in said else ANSWER)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        if bearer != "k1" and b"think long" in said:
            self.wfile.flush()
            _TwoKeys.thinking.wait(30)  # the model works on the prompt; its first event is far off
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def two_keys_bridge(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _TwoKeys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1",
                          CODEPLAN_UPSTREAM_KEYS="k1,k2", CODEPLAN_ADMIN_TOKEN=ADMIN, CODEPLAN_HEADER_WAIT="0.5")
    yield bridge
    bridge.stop()
    _TwoKeys.thinking.set()
    server.shutdown()


def test_the_client_gets_the_second_keys_answer_and_the_first_key_cools(two_keys_bridge, database):
    key = new_user(database)
    _TwoKeys.seen.clear()
    for _ in range(4):
        answer = httpx.post(two_keys_bridge.url + "/v1/chat/completions", timeout=60,
                            headers={"authorization": f"Bearer {key}"},
                            json={"model": "glm-4.6", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
        assert "Served by the second key." in answer.text and '"error"' not in answer.text, answer.text
        assert answer.text.rstrip().endswith("data: [DONE]"), answer.text
    assert _TwoKeys.seen.count("k1") == 1 and _TwoKeys.seen.count("k2") == 4, _TwoKeys.seen
    health = httpx.get(two_keys_bridge.url + "/admin/upstreams", timeout=30,
                       headers={"authorization": f"Bearer {ADMIN}"}).json()
    keys = {k["fingerprint"]: k for p in health for k in p["keys"]}
    from bridge.upstreams import fingerprint
    k1, k2 = keys[fingerprint("k1")], keys[fingerprint("k2")]
    assert (k1["healthy"], k1["last_error"], k1["served"]) == (False, "1113", 0), k1
    assert k1["cooling_for_s"] > 0, k1
    assert (k2["healthy"], k2["served"]) == (True, 4), k2
    # each request billed once, at the answering key's usage
    wait_settled(database)
    rows = run(query(database, "SELECT l.state, l.prompt_tokens, l.completion_tokens, l.estimated FROM usage_ledger l"
                               " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
    assert [tuple(r.values()) for r in rows] == [("posted", 50, 7, False)] * 4, rows


def test_a_refusal_of_the_request_itself_as_a_first_event_is_still_the_streams_error_and_not_billed(
        two_keys_bridge, database):
    """A content-policy refusal (1301) is the request's, the same on every key: not tried
    elsewhere, no key blamed; the client gets the stream's error event, and it is voided."""
    key = new_user(database)
    before = httpx.get(two_keys_bridge.url + "/admin/upstreams", timeout=30,
                       headers={"authorization": f"Bearer {ADMIN}"}).json()
    _TwoKeys.seen.clear()
    answer = httpx.post(two_keys_bridge.url + "/v1/chat/completions", timeout=60,
                        headers={"authorization": f"Bearer {key}"},
                        json={"model": "glm-4.6", "stream": True,
                              "messages": [{"role": "user", "content": "something unsafe"}]})
    assert answer.status_code == 200 and '"error"' in answer.text and "[DONE]" not in answer.text, answer.text
    assert _TwoKeys.seen.count("k2") == 1, _TwoKeys.seen
    after = httpx.get(two_keys_bridge.url + "/admin/upstreams", timeout=30,
                      headers={"authorization": f"Bearer {ADMIN}"}).json()
    from bridge.upstreams import fingerprint
    k2 = fingerprint("k2")
    health = [{k["fingerprint"]: (k["healthy"], k["failures"]) for p in h for k in p["keys"]}[k2]
              for h in (before, after)]
    assert health[0] == health[1] == (True, 0), health
    wait_settled(database)
    rows = run(query(database, "SELECT l.state, l.billed_tokens FROM usage_ledger l JOIN api_keys k"
                               " ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
    assert [tuple(r.values()) for r in rows] == [("voided", 0)], rows


def test_a_client_leaving_before_the_first_event_still_pays_the_prompt(two_keys_bridge, database):
    """The upstream took the request (its 200) and works on it, though the router waits for its
    first event to count the key's success: a client that leaves meanwhile pays the prompt, as
    one leaving before the first token always did (never voided: the upstream bills it)."""
    key = new_user(database)
    with httpx.stream("POST", two_keys_bridge.url + "/v1/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": [{"role": "user", "content": "think long"}]}) as answer:
        assert answer.status_code == 200
        time.sleep(1.0)  # headers and a keep-alive, then the client gives up
    wait_settled(database)
    rows = run(query(database, "SELECT l.state, l.settle_reason, l.prompt_tokens, l.prompt_estimate,"
                               " l.completion_tokens, l.estimated FROM usage_ledger l"
                               " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["state"], row["settle_reason"], row["estimated"]) == ("posted", "client left before the first token",
                                                                     True), dict(row)
    assert row["prompt_tokens"] == row["prompt_estimate"] > 0 and row["completion_tokens"] == 0, dict(row)


class _RateLimited(_TwoKeys):
    """Every key rate-limited (1302), said as a stream's first event."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        _RateLimited.seen.append(self.headers.get("authorization", ""))
        out = (b'data: {"error": {"code": "1302", "message": "rate limit reached for requests"}}\n\n'
               b"data: [DONE]\n\n")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def test_a_refusal_on_every_key_is_told_with_its_status_and_not_billed(database):
    """Nothing reached the client: it is told the refusal as its status says it (429, retry
    later), and the entry is voided (as the stream's error event was before)."""
    _RateLimited.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _RateLimited)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k9")
    try:
        key = new_user(database)
        answer = httpx.post(bridge.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                            json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        bridge.stop()
        server.shutdown()
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "1302", answer.text
    assert answer.headers.get("retry-after"), answer.headers
    assert len(_RateLimited.seen) == 3  # the router's attempts, as for a 429
    wait_settled(database)
    rows = run(query(database, "SELECT l.state, l.billed_tokens FROM usage_ledger l JOIN api_keys k"
                               " ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
    assert [tuple(r.values()) for r in rows] == [("voided", 0)], rows
