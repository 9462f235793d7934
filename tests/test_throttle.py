"""The failed-authentication throttle: in-process against the real database (queries counted),
and end to end through a real bridge."""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import urllib.error
import urllib.request

import asyncpg
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from service import db
from service.accounts import Authenticator
from service.throttle import AuthThrottle, GuardedAuthenticator, Throttled, address_key

from .conftest import new_user, start_bridge
from .rawhttp import assert_caller_shape


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def random_key() -> str:
    return "cp_" + secrets.token_urlsafe(30)


class CountingPool:
    """The real pool, with its queries counted."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queries = 0

    @contextlib.asynccontextmanager
    async def acquire(self, timeout=None):
        async with self.pool.acquire(timeout=timeout) as connection:
            self.queries += 1  # the authenticator makes one query per connection it takes
            yield connection


# ---- the throttle alone -------------------------------------------------------------------

def test_an_address_is_refused_after_its_limit_until_its_window_ends():
    clock = Clock()
    throttle = AuthThrottle(limit=3, window=60, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1", b"k" * 32) is None
        throttle.failed("10.0.0.1", secrets.token_bytes(32))
    assert throttle.retry_after("10.0.0.1", b"k" * 32) == 60
    clock.now += 45
    assert throttle.retry_after("10.0.0.1", b"k" * 32) == 15
    assert throttle.retry_after("10.0.0.2", b"k" * 32) is None  # another address is not affected
    clock.now += 15
    assert throttle.retry_after("10.0.0.1", b"k" * 32) is None


def test_a_key_that_worked_before_is_never_throttled():
    throttle = AuthThrottle(limit=1, window=60, clock=Clock())
    throttle.succeeded(b"good" * 8)
    throttle.failed("10.0.0.1", b"bad" * 11)
    assert throttle.retry_after("10.0.0.1", b"other" * 7) is not None
    assert throttle.retry_after("10.0.0.1", b"good" * 8) is None


def test_unknown_keys_are_remembered_for_their_ttl():
    clock = Clock()
    throttle = AuthThrottle(unknown_ttl=30, clock=clock)
    throttle.failed(None, b"x" * 32)
    assert throttle.is_unknown(b"x" * 32)
    clock.now += 31
    assert not throttle.is_unknown(b"x" * 32)


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_key("10.1.2.3") == "10.1.2.3"


def test_memory_stays_bounded_under_a_flood_of_addresses_and_keys():
    throttle = AuthThrottle(limit=5, max_addresses=1000, max_keys=2000, clock=Clock())
    for i in range(200_000):
        throttle.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", i.to_bytes(32, "big"))
    assert len(throttle._failures) == 1000 and len(throttle._unknown) == 2000
    size = sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in throttle._failures.items()) \
        + sum(sys.getsizeof(k) for k in throttle._unknown)
    assert size < 1000 * 300 + 2000 * 100, size


# ---- against the real database --------------------------------------------------------------

async def test_random_keys_from_one_address_cost_only_the_limit_in_queries(database):
    pool = await db.create_pool(database, size=2)
    try:
        counting = CountingPool(pool)
        throttle = AuthThrottle(limit=20, window=60)
        auth = GuardedAuthenticator(Authenticator(counting, ttl=5), throttle)  # type: ignore[arg-type]
        refused = 0
        for _ in range(2000):
            try:
                assert await auth.authenticate(random_key(), "203.0.113.7") is None
            except Throttled as exc:
                assert 0 < exc.retry_after <= 60
                refused += 1
        assert counting.queries == 20 and refused == 1980
        assert throttle.refused == 1980
        print(f"\n2,000 random keys from one address: {counting.queries} queries, "
              f"{throttle.refused} avoided")

        # the same unknown key over and over, from anywhere: one query
        counting.queries = 0
        same = random_key()
        for i in range(2000):
            assert await auth.authenticate(same, f"198.51.100.{i % 250}") is None
        assert counting.queries == 1
        print(f"one unknown key 2,000 times: {counting.queries} query, "
              f"{throttle.cached_unknown} answered from the cache")
    finally:
        await pool.close()


async def test_a_known_key_from_a_throttled_address_is_served(database):
    pool = await db.create_pool(database, size=2)
    try:
        key = new_user(database)
        throttle = AuthThrottle(limit=3, window=60)
        auth = GuardedAuthenticator(Authenticator(pool, ttl=0), throttle)
        assert await auth.authenticate(key, "192.0.2.1") is not None  # it worked once
        for _ in range(3):
            assert await auth.authenticate(random_key(), "192.0.2.1") is None
        with pytest.raises(Throttled):
            await auth.authenticate(random_key(), "192.0.2.1")
        assert (await auth.authenticate(key, "192.0.2.1")).account_id > 0  # still served
    finally:
        await pool.close()


async def test_without_an_address_the_throttle_never_refuses(database):
    pool = await db.create_pool(database, size=2)
    try:
        counting = CountingPool(pool)
        auth = GuardedAuthenticator(Authenticator(counting, ttl=5), AuthThrottle(limit=1))  # type: ignore[arg-type]
        for _ in range(50):
            assert await auth.authenticate(random_key()) is None
        assert counting.queries == 50
    finally:
        await pool.close()


# ---- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def throttled_bridge(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_FAILURE_LIMIT="5",
                          CODEPLAN_AUTH_FAILURE_WINDOW="30")
    yield server
    server.stop()


def call(url: str, method: str = "GET", body: bytes | None = None, key: str | None = None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_a_guessing_address_gets_429s_in_each_protocol_and_real_keys_keep_working(throttled_bridge, database):
    key = new_user(database)
    chat = b'{"model": "glm-4.6", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'
    assert call(throttled_bridge.url + "/v1/chat/completions", "POST", chat, key)[0] == 200
    statuses = [call(throttled_bridge.url + "/v1/chat/completions", "POST", chat, random_key())[0]
                for _ in range(8)]
    assert statuses == [401] * 5 + [429] * 3, statuses
    responses = b'{"model": "glm-4.6", "input": "hi"}'
    for path, method, body in (("/v1/chat/completions", "POST", chat), ("/v1/messages", "POST", chat),
                               ("/v1/messages/count_tokens", "POST", chat), ("/v1/usage", "GET", None),
                               ("/v1/responses", "POST", responses), ("/v1/models", "GET", None),
                               ("/v1/models/glm-4.6", "GET", None),
                               ("/v1/billing/checkout", "POST", b'{"plan": "pro"}'),
                               ("/api/monitor/usage/quota/limit", "GET", None)):
        status, headers, answer = call(throttled_bridge.url + path, method, body, random_key())
        assert_caller_shape(path, status, headers["content-type"], answer)
        if path.startswith("/api/monitor"):
            assert status == 200 and b'"code":429' in answer  # Z.ai's convention
        else:
            assert status == 429 and 1 <= int(headers["retry-after"]) <= 30, (path, status, answer)
    # the Responses WebSocket: the upgrade is refused before any key lookup
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(throttled_bridge.url.replace("http://", "ws://") + "/v1/responses",
                          additional_headers={"authorization": f"Bearer {random_key()}"})
    assert refused.value.response.status_code == 403
    assert call(throttled_bridge.url + "/v1/chat/completions", "POST", chat, key)[0] == 200
    assert call(throttled_bridge.url + "/v1/usage", key=key)[0] == 200


def test_the_live_usage_socket_is_behind_the_same_throttle(database, simulator):
    """/v1/usage/live looks keys up through the application's authenticator: guessing keys over
    sockets counts against the address like any request, and past the limit the socket is
    closed with 4429 before any lookup; a real key from that address is still served."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_FAILURE_LIMIT="5",
                          CODEPLAN_AUTH_FAILURE_WINDOW="60")
    try:
        _guess_over_sockets(server.url.replace("http://", "ws://") + "/v1/usage/live", database)
    finally:
        server.stop()


