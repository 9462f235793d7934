"""The fake's HTTP side: Stripe's wire protocol over the store, and webhook delivery.

What a client sees is what Stripe answers: form-encoded requests, JSON objects, the error
envelope, `Request-Id` headers, idempotency keys remembered as Stripe remembers them (same key and
parameters: the first answer again, an error of a request that began executing as well, marked
`Idempotent-Replayed`; same key, other parameters or endpoint: `idempotency_error`; while the first
is still running: 409).

Test-only controls live under `/_fake/` (JSON in, JSON out): complete a Checkout Session as the
hosted page would, move the account's clock, make a customer's card fail, schedule a price change as
the Portal does, inject faults (an error status before or after the request is carried out, or a
long stall after it), read what was requested, and deliver events to webhook endpoints: at once
(live, with optional delays and duplicates, retried until answered 2xx) or held and then flushed in
shuffled order with duplicates.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from . import forms
from .store import API_VERSION, Store, StripeError, allow, as_int, strip

Handler = Callable[[Store, dict[str, str], dict[str, Any]], Any]


def _routes() -> list[tuple[str, re.Pattern[str], Handler]]:
    def get_only(fetch: Callable[[Store, str], Any]) -> Handler:
        def handler(store: Store, match: dict[str, str], params: dict[str, Any]) -> Any:
            allow(params, ())
            return fetch(store, match["id"])
        return handler

    table: list[tuple[str, str, Handler]] = [
        ("POST", r"/v1/customers", lambda s, m, p: s.create_customer(p)),
        ("GET", r"/v1/customers/(?P<id>[^/]+)", get_only(Store.retrieve_customer)),
        ("POST", r"/v1/customers/(?P<id>[^/]+)", lambda s, m, p: s.update_customer(m["id"], p)),
        ("DELETE", r"/v1/customers/(?P<id>[^/]+)", lambda s, m, p: (allow(p, ()), s.delete_customer(m["id"]))[1]),
        ("POST", r"/v1/products", lambda s, m, p: s.create_product(p)),
        ("GET", r"/v1/products", lambda s, m, p: s.list_products(p)),
        ("GET", r"/v1/products/(?P<id>[^/]+)", get_only(Store.product)),
        ("POST", r"/v1/products/(?P<id>[^/]+)", lambda s, m, p: s.update_product(m["id"], p)),
        ("POST", r"/v1/prices", lambda s, m, p: s.create_price(p)),
        ("GET", r"/v1/prices", lambda s, m, p: s.list_prices(p)),
        ("GET", r"/v1/prices/(?P<id>[^/]+)", get_only(Store.price)),
        ("POST", r"/v1/prices/(?P<id>[^/]+)", lambda s, m, p: s.update_price(m["id"], p)),
        ("POST", r"/v1/billing/meters", lambda s, m, p: s.create_meter(p)),
        ("GET", r"/v1/billing/meters", lambda s, m, p: s.list_meters(p)),
        ("GET", r"/v1/billing/meters/(?P<id>[^/]+)", get_only(Store.meter)),
        ("GET", r"/v1/billing/meters/(?P<id>[^/]+)/event_summaries",
         lambda s, m, p: s.event_summaries(m["id"], p)),
        ("POST", r"/v1/billing/meter_events", lambda s, m, p: s.create_meter_event(p)),
        ("POST", r"/v1/checkout/sessions", lambda s, m, p: s.create_session(p)),
        ("GET", r"/v1/checkout/sessions", lambda s, m, p: s.list_sessions(p)),
        ("GET", r"/v1/checkout/sessions/(?P<id>[^/]+)", get_only(Store.session)),
        ("POST", r"/v1/checkout/sessions/(?P<id>[^/]+)/expire",
         lambda s, m, p: (allow(p, ()), s.expire_session(m["id"]))[1]),
        ("POST", r"/v1/billing_portal/sessions", lambda s, m, p: s.create_portal_session(p)),
        ("GET", r"/v1/subscriptions", lambda s, m, p: s.list_subscriptions(p)),
        ("GET", r"/v1/subscriptions/(?P<id>[^/]+)", get_only(Store.subscription)),
        ("POST", r"/v1/subscriptions/(?P<id>[^/]+)", lambda s, m, p: s.update_subscription(m["id"], p)),
        ("DELETE", r"/v1/subscriptions/(?P<id>[^/]+)", lambda s, m, p: s.cancel_subscription(m["id"], p)),
        ("GET", r"/v1/invoices", lambda s, m, p: s.list_invoices(p)),
        ("GET", r"/v1/invoices/(?P<id>[^/]+)", get_only(Store.invoice)),
        ("GET", r"/v1/invoices/(?P<id>[^/]+)/lines", lambda s, m, p: s.list_invoice_lines(m["id"], p)),
        ("POST", r"/v1/invoices/(?P<id>[^/]+)/pay", lambda s, m, p: s.pay_invoice(m["id"], p)),
        ("POST", r"/v1/invoices/(?P<id>[^/]+)/void", lambda s, m, p: s.void_invoice(m["id"], p)),
        ("GET", r"/v1/invoice_payments", lambda s, m, p: s.list_invoice_payments(p)),
        ("GET", r"/v1/invoice_payments/(?P<id>[^/]+)", get_only(Store.invoice_payment)),
        ("GET", r"/v1/payment_intents/(?P<id>[^/]+)", get_only(Store.payment_intent)),
        ("GET", r"/v1/charges/(?P<id>[^/]+)", get_only(lambda s, i: s.charge(i))),
        ("POST", r"/v1/refunds", lambda s, m, p: s.create_refund(p)),
        ("GET", r"/v1/refunds/(?P<id>[^/]+)", get_only(Store.refund)),
        ("GET", r"/v1/disputes", lambda s, m, p: s.list_disputes(p)),
        ("GET", r"/v1/disputes/(?P<id>[^/]+)", get_only(Store.dispute)),
        ("GET", r"/v1/events", lambda s, m, p: s.list_events(p)),
        ("GET", r"/v1/events/(?P<id>[^/]+)", get_only(Store.event)),
    ]
    return [(method, re.compile(pattern + "$"), handler) for method, pattern, handler in table]


ROUTES = _routes()


@dataclass
class Fault:
    method: str
    path: str
    status: int = 500
    count: int = 1
    # before: refuse without acting (nothing remembered under the request's key); during: fail
    # without acting, the answer remembered under the key as Stripe does; after: act, then answer
    # this status (the key remembers the real answer: a reply lost on its way back)
    when: str = "before"
    delay: float = 0.0  # after acting, stall this long before answering
    type: str = "api_error"
    message: str = "An unknown error occurred"
    code: str | None = None


@dataclass
class Remembered:
    method: str
    path: str
    params: dict[str, Any]
    request_id: str
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = False


@dataclass
class Endpoint:
    url: str
    secrets: list[str]
    mode: str = "live"  # live | held
    duplicate_rate: float = 0.0
    delay_min: float = 0.0
    delay_max: float = 0.0
    retry_base: float = 0.2
    max_attempts: int = 12
    enabled_events: list[str] = field(default_factory=lambda: ["*"])

    def wants(self, event_type: str) -> bool:
        return "*" in self.enabled_events or event_type in self.enabled_events


def signature_header(payload: str, secrets: list[str], timestamp: int | None = None) -> str:
    """`Stripe-Signature`: `t=<unix time>,v1=<hex HMAC-SHA256 of "t.payload">`, one v1 per secret
    (Stripe signs with both while an endpoint's secret is being rolled)."""
    t = int(time.time()) if timestamp is None else timestamp
    signed = f"{t}.{payload}".encode()
    parts = [f"t={t}"] + [f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}" for s in secrets]
    return ",".join(parts)


class FakeStripe:
    def __init__(self, api_keys: tuple[str, ...], base_url: str) -> None:
        self.api_keys = api_keys
        self.base_url = base_url
        self.store = Store(base_url)
        self.remembered: dict[str, Remembered] = {}
        self.faults: list[Fault] = []
        self.log: list[dict[str, Any]] = []
        self.endpoints: list[Endpoint] = []
        self.held: list[tuple[Endpoint, dict[str, Any]]] = []
        self.deliveries: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task] = set()
        self.session: aiohttp.ClientSession | None = None
        self.rng = random.Random()

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.__init__(self.api_keys, self.base_url)  # type: ignore[misc]

    # ---- the API ---------------------------------------------------------------------

    @staticmethod
    def _json(status: int, body: Any, headers: dict[str, str]) -> web.Response:
        return web.Response(status=status, body=json.dumps(body, indent=2).encode(),
                            content_type="application/json", headers=headers)

    def _authenticate(self, request: web.Request) -> StripeError | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":
            import base64
            try:
                key = base64.b64decode(value).decode().split(":", 1)[0]
            except ValueError:
                key = ""
        if not key:
            return StripeError(401, "You did not provide an API key. You need to provide your API key in "
                               "the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                               "YOUR_SECRET_KEY').", saved=False)
        if key not in self.api_keys:
            shown = key[:8] + "*" * 4 + key[-4:] if len(key) > 12 else "****"
            return StripeError(401, f"Invalid API Key provided: {shown}", saved=False)
        return None

    def _fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.count > 0 and fault.method in (method, "*") and path.startswith(fault.path):
                fault.count -= 1
                return fault
        return None

    async def api(self, request: web.Request) -> web.Response:
        request_id = Store.new_id("req_", 14)
        version = request.headers.get("Stripe-Version") or API_VERSION
        headers = {"Request-Id": request_id, "Stripe-Version": version,
                   "Cache-Control": "no-cache, no-store", "Access-Control-Allow-Origin": "*"}
        method, path = request.method, request.path
        raw = request.query_string if method == "GET" else (await request.read()).decode("utf-8", "replace")
        entry = {"id": request_id, "method": method, "path": path, "body": raw,
                 "stripe_version": request.headers.get("Stripe-Version"),
                 "idempotency_key": request.headers.get("Idempotency-Key"),
                 "content_type": request.headers.get("Content-Type"), "status": None}
        self.log.append(entry)
        del self.log[:-20000]

        def fail(error: StripeError) -> web.Response:
            entry["status"] = error.status
            return self._json(error.status, error.body(request_id), {**headers, **error.headers})

        refused = self._authenticate(request)
        if refused:
            return fail(refused)
        if method == "POST" and raw and not (entry["content_type"] or "").startswith(
                "application/x-www-form-urlencoded"):
            return fail(StripeError(400, "Invalid request: unsupported Content-Type "
                                    f"{entry['content_type']}. If error persists and you need assistance, "
                                    "please contact support@stripe.com.", saved=False))
        try:
            params = forms.decode(raw)
        except forms.FormError as exc:
            return fail(StripeError(400, str(exc), saved=False))
        entry["params"] = params
        for route_method, pattern, handler in ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                break
        else:
            return fail(StripeError(404, f"Unrecognized request URL ({method}: {path}). Please see "
                                    "https://stripe.com/docs or we can help at https://support.stripe.com/.",
                                    saved=False))

        fault = self._fault(method, path)
        if fault and fault.when == "before":
            return fail(StripeError(fault.status, fault.message, type=fault.type, code=fault.code, saved=False))

        key = request.headers.get("Idempotency-Key") if method in ("POST", "DELETE") else None
        if key:
            headers["Idempotency-Key"] = key
            earlier = self.remembered.get(key)
            if earlier is not None:
                if not earlier.done:
                    return fail(StripeError(409, "There is currently another in-progress request using this "
                                            f"Idempotent Key (that probably means you submitted twice, and the "
                                            f"other request is still going through): {key}. Please try again "
                                            "later.", type="idempotency_error", saved=False))
                if (earlier.method, earlier.path) != (method, path):
                    return fail(StripeError(400, "Keys for idempotent requests can only be used for the same "
                                            f"endpoint they were first used for ('{earlier.method} "
                                            f"{earlier.path}' vs '{method} {path}'). Try using a key other than "
                                            f"'{key}' if you meant to execute a different request.",
                                            type="idempotency_error", saved=False))
                if earlier.params != params:
                    return fail(StripeError(400, "Keys for idempotent requests can only be used with the same "
                                            "parameters they were first used with. Try using a key other than "
                                            f"'{key}' if you meant to execute a different request.",
                                            type="idempotency_error", saved=False))
                entry["replayed"] = True
                if fault and fault.when == "after":  # the replayed answer can be lost too
                    if fault.delay:
                        await asyncio.sleep(fault.delay)
                    return fail(StripeError(fault.status, fault.message, type=fault.type, code=fault.code))
                entry["status"] = earlier.status
                return web.Response(status=earlier.status, body=earlier.body, content_type="application/json",
                                    headers={**earlier.headers, "Request-Id": request_id,
                                             "Idempotent-Replayed": "true",
                                             "Original-Request": earlier.request_id})
            self.remembered[key] = Remembered(method, path, params, request_id)

        self.store.request = {"id": request_id, "idempotency_key": key}
        try:
            if fault and fault.when == "during":
                # the endpoint began and failed: what Stripe answers, and remembers under the key
                raise StripeError(fault.status, fault.message, type=fault.type, code=fault.code)
            status, body, extra = 200, strip(handler(self.store, match.groupdict(), params)), {}
            saved = True
        except StripeError as error:
            status, body, extra, saved = error.status, error.body(request_id), error.headers, error.saved
        finally:
            self.store.request = None
        self.dispatch()
        response_headers = {**headers, **extra}
        encoded = json.dumps(body, indent=2).encode()
        if key:
            # Stripe keeps the first answer of a request that began executing, an error (a 500 too)
            # as well as a success, and replays it for 24 hours
            if saved:
                self.remembered[key] = Remembered(method, path, params, request_id, status, encoded,
                                                  {k: v for k, v in response_headers.items() if k != "Request-Id"},
                                                  done=True)
            else:
                del self.remembered[key]
        if fault and fault.when == "after":
            if fault.delay:
                await asyncio.sleep(fault.delay)
            return fail(StripeError(fault.status, fault.message, type=fault.type, code=fault.code))
        entry["status"] = status
        return web.Response(status=status, body=encoded, content_type="application/json",
                            headers=response_headers)

    # ---- webhook delivery ------------------------------------------------------------

    def dispatch(self) -> None:
        events, self.store.undelivered = self.store.undelivered, []
        for endpoint in self.endpoints:
            for event in events:
                if not endpoint.wants(event["type"]):
                    continue
                if endpoint.mode == "held":
                    self.held.append((endpoint, event))
                else:
                    self._spawn(self._live(endpoint, event))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _live(self, endpoint: Endpoint, event: dict[str, Any]) -> None:
        await asyncio.sleep(self.rng.uniform(endpoint.delay_min, endpoint.delay_max))
        await self._deliver_until_answered(endpoint, event)
        if self.rng.random() < endpoint.duplicate_rate:  # at least once: sometimes twice
            await asyncio.sleep(self.rng.uniform(endpoint.delay_min, endpoint.delay_max))
            await self._deliver_until_answered(endpoint, event)

    async def _deliver_until_answered(self, endpoint: Endpoint, event: dict[str, Any]) -> bool:
        for attempt in range(1, endpoint.max_attempts + 1):
            status = await self._post(endpoint.url, endpoint.secrets, event, attempt)
            if 200 <= status < 300:
                return True
            await asyncio.sleep(min(endpoint.retry_base * 2 ** (attempt - 1), 5.0))
        return False

    async def _post(self, url: str, secrets: list[str], event: dict[str, Any], attempt: int = 1,
                    timestamp: int | None = None) -> int:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        payload = json.dumps(event, indent=2)
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                   "Stripe-Signature": signature_header(payload, secrets, timestamp)}
        try:
            async with self.session.post(url, data=payload.encode(), headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            status = 0
        self.deliveries.append({"event": event["id"], "type": event["type"], "url": url, "attempt": attempt,
                                "status": status, "at": time.time()})
        return status

    # ---- test controls -----------------------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body: dict[str, Any] = {}
        if request.can_read_body:
            body = await request.json()
        try:
            result = await self._control(request.method, path, body, request.query)
        except StripeError as error:
            return self._json(error.status, error.body("req_control"), {})
        except (KeyError, ValueError, TypeError) as exc:
            return self._json(400, {"error": {"message": f"bad control request: {exc!r}"}}, {})
        self.dispatch()
        return self._json(200, strip(result), {})

    async def _control(self, method: str, path: str, body: dict[str, Any], query: Any) -> Any:
        store = self.store
        if path == "health":
            return {"ok": True, "now": store.now()}
        if path == "reset":
            self.reset()
            return {"ok": True}
        if match := re.fullmatch(r"checkout/sessions/([^/]+)/complete", path):
            return store.complete_session(match.group(1), trial_days=body.get("trial_days"))
        if path == "clock":
            if method == "POST":
                store.advance(int(body["seconds"]))
            return {"now": store.now(), "offset": store.offset}
        if match := re.fullmatch(r"customers/([^/]+)/payment_behavior", path):
            store.customer(match.group(1))
            if body["behavior"] not in ("ok", "decline", "requires_action"):
                raise ValueError("behavior is ok, decline or requires_action")
            store.payment_behavior[match.group(1)] = body["behavior"]
            return {"ok": True}
        if match := re.fullmatch(r"charges/([^/]+)/dispute", path):
            return store.open_dispute(match.group(1), body.get("status", "needs_response"))
        if match := re.fullmatch(r"disputes/([^/]+)/close", path):
            return store.close_dispute(match.group(1), body["status"])
        if match := re.fullmatch(r"subscriptions/([^/]+)/schedule_price", path):
            return store.schedule_price(match.group(1), body["price"])
        if path == "settings":
            if "retry_delays" in body:
                store.retry_delays = [int(d) for d in body["retry_delays"]]
            if "after_retries" in body:
                store.after_retries = body["after_retries"]
            return {"retry_delays": store.retry_delays, "after_retries": store.after_retries}
        if path == "faults":
            if method == "DELETE":
                self.faults.clear()
            elif method == "POST":
                self.faults.append(Fault(**body))
            return {"faults": [f.__dict__ for f in self.faults]}
        if path == "requests":
            wanted = query.get("path")
            return {"data": [e for e in self.log if not wanted or e["path"].startswith(wanted)]}
        if path == "events":
            wanted = query.get("type")
            return {"data": [e for e in store.events if not wanted or e["type"] == wanted]}
        if path == "meter_events":
            return {"data": store.meter_events}
        if path == "objects":
            return {"customers": list(store.customers.values()), "subscriptions": list(store.subscriptions.values()),
                    "invoices": list(store.invoices.values()), "sessions": list(store.sessions.values()),
                    "charges": list(store.charges.values()), "refunds": list(store.refunds.values()),
                    "disputes": list(store.disputes.values())}
        if path == "webhooks/endpoints":
            if method == "DELETE":
                self.endpoints.clear()
                self.held.clear()
            elif method == "POST":
                self.endpoints.append(Endpoint(**body))
            return {"endpoints": [e.__dict__ for e in self.endpoints]}
        if path == "webhooks/flush":
            return await self._flush(body)
        if path == "webhooks/deliver":
            return await self._deliver_now(body)
        if path == "webhooks/idle":
            deadline = time.monotonic() + float(body.get("timeout", 60))
            while self.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return {"idle": not self.tasks, "in_flight": len(self.tasks)}
        if path == "webhooks/deliveries":
            return {"data": self.deliveries}
        raise ValueError(f"no control {method} /_fake/{path}")

    async def _flush(self, body: dict[str, Any]) -> dict[str, Any]:
        """Deliver the held events: shuffled (seeded), some twice, `concurrency` at a time, each
        retried until answered 2xx."""
        rng = random.Random(body.get("seed"))
        batch, self.held = self.held, []
        rate = float(body.get("duplicate_rate", 0.0))
        batch = batch + [item for item in batch if rng.random() < rate]
        if body.get("shuffle", True):
            rng.shuffle(batch)
        return await self._send_all(batch, int(body.get("concurrency", 4)), retry=True)

    async def _deliver_now(self, body: dict[str, Any]) -> dict[str, Any]:
        """Deliver the named events (in this order, repeats allowed) to `url`, once each."""
        events = {e["id"]: e for e in self.store.events}
        endpoint = Endpoint(url=body["url"], secrets=list(body["secrets"]))
        batch = [(endpoint, events[i]) for i in body["event_ids"]]
        return await self._send_all(batch, int(body.get("concurrency", 1)), retry=bool(body.get("retry", True)),
                                    timestamp=body.get("timestamp"))

    async def _send_all(self, batch: list[tuple[Endpoint, dict[str, Any]]], concurrency: int, *, retry: bool,
                        timestamp: int | None = None) -> dict[str, Any]:
        gate = asyncio.Semaphore(max(1, concurrency))
        statuses: list[int] = [0] * len(batch)

        async def one(i: int, endpoint: Endpoint, event: dict[str, Any]) -> None:
            async with gate:
                if retry:
                    statuses[i] = 200 if await self._deliver_until_answered(endpoint, event) else 0
                else:
                    statuses[i] = await self._post(endpoint.url, endpoint.secrets, event, timestamp=timestamp)
        await asyncio.gather(*(one(i, ep, ev) for i, (ep, ev) in enumerate(batch)))
        return {"sent": len(batch), "statuses": statuses, "ok": sum(200 <= s < 300 for s in statuses)}


def create_app(api_keys: tuple[str, ...], base_url: str) -> web.Application:
    fake = FakeStripe(api_keys, base_url)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app["fake"] = fake

    async def hosted(request: web.Request) -> web.Response:
        return web.Response(text=f"<!doctype html><title>Stripe (fake)</title><p>Hosted page {request.path}</p>",
                            content_type="text/html")

    async def close(app: web.Application) -> None:
        for task in list(fake.tasks):
            task.cancel()
        if fake.session is not None:
            await fake.session.close()

    app.router.add_route("*", "/_fake/{path:.*}", fake.control)
    app.router.add_get("/c/pay/{id}", hosted)
    app.router.add_get("/p/session/{id}", hosted)
    app.router.add_get("/i/{id:.*}", hosted)
    app.router.add_route("*", "/{tail:.*}", fake.api)
    app.on_cleanup.append(close)
    return app
