"""The web page against abuse (review findings 9, 12 and 15): mailed links never follow a forged
Host header, sign-ups are throttled per client address before any password is hashed, hashing has
threads of its own, and a retired plan is given to no new sign-up. Real servers, the real
database, a real SMTP server."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import threading
import time
import uuid

import asyncpg
import httpx
import pytest

from bridge import tokens
from service.web import identity, passwords

from .conftest import CODEPLAN, ROOT, base_env, free_port, new_plan, query, run, start_bridge
from .web_support import PASSWORD, Browserish, SmtpServer, link_in

FORGED = "evil.example"


def unique_email() -> str:
    return f"h{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture(scope="module")
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


def forged_client(server) -> Browserish:
    """A browser whose every request claims to be for another host."""
    client = Browserish(server.url)
    client.client.headers["host"] = FORGED
    return client


def _start_up_error(database: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(CODEPLAN + ["run"], env=base_env(CODEPLAN_DATABASE_URL=database, CODEPLAN_PORT=str(free_port()),
                                                         **env),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


# ---- finding 9: mailed links -------------------------------------------------------------

def test_smtp_on_a_wildcard_bind_without_a_public_url_refuses_to_start(database, smtp):
    for host in ("0.0.0.0", "::"):
        result = _start_up_error(database, CODEPLAN_HOST=host, CODEPLAN_SMTP_URL=smtp.url)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"codeplan: configuration error: CODEPLAN_PUBLIC_URL: required when CODEPLAN_SMTP_URL is set and "
            f"CODEPLAN_HOST ({host}) listens on every address: mailed links must name this server"]


def test_a_forged_host_never_reaches_a_mailed_link(database, simulator, smtp):
    """Listening on every address with a public URL: the reset and verify mails name the public
    URL whatever Host the request claimed."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_HOST="0.0.0.0",
                          CODEPLAN_SMTP_URL=smtp.url, CODEPLAN_PUBLIC_URL="http://codeplan.example")
    try:
        client = forged_client(server)
        address = unique_email()
        client.sign_up(address)
        verify = link_in(smtp.inbox.wait_for(address, subject="Check"))
        assert verify.startswith("http://codeplan.example/verify?token=")
        before = len(smtp.inbox.messages)
        client.get("/forgot")
        assert client.post("/forgot", {"email": address}).status_code == 200
        reset = link_in(smtp.inbox.wait_for(address, subject="Reset", after=before))
        assert reset.startswith("http://codeplan.example/reset?token=") and FORGED not in reset
    finally:
        server.stop()


