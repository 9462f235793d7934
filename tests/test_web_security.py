"""Security of the web account surfaces and the admin guard, each proof a defect once found
(suspended admins, parallel and case-variant login guesses, IPv6 neighbours, costly made-up reset
tokens, mail that stalls or tells, one mailbox with many accounts) and the sound behaviour checked
beside them (redirects stay on the site, odd input is a 4xx, a reset ends every session).

Where a mend is about cost, the proof counts the costly calls or checks their order, never a
wall-clock threshold a slow shared machine could cross."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import socket
import threading
import uuid
from urllib.parse import urljoin, urlsplit

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller

from service.web import identity, mail, pages, passwords, throttle

from .conftest import free_port, query, run, start_bridge
from .web_support import PASSWORD, Browserish, Inbox, link_in

MANY = {"CODEPLAN_SIGNUP_LIMIT": "1000"}
ADMIN_TOKEN = "operator-token-0123456789"


def unique_email() -> str:
    return f"s{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture(scope="module")
def web(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0",
                          CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN, CODEPLAN_SIGNUP_PLAN="lite", **MANY)
    yield server
    server.stop()


class ControlledInbox(Inbox):
    """An SMTP server the test steers: `hold` keeps each mail's DATA unanswered until `release`
    (a provider that hangs), `refuse` answers 554 (one that is down); each envelope's recipients
    are kept (where a mail is really delivered)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "accept"
        self.released = threading.Event()
        self.rcpts: list[list[str]] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's name
        while self.mode == "hold" and not self.released.is_set():
            await asyncio.sleep(0.05)
        if self.mode == "refuse":
            return "554 Service unavailable"
        self.rcpts.append(list(envelope.rcpt_tos))
        return await super().handle_DATA(server, session, envelope)

    def hold(self) -> None:
        self.released.clear()
        self.mode = "hold"

    def accept(self) -> None:
        self.mode = "accept"
        self.released.set()


@pytest.fixture(scope="module")
def mail_web(database, simulator):
    inbox = ControlledInbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0",
                          CODEPLAN_SMTP_URL=f"smtp://127.0.0.1:{port}", CODEPLAN_SIGNUP_PLAN="lite", **MANY)
    server.inbox = inbox
    yield server
    inbox.accept()
    server.stop()
    controller.stop()


def signed_up(web) -> tuple[Browserish, str]:
    client = Browserish(web.url)
    address = unique_email()
    assert client.sign_up(address).url.path == "/setup"  # mail off: no verification step
    return client, address


def clear_failures(database):
    run(query(database, "DELETE FROM login_failures"))


