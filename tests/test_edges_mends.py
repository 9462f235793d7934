"""Edges mended: what a request's encoding, a model's retrieval, two credentials in one request,
a stranger's big WebSocket frame or webhook post, a suspended account's socket and an operator's
plan change each get.

1. A body with a Content-Encoding is refused for its encoding (415, in the surface's shape), not
   as "not valid JSON".
2. `GET /v1/models/{model}` (OpenAI's and Anthropic's models.retrieve) answers the model, or a
   404 naming it; never "point the tool's base URL at /v1".
3. A request with two credentials is judged alike on every path (the first of each counts).
4. The live-usage sockets take messages of 64 KiB at most, before the key is known; the
   Responses socket keeps the body limit.
5. The Stripe webhook refuses a post without a signature before reading its body, and a body
   over 1 MiB with a 413.
6. A Responses socket whose turn is refused because its account is suspended is closed.
7. An operator's plan change reaches the live sockets at once.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import json
import socket
import time
import uuid
import zlib
from pathlib import Path

import asyncpg
import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from service import accounts

from .conftest import query, run, start_bridge, wait_settled
from .rawhttp import exchange, read_answer, request
from .web_support import Browserish

ADMIN = "edges-mends-admin-" + "q" * 24
WEBHOOK_SECRET = "whsec_edgesmends0123456789abcdef"
BETA = {"openai-beta": "responses_websockets=2026-02-06"}


@pytest.fixture(scope="module")
def srv(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_FAILURE_LIMIT="0",
                          CODEPLAN_ADMIN_TOKEN=ADMIN, STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
                          CODEPLAN_SIGNUP_PLAN="lite", CODEPLAN_SIGNUP_LIMIT="1000")
    yield server
    server.stop()


def _user(database: str, plan: str = "pro") -> accounts.NewKey:
    async def create():
        conn = await asyncpg.connect(database)
        try:
            return await accounts.create_user(conn, f"{uuid.uuid4().hex[:10]}@example.com", plan)
        finally:
            await conn.close()
    return run(create())


def _ws(server, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def _closed_with(ws, timeout: float = 10.0) -> tuple[int | None, str]:
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as closed:
        return (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (None, "")


CHAT = {"model": "glm-4.6", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "glm-4.6", "max_output_tokens": 16, "input": "hi"}


# ---- 1. a compressed body ------------------------------------------------------------------

@pytest.mark.parametrize("path, document", [
    ("/v1/chat/completions", CHAT), ("/v1/messages", CHAT), ("/v1/messages/count_tokens", CHAT),
    ("/v1/responses", RESPONSES)])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd", "identity, gzip"])
def test_a_body_with_a_content_encoding_is_refused_for_its_encoding(srv, database, path, document, encoding):
    key = _user(database).key
    plain = json.dumps(document).encode()
    body = zlib.compress(plain) if encoding == "deflate" else gzip.compress(plain)  # (zstd: not zstd)
    answer = exchange(srv.port, request("POST", path, body, {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Encoding": encoding}),
        timeout=30)
    said = answer.json()
    assert answer.status == 415, answer
    named = encoding.rpartition(" ")[2]
    assert "not valid JSON" not in said["error"]["message"] and f"({named}," in said["error"]["message"], said
    if path.startswith("/v1/messages"):
        assert said["type"] == "error" and said["error"]["type"] == "invalid_request_error", said
    else:
        assert said["error"]["code"] == "unsupported_content_encoding", said


def test_an_identity_encoding_is_served_and_a_stranger_is_refused_for_its_key_first(srv, database):
    key = _user(database).key
    body = json.dumps(CHAT).encode()
    answer = exchange(srv.port, request("POST", "/v1/chat/completions", body, {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Encoding": "identity"}),
        timeout=60)
    assert answer.status == 200, answer
    answer = exchange(srv.port, request("POST", "/v1/chat/completions", gzip.compress(body), {
        "Authorization": "Bearer cp_nobody", "Content-Encoding": "gzip"}), timeout=30)
    assert answer.status == 401, answer


# ---- 2. retrieving a model -----------------------------------------------------------------

PREFIXES = ["/v1", "", "/api/coding/paas/v4", "/api/paas/v4"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_model_is_retrieved_as_the_list_shows_it(srv, database, prefix):
    key = _user(database).key
    listed = httpx.get(srv.url + prefix + "/models", headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    for asked in ("glm-4.6", "GLM-4.5-Air"):
        answer = httpx.get(srv.url + f"{prefix}/models/{asked}", headers={"authorization": f"Bearer {key}"},
                           timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json() == next(m for m in listed["data"] if m["id"] == asked.lower())
    # without a key, as the list: every model served (tools probe before they are configured)
    assert httpx.get(srv.url + f"{prefix}/models/glm-4.5", timeout=30).json()["id"] == "glm-4.5"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_model_not_served_is_a_404_naming_it_not_a_wrong_base_url(srv, database, prefix):
    plan = "p_" + uuid.uuid4().hex[:8]
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models)"
                        " VALUES ($1, $1, 1000000, 5000000, 0, ARRAY['glm-4.6'])", plan))
    key = _user(database, plan).key
    for asked in ("gpt-4o", "glm-4.5"):  # not served at all; served, not on this plan
        answer = httpx.get(srv.url + f"{prefix}/models/{asked}", headers={"authorization": f"Bearer {key}"},
                           timeout=30)
        error = answer.json()["error"]
        assert answer.status_code == 404, answer.text
        assert error["code"] == "model_not_found" and error["param"] == "model", error
        assert f"`{asked}`" in error["message"] and "base URL" not in error["message"], error
        assert "glm-4.6" in error["message"], error  # what the plan does serve
    answer = httpx.get(srv.url + f"{prefix}/models/glm-4.6", headers={"authorization": "Bearer cp_nobody"}, timeout=30)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key", answer.text


# ---- 3. two credentials in one request -----------------------------------------------------

def _raw(port: int, method: str, path: str, headers: list[str], body: bytes = b"") -> int:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *headers]
    return exchange(port, ("\r\n".join(head) + "\r\n\r\n").encode() + body, timeout=60).status


def _usage_socket_authenticated(srv, headers: list[tuple[str, str]]) -> bool:
    with connect(_ws(srv, "/v1/usage/live"), additional_headers=headers, open_timeout=30) as ws:
        return json.loads(ws.recv(timeout=30))["type"] == "usage"


def _responses_socket_authenticated(srv, headers: list[tuple[str, str]]) -> bool:
    try:
        with connect(_ws(srv, "/v1/responses"), additional_headers=[*headers, *BETA.items()], open_timeout=30):
            return True
    except InvalidStatus as refused:
        assert refused.response.status_code == 401
        return False


@pytest.mark.parametrize("credentials, authenticated", [
    ([("x-api-key", "{key}"), ("x-api-key", "cp_junk")], True),
    ([("x-api-key", "cp_junk"), ("x-api-key", "{key}")], False),
    ([("Authorization", "Basic dXNlcjpwYXNz"), ("Authorization", "Bearer {key}")], True),
    ([("Authorization", "Bearer {key}"), ("Authorization", "Bearer cp_junk")], True),
    ([("Authorization", "Bearer cp_junk"), ("Authorization", "Bearer {key}")], False),
    ([("x-api-key", "cp_junk"), ("Authorization", "Bearer {key}")], True),  # the Bearer wins
    ([("Authorization", "Bearer cp_junk"), ("x-api-key", "{key}")], False),
], ids=["key-then-junk", "junk-then-key", "basic-then-bearer", "bearer-then-junk", "junk-then-bearer",
        "junk-key-and-bearer", "junk-bearer-and-key"])
def test_one_request_with_two_credentials_is_judged_alike_on_every_path(srv, database, credentials, authenticated):
    """The first Bearer, else the first `x-api-key`, on the hot paths, the framework's routes,
    the guards (billing's, the admin API's) and both sockets."""
    key = _user(database).key
    pairs = [(name, value.format(key=key)) for name, value in credentials]
    lines = [f"{name}: {value}" for name, value in pairs]
    body = json.dumps(CHAT).encode()
    statuses = {
        "/v1/messages": _raw(srv.port, "POST", "/v1/messages", lines, body),
        "/v1/chat/completions": _raw(srv.port, "POST", "/v1/chat/completions", lines, body),
        "count_tokens": _raw(srv.port, "POST", "/v1/messages/count_tokens", lines, body),
        "/v1/models": _raw(srv.port, "GET", "/v1/models", lines),
        "/v1/models/glm-4.6": _raw(srv.port, "GET", "/v1/models/glm-4.6", lines),
        "/v1/usage": _raw(srv.port, "GET", "/v1/usage", lines),
        "/v1/billing": _raw(srv.port, "GET", "/v1/billing", lines),
        "/admin/users": _raw(srv.port, "GET", "/admin/users", lines),  # a user's key: 403, a stranger 401
    }
    judged = {path: status != 401 for path, status in statuses.items()}
    judged["usage socket"] = _usage_socket_authenticated(srv, pairs)
    judged["responses socket"] = _responses_socket_authenticated(srv, pairs)
    assert judged == dict.fromkeys(judged, authenticated), statuses
    assert statuses["/admin/users"] == (403 if authenticated else 401)


# ---- 4. a stranger's big WebSocket message -------------------------------------------------

def test_the_usage_socket_refuses_a_first_message_over_64_kib_from_its_header(srv):
    with connect(_ws(srv, "/v1/usage/live"), max_size=None, open_timeout=30) as ws:
        ws.send('{"type": "auth", "key": "' + "x" * (65 * 1024) + '"}')
        code, _ = _closed_with(ws)
    assert code == 1009  # message too big; not the 4401 (no such key) of a message read whole


def test_the_pages_live_socket_refuses_a_message_over_64_kib(srv):
    page = Browserish(srv.url)
    assert page.sign_up(f"u{uuid.uuid4().hex[:10]}@example.com").url.path == "/setup"
    with connect(_ws(srv, "/live"), additional_headers={"Cookie": f"codeplan_session={page.session}"},
                 origin=srv.url, max_size=None, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "usage"
        ws.send("x" * (65 * 1024))  # read and dropped whole, were it let in
        code, _ = _closed_with(ws)
    assert code == 1009


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/responses/", "/v1/responses?x=1"])
def test_the_responses_socket_keeps_the_body_limit(srv, database, path):
    """On every spelling the router serves it by (a trailing slash was held to 64 KiB: the socket
    was accepted, then closed 1009 at its first large turn)."""
    key = _user(database).key
    turn = {"type": "response.create", "model": "glm-4.6", "max_output_tokens": 8,
            "input": "[[sim tokens=2 reasoning=0]] " + "lorem ipsum " * 30_000}  # ~360 KB
    with connect(_ws(srv, path), additional_headers={"authorization": f"Bearer {key}", **BETA},
                 max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps(turn))
        while (event := json.loads(ws.recv(timeout=60)))["type"] not in (
                "response.completed", "response.failed", "error"):
            pass
    assert event["type"] == "response.completed", event


def _rss(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in status.splitlines())
            if k in ("VmRSS", "VmHWM")}


def test_strangers_30mb_first_frames_on_the_usage_socket_keep_the_server_flat(database, simulator):
    """SECURITY.md: a stranger cannot make the server read, hold or parse megabytes. Was: eight
    30 MB `auth` frames took the server from ~150 MB to ~870 MB."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    try:
        frame = '{"type": "auth", "key": "' + "x" * (30 << 20) + '"}'

        def one(_: int) -> str:
            try:
                with connect(_ws(server, "/v1/usage/live"), max_size=None, open_timeout=60,
                             close_timeout=60) as ws:
                    ws.send(frame)
                    return str(_closed_with(ws, 60)[0])
            except (OSError, ConnectionClosed) as exc:
                return type(exc).__name__
        before = _rss(server.process.pid)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        after = _rss(server.process.pid)
    finally:
        server.stop()
    assert after["VmHWM"] - before["VmHWM"] < 100, (before, after, answers)


