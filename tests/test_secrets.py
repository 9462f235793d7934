"""Secrets in configured URLs never reach a log, an error line or an unauthenticated page.

Each test plants a recognisable canary (LEAKCANARY...) as a password and looks for it where it
used to show: a start-up traceback (asyncpg's and urllib's URL parsers quote the piece they
could not read, which for an unescaped # / ? @ in a password is the password), the upstream
profile's name (shown on /metrics and /readyz) and configuration error lines. The end-of-run
log scan (tests/log_scan.py) is tested for URL passwords here too.
"""
from __future__ import annotations

import argparse
import subprocess

import pytest

from bridge import upstreams
from service import commands
from service import config as config_module
from service.web import mail

from .conftest import CODEPLAN, ROOT, base_env, free_port
from .log_scan import scan, secrets_in_env, url_password

DB_PASSWORDS = [
    ("LEAKCANARYdbpw#rest", "LEAKCANARYdbpw"),   # '#': urllib reads the rest as a fragment
    ("LEAKCANARYdbpw/rest", "LEAKCANARYdbpw"),   # '/': the rest is the path, the password a "port"
    ("first?LEAKCANARYdbpw", "LEAKCANARYdbpw"),  # '?': the rest is a query
    ("p@ss:LEAKCANARYdbpw", "LEAKCANARYdbpw"),   # an unescaped '@' then ':': asyncpg splits at the first '@'
]


