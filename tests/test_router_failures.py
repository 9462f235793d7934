"""How the upstream router classes an upstream that fails after the request was sent: a timeout
waiting for its answer is not "unreachable", not the key's fault, and never tried again on
another key (the upstream may have computed it all; the client has waited the whole time)."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from bridge import wire
from bridge.errors import BridgeError, Kind
from bridge.upstreams import ProfileConfig, Router
from tests.test_router_slots import local_upstream


async def _silent_upstream() -> tuple[BaseException | None, int, list[tuple[int, str | None]]]:
    arrived: list[str] = []
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.append(request.headers["authorization"])
        await release.wait()  # computes for longer than the router waits
        return web.json_response({"id": "c", "choices": []})

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1", "k2"))],
                    timeout=0.5, attempts=3)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        try:
            (await router.open(request, "r1")).end()
            error = None
        except BaseException as exc:  # noqa: BLE001 - what the journey gets
            error = exc
        return error, len(arrived), [(k.failures, k.last_error) for k in router.profiles[0].keys]
    finally:
        release.set()
        await router.close()
        await runner.cleanup()


def test_an_upstream_silent_past_the_timeout_is_a_timeout_tried_once():
    error, attempts, keys = asyncio.run(_silent_upstream())
    assert isinstance(error, BridgeError), error
    assert error.kind is Kind.upstream_timeout and error.status == 504
    assert "did not start answering" in error.message and "reached" not in error.message
    assert attempts == 1  # not computed again on the second key
    assert keys == [(0, None), (0, None)]  # a slow answer is no key's fault


# ---- an upstream's refusal: whose fault, and what is tried next ---------------------------------

_OK = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                               "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _refused(code: str = "", message: str = "refused") -> dict:
    return {"error": {"code": code, "message": message}} if code else {"error": {"message": message}}


async def _route(answers: dict[str, tuple[int, dict, dict]], profiles: dict[str, tuple[str, ...]],
                 requests: int = 1, weights: dict[str, int] | None = None,
                 ) -> tuple[list[object], list[str], dict[str, tuple[int, bool]], bool]:
    """Requests through a router whose profiles (name -> keys) share one local upstream that
    answers each key (by its bearer) as `answers` says, else with a whole answer. Returns what
    each request got ("ok" or the BridgeError), the keys the upstream saw in order, each key's
    (failures, cooling), and whether the router is usable (what /readyz reads)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        bearer = request.headers["authorization"].removeprefix("Bearer ")
        seen.append(bearer)
        status, body, headers = answers.get(bearer, (200, _OK, {}))
        return web.json_response(body, status=status, headers=headers)

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name=name, base_url=f"http://127.0.0.1:{port}/v1", keys=keys,
                                   weight=(weights or {}).get(name, 1))
                     for name, keys in profiles.items()], timeout=30, attempts=3)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    outcomes: list[object] = []
    try:
        for i in range(requests):
            try:
                response = await router.open(request, f"r{i}")
                await response.read()
                response.end()
                outcomes.append("ok")
            except BridgeError as error:
                outcomes.append(error)
        health = {k.secret: (k.failures, k.cooling_until > 0) for p in router.profiles for k in p.keys}
        return outcomes, seen, health, router.usable()
    finally:
        await router.close()
        await runner.cleanup()


@pytest.mark.parametrize("status, code", [(401, None), (403, "1002")])
def test_a_401_or_an_auth_code_is_our_keys_credentials_tried_on_another_key(status, code):
    """A refused key cooled at once, yet the request was not tried on the next key: the client
    was told 400 invalid_request (Cline then cuts its conversation) for our key's fault."""
    outcomes, seen, health, _ = asyncio.run(_route({"k1": (status, _refused(code, message="Forbidden"), {})},
                                                   {"p": ("k1", "k2")}))
    assert outcomes == ["ok"] and seen == ["k1", "k2"]
    assert health["k1"][1] and not health["k2"][1]  # k1 cools at once; k2 answered


def test_a_plain_403_refuses_the_request_and_cools_no_key():
    """GLM says a bad key with 401; a plain 403 is a gateway's moderation or a WAF refusing this
    request, the same on every key. Taken for our credentials (a review proved it), one user's
    flagged request cooled every key at once and /readyz said the bridge was out of service."""
    refusal = (403, _refused(message="Your input was flagged"), {})
    outcomes, seen, health, usable = asyncio.run(_route({"k1": refusal, "k2": refusal}, {"p": ("k1", "k2")},
                                                        requests=3))
    assert all(isinstance(o, BridgeError) and o.kind is Kind.permission and o.status == 403 for o in outcomes)
    assert len(seen) == 3  # once per request, not on every key
    assert health == {"k1": (0, False), "k2": (0, False)} and usable


