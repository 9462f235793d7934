"""Stripe billing: catalogue, Checkout and Portal, webhooks, subscription state -> allowance,
top-up purchases and the overage meter outbox. The interface is `Billing` (engine.py).

Stripe's library is loaded on first use (the standard library's `importlib.util.LazyLoader`):
importing it imports its HTTP clients too (requests, httpx and the command-line tools httpx's
own imports pull in), ~10 MB and ~0.2 s of every process, which a server without billing never
uses. This package's modules take it as `from . import stripe`: an `import stripe` of a module
already in `sys.modules` reads its `__spec__`, which would load it there and then. Where billing
is on, or webhooks are verified, `load_stripe()` loads it at start-up (service/app.py), so no
request waits for the import, and so its first use is on the event loop's thread: CPython 3.11's
lazy module is not safe to load from two threads at once.
"""
from __future__ import annotations

import importlib.util
import sys


def _lazily(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        importlib.import_module(name)  # not installed: the import's own error, now
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_lazily("stripe")
stripe = sys.modules["stripe"]


def load_stripe() -> None:
    """Load Stripe's library now (its first attribute read runs its import)."""
    stripe.StripeError  # noqa: B018 - the read is the point
