"""Billing tests: the Stripe fake as a real server, Codeplan as a real server pointed at it with
the real `stripe` library, the embedded PostgreSQL."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid

import asyncpg
import pytest

from service import keys

from ..conftest import CODEPLAN, ROOT, Server, base_env, free_port, query, run, start_bridge
from ..stripe_fake import API_KEY, Control

WEBHOOK_SECRET = "whsec_codeplan_test_secret_0001"
OLD_WEBHOOK_SECRET = "whsec_codeplan_test_secret_0000"


def start_fake() -> tuple[Server, Control]:
    port = free_port()
    server = Server([sys.executable, "-m", "tests.stripe_fake", "--port", str(port), "--api-key", API_KEY],
                    base_env(), port, "/_fake/health")
    server.start()
    return server, Control(server.url)


@pytest.fixture(scope="module")
def fake():
    server, control = start_fake()
    yield control
    server.stop()


def billing_env(fake: Control, **extra: str) -> dict[str, str]:
    env = {"STRIPE_SECRET_KEY": API_KEY, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "CODEPLAN_STRIPE_API_BASE": fake.url, "CODEPLAN_PUBLIC_URL": "https://codeplan.example",
           "CODEPLAN_PLAN_PRICES": "lite=600,pro=3000/30000,max=6000/60000",
           "CODEPLAN_TOPUP_BLOCKS": "20000000=1000,100000000=4500",
           "CODEPLAN_OVERAGE_PLANS": "pro,max", "CODEPLAN_OVERAGE_CENTS_PER_MILLION": "150",
           "CODEPLAN_OVERAGE_CAP_TOKENS": "50000000", "CODEPLAN_BILLING_RETRY_SECONDS": "0.2",
           "CODEPLAN_PAST_DUE_GRACE": "3600",
           # Stripe's list of events is read only where a test asks for it: a pass would record
           # events a test holds back to deliver in an order of its own
           "CODEPLAN_STRIPE_CATCHUP_SECONDS": "86400"}
    env.update(extra)
    return env


def stripe_sync(database: str, fake: Control, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(CODEPLAN + ["stripe", "sync"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=base_env(CODEPLAN_DATABASE_URL=database, **billing_env(fake, **extra)))


def start_billing_bridge(database: str, simulator: Server, fake: Control, *, endpoint: bool = True,
                         **extra: str) -> Server:
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", **billing_env(fake, **extra))
    if endpoint:
        fake.add_endpoint(server.url + "/stripe/webhook", [WEBHOOK_SECRET])
    return server


def new_account(database: str, email: str | None = None) -> tuple[int, str]:
    """An account and a key, without a subscription: what a sign-up gives before buying a plan."""
    async def create():
        conn = await asyncpg.connect(database)
        try:
            account = await conn.fetchval("INSERT INTO accounts (email) VALUES ($1) RETURNING id",
                                          email or f"{uuid.uuid4().hex[:10]}@example.com")
            key = keys.new_key()
            await conn.execute("INSERT INTO api_keys (account_id, prefix, secret_hash) VALUES ($1, $2, $3)",
                               account, keys.visible_prefix(key), keys.key_hash(key))
            return account, key
        finally:
            await conn.close()
    return run(create())


def wait_for(check, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout}s (last: {value!r})")
        time.sleep(interval)


def events_settled(database: str, fake: Control, timeout: float = 90.0) -> None:
    """Every event the fake emitted has been delivered, and every one received has been applied."""
    fake.idle(timeout)

    def pending():
        return run(query(database, "SELECT id, type, attempts, last_error FROM stripe_events WHERE state = 'pending'"))
    try:
        wait_for(lambda: not pending(), timeout, what="stripe events applied")
    except AssertionError:
        raise AssertionError(f"stripe events still pending: {[dict(r) for r in pending()][:5]}") from None


def one(database: str, sql: str, *args):
    rows = run(query(database, sql, *args))
    return rows[0] if rows else None