def _start_up(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(CODEPLAN + ["run"], env=base_env(CODEPLAN_PORT=str(free_port()), **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=90)


# ---- 1. CODEPLAN_DATABASE_URL ------------------------------------------------------------------

@pytest.mark.parametrize("password, canary", DB_PASSWORDS)
def test_database_url_password_never_printed_at_start_up(password, canary):
    result = _start_up({"CODEPLAN_DATABASE_URL": f"postgresql://codeplan:{password}@127.0.0.1:5432/codeplan"})
    assert canary not in result.stdout + result.stderr, result.stderr[-2000:]
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("codeplan: configuration error: CODEPLAN_DATABASE_URL: ") and "percent-encode" in line


@pytest.mark.parametrize("url", [
    "postgresql://postgres:@/codeplan?host=/tmp/codeplan-test-pg-x&port=5432",  # the tests' own form
    "postgres://postgres@/codeplan?host=/var/run/postgresql",
    "postgresql:///codeplan?host=/tmp/pg",
    "postgresql://codeplan:p%40ss%2Fw%3Frd%23@db.internal:5432/codeplan",       # encoded: fine
    "postgresql://codeplan:secret@db-1:5432,db-2:5433/codeplan?target_session_attrs=read-write",
    "postgresql://codeplan@[::1]:5432/codeplan",
    # an @ in a query parameter (Cloud SQL's IAM users), not a password's
    "postgresql:///codeplan?host=/cloudsql/proj:europe-west1:db&user=codeplan-sa@proj.iam",
    "postgresql://db.internal:5432/codeplan?user=admin@corp.example&sslmode=require",
])
def test_database_urls_asyncpg_reads_are_accepted(url):
    assert config_module.load({"CODEPLAN_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize("url, user, password", [
    # the mailer (urllib) splits the user part at the last @: an address as the user name
    # (Mailgun's postmaster@domain, Gmail, Office 365), a raw @ in the password
    ("smtp://postmaster@mg.example.com:s3cretpass@smtp.mailgun.org:587", "postmaster@mg.example.com", "s3cretpass"),
    ("smtps://me@example.com:app-password@smtp.gmail.com:465", "me@example.com", "app-password"),
    ("smtp://mailer:p@ssword@smtp.example.com:587", "mailer", "p@ssword"),
])
def test_smtp_urls_the_mailer_reads_are_accepted(url, user, password):
    config = config_module.load({"CODEPLAN_SMTP_URL": url, "CODEPLAN_PUBLIC_URL": "https://codeplan.example"})
    target = mail.parse_smtp_url(config.smtp_url)
    assert (target.username, target.password, target.host.startswith("smtp.")) == (user, password, True)


def test_the_test_databases_url_is_accepted(database):
    # the unix-socket URL tests/conftest.py's fixtures hand every server
    assert config_module.load({"CODEPLAN_DATABASE_URL": database}).database_url == database


def test_a_dsn_asyncpg_cannot_read_is_one_line_without_the_value(monkeypatch, capsys):
    # config.load refuses these; a URL that gets past it anyway (monkeypatched here) still
    # fails in one line naming the variable and the exception's type only
    bad = config_module.Config(database_url="postgresql://codeplan:LEAKCANARYdsn/rest@127.0.0.1:5432/codeplan",
                               db_dead_after=5)
    monkeypatch.setattr(config_module, "load", lambda environ=None: bad)
    # (in this process, the command's logging set-up would leave the root logger writing to this
    # test's captured stderr, closed once it ends, for every later test's threads)
    monkeypatch.setattr(commands.logs, "setup", lambda level: None)
    assert commands.run(argparse.Namespace(command="migrate")) == 2
    err = capsys.readouterr().err
    assert "LEAKCANARYdsn" not in err
    [line] = err.strip().splitlines()
    assert line == ("codeplan: configuration error: CODEPLAN_DATABASE_URL: asyncpg cannot read it (ValueError; "
                    "value not shown): check its host, port and query parameters, and percent-encode any of "
                    "# / ? @ : in the user name or password")


# ---- 2. CODEPLAN_SMTP_URL ----------------------------------------------------------------------

@pytest.mark.parametrize("password", ["LEAKCANARYsmtp#x", "LEAKCANARYsmtp/x", "x?LEAKCANARYsmtp"])
def test_smtp_url_password_never_printed_at_start_up(database, password):
    result = _start_up({"CODEPLAN_DATABASE_URL": database, "CODEPLAN_PUBLIC_URL": "http://127.0.0.1:1",
                        "CODEPLAN_SMTP_URL": f"smtp://mailer:{password}@127.0.0.1:2525"})
    assert "LEAKCANARYsmtp" not in result.stdout + result.stderr, result.stderr[-2000:]
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("codeplan: configuration error: CODEPLAN_SMTP_URL: ") and "percent-encode" in line


def test_smtp_url_parse_never_quotes_the_url():
    with pytest.raises(ValueError) as caught:
        mail.parse_smtp_url("smtp://mailer:LEAKCANARYparse#x@127.0.0.1:2525")
    assert "LEAKCANARYparse" not in str(caught.value) and "CODEPLAN_SMTP_URL" in str(caught.value)
    target = mail.parse_smtp_url("smtps://mailer:p%40ss%23word@mail.example:2465")
    assert (target.host, target.port, target.implicit_tls, target.password) == ("mail.example", 2465, True, "p@ss#word")


# ---- 3. CODEPLAN_UPSTREAM_URL and admin upstream profiles ---------------------------------------

@pytest.mark.parametrize("url", [
    "http://op:LEAKCANARYurlpw@127.0.0.1:8000/api/coding/paas/v4",   # usable as it was: now refused
    "http://op:LEAKCANARY/urlpw@gpu.internal/v1",                   # a '/' in it: urllib's "port"
    "htps://op:LEAKCANARYurlpw@gpu.internal/v1",                    # the wrong-scheme line quoted it
])
def test_upstream_url_with_credentials_is_refused_without_echo(url):
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load({"CODEPLAN_UPSTREAM_URL": url, "CODEPLAN_UPSTREAM_KEYS": "k"})
    message = str(caught.value)
    assert message.startswith("CODEPLAN_UPSTREAM_URL: ") and "LEAKCANARY" not in message
    assert "\n" not in message


def test_no_url_config_line_echoes_userinfo():
    for variable in ("CODEPLAN_PUBLIC_URL", "CODEPLAN_STRIPE_API_BASE"):
        with pytest.raises(config_module.ConfigError) as caught:
            config_module.load({variable: "ftp://op:LEAKCANARYpub@example.com/"})
        assert str(caught.value).startswith(variable) and "LEAKCANARYpub" not in str(caught.value)


@pytest.mark.parametrize("base_url", [
    "http://op:LEAKCANARYadmin@gpu.internal:8000/v1",
    "http://op:LEAKCANARY/admin@gpu.internal:8000/v1",
    "ftp://op:LEAKCANARYadmin@gpu.internal/v1",
])
def test_admin_upstream_profile_with_credentials_is_refused_without_echo(base_url):
    # the admin API's POST /admin/upstreams answers this ValueError's text as its 400
    profile = upstreams.ProfileConfig(name="gpu", base_url=base_url, keys=("k",))
    with pytest.raises(ValueError) as caught:
        upstreams.resolve(profile, environ={})
    assert "LEAKCANARY" not in str(caught.value) and "'gpu'" in str(caught.value)


def test_the_single_upstreams_profile_is_never_named_after_credentials():
    profile = upstreams.legacy_profile("http://op:LEAKCANARYname@gpu.internal:8000/v1", ("k",),
                                       concurrency=0, stream_usage="auto")
    assert "LEAKCANARY" not in profile.name
    plain = upstreams.legacy_profile("http://gpu.internal:8000/v1", ("k",), concurrency=0, stream_usage="auto")
    assert plain.name == "gpu.internal:8000"


# ---- 4. the end-of-run log scan -------------------------------------------------------------------

def test_log_scan_finds_url_passwords(tmp_path):
    env = {"CODEPLAN_DATABASE_URL": "postgresql://codeplan:first?LEAKCANARYscan@127.0.0.1:5432/codeplan",
           "CODEPLAN_SMTP_URL": "smtp://mailer:LEAKCANARY%23smtp@127.0.0.1:2525"}
    path = tmp_path / "run-planted.log"
    path.write_text("\n".join([
        '{"msg": "connecting", "dsn": "postgres://app:hunter2hunter2@db.internal/app"}',   # by its shape
        "ValueError: invalid literal for int() with base 10: 'LEAKCANARYscan@127.0.0.1'",   # by its value
        '{"msg": "smtp login", "password": "LEAKCANARY#smtp"}',                             # decoded value
    ]) + "\n")
    found = {(f.line, f.kind) for f in scan([path], secrets_in_env(env))}
    assert (1, "URL password") in found
    assert (2, "CODEPLAN_DATABASE_URL password value") in found
    assert (3, "CODEPLAN_SMTP_URL password value") in found


def test_log_scan_takes_no_password_for_one():
    clean = ['{"database": "postgresql://postgres:@/t_0123?host=/tmp/codeplan-test-pg-x&port=5432"}',
             '{"url": "postgresql://postgres@127.0.0.1:5432/codeplan", "next": "http://127.0.0.1:8080/v1"}']
    assert url_password("postgresql://postgres:@/x?host=/tmp") == ""
    assert secrets_in_env({"CODEPLAN_DATABASE_URL": "postgresql://postgres:@/x?host=/tmp"}) == {}
    from .log_scan import SHAPES
    assert not any(pattern.search(line.encode()) for line in clean for _, pattern in SHAPES)
