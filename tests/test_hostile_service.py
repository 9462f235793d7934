"""Hostile input to the service's own surfaces (found by a defect hunt): the admin API's values
past their columns, an upstream it cannot serve, web forms whose parts do not decode, static paths
the file system refuses, and signed Stripe webhook bodies PostgreSQL cannot hold. Each is a 4xx in
the caller's shape, never a 500; and no stored upstream profile can stop a start-up."""
from __future__ import annotations

import hashlib
import hmac
import json
import time
import types
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from service import app as service_app

from .conftest import query, run, start_bridge
from .rawhttp import assert_caller_shape, exchange, request

ADMIN = "hostile-admin-token-" + "y" * 24
WHSEC = "whsec_hostile_service_0001"


@pytest.fixture(scope="module")
def srv(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_FAILURE_LIMIT="0",
                          CODEPLAN_ADMIN_TOKEN=ADMIN, STRIPE_WEBHOOK_SECRET=WHSEC)
    yield server
    server.stop()


def log_of(server) -> str:
    return Path(server.log.name).read_text()


def admin(server, method: str, path: str, body=None) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=60)


def refused(server, path: str, answer: httpx.Response, status: int = 400) -> None:
    info = f"\n{answer.status_code} {answer.text[:600]}\nLOG TAIL:\n{log_of(server)[-2000:]}"
    assert answer.status_code == status, info
    assert_caller_shape(path, answer.status_code, answer.headers.get("content-type", ""), answer.content)


# ---- the admin API -----------------------------------------------------------------------------

def plan(**fields) -> dict:
    return {"id": "p" + uuid.uuid4().hex[:8], "name": "x", "window_credits": 1000, "weekly_credits": 5000,
            "monthly_price_cents": 100, "models": ["glm-4.6"], **fields}


@pytest.mark.parametrize("fields", [
    {"monthly_price_cents": 2**31}, {"max_concurrent": 2**31}, {"window_credits": 2**63}, {"weekly_credits": 2**70},
    {"name": "x" * 100_000},
], ids=["price-int32", "concurrent-int32", "window-int64", "weekly-2e70", "name-100k"])
def test_plan_values_past_their_columns_are_refused(srv, fields):
    refused(srv, "/admin/plans", admin(srv, "POST", "/admin/plans", plan(**fields)))
    created = admin(srv, "POST", "/admin/plans", plan())
    assert created.status_code == 201, created.text
    path = "/admin/plans/" + created.json()["id"]
    refused(srv, path, admin(srv, "PATCH", path, fields))


@pytest.mark.parametrize("body", [
    {"base_url": "http://[::1/v1"}, {"base_url": "http://a b/"}, {"base_url": "http://"},
    {"base_url": "http://127.0.0.1:99999/v1"}, {"base_url": "http://127.0.0.1:9/v1", "concurrency": 2**31},
    {"base_url": "http://127.0.0.1:9/v1", "concurrency": 10**8},
], ids=["ipv6-unclosed", "space", "no-host", "port-99999", "concurrency-int32", "concurrency-1e8"])
def test_an_upstream_that_cannot_be_served_is_refused_and_not_stored(srv, database, body):
    name = "bad-" + uuid.uuid4().hex[:6]
    refused(srv, "/admin/upstreams", admin(srv, "POST", "/admin/upstreams", {"name": name, "keys": ["k1"], **body}))
    assert not run(query(database, "SELECT 1 FROM upstream_profiles WHERE name = $1", name))
    assert admin(srv, "GET", "/admin/upstreams").status_code == 200


def test_a_stored_profile_that_cannot_be_served_does_not_stop_a_start(fresh_database, simulator):
    """A row an older version let in (its checks were fewer): the process starts and serves
    without it, and says so once."""
    run(query(fresh_database, "INSERT INTO upstream_profiles (name, definition) VALUES"
                              " ('old-bad', '{\"name\": \"old-bad\", \"base_url\": \"http://[::1/v1\"}'::jsonb),"
                              " ('old-huge', '{\"name\": \"old-huge\", \"base_url\": \"http://127.0.0.1:9/v1\","
                              " \"concurrency\": 2147483648}'::jsonb)"))
    run(query(fresh_database, "INSERT INTO upstream_keys (profile, fingerprint, secret) VALUES"
                              " ('old-bad', 'f1', 'k1'), ('old-huge', 'f2', 'k2')"))
    server = start_bridge(fresh_database, simulator.url + "/api/coding/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN,
                          CODEPLAN_UPSTREAM_REFRESH="0.2")
    try:
        names = [p["name"] for p in admin(server, "GET", "/admin/upstreams").json()]
        assert "old-bad" not in names and "old-huge" not in names and names
        time.sleep(1)  # refreshes meanwhile: still served, said once
        log = log_of(server)
        assert log.count("stored upstream profile left out") == 2, log[-3000:]
        assert "k1" not in log.replace('"k1"', "")  # the key itself is never logged
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    finally:
        server.stop()