async def _pool(database: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(database, min_size=1, max_size=4)


async def _account(pool: asyncpg.Pool, address: str, password: str = PASSWORD) -> int:
    return await pool.fetchval("INSERT INTO accounts (email, password_hash) VALUES ($1, $2) RETURNING id",
                               address, passwords.hash_password(password))


# ---- 1. a suspended admin is no admin -------------------------------------------------------

def test_a_suspended_admin_loses_the_admin_api_by_key_and_by_session(web, database):
    client, address = signed_up(web)
    client.get("/keys")
    secret = re.search(r"cp_[A-Za-z0-9_-]{30,}", client.post("/keys", {"name": "admin"}).text).group(0)
    account_id = run(query(database, "UPDATE accounts SET is_admin = true WHERE email = $1 RETURNING id",
                           address))[0]["id"]
    by_key = {"authorization": f"Bearer {secret}"}
    session = {"codeplan_session": client.session}
    assert httpx.get(f"{web.url}/admin/users", headers=by_key).status_code == 200
    assert httpx.get(f"{web.url}/admin/users", cookies=session).status_code == 200
    suspended = httpx.post(f"{web.url}/admin/users/{account_id}/suspend",
                           headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert suspended.status_code == 200 and suspended.json()["suspended"], suspended.text
    listing = httpx.get(f"{web.url}/admin/users", headers=by_key)
    restored = httpx.post(f"{web.url}/admin/users/{account_id}/restore", headers=by_key)
    by_cookie = httpx.get(f"{web.url}/admin/users", cookies=session)
    state = run(query(database, "SELECT suspended_at FROM accounts WHERE id = $1", account_id))[0]
    assert (listing.status_code, restored.status_code, by_cookie.status_code) == (403, 403, 403)
    assert state["suspended_at"] is not None, "the suspended admin restored itself"
    # and the page no longer calls it an admin
    assert 'class="badge"' not in client.get("/keys").text


# ---- 2. parallel guesses: at most the limit's worth of passwords checked --------------------

def test_parallel_guesses_check_at_most_the_per_account_limit_of_passwords(database, monkeypatch):
    checked = []

    async def slow_wrong(password: str, stored: str | None) -> bool:
        checked.append(password)
        await asyncio.sleep(0.3)  # a hash's time, widened: every guess is in flight at once
        return False
    monkeypatch.setattr(passwords, "verify_async", slow_wrong)

    async def probe() -> list[str]:
        pool = await _pool(database)
        try:
            await pool.execute("DELETE FROM login_failures")
            address = unique_email()
            await _account(pool, address)

            async def guess(i: int) -> str:
                try:
                    await identity.log_in(pool, address, f"wrong guess {i:04d}", f"10.9.{i}.1")
                except identity.Refusal as refusal:
                    return refusal.code
                return "in"
            outcomes = await asyncio.gather(*(guess(i) for i in range(16)))
            await pool.execute("DELETE FROM login_failures")
            return outcomes
        finally:
            await pool.close()
    outcomes = run(probe())
    assert len(checked) == throttle.PER_ACCOUNT, f"{len(checked)} passwords checked for one account (limit 5)"
    assert sorted(outcomes) == sorted(["bad_credentials"] * 5 + ["throttled"] * 11)


def test_logins_waiting_for_one_accounts_lock_leave_the_pool_to_the_ledger(database, monkeypatch):
    """The web shares its pool with the ledger: logins of one key that wait for another
    process's hold of its lock wait in this process holding no connection (one of them, in the
    database, holds one), and that wait is bounded: past it the login is refused for a moment."""
    async def fast_wrong(password: str, stored: str | None) -> bool:
        return False
    monkeypatch.setattr(passwords, "verify_async", fast_wrong)

    async def probe() -> tuple[int, bool, list]:
        pool = await asyncpg.create_pool(database, min_size=4, max_size=4)
        other = await asyncpg.connect(database)  # another process, in the middle of a login
        try:
            await pool.execute("DELETE FROM login_failures")
            address = unique_email()
            account = await _account(pool, address)
            async with other.transaction():
                await other.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                                    "codeplan:login:" + throttle.login_key(account, ""))
                logins = [asyncio.create_task(identity.log_in(pool, address, "wrong", f"10.7.{i}.1"))
                          for i in range(3)]
                await asyncio.sleep(0.5)
                waiting = await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND wait_event = 'advisory' AND datname = current_database()")
                try:
                    async with pool.acquire(timeout=5) as conn:  # a ledger statement, say
                        ledger_served = await conn.fetchval("SELECT 1") == 1
                except asyncio.TimeoutError:
                    ledger_served = False
                # held past the bound: the logins are refused for a moment, not kept waiting
                # (each waits its turn, then the bound: 2 s each)
                outcomes = await asyncio.wait_for(asyncio.gather(*logins, return_exceptions=True), 30)
            await pool.execute("DELETE FROM login_failures")
            return waiting, ledger_served, outcomes
        finally:
            await other.close()
            await pool.close()
    waiting, ledger_served, outcomes = run(probe())
    assert waiting == 1 and ledger_served, (waiting, ledger_served)
    assert all(isinstance(o, identity.Refusal) and o.code == "throttled" and o.retry_after == 1 for o in outcomes), outcomes


def test_parallel_guesses_over_http_are_refused_past_the_limit(web, database):
    clear_failures(database)
    _, address = signed_up(web)
    attacker = Browserish(web.url)
    attacker.get("/login")
    token, cookies = attacker.token, dict(attacker.client.cookies)

    def guess(i: int) -> int:
        with httpx.Client(base_url=web.url, cookies=cookies, headers={"accept": "text/html"}, timeout=60) as c:
            return c.post("/login", data={"email": address, "password": f"wrong guess {i:04d}",
                                          "_csrf_token": token}).status_code
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(guess, range(16)))
    clear_failures(database)
    assert sorted(statuses) == [400] * 5 + [429] * 11, statuses


