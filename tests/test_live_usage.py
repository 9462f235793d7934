"""Live usage (the dashboard's `/live` and the key-bound `/v1/usage/live`) across a re-subscription,
a session that ends, a database that is away, and a SIGTERM while the database does not answer.
Real bridge subprocess, real PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import re
import time
import types
import uuid
from urllib.parse import urlsplit

import openai
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from .conftest import TcpProxy, pg_socket, query, run, start_bridge, wait_settled
from .test_web_browser import browser  # noqa: F401 - the browser fixture
from .web_support import Browserish


def _ws(url: str) -> str:
    return url.replace("http://", "ws://")


def _message(socket, timeout: float = 20.0) -> dict:
    return json.loads(socket.recv(timeout=timeout))


def _usage(socket, timeout: float = 20.0) -> dict:
    message = _message(socket, timeout)
    assert message["type"] == "usage", message
    return message


def _closed_with(socket, timeout: float = 10.0) -> int | None:
    try:
        socket.recv(timeout=timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    raise AssertionError("the socket sent more instead of closing")


def _spend(base: str, secret: str, database: str) -> None:
    openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0).chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": "hello"}], max_tokens=30)
    wait_settled(database)


def _resubscribe(database: str, account: int) -> int:
    """What billing does for a cancel and a new checkout (billing_apply_subscription): the old
    row canceled, a new subscriptions row. Its id."""
    run(query(database, "UPDATE subscriptions SET status = 'canceled' WHERE account_id = $1", account))
    return run(query(database, "INSERT INTO subscriptions (account_id, plan_id, status)"
                               " VALUES ($1, 'lite', 'active') RETURNING id", account))[0]["id"]


@pytest.fixture(scope="module")
def site(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0",
                          CODEPLAN_SIGNUP_PLAN="lite", CODEPLAN_SIGNUP_LIMIT="1000")
    yield server
    server.stop()


def _signed_in(site, database) -> tuple[Browserish, str, int]:
    """A new account signed in on the page, its API key, its account id."""
    client = Browserish(site.url)
    address = f"u{uuid.uuid4().hex[:10]}@example.com"
    assert client.sign_up(address).url.path == "/setup"
    client.get("/keys")
    secret = re.search(r"cp_[A-Za-z0-9_-]{30,}", client.post("/keys", {"name": "k"}).text).group(0)
    account = run(query(database, "SELECT account_id FROM api_keys WHERE prefix = $1", secret[:10]))[0]["account_id"]
    return client, secret, account


def test_open_live_sockets_follow_the_account_to_its_new_subscription(site, database):
    """Was: each socket fixed its subscription at connect; after a cancel and a new subscription
    (a new subscriptions row) the page's and the key's sockets watched the old one and never
    updated again. Now a notification for another subscription of the account makes them look
    up its current one and move to it."""
    client, secret, account = _signed_in(site, database)
    cookie = f"codeplan_session={client.session}"
    with ws_connect(_ws(site.url) + "/live", additional_headers={"Cookie": cookie}, origin=site.url) as page, \
            ws_connect(_ws(site.url) + "/v1/usage/live", additional_headers={"Authorization": f"Bearer {secret}"}) as ide:
        before = _usage(page)
        assert _usage(ide)["subscription_id"] == before["subscription_id"]
        new = _resubscribe(database, account)
        _spend(site.url, secret, database)
        for socket in (page, ide):
            pushed = _usage(socket, timeout=10)
            assert pushed["subscription_id"] == new, pushed
            assert pushed["windows"][0]["used"] > 0, pushed  # the new subscription's spending
            assert pushed["today"]["requests"] == 1, pushed


def test_live_today_counts_the_account_as_the_page_does_after_a_resubscription_the_same_day(site, database):
    """Was: the live feed counted today's requests for the current subscription only, the
    dashboard for all the account's subscriptions: after a re-subscription the same day the two
    figures differed. Now both come from one query (dashboard.today_totals)."""
    client, secret, account = _signed_in(site, database)
    _spend(site.url, secret, database)
    _resubscribe(database, account)
    page = client.get("/dashboard").text
    shown = re.search(r'data-field="today-requests">([\d,]+)<', page).group(1).replace(",", "")
    assert shown == "1"
    with ws_connect(_ws(site.url) + "/v1/usage/live", additional_headers={"Authorization": f"Bearer {secret}"}) as s:
        live = _usage(s)
    assert live["today"]["requests"] == 1, live["today"]


def test_a_browser_socket_whose_session_ended_is_told_to_sign_in_again(site, database):
    """Was: the page's socket, its session ended (logout, password reset), was closed with
    `key_revoked`, "This API key was revoked.": the key socket's refusal. Now `session_ended`
    (4401), "Sign in again."."""
    client, secret, _ = _signed_in(site, database)
    cookie = f"codeplan_session={client.session}"
    with ws_connect(_ws(site.url) + "/live", additional_headers={"Cookie": cookie}, origin=site.url) as s:
        _usage(s)
        client.post("/logout")
        _spend(site.url, secret, database)
        message = _message(s)
        assert message == {"type": "error", "code": "session_ended", "message": "Sign in again."}, message
        assert _closed_with(s) == 4401


def test_the_dashboard_socket_while_the_database_is_away_is_a_try_again(database, simulator):
    """Was: `/live` looked the session up before the handshake, unguarded: with the database
    away the handshake was answered 403 and nothing logged, while `/v1/usage/live` closed 1013.
    Now both answer `unavailable` and close 1013 (try again), and nothing is logged as an error."""
    proxy = TcpProxy(pg_socket(database))
    server = start_bridge(proxy.url(database), simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0",
                          CODEPLAN_SIGNUP_PLAN="lite", CODEPLAN_SIGNUP_LIMIT="1000")
    try:
        client, _, _ = _signed_in(server, database)
        cookie = f"codeplan_session={client.session}"
        proxy.cut(6.0)
        time.sleep(0.5)
        with ws_connect(_ws(server.url) + "/live", additional_headers={"Cookie": cookie}, origin=server.url,
                        open_timeout=10) as s:
            message = _message(s, timeout=10)
            assert message["type"] == "error" and message["code"] == "unavailable", message
            assert _closed_with(s) == 1013
        errors = [line[:300] for line in server.output().splitlines() if '"level":"error"' in line]
        assert not errors, errors[:2]
    finally:
        server.stop()
        proxy.close()


class _FakeSocket:
    """Just what `sockets._pump` uses of a Litestar WebSocket."""

    def __init__(self, pool, hub) -> None:
        self.app = types.SimpleNamespace(state=types.SimpleNamespace(pool=pool, usage_hub=hub))
        self.sent: list[dict] = []
        self.closed: int | None = None
        self._gone = asyncio.Event()

    async def receive_data(self, mode: str = "text") -> str:
        from litestar.exceptions import WebSocketDisconnect

        await self._gone.wait()
        raise WebSocketDisconnect(detail="gone")

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = code
        self._gone.set()


async def test_a_live_socket_whose_check_meets_a_database_away_closes_try_again(database):
    """Was: the session's or key's check at each change (`_pump`'s `allowed()`) was not guarded:
    a database error there was an unhandled exception in the socket. Now it is `unavailable`,
    close 1013."""
    import asyncpg

    from service.web import live, sockets

    account = (await query(database, "INSERT INTO accounts (email) VALUES ($1) RETURNING id",
                           f"f{uuid.uuid4().hex[:10]}@example.com"))[0]["id"]
    subscription = (await query(database, "INSERT INTO subscriptions (account_id, plan_id, status)"
                                          " VALUES ($1, 'lite', 'active') RETURNING id", account))[0]["id"]
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    hub = live.UsageHub(pool, database)  # not started: only its fan-out is used
    socket = _FakeSocket(pool, hub)

    async def away() -> None:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    try:
        await asyncio.wait_for(sockets._pump(socket, account, subscription, away), 10)
    finally:
        await pool.close()
    assert [m["code"] for m in socket.sent if m["type"] == "error"] == ["unavailable"], socket.sent
    assert socket.closed == 1013
    assert hub.watching == 0


def _sigterm_exits_in_time(server) -> tuple[float, int | None]:
    started = time.monotonic()
    server.process.terminate()
    try:
        server.process.wait(40)
    except Exception:  # noqa: BLE001 - still running: reported below with its stacks
        pass
    return time.monotonic() - started, server.process.poll()


@pytest.mark.parametrize("frozen_after", [0.0, 5.0], ids=["at-start-up", "after-start-up"])
def test_sigterm_with_a_database_that_stopped_answering_exits_in_time(database, simulator, frozen_after):
    """Was: with the database's connections open but silent, SIGTERM never finished: the live
    hub's close of its LISTEN connection, the wait for the cancelled housekeeping task (held in
    asyncpg's release), the last-used writes and the pool's close (service/app.py) each waited
    for an answer without limit. Now each is bounded: the process exits 0, in seconds."""
    proxy = TcpProxy(pg_socket(database))
    server = start_bridge(proxy.url(database), simulator.url + "/api/coding/paas/v4")
    try:
        time.sleep(frozen_after)  # 5 s: start-up's housekeeping and first sweeps are done
        proxy.freeze()
        took, code = _sigterm_exits_in_time(server)
        stacks = server.stacks() if code is None else ""
        assert took < 25 and code == 0, (round(took, 1), code, stacks[-3000:])
    finally:
        proxy.thaw()
        server.stop()
        proxy.close()


def test_an_old_socket_follows_though_another_socket_watches_the_new_subscription(site, database):
    """A notification of a watched subscription moved nobody: a tab opened before the account
    re-subscribed stayed on the old subscription once another socket (a second tab, the IDE's)
    watched the new one."""
    client, secret, account = _signed_in(site, database)
    cookie = f"codeplan_session={client.session}"
    with ws_connect(_ws(site.url) + "/live", additional_headers={"Cookie": cookie}, origin=site.url) as old_tab:
        before = _usage(old_tab)
        new = _resubscribe(database, account)
        assert new != before["subscription_id"]
        # a second tab / the IDE's socket, opened after the new subscription began
        with ws_connect(_ws(site.url) + "/v1/usage/live",
                        additional_headers={"Authorization": f"Bearer {secret}"}) as ide:
            assert _usage(ide)["subscription_id"] == new
            _spend(site.url, secret, database)
            assert _usage(ide, timeout=10)["subscription_id"] == new
            pushed = _usage(old_tab, timeout=10)  # the old tab should move to the new subscription
            assert pushed["subscription_id"] == new, pushed


def test_the_dashboard_says_sign_in_again_when_its_session_ends(browser, site, database):  # noqa: F811
    """The socket closed with session_ended (4401), but the page's script left "Reconnecting…"
    on screen for ever: it now says why live usage stopped."""
    client, secret, account = _signed_in(site, database)
    context = browser.new_context(locale="en-US")
    try:
        host = urlsplit(site.url).hostname
        context.add_cookies([{"name": "codeplan_session", "value": client.session, "domain": host, "path": "/"}])
        page = context.new_page()
        page.goto(site.url + "/dashboard")
        page.wait_for_function("document.querySelector('[data-live-status]').textContent === 'Live'", timeout=15000)
        run(query(database, "DELETE FROM web_sessions WHERE account_id = $1", account))  # e.g. a password reset
        _spend(site.url, secret, database)
        time.sleep(3)
        shown = page.inner_text("[data-live-status]")
        assert shown != "Reconnecting…" and "sign in" in page.inner_text("#windows").lower(), shown
    finally:
        context.close()