def test_only_a_number_past_its_column_is_the_callers_fault():
    """asyncpg wraps every encoder failure in one DataError: a number past an int32 or int64
    column is the caller's (400); a str where an int goes is our bug and stays a 500."""
    request = types.SimpleNamespace(url=types.SimpleNamespace(path="/admin/plans"))
    overflow = asyncpg.exceptions.DataError("invalid input for query argument $1: 2147483648 (value out of int32 range)")
    overflow.__cause__ = OverflowError("value out of int32 range")
    assert service_app._unencodable(request, overflow).status_code == 400
    ours = asyncpg.exceptions.DataError("invalid input for query argument $1: 'x' (an integer is required)")
    ours.__cause__ = TypeError("an integer is required")
    assert service_app._unencodable(request, ours).status_code == 500
    server_side = asyncpg.exceptions.DivisionByZeroError("division by zero")
    assert service_app._unencodable(request, server_side).status_code == 500


# ---- the web page ------------------------------------------------------------------------------

UNDECODABLE = {
    "bad-utf8": b'--x\r\nContent-Disposition: form-data; name="email"\r\n\r\n\xff\r\n--x--\r\n',
    "unknown-charset": b'--x\r\nContent-Disposition: form-data; name="lang"\r\n'
                       b'Content-Type: text/plain; charset=nope-42\r\n\r\nen\r\n--x--\r\n',
    "punycode": b'--x\r\nContent-Disposition: form-data; name="lang"\r\n'
                b'Content-Type: text/plain; charset=punycode\r\n\r\n\xff\xfe-\r\n--x--\r\n',
    "charset-with-nul": b'--x\r\nContent-Disposition: form-data; name="lang"\r\n'
                        b'Content-Type: text/plain; charset="latin1\x00"\r\n\r\nen\r\n--x--\r\n',
}


@pytest.mark.parametrize("body", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
@pytest.mark.parametrize("path", ["/lang", "/login", "/signup", "/forgot", "/reset", "/logout", "/keys",
                                  "/keys/1/revoke", "/billing/checkout", "/verify/resend"])
def test_a_form_part_that_does_not_decode_is_a_400(srv, path, body):
    """Anonymous, no CSRF token needed: the CSRF middleware reads the form before any handler."""
    answer = exchange(srv.port, request("POST", path, body, {"Content-Type": "multipart/form-data; boundary=x",
                                                            "Accept": "text/html"}), timeout=30)
    assert answer.status == 400, (answer, log_of(srv)[-1500:])


@pytest.mark.parametrize("path", ["/static/%00", "/static/app.css%00.js", "/static/" + "a" * 300,
                                  "/static/" + "a/" * 3000, "/static/app.css/x"],
                         ids=["nul", "nul-inside", "name-too-long", "path-too-long", "not-a-directory"])
def test_a_static_path_the_file_system_refuses_is_not_found(srv, path):
    answer = exchange(srv.port, request("GET", path, b"", {}), timeout=30)
    assert answer.status == 404, (answer, log_of(srv)[-1500:])


# ---- Stripe's webhook, signed ------------------------------------------------------------------

def sign(payload: bytes) -> str:
    t = int(time.time())
    return f"t={t},v1=" + hmac.new(WHSEC.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()


def event(**fields) -> dict:
    return {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": "customer.subscription.updated",
            "created": int(time.time()), "livemode": False,
            "data": {"object": {"id": "sub_x", "object": "subscription"}}, **fields}


@pytest.mark.parametrize("payload, status", [
    (json.dumps(event(created=2**70)).encode(), 400),
    (json.dumps(event(created=10**15)).encode(), 400),
    (json.dumps(event(created=-10**13)).encode(), 400),
    (json.dumps(event(id="evt_\u0000")).encode(), 400),
    (b'{"id": "evt_1", "object": "event", "type": "x", "created": 1, "data": {"object": '
     + b"[" * 100_000 + b"]" * 100_000 + b"}}", 400),
    # text a customer gave Stripe may hold a NUL: the event is kept (as U+FFFD), not refused
    (json.dumps(event(data={"object": {"id": "sub_x", "object": "subscription", "note": "a\u0000b"}})).encode(), 200),
], ids=["created-2e70", "created-1e15", "created-negative", "nul-in-id", "deep", "nul-in-the-object"])
def test_signed_webhook_bodies_postgresql_cannot_hold(srv, database, payload, status):
    answer = httpx.post(srv.url + "/stripe/webhook", content=payload, timeout=30,
                        headers={"content-type": "application/json", "stripe-signature": sign(payload)})
    assert answer.status_code == status, (answer.status_code, answer.text[:300], log_of(srv)[-1500:])
    if status == 200:
        kept = run(query(database, "SELECT payload->'data'->'object'->>'note' AS note FROM stripe_events"
                                   " WHERE id = $1", json.loads(payload)["id"]))
        assert kept[0]["note"] == "a\ufffdb"
    else:
        assert answer.headers["content-type"].startswith("application/problem+json")