def test_the_right_password_takes_back_the_attempts_count(database):
    async def probe() -> tuple[int, int]:
        pool = await _pool(database)
        try:
            await pool.execute("DELETE FROM login_failures")
            address = unique_email()
            await _account(pool, address)
            for n in range(throttle.PER_ACCOUNT - 1):
                with pytest.raises(identity.Refusal):
                    await identity.log_in(pool, address, f"wrong guess {n}", "10.8.0.1")
            before = await pool.fetchval("SELECT count(*) FROM login_failures")
            await identity.log_in(pool, address, PASSWORD, "10.8.0.1")
            return before, await pool.fetchval("SELECT count(*) FROM login_failures")
        finally:
            await pool.close()
    assert run(probe()) == (throttle.PER_ACCOUNT - 1, 0)


# ---- 3. a case variant of the address shares the account's failure budget -------------------

def test_unicode_case_variant_shares_the_accounts_failure_budget(web, database):
    folds = run(query(database, "SELECT lower('İ') AS l"))[0]
    if folds["l"] != "i":
        pytest.skip("this database's lower() does not fold İ to i: no divergence to exploit here")
    clear_failures(database)
    address = f"victim{uuid.uuid4().hex[:6]}@gmail.com"
    Browserish(web.url).sign_up(address)
    guesser = Browserish(web.url)
    for n in range(throttle.PER_ACCOUNT):
        guesser.get("/login")
        assert guesser.post("/login", {"email": address, "password": f"wrong guess {n:04d}"}).status_code == 400
    guesser.get("/login")
    assert guesser.post("/login", {"email": address, "password": PASSWORD}).status_code == 429  # locked
    variant = address.replace("i", "\u0130", 1)  # 'İ': PostgreSQL folds it to 'i', Python does not
    guesser.get("/login")
    page = guesser.post("/login", {"email": variant, "password": PASSWORD})
    clear_failures(database)
    assert page.status_code == 429, "a case variant of the address has a failure budget of its own"


# ---- 4. the per-client login limit counts an IPv6 /64 as one client -------------------------

def test_login_limit_per_client_counts_an_ipv6_64_as_one(database):
    async def probe() -> tuple[str, str, str]:
        pool = await _pool(database)
        try:
            await pool.execute("DELETE FROM login_failures")
            for n in range(throttle.PER_ADDRESS):
                with pytest.raises(identity.Refusal) as refused:
                    await identity.log_in(pool, unique_email(), f"spray password {n}", "2001:db8:1:2::1")
                assert refused.value.code == "bad_credentials"
            outcomes = []
            for address in ("2001:db8:1:2::2", "2001:db8:1:2:ffff:1:2:3", "2001:db8:1:3::1"):
                try:
                    await identity.log_in(pool, unique_email(), "spray password x", address)
                except identity.Refusal as refusal:
                    outcomes.append(refusal.code)
            await pool.execute("DELETE FROM login_failures")
            return tuple(outcomes)
        finally:
            await pool.close()
    # the same /64 twice (throttled), then the next /64 (a client of its own)
    assert run(probe()) == ("throttled", "throttled", "bad_credentials")


# ---- 5. /reset checks the token before it hashes the new password ---------------------------

def test_reset_hashes_no_password_for_a_made_up_or_used_token(database, monkeypatch):
    hashed = []
    real_hash = passwords.hash_async

    async def counting(password: str) -> str:
        hashed.append(password)
        return await real_hash(password)
    monkeypatch.setattr(passwords, "hash_async", counting)

    async def probe() -> tuple[list[str], int, int | None]:
        pool = await _pool(database)
        try:
            codes = []
            for n in range(20):
                with pytest.raises(identity.Refusal) as refused:
                    await identity.reset_password(pool, f"made-up-{n}", "long enough password")
                codes.append(refused.value.code)
            made_up = len(hashed)
            account_id = await _account(pool, unique_email())
            token = await identity.issue_link(pool, account_id, "reset")
            # two resets with one link at once: one sets the password, the other is refused
            results = await asyncio.gather(*(identity.reset_password(pool, token, f"new passphrase {n}")
                                             for n in range(2)), return_exceptions=True)
            assert sorted(str(r.id if isinstance(r, identity.Account) else r.code) for r in results) == sorted(
                [str(account_id), "bad_link"]), results
            with pytest.raises(identity.Refusal):
                await identity.reset_password(pool, token, "yet another passphrase")
            return codes, made_up, await pool.fetchval(
                "SELECT count(*) FROM mail_tokens WHERE account_id = $1 AND used_at IS NULL", account_id)
        finally:
            await pool.close()
    codes, made_up, unused = run(probe())
    assert set(codes) == {"bad_link"}
    assert made_up == 0, f"{made_up} made-up reset tokens each cost a password hash"
    assert len(hashed) <= 2 and unused == 0  # the real link: at most a hash per racing reset, none after