@pytest.mark.parametrize("code", ["1220", "1311", "1211"])
def test_a_model_the_upstream_account_may_not_use_cools_no_key(code):
    """Two requests for a model the operator's account is not entitled to cooled every key, and
    /readyz said 503 for every model. It is no key's fault: no key cools, the profile's other keys
    are not tried (each would say the same), and the client is told the model is not available."""
    outcomes, seen, health, usable = asyncio.run(_route(
        {"k1": (403, _refused(code), {}), "k2": (403, _refused(code), {})}, {"p": ("k1", "k2")}, requests=3))
    assert all(isinstance(o, BridgeError) and o.kind is Kind.not_found and o.status == 404 for o in outcomes), outcomes
    assert outcomes[0].code == "model_not_found" and "not available" in outcomes[0].message
    assert len(seen) == 3  # once per request
    assert health == {"k1": (0, False), "k2": (0, False)} and usable


def test_a_model_refused_by_one_profile_is_tried_on_another_serving_it():
    outcomes, seen, health, usable = asyncio.run(_route(
        {"a1": (403, _refused("1220"), {}), "a2": (403, _refused("1220"), {})},
        {"a": ("a1", "a2"), "b": ("b1",)}, requests=4, weights={"a": 1000}))
    assert outcomes == ["ok"] * 4 and seen.count("b1") == 4
    # a's other key is never tried after a's refusal: the request goes straight to b
    assert not any(x.startswith("a") and y.startswith("a") for x, y in zip(seen, seen[1:])), seen
    assert not any(cooling for _, cooling in health.values()) and usable


def test_an_upstream_402_is_billing_tried_on_another_key_that_cools_at_once():
    """A gateway's 402 (out of credit) reached users as their own invalid_request, not retried."""
    outcomes, seen, health, _ = asyncio.run(_route(
        {"k1": (402, {"error": {"message": "Insufficient credits", "code": 402}}, {})}, {"p": ("k1", "k2")}))
    assert outcomes == ["ok"] and seen == ["k1", "k2"]
    assert health["k1"][1]  # cooled at once, like 1113


@pytest.mark.parametrize("status, body", [
    (404, {"object": "error", "message": "The model `glm-4.6` does not exist.", "type": "NotFoundError", "code": 404}),
    (408, {"error": {"message": "Request Timeout"}})], ids=["404", "408"])
def test_an_upstream_404_or_408_is_tried_on_another_key_and_blames_none(status, body):
    outcomes, seen, health, _ = asyncio.run(_route({"k1": (status, body, {})}, {"p": ("k1", "k2")}))
    assert outcomes == ["ok"] and seen == ["k1", "k2"]
    assert health["k1"] == (0, False)


def test_an_upstream_404_everywhere_is_an_upstream_error_not_the_users_request():
    body = {"object": "error", "message": "The model `glm-4.6` does not exist.", "type": "NotFoundError", "code": 404}
    outcomes, seen, _, usable = asyncio.run(_route({"k1": (404, body, {}), "k2": (404, body, {})},
                                                   {"p": ("k1", "k2")}, requests=3))
    assert all(isinstance(o, BridgeError) and o.kind is Kind.upstream_error and o.status == 502 for o in outcomes)
    assert usable  # a deployment's naming mistake does not cool the keys


@pytest.mark.parametrize("status", [504, 524])
def test_an_upstream_gateway_timeout_is_a_timeout_sent_once(status):
    """A 504 from the gateway before the model was sent again on every key, each computing the
    answer again: it is the router's own read timeout by another name."""
    refusal = (status, _refused(message="Gateway Time-out"), {})
    outcomes, seen, health, _ = asyncio.run(_route({"k1": refusal, "k2": refusal, "k3": refusal},
                                                   {"p": ("k1", "k2", "k3")}))
    [error] = outcomes
    assert isinstance(error, BridgeError) and error.kind is Kind.upstream_timeout and error.status == 504
    assert len(seen) == 1
    assert all(h == (0, False) for h in health.values())


def test_an_upstream_503_is_an_overload_tried_elsewhere_with_its_wait():
    refusal = (503, _refused(message="overloaded"), {"retry-after": "20"})
    outcomes, seen, _, _ = asyncio.run(_route({"k1": refusal, "k2": refusal}, {"p": ("k1", "k2")}))
    [error] = outcomes
    assert isinstance(error, BridgeError) and error.kind is Kind.upstream_overloaded
    assert (error.status, error.retry_after) == (503, 20)
    assert sorted(set(seen)) == ["k1", "k2"]  # tried on the other key first
    outcomes, seen, _, _ = asyncio.run(_route({"k1": refusal}, {"p": ("k1", "k2")}))
    assert outcomes == ["ok"]
