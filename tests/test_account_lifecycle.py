"""An account's life over months, on the real site (bridge subprocess, real PostgreSQL, a real
SMTP server that goes down and comes back): lockouts and resets, mail outages, mail scanners,
suspension, live sockets that outlive their session or key, and addresses typed on the CLI.
Each test is a defect found by living that life; its docstring says what was wrong."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import types
import uuid

import httpx
import pytest
from aiosmtpd.controller import Controller

from .conftest import CODEPLAN, ROOT, base_env, free_port, query, run, start_bridge
from .web_support import Browserish, Inbox, link_in

SECRET = re.compile(r"cp_[A-Za-z0-9_-]{30,}")
SUSPENDED = "This account is suspended by the operator"


def unique_email() -> str:
    return f"al{uuid.uuid4().hex[:10]}@example.com"


class Mailbox:
    """An SMTP server on a fixed port that can be taken down (connections refused) and brought back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.inbox = Inbox()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def down(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture(scope="module")
def mailbox():
    box = Mailbox()
    box.up()
    yield box
    box.down()


@pytest.fixture(scope="module")
def site(database, simulator, mailbox):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=mailbox.url,
                          CODEPLAN_AUTH_CACHE_TTL="0", CODEPLAN_SIGNUP_PLAN="lite",
                          CODEPLAN_MAIL_FROM="Codeplan <noreply@codeplan.test>", CODEPLAN_SIGNUP_LIMIT="1000")
    yield server
    server.stop()


def account(database: str, address: str):
    return run(query(database, "SELECT * FROM accounts WHERE lower(email) = lower($1)", address))[0]


def verified(site, mailbox, lang: str = "en") -> tuple[Browserish, str]:
    client = Browserish(site.url, lang)
    address = unique_email()
    count = len(mailbox.inbox.messages)
    assert client.sign_up(address).url.path == "/welcome"
    assert client.confirm(link_in(mailbox.inbox.wait_for(address, after=count))).url.path == "/setup"
    return client, address


def reset_link(client: Browserish, mailbox, address: str) -> str:
    count = len(mailbox.inbox.messages)
    client.get("/forgot")
    client.post("/forgot", {"email": address})
    return link_in(mailbox.inbox.wait_for(address, subject="Reset", after=count))


# ---- a lockout, then a password reset ----------------------------------------------------

def test_after_a_lockout_the_password_set_by_a_reset_link_logs_in(site, mailbox):
    """A user forgot the password, tried 5 times (locked for 15 minutes), set a new one with the
    mailed link on the phone, then logged in on the laptop with it: refused, "Too many failed
    attempts", for 15 minutes. The reset only verified the address and ended the sessions; the
    account's failed logins stayed. A reset now forgets them, in its transaction."""
    _, address = verified(site, mailbox)
    laptop = Browserish(site.url)
    for attempt in range(5):
        assert laptop.log_in(address, f"was it this one {attempt}").status_code == 400
    assert laptop.log_in(address).status_code == 429  # locked: even the right password
    phone = Browserish(site.url)
    link = reset_link(phone, mailbox, address)
    phone.get(link)
    done = phone.post("/reset", {"token": httpx.URL(link).params["token"], "password": "my brand new password"})
    assert done.url.path == "/dashboard"
    page = laptop.log_in(address, "my brand new password")
    assert page.url.path == "/dashboard", (page.status_code, "Too many" in page.text)


# ---- a mail outage -------------------------------------------------------------------------