# ---- 6. mail has threads of its own, bounded -------------------------------------------------

class Tarpit:
    """An SMTP server that accepts connections and never says a word (overloaded, firewalled
    half-way): each mail waits for the client's timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:  # one accepted as it closed: ended like the others
                    conn.close()
                    return
                self.held.append(conn)

    def close(self) -> None:
        # shut down first: a close alone does not wake the thread blocked in accept(), which
        # went on accepting (and holding, to the mails' 20 s timeout) the mails queued behind
        with self.lock:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            for conn in self.held:
                conn.close()


def test_a_hanging_smtp_server_does_not_hold_the_default_executor():
    tarpit = Tarpit()
    letter = mail.Letter(to="someone@example.com", subject="s", body="b", link="http://x/reset?token=t")

    async def probe() -> tuple[bool, int]:
        mailer = mail.Mailer(f"smtp://127.0.0.1:{tarpit.port}", "noreply@example.com", timeout=20)
        # more mails than asyncio's default executor has threads (at most 32)
        sends = [asyncio.create_task(mailer.send(letter)) for _ in range(40)]
        await asyncio.sleep(0.5)
        refused = sum(1 for s in sends if s.done() and isinstance(s.exception(), mail.MailError))
        try:
            # the bridge counts tokens on this executor: it must not wait for the mail
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 10)
            free = True
        except asyncio.TimeoutError:
            free = False
        tarpit.close()  # the held conversations end now
        await asyncio.gather(*sends, return_exceptions=True)
        mailer.close()
        return free, refused
    try:
        free, refused = run(probe())
    finally:
        tarpit.close()
    assert free, "mail delivery holds asyncio's default executor, which the bridge's token counting uses"
    assert refused == 40 - mail.MAX_IN_FLIGHT, f"{refused} of 40 mails refused at once past the bound"


# ---- 7. /forgot: the same answer, at once, whoever asks --------------------------------------

def _forgot_page(web, address: str) -> str:
    client = Browserish(web.url)
    client.get("/forgot")
    client.client.timeout = httpx.Timeout(15)  # held mail would hold the answer past this
    page = client.post("/forgot", {"email": address})
    assert page.status_code == 200 and "If an account exists" in page.text
    return re.sub(r'value="[0-9a-f]{40,}"|' + re.escape(address), "", page.text)


def test_forgot_answers_before_the_mail_is_sent(mail_web, database):
    inbox = mail_web.inbox
    known = unique_email()
    run(query(database, "INSERT INTO accounts (email) VALUES ($1)", known))
    before = len(inbox.messages)
    inbox.hold()
    try:
        known_page = _forgot_page(mail_web, known)
        unknown_page = _forgot_page(mail_web, unique_email())
        assert len(inbox.messages) == before, "the mail went before the answer"
    finally:
        inbox.accept()
    assert known_page == unknown_page
    assert link_in(inbox.wait_for(known, subject="Reset", after=before)).startswith(mail_web.url + "/reset?token=")


def test_forgot_with_mail_down_answers_the_same_and_logs_no_link(mail_web, database):
    known = unique_email()
    run(query(database, "INSERT INTO accounts (email) VALUES ($1)", known))
    account_id = run(query(database, "SELECT id FROM accounts WHERE email = $1", known))[0]["id"]
    mail_web.inbox.mode = "refuse"
    try:
        known_page = _forgot_page(mail_web, known)
        unknown_page = _forgot_page(mail_web, unique_email())
        for _ in range(300):  # the mail fails after the answer: wait for its log line
            if "reset mail not sent" in mail_web.output():
                break
            threading.Event().wait(0.1)
    finally:
        mail_web.inbox.accept()
    assert known_page == unknown_page, "the page differs for an address that has an account"
    assert "could not be sent" not in known_page
    failures = [line for line in mail_web.output().splitlines() if "mail not sent" in line or "delivery failed" in line]
    assert any("reset mail not sent" in line and str(account_id) in line for line in failures), failures
    assert not [line for line in failures if "token" in line], failures


# ---- 8. one mailbox, one account --------------------------------------------------------------

@pytest.mark.parametrize("typed", ["x@ex.com,", "x@ex.com(2)", "a,b@ex.com", "x@ex.com <y@ex.com>",
                                   '"x y"@ex.com', "x@ex.com;", "x @ex.com", "x@ex .com", ".x@ex.com",
                                   "x..y@ex.com", "x@ex.com.", "x@[127.0.0.1]", "é@ex.com", "x@localhost",
                                   "a" * 65 + "@ex.com", "x@" + "d" * 250 + ".com"])
def test_only_a_single_plain_address_signs_up(typed):
    with pytest.raises(identity.Refusal) as refused:
        identity.normal_email(typed)
    assert refused.value.code == "bad_email"


@pytest.mark.parametrize("typed", ["x@ex.com", " O.Brien+tag@Mail.Example.co.uk ", "o'brien@ex.com",
                                   "a_b-c@sub-domain.ex.com", "x@xn--fsqu00a.xn--fiqs8s"])
def test_plain_addresses_still_sign_up(typed):
    assert identity.normal_email(typed) == typed.strip()


@pytest.mark.parametrize("address", ["josé@example.com", "user@bücher.de", "用户@例子.中国", "user@[192.0.2.1]"])
def test_a_real_address_refused_for_its_letters_is_told_what_is_taken(address):
    """Real mailboxes in other scripts are refused (one plain ASCII address only): the answer
    says what is taken, not that the address is not one."""
    with pytest.raises(identity.Refusal) as refused:
        identity.normal_email(address)
    assert "plain ASCII" in pages._REFUSALS[refused.value.code]


def test_one_mailbox_gets_one_account_over_http(web, database):
    mailbox = unique_email()
    statuses = [Browserish(web.url).sign_up(variant).status_code
                for variant in (mailbox, mailbox + ",", mailbox + "(2)", "a," + mailbox)]
    rows = run(query(database, "SELECT email FROM accounts WHERE email LIKE '%' || $1 || '%'", mailbox))
    assert statuses == [200, 400, 400, 400] and [r["email"] for r in rows] == [mailbox]


# ---- sound behaviour, kept ---------------------------------------------------------------------

def test_login_next_with_a_tab_stays_on_the_site(web, database):
    clear_failures(database)
    client, address = signed_up(web)
    client.post("/logout")
    client.get("/login?next=/%09/evil.example/phish")
    response = client.client.post("/login", data={"email": address, "password": PASSWORD,
                                                  "next": "/\t/evil.example/phish",
                                                  "_csrf_token": client.token}, follow_redirects=False)
    assert response.status_code == 303
    # a browser (WHATWG URL parser) and Python's urlsplit strip ASCII tab/newline from URLs
    resolved = urljoin(web.url + "/login", response.headers["location"])
    assert urlsplit(resolved).hostname == "127.0.0.1", resolved


def test_lang_switch_redirect_stays_on_the_site(web):
    # no session, no CSRF token: any page on the web can post this form
    response = httpx.post(web.url + "/lang", data={"lang": "en", "next": "/\t/evil.example/x"},
                          headers={"accept": "text/html"}, follow_redirects=False)
    assert response.status_code == 303
    resolved = urljoin(web.url + "/lang", response.headers["location"])
    assert urlsplit(resolved).hostname == "127.0.0.1", resolved


def test_odd_inputs_never_get_a_500(web, database):
    client, _ = signed_up(web)
    cookies, token = dict(client.client.cookies), client.token
    raw = httpx.Client(base_url=web.url, cookies=cookies, headers={"accept": "text/html"}, timeout=60)
    results = {}
    for path in ["/login?next=a&next=b", "/dashboard?notice=a&notice=b", "/verify?token=a&token=b",
                 "/reset?token=%C3%28", "/login?next=%ff", "/reset?token=a&token=b", "/keys?notice=%ff",
                 "/verify?token=%ff%fe", "/login?next=/%0d%0aSet-Cookie:%20x=y"]:
        results["GET " + path] = raw.get(path).status_code
    posts = [("/keys/0/revoke", {}), ("/lang", {"lang": "en", "next": "/\r\nset-cookie: x=y"}),
             ("/login", {"email": ["a@b.cd", "e@f.gh"], "password": "x" * 12}),
             ("/login", {"email": "İ" * 400, "password": "x" * 12}),
             ("/signup", {"email": "é" * 60 + "@x.yz", "password": "p" * 12}),
             ("/signup", {"email": "x@ex.com,", "password": "p" * 12}),
             ("/forgot", {"email": "é" * 300}), ("/reset", {"token": "t" * 500, "password": "p" * 12}),
             ("/verify", {"token": "t" * 500}), ("/verify", {"token": ["a", "b"]}), ("/verify", {})]
    for path, data in posts:
        response = raw.post(path, data={**data, "_csrf_token": token}, follow_redirects=False)
        results["POST " + path + " " + repr(data)[:40]] = response.status_code
    results["POST /login multipart email file"] = raw.post(
        "/login", data={"password": "x" * 12, "_csrf_token": token}, files={"email": ("e.txt", b"a@b.cd")}).status_code
    results["POST /login json"] = raw.post("/login", json={"email": "a@b.cd", "password": "x" * 12},
                                           headers={"x-csrftoken": token}).status_code
    clear_failures(database)
    assert not {k: v for k, v in results.items() if v >= 500}, results


def test_reset_ends_all_sessions_and_every_other_link(mail_web):
    inbox = mail_web.inbox
    first = Browserish(mail_web.url)
    address = unique_email()
    count = len(inbox.messages)
    first.sign_up(address)
    first.confirm(link_in(inbox.wait_for(address, after=count)))
    second = Browserish(mail_web.url)
    assert second.log_in(address).url.path == "/dashboard"
    sessions = [first.session, second.session]
    links = []
    for _ in range(2):
        count = len(inbox.messages)
        anon = Browserish(mail_web.url)
        anon.get("/forgot")
        anon.post("/forgot", {"email": "  " + address.upper() + " "})
        links.append(link_in(inbox.wait_for(address, subject="Reset", after=count)))
    resetter = Browserish(mail_web.url)
    form = resetter.get(links[1])
    token = re.search(r'name="token" value="([^"]+)"', form.text).group(1)
    assert resetter.post("/reset", {"token": token, "password": "a new passphrase 1"}).url.path == "/dashboard"
    for s in sessions:
        r = httpx.get(mail_web.url + "/dashboard", cookies={"codeplan_session": s}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), "a session survived the reset"
    for link in links:
        page = Browserish(mail_web.url).get(link)
        assert page.status_code == 400 and 'name="token"' not in page.text, "a reset link survived the reset"
    assert Browserish(mail_web.url).log_in(address, "a new passphrase 1").url.path == "/dashboard"
    assert Browserish(mail_web.url).log_in(address).status_code == 400  # the old password is gone


def test_live_key_cap_holds_under_concurrent_creation(web, database):
    client, address = signed_up(web)
    client.get("/keys")
    token, cookies = client.token, dict(client.client.cookies)

    def make(i: int) -> int:
        with httpx.Client(base_url=web.url, cookies=cookies, headers={"accept": "text/html"}, timeout=60) as c:
            return c.post("/keys", data={"name": f"k{i}", "_csrf_token": token}).status_code
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(make, range(80)))
    live = run(query(database, "SELECT count(*) AS n FROM api_keys k JOIN accounts a ON a.id = k.account_id"
                               " WHERE a.email = $1 AND k.revoked_at IS NULL", address))[0]["n"]
    assert set(statuses) <= {200, 409} and live <= 50, f"{live} live keys (cap 50)"
