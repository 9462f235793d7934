"""One lock order for everything done to an account: its links (all of them, by token_hash),
the account, its sessions, its keys, its subscriptions. A close, a reset, a change of address and
a password change each touch several links of one account; taking their own link first and the
others in scan order, two of them at once deadlocked and one page answered 500. And a key made
as the account closes: made only while the account is open, and a closed account's key is no key.

A blocker holding one row of the account for a moment (another request of the account on it)
stages each interleaving deterministically, as tests/test_account_settings.py does. Real servers:
PostgreSQL, and for the Keys page and the key's use the bridge subprocess and an SMTP server."""
from __future__ import annotations

import asyncio
import re
import threading
import uuid

import asyncpg
import httpx
import pytest

from service import accounts
from service.accounts import AccountError, Authenticator
from service.web import identity, sessions

from .conftest import run, start_bridge
from .web_support import PASSWORD, Browserish, SmtpServer, link_in

NEW = "a brand new passphrase"
FROM_LINK = "a password from the link"
KEY = re.compile(r"cp_[A-Za-z0-9_-]{30,}")
CHAT = {"model": "glm-4.6", "max_tokens": 10,
        "messages": [{"role": "user", "content": "[[sim tokens=3 reasoning=0]] hi"}]}


def unique_email() -> str:
    return f"lo{uuid.uuid4().hex[:10]}@example.com"


async def waiting(spy: asyncpg.Connection) -> int:
    """How many sessions of this database wait on a lock."""
    return await spy.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                              " AND datname = current_database()")


async def waits(spy: asyncpg.Connection, count: int) -> None:
    for _ in range(500):
        if await waiting(spy) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} sessions wait on a lock")


class Staged:
    """A pool, a spy on pg_stat_activity and a blocker connection holding one row for a moment."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> "Staged":
        self.pool = await asyncpg.create_pool(self.url, min_size=2, max_size=4)
        self.spy = await asyncpg.connect(self.url)
        self.blocker = await asyncpg.connect(self.url)
        self.hold = self.blocker.transaction()
        return self

    async def block(self, sql: str, *args) -> None:
        await self.hold.start()
        await self.blocker.execute(sql, *args)

    async def release(self) -> None:
        await self.hold.rollback()

    async def __aexit__(self, *exc) -> None:
        await self.blocker.close()
        await self.spy.close()
        await self.pool.close()


async def member(pool: asyncpg.Pool) -> tuple[identity.Account, sessions.Viewer, str]:
    """An account with two sessions: the viewer's, and another browser's (its token)."""
    account = await identity.sign_up(pool, unique_email(), PASSWORD, "lite")
    mine = await sessions.create(pool, account.id, account.proven_by)
    other = await sessions.create(pool, account.id, account.proven_by)
    return account, await sessions.lookup(pool, mine, touch=False), other


async def two_reset_links(pool: asyncpg.Pool, account_id: int) -> str:
    """ "Forgot your password" asked twice: the second mail's link, the one used."""
    await identity.issue_link(pool, account_id, "reset")
    await asyncio.sleep(0.01)
    return await identity.issue_link(pool, account_id, "reset")


def test_a_close_and_an_address_confirmation_at_once_take_the_links_in_one_order(fresh_database):
    """Three change links asked (a typo, then again): the close spent them in scan order, the
    confirmation took its own and then the others; with another request on the middle one they
    deadlocked. Now both take them by token_hash: the confirmation waits, and finds its link
    spent by the close."""
    async def scenario() -> tuple:
        async with Staged(fresh_database) as s:
            account, viewer, _ = await member(s.pool)
            first = await identity.change_email(s.pool, viewer, unique_email(), PASSWORD, "10.34.0.1")
            await asyncio.sleep(0.01)
            middle = await identity.change_email(s.pool, viewer, unique_email(), PASSWORD, "10.34.0.1")
            await asyncio.sleep(0.01)
            last = await identity.change_email(s.pool, viewer, unique_email(), PASSWORD, "10.34.0.1")
            assert first.token and last.token
            await s.block("SELECT 1 FROM mail_tokens WHERE token_hash = $1 FOR UPDATE", identity._digest(middle.token))
            close = asyncio.create_task(identity.close_account(s.pool, viewer, PASSWORD, account.email, "10.34.0.2"))
            await waits(s.spy, 1)
            confirm = asyncio.create_task(identity.confirm_email_change(s.pool, last.token))
            await waits(s.spy, 2)
            await s.release()
            results = await asyncio.gather(close, confirm, return_exceptions=True)
            closed_at = await s.pool.fetchval("SELECT closed_at FROM accounts WHERE id = $1", account.id)
            open_links = await s.pool.fetchval("SELECT count(*) FROM mail_tokens WHERE account_id = $1"
                                               " AND used_at IS NULL", account.id)
            return results, closed_at, open_links

    (closed, confirmed), closed_at, open_links = asyncio.run(scenario())
    assert isinstance(closed, identity.Closed), closed
    assert isinstance(confirmed, identity.Refusal) and confirmed.code == "bad_link", confirmed
    assert closed_at is not None and open_links == 0


