"""The account page: a signed-in person changes the password (the current one asked, guessed no
faster than at the login form) and signs out every other browser. Real servers throughout: the
bridge subprocess, PostgreSQL, an SMTP server for the reset links a change must spend."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from service.web import identity, sessions

from .conftest import query, run, start_bridge
from .web_support import PASSWORD, Browserish, SmtpServer, link_in

NEW = "a brand new passphrase"


def unique_email() -> str:
    return f"acct{uuid.uuid4().hex[:10]}@example.com"


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


@pytest.fixture(autouse=True)
def no_failed_logins(database):
    """Failures from 127.0.0.1 that other tests left would count against this client's limit."""
    run(query(database, "DELETE FROM login_failures WHERE address = '127.0.0.1'"))


def member(site, smtp) -> tuple[Browserish, str]:
    """A signed-up, confirmed person in a browser of their own."""
    client = Browserish(site.url)
    address = unique_email()
    count = len(smtp.inbox.messages)
    assert client.sign_up(address).url.path == "/welcome"
    assert client.confirm(link_in(smtp.inbox.wait_for(address, after=count))).url.path == "/setup"
    return client, address


def another_browser(site, address: str, password: str = PASSWORD) -> Browserish:
    other = Browserish(site.url)
    assert other.log_in(address, password).url.path == "/dashboard"
    return other


def signed_in(client: Browserish) -> bool:
    return client.get("/dashboard").url.path == "/dashboard"


def change(client: Browserish, current: str, new: str = NEW):
    client.get("/account")
    return client.post("/account/password", {"current": current, "password": new}, follow_redirects=False)


def test_changing_the_password_signs_out_every_other_browser_and_keeps_this_one(site, smtp):
    client, address = member(site, smtp)
    laptop, phone = another_browser(site, address), another_browser(site, address)
    page = client.get("/account")
    assert page.status_code == 200
    assert "signed in on 2 other browsers" in page.text
    assert 'href="/account" aria-current="page"' in page.text  # the header's new entry

    answer = change(client, PASSWORD)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/account?notice=password_changed"
    assert "Your password is changed." in client.get(answer.headers["location"]).text
    assert signed_in(client)
    assert not signed_in(laptop) and not signed_in(phone)

    stranger = Browserish(site.url)
    assert stranger.log_in(address, PASSWORD).status_code == 400  # the old password is gone
    assert another_browser(site, address, NEW)  # the new one works


def test_a_wrong_current_password_changes_nothing(site, smtp):
    client, address = member(site, smtp)
    laptop = another_browser(site, address)
    answer = change(client, "not my password at all")
    assert answer.status_code == 400
    assert "The current password is wrong." in answer.text
    assert signed_in(laptop)
    assert another_browser(site, address, PASSWORD)  # still the old password

    weak = change(client, PASSWORD, "short")
    assert weak.status_code == 400
    assert "at least 10 characters" in weak.text
    assert another_browser(site, address, PASSWORD)


def test_a_session_guesses_the_password_no_faster_than_the_login_form(site, smtp):
    """A stolen cookie must not be a way to try passwords without the login form's limit: the
    check is counted with the account's failed logins, and the lockout holds at both doors."""
    client, address = member(site, smtp)
    for _ in range(5):
        assert change(client, "guess " + uuid.uuid4().hex).status_code == 400
    refused = change(client, PASSWORD)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert "Too many failed attempts" in refused.text
    assert Browserish(site.url).log_in(address, PASSWORD).status_code == 429  # the same count


def test_a_reset_link_mailed_before_the_change_no_longer_works(site, smtp):
    client, address = member(site, smtp)
    count = len(smtp.inbox.messages)
    client.get("/forgot")
    client.post("/forgot", {"email": address})
    link = link_in(smtp.inbox.wait_for(address, subject="Reset", after=count))
    assert change(client, PASSWORD).status_code == 303

    whoever = Browserish(site.url)
    page = whoever.get(link)
    assert page.status_code == 400
    assert "This link is not valid any more." in page.text


