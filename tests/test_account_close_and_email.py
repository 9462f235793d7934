"""The account page's last two forms and the expiry of addresses never confirmed: a person moves
the account to a new address (a link mailed to the new one, a notice to the old one) or closes
it (keys, sessions, links and an operator-given plan ended at once; the address freed), and an
account whose address nobody confirmed, holding nothing, goes after CODEPLAN_UNVERIFIED_DAYS.
Real servers throughout: the bridge subprocess, PostgreSQL, an SMTP server (aiosmtpd)."""
from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import asyncpg
import httpx
import pytest

from service.web import apikeys, identity, sessions
from service.web.throttle import SignupLimit

from .conftest import query, run, start_bridge
from .web_support import PASSWORD, Browserish, SmtpServer, link_in

ADMIN_TOKEN = "close-and-email-admin-token-" + "z" * 12
CHANGE_LINK = re.compile(r"(https?://\S+/email/confirm\?token=[\w-]+)")
KEY = re.compile(r"cp_[A-Za-z0-9_-]{30,}")
CHAT = {"model": "glm-4.6", "max_tokens": 10,
        "messages": [{"role": "user", "content": "[[sim tokens=3 reasoning=0]] hi"}]}


def unique_email() -> str:
    return f"ce{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture(scope="module")
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(database, simulator, smtp):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                          CODEPLAN_AUTH_CACHE_TTL="0", CODEPLAN_SIGNUP_PLAN="lite",
                          CODEPLAN_MAIL_FROM="Codeplan <noreply@codeplan.test>", CODEPLAN_SIGNUP_LIMIT="1000",
                          CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_failed_logins(database):
    run(query(database, "DELETE FROM login_failures WHERE address = '127.0.0.1'"))


def member(site, smtp, lang: str = "en") -> tuple[Browserish, str]:
    client = Browserish(site.url, lang)
    address = unique_email()
    count = len(smtp.inbox.messages)
    assert client.sign_up(address).url.path == "/welcome"
    assert client.confirm(link_in(smtp.inbox.wait_for(address, after=count))).url.path == "/setup"
    return client, address


def account(database: str, account_id: int):
    rows = run(query(database, "SELECT * FROM accounts WHERE id = $1", account_id))
    return rows[0] if rows else None


def account_id(database: str, address: str) -> int:
    return run(query(database, "SELECT id FROM accounts WHERE lower(email) = lower($1)", address))[0]["id"]


