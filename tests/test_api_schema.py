"""schemathesis against the OpenAPI schema the app serves for its own JSON API (service/openapi.py):
every operation, with examples generated from the schema, valid and not, must get no 5xx and an
answer that conforms to the schema (status documented, content type, body, headers).

Bounded for CI: CODEPLAN_SCHEMA_EXAMPLES examples per operation (25 by default; raise it to
search harder locally, with CODEPLAN_SCHEMA_RANDOM=1 for new examples each run). The server is a real bridge process on its own database, called with
the operator's admin token on /admin and with a subscribed key elsewhere, after some real
traffic so the reports have rows to render.
"""
from __future__ import annotations

import copy
import json
import os
import uuid

import hypothesis
import openai
import pytest
import schemathesis
from schemathesis import checks as builtin

from .billing.conftest import billing_env, start_fake, stripe_sync
from .conftest import _fresh_database, new_user, start_bridge, wait_settled

ADMIN_TOKEN = "schema-admin-token-" + uuid.uuid4().hex
EXAMPLES = int(os.environ.get("CODEPLAN_SCHEMA_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api(pg_url, simulator):
    database = _fresh_database(pg_url)
    # billing on, against the Stripe fake (tests/stripe_fake), so its endpoints do their work
    stripe, fake = start_fake()
    synced = stripe_sync(database, fake)
    assert synced.returncode == 0, synced.stderr
    # no throttle: the generated requests send many wrong keys on purpose, and a 429 for the
    # next case would hide what that case does
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN,
                          CODEPLAN_AUTH_FAILURE_LIMIT="0", **billing_env(fake))
    key = new_user(database)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    for i in range(3):
        client.chat.completions.create(model="glm-4.6", max_tokens=20, messages=[
            {"role": "user", "content": f"[[sim tokens=5 reasoning=0]] warm up {i}"}])
    wait_settled(database)
    yield server, key
    server.stop()
    stripe.stop()


def _document() -> dict:
    """The schema as the app generates it (no database needed); the test below checks that the
    running server serves this very document."""
    from service import config as config_module
    from service.app import create_app

    app = create_app(config_module.load({}), "postgresql://nobody@/nowhere", "http://127.0.0.1:9", ("k",))
    return json.loads(json.dumps(app.openapi_schema.to_schema()))  # as served: tuples are lists


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)

CHECKS = [builtin.not_a_server_error, builtin.status_code_conformance, builtin.content_type_conformance,
          builtin.response_schema_conformance, builtin.response_headers_conformance,
          builtin.negative_data_rejection]


@schemathesis.check
def zai_refuses_in_its_envelope(ctx, response, case):
    """Z.ai's monitor API answers its refusals (no key, a bad parameter) with HTTP 200 and the
    outcome in the envelope's `code`, which its HUDs read: schema-violating requests there are
    judged by that code, with schemathesis's own rules for what counts as violating."""
    if response.status_code == 200 and response.json().get("code") != 200:
        response = copy.copy(response)
        response.status_code = response.json()["code"]
    return builtin.negative_data_rejection(ctx, response, case)


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("CODEPLAN_SCHEMA_RANDOM"),
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_the_json_api_conforms_to_its_schema_and_never_fails(case, api):
    server, key = api
    credential = ADMIN_TOKEN if case.path.startswith("/admin/") else key
    # set on the case itself, so that schemathesis judges the request actually sent (a case that
    # was negative only for its missing credential is one no longer)
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {credential}"}
    checks = list(CHECKS)
    if case.path.startswith("/api/monitor/"):
        checks.remove(builtin.negative_data_rejection)
        checks.append(zai_refuses_in_its_envelope)
    case.call_and_validate(base_url=server.url, checks=checks, timeout=30)


def test_the_schema_holds_the_service_api_and_nothing_else(api):
    import httpx

    server, _ = api
    document = httpx.get(server.url + "/schema/openapi.json").json()
    paths = set(document["paths"])
    assert {"/v1/usage", "/api/monitor/usage/quota/limit", "/api/monitor/usage/model-usage",
            "/v1/billing", "/v1/billing/checkout", "/v1/billing/portal", "/v1/billing/topup",
            "/admin/plans", "/admin/users/{account_id}", "/admin/audit"} <= paths
    # the coding tools' protocols and the web page are not the service's API
    for path in paths:
        assert not path.startswith(("/v1/chat", "/v1/messages", "/v1/responses", "/v1/models", "/chat",
                                    "/messages", "/responses", "/models", "/api/coding", "/api/paas",
                                    "/api/anthropic", "/login", "/signup", "/dashboard", "/keys", "/setup",
                                    "/static", "/healthz", "/readyz", "/metrics", "/stripe")), path
        assert path != "/"
    assert document == DOCUMENT
    moved = httpx.get(server.url + "/admin/schema/openapi.json")
    assert moved.status_code == 301 and moved.headers["location"] == "/schema/openapi.json"


@pytest.mark.parametrize("method, path, body, status", [
    # found by the run above, kept here by name
    ("GET", "/admin/users?limit=-314", None, 400),  # was a 500: LIMIT must not be negative
    ("GET", "/admin/reports/usage?days=-1362104026", None, 400),  # was a 500: OverflowError
    ("GET", "/admin/reports/top?hours=264250&limit=-2326", None, 400),  # was a 500: int32 overflow
    ("GET", "/admin/reports/margin?days=99999999999", None, 400),  # was a 500: date out of range
    ("GET", "/admin/users/6291221531259780577886208", None, 400),  # was a 500: bigint overflow
    ("GET", "/admin/users?q=%00", None, 400),  # was a 500: PostgreSQL refuses NUL in text
    ("PATCH", "/admin/users/1", {"plan": "pro\u0000"}, 400),  # was a 500, same
    ("PATCH", "/admin/users/1", {"is_admin": 0}, 400),  # was taken as false
    ("GET", "/admin/audit?limit=garbage&limit=5", None, 400),  # was taken as 5
    ("POST", "/admin/upstreams", {"name": "blank", "preset": "zai", "keys": [""]}, 400),  # was a 404
    # would send this process's environment variable as a bearer token to any base URL
    ("POST", "/admin/upstreams", {"name": "env", "base_url": "http://127.0.0.1:9/v1", "keys_env": "PATH"}, 400),
])
def test_what_schemathesis_found_stays_fixed(api, method, path, body, status):
    import httpx

    server, _ = api
    answer = httpx.request(method, server.url + path, json=body, timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_a_repeated_zai_time_is_refused_in_zais_envelope(api):
    import httpx

    server, key = api
    answer = httpx.get(server.url + "/api/monitor/usage/model-usage?startTime=2026-01-01%2000:00:00"
                       "&startTime=2026-01-02%2000:00:00", headers={"Authorization": key}, timeout=30)
    assert answer.status_code == 200 and answer.json()["code"] == 400 and answer.json()["success"] is False
