"""A faithful local fake of the Stripe API endpoints Codeplan uses (see server.py, store.py).

Run it as a real server (`python -m tests.stripe_fake`) and point the `stripe` library at it with
`base_addresses={"api": url}`; tests steer it through `Control`.
"""
from __future__ import annotations

from typing import Any

import httpx
import stripe

from .server import signature_header  # noqa: F401  (tests sign their own payloads with it)
from .store import API_VERSION  # noqa: F401

API_KEY = "sk_test_codeplanfake0000000000000000"


class Control:
    """The fake's test-only controls (`/_fake/...`), and a real `stripe` client aimed at it."""

    def __init__(self, url: str, api_key: str = API_KEY) -> None:
        self.url = url
        self.api_key = api_key
        self._http = httpx.Client(base_url=url + "/_fake/", timeout=300)

    def call(self, method: str, route: str, body: dict[str, Any] | None = None, **query: str) -> Any:
        response = self._http.request(method, route, json=body, params=query or None)
        if response.status_code != 200:
            raise AssertionError(f"fake control {method} {route}: {response.status_code} {response.text}")
        return response.json()

    def client(self, **options: Any) -> stripe.StripeClient:
        return stripe.StripeClient(self.api_key, base_addresses={"api": self.url}, **options)

    def reset(self) -> None:
        self.call("POST", "reset")

    def complete_checkout(self, session_id: str, trial_days: int | None = None) -> dict[str, Any]:
        return self.call("POST", f"checkout/sessions/{session_id}/complete",
                         {} if trial_days is None else {"trial_days": trial_days})

    def advance(self, seconds: int) -> int:
        return self.call("POST", "clock", {"seconds": seconds})["now"]

    def now(self) -> int:
        return self.call("GET", "clock")["now"]

    def payment_behavior(self, customer: str, behavior: str) -> None:
        self.call("POST", f"customers/{customer}/payment_behavior", {"behavior": behavior})

    def schedule_price(self, subscription: str, price: str) -> dict[str, Any]:
        return self.call("POST", f"subscriptions/{subscription}/schedule_price", {"price": price})

    def dispute(self, charge: str, status: str = "needs_response") -> dict[str, Any]:
        """The cardholder's bank disputes `charge` (a chargeback; `warning_needs_response` an inquiry)."""
        return self.call("POST", f"charges/{charge}/dispute", {"status": status})

    def close_dispute(self, dispute: str, status: str) -> dict[str, Any]:
        return self.call("POST", f"disputes/{dispute}/close", {"status": status})

    def settings(self, **values: Any) -> dict[str, Any]:
        return self.call("POST", "settings", values)

    def fault(self, path: str, status: int = 500, *, method: str = "POST", count: int = 1, when: str = "before",
              delay: float = 0.0, type: str = "api_error", message: str = "An unknown error occurred",
              code: str | None = None) -> None:
        self.call("POST", "faults", {"method": method, "path": path, "status": status, "count": count,
                                     "when": when, "delay": delay, "type": type, "message": message,
                                     "code": code})

    def clear_faults(self) -> None:
        self.call("DELETE", "faults")

    def requests(self, path: str = "") -> list[dict[str, Any]]:
        return self.call("GET", "requests", **({"path": path} if path else {}))["data"]

    def events(self, type: str = "") -> list[dict[str, Any]]:
        return self.call("GET", "events", **({"type": type} if type else {}))["data"]

    def meter_events(self) -> list[dict[str, Any]]:
        return self.call("GET", "meter_events")["data"]

    def objects(self) -> dict[str, list[dict[str, Any]]]:
        return self.call("GET", "objects")

    def add_endpoint(self, url: str, secrets: list[str], *, mode: str = "live", duplicate_rate: float = 0.0,
                     delay_min: float = 0.0, delay_max: float = 0.0, max_attempts: int = 12) -> None:
        self.call("POST", "webhooks/endpoints", {
            "url": url, "secrets": secrets, "mode": mode, "duplicate_rate": duplicate_rate,
            "delay_min": delay_min, "delay_max": delay_max, "max_attempts": max_attempts})

    def clear_endpoints(self) -> None:
        self.call("DELETE", "webhooks/endpoints")

    def flush(self, *, seed: int = 0, duplicate_rate: float = 0.0, concurrency: int = 4,
              shuffle: bool = True) -> dict[str, Any]:
        return self.call("POST", "webhooks/flush", {"seed": seed, "duplicate_rate": duplicate_rate,
                                                    "concurrency": concurrency, "shuffle": shuffle})

    def deliver(self, event_ids: list[str], url: str, secrets: list[str], *, concurrency: int = 1,
                retry: bool = True, timestamp: int | None = None) -> dict[str, Any]:
        return self.call("POST", "webhooks/deliver", {"event_ids": event_ids, "url": url, "secrets": secrets,
                                                      "concurrency": concurrency, "retry": retry,
                                                      "timestamp": timestamp})

    def idle(self, timeout: float = 120) -> None:
        result = self.call("POST", "webhooks/idle", {"timeout": timeout})
        if not result["idle"]:
            raise AssertionError(f"webhook deliveries still in flight after {timeout}s: {result}")

    def deliveries(self) -> list[dict[str, Any]]:
        return self.call("GET", "webhooks/deliveries")["data"]