def body(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def change_link(message) -> str:
    found = CHANGE_LINK.search(body(message))
    assert found, body(message)
    return found.group(1)


def ask_change(client: Browserish, new: str, password: str = PASSWORD) -> httpx.Response:
    client.get("/account")
    return client.post("/account/email", {"email": new, "password": password}, follow_redirects=False)


def close(client: Browserish, confirm: str, password: str = PASSWORD) -> httpx.Response:
    client.get("/account")
    return client.post("/account/close", {"password": password, "confirm": confirm}, follow_redirects=False)


def signed_in(client: Browserish) -> bool:
    return client.get("/dashboard").url.path == "/dashboard"


def new_key(client: Browserish) -> str:
    client.get("/keys")
    page = client.post("/keys", {"name": "laptop"})
    found = KEY.search(page.text)
    assert found, page.text
    return found.group(0)


def key_works(site, key: str) -> tuple[int, int]:
    headers = {"authorization": f"Bearer {key}"}
    models = httpx.get(site.url + "/v1/models", headers=headers, timeout=30)
    chat = httpx.post(site.url + "/v1/chat/completions", headers=headers, json=CHAT, timeout=30)
    return models.status_code, chat.status_code


# ---- changing the address ----------------------------------------------------------------

def test_a_new_address_is_confirmed_by_a_link_mailed_to_it_and_the_old_one_is_told(database, site, smtp):
    client, old = member(site, smtp)
    me = account_id(database, old)
    new = unique_email()
    count = len(smtp.inbox.messages)
    answer = ask_change(client, new)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/account?notice=email_link_sent"
    assert "We sent a link to the new address" in client.get(answer.headers["location"]).text

    link = change_link(smtp.inbox.wait_for(new, subject="Confirm your new address", after=count))
    notice = smtp.inbox.wait_for(old, subject="Your address is being changed", after=count)
    assert new in body(notice) and "change your password" in body(notice)
    assert "token=" not in body(notice)  # the old mailbox gets no way to confirm anything

    # a mail scanner (or a preview) opening the link changes nothing, however often
    scanner = Browserish(site.url)
    for _ in range(2):
        page = scanner.get(link)
        assert page.status_code == 200
        assert new in page.text and 'action="/email/confirm"' in page.text
    assert account(database, me)["email"] == old
    assert run(query(database, "SELECT used_at FROM mail_tokens WHERE account_id = $1"
                               " AND purpose = 'email_change'", me))[0]["used_at"] is None

    confirmed = scanner.post("/email/confirm", {"token": httpx.URL(link).params["token"]}, follow_redirects=False)
    assert confirmed.status_code == 303, confirmed.text
    assert "notice=email_changed" in confirmed.headers["location"]
    row = account(database, me)
    assert row["email"] == new and row["email_verified_at"] is not None

    # the link is spent; the browser that asked shows the new address
    again = Browserish(site.url).post("/email/confirm", {"token": httpx.URL(link).params["token"]})
    assert again.status_code == 400 and "This link is not valid any more." in again.text
    assert new in client.get("/account").text

    # the new address logs in; the old one is free for anybody's sign-up
    assert Browserish(site.url).log_in(new).url.path == "/dashboard"
    assert Browserish(site.url).log_in(old).status_code == 400
    assert Browserish(site.url).sign_up(old).url.path == "/welcome"


def test_confirming_spends_the_accounts_other_open_links(database, site, smtp):
    client, old = member(site, smtp)
    count = len(smtp.inbox.messages)
    client.get("/forgot")
    client.post("/forgot", {"email": old})
    reset = link_in(smtp.inbox.wait_for(old, subject="Reset", after=count))
    first, second = unique_email(), unique_email()
    assert ask_change(client, first).status_code == 303
    assert ask_change(client, second).status_code == 303
    first_link = change_link(smtp.inbox.wait_for(first, after=count))
    second_link = change_link(smtp.inbox.wait_for(second, after=count))

    assert Browserish(site.url).post("/email/confirm", {"token": httpx.URL(second_link).params["token"]},
                                     follow_redirects=False).status_code == 303
    stale = Browserish(site.url)
    assert stale.get(first_link).status_code == 400
    assert stale.post("/email/confirm", {"token": httpx.URL(first_link).params["token"]}).status_code == 400
    assert stale.get(reset).status_code == 400  # mailed to the old address: no way back in
    assert account(database, account_id(database, second))["email"] == second


def test_the_change_form_refuses_what_cannot_be_the_new_address(database, site, smtp):
    client, address = member(site, smtp)
    taken = member(site, smtp)[1]
    count = len(smtp.inbox.messages)
    for new, text in [(address.upper(), "address already."),
                      ("not an address", "Enter one email address in plain ASCII letters"),
                      ("x@example.com, y@example.com", "Enter one email address in plain ASCII letters"),
                      (taken.upper(), "Another account uses this address already.")]:
        answer = ask_change(client, new)
        assert answer.status_code == 400, (new, answer.status_code)
        assert text in answer.text, new
    wrong = ask_change(client, unique_email(), "not the password at all")
    assert wrong.status_code == 400 and "The current password is wrong." in wrong.text
    time.sleep(0.5)
    assert len(smtp.inbox.messages) == count  # nothing mailed for any of them
    assert account(database, account_id(database, address))["email"] == address


def test_the_change_form_learns_who_has_an_account_no_faster_than_the_sign_up(database, site, smtp, pg_url):
    """Each address the form looks up counts against the client's sign-ups (CODEPLAN_SIGNUP_LIMIT
    per CODEPLAN_SIGNUP_WINDOW): the sign-up's own answer says an address is taken, at that rate.
    The page counts its lookups there; past the limit the form answers 429 without looking."""
    client, _ = member(site, smtp)
    before = run(query(database, "SELECT count(*) AS n FROM signup_attempts"))[0]["n"]
    assert ask_change(client, unique_email()).status_code == 303
    assert run(query(database, "SELECT count(*) AS n FROM signup_attempts"))[0]["n"] == before + 1

    async def probe() -> list[str]:
        pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
        try:
            me = await identity.sign_up(pool, unique_email(), PASSWORD, "")
            token = await sessions.create(pool, me.id, me.proven_by)
            viewer = await sessions.lookup(pool, token, touch=False)
            limit = SignupLimit(f"10.77.{uuid.uuid4().int % 250}.9", 3, 3600)
            outcomes = []
            for _ in range(5):
                try:
                    await identity.change_email(pool, viewer, unique_email(), PASSWORD, limit.address, limit)
                    outcomes.append("ok")
                except identity.Refusal as refusal:
                    outcomes.append(refusal.code)
            return outcomes
        finally:
            await pool.close()
    assert run(probe()) == ["ok", "ok", "ok", "signup_throttled", "signup_throttled"]


def test_an_address_taken_since_the_link_was_sent_is_said_not_a_500(database, site, smtp):
    client, old = member(site, smtp)
    me = account_id(database, old)
    new = unique_email()
    count = len(smtp.inbox.messages)
    assert ask_change(client, new).status_code == 303
    link = change_link(smtp.inbox.wait_for(new, after=count))
    token = httpx.URL(link).params["token"]
    assert Browserish(site.url).sign_up(new.upper()).url.path == "/welcome"  # somebody was faster

    answer = Browserish(site.url).post("/email/confirm", {"token": token})
    assert answer.status_code == 409
    assert "belongs to another account now" in answer.text
    assert account(database, me)["email"] == old

    # and when the other sign-up commits while this confirmation waits on the unique index
    newer = unique_email()
    count = len(smtp.inbox.messages)
    assert ask_change(client, newer).status_code == 303
    token = httpx.URL(change_link(smtp.inbox.wait_for(newer, after=count))).params["token"]

    async def race() -> int:
        other = await asyncpg.connect(database)
        try:
            transaction = other.transaction()
            await transaction.start()
            await other.execute("INSERT INTO accounts (email) VALUES ($1)", newer)
            confirmer = Browserish(site.url)
            confirmer.get(link)
            answers: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: answers.append(
                confirmer.post("/email/confirm", {"token": token})))
            thread.start()
            for _ in range(200):  # until the confirmation waits on the index
                if await other.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                        " AND datname = current_database()"):
                    break
                await asyncio.sleep(0.02)
            await transaction.commit()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
            assert "belongs to another account now" in answers[0].text
            return answers[0].status_code
        finally:
            await other.close()
    assert run(race()) == 409
    assert account(database, me)["email"] == old


