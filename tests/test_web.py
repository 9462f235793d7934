"""The web page without a browser: accounts, sessions, CSRF, throttling, mail, keys, live usage,
the usage commands. Real servers throughout: the bridge subprocess, PostgreSQL, an SMTP server."""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import tomllib
import uuid

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from service import keys as key_module
from service.web import i18n, pages, tools

from .conftest import CODEPLAN, ROOT, base_env, new_user, query, run, start_bridge, wait_settled
from .web_support import PASSWORD, Browserish, SmtpServer, link_in

SECRET = re.compile(r"cp_[A-Za-z0-9_-]{30,}")


def unique_email() -> str:
    return f"u{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture(scope="module")
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


# every test's browser signs up from 127.0.0.1: far more than one address's default share
MANY_SIGNUPS = {"CODEPLAN_SIGNUP_LIMIT": "1000"}


@pytest.fixture(scope="module")
def web(database, simulator, smtp):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                          CODEPLAN_AUTH_CACHE_TTL="0", CODEPLAN_SIGNUP_PLAN="lite",
                          CODEPLAN_MAIL_FROM="Codeplan <noreply@codeplan.test>", **MANY_SIGNUPS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web_nomail(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0",
                          CODEPLAN_LOG_LEVEL="info", **MANY_SIGNUPS)
    yield server
    server.stop()


def verified_user(web, smtp) -> tuple[Browserish, str]:
    client = Browserish(web.url)
    address = unique_email()
    count = len(smtp.inbox.messages)
    assert client.sign_up(address).url.path == "/welcome"
    client.confirm(link_in(smtp.inbox.wait_for(address, after=count)))
    return client, address


def create_key(client: Browserish, name: str = "laptop") -> str:
    client.get("/keys")
    page = client.post("/keys", {"name": name})
    assert page.status_code == 200, page.text
    return SECRET.search(page.text).group(0)


def account_row(database: str, address: str):
    return run(query(database, "SELECT * FROM accounts WHERE lower(email) = lower($1)", address))[0]


# ---- sign-up, verification, sessions -----------------------------------------------------

def test_sign_up_waits_for_the_mailed_link_then_lands_on_setup(web, smtp, database):
    client = Browserish(web.url)
    address = unique_email()
    page = client.sign_up(address)
    assert page.url.path == "/welcome" and address in page.text
    # unverified: the product pages send you back to "check your mail"
    assert client.get("/keys").url.path == "/welcome"
    message = smtp.inbox.wait_for(address)
    assert message["From"] == "Codeplan <noreply@codeplan.test>"
    link = link_in(message)
    assert link.startswith(web.url + "/verify?token=")
    # opening the link shows its button and confirms nothing: a mail scanner opens links too
    opened = client.get(link)
    assert opened.status_code == 200 and "Confirm my address" in opened.text and address in opened.text
    assert account_row(database, address)["email_verified_at"] is None
    landed = client.post("/verify", {"token": httpx.URL(link).params["token"]})
    assert landed.url.path == "/setup" and "Your address is confirmed." in landed.text
    assert account_row(database, address)["email_verified_at"] is not None
    # opened again: the address is confirmed, said so
    again = client.get(link)
    assert again.url.path == "/setup" and "not valid" not in again.text
    # CODEPLAN_SIGNUP_PLAN=lite gave the account its plan
    assert "GLM Coding Lite" in client.get("/dashboard").text


def test_resend_verification_mail(web, smtp):
    client = Browserish(web.url)
    address = unique_email()
    client.sign_up(address)
    smtp.inbox.wait_for(address)
    count = len(smtp.inbox.messages)
    page = client.post("/verify/resend")
    assert "A new link is on its way." in page.text
    second = smtp.inbox.wait_for(address, after=count)
    assert client.confirm(link_in(second)).url.path == "/setup"


def test_without_smtp_links_go_to_the_log_and_verification_is_not_required(web_nomail):
    client = Browserish(web_nomail.url)
    assert "Mail is off on this server" in client.get("/signup").text
    address = unique_email()
    page = client.sign_up(address)
    assert page.url.path == "/setup"  # straight in, no verification step
    assert "cp_YOUR_KEY" in page.text
    deadline = time.monotonic() + 10
    while address not in web_nomail.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(json.loads(line) for line in web_nomail.output().splitlines()
                if address in line and '"link"' in line)
    assert line["msg"].startswith("mail not sent") and "/verify?token=" in line["link"]
    # no CODEPLAN_SIGNUP_PLAN: the account exists without a plan, and the page says how to get one
    dashboard = client.get("/dashboard").text
    assert "No plan yet" in dashboard and "ask the operator" in dashboard


def test_session_cookie_is_httponly_lax_and_only_its_hash_is_stored(web, smtp, database):
    client, _ = verified_user(web, smtp)
    response = client.log_in(client.client.cookies.get("x") or "", "")  # a failed login sets nothing
    assert response.status_code == 400
    jar = client.client.cookies.jar
    session = next(c for c in jar if c.name == "codeplan_session")
    assert session.has_nonstandard_attr("HttpOnly") and session.get_nonstandard_attr("SameSite").lower() == "lax"
    assert not session.secure  # http://127.0.0.1: Secure only when CODEPLAN_PUBLIC_URL is https
    stored = run(query(database, "SELECT token_hash FROM web_sessions"))
    assert all(session.value.encode() not in bytes(r["token_hash"]) for r in stored)
    assert key_module.key_hash(session.value) in {bytes(r["token_hash"]) for r in stored}


