"""A body sent with a Content-Encoding to the service's own JSON API (the admin API, /v1/billing)
is refused for its encoding: 415, in the service's problem details, naming the encoding, with the
bridge's code `unsupported_content_encoding`; never "not valid JSON" (which sent its caller after
JSON that is fine). `identity`, or no Content-Encoding, is served as before; a route that reads no
body (GET /v1/usage) is served whatever the header says. The web page's forms and Stripe's webhook
answer an encoded body with a 4xx of their own, never a 500. The check is the service's only
(service/strict_input.py): the bridge's paths answer their own 415, in the tool's protocol, and
never pass it.
"""
from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import time
import uuid
import zlib
from pathlib import Path

import asyncpg
import httpx
import pytest

from service import accounts

from .conftest import run, start_bridge
from .rawhttp import exchange, request
from .web_support import Browserish

ADMIN = "content-encoding-admin-" + "e" * 24
WHSEC = "whsec_content_encoding_0001"


@pytest.fixture(scope="module")
def srv(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_FAILURE_LIMIT="0",
                          CODEPLAN_ADMIN_TOKEN=ADMIN, STRIPE_WEBHOOK_SECRET=WHSEC)
    yield server
    server.stop()


def log_of(server) -> str:
    return Path(server.log.name).read_text()


def _key(database: str) -> str:
    async def create():
        conn = await asyncpg.connect(database)
        try:
            return (await accounts.create_user(conn, f"{uuid.uuid4().hex[:10]}@example.com", "pro")).key
        finally:
            await conn.close()
    return run(create())


def _plan() -> dict:
    return {"id": "ce" + uuid.uuid4().hex[:8], "name": "Encoded", "window_credits": 1000, "weekly_credits": 5000,
            "monthly_price_cents": 100, "models": ["glm-4.6"]}


# (encoding header, how the body is encoded, the coding the answer names)
ENCODINGS = {
    "gzip": ("gzip", gzip.compress, "gzip"),
    "deflate": ("deflate", zlib.compress, "deflate"),
    "br-uppercase": ("BR", lambda body: body, "br"),
    "identity-then-gzip": ("identity, gzip", gzip.compress, "gzip"),
}


def _send(srv, method: str, path: str, body: bytes, headers: dict[str, str]):
    return exchange(srv.port, request(method, path, body, headers), timeout=30)


def _refused_for_its_encoding(srv, answer, named: str) -> dict:
    info = (answer, log_of(srv)[-1500:])
    assert answer.status == 415, info
    assert answer.headers["content-type"].startswith("application/problem+json"), info
    said = answer.json()
    assert said["status"] == 415 and said["title"] == "Unsupported Media Type", said
    assert said["code"] == "unsupported_content_encoding", said  # the bridge's code, as README says
    assert f"({named}," in said["detail"] and "not valid JSON" not in said["detail"], said
    assert "malformed" not in said["detail"], said
    return said


# ---- the admin API -----------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_the_admin_api_refuses_an_encoded_body_for_its_encoding(srv, encoding):
    header, encode, named = ENCODINGS[encoding]
    new = _plan()
    body = encode(json.dumps(new).encode())
    answer = _send(srv, "POST", "/admin/plans", body, {
        "Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json", "Content-Encoding": header})
    _refused_for_its_encoding(srv, answer, named)
    # refused before anything was done with it
    assert httpx.get(srv.url + f"/admin/plans/{new['id']}", headers={"authorization": f"Bearer {ADMIN}"},
                     timeout=30).status_code in (404, 405)
    # a change too (PATCH)
    answer = _send(srv, "PATCH", "/admin/plans/pro", encode(b'{"name": "Pro"}'), {
        "Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json", "Content-Encoding": header})
    _refused_for_its_encoding(srv, answer, named)


def test_the_admin_api_serves_identity_and_no_encoding_as_before(srv):
    for headers in ({"Content-Encoding": "identity"}, {"Content-Encoding": "Identity , identity"}, {}):
        new = _plan()
        answer = _send(srv, "POST", "/admin/plans", json.dumps(new).encode(), {
            "Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json", **headers})
        assert answer.status == 201, (answer, log_of(srv)[-1500:])
        assert answer.json()["id"] == new["id"]
    # and a body that is not JSON is still refused as such
    answer = _send(srv, "POST", "/admin/plans", b"{not json", {
        "Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json", "Content-Encoding": "identity"})
    assert answer.status == 400, answer


def test_a_stranger_is_refused_for_its_credential_first(srv):
    """As on the bridge: the encoding is looked at once the caller is known."""
    answer = _send(srv, "POST", "/admin/plans", gzip.compress(json.dumps(_plan()).encode()), {
        "Authorization": "Bearer not-the-admin-token", "Content-Type": "application/json",
        "Content-Encoding": "gzip"})
    assert answer.status == 401, answer
    answer = _send(srv, "POST", "/v1/billing/checkout", gzip.compress(b'{"plan": "pro"}'), {
        "Authorization": "Bearer cp_nobody", "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert answer.status == 401, answer


# ---- /v1/billing -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [("/v1/billing/checkout", {"plan": "pro"}),
                                        ("/v1/billing/topup", {"block": 20000000})])
