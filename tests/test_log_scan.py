"""The end-of-run log scan (tests/log_scan.py, run by conftest's pytest_sessionfinish) finds each
kind of secret it claims to, and passes the lines our servers really write."""
from __future__ import annotations

import hashlib
import secrets

from service import keys
from service.web import passwords

from .log_scan import scan, secrets_in_env


def _lines(tmp_path, *lines: str):
    path = tmp_path / "run-planted.log"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_kind_of_secret_is_found_and_named(tmp_path):
    key = keys.new_key()
    env = {"CODEPLAN_ADMIN_TOKEN": "admin-" + secrets.token_hex(8), "CODEPLAN_UPSTREAM_KEYS": "up-key-one,up-key-two"}
    planted = {
        "API key": f'{{"msg": "auth", "key": "{key}"}}',
        "Stripe secret key": '{"msg": "stripe", "api_key": "sk_test_51Hx0000000000abc"}',
        "Stripe webhook secret": '{"secret": "whsec_0123456789abcdef"}',
        "password hash": f'{{"hash": "{passwords.hash_password("hunter2 hunter2")}"}}',
        "key or session hash (hex)": f'{{"h": "{hashlib.sha256(key.encode()).hexdigest()}"}}',
        "key or session hash (bytea)": 'DETAIL:  Key (key_hash)=(\\x' + hashlib.sha256(b"k").hexdigest() + ') exists.',
        "session or reset token": f'{{"cookie": "codeplan_session={secrets.token_urlsafe(32)}"}}',
        "CODEPLAN_ADMIN_TOKEN value": f'{{"authorization": "Bearer {env["CODEPLAN_ADMIN_TOKEN"]}"}}',
        "CODEPLAN_UPSTREAM_KEYS value": '{"msg": "upstream refused", "key": "up-key-two"}',
    }
    path = _lines(tmp_path, *planted.values())
    found = {(f.line, f.kind) for f in scan([path], secrets_in_env(env))}
    for line, kind in enumerate(planted, 1):
        assert (line, kind) in found, (kind, found)
    assert all(f.path == path for f in scan([path], {}))


def test_what_the_servers_log_is_not_taken_for_a_secret(tmp_path):
    path = _lines(
        tmp_path,
        '{"ts": "2026-11-29T21:00:00Z", "level": "info", "msg": "request", "path": "/v1/chat/completions",'
        ' "status": 200, "key": "cp_AbCdEfG", "request_id": "5f0e7c1e-4a8b-4c1d-9e2f-0a1b2c3d4e5f", "ms": 12.5}',
        '{"msg": "migration applied", "name": "0031_ledger_billing_and_credits.sql"}',
        '2026-11-29 21:00:00.000 UTC [123] LOG:  database system is ready to accept connections',
        '{"msg": "test_a_start_after_a_sigkill_takes_the_orphan_over"}',
        '{"ts":"2026-11-29T21:22:53.800Z","level":"warning","logger":"codeplan.mail","msg":"mail not sent:'
        ' CODEPLAN_SMTP_URL is not set; the link is here","to":"a@example.com","subject":"Check your mail",'
        f'"link":"http://127.0.0.1:1/verify?token={secrets.token_urlsafe(32)}"}}')
    assert scan([path], {"short-secret-value": "CODEPLAN_ADMIN_TOKEN"}) == []