def _guess_over_sockets(url: str, database: str) -> None:
    key = new_user(database)

    def refusal(secret: str, *, header: bool = True) -> tuple[dict, int]:
        headers = {"Authorization": f"Bearer {secret}"} if header else {}
        with ws_connect(url, additional_headers=headers) as socket:
            if not header:
                socket.send(json.dumps({"type": "auth", "key": secret}))
            message = json.loads(socket.recv(timeout=10))
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=10)
        return message, closed.value.rcvd.code

    with ws_connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "usage"  # known before the guessing
    outcomes = [refusal(random_key(), header=i % 2 == 0) for i in range(7)]
    codes = [code for _, code in outcomes]
    assert codes == [4401] * 5 + [4429] * 2, codes
    assert outcomes[0][0] == {"type": "error", "code": "invalid_api_key", "message": "Invalid API key."}
    message = outcomes[-1][0]
    assert message["type"] == "error" and message["code"] == "rate_limit_exceeded"
    assert "retry in" in message["message"]
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "usage"


def test_behind_a_trusted_proxy_each_client_has_its_own_limit(database, simulator):
    """With the load balancer trusted (CODEPLAN_FORWARDED_ALLOW_IPS), the throttle counts the
    address it names, so one client's guessing does not lock the others out."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_FAILURE_LIMIT="3",
                          CODEPLAN_FORWARDED_ALLOW_IPS="127.0.0.1")
    try:
        chat = b'{"model": "glm-4.6", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'

        def from_client(address: str) -> int:
            request = urllib.request.Request(server.url + "/v1/chat/completions", data=chat, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {random_key()}",
                                                      "X-Forwarded-For": address})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert [from_client("203.0.113.7") for _ in range(5)] == [401] * 3 + [429] * 2
        assert from_client("198.51.100.9") == 401  # another client, its own count
    finally:
        server.stop()


async def test_a_lookup_given_up_while_waiting_for_a_connection_leaves_the_pools_queue():
    """A key's lookup bounded by the authenticator's timeout (service/accounts.py `_lookup`):
    given up (or its client gone) while it still waits for a connection, it is cancelled, so it
    takes no connection later ahead of the ledger's ticks; a query under way is left to finish."""
    waiting: list[asyncio.Future] = []

    class StuckPool:
        @contextlib.asynccontextmanager
        async def acquire(self, timeout=None):
            waiter = asyncio.get_running_loop().create_future()
            waiting.append(waiter)
            await waiter  # never given a connection
            yield None

    auth = Authenticator(StuckPool(), ttl=5, timeout=0.2)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await auth.authenticate(random_key())
    await asyncio.sleep(0)
    assert waiting[0].cancelled()  # out of the queue
    leaving = asyncio.ensure_future(auth.authenticate(random_key()))
    while len(waiting) < 2:
        await asyncio.sleep(0)
    leaving.cancel()  # the client left
    await asyncio.gather(leaving, return_exceptions=True)
    await asyncio.sleep(0)
    assert waiting[1].cancelled()

