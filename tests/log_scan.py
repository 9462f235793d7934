"""The scan of every server log a test run produced for secrets (tests/conftest.py runs it when
the session finishes, and fails the run on a finding).

Two kinds of evidence. Shapes: what our own secrets look like (API keys, Stripe secrets, scrypt
password hashes, SHA-256 key or session hashes as hex or bytea, the 43-character session and
reset tokens). Values: every secret the tests handed a server in its environment (the admin
token, upstream keys, Stripe's keys, the web secret key) and the tests' fixed passwords, in
the clear; the logs must never echo them back."""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

SHAPES: list[tuple[str, re.Pattern[bytes]]] = [
    ("API key", re.compile(rb"cp_[A-Za-z0-9_-]{30,}")),
    ("Stripe secret key", re.compile(rb"\b[sr]k_(?:test|live)_[A-Za-z0-9_]{8,}")),
    ("Stripe webhook secret", re.compile(rb"\bwhsec_[A-Za-z0-9_]{8,}")),
    ("password hash", re.compile(rb"scrypt\$\d+\$\d+\$\d+\$")),
    # scheme://user:password@: a non-empty password (the tests' own postgresql://postgres:@/...
    # has none, and no user or password holds a space, quote or slash unencoded)
    ("URL password", re.compile(rb"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"'<>]*:[^\s/@\"'<>]+@")),
    ("key or session hash (bytea)", re.compile(rb"\\\\?x[0-9a-fA-F]{64}\b")),
    ("key or session hash (hex)", re.compile(rb"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")),
    # secrets.token_urlsafe(32): a session cookie or a password-reset token
    ("session or reset token", re.compile(
        rb"(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_-]*[a-z])(?=[A-Za-z0-9_-]*[A-Z])(?=[A-Za-z0-9_-]*[0-9])"
        rb"[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")),
]

# The one place a token is logged on purpose: without CODEPLAN_SMTP_URL the verification or
# reset link goes to the operator's log instead of a mail (service/web/mail.py, documented in
# .env.example and SECURITY.md). Only that line, only that kind.
ALLOWED: list[tuple[str, re.Pattern[bytes]]] = [
    ("session or reset token", re.compile(rb'"logger":"codeplan\.mail","msg":"mail not sent: CODEPLAN_SMTP_URL is not set')),
]

# environment variables whose values are secrets (a URL's password is found by its shape below,
# and by its value: its shape is gone once a message quotes only the part after a # / ?)
SECRET_ENV = ("CODEPLAN_ADMIN_TOKEN", "CODEPLAN_UPSTREAM_KEYS", "CODEPLAN_SECRET_KEY",
              "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_WEBHOOK_SECRETS")
URL_ENV = ("CODEPLAN_DATABASE_URL", "CODEPLAN_SMTP_URL", "CODEPLAN_UPSTREAM_URL")


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}"


def secrets_in_env(env: dict[str, str]) -> dict[str, str]:
    """The secret values of a server's environment, each with what it is."""
    found: dict[str, str] = {}
    for name in SECRET_ENV:
        for value in env.get(name, "").split(","):
            if len(value.strip()) >= 6:
                found[value.strip()] = name
    for name in URL_ENV:
        password = url_password(env.get(name, ""))
        # the parsers' errors quote a piece of an unescaped password (the "port" before a / or #,
        # the "query" after a ?): each piece is looked for too
        for value in {password, urllib.parse.unquote(password), *re.split(r"[#/?@:]", password)}:
            if len(value) >= 6:  # shorter ones would match innocent text
                found[value] = f"{name} password"
    return found


def url_password(url: str) -> str:
    """The password of scheme://user:password@host..., as written (percent-encoded), or "".

    Read the way the leaks happen: up to the last `@` of the URL, so a password holding an
    unescaped # / ? @ (which urllib would read as fragment, path, query) is still all found."""
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    if not sep or not at:
        return ""
    return userinfo.partition(":")[2]


def scan(paths: list[Path], known: dict[str, str]) -> list[Finding]:
    """Every line of `paths` that holds a secret: by its shape, or one of the `known` values
    (value -> what it is)."""
    literals = [(value.encode(), f"{what} value") for value, what in known.items()]
    findings: list[Finding] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for number, line in enumerate(data.splitlines(), 1):
            for kind, pattern in SHAPES:
                if pattern.search(line) and not any(k == kind and a.search(line) for k, a in ALLOWED):
                    findings.append(Finding(path, number, kind))
            for value, kind in literals:
                if value in line:
                    findings.append(Finding(path, number, kind))
    return findings