def test_signing_out_the_other_browsers(site, smtp):
    client, address = member(site, smtp)
    laptop, phone = another_browser(site, address), another_browser(site, address)
    client.get("/account")
    answer = client.post("/account/sessions/end", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/account?notice=signed_out_others"
    page = client.get(answer.headers["location"])
    assert "Every other browser is signed out." in page.text
    assert "signed in on no other browser" in page.text
    assert signed_in(client)
    assert not signed_in(laptop) and not signed_in(phone)
    # the other browsers sign in again as before: nothing but their sessions ended
    assert signed_in(another_browser(site, address))


def test_the_account_forms_need_a_session_and_the_pages_csrf_token(site, smtp):
    nobody = Browserish(site.url)
    page = nobody.get("/account", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=/account")
    assert nobody.post("/account/password", {"current": PASSWORD, "password": NEW},
                       follow_redirects=False).status_code == 303  # to the login page

    client, address = member(site, smtp)
    laptop = another_browser(site, address)
    forged = client.client.post("/account/sessions/end", data={}, follow_redirects=False)
    assert forged.status_code == 403
    forged = client.client.post("/account/password", data={"current": PASSWORD, "password": NEW},
                                follow_redirects=False)
    assert forged.status_code == 403
    assert signed_in(laptop)
    assert another_browser(site, address, PASSWORD)


def test_the_account_page_in_chinese(site, smtp):
    client, _ = member(site, smtp)
    client.client.headers["accept-language"] = "zh-CN"
    page = client.get("/account")
    assert "修改密码" in page.text and "当前密码" in page.text
    assert "此账户没有在其他浏览器上登录。" in page.text


def test_a_change_loses_to_a_reset_used_while_it_was_hashed(database, site, smtp):
    """The change is applied only over the hash that was checked and only while its session
    lives: a reset link used in between (it ends every session) wins."""
    client, address = member(site, smtp)

    async def attempt() -> tuple[str, bytes]:
        conn = await asyncpg.connect(database)
        try:
            account_id = await conn.fetchval("SELECT id FROM accounts WHERE email = $1", address)
            before = await conn.fetchval("SELECT password_hash FROM accounts WHERE id = $1", account_id)
            gone = sessions.Viewer(account_id=account_id, email=address, verified=True, is_admin=False,
                                   token_hash=sessions.token_hash("a session a reset ended"))
            pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
            try:
                with pytest.raises(identity.Refusal) as refused:
                    await identity.change_password(pool, gone, PASSWORD, NEW, "127.0.0.9")
            finally:
                await pool.close()
            after = await conn.fetchval("SELECT password_hash FROM accounts WHERE id = $1", account_id)
            assert after == before
            return refused.value.code, after
        finally:
            await conn.close()

    code, _ = asyncio.run(attempt())
    assert code == "wrong_password"
    assert signed_in(client)


def test_a_login_checked_while_the_password_was_reset_makes_no_session(database, site, smtp):
    """A login's password check takes ~0.1 s; a reset (or a change) committed meanwhile ends
    every session there is. The login's session is made only while the hash it proved is still
    the account's, waiting for a change in flight to commit: a thief who knew the old password
    keeps nothing past the reset (one used to get a session in about every race)."""
    _, address = member(site, smtp)

    async def race() -> tuple[str | None, bool, str | None]:
        pool = await asyncpg.create_pool(database, min_size=1, max_size=3)
        resetting = await asyncpg.connect(database)
        try:
            account_id, old = await pool.fetchrow(
                "SELECT id, password_hash FROM accounts WHERE email = $1", address)
            transaction = resetting.transaction()
            await transaction.start()
            await resetting.execute("UPDATE accounts SET password_hash = 'reset' WHERE id = $1", account_id)
            await resetting.execute("DELETE FROM web_sessions WHERE account_id = $1", account_id)
            login = asyncio.create_task(sessions.create(pool, account_id, old))
            await asyncio.sleep(0.3)
            waited = not login.done()  # for the reset to commit, not past it
            await transaction.commit()
            late = await asyncio.wait_for(login, 10)
            return late, waited, await sessions.create(pool, account_id, "reset")
        finally:
            await resetting.close()
            await pool.close()

    late, waited, current = asyncio.run(race())
    assert waited
    assert late is None
    assert current is not None  # the password the reset set does sign in


def test_a_password_change_and_a_reset_at_once_take_their_locks_in_one_order(fresh_database):
    """A reset takes its link, then the account, then the sessions; the change took the account,
    the sessions, then every unused reset link: overlapping, they deadlocked and one page
    answered 500 (a reviewer's proof). Now the change takes the links first: the one that comes
    second waits, and is refused for what the first did."""

    async def waits(spy: asyncpg.Connection, count: int) -> None:
        for _ in range(500):
            if await spy.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'") >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"fewer than {count} sessions wait on a lock")

    async def scenario() -> list:
        pool = await asyncpg.create_pool(fresh_database, min_size=2, max_size=4)
        spy = await asyncpg.connect(fresh_database)
        blocker = await asyncpg.connect(fresh_database)
        try:
            account = await identity.sign_up(pool, unique_email(), PASSWORD, "lite")
            mine = await sessions.create(pool, account.id, account.proven_by)
            other = await sessions.create(pool, account.id, account.proven_by)
            viewer = await sessions.lookup(pool, mine, touch=False)
            link = await identity.issue_link(pool, account.id, "reset")
            # another request of the account holds one of its other sessions for a moment: the
            # change stops there, holding what it took before
            hold = blocker.transaction()
            await hold.start()
            await blocker.execute("SELECT 1 FROM web_sessions WHERE token_hash = $1 FOR UPDATE",
                                  sessions.token_hash(other))
            change = asyncio.create_task(identity.change_password(pool, viewer, PASSWORD, NEW, "127.0.0.8"))
            await waits(spy, 1)
            reset = asyncio.create_task(identity.reset_password(pool, link, "a password from the link"))
            await waits(spy, 2)
            await hold.rollback()
            return await asyncio.gather(change, reset, return_exceptions=True)
        finally:
            await blocker.close()
            await spy.close()
            await pool.close()

    changed, reset = asyncio.run(scenario())
    assert changed is None, changed
    assert isinstance(reset, identity.Refusal) and reset.code == "bad_link", reset
