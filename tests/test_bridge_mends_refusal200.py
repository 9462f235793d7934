"""A refusal inside a 200 (llama-server, LiteLLM and some GLM proxies answer a whole request with
status 200 and a body that is only `{"error": ...}`) is the attempt's failure for the router,
exactly as the same refusal with its status: it blames and cools the key per `_refusal()` and is
tried on another key before anything reaches the client. The router counted any 200 a success,
so a key out of balance (1113) was never cooled and kept its turn: clients got 402, 200, 402,
200... for ever although another key was healthy."""
from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from aiohttp import web

from bridge import wire
from bridge.errors import BridgeError, Kind
from bridge.upstreams import ProfileConfig, Router

from .conftest import free_port, new_user, query, run, start_bridge, wait_settled
from .test_router_failures import _route
from .test_router_slots import local_upstream


def _seen_as(outcomes: list[object]) -> list[object]:
    """What each request got, as the client tells it apart (not the words, which name the status)."""
    return ["ok" if o == "ok" else (o.kind, o.status, o.code) for o in outcomes]  # type: ignore[union-attr]


# refusal -> the status the upstream would say it with
REFUSALS = {
    "billing 1113": (402, {"error": {"code": "1113", "message": "Insufficient balance or no resource package."}}),
    "credentials 1001": (401, {"error": {"code": "1001", "message": "Authentication parameter not received"}}),
    "vllm's 429": (429, {"error": {"object": "error", "message": "Too many requests", "code": 429}}),
    "litellm's 429": (429, {"error": {"message": "Rate limit reached", "type": "rate_limit", "code": "429"}}),
    "a failure without a code": (500, {"error": {"message": "Internal error"}}),
    "content policy 1301": (400, {"error": {"code": "1301", "message": "System detected unsafe content"}}),
    "model not in the plan 1311": (403, {"error": {"code": "1311", "message": "no access"}}),
    "vllm's older overflow": (400, {"object": "error", "message": "This model's maximum context length is 8192 "
                                    "tokens", "type": "BadRequestError", "code": 400}),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_refusal_inside_a_200_is_routed_as_the_same_refusal_with_its_status(name):
    status, body = REFUSALS[name]
    results = {}
    for said_with in (status, 200):
        outcomes, seen, health, usable = asyncio.run(_route({"k1": (said_with, body, {})}, {"p": ("k1", "k2")},
                                                            requests=3))
        results[said_with] = (_seen_as(outcomes), seen, health, usable)
    assert results[200] == results[status], results


def test_an_out_of_balance_key_inside_a_200_is_tried_once_then_cools():
    """The hunter's case: the request is served by the other key, and the broken one cools at once."""
    outcomes, seen, health, usable = asyncio.run(_route({"k1": (200, REFUSALS["billing 1113"][1], {})},
                                                        {"p": ("k1", "k2")}, requests=4))
    assert outcomes == ["ok"] * 4
    assert seen == ["k1"] + ["k2"] * 4  # the first request's retry, then every one
    assert health["k1"] == (0, True) and health["k2"] == (0, False) and usable


def test_a_200_that_only_mentions_an_error_is_an_answer():
    """`"finish_reason": "error"` and an `"error": null` beside the choices are no refusal: the
    answer reaches the journey (which reads vLLM's `error` ending as a broken answer)."""
    answer = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": 'say "error"'},
                                      "finish_reason": "error"}], "error": None,
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    outcomes, seen, health, _ = asyncio.run(_route({"k1": (200, answer, {})}, {"p": ("k1", "k2")}, requests=2))
    assert outcomes == ["ok", "ok"] and seen == ["k1", "k2"]
    assert health == {"k1": (0, False), "k2": (0, False)}


async def _broken_body() -> tuple[object, int, list[tuple[int, bool]]]:
    arrived: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        arrived.append(1)
        response = web.StreamResponse(status=200, headers={"content-type": "application/json",
                                                           "content-length": "500"})
        await response.prepare(request)
        await response.write(b'{"id": "c", "choices": [{"index": 0, "message": {"content": "half')
        request.transport.close()  # the rest never comes
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1", "k2"),
                                   concurrency=1)], timeout=30, attempts=3)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        try:
            (await router.open(request, "r1")).end()
            got: object = "ok"
        except BaseException as exc:  # noqa: BLE001 - what the journey gets
            got = exc
        return got, len(arrived), [(k.failures, k.in_flight == 0) for k in router.profiles[0].keys]
    finally:
        await router.close()
        await runner.cleanup()


def test_a_whole_answer_that_breaks_off_is_a_failure_sent_once_and_no_keys_fault():
    got, attempts, keys = asyncio.run(_broken_body())
    assert isinstance(got, BridgeError) and got.kind is Kind.upstream_error and got.status == 502, got
    assert "failed to answer" in got.message
    assert attempts == 1  # the model may have computed it all
    assert keys == [(0, True), (0, True)]  # no blame, every slot back


async def _slot_after_cancel_during_answer_body() -> tuple[int, bool]:
    release = asyncio.Event()
    arrived: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        arrived.append(1)
        response = web.StreamResponse(status=200, headers={"content-type": "application/json",
                                                           "content-length": "100"})
        await response.prepare(request)
        await response.write(b'{"id":')
        await release.wait()  # the rest of the answer does not come in time
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1",),
                                   concurrency=1)], timeout=60, attempts=1)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        opening = asyncio.ensure_future(router.open(request, "r1"))
        await asyncio.sleep(0.5)  # the status is in, the answer's body is being read
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        in_flight = router.profiles[0].keys[0].in_flight
        following = asyncio.ensure_future(router.open(request, "r2"))
        for _ in range(50):
            if len(arrived) == 2:
                break
            await asyncio.sleep(0.1)
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        return in_flight, len(arrived) == 2
    finally:
        release.set()
        await router.close()
        await runner.cleanup()


def test_a_request_cancelled_while_its_whole_answer_arrives_gives_its_slot_back():
    in_flight, next_one_served = asyncio.run(_slot_after_cancel_during_answer_body())
    assert in_flight == 0 and next_one_served


# ---- end to end: what clients get, what is billed -------------------------------------------------

SEEN: list[str] = []
BROKE = json.dumps(REFUSALS["billing 1113"][1]).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "glm-4.6",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}).encode()


class _OneKeyBroke(BaseHTTPRequestHandler):
    """`broke-key`'s account is out of balance, said inside a 200; `good-key` answers."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        SEEN.append(key)
        raw = BROKE if key == "broke-key" else ANSWER
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture(scope="module")
def one_key_broke(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _OneKeyBroke)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    bridge = start_bridge(database, url, CODEPLAN_UPSTREAM_KEYS="broke-key,good-key")
    yield bridge
    bridge.stop()
    server.shutdown()


def test_clients_are_served_by_the_healthy_key_and_billed_once_each(one_key_broke, database):
    key = new_user(database)
    SEEN.clear()
    codes = []
    for _ in range(8):
        r = httpx.post(one_key_broke.url + "/v1/chat/completions", timeout=60,
                       headers={"authorization": f"Bearer {key}"},
                       json={"model": "glm-4.6", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
        codes.append(r.status_code)
    # the broken key is tried once, cools at once, and its request went to the other key
    assert codes == [200] * 8, (codes, SEEN)
    assert SEEN.count("broke-key") == 1 and SEEN.count("good-key") == 8, SEEN
    wait_settled(database)
    rows = run(query(database, "SELECT l.state, l.prompt_tokens, l.completion_tokens, l.estimated FROM usage_ledger l"
                               " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
    assert [tuple(r) for r in rows] == [("posted", 10, 2, False)] * 8