def test_the_billing_api_refuses_an_encoded_body_for_its_encoding(srv, database, path, body):
    key = _key(database)
    answer = _send(srv, "POST", path, gzip.compress(json.dumps(body).encode()), {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Encoding": "gzip"})
    _refused_for_its_encoding(srv, answer, "gzip")
    # unencoded, it gets as far as billing (off here: a 503 saying so)
    answer = _send(srv, "POST", path, json.dumps(body).encode(), {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Encoding": "identity"})
    assert answer.status == 503 and answer.json()["title"] == "Billing is off", answer


# ---- what reads no body ------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/usage", 200), ("GET", "/v1/billing", 200), ("GET", "/api/monitor/usage/quota/limit", 200),
    ("GET", "/api/monitor/usage/model-usage", 200),
    ("POST", "/v1/billing/portal", 503)])  # billing is off here: it says so, encoded or not
def test_a_request_whose_body_is_not_read_is_served_as_before(srv, database, method, path, status):
    """A route that takes no body reads none: a Content-Encoding there describes nothing it uses."""
    key = _key(database)
    for headers in ({"Content-Encoding": "gzip"}, {}):
        answer = _send(srv, method, path, gzip.compress(b"{}") if headers else b"", {
            "Authorization": f"Bearer {key}", **headers})
        assert answer.status == status, (answer, log_of(srv)[-1500:])


# ---- the web page's forms ----------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("path", ["/login", "/signup", "/forgot", "/lang"])
def test_an_encoded_form_is_never_a_500(srv, path, content_type):
    """No browser compresses a form. Whatever sends one gets the page's own refusal (the CSRF
    token is not found in it: 403; a multipart form that does not parse: 400; the language form
    falls back to its default: 303), never a failure of the server."""
    browser = Browserish(srv.url)
    try:
        browser.get("/login")
        form = f"email=someone%40example.com&password=x&lang=en&_csrf_token={browser.token}".encode()
        if content_type.startswith("multipart"):
            form = (b'--x\r\nContent-Disposition: form-data; name="_csrf_token"\r\n\r\n'
                    + browser.token.encode() + b"\r\n--x--\r\n")
        answer = browser.client.post(path, content=gzip.compress(form), follow_redirects=False,
                                     headers={"content-type": content_type, "content-encoding": "gzip"})
    finally:
        browser.close()
    info = (answer.status_code, answer.text[:300], log_of(srv)[-1500:])
    assert 300 <= answer.status_code < 500, info
    if answer.status_code >= 400:
        assert answer.headers["content-type"].startswith("text/html"), info
    assert "unhandled error" not in log_of(srv), info


# ---- Stripe's webhook --------------------------------------------------------------------------

def test_a_signed_gzip_webhook_body_is_a_4xx(srv):
    """Stripe sends its events unencoded, signed over the raw bytes: an encoded body is not one of
    its events (and nothing decodes it); whatever it is, never a 500."""
    event = {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": "customer.subscription.updated",
             "created": int(time.time()), "livemode": False,
             "data": {"object": {"id": "sub_x", "object": "subscription"}}}
    payload = gzip.compress(json.dumps(event).encode())
    t = int(time.time())
    signature = f"t={t},v1=" + hmac.new(WHSEC.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    answer = httpx.post(srv.url + "/stripe/webhook", content=payload, timeout=30, headers={
        "content-type": "application/json", "content-encoding": "gzip", "stripe-signature": signature})
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300], log_of(srv)[-1500:])


# ---- the bridge's paths keep their own refusal -------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses",
                                  "/v1/messages/count_tokens", "/v1/chat/completions/"])
def test_the_bridge_answers_in_the_tools_protocol(srv, database, path):
    key = _key(database)
    answer = _send(srv, "POST", path, gzip.compress(b'{"model": "glm-4.6"}'), {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Encoding": "gzip",
        "anthropic-version": "2023-06-01"})
    assert answer.status == 415, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    said = answer.json()
    assert "(gzip," in json.dumps(said) and "status" not in said, said


def test_every_service_route_that_takes_a_body_checks_its_encoding_and_no_bridge_route_does():
    """Where the check lives (strict_input, a before_request hook): on every route of the service's
    own API with a body (`data`), and on none of the bridge's, whose hot paths (chat, messages,
    responses) do not even pass through Litestar's routing (service/app.py `CodeplanApp`)."""
    from bridge import app as bridge_app
    from service import config as config_module
    from service.app import create_app
    from service.strict_input import strict_input

    app = create_app(config_module.load({}), "postgresql://nobody@/nowhere", "http://127.0.0.1:9", ("k",))
    bridge_paths = {route.path for route in bridge_app.router.routes}
    assert {"/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/messages/count_tokens",
            "/v1/models"} <= bridge_paths
    with_body = set()
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            hook = handler.resolve_before_request() if hasattr(handler, "resolve_before_request") else None
            if route.path in bridge_paths:
                # and no layer of its own: the app's (the throttle gate) only
                assert hook is not strict_input and len(handler.resolve_middleware()) == len(app.middleware), route.path
            elif "data" in handler.parsed_fn_signature.parameters:
                assert hook is strict_input, route.path
                with_body.add(route.path)
    assert {"/admin/plans", "/admin/plans/{plan_id:str}", "/admin/users/{account_id:int}",
            "/v1/billing/checkout", "/v1/billing/topup"} <= with_body
    assert set(bridge_app.HOT_ROUTES) >= {"/v1/chat/completions", "/v1/messages", "/v1/responses"}