# ---- 5. the Stripe webhook -----------------------------------------------------------------

def _head_only(port: int, headers: dict[str, str], length: int, timeout: float = 5.0):
    """A webhook post whose head announces `length` bytes, none of which is sent: the answer, if
    the server gives one without reading the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = ["POST /stripe/webhook HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                f"Content-Length: {length}", *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        return read_answer(sock, timeout)


def test_an_unsigned_webhook_post_is_refused_before_its_body_is_read(srv):
    answer = _head_only(srv.port, {}, 30 << 20)
    assert answer.status == 400 and "Stripe-Signature" in answer.json()["detail"], answer


def test_a_webhook_body_over_a_mib_is_a_413(srv):
    signed = {"Stripe-Signature": f"t={int(time.time())},v1={'0' * 64}"}
    answer = _head_only(srv.port, signed, (1 << 20) + 1)  # announced: refused before a byte
    assert answer.status == 413, answer
    assert answer.headers["content-type"].startswith("application/problem+json"), answer
    # chunked, no length announced: refused once it passes the limit
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        head = ["POST /stripe/webhook HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                "Transfer-Encoding: chunked", *(f"{k}: {v}" for k, v in signed.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        chunk = b"x" * 65536
        try:
            for _ in range(24):  # 1.5 MiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # refused and closed while the rest was on its way
        answer = read_answer(sock, 10)
    assert answer.status == 413, answer
    # a small signed post is still read and judged by its signature
    answer = exchange(srv.port, request("POST", "/stripe/webhook", b'{"id": "evt_1"}', signed), timeout=10)
    assert answer.status == 400 and "signature" in answer.json()["detail"], answer


# ---- 6. a suspended account --------------------------------------------------------------

def test_a_suspended_accounts_responses_socket_is_closed_at_its_first_refused_turn(srv, database):
    user = _user(database)
    headers = {"authorization": f"Bearer {user.key}", **BETA}
    # the key known (and its principal cached) while the account could spend
    assert httpx.get(srv.url + "/v1/models", headers=headers, timeout=30).status_code == 200
    run(query(database, "UPDATE accounts SET suspended_at = now() WHERE id = $1", user.account_id))
    # its own figures stay readable, as its pages do
    assert httpx.get(srv.url + "/v1/usage", headers=headers, timeout=30).status_code == 200
    with connect(_ws(srv, "/v1/responses"), additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "glm-4.6", "input": "hi"}))
        event = json.loads(ws.recv(timeout=30))
        assert (event["type"], event["status"], event["error"]["code"]) == ("error", 403, "account_suspended"), event
        assert _closed_with(ws) == (1008, "account_suspended")
    # and over HTTP, the same refusal
    answer = httpx.post(srv.url + "/v1/responses", headers=headers, json=RESPONSES, timeout=30)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "account_suspended", answer.text


def test_a_turn_refused_for_itself_keeps_the_socket(srv, database):
    """Only a key that cannot spend at all loses its socket: a bad turn is the turn's."""
    key = _user(database).key
    with connect(_ws(srv, "/v1/responses"), additional_headers={"authorization": f"Bearer {key}", **BETA},
                 open_timeout=30) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-nothing", "input": "hi"}))
        assert json.loads(ws.recv(timeout=30))["status"] == 404
        ws.send(json.dumps({"type": "response.create", "model": "glm-4.6", "max_output_tokens": 8,
                            "input": "[[sim tokens=2 reasoning=0]] hi"}))
        while (event := json.loads(ws.recv(timeout=30)))["type"] not in ("response.completed", "error"):
            pass
        assert event["type"] == "response.completed", event


