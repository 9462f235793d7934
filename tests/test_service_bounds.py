"""The service's edges a stranger or a browser reaches: the schema is one JSON document (no
documentation site running CDN scripts on this origin), a page's form is bounded before the
CSRF middleware reads it, the admin API answers a browser in its own shape, and a complete body
is not called a cut one. Each was found by a hunt; the docstrings say what was wrong."""
from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from .conftest import start_bridge
from .rawhttp import exchange, request
from .web_support import Browserish

ADMIN = "bounds-admin-token-" + "b" * 24


@pytest.fixture(scope="module")
def server(database, simulator):
    s = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN,
                     CODEPLAN_SIGNUP_LIMIT="1000")
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/schema", "/schema/redoc", "/schema/swagger", "/schema/elements",
                                  "/schema/rapidoc", "/schema/openapi.yaml"])
def test_the_schema_is_one_json_document_and_no_documentation_site(server, path):
    """`render_plugins=[]` is Litestar's switch for serving every documentation site: pages on
    the session cookie's origin loading scripts pinned to nothing (redoc/latest, unpkg,
    jsdelivr) with no Content-Security-Policy; a compromised CDN would act as any visitor."""
    assert httpx.get(server.url + "/schema/openapi.json").status_code == 200
    page = httpx.get(server.url + path)
    # nothing there, or the document itself (/schema is its root): never a page
    assert page.status_code == 404 or "json" in page.headers["content-type"], \
        (path, page.status_code, page.headers.get("content-type"))
    assert not re.search(r"<script[^>]+src=", page.text)


@pytest.mark.parametrize("path", ["/login", "/forgot", "/signup"])
def test_a_page_form_is_bounded_before_its_csrf_token_is_read(server, path):
    """The CSRF middleware reads a whole form before it checks the token, and the pages had the
    app's 32 MB limit: eight strangers' 30 MB posts took the server from 147 to 470 MB."""
    body = b"email=a%40example.com&password=" + b"x" * (70 * 1024)
    answer = exchange(server.port, request("POST", path, body, {
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"}), timeout=30)
    assert answer.status == 413, answer
    # a form of ordinary size still reaches the CSRF check (a 403 without the token)
    small = exchange(server.port, request("POST", path, b"email=a%40example.com&password=x", {
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"}), timeout=30)
    assert small.status == 403, small


def test_the_admin_api_answers_a_browser_in_its_own_shape(server):
    """The admin guard takes a web session, so browsers reach the admin API; a signed-in
    account that is not an admin read "The form expired or came from another site", and an
    admin's own 400 detail was lost in the HTML error page."""
    browser = Browserish(server.url)
    assert browser.sign_up(f"b{uuid.uuid4().hex[:10]}@example.com").status_code == 200
    refused = browser.get("/admin/users")
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "administrator" in refused.json()["detail"]

    bad = httpx.get(server.url + "/admin/audit?limit=lots", timeout=30,
                    headers={"accept": "text/html", "authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert "limit" in bad.json()["detail"]


def test_a_lone_surrogate_in_an_admin_body_is_not_called_a_cut_body(server):
    """msgspec says "Input data was truncated" for a string ending in an unpaired `\\ud800`:
    the operator went looking for a proxy that cut a body that was whole."""
    answer = exchange(server.port, request("PATCH", "/admin/plans/pro", b'{"name": "plan \\ud800"}', {
        "Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}), timeout=30)
    assert answer.status == 400, answer
    detail = json.loads(answer.body)["detail"]
    assert "unpaired" in detail and detail != "Invalid request body: Input data was truncated", detail
