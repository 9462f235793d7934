"""Memory given back to the system after a burst of requests (service/memory.py)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from service import memory

ROOT = Path(__file__).resolve().parent.parent


async def test_trims_once_a_burst_has_ended_and_not_while_it_grows(caplog):
    assert memory.malloc_trim() is not None  # glibc, as on every host this runs on
    load = iter([100, 1500, 3000, 2900, 1000, 900, 950])
    seen: list[int] = []

    def in_flight() -> int:
        value = next(load, 950)
        seen.append(value)
        return value
    caplog.set_level(logging.INFO, logger="codeplan.memory")
    watcher = asyncio.ensure_future(memory.trim_after_bursts(in_flight, threshold=1000, interval=0.01))
    while len(seen) < 8:
        await asyncio.sleep(0.01)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    trims = [r for r in caplog.records if r.getMessage() == "memory given back after a burst"]
    # growing (100 -> 3000) and a small dip (2900) trim nothing; the fall to 1000 trims once;
    # what follows stays within the threshold of that new low
    assert [(r.in_flight_peak, r.in_flight) for r in trims] == [(3000, 1000)]


async def test_trims_once_after_start_up_and_then_only_after_bursts(monkeypatch):
    # what start-up freed (imports, the migrations' and caches' temporaries) is given back once:
    # measured, 128 -> 124 MB with pymalloc and 148 -> 126 MB with PYTHONMALLOC=malloc
    trims: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: trims.append)
    watcher = asyncio.ensure_future(memory.trim_after_bursts(lambda: 5, threshold=1000, interval=0.01))
    await asyncio.sleep(0.1)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert trims == [0]  # steady load: no trim after the first


def test_a_server_without_billing_never_loads_stripes_library():
    """Importing Stripe's library imports its HTTP clients too (~10 MB, ~0.2 s): a server with no
    Stripe key and no webhook secret builds its whole app without it; `load_stripe` loads it (what
    the app does at start-up where billing or webhooks are on)."""
    probe = ("import sys\n"
             "from service import config as config_module\n"
             "from service.app import create_app\n"
             "create_app(config_module.load(), 'postgresql://127.0.0.1:9/none')\n"
             "print('BUILT', 'stripe._http_client' in sys.modules)\n"
             "from service.billing import load_stripe, stripe\n"
             "load_stripe()\n"
             "print('LOADED', 'stripe._http_client' in sys.modules, stripe.StripeError.__name__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEPLAN_", "STRIPE_"))}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "BUILT False" in done.stdout, done.stdout + done.stderr
    assert "LOADED True StripeError" in done.stdout, done.stdout + done.stderr
