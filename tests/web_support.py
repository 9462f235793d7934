"""Helpers for the web page's tests: a real SMTP server that keeps what it receives, and a page
client that carries cookies and CSRF tokens like a browser."""
from __future__ import annotations

import email
import email.policy
import re
import threading
import time
from email.message import EmailMessage

import httpx
from aiosmtpd.controller import Controller

from .conftest import free_port

CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]*)"')
LINK = re.compile(r"(https?://\S+/(?:verify|reset)\?token=[\w-]+)")
PASSWORD = "correct horse battery staple"


class Inbox:
    """aiosmtpd handler: every message delivered, parsed, kept in order."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self._arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's name
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._arrived:
            self.messages.append(message)  # type: ignore[arg-type]
            self._arrived.notify_all()
        return "250 Message accepted for delivery"

    def wait_for(self, to: str, subject: str = "", timeout: float = 30.0, after: int = 0) -> EmailMessage:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for message in self.messages[after:]:
                    if message["To"] == to and subject in str(message["Subject"]):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no mail to {to} with {subject!r} after {timeout}s")
                self._arrived.wait(left)

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


def link_in(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",)).get_content()
    found = LINK.search(body)
    assert found, body
    return found.group(1)


class SmtpServer:
    def __init__(self) -> None:
        self.inbox = Inbox()
        self.port = free_port()
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> "SmtpServer":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


class Browserish:
    """An httpx client that behaves like a browser on our forms: cookies kept, the CSRF token
    read from the last page and sent back with each form."""

    def __init__(self, base: str, lang: str = "en") -> None:
        self.client = httpx.Client(base_url=base, follow_redirects=True, timeout=60,
                                   headers={"accept": "text/html", "accept-language": lang})
        self.token = ""

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.client.get(path, **kwargs)
        found = CSRF_FIELD.search(response.text)
        if found and found.group(1):
            self.token = found.group(1)
        return response

    def post(self, path: str, data: dict | None = None, csrf: bool = True, **kwargs) -> httpx.Response:
        if csrf and not self.token:
            self.get("/login")
        form = {**(data or {}), **({"_csrf_token": self.token} if csrf else {})}
        response = self.client.post(path, data=form, **kwargs)
        found = CSRF_FIELD.search(response.text)
        if found and found.group(1):
            self.token = found.group(1)
        return response

    def sign_up(self, email_address: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/signup")
        return self.post("/signup", {"email": email_address, "password": password})

    def log_in(self, email_address: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/login")
        return self.post("/login", {"email": email_address, "password": password})

    def confirm(self, link: str) -> httpx.Response:
        """Open a mailed verify link and press its "Confirm my address" button (opening the link
        alone confirms nothing); a link confirmed already leads on by itself."""
        page = self.get(link)
        if 'action="/verify"' not in page.text:
            return page
        return self.post("/verify", {"token": httpx.URL(link).params["token"]})

    @property
    def session(self) -> str | None:
        return self.client.cookies.get("codeplan_session")

    def close(self) -> None:
        self.client.close()