def test_secure_cookie_when_public_url_is_https():
    from service.web import sessions

    header = sessions.cookie("t", secure=True).to_header(header="")
    assert "Secure" in header and "HttpOnly" in header and "SameSite=lax" in header


def test_log_out_ends_the_session_on_the_server(web, smtp):
    client, _ = verified_user(web, smtp)
    stolen = client.session
    assert client.post("/logout").url.path == "/login"
    replay = httpx.get(web.url + "/dashboard", cookies={"codeplan_session": stolen}, follow_redirects=False)
    assert replay.status_code == 303 and replay.headers["location"].startswith("/login")


def test_logging_in_gives_a_new_session_token(web, smtp):
    client, address = verified_user(web, smtp)
    before = client.session
    assert client.log_in(address).url.path == "/dashboard"
    assert client.session and client.session != before
    old = httpx.get(web.url + "/dashboard", cookies={"codeplan_session": before}, follow_redirects=False)
    assert old.status_code == 303


def test_login_redirects_back_to_where_you_were_but_never_off_site(web, smtp):
    client, address = verified_user(web, smtp)
    client.post("/logout")
    assert client.get("/keys").url.path == "/login"
    client.get("/login?next=/keys")
    assert client.post("/login", {"email": address, "password": PASSWORD, "next": "/keys"}).url.path == "/keys"
    client.post("/logout")
    client.get("/login")
    page = client.post("/login", {"email": address, "password": PASSWORD, "next": "//evil.example/x"})
    assert page.url.host == "127.0.0.1" and page.url.path == "/dashboard"


# ---- CSRF ------------------------------------------------------------------------------

def test_forms_without_a_valid_csrf_token_are_refused_with_a_page(web, smtp, database):
    client, address = verified_user(web, smtp)
    before = run(query(database, "SELECT count(*) AS n FROM api_keys"))[0]["n"]
    missing = client.post("/keys", {"name": "x"}, csrf=False)
    assert missing.status_code == 403
    assert missing.headers["content-type"].startswith("text/html") and "The form expired" in missing.text
    # a token from another visitor does not match this visitor's cookie
    other = Browserish(web.url)
    other.get("/login")
    forged = client.client.post("/keys", data={"name": "x", "_csrf_token": other.token})
    assert forged.status_code == 403
    # a cross-site form cannot even log you in (login CSRF): no token, no session
    anon = httpx.post(web.url + "/login", data={"email": address, "password": PASSWORD},
                      headers={"accept": "text/html"})
    assert anon.status_code == 403 and "codeplan_session" not in anon.cookies
    assert run(query(database, "SELECT count(*) AS n FROM api_keys"))[0]["n"] == before
    assert client.post("/keys", {"name": "ok"}).status_code == 200


# ---- throttling ------------------------------------------------------------------------

def test_login_is_throttled_per_account_after_repeated_failures(web, smtp):
    client, address = verified_user(web, smtp)
    client.post("/logout")
    for _ in range(5):
        client.get("/login")
        assert client.post("/login", {"email": address, "password": "wrong password!"}).status_code == 400
    client.get("/login")
    locked = client.post("/login", {"email": address, "password": PASSWORD})  # even the right one
    assert locked.status_code == 429 and "Too many failed attempts" in locked.text
    assert "codeplan_session" not in locked.cookies


def test_login_is_throttled_per_address_across_accounts(web_nomail, database):
    # a separate server, so this address's failures do not lock the other tests' logins
    client = Browserish(web_nomail.url)
    run(query(database, "DELETE FROM login_failures WHERE address = '127.0.0.1'"))
    try:
        for i in range(20):
            client.get("/login")
            page = client.post("/login", {"email": unique_email(), "password": "guess number " + str(i)})
            assert page.status_code == 400
        client.get("/login")
        assert client.post("/login", {"email": unique_email(), "password": "x" * 12}).status_code == 429
    finally:
        run(query(database, "DELETE FROM login_failures WHERE address = '127.0.0.1'"))


# ---- password reset --------------------------------------------------------------------