def test_links_whose_mail_failed_do_not_spend_the_hours_mails(site, mailbox, database):
    """During an SMTP outage the page said "The mail could not be sent. Try again in a few
    minutes."; the user did, a few times. Each try kept its (unsent) link, counted against the
    5 links per hour: once SMTP was back, "Send the link again" answered "Too many mails" for an
    hour, and /forgot silently sent nothing. A link whose mail was not sent is now taken back."""
    client = Browserish(site.url)
    address = unique_email()
    mailbox.down()
    try:
        page = client.sign_up(address)
        assert page.url.path == "/welcome" and page.url.params.get("notice") == "mail_failed"
        for _ in range(5):
            assert client.post("/verify/resend").url.params.get("notice") == "mail_failed"
        stranger = Browserish(site.url)
        for attempt in range(1, 7):  # the reset mails go after /forgot's answer, and fail
            before = site.output().count("reset mail not sent")
            stranger.get("/forgot")
            stranger.post("/forgot", {"email": address})
            deadline = time.monotonic() + 10
            while site.output().count("reset mail not sent") == before:
                assert time.monotonic() < deadline, f"reset {attempt} during the outage: not even tried"
                time.sleep(0.05)
    finally:
        mailbox.up()
    assert mailbox.inbox.to(address) == []
    tokens = run(query(database, "SELECT count(*) AS n FROM mail_tokens WHERE account_id = $1",
                       account(database, address)["id"]))[0]["n"]
    assert tokens == 0, f"{tokens} links kept though none was mailed"
    # SMTP is back: a link can be sent at once, verify and reset alike
    count = len(mailbox.inbox.messages)
    page = client.post("/verify/resend")
    assert page.url.params.get("notice") == "mail_sent", page.url
    assert client.confirm(link_in(mailbox.inbox.wait_for(address, after=count))).url.path == "/setup"
    assert reset_link(Browserish(site.url), mailbox, address).startswith(site.url + "/reset?token=")


async def test_a_refused_mail_takes_its_link_back(database):
    """The same for the mailer's own refusal (16 mails in flight, MailError at once): in-process,
    with a mailer that always refuses and the real token table."""
    import asyncpg

    from service.web import identity, pages
    from service.web.mail import MailError

    class Refusing:
        enabled = True

        async def send(self, letter) -> None:
            raise MailError

    address = unique_email()
    account_id = (await query(database, "INSERT INTO accounts (email) VALUES ($1) RETURNING id", address))[0]["id"]
    web = types.SimpleNamespace(mailer=Refusing(), config=types.SimpleNamespace(base_url="http://h"))
    who = identity.Account(id=account_id, email=address, verified=False)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        for purpose in ("verify", "reset"):
            for _ in range(identity.MAILS_PER_HOUR + 2):
                assert await pages._send_link(pool, web, "en", who, purpose) == "mail_failed"
        assert await pool.fetchval("SELECT count(*) FROM mail_tokens WHERE account_id = $1", account_id) == 0
        assert await identity.issue_link(pool, account_id, "verify") is not None
    finally:
        await pool.close()


# ---- a mail scanner ------------------------------------------------------------------------

def test_a_mail_scanner_opening_the_verify_link_confirms_nothing(site, mailbox, database):
    """A squatter signed up with victim@corp; the corp's link scanner fetched every link in the
    mail, and that plain GET confirmed the address: the squatter's session then made keys on an
    account carrying the victim's address. Opening the link now shows a "Confirm my address"
    button (a POST with the CSRF token): only pressing it confirms."""
    victim = unique_email()
    squatter = Browserish(site.url)
    count = len(mailbox.inbox.messages)
    assert squatter.sign_up(victim).url.path == "/welcome"
    link = link_in(mailbox.inbox.wait_for(victim, after=count))
    token = httpx.URL(link).params["token"]
    scanner = {"user-agent": "SafeLinks-Scanner/1.0"}  # no cookie, no form: it fetches what links say
    httpx.head(link, headers=scanner)
    opened = httpx.get(link, headers=scanner, follow_redirects=True)
    assert account(database, victim)["email_verified_at"] is None, "a scanner's GET confirmed the address"
    assert opened.status_code == 200 and "Confirm my address" in opened.text and victim in opened.text
    squatter.get("/dashboard")
    assert squatter.post("/keys", {"name": "mine"}).url.path == "/welcome"
    assert not SECRET.search(squatter.get("/keys").text)
    # a cross-site form (no CSRF token) confirms nothing either
    forged = httpx.post(site.url + "/verify", data={"token": token}, follow_redirects=False)
    assert forged.status_code == 403
    assert account(database, victim)["email_verified_at"] is None
    # the mailbox's owner presses the button: confirmed, and the link's page says so afterwards
    owner = Browserish(site.url)
    pressed = owner.confirm(link)
    assert pressed.url.path == "/login" and "Your address is confirmed." in pressed.text
    assert account(database, victim)["email_verified_at"] is not None
    again = Browserish(site.url).get(link)
    assert again.url.path == "/login" and "not valid" not in again.text