def test_a_close_and_a_reset_at_once_take_the_links_in_one_order(fresh_database):
    """A reset (its link the second of two) took its own link, then the account and the
    sessions, and spent the other link last; the close took the links in scan order: the older
    one, then waited on the reset's, and the reset waited on it. Now the close waits for the
    reset whole, and its proof (the old password) is stale: refused, nothing closed."""
    async def scenario() -> tuple:
        async with Staged(fresh_database) as s:
            account, viewer, other = await member(s.pool)
            link = await two_reset_links(s.pool, account.id)
            # another request holds the other browser's session: the reset stops at the sessions
            await s.block("SELECT 1 FROM web_sessions WHERE token_hash = $1 FOR UPDATE", sessions.token_hash(other))
            reset = asyncio.create_task(identity.reset_password(s.pool, link, FROM_LINK))
            await waits(s.spy, 1)
            close = asyncio.create_task(identity.close_account(s.pool, viewer, PASSWORD, account.email, "10.34.0.3"))
            await waits(s.spy, 2)
            await s.release()
            results = await asyncio.gather(reset, close, return_exceptions=True)
            row = await s.pool.fetchrow("SELECT closed_at, password_hash FROM accounts WHERE id = $1", account.id)
            open_resets = await s.pool.fetchval("SELECT count(*) FROM mail_tokens WHERE account_id = $1"
                                                " AND purpose = 'reset' AND used_at IS NULL", account.id)
            return results, row, open_resets

    (reset, closed), row, open_resets = asyncio.run(scenario())
    assert isinstance(reset, identity.Account), reset
    assert isinstance(closed, identity.Refusal) and closed.code == "wrong_password", closed
    assert row["closed_at"] is None and row["password_hash"] == reset.proven_by
    assert open_resets == 0  # the reset spent the older link too


def test_a_reset_and_a_password_change_with_two_reset_links_take_them_in_one_order(fresh_database):
    """28c7497 put the change's reset links first, which held for one link: with two, the
    change spent them in scan order while the reset held the newer one and wanted the older.
    Now both take every link by token_hash: the change waits, then is refused (the reset ended
    its session and changed the password it proved)."""
    async def scenario() -> tuple:
        async with Staged(fresh_database) as s:
            account, viewer, other = await member(s.pool)
            link = await two_reset_links(s.pool, account.id)
            await s.block("SELECT 1 FROM web_sessions WHERE token_hash = $1 FOR UPDATE", sessions.token_hash(other))
            reset = asyncio.create_task(identity.reset_password(s.pool, link, FROM_LINK))
            await waits(s.spy, 1)
            change = asyncio.create_task(identity.change_password(s.pool, viewer, PASSWORD, NEW, "10.34.0.4"))
            await waits(s.spy, 2)
            await s.release()
            results = await asyncio.gather(reset, change, return_exceptions=True)
            stored = await s.pool.fetchval("SELECT password_hash FROM accounts WHERE id = $1", account.id)
            return results, stored

    (reset, changed), stored = asyncio.run(scenario())
    assert isinstance(reset, identity.Account), reset
    assert isinstance(changed, identity.Refusal) and changed.code == "wrong_password", changed
    assert stored == reset.proven_by


def test_a_reset_and_an_address_confirmation_at_once_take_the_links_in_one_order(fresh_database):
    """The reset held its link and spent the other reset link last; the confirmation took its
    own, then spent every other in scan order (the older reset link, then the reset's). Now the
    confirmation waits for the reset, whose links are not its own: both are done."""
    async def scenario() -> tuple:
        async with Staged(fresh_database) as s:
            account, viewer, other = await member(s.pool)
            link = await two_reset_links(s.pool, account.id)
            address = unique_email()
            change = await identity.change_email(s.pool, viewer, address, PASSWORD, "10.34.0.5")
            await s.block("SELECT 1 FROM web_sessions WHERE token_hash = $1 FOR UPDATE", sessions.token_hash(other))
            reset = asyncio.create_task(identity.reset_password(s.pool, link, FROM_LINK))
            await waits(s.spy, 1)
            confirm = asyncio.create_task(identity.confirm_email_change(s.pool, change.token))
            await waits(s.spy, 2)
            await s.release()
            results = await asyncio.gather(reset, confirm, return_exceptions=True)
            email = await s.pool.fetchval("SELECT email FROM accounts WHERE id = $1", account.id)
            return results, email, address

    (reset, confirmed), email, address = asyncio.run(scenario())
    assert isinstance(reset, identity.Account), reset
    assert confirmed == reset.id, confirmed
    assert email == address


# ---- a key made as the account closes ----------------------------------------------------

@pytest.fixture(scope="module")
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(database, simulator, smtp):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                          CODEPLAN_AUTH_CACHE_TTL="0", CODEPLAN_SIGNUP_PLAN="lite",
                          CODEPLAN_MAIL_FROM="Codeplan <noreply@codeplan.test>", CODEPLAN_SIGNUP_LIMIT="1000")
    yield server
    server.stop()


