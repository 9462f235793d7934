"""A suspended account's Responses WebSocket is refused at its handshake, with the status and body
its HTTP requests get (403 `account_suspended`). The principal said nothing of a suspension, so the
handshake let the socket open and only its first turn was refused (then the socket closed); Codex
took the open socket for a working transport. Restored, the account connects at once (a suspended
principal is not cached); suspended, the handshake refuses within the key cache's lifetime (until
then, as before, its first turn is refused and the socket closed: no turn is ever served)."""
from __future__ import annotations

import json
import time
import uuid

import asyncpg
import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service import accounts

from .conftest import run, start_bridge

ADMIN = "suspended-socket-admin-" + "q" * 24
BETA = {"openai-beta": "responses_websockets=2026-02-06"}
CACHE_TTL = 1.0
RESPONSES = {"model": "glm-4.6", "max_output_tokens": 16, "input": "[[sim tokens=3 reasoning=0]] hi"}


@pytest.fixture(scope="module")
def srv(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN,
                          CODEPLAN_AUTH_CACHE_TTL=str(CACHE_TTL))
    yield server
    server.stop()


def _user(database: str) -> accounts.NewKey:
    async def create():
        conn = await asyncpg.connect(database)
        try:
            return await accounts.create_user(conn, f"{uuid.uuid4().hex[:10]}@example.com", "pro")
        finally:
            await conn.close()
    return run(create())


def _admin(server, action: str, account_id: int) -> None:
    answer = httpx.post(f"{server.url}/admin/users/{account_id}/{action}", timeout=30,
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text


def _handshake(server, key: str) -> tuple[int, dict]:
    """The upgrade's answer: 101 (then a turn is served: its last event's type) or the refusal."""
    url = server.url.replace("http://", "ws://") + "/v1/responses"
    try:
        with connect(url, additional_headers={"authorization": f"Bearer {key}", **BETA}, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "response.create", **RESPONSES}))
            while (event := json.loads(ws.recv(timeout=30)))["type"] not in (
                    "response.completed", "response.failed", "error"):
                pass
            return 101, event
    except InvalidStatus as refused:
        return refused.response.status_code, json.loads(refused.response.body)


def _http(server, key: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
                      json=RESPONSES, timeout=30)


def test_a_suspended_accounts_socket_is_refused_at_its_handshake_as_its_requests_are(srv):
    user = _user(srv.env["CODEPLAN_DATABASE_URL"])
    _admin(srv, "suspend", user.account_id)
    told = _http(srv, user.key)
    assert told.status_code == 403 and told.json()["error"]["code"] == "account_suspended", told.text
    status, body = _handshake(srv, user.key)
    assert status == 403, (status, body)  # not 101, then a refused turn
    assert body == told.json(), (body, told.text)  # the very answer its HTTP request got
    # restored: it connects at once and is served (a suspended principal was not cached)
    _admin(srv, "restore", user.account_id)
    status, event = _handshake(srv, user.key)
    assert (status, event.get("type")) == (101, "response.completed"), (status, event)


def test_a_suspension_reaches_the_handshake_within_the_key_cache(srv):
    user = _user(srv.env["CODEPLAN_DATABASE_URL"])
    assert _handshake(srv, user.key)[0] == 101  # its principal cached while it could spend
    _admin(srv, "suspend", user.account_id)
    assert _http(srv, user.key).status_code == 403  # at once over HTTP (the admission), as before
    time.sleep(CACHE_TTL + 0.5)
    status, body = _handshake(srv, user.key)
    assert (status, body["error"]["code"]) == (403, "account_suspended"), (status, body)