def test_password_reset_by_mail_lets_a_cli_account_in(web, smtp, database):
    address = unique_email()
    created = subprocess.run(CODEPLAN + ["users", "create", "--email", address, "--plan", "pro"],
                             env=base_env(CODEPLAN_DATABASE_URL=database), cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    client = Browserish(web.url)
    assert client.log_in(address, "anything at all").status_code == 400  # no password yet
    client.get("/forgot")
    page = client.post("/forgot", {"email": address})
    assert f"If an account exists for {address}" in page.text
    link = link_in(smtp.inbox.wait_for(address, subject="Reset"))
    form = client.get(link)
    assert form.status_code == 200 and 'name="token"' in form.text
    token = re.search(r'name="token" value="([^"]+)"', form.text).group(1)
    short = client.post("/reset", {"token": token, "password": "short"})
    assert short.status_code == 400 and "at least 10 characters" in short.text
    done = client.post("/reset", {"token": token, "password": "a brand new passphrase"})
    assert done.url.path == "/dashboard" and "GLM Coding Pro" in done.text
    assert account_row(database, address)["email_verified_at"] is not None  # the link proved the address
    assert client.post("/reset", {"token": token, "password": "another new passphrase"}).status_code == 400
    fresh = Browserish(web.url)
    assert fresh.log_in(address, "a brand new passphrase").url.path == "/dashboard"


def test_forgot_password_does_not_tell_who_has_an_account(web, smtp):
    client = Browserish(web.url)
    nobody = unique_email()
    client.get("/forgot")
    page = client.post("/forgot", {"email": nobody})
    assert f"If an account exists for {nobody}" in page.text
    time.sleep(1)
    assert smtp.inbox.to(nobody) == []


# ---- keys ------------------------------------------------------------------------------

def test_keys_are_created_shown_once_listed_and_revoked_and_the_bridge_refuses(web, smtp, database):
    client, _ = verified_user(web, smtp)
    secret = create_key(client, "laptop")
    listing = client.get("/keys").text
    assert secret not in listing and secret[:10] in listing and "laptop" in listing and "never" in listing
    stored = run(query(database, "SELECT secret_hash FROM api_keys WHERE prefix = $1", secret[:10]))
    assert bytes(stored[0]["secret_hash"]) == key_module.key_hash(secret)
    sdk = openai.OpenAI(base_url=web.url + "/v1", api_key=secret, max_retries=0)
    assert sdk.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}]).usage.total_tokens
    key_id = re.search(r'action="/keys/(\d+)/revoke"', listing).group(1)
    page = client.post(f"/keys/{key_id}/revoke")
    assert "The key was revoked." in page.text and "revoked" in page.text
    with pytest.raises(openai.AuthenticationError):  # CODEPLAN_AUTH_CACHE_TTL=0: at once
        sdk.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}])
    assert "does not exist or was revoked already" in client.post(f"/keys/{key_id}/revoke").text


def test_nobody_revokes_another_accounts_key(web, smtp, database):
    owner, _ = verified_user(web, smtp)
    secret = create_key(owner)
    key_id = run(query(database, "SELECT id FROM api_keys WHERE prefix = $1", secret[:10]))[0]["id"]
    intruder, _ = verified_user(web, smtp)
    assert "does not exist" in intruder.post(f"/keys/{key_id}/revoke").text
    assert run(query(database, "SELECT revoked_at FROM api_keys WHERE id = $1", key_id))[0]["revoked_at"] is None


def test_last_used_is_recorded_off_the_request_path(web, smtp, database):
    client, _ = verified_user(web, smtp)
    secret = create_key(client)
    sdk = openai.OpenAI(base_url=web.url + "/v1", api_key=secret, max_retries=0)
    for _ in range(3):
        sdk.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    deadline = time.monotonic() + 15
    used = None
    while time.monotonic() < deadline and used is None:
        used = run(query(database, "SELECT last_used_at FROM api_keys WHERE prefix = $1", secret[:10]))[0]["last_used_at"]
        time.sleep(0.1)
    assert used is not None
    assert "never" not in client.get("/keys").text.split(secret[:10])[1].split("</tr>")[0]


# ---- live usage ------------------------------------------------------------------------

def _ws(url: str) -> str:
    return url.replace("http://", "ws://")


def _usage(socket, timeout: float = 20.0) -> dict:
    message = json.loads(socket.recv(timeout=timeout))
    assert message["type"] == "usage", message
    return message


def _spend(base: str, secret: str, database: str, address: str = "") -> None:
    openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0).chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": "hello"}], max_tokens=30)
    wait_settled(database)  # the ledger's settlement sends NOTIFY codeplan_usage


def test_live_socket_with_an_api_key_pushes_each_settlement(web, smtp, database):
    client, address = verified_user(web, smtp)
    secret = create_key(client)
    with ws_connect(_ws(web.url) + "/v1/usage/live", additional_headers={"Authorization": f"Bearer {secret}"}) as socket:
        first = _usage(socket)
        assert first["plan"] == "lite" and [w["kind"] for w in first["windows"]] == ["5h", "week"]
        _spend(web.url, secret, database, address)
        second = _usage(socket)
        assert second["windows"][0]["used"] > first["windows"][0]["used"]
        assert second["today"]["requests"] == first["today"]["requests"] + 1
        row = run(query(database, "SELECT w.posted FROM quota_windows w JOIN subscriptions s ON s.id = w.subscription_id"
                                  " JOIN accounts a ON a.id = s.account_id WHERE a.email = $1 AND w.kind = '5h'", address))
        assert second["windows"][0]["used"] == row[0]["posted"]
    # the key may also come as the first message
    with ws_connect(_ws(web.url) + "/v1/usage/live") as socket:
        socket.send(json.dumps({"type": "auth", "key": secret}))
        assert _usage(socket)["windows"][0]["used"] == second["windows"][0]["used"]


