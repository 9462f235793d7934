"""Mail for address verification, password resets, a new address and its notices, over SMTP
(`CODEPLAN_SMTP_URL`).

Without SMTP nothing is sent: the link goes to the JSON log for the operator, and the page
tells the user so. The standard library's smtplib runs in a thread: a mail is a handful of
round trips, rare enough that an async SMTP client would add a dependency for nothing.

Those threads are the mailer's own, few, with a bounded queue: a slow or hanging SMTP server
(each mail waits up to its timeout) then delays only mail, never asyncio's default executor,
which the bridge's token counting uses (bridge/metering.py), and a flood of mail fails fast
instead of piling up.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import unquote, urlsplit

import msgspec

log = logging.getLogger("codeplan.mail")


class MailError(Exception):
    """The mail could not be handed to the SMTP server (the detail is in the log)."""


class Letter(msgspec.Struct, frozen=True):
    to: str
    subject: str
    body: str
    link: str  # the one action the mail carries, also what the log shows without SMTP; "" for a notice


class SmtpTarget(msgspec.Struct, frozen=True):
    host: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str | None


def parse_smtp_url(url: str) -> SmtpTarget:
    """config.load has refused the URLs urllib cannot read; should one come here anyway,
    urllib's own error quotes the "port", which for a password holding # / ? is the password:
    it is replaced by one without the value."""
    try:
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        return SmtpTarget(host=parts.hostname or "localhost", port=parts.port or (465 if implicit else 25),
                          implicit_tls=implicit,
                          username=unquote(parts.username) if parts.username else None,
                          password=unquote(parts.password) if parts.password else None)
    except ValueError:
        raise ValueError("CODEPLAN_SMTP_URL: not a URL urllib can read (value not shown); "
                         "percent-encode any of # / ? @ : in the password") from None


MAIL_THREADS = 4    # SMTP conversations at once (each mostly waits on the network)
MAX_IN_FLIGHT = 16  # mails delivering or queued; one more is refused at once (MailError)


class Mailer:
    def __init__(self, smtp_url: str, sender: str, timeout: float = 15.0, threads: int = MAIL_THREADS,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._target = parse_smtp_url(smtp_url) if smtp_url else None
        self._sender = sender
        self._timeout = timeout
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="codeplan-mail")
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    @property
    def enabled(self) -> bool:
        return self._target is not None

    async def send(self, letter: Letter) -> None:
        if self._target is None:
            if letter.link:
                log.warning("mail not sent: CODEPLAN_SMTP_URL is not set; the link is here",
                            extra={"to": letter.to, "subject": letter.subject, "link": letter.link})
            else:  # a notice (an address being changed, an account closed): nothing to act on
                log.info("mail not sent: CODEPLAN_SMTP_URL is not set", extra={"to": letter.to,
                                                                                "subject": letter.subject})
            return
        if self._in_flight >= self._max_in_flight:
            # the server is not keeping up: waiting longer would only hold the sender's request
            log.error("mail not sent: too many mails wait for the SMTP server", extra={"to": letter.to})
            raise MailError
        self._in_flight += 1
        try:
            await asyncio.get_running_loop().run_in_executor(self._threads, self._deliver, self._target, letter)
        except (OSError, smtplib.SMTPException) as exc:
            # the exception's text may quote the server's reply, never our password: still,
            # only its type is logged
            log.error("mail delivery failed", extra={"to": letter.to, "error": type(exc).__name__})
            raise MailError from None
        finally:
            self._in_flight -= 1
        log.info("mail sent", extra={"to": letter.to, "subject": letter.subject})

    def close(self) -> None:
        """Stop taking mail; a delivery under way ends at its own timeout."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _deliver(self, target: SmtpTarget, letter: Letter) -> None:
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = letter.to
        message["Subject"] = letter.subject
        message["Message-ID"] = make_msgid(domain="codeplan")
        message.set_content(letter.body)
        context = ssl.create_default_context()
        if target.implicit_tls:
            client: smtplib.SMTP = smtplib.SMTP_SSL(target.host, target.port, timeout=self._timeout,
                                                    context=context)
        else:
            client = smtplib.SMTP(target.host, target.port, timeout=self._timeout)
        sent = False
        try:
            with client:
                client.ehlo()
                if not target.implicit_tls and client.has_extn("starttls"):
                    client.starttls(context=context)
                    client.ehlo()
                if target.username:
                    client.login(target.username, target.password or "")
                client.send_message(message)
                sent = True
        except (OSError, smtplib.SMTPException):
            # the server took the mail and only the goodbye failed: it was sent (a MailError
            # takes its link back, pages._send_link)
            if not sent:
                raise