def test_the_change_mails_speak_chinese(database, site, smtp):
    client, old = member(site, smtp, "zh-CN")
    new = unique_email()
    count = len(smtp.inbox.messages)
    assert ask_change(client, new).status_code == 303
    to_new = smtp.inbox.wait_for(new, after=count)
    assert "确认" in str(to_new["Subject"]) and "/email/confirm?token=" in body(to_new)
    notice = smtp.inbox.wait_for(old, after=count)
    assert new in body(notice) and "密码" in body(notice)
    page = client.get("/account")
    assert "更改邮箱" in page.text and "关闭账户" in page.text


# ---- closing the account -----------------------------------------------------------------

def test_closing_is_refused_while_stripe_still_bills_the_account(database, site, smtp):
    client, address = member(site, smtp)
    me = account_id(database, address)
    key = new_key(client)
    run(query(database, "UPDATE subscriptions SET stripe_subscription_id = $2"
                        " WHERE account_id = $1 AND status <> 'canceled'", me, f"sub_{uuid.uuid4().hex[:12]}"))
    answer = close(client, address)
    assert answer.status_code == 409
    assert "cancel it in the billing portal first" in answer.text
    row = account(database, me)
    assert row["closed_at"] is None and row["email"] == address
    assert signed_in(client)
    assert key_works(site, key) == (200, 200)