def signed_up(site, smtp) -> tuple[Browserish, str]:
    client = Browserish(site.url)
    address = unique_email()
    count = len(smtp.inbox.messages)
    assert client.sign_up(address).url.path == "/welcome"
    assert client.confirm(link_in(smtp.inbox.wait_for(address, after=count))).url.path == "/setup"
    return client, address


async def close_stalled(s: Staged, viewer: sessions.Viewer, email: str) -> asyncio.Task:
    """A close under way: its links, the account and the sessions taken (its keys revoked),
    held at the subscriptions by the blocker."""
    await s.block("SELECT 1 FROM subscriptions WHERE account_id = $1 FOR UPDATE", viewer.account_id)
    close = asyncio.create_task(identity.close_account(s.pool, viewer, PASSWORD, email, "10.34.0.6"))
    await waits(s.spy, 1)
    return close


async def until_waiting_or_done(spy: asyncpg.Connection, done) -> None:
    """Until the key's maker waits on a lock too (the mend), or is done without waiting."""
    for _ in range(500):
        if done() or await waiting(spy) >= 2:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the key's maker neither waited nor finished")


def test_a_key_made_on_the_keys_page_as_the_account_closes_is_not_made(database, site, smtp):
    """Another tab's POST /keys: its session checked while the close had not committed, then
    the key inserted with no look at the account, after the close revoked the keys there were:
    a closed account kept a live key. Now the insert waits for the close, finds the account
    closed, and the page leads to the login, as any page of a closed account does."""
    client, address = signed_up(site, smtp)
    client.get("/keys")
    answer: list[httpx.Response] = []

    async def scenario() -> tuple:
        async with Staged(database) as s:
            viewer = await sessions.lookup(s.pool, client.session, touch=False)
            close = await close_stalled(s, viewer, address)
            post = threading.Thread(target=lambda: answer.append(client.post("/keys", {"name": "laptop"})))
            post.start()
            await until_waiting_or_done(s.spy, lambda: not post.is_alive())
            await s.release()
            closed = await close
            await asyncio.get_running_loop().run_in_executor(None, post.join)
            live = await s.pool.fetchval("SELECT count(*) FROM api_keys WHERE account_id = $1"
                                         " AND revoked_at IS NULL", viewer.account_id)
            return closed, live

    closed, live = run(scenario())
    assert isinstance(closed, identity.Closed), closed
    page = answer[0]
    assert live == 0 and not KEY.search(page.text), page.text[:300]
    assert page.status_code == 200 and page.url.path == "/login", (page.status_code, page.url)
    assert page.url.params.get("next") == "/keys"


def test_a_key_made_by_the_cli_as_the_account_closes_is_not_made(fresh_database):
    """`codeplan keys create` found the account open, then inserted after the close revoked its
    keys. Now the insert waits for the close and refuses: "account is closed"."""
    async def scenario() -> tuple:
        async with Staged(fresh_database) as s:
            account, viewer, _ = await member(s.pool)
            close = await close_stalled(s, viewer, account.email)
            cli = await asyncpg.connect(fresh_database)
            try:
                made = asyncio.create_task(accounts.create_key(cli, account.email, "laptop"))
                await until_waiting_or_done(s.spy, made.done)
                await s.release()
                closed = await close
                outcome = await asyncio.gather(made, return_exceptions=True)
            finally:
                await cli.close()
            live = await s.pool.fetchval("SELECT count(*) FROM api_keys WHERE account_id = $1"
                                         " AND revoked_at IS NULL", account.id)
            return closed, outcome[0], live

    closed, made, live = asyncio.run(scenario())
    assert isinstance(closed, identity.Closed), closed
    assert isinstance(made, AccountError) and "closed" in str(made), made
    assert live == 0


def test_a_closed_accounts_key_left_unrevoked_is_no_key(database, site):
    """A close revokes every key; should one be left (written by hand, or by a path that
    forgot), the lookup itself refuses it: a closed account's key is an invalid key (401), not
    one good for /v1/usage or a checkout for the closed account."""
    async def prepare() -> tuple[str, Authenticator]:
        conn = await asyncpg.connect(database)
        try:
            new = await accounts.create_user(conn, unique_email(), "lite")
            await conn.execute("UPDATE accounts SET closed_at = now(), email = $2 WHERE id = $1",
                               new.account_id, identity.closed_address(new.account_id))
            return new.key
        finally:
            await conn.close()

    async def found(secret: str):
        pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
        try:
            return await Authenticator(pool, 0).authenticate(secret)
        finally:
            await pool.close()

    secret = run(prepare())
    assert run(found(secret)) is None
    headers = {"authorization": f"Bearer {secret}"}
    assert httpx.post(site.url + "/v1/chat/completions", headers=headers, json=CHAT, timeout=30).status_code == 401
    assert httpx.get(site.url + "/v1/usage", headers=headers, timeout=30).status_code == 401