def test_live_socket_refuses_bad_keys_and_closes_when_the_key_is_revoked(web, smtp, database):
    with ws_connect(_ws(web.url) + "/v1/usage/live", additional_headers={"x-api-key": "cp_nope"}) as socket:
        error = json.loads(socket.recv(timeout=10))
        assert error == {"type": "error", "code": "invalid_api_key", "message": "Invalid API key."}
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
        assert closed.value.rcvd.code == 4401
    client, _ = verified_user(web, smtp)
    secret, other = create_key(client), create_key(client, "other")
    with ws_connect(_ws(web.url) + "/v1/usage/live", additional_headers={"Authorization": f"Bearer {secret}"}) as socket:
        _usage(socket)
        run(query(database, "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1", secret[:10]))
        _spend(web.url, other, database)  # the account's next change reaches the socket: its key is gone
        error = json.loads(socket.recv(timeout=20))
        assert error["code"] == "key_revoked"
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
        assert closed.value.rcvd.code == 4401


def test_live_socket_for_a_key_without_a_plan_says_where_to_get_one(web_nomail, database):
    client = Browserish(web_nomail.url)
    client.sign_up(unique_email())
    secret = create_key(client)
    with ws_connect(_ws(web_nomail.url) + "/v1/usage/live", additional_headers={"Authorization": f"Bearer {secret}"}) as socket:
        error = json.loads(socket.recv(timeout=10))
        assert error["code"] == "no_subscription" and error["message"].endswith("/billing")


def test_browser_socket_needs_the_session_cookie_and_this_sites_origin(web, smtp, database):
    client, address = verified_user(web, smtp)
    secret = create_key(client)
    cookie = f"codeplan_session={client.session}"
    origin = web.url
    with ws_connect(_ws(web.url) + "/live", additional_headers={"Cookie": cookie}, origin=origin) as socket:
        first = _usage(socket)
        _spend(web.url, secret, database, address)
        assert _usage(socket)["windows"][1]["used"] > first["windows"][1]["used"]
    with pytest.raises(InvalidStatus) as refused:  # another site's page, with the visitor's cookie
        ws_connect(_ws(web.url) + "/live", additional_headers={"Cookie": cookie}, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with ws_connect(_ws(web.url) + "/live", origin=origin) as socket:
        assert json.loads(socket.recv(timeout=10))["code"] == "not_signed_in"


def test_one_listening_connection_per_process_whatever_the_sockets(web, smtp, database):
    client, _ = verified_user(web, smtp)
    secret = create_key(client)
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(ws_connect(_ws(web.url) + "/v1/usage/live",
                                                  additional_headers={"Authorization": f"Bearer {secret}"}))
                   for _ in range(4)]
        for socket in sockets:
            _usage(socket)
        listening = run(query(database, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1",
                              f"codeplan-live-{web.process.pid}"))[0]["n"]
        assert listening == 1


# ---- usage commands --------------------------------------------------------------------