def test_closing_ends_keys_sessions_links_and_the_plan_and_frees_the_address(database, site, smtp):
    client, address = member(site, smtp)
    me = account_id(database, address)
    key = new_key(client)
    assert key_works(site, key) == (200, 200)
    laptop = Browserish(site.url)
    assert laptop.log_in(address).url.path == "/dashboard"
    count = len(smtp.inbox.messages)
    client.get("/forgot")
    client.post("/forgot", {"email": address})
    reset = link_in(smtp.inbox.wait_for(address, subject="Reset", after=count))

    # the typed confirmation and the password are both asked
    refused = close(client, "someone@else.example")
    assert refused.status_code == 400 and "email address to confirm." in refused.text
    refused = close(client, address, "not the password at all")
    assert refused.status_code == 400 and "The current password is wrong." in refused.text
    assert account(database, me)["closed_at"] is None

    count = len(smtp.inbox.messages)
    done = close(client, f"  {address.upper()} ")
    assert done.status_code == 200, done.text
    assert "Your account is closed" in done.text
    assert 'codeplan_session=""' in done.headers.get("set-cookie", "") or \
        "max-age=0" in done.headers.get("set-cookie", "").lower()
    notice = smtp.inbox.wait_for(address, subject="Your account is closed", after=count)
    assert "token=" not in body(notice)

    # keys stop at once on the bridge's paths
    assert key_works(site, key) == (401, 401)
    # every browser is out, and nobody gets back in: log in, reset, a link mailed before
    assert not signed_in(client) and not signed_in(laptop)
    assert Browserish(site.url).log_in(address).status_code == 400
    assert Browserish(site.url).get(reset).status_code == 400
    row = account(database, me)
    assert row["closed_at"] is not None
    assert row["email"] == f"closed-{me}@closed.invalid"
    assert run(query(database, "SELECT count(*) AS n FROM web_sessions WHERE account_id = $1", me))[0]["n"] == 0
    assert run(query(database, "SELECT count(*) AS n FROM mail_tokens WHERE account_id = $1"
                               " AND used_at IS NULL", me))[0]["n"] == 0
    assert run(query(database, "SELECT count(*) AS n FROM api_keys WHERE account_id = $1"
                               " AND revoked_at IS NULL", me))[0]["n"] == 0
    subs = run(query(database, "SELECT status, ended_at FROM subscriptions WHERE account_id = $1", me))
    assert [s["status"] for s in subs] == ["canceled"] and subs[0]["ended_at"] is not None

    # nothing mailed to the placeholder from the forgot form; the old address signs up anew
    count = len(smtp.inbox.messages)
    stranger = Browserish(site.url)
    stranger.get("/forgot")
    stranger.post("/forgot", {"email": row["email"]})
    stranger.post("/forgot", {"email": address})
    time.sleep(1.0)
    assert len(smtp.inbox.messages) == count
    assert Browserish(site.url).sign_up(address).url.path == "/welcome"

    # the admin API says so
    admin = httpx.get(f"{site.url}/admin/users/{me}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=30)
    assert admin.status_code == 200 and admin.json()["user"]["closed"] is True
    listed = httpx.get(f"{site.url}/admin/users", params={"q": address},
                       headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).json()
    assert [u["closed"] for u in listed] == [False]  # the new sign-up, not the closed account


def test_a_closed_account_is_shut_at_every_door(database, site, smtp):
    """Whatever a closed account still holds (a link or a session row made by hand, its
    placeholder typed somewhere) gets nobody in: log in, reset, verify, sessions."""
    client, address = member(site, smtp)
    me = account_id(database, address)
    assert close(client, address).status_code == 200
    placeholder = f"closed-{me}@closed.invalid"

    async def doors() -> dict:
        pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
        try:
            found = {}
            found["find"] = await identity.find(pool, placeholder)
            found["link"] = await identity.issue_link(pool, me, "reset")
            # a link and a session written straight into the tables
            token = "a-left-over-link-" + uuid.uuid4().hex
            for purpose in ("verify", "reset"):
                digest = identity._digest(token + purpose)
                await pool.execute("INSERT INTO mail_tokens (token_hash, account_id, purpose, expires_at)"
                                   " VALUES ($1, $2, $3, now() + interval '1 hour')", digest, me, purpose)
            found["verify"] = await identity.verify(pool, token + "verify")
            found["verify_page"] = await identity.verify_link_email(pool, token + "verify")
            found["reset_page"] = await identity.link_account(pool, token + "reset", "reset")
            try:
                await identity.reset_password(pool, token + "reset", "a fresh password here")
                found["reset"] = "done"
            except identity.Refusal as refusal:
                found["reset"] = refusal.code
            found["session"] = await sessions.create(pool, me, None)
            cookie = "a-left-over-session-" + uuid.uuid4().hex
            await pool.execute("INSERT INTO web_sessions (token_hash, account_id, expires_at)"
                               " VALUES ($1, $2, now() + interval '1 day')", sessions.token_hash(cookie), me)
            found["viewer"] = await sessions.lookup(pool, cookie)
            try:
                await identity.log_in(pool, placeholder, PASSWORD, "10.66.0.1")
                found["login"] = "done"
            except identity.Refusal as refusal:
                found["login"] = refusal.code
            return found
        finally:
            await pool.close()
    assert run(doors()) == {"find": None, "link": None, "verify": None, "verify_page": None,
                            "reset_page": None, "reset": "bad_link", "session": None, "viewer": None,
                            "login": "bad_credentials"}
    assert account(database, me)["email_verified_at"] is not None  # as it was; nothing else moved
    # the sign-up refuses the placeholder's domain: nobody takes an address that cannot be mailed
    refused = Browserish(site.url).sign_up("someone@closed.invalid")
    assert refused.status_code == 400


# ---- addresses never confirmed -----------------------------------------------------------

async def _unconfirmed(pool: asyncpg.Pool, days_old: int, **what) -> int:
    """A web sign-up whose address nobody confirmed, `days_old` days ago, with a session and a
    verify link; `what` adds something worth keeping."""
    account = await identity.sign_up(pool, unique_email(), PASSWORD, "lite")
    await sessions.create(pool, account.id, account.proven_by)
    await identity.issue_link(pool, account.id, "verify")
    await pool.execute("UPDATE accounts SET created_at = now() - make_interval(days => $2) WHERE id = $1",
                       account.id, days_old)
    if what.get("key"):
        await apikeys.create(pool, account.id, "unused")
    if what.get("audit"):
        await pool.execute("INSERT INTO admin_audit (actor, action, target) VALUES ('test', 'user.suspend', $1)",
                           f"account:{account.id}")
    if what.get("stripe_customer"):
        await pool.execute("UPDATE accounts SET stripe_customer_id = $2 WHERE id = $1", account.id,
                           f"cus_{uuid.uuid4().hex[:12]}")
    if what.get("admin"):
        await pool.execute("UPDATE accounts SET is_admin = true WHERE id = $1", account.id)
    return account.id


def test_an_unconfirmed_account_holding_nothing_expires_and_one_holding_something_stays(database, site, simulator,
                                                                                        smtp):
    async def prepare() -> dict[str, int]:
        pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
        try:
            made = {"empty": await _unconfirmed(pool, 8), "empty_with_key": await _unconfirmed(pool, 8, key=True),
                    "young": await _unconfirmed(pool, 3), "audited": await _unconfirmed(pool, 8, audit=True),
                    "customer": await _unconfirmed(pool, 8, stripe_customer=True),
                    "admin": await _unconfirmed(pool, 8, admin=True),
                    "used": await _unconfirmed(pool, 1)}
            # made by an operator (no password; its owner sets one by a reset): not a stranger's
            made["operator"] = await pool.fetchval(
                "INSERT INTO accounts (email, created_at) VALUES ($1, now() - interval '30 days') RETURNING id",
                unique_email())
            return made
        finally:
            await pool.close()
    made = run(prepare())
    # "used": a key that made a request (a ledger row), then backdated
    secret = run(_key_for(database, made["used"]))
    assert httpx.post(site.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                      json=CHAT, timeout=30).status_code == 200
    run(query(database, "UPDATE accounts SET created_at = now() - interval '8 days' WHERE id = $1", made["used"]))
    assert run(query(database, "SELECT count(*) AS n FROM usage_ledger l JOIN subscriptions s"
                               " ON s.id = l.subscription_id WHERE s.account_id = $1", made["used"]))[0]["n"] == 1

    # a process starting up tidies at once (and hourly after): the web's housekeeping
    sweeper = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                           CODEPLAN_UNVERIFIED_DAYS="7")
    try:
        deadline = time.monotonic() + 30
        while account(database, made["empty"]) is not None:
            assert time.monotonic() < deadline, "the empty unconfirmed account was not expired"
            time.sleep(0.2)
    finally:
        sweeper.stop()
    gone = {name for name, id_ in made.items() if account(database, id_) is None}
    assert gone == {"empty", "empty_with_key"}
    for id_ in (made["empty"], made["empty_with_key"]):
        for table in ("web_sessions", "mail_tokens", "api_keys", "subscriptions"):
            assert run(query(database, f"SELECT count(*) AS n FROM {table} WHERE account_id = $1", id_))[0]["n"] == 0


async def _key_for(database: str, account_id: int) -> str:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        return (await apikeys.create(pool, account_id, "used")).secret
    finally:
        await pool.close()


def test_two_sweepers_at_once_expire_each_account_once(fresh_database):
    async def scenario() -> tuple[list, int]:
        pools = [await asyncpg.create_pool(fresh_database, min_size=1, max_size=3) for _ in range(2)]
        try:
            made = [await _unconfirmed(pools[0], 10) for _ in range(30)]
            kept = await _unconfirmed(pools[0], 10, audit=True)
            results = await asyncio.gather(*(identity.expire_unverified(p, 7, batch=7) for p in pools),
                                           return_exceptions=True)
            left = await pools[0].fetchval("SELECT count(*) FROM accounts WHERE id = ANY($1)", made)
            assert await pools[0].fetchval("SELECT 1 FROM accounts WHERE id = $1", kept)
            again = await identity.expire_unverified(pools[0], 7)
            return results, left + again
        finally:
            for pool in pools:
                await pool.close()
    results, left = run(scenario())
    assert all(isinstance(r, int) for r in results), results
    assert sum(results) == 30 and left == 0