# ---- 7. an operator's plan change ----------------------------------------------------------

def test_an_operators_plan_change_reaches_the_live_socket_at_once(srv, database):
    user = _user(database, "lite")
    headers = {"authorization": f"Bearer {user.key}"}
    # a request first, so the 5-hour and weekly windows are open (a change reaches open windows)
    answer = httpx.post(srv.url + "/v1/chat/completions", headers=headers, json=CHAT, timeout=60)
    assert answer.status_code == 200, answer.text
    wait_settled(database)
    pro = run(query(database, "SELECT window_tokens, weekly_tokens FROM plans WHERE id = 'pro'"))[0]
    with connect(_ws(srv, "/v1/usage/live"), additional_headers=headers, open_timeout=30) as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["plan"] == "lite" and first["windows"], first
        changed = httpx.patch(srv.url + f"/admin/users/{user.account_id}", json={"plan": "pro"},
                              headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert changed.status_code == 200, changed.text
        # pushed when the change commits, not at the next settlement (nor the 15 s liveness check,
        # which sends nothing)
        pushed = json.loads(ws.recv(timeout=5))
    assert pushed["plan"] == "pro", pushed
    assert {w["kind"]: w["allowance"] for w in pushed["windows"]} == {
        "5h": pro["window_tokens"], "week": pro["weekly_tokens"]}, pushed