def test_the_verify_page_in_chinese(site, mailbox):
    client = Browserish(site.url, "zh-CN,zh;q=0.9")
    address = unique_email()
    count = len(mailbox.inbox.messages)
    client.sign_up(address)
    page = client.get(link_in(mailbox.inbox.wait_for(address, after=count)))
    assert page.status_code == 200 and "确认我的邮箱" in page.text and "Confirm" not in page.text


# ---- a suspended account ----------------------------------------------------------------------

def test_a_suspended_account_is_told_so_on_every_page(site, mailbox, database):
    """An operator suspended the account: its tools got 403 account_suspended, and its
    Dashboard, Setup and Keys said nothing about it. Every signed-in page now says so."""
    import openai

    client, address = verified(site, mailbox)
    client.get("/keys")
    secret = SECRET.search(client.post("/keys", {"name": "ide"}).text).group(0)
    paths = ("/dashboard", "/setup", "/keys", "/billing")
    assert not any(SUSPENDED in client.get(path).text for path in paths)
    run(query(database, "UPDATE accounts SET suspended_at = now() WHERE lower(email) = lower($1)", address))
    try:
        sdk = openai.OpenAI(base_url=site.url + "/v1", api_key=secret, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        told = {path: SUSPENDED in client.get(path).text for path in paths}
        assert all(told.values()), told
        zh = Browserish(site.url, "zh-CN")
        zh.log_in(address)
        assert "此账户已被管理员停用" in zh.get("/dashboard").text
    finally:
        run(query(database, "UPDATE accounts SET suspended_at = NULL WHERE lower(email) = lower($1)", address))
    assert SUSPENDED not in client.get("/dashboard").text


# ---- live sockets after their session or key ended ----------------------------------------------

class _FakeSocket:
    """Just what `sockets._pump` uses of a Litestar WebSocket."""

    def __init__(self, pool, hub) -> None:
        self.app = types.SimpleNamespace(state=types.SimpleNamespace(pool=pool, usage_hub=hub))
        self.sent: list[dict] = []
        self.closed: int | None = None
        self._gone = asyncio.Event()

    async def receive_data(self, mode: str = "text") -> str:
        from litestar.exceptions import WebSocketDisconnect

        await self._gone.wait()
        raise WebSocketDisconnect(detail="gone")

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = code
        self._gone.set()


@pytest.mark.parametrize("ended_by", ["logout", "revocation"])
async def test_an_idle_live_socket_closes_once_its_session_or_key_ended(database, monkeypatch, ended_by):
    """README: the dashboard's socket closes with session_ended (4401) once its session ended,
    a key's with key_revoked. They were checked only when new figures arrived: an idle socket
    (nobody coding) stayed open, serving the account's usage, for as long as nothing was spent.
    Now they are checked every sockets.ALIVE_EVERY seconds too (15 s; 0.2 s here). In-process,
    with the routes' own checks (session_check, key_check), the real database, no usage at all."""
    import asyncpg

    from service.web import apikeys, live, sessions, sockets

    monkeypatch.setattr(sockets, "ALIVE_EVERY", 0.2)
    account_id = (await query(database, "INSERT INTO accounts (email) VALUES ($1) RETURNING id",
                              unique_email()))[0]["id"]
    subscription = (await query(database, "INSERT INTO subscriptions (account_id, plan_id, status)"
                                          " VALUES ($1, 'lite', 'active') RETURNING id", account_id))[0]["id"]
    pool = await asyncpg.create_pool(database, min_size=1, max_size=3)
    hub = live.UsageHub(pool, database)  # not started: only its fan-out is used
    socket = _FakeSocket(pool, hub)
    try:
        if ended_by == "logout":
            token = await sessions.create(pool, account_id, None)
            check = sockets.session_check(pool, token)
        else:
            key_id = (await apikeys.create(pool, account_id, "ide")).id
            check = sockets.key_check(pool, key_id)
        pump = asyncio.create_task(sockets._pump(socket, account_id, subscription, check))
        deadline = asyncio.get_running_loop().time() + 10
        while not socket.sent and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert [m["type"] for m in socket.sent] == ["usage"]
        await asyncio.sleep(0.5)  # checked, still alive: open, nothing more sent
        assert not pump.done() and socket.closed is None
        if ended_by == "logout":
            viewer = await sessions.lookup(pool, token)
            await sessions.end(pool, viewer)
        else:
            assert await apikeys.revoke(pool, account_id, key_id)
        await asyncio.wait_for(pump, 3)  # no usage arrives: the periodic check closes it
    finally:
        if not socket._gone.is_set():
            socket._gone.set()
        await pool.close()
    expected = "session_ended" if ended_by == "logout" else "key_revoked"
    assert [m.get("code") for m in socket.sent[1:]] == [expected], socket.sent
    assert socket.closed == 4401
    assert hub.watching == 0


# ---- addresses typed on the CLI ---------------------------------------------------------------

def _cli(database: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CODEPLAN + list(args), env=base_env(CODEPLAN_DATABASE_URL=database), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_an_address_pasted_with_spaces_on_the_cli_is_the_address(site, mailbox, database):
    """`codeplan users create --email "bob@x.com "` (pasted with its space) stored the space: its
    owner's "Forgot your password?" found no account, and the web's sign-up made a second account
    for the same mailbox. The CLI now takes an address as the sign-up does: trimmed."""
    address = unique_email()
    made = _cli(database, "users", "create", "--email", f" {address} ", "--plan", "pro")
    assert made.returncode == 0, made.stderr
    rows = run(query(database, "SELECT email FROM accounts WHERE email LIKE $1", f"%{address}%"))
    assert [r["email"] for r in rows] == [address]
    link = reset_link(Browserish(site.url), mailbox, address)  # its owner gets the reset mail
    assert link.startswith(site.url + "/reset?token=")
    second = Browserish(site.url).sign_up(address)
    assert second.status_code == 400 and "exists already" in second.text
    added = _cli(database, "keys", "create", "--email", address + " ")
    assert added.returncode == 0 and SECRET.search(added.stdout), added.stderr


@pytest.mark.parametrize("typed", ["jörg{}@example.com", "{}@example.com,", "two {}@example.com", "{}"])
def test_the_cli_refuses_an_address_no_mail_could_reach(database, typed):
    """`codeplan users create` stored any text with an @ (a non-ASCII address the mailer cannot
    send to, "x@ex.com," that the mail library reads as another): an account its owner could
    never reach. Refused now, in one line, as the sign-up refuses it, and nothing is made."""
    address = typed.format(uuid.uuid4().hex[:8])
    made = _cli(database, "users", "create", "--email", address, "--plan", "pro")
    lines = made.stderr.strip().splitlines()
    assert made.returncode == 1 and len(lines) == 1, made.stderr
    assert "is not one plain ASCII email address" in lines[0] and "Traceback" not in made.stderr
    rows = run(query(database, "SELECT email FROM accounts WHERE email = $1", address.strip()))
    assert rows == []


async def test_a_mail_the_server_took_is_sent_though_its_goodbye_failed():
    """A link is taken back when its mail fails (above): a server that took the mail (250 after
    DATA) and then answered QUIT with an error must not count as a failure, or the link the
    owner is about to receive would be dead. A real socket and smtplib, a server that says 421
    to QUIT."""
    import socketserver
    import threading

    from service.web.mail import Letter, Mailer

    class Session(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 ready\r\n")
            in_data = False
            for raw in self.rfile:
                line = raw.rstrip(b"\r\n")
                if in_data:
                    if line == b".":
                        in_data = False
                        self.wfile.write(b"250 accepted\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.wfile.write(b"250 hello\r\n")
                elif verb == b"DATA":
                    in_data = True
                    self.wfile.write(b"354 go on\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"421 closing badly\r\n")
                    return
                else:
                    self.wfile.write(b"250 ok\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Session)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mailer = Mailer(f"smtp://127.0.0.1:{server.server_address[1]}", "Codeplan <noreply@codeplan.test>", timeout=5)
    try:
        await mailer.send(Letter(to="someone@example.com", subject="s", body="b", link="http://h/verify?token=x"))
    finally:
        mailer.close()
        server.shutdown()
        server.server_close()