def test_statusline_and_usage_commands_print_the_window_in_one_line(web, smtp, database):
    client, address = verified_user(web, smtp)
    secret = create_key(client)
    env = base_env(CODEPLAN_API_KEY=secret, CODEPLAN_BASE_URL=web.url)
    fresh = subprocess.run(CODEPLAN + ["usage"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # no 5-hour window open yet; the week's reset is known from the subscription's start
    assert re.fullmatch(r"Codeplan lite · 5h 0% \(40M left\) · week 0% \(200M left, resets \w{3} \d\d:\d\d\)",
                        fresh.stdout.strip()), fresh.stdout
    _spend(web.url, secret, database, address)
    claude_json = json.dumps({"session_id": "s", "model": {"id": "claude-sonnet-4-5", "display_name": "Sonnet 4.5"},
                              "workspace": {"current_dir": "/tmp"}})
    line = subprocess.run(CODEPLAN + ["statusline"], input=claude_json, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert line.returncode == 0 and len(line.stdout.strip().splitlines()) == 1
    assert re.match(r"^Sonnet 4\.5 \| Codeplan lite · 5h \d+% \(\S+ left, resets [\w: ]+\) · week \d+% \(\S+ left, resets [\w: ]+\)$",
                    line.stdout.strip()), line.stdout
    usage = subprocess.run(CODEPLAN + ["usage"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("Codeplan lite · 5h ")
    # Claude Code's own variables are enough for its status line
    claude_env = base_env(ANTHROPIC_AUTH_TOKEN=secret, ANTHROPIC_BASE_URL=web.url)
    via_claude = subprocess.run(CODEPLAN + ["statusline"], input="{}", env=claude_env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert via_claude.stdout.startswith("Codeplan lite · 5h ")
    # the downloadable script is the same code, standard library only
    script = httpx.get(web.url + "/setup/statusline.py")
    assert script.status_code == 200 and script.content == (ROOT / "service/statusline.py").read_bytes()
    bad = base_env(CODEPLAN_API_KEY="cp_wrong", CODEPLAN_BASE_URL=web.url)
    refused = subprocess.run(CODEPLAN + ["statusline"], input="{}", env=bad, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 0 and refused.stdout.strip() == "Codeplan: invalid api key"
    failed = subprocess.run(CODEPLAN + ["usage"], env=bad, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "invalid api key" in failed.stderr


def test_the_client_commands_import_nothing_of_the_server():
    """Claude Code runs its status line after every update: `codeplan statusline` and `usage` are
    answered from the standard library (service/cli.py), not after importing the server, its
    database driver and its web framework (~0.7 s a call where they now take ~0.1)."""
    server = ("asyncpg", "aiohttp", "litestar", "stripe", "tiktoken", "msgspec", "uvicorn", "service.commands",
              "service.config", "bridge")
    probe = ("import io, sys\n"
             "from service.cli import main\n"
             "for command in ('statusline', 'usage'):\n"
             "    sys.stdin = io.StringIO('{}')\n"
             "    main([command])\n"
             f"print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in {server!r} or m in {server!r}))\n")
    env = {k: v for k, v in base_env(CODEPLAN_BASE_URL="http://127.0.0.1:9").items()
           if not k.startswith("ANTHROPIC_")}  # no key anywhere: each command answers at once
    done = subprocess.run([CODEPLAN[0], "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "IMPORTED []" in done.stdout, done.stdout + done.stderr
    assert (done.stdout + done.stderr).lower().count("no key") == 2  # both commands answered


def test_users_promote_makes_an_admin(web, smtp, database):
    client, address = verified_user(web, smtp)
    env = base_env(CODEPLAN_DATABASE_URL=database)
    done = subprocess.run(CODEPLAN + ["users", "promote", "--email", address.upper()], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "is now an admin" in done.stdout
    assert account_row(database, address)["is_admin"] is True
    assert '<span class="badge">Admin</span>' in client.get("/dashboard").text
    missing = subprocess.run(CODEPLAN + ["users", "promote", "--email", "no-" + address], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no account" in missing.stderr


# ---- pages, languages, billing ---------------------------------------------------------

def test_errors_are_pages_for_browsers_and_problem_json_for_the_api(web):
    page = httpx.get(web.url + "/no/such/page", headers={"accept": "text/html"})
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert httpx.get(web.url + "/login").headers["referrer-policy"] == "same-origin"
    assert "This page does not exist." in page.text
    api = httpx.get(web.url + "/v1/no/such", headers={"accept": "text/html"})
    # the coding tools' API answers in OpenAI's error shape, naming the path (issue 11)
    assert api.status_code == 404 and api.headers["content-type"] == "application/json"
    assert api.json()["error"]["code"] == "unknown_url" and "/v1/no/such" in api.json()["error"]["message"]
    own = httpx.get(web.url + "/api/no/such", headers={"accept": "application/json"})
    assert own.status_code == 404 and own.headers["content-type"] == "application/problem+json"
    bad = Browserish(web.url)
    bad.get("/login")
    malformed = bad.client.post("/keys/notanumber/revoke", data={"_csrf_token": bad.token})
    assert malformed.status_code in (404, 405) and malformed.headers["content-type"].startswith("text/html")


def test_language_from_accept_language_and_the_switch_is_remembered(web):
    zh = Browserish(web.url, lang="zh-CN,zh;q=0.9,en;q=0.5")
    page = zh.get("/login")
    assert '<html lang="zh-CN">' in page.text and "登录" in page.text
    en = Browserish(web.url, lang="en-US,en;q=0.9")
    assert '<html lang="en">' in en.get("/login").text
    switched = en.post("/lang", {"lang": "zh", "next": "/signup"})
    assert switched.url.path == "/signup" and "创建账户" in switched.text
    assert "创建账户" in en.get("/signup").text  # the cookie wins over Accept-Language
    assert i18n.choose(None, "fr-FR, zh-TW;q=0.8, en;q=0.7") == "zh"
    assert i18n.choose("en", "zh-CN") == "en" and i18n.choose("xx", "de") == "en"


def test_every_string_on_the_pages_has_its_chinese():
    folder = ROOT / "service" / "web"
    texts: set[str] = set()
    for path in [*folder.glob("templates/*.html"), *folder.glob("*.py")]:
        source = path.read_text()
        texts |= set(re.findall(r'_\(\s*"((?:[^"\\]|\\.)+)"', source)) - {"English text"}
        texts |= set(re.findall(r"_\(\s*'((?:[^'\\]|\\.)+)'", source))
    notices = (folder / "templates" / "notice.html").read_text()
    texts |= set(re.findall(r':\s*"([^"]+)",', notices))
    texts |= set(pages._REFUSALS.values())
    texts |= {"Page not found", "This page does not exist.", "Not allowed", "Something went wrong",
              "The form expired or came from another site. Go back, reload the page and try again.",
              "The server failed unexpectedly; the failure was logged.", "The request was not understood.",
              "active", "past_due", "canceled", "Top-ups", "Overage"}
    missing = sorted(t for t in texts if t not in i18n.ZH)
    assert not missing, missing
    assert len(texts) > 100


def test_setup_snippets_are_valid_files_filled_with_url_and_key():
    found = {s.id: s for s in tools.snippets("https://codeplan.example", "cp_secret123")}
    claude = json.loads(found["claude"].text)
    assert claude["env"] == {"ANTHROPIC_BASE_URL": "https://codeplan.example", "ANTHROPIC_AUTH_TOKEN": "cp_secret123",
                             "API_TIMEOUT_MS": "3000000"}
    assert claude["statusLine"]["type"] == "command" and "codeplan-statusline.py" in claude["statusLine"]["command"]
    assert "https://codeplan.example/setup/statusline.py" in found["claude"].shell
    opencode = json.loads(found["opencode"].text)
    assert opencode["provider"]["codeplan"]["options"] == {"baseURL": "https://codeplan.example/v1", "apiKey": "cp_secret123"}
    codex = tomllib.loads(found["codex"].text)
    assert codex["model_providers"]["codeplan"] == {"name": "Codeplan", "base_url": "https://codeplan.example/v1",
                                                    "env_key": "CODEPLAN_API_KEY", "wire_api": "responses"}
    assert found["codex"].shell == "export CODEPLAN_API_KEY=cp_secret123"
    assert (codex["model"], codex["model_provider"], codex["model_context_window"]) == ("glm-4.6", "codeplan", 204800)
    for tool in ("cline", "roo"):
        fields = {f.label: f.value for f in found[tool].fields}
        assert fields["Base URL"] == "https://codeplan.example/v1" and fields["API Key"] == "cp_secret123"
    placeholder = tools.snippets("http://h:1", None)
    assert json.loads(placeholder[0].text)["env"]["ANTHROPIC_AUTH_TOKEN"] == tools.PLACEHOLDER


def test_setup_page_fills_in_a_key_created_there(web, smtp):
    client, _ = verified_user(web, smtp)
    page = client.get("/setup")
    assert "cp_YOUR_KEY" in page.text and web.url + "/v1" in page.text
    made = client.post("/keys", {"name": "setup", "then": "setup"})
    secret = SECRET.search(made.text).group(0)
    assert made.text.count(secret) >= 5 and "cp_YOUR_KEY" not in made.text
    assert made.headers["cache-control"] == "no-store"
    assert secret not in client.get("/setup").text  # shown once, never stored


def test_billing_off_is_explained_and_its_buttons_say_so(web, smtp):
    client, _ = verified_user(web, smtp)
    page = client.get("/billing")
    assert "Billing is off on this server" in page.text
    for plan in ("GLM Coding Lite", "GLM Coding Pro", "GLM Coding Max"):
        assert plan in page.text
    assert "Your plan now" in page.text
    redirected = client.post("/billing/checkout", {"plan": "pro"})
    assert redirected.url.path == "/billing" and "Billing is off" in redirected.text


def test_first_load_is_under_150_kb(web, smtp):
    client, _ = verified_user(web, smtp)
    page = client.get("/dashboard")
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text)
    assert len(assets) == 2
    total = len(page.content) + sum(len(client.client.get(a).content) for a in assets)
    assert total < 150 * 1024, total


def test_unknown_signup_plan_stops_start_up_with_one_line(database):
    result = subprocess.run(CODEPLAN + ["run"], env=base_env(CODEPLAN_DATABASE_URL=database, CODEPLAN_PORT="1",
                                                            CODEPLAN_SIGNUP_PLAN="gold"),
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "codeplan: configuration error: CODEPLAN_SIGNUP_PLAN: no plan 'gold'; plans are: lite, max, pro"


class RecordingBilling:
    """Stands in for the Stripe engine being built in parallel (issue 12): the small interface
    the page calls, `checkout`, `portal`, `topup` -> a URL to send the browser to, sync or async."""
    topup_blocks = [{"id": "10m", "label": "10M tokens"}]

    def __init__(self, fail: bool | str = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    async def checkout(self, account_id: int, plan_id: str) -> str:
        self.calls.append(("checkout", account_id, plan_id))
        if self.fail in ("suspended", "conflict"):
            from service.billing.sessions import BillingError
            raise BillingError(self.fail, self.fail)
        if self.fail:
            raise ConnectionError("stripe unreachable")
        return f"https://checkout.stripe.test/c/{plan_id}"

    def portal(self, account_id: int) -> str:
        self.calls.append(("portal", account_id))
        return "https://billing.stripe.test/p/1"

    async def topup(self, account_id: int, block: str) -> str:
        self.calls.append(("topup", account_id, block))
        return f"https://checkout.stripe.test/t/{block}"


@pytest.mark.parametrize("fail", [False, True, "suspended", "conflict"])
def test_billing_buttons_call_the_billing_engine_from_a_session_with_csrf(database, simulator, fail):
    from litestar.testing import TestClient

    from service import config as config_module
    from service.app import create_app

    config = config_module.load({"CODEPLAN_DATABASE_URL": database, "CODEPLAN_SIGNUP_PLAN": "lite"})
    app = create_app(config, database, simulator.url + "/api/coding/paas/v4", ("k",))
    billing = RecordingBilling(fail=fail)
    app.state.billing = billing
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        client.headers["accept"] = "text/html"
        page = client.get("/signup")
        token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        address = unique_email()
        client.post("/signup", data={"_csrf_token": token, "email": address, "password": PASSWORD})
        account = account_row(database, address)["id"]
        plans = client.get("/billing")
        assert "Billing is off" not in plans.text and "Manage billing" in plans.text and "10M tokens" in plans.text
        assert client.post("/billing/checkout", data={"plan": "pro"}).status_code == 403  # no CSRF token
        moved = client.post("/billing/checkout", data={"_csrf_token": token, "plan": "pro"}, follow_redirects=False)
        assert moved.status_code == 303
        if fail == "suspended":  # the engine refuses a suspended account: the page says why
            assert moved.headers["location"] == "/billing?notice=suspended"
            assert "This account is suspended by the operator" in client.get(moved.headers["location"]).text
            return
        if fail:  # Stripe away, or the engine refusing (a plan already paid, a block not on sale)
            assert moved.headers["location"] == "/billing?notice=billing_failed"
            assert "Billing could not start" in client.get(moved.headers["location"]).text
            return
        assert moved.headers["location"] == "https://checkout.stripe.test/c/pro"
        portal = client.post("/billing/portal", data={"_csrf_token": token}, follow_redirects=False)
        topup = client.post("/billing/topup", data={"_csrf_token": token, "block": "10m"}, follow_redirects=False)
        assert portal.headers["location"] == "https://billing.stripe.test/p/1"
        assert topup.headers["location"] == "https://checkout.stripe.test/t/10m"
        assert billing.calls == [("checkout", account, "pro"), ("portal", account), ("topup", account, "10m")]
        client.cookies.clear()
        anonymous = client.post("/billing/portal", data={"_csrf_token": token}, follow_redirects=False)
        assert anonymous.status_code == 403  # the CSRF cookie went with the session's cookies


# ---- the hub and the recorder, in-process against the real database ---------------------------

def test_the_live_feed_survives_losing_its_listening_connection(web, smtp, database):
    client, _ = verified_user(web, smtp)
    secret = create_key(client)
    with ws_connect(_ws(web.url) + "/v1/usage/live", additional_headers={"Authorization": f"Bearer {secret}"}) as socket:
        first = _usage(socket)
        name = f"codeplan-live-{web.process.pid}"
        killed = run(query(database, "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity"
                                     " WHERE application_name = $1", name))
        assert [r["done"] for r in killed] == [True]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the hub reconnects by itself (backoff from 0.5 s)
            if run(query(database, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1",
                         name))[0]["n"] == 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the hub did not listen again")
        # re-read on reconnect: what was missed meanwhile arrives without a new notification
        _usage(socket)
        _spend(web.url, secret, database)
        assert _usage(socket)["windows"][0]["used"] > first["windows"][0]["used"]


async def test_a_burst_of_notifications_costs_one_more_read_and_ends_on_the_newest(database):
    import asyncio

    import asyncpg

    from service.web import live

    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    reads: list[int] = []
    gate = asyncio.Event()

    async def gated_read(_pool, subscription_id):
        reads.append(subscription_id)
        if subscription_id == 424242:
            await gate.wait()  # a read in flight while the burst arrives
        return len(reads)

    hub = live.UsageHub(pool, database, read=gated_read)
    await hub.start()
    try:
        watchers = [hub.watch(424242) for _ in range(3)]
        sentinel = hub.watch(777)
        hub.watch(515151)  # watched but never notified: never read
        sender = await asyncpg.connect(database)
        for _ in range(50):  # each its own transaction: 50 notifications delivered
            await sender.execute("SELECT pg_notify('codeplan_usage', '424242')")
        await sender.execute("SELECT pg_notify('codeplan_usage', 'not a number')")
        await sender.execute("SELECT pg_notify('codeplan_usage', '999')")  # nobody watches it
        await sender.execute("SELECT pg_notify('codeplan_usage', '777')")
        await sender.close()
        # notifications arrive in order: once 777 is read, the whole burst has been seen
        await asyncio.wait_for(sentinel.next(), 30)
        assert reads == [424242, 777]
        gate.set()
        for _ in range(300):
            if len(reads) == 3 and not hub._reading:
                break
            await asyncio.sleep(0.05)
        assert reads == [424242, 777, 424242]  # the 49 that came during the first read cost one more
        for watcher in watchers:  # each socket holds only the newest figures
            assert await asyncio.wait_for(watcher.next(), 5) == 3
        hub.unwatch(watchers[0])
        assert hub.watching == 4
    finally:
        await hub.stop()
        await pool.close()


class CountingPool:
    """A real asyncpg pool that counts the statements it is given."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.statements: list[tuple] = []

    async def execute(self, sql, *args):
        self.statements.append((sql, *args))
        return await self.pool.execute(sql, *args)


async def test_last_used_is_written_at_most_once_a_minute_per_key_and_never_awaited(database):
    import asyncio

    import asyncpg

    from service.web.keyuse import KeyUseRecorder

    key_a = new_user(database)
    key_b = new_user(database)
    conn = await asyncpg.connect(database)
    a, b = [await conn.fetchval("SELECT id FROM api_keys WHERE prefix = $1", k[:10]) for k in (key_a, key_b)]
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    counting = CountingPool(pool)
    recorder = KeyUseRecorder(counting, interval=60.0, delay=0.2)  # type: ignore[arg-type]
    try:
        for _ in range(500):
            recorder.touch(a)  # synchronous: a request never waits for the write
            recorder.touch(b)
        assert counting.statements == []
        for _ in range(200):  # the timer fires 0.2 s later; a loaded machine may take longer
            if counting.statements:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert len(counting.statements) == 1 and sorted(counting.statements[0][1]) == sorted([a, b])
        await recorder.close()  # waits for the write in flight
        for _ in range(100):
            recorder.touch(a)
        await asyncio.sleep(0.6)
        assert len(counting.statements) == 1  # within the minute: nothing more
        used = await conn.fetch("SELECT last_used_at FROM api_keys WHERE id = ANY($1::bigint[])", [a, b])
        assert all(r["last_used_at"] is not None for r in used)
    finally:
        await recorder.close()
        await pool.close()
        await conn.close()


async def test_dashboard_shows_top_up_blocks_and_nothing_without_them(fresh_database):
    import asyncpg

    from service.web import dashboard

    key = new_user(fresh_database, "pro")
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2)
    try:
        account = await pool.fetchval("SELECT account_id FROM api_keys WHERE prefix = $1", key[:10])
        assert (await dashboard.load(pool, account)).extras == []
        topup = await pool.fetchval(
            "INSERT INTO topups (account_id, tokens, amount, currency, expires_at, stripe_checkout_session_id)"
            " VALUES ($1, 10000000, 1000, 'usd', now() + interval '30 days', 'cs_test_dash') RETURNING id", account)
        window = await pool.fetchval("SELECT billing_topup_attach($1)", topup)
        await pool.execute("UPDATE quota_windows SET posted = 2500000 WHERE id = $1", window)
        data = await dashboard.load(pool, account)
        assert [e.title for e in data.extras] == ["Top-ups"]
        assert data.extras[0].columns == ["allowance", "used", "in flight", "remaining", "ends"]
        assert data.extras[0].rows[0][:4] == ["10000000", "2500000", "0", "7500000"]
    finally:
        await pool.close()


def test_https_public_url_makes_cookies_secure_and_mail_uses_smtp_credentials(database, simulator):
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult
    from litestar.testing import TestClient

    from service import config as config_module
    from service.app import create_app

    from .conftest import free_port
    from .web_support import Inbox

    inbox, logins = Inbox(), []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=(auth_data.login, auth_data.password) == (b"mailer", b"p@ss word"))

    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)
    controller.start()
    try:
        config = config_module.load({"CODEPLAN_DATABASE_URL": database, "CODEPLAN_PUBLIC_URL": "https://codeplan.example/",
                                     "CODEPLAN_SMTP_URL": f"smtp://mailer:p%40ss%20word@127.0.0.1:{port}"})
        app = create_app(config, database, simulator.url + "/api/coding/paas/v4", ("k",))
        with TestClient(app, base_url="https://codeplan.example") as client:
            client.headers["accept"] = "text/html"
            page = client.get("/signup")
            assert "secure" in page.headers["set-cookie"].lower()  # the CSRF cookie
            token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
            address = unique_email()
            signed = client.post("/signup", data={"_csrf_token": token, "email": address, "password": PASSWORD},
                                 follow_redirects=False)
            session_cookie = next(v for k, v in signed.headers.multi_items()
                                  if k == "set-cookie" and v.startswith("codeplan_session="))
            assert "Secure" in session_cookie and "HttpOnly" in session_cookie
            message = inbox.wait_for(address)
            assert link_in(message).startswith("https://codeplan.example/verify?token=")
            assert logins == [(b"mailer", b"p@ss word")]
    finally:
        controller.stop()


def test_a_mail_that_cannot_be_sent_is_said_on_the_page(database, simulator):
    from litestar.testing import TestClient

    from service import config as config_module
    from service.app import create_app

    from .conftest import free_port

    config = config_module.load({"CODEPLAN_DATABASE_URL": database,
                                 "CODEPLAN_SMTP_URL": f"smtp://127.0.0.1:{free_port()}"})  # nobody listens
    app = create_app(config, database, simulator.url + "/api/coding/paas/v4", ("k",))
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        client.headers["accept"] = "text/html"
        token = re.search(r'name="_csrf_token" value="([^"]+)"', client.get("/signup").text).group(1)
        page = client.post("/signup", data={"_csrf_token": token, "email": unique_email(), "password": PASSWORD})
        assert page.url.path == "/welcome" and "The mail could not be sent" in page.text


def test_bad_form_input_gets_a_4xx_page_never_a_500(web, smtp):
    client, _ = verified_user(web, smtp)
    cases = [("/keys", {"name": "\x00bad"}), ("/keys", {"name": "n" * 100_000}),
             ("/keys/99999999999999999999/revoke", {}), ("/keys/-1/revoke", {}),
             ("/billing/checkout", {"plan": "\x00"}), ("/lang", {"lang": "x" * 1000, "next": "javascript:alert(1)"})]
    for path, data in cases:
        response = client.post(path, data)
        assert response.status_code < 500 and response.headers["content-type"].startswith("text/html"), path
    anonymous = Browserish(web.url)
    for path, data in [("/signup", {"email": "x\x00@y.z", "password": "p" * 20}), ("/signup", {}),
                       ("/signup", {"email": "a" * 5000 + "@x.y", "password": "p" * 20}),
                       ("/login", {"email": "nul\x00@x.y", "password": "p\x00"}), ("/forgot", {"email": "\x00"}),
                       ("/reset", {"token": "t" * 10_000, "password": "p" * 20})]:
        anonymous.get("/login")
        response = anonymous.post(path, data)
        assert 400 <= response.status_code < 500, (path, response.status_code)
    for path in ("/verify?token=" + "x" * 10_000, "/reset?token=%00", "/login?next=%00"):
        assert anonymous.get(path).status_code < 500, path