def test_without_mail_a_forged_host_is_not_in_the_logged_link_either(database, simulator):
    """No SMTP, every address, no public URL: the link the log keeps for the operator names the
    configured address, not the forger's host (the page itself may show the host you typed)."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_HOST="0.0.0.0")
    port = server.port
    try:
        client = forged_client(server)
        address = unique_email()
        assert client.sign_up(address).status_code == 200
        client.get("/forgot")
        client.post("/forgot", {"email": address})
        deadline = time.monotonic() + 30
        links: list[str] = []
        while len(links) < 2 and time.monotonic() < deadline:
            links = [json.loads(line)["link"] for line in server.output().splitlines()
                     if address in line and '"link"' in line]
            time.sleep(0.1)
        assert len(links) == 2, server.output()[-2000:]
        assert all(link.startswith(f"http://0.0.0.0:{port}/") and FORGED not in link for link in links), links
    finally:
        server.stop()


# ---- finding 15: sign-ups per address, and hashing on threads of its own -------------------

def test_sign_ups_from_one_address_are_throttled_before_any_hashing(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SIGNUP_LIMIT="3",
                          CODEPLAN_SIGNUP_WINDOW="3600")
    try:
        run(query(database, "DELETE FROM signup_attempts"))
        client = Browserish(server.url)
        made = [unique_email() for _ in range(3)]
        for address in made:
            client.client.cookies.clear()
            assert client.sign_up(address).url.path == "/setup"
        client.client.cookies.clear()
        refused_address = unique_email()
        refused = client.sign_up(refused_address)
        assert refused.status_code == 429 and "Too many sign-ups from your address" in refused.text
        assert 3500 <= int(refused.headers["retry-after"]) <= 3601
        assert run(query(database, "SELECT count(*) AS n FROM accounts WHERE email = $1", refused_address))[0]["n"] == 0
        # the refusal itself is not counted, and logging in is not a sign-up
        assert run(query(database, "SELECT count(*) AS n FROM signup_attempts"))[0]["n"] == 3
        assert client.log_in(made[0]).url.path == "/dashboard"
    finally:
        server.stop()
        run(query(database, "DELETE FROM signup_attempts"))


async def test_the_limit_is_per_address_and_an_ipv6_address_counts_per_64(database):
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    try:
        await pool.execute("DELETE FROM signup_attempts")

        async def attempt(address: str) -> str:
            try:
                await identity.sign_up(pool, unique_email(), PASSWORD, "",
                                       identity.SignupLimit(address=address, limit=2, window=3600))
            except identity.Refusal as refusal:
                return refusal.code
            return "ok"
        assert [await attempt("198.51.100.7") for _ in range(3)] == ["ok", "ok", "signup_throttled"]
        assert await attempt("198.51.100.8") == "ok"  # another address has its own share
        # one machine's /64 is one address; another /64 is not
        assert [await attempt(f"2001:db8:0:1::{i}") for i in (1, 2, 3)] == ["ok", "ok", "signup_throttled"]
        assert await attempt("2001:db8:0:2::1") == "ok"
        # two at once for the last place: one gets it
        await pool.execute("DELETE FROM signup_attempts")
        assert sorted(await asyncio.gather(*(attempt("203.0.113.9") for _ in range(4)))) == \
            ["ok", "ok", "signup_throttled", "signup_throttled"]
    finally:
        await pool.execute("DELETE FROM signup_attempts")
        await pool.close()


async def test_password_hashing_never_queues_ahead_of_token_counting():
    """A burst of hashes (sign-ups, logins) and the bridge's token counting, which runs in
    asyncio's default executor (bridge/metering.py): the count is served at once, while hashes
    wait for the two threads of their own."""
    loop = asyncio.get_running_loop()
    # the default executor as on the 2-core servers Codeplan runs on: min(32, cores + 4) threads
    default = concurrent.futures.ThreadPoolExecutor(6)
    loop.set_default_executor(default)
    tokens.count("warm the encoder up first")
    burst = [asyncio.ensure_future(passwords.hash_async(f"password number {i}")) for i in range(24)]
    await asyncio.sleep(0)
    counted = await asyncio.to_thread(tokens.count, "a prompt the bridge is metering")
    hashed_by_then = sum(task.done() for task in burst)
    assert counted > 0
    assert hashed_by_then < len(burst) // 2, f"{hashed_by_then} of {len(burst)} hashes went first"
    stored = await asyncio.gather(*burst)
    assert all(passwords.verify_password(f"password number {i}", h) for i, h in enumerate(stored))
    hashing = {t.name for t in threading.enumerate() if t.name.startswith("codeplan-scrypt")}
    assert 1 <= len(hashing) <= passwords.HASHING_THREADS


# ---- finding 12: a retired plan is given to no new sign-up -----------------------------------

def test_a_retired_signup_plan_stops_start_up_with_one_line(database):
    plan = new_plan(database, 1000)
    run(query(database, "UPDATE plans SET retired_at = now() WHERE id = $1", plan))
    on_sale = ", ".join(r["id"] for r in run(query(database, "SELECT id FROM plans WHERE retired_at IS NULL ORDER BY id")))
    assert "lite, max, pro" in on_sale and plan not in on_sale
    result = _start_up_error(database, CODEPLAN_SIGNUP_PLAN=plan)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"codeplan: configuration error: CODEPLAN_SIGNUP_PLAN: plan {plan!r} is retired and takes no new "
        f"subscriptions; plans are: {on_sale}"]


async def test_a_signup_plan_retired_while_running_is_given_to_nobody_new(database):
    plan = new_plan(database, 1000)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        first = await identity.sign_up(pool, unique_email(), PASSWORD, plan)
        await pool.execute("UPDATE plans SET retired_at = now() WHERE id = $1", plan)
        second = await identity.sign_up(pool, unique_email(), PASSWORD, plan)
        plans = {r["account_id"]: r["plan_id"] for r in await pool.fetch(
            "SELECT account_id, plan_id FROM subscriptions WHERE account_id = ANY($1)", [first.id, second.id])}
        assert plans == {first.id: plan}  # the first keeps it; the second starts without a plan
    finally:
        await pool.close()


def test_the_billing_page_offers_no_retired_plan(database, simulator):
    """Plans on the page are those on sale; an account on a retired plan still sees its own."""
    retired, kept = new_plan(database, 1000), new_plan(database, 2000)
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SIGNUP_PLAN=kept)
    try:
        client = Browserish(server.url)
        client.sign_up(unique_email())
        run(query(database, "UPDATE plans SET retired_at = now() WHERE id = ANY($1)", [retired, kept]))
        page = client.get("/billing").text
        assert f'id="plan-{kept}"' in page and f'id="plan-{retired}"' not in page
        assert 'id="plan-pro"' in page
    finally:
        server.stop()
