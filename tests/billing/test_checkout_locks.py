"""No account row is locked while Stripe answers (review finding 13): a login and a new key for an
account go ahead while its Checkout waits on a slow Stripe call."""
from __future__ import annotations

import re
import threading
import time
import uuid

import pytest

from ..web_support import Browserish
from .conftest import start_billing_bridge, stripe_sync
from .test_checkout import post

SECRET = re.compile(r"cp_[A-Za-z0-9_-]{30,}")
SLOW = 12.0  # seconds Stripe takes to answer the Customer create


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    result = stripe_sync(database, fake)
    assert result.returncode == 0, result.stderr
    # the web page's forms check the origin: the server's own address is its public URL here
    server = start_billing_bridge(database, simulator, fake, CODEPLAN_PUBLIC_URL="")
    yield server
    server.stop()


def test_a_login_and_a_new_key_proceed_while_a_stripe_call_is_slow(database, fake, service):
    address = f"l{uuid.uuid4().hex[:10]}@example.com"
    owner = Browserish(service.url)
    assert owner.sign_up(address).status_code == 200
    owner.get("/keys")
    key = SECRET.search(owner.post("/keys", {"name": "laptop"}).text).group(0)

    # Stripe makes the Customer, then stalls before answering (and the retry gets the replay)
    fake.fault("/v1/customers", 500, when="after", delay=SLOW)
    answer: dict = {}
    checkout = threading.Thread(target=lambda: answer.update(
        response=post(service, "/v1/billing/checkout", key, {"plan": "pro"})))
    checkout.start()
    try:
        def waiting_on_stripe() -> bool:
            return any(r["method"] == "POST" for r in fake.requests("/v1/customers")) and checkout.is_alive()
        deadline = time.monotonic() + 60
        while not waiting_on_stripe():
            assert time.monotonic() < deadline and checkout.is_alive(), answer
            time.sleep(0.05)

        # meanwhile: a login (a new web session row, a foreign key to the account) and a new key
        other = Browserish(service.url)
        assert other.log_in(address).url.path in ("/dashboard", "/setup")
        other.get("/keys")
        assert SECRET.search(other.post("/keys", {"name": "desktop"}).text)
        assert checkout.is_alive(), "the login and the new key waited until the slow Stripe call was over"
    finally:
        checkout.join(120)
        fake.clear_faults()
    assert answer["response"].status_code == 200, answer["response"].text
