"""The fake's Stripe account: objects, their lifecycle and the events they emit. No I/O.

Shapes follow the API version the `stripe` library pins (2026-10-28.endive): billing periods live
on subscription items, an invoice names its subscription under `parent.subscription_details`,
metered prices are backed by Billing Meters. Only what Codeplan uses is implemented, but what is
implemented validates its parameters as Stripe does (unknown parameter, missing parameter, no
such object), so a request Stripe would refuse is refused here too.

The account has a clock (Stripe's test clocks, in effect): `advance()` moves it and runs what
falls due: renewals, payment retries, cancellations at period end, scheduled price changes.
"""
from __future__ import annotations

import calendar
import copy
import datetime as dt
import secrets
import string
import time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Iterable

API_VERSION = "2026-10-28.endive"
_ALPHABET = string.ascii_letters + string.digits
DAY = 86400


class StripeError(Exception):
    """An error as Stripe answers it: status, and the `error` object of the envelope.

    `saved` says whether an idempotency key remembers this answer: Stripe keeps the result of a
    request that started executing, not of one refused while its parameters were validated."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, saved: bool = True,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.saved = saved
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.param:
            error["param"] = self.param
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        error.update(self.extra)
        return {"error": error}


def unknown(name: str) -> StripeError:
    return StripeError(400, f"Received unknown parameter: {name}", param=name,
                       code="parameter_unknown", saved=False)


def missing(name: str) -> StripeError:
    return StripeError(400, f"Missing required param: {name}.", param=name,
                       code="parameter_missing", saved=False)


def invalid(name: str, message: str, code: str = "parameter_invalid_empty") -> StripeError:
    return StripeError(400, message, param=name, code=code, saved=False)


def no_such(kind: str, ident: str, param: str | None = None) -> StripeError:
    return StripeError(404 if param is None else 400, f"No such {kind}: '{ident}'", param=param or "id",
                       code="resource_missing")


def allow(params: dict[str, Any], allowed: Iterable[str], prefix: str = "") -> None:
    allowed = set(allowed) | {"expand"}
    for name in params:
        if name not in allowed:
            raise unknown(f"{prefix}[{name}]" if prefix else name)


def as_int(params: dict[str, Any], name: str, *, required: bool = False, minimum: int | None = 0) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid(name, f"Invalid integer: {value}", "parameter_invalid_integer") from None
    if minimum is not None and number < minimum:
        raise invalid(name, f"This value must be greater than or equal to {minimum}.",
                      "parameter_invalid_integer")
    return number


def as_bool(params: dict[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value in ("true", True):
        return True
    if value in ("false", False):
        return False
    raise invalid(name, f"Invalid boolean: {value}", "parameter_invalid_boolean")


def as_dict(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name, {})
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise invalid(name, f"Invalid object", "parameter_invalid_object")
    return value


def as_list(params: dict[str, Any], name: str) -> list[Any]:
    value = params.get(name, [])
    if value == "":
        return []
    if isinstance(value, dict):  # sparse indexes
        return [value[k] for k in sorted(value, key=lambda k: int(k) if k.isdigit() else 0)]
    if not isinstance(value, list):
        raise invalid(name, "Invalid array", "parameter_invalid_array")
    return value


def metadata(params: dict[str, Any], current: dict[str, str] | None = None) -> dict[str, str]:
    """Stripe merges metadata on update; an empty value deletes the key."""
    merged = dict(current or {})
    for key, value in as_dict(params, "metadata").items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


def add_months(moment: int, months: int) -> int:
    base = dt.datetime.fromtimestamp(moment, dt.timezone.utc)
    index = base.month - 1 + months
    year, month = base.year + index // 12, index % 12 + 1
    day = min(base.day, calendar.monthrange(year, month)[1])
    return int(base.replace(year=year, month=month, day=day).timestamp())


def period_end(anchor: int, interval: str, count: int, cycles: int) -> int:
    if interval == "day":
        return anchor + DAY * count * cycles
    if interval == "week":
        return anchor + 7 * DAY * count * cycles
    if interval == "month":
        return add_months(anchor, count * cycles)
    return add_months(anchor, 12 * count * cycles)


def strip(value: Any) -> Any:
    """A deep copy without the fake's own bookkeeping (keys starting with `_`)."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def list_object(url: str, data: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


class Store:
    def __init__(self, base_url: str = "http://127.0.0.1") -> None:
        self.base_url = base_url
        self.offset = 0  # seconds the account's clock is ahead of the wall clock
        self.objects: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.deleted_customers: dict[str, dict[str, Any]] = {}  # what retrieving a deleted one answers
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.lookup_keys: dict[str, str] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.meter_events: list[dict[str, Any]] = []
        self.identifiers: dict[str, int] = {}  # meter event identifier -> when it was used (wall clock)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.portal_sessions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.disputes: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.undelivered: list[dict[str, Any]] = []  # events the server has not handed to delivery yet
        self.payment_behavior: dict[str, str] = {}  # customer -> ok | decline | requires_action
        self.scheduled_price: dict[str, str] = {}  # subscription -> price it moves to at period end
        self.pending_items: dict[str, list[dict[str, Any]]] = {}  # subscription -> proration lines
        self.cycles: dict[str, int] = {}  # subscription -> periods since the anchor
        # Stripe's "smart retries" settings: retry after these delays, then act
        self.retry_delays = [3 * DAY, 5 * DAY, 7 * DAY]
        self.after_retries = "canceled"  # canceled | unpaid | past_due
        self.request: dict[str, Any] | None = None  # the API request being served, for events

    # ---- basics --------------------------------------------------------------------------

    def now(self) -> int:
        return int(time.time()) + self.offset

    @staticmethod
    def new_id(prefix: str, length: int = 24) -> str:
        return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))

    def _keep(self, table: dict[str, dict[str, Any]], obj: dict[str, Any]) -> dict[str, Any]:
        table[obj["id"]] = obj
        self.objects[obj["id"]] = obj
        return obj

    def emit(self, type: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"object": strip(obj)}
        if previous:
            data["previous_attributes"] = strip(previous)
        event = {
            "id": self.new_id("evt_"), "object": "event", "api_version": API_VERSION,
            "created": self.now(), "data": data, "livemode": False, "pending_webhooks": 1,
            "request": {"id": self.request.get("id"), "idempotency_key": self.request.get("idempotency_key")}
            if self.request else {"id": None, "idempotency_key": None},
            "type": type,
        }
        self.events.append(event)
        self.undelivered.append(event)
        return event

    def _update(self, obj: dict[str, Any], event: str | None, **changes: Any) -> dict[str, Any]:
        previous = {k: copy.deepcopy(obj.get(k)) for k, v in changes.items() if obj.get(k) != v}
        obj.update(changes)
        if event and previous:
            self.emit(event, obj, previous)
        return previous

    def page(self, url: str, rows: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        limit = as_int(params, "limit") or 10
        if not 1 <= limit <= 100:
            raise invalid("limit", "This value must be between 1 and 100.", "parameter_invalid_integer")
        rows = sorted(rows, key=lambda r: (r.get("created", 0), r["id"]), reverse=True)
        after = params.get("starting_after")
        if after:
            ids = [r["id"] for r in rows]
            if after not in ids:
                raise no_such("object", after, "starting_after")
            rows = rows[ids.index(after) + 1:]
        return list_object(url, rows[:limit], has_more=len(rows) > limit)

    # ---- customers ----------------------------------------------------------------------

    _CUSTOMER_FIELDS = {"email", "name", "description", "metadata", "phone", "address",
                        "preferred_locales", "invoice_settings", "payment_method", "test_clock"}

    def create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, self._CUSTOMER_FIELDS)
        now = self.now()
        return self._keep(self.customers, self._emit_created("customer.created", {
            "id": self.new_id("cus_", 14), "object": "customer", "address": None, "balance": 0,
            "created": now, "currency": None, "default_source": None, "delinquent": False,
            "description": params.get("description"), "discount": None, "email": params.get("email"),
            "invoice_prefix": self.new_id("", 8).upper(), "invoice_settings": {
                "custom_fields": None, "default_payment_method": None, "footer": None,
                "rendering_options": None},
            "livemode": False, "metadata": metadata(params), "name": params.get("name"),
            "next_invoice_sequence": 1, "phone": params.get("phone"), "preferred_locales": [],
            "shipping": None, "tax_exempt": "none", "test_clock": None}))

    def _emit_created(self, event: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.emit(event, obj)
        return obj

    def customer(self, ident: str, param: str | None = None) -> dict[str, Any]:
        found = self.customers.get(ident)
        if found is None:
            raise no_such("customer", ident, param)
        return found

    def retrieve_customer(self, ident: str) -> dict[str, Any]:
        """Unlike other objects, a deleted customer can still be retrieved: `{id, object, deleted}`."""
        return self.deleted_customers.get(ident) or self.customer(ident)

    def delete_customer(self, ident: str) -> dict[str, Any]:
        """Permanently deletes a customer (no undo), and immediately cancels its subscriptions, each
        with its customer.subscription.deleted. Any further operation naming it finds no such
        customer (retrieving it answers it deleted); its invoices stay as they are."""
        customer = self.customer(ident)
        for subscription in list(self.subscriptions.values()):
            if subscription["customer"] == ident and subscription["status"] not in ("canceled", "incomplete_expired"):
                self._cancel(subscription, reason="cancellation_requested")
        del self.customers[ident]
        self.objects.pop(ident, None)
        self.payment_behavior.pop(ident, None)
        deleted = {"id": ident, "object": "customer", "deleted": True}
        self.deleted_customers[ident] = deleted
        self.emit("customer.deleted", customer)
        return deleted

    def update_customer(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        customer = self.customer(ident)
        allow(params, self._CUSTOMER_FIELDS - {"payment_method", "test_clock"})
        changes = {k: params[k] for k in ("email", "name", "description", "phone") if k in params}
        if "metadata" in params:
            changes["metadata"] = metadata(params, customer["metadata"])
        self._update(customer, "customer.updated", **changes)
        return customer

    # ---- products and prices --------------------------------------------------------------

    def create_product(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"id", "name", "active", "description", "metadata", "default_price_data",
                       "tax_code", "unit_label", "statement_descriptor", "url", "images",
                       "marketing_features", "shippable"})
        if not params.get("name"):
            raise missing("name")
        ident = params.get("id") or self.new_id("prod_", 14)
        if ident in self.products:
            raise StripeError(400, "Product already exists.", param="id", code="resource_already_exists")
        now = self.now()
        product = {
            "id": ident, "object": "product", "active": as_bool(params, "active") is not False,
            "created": now, "default_price": None, "description": params.get("description") or None,
            "images": [], "livemode": False, "marketing_features": [], "metadata": metadata(params),
            "name": params["name"], "package_dimensions": None, "shippable": None,
            "statement_descriptor": None, "tax_code": None, "type": "service",
            "unit_label": params.get("unit_label") or None, "updated": now, "url": None}
        self._keep(self.products, product)
        self.emit("product.created", product)
        return product

    def product(self, ident: str, param: str | None = None) -> dict[str, Any]:
        found = self.products.get(ident)
        if found is None:
            raise no_such("product", ident, param)
        return found

    def update_product(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        product = self.product(ident)
        allow(params, {"name", "active", "description", "metadata", "unit_label", "default_price"})
        changes: dict[str, Any] = {k: params[k] for k in ("name",) if k in params}
        if "description" in params:
            changes["description"] = params["description"] or None
        if "active" in params:
            changes["active"] = as_bool(params, "active")
        if "metadata" in params:
            changes["metadata"] = metadata(params, product["metadata"])
        if "unit_label" in params:
            changes["unit_label"] = params["unit_label"] or None
        if self._update(product, "product.updated", **changes):
            product["updated"] = self.now()
        return product

    def list_products(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"active", "ids", "limit", "starting_after", "ending_before", "created", "url", "shippable"})
        rows = list(self.products.values())
        active = as_bool(params, "active")
        if active is not None:
            rows = [r for r in rows if r["active"] == active]
        if params.get("ids"):
            wanted = set(as_list(params, "ids"))
            rows = [r for r in rows if r["id"] in wanted]
        return self.page("/v1/products", rows, params)

    def create_price(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"currency", "product", "product_data", "unit_amount", "unit_amount_decimal",
                       "recurring", "lookup_key", "transfer_lookup_key", "metadata", "nickname",
                       "active", "billing_scheme", "tax_behavior"})
        if not params.get("currency"):
            raise missing("currency")
        if not params.get("product"):
            raise missing("product")
        self.product(params["product"], "product")
        amount = as_int(params, "unit_amount")
        decimal = params.get("unit_amount_decimal")
        if amount is None and decimal is None:
            raise missing("unit_amount")
        if amount is not None and decimal is not None:
            raise invalid("unit_amount_decimal",
                          "You may only specify one of these parameters: unit_amount, unit_amount_decimal.")
        if decimal is not None:
            try:
                Decimal(decimal)
            except InvalidOperation:
                raise invalid("unit_amount_decimal", f"Invalid decimal: {decimal}",
                              "parameter_invalid_decimal") from None
        recurring = None
        if "recurring" in params:
            raw = as_dict(params, "recurring")
            allow(raw, {"interval", "interval_count", "usage_type", "meter", "trial_period_days"}, "recurring")
            if raw.get("interval") not in ("day", "week", "month", "year"):
                raise missing("recurring[interval]") if not raw.get("interval") else invalid(
                    "recurring[interval]", f"Invalid recurring[interval]: must be one of day, week, month, or year",
                    "parameter_invalid_string")
            usage_type = raw.get("usage_type", "licensed")
            if usage_type not in ("licensed", "metered"):
                raise invalid("recurring[usage_type]", "Invalid recurring[usage_type]", "parameter_invalid_string")
            meter = raw.get("meter")
            if usage_type == "metered" and not meter:
                raise invalid("recurring[meter]", "Metered prices must be backed by a meter: "
                              "pass recurring[meter].", "parameter_missing")
            if meter and meter not in self.meters:
                raise no_such("billing meter", meter, "recurring[meter]")
            recurring = {"interval": raw["interval"], "interval_count": as_int(raw, "interval_count") or 1,
                         "meter": meter, "trial_period_days": None, "usage_type": usage_type}
        lookup_key = params.get("lookup_key") or None
        if lookup_key and lookup_key in self.lookup_keys:
            if as_bool(params, "transfer_lookup_key"):
                self.prices[self.lookup_keys[lookup_key]]["lookup_key"] = None
            else:
                raise StripeError(400, f"A price (`{self.lookup_keys[lookup_key]}`) already uses that "
                                  "lookup key.", param="lookup_key", code="lookup_key_already_exists")
        price = {
            "id": self.new_id("price_"), "object": "price", "active": as_bool(params, "active") is not False,
            "billing_scheme": "per_unit", "created": self.now(), "currency": params["currency"].lower(),
            "custom_unit_amount": None, "livemode": False, "lookup_key": lookup_key,
            "metadata": metadata(params), "nickname": params.get("nickname") or None,
            "product": params["product"], "recurring": recurring, "tax_behavior": "unspecified",
            "tiers_mode": None, "transform_quantity": None,
            "type": "recurring" if recurring else "one_time",
            "unit_amount": amount if decimal is None else None,
            "unit_amount_decimal": str(decimal) if decimal is not None else str(amount)}
        if lookup_key:
            self.lookup_keys[lookup_key] = price["id"]
        self._keep(self.prices, price)
        self.emit("price.created", price)
        return price

    def price(self, ident: str, param: str | None = None) -> dict[str, Any]:
        found = self.prices.get(ident)
        if found is None:
            raise no_such("price", ident, param)
        return found

    def update_price(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        price = self.price(ident)
        allow(params, {"active", "metadata", "nickname", "lookup_key", "transfer_lookup_key", "tax_behavior"})
        changes: dict[str, Any] = {}
        if "active" in params:
            changes["active"] = as_bool(params, "active")
        if "nickname" in params:
            changes["nickname"] = params["nickname"] or None
        if "metadata" in params:
            changes["metadata"] = metadata(params, price["metadata"])
        if "lookup_key" in params:
            key = params["lookup_key"] or None
            holder = self.lookup_keys.get(key) if key else None
            if holder and holder != ident:
                if not as_bool(params, "transfer_lookup_key"):
                    raise StripeError(400, f"A price (`{holder}`) already uses that lookup key.",
                                      param="lookup_key", code="lookup_key_already_exists")
                self.prices[holder]["lookup_key"] = None
            if price["lookup_key"]:
                self.lookup_keys.pop(price["lookup_key"], None)
            if key:
                self.lookup_keys[key] = ident
            changes["lookup_key"] = key
        self._update(price, "price.updated", **changes)
        return price

    def list_prices(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"active", "currency", "lookup_keys", "product", "type", "recurring", "limit",
                       "starting_after", "ending_before", "created"})
        rows = list(self.prices.values())
        active = as_bool(params, "active")
        if active is not None:
            rows = [r for r in rows if r["active"] == active]
        if params.get("lookup_keys"):
            keys = as_list(params, "lookup_keys")
            if len(keys) > 10:
                raise invalid("lookup_keys", "You can pass at most 10 lookup keys.", "parameter_invalid_array")
            rows = [r for r in rows if r["lookup_key"] in keys]
        for name in ("product", "type", "currency"):
            if params.get(name):
                rows = [r for r in rows if r[name] == params[name]]
        return self.page("/v1/prices", rows, params)

    # ---- billing meters and meter events ----------------------------------------------

    def create_meter(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"default_aggregation", "display_name", "event_name", "customer_mapping",
                       "event_time_window", "value_settings"})
        for name in ("display_name", "event_name"):
            if not params.get(name):
                raise missing(name)
        formula = as_dict(params, "default_aggregation").get("formula")
        if not formula:
            raise missing("default_aggregation[formula]")
        if formula not in ("sum", "count", "last"):
            raise invalid("default_aggregation[formula]", "Invalid default_aggregation[formula]",
                          "parameter_invalid_string")
        if any(m["event_name"] == params["event_name"] and m["status"] == "active" for m in self.meters.values()):
            raise StripeError(400, f"An active meter with event_name `{params['event_name']}` already exists.",
                              param="event_name")
        mapping = as_dict(params, "customer_mapping")
        value = as_dict(params, "value_settings")
        now = self.now()
        meter = {
            "id": self.new_id("mtr_test_"), "object": "billing.meter", "created": now,
            "customer_mapping": {"event_payload_key": mapping.get("event_payload_key", "stripe_customer_id"),
                                 "type": mapping.get("type", "by_id")},
            "default_aggregation": {"formula": formula}, "display_name": params["display_name"],
            "event_name": params["event_name"], "event_time_window": params.get("event_time_window"),
            "livemode": False, "status": "active", "status_transitions": {"deactivated_at": None},
            "updated": now, "value_settings": {"event_payload_key": value.get("event_payload_key", "value")}}
        return self._keep(self.meters, meter)

    def meter(self, ident: str) -> dict[str, Any]:
        found = self.meters.get(ident)
        if found is None:
            raise no_such("billing meter", ident)
        return found

    def list_meters(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"status", "limit", "starting_after", "ending_before"})
        rows = [m for m in self.meters.values() if not params.get("status") or m["status"] == params["status"]]
        return self.page("/v1/billing/meters", rows, params)

    def create_meter_event(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"event_name", "payload", "identifier", "timestamp"})
        if not params.get("event_name"):
            raise missing("event_name")
        payload = as_dict(params, "payload")
        if not payload:
            raise missing("payload")
        now = self.now()
        timestamp = as_int(params, "timestamp")
        if timestamp is None:
            timestamp = now
        if timestamp < now - 35 * DAY or timestamp > now + 300:
            raise invalid("timestamp", "Timestamp must be within the past 35 calendar days or up to "
                          "5 minutes in the future.", "parameter_invalid_integer")
        identifier = params.get("identifier") or self.new_id("")
        if len(identifier) > 100:
            raise invalid("identifier", "identifier must be at most 100 characters.", "parameter_invalid_string")
        wall = int(time.time())
        seen = self.identifiers.get(identifier)
        if seen is not None and wall - seen < DAY:
            # what Stripe answers a replayed identifier (and says not to retry)
            raise StripeError(400, f"An event already exists with identifier {identifier}.",
                              param="identifier", headers={"Stripe-Should-Retry": "false"})
        self.identifiers[identifier] = wall
        event = {"object": "billing.meter_event", "created": now, "event_name": params["event_name"],
                 "identifier": identifier, "livemode": False,
                 "payload": {k: str(v) for k, v in payload.items()}, "timestamp": timestamp}
        self.meter_events.append(event)
        return event

    def meter_total(self, meter: dict[str, Any], customer: str, start: int, end: int) -> int:
        """What the meter aggregates for `customer` over [start, end): events that name no
        active meter or carry no whole number are dropped, as Stripe reports them as errors."""
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        values = []
        for event in self.meter_events:
            if event["event_name"] != meter["event_name"] or event["payload"].get(customer_key) != customer:
                continue
            if not start <= event["timestamp"] < end:
                continue
            raw = event["payload"].get(value_key, "")
            if not raw.lstrip("-").isdigit():
                continue
            values.append(int(raw))
        formula = meter["default_aggregation"]["formula"]
        if formula == "count":
            return len(values)
        if formula == "last":
            return values[-1] if values else 0
        return sum(values)

    def event_summaries(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"customer", "start_time", "end_time", "value_grouping_window", "limit",
                       "starting_after", "ending_before"})
        meter = self.meter(ident)
        if not params.get("customer"):
            raise missing("customer")
        start = as_int(params, "start_time", required=True)
        end = as_int(params, "end_time", required=True)
        assert start is not None and end is not None
        summary = {"id": self.new_id("mtrusg_"), "object": "billing.meter_event_summary",
                   "aggregated_value": self.meter_total(meter, params["customer"], start, end),
                   "end_time": end, "livemode": False, "meter": ident, "start_time": start}
        return list_object(f"/v1/billing/meters/{ident}/event_summaries", [summary])

    # ---- checkout and portal ----------------------------------------------------------

    def create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"mode", "line_items", "customer", "customer_email", "client_reference_id",
                       "success_url", "cancel_url", "metadata", "subscription_data", "payment_intent_data",
                       "allow_promotion_codes", "billing_address_collection", "locale", "expires_at",
                       "payment_method_types", "ui_mode", "automatic_tax", "customer_update",
                       "invoice_creation", "saved_payment_method_options", "consent_collection"})
        mode = params.get("mode")
        if not mode:
            raise missing("mode")
        if mode not in ("payment", "subscription", "setup"):
            raise invalid("mode", f"Invalid mode: must be one of payment, setup, or subscription",
                          "parameter_invalid_string")
        if not params.get("success_url") and params.get("ui_mode", "hosted") == "hosted":
            raise missing("success_url")
        customer = params.get("customer")
        if customer:
            self.customer(customer, "customer")
        if params.get("client_reference_id") and len(params["client_reference_id"]) > 200:
            raise invalid("client_reference_id", "client_reference_id must be at most 200 characters.",
                          "parameter_invalid_string")
        items = as_list(params, "line_items")
        if mode != "setup" and not items:
            raise missing("line_items")
        lines, currency, total = [], None, 0
        for i, raw in enumerate(items):
            allow(raw, {"price", "quantity", "adjustable_quantity", "price_data", "tax_rates"}, f"line_items[{i}]")
            if not raw.get("price"):
                raise missing(f"line_items[{i}][price]")
            price = self.price(raw["price"], f"line_items[{i}][price]")
            if not price["active"]:
                raise invalid(f"line_items[{i}][price]", f"The price specified is inactive. This field only "
                              "accepts active prices.", "price_inactive")
            recurring = price["recurring"]
            if mode == "payment" and recurring:
                raise invalid(f"line_items[{i}][price]", "You specified `payment` mode but passed a "
                              "recurring price. Either switch to `subscription` mode or use only one-time prices.",
                              "parameter_invalid_string")
            if mode == "subscription" and not recurring:
                continue  # a one-time price on the first invoice
            metered = bool(recurring and recurring["usage_type"] == "metered")
            quantity = as_int(raw, "quantity", minimum=1)
            if metered and quantity is not None:
                raise invalid(f"line_items[{i}][quantity]", "Quantity should not be specified where "
                              "usage_type is `metered`. Remove quantity from `line_items[0]`.",
                              "parameter_invalid_integer")
            if not metered and quantity is None:
                raise missing(f"line_items[{i}][quantity]")
            if currency and price["currency"] != currency:
                raise invalid(f"line_items[{i}][price]", "All prices must share one currency.",
                              "parameter_invalid_string")
            currency = price["currency"]
            if not metered:
                total += int(price["unit_amount"] or 0) * (quantity or 1)
            lines.append({"price": price["id"], "quantity": quantity})
        if mode == "subscription":
            intervals = {(self.prices[l["price"]]["recurring"]["interval"],
                          self.prices[l["price"]]["recurring"]["interval_count"]) for l in lines}
            if len(intervals) > 1:
                raise invalid("line_items", "Checkout does not support multiple prices with different "
                              "billing intervals.", "parameter_invalid_array")
        now = self.now()
        session_id = self.new_id("cs_test_", 58)
        session = {
            "id": session_id, "object": "checkout.session", "after_expiration": None,
            "allow_promotion_codes": as_bool(params, "allow_promotion_codes"),
            "amount_subtotal": total, "amount_total": total,
            "billing_address_collection": params.get("billing_address_collection"),
            "cancel_url": params.get("cancel_url"), "client_reference_id": params.get("client_reference_id"),
            "created": now, "currency": currency, "customer": customer, "customer_creation": None
            if customer else "if_required", "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": as_int(params, "expires_at") or now + DAY, "invoice": None, "livemode": False,
            "locale": params.get("locale"), "metadata": metadata(params), "mode": mode,
            "payment_intent": None, "payment_method_types": ["card"], "payment_status": "unpaid",
            "status": "open", "subscription": None, "success_url": params.get("success_url"),
            "ui_mode": params.get("ui_mode", "hosted"), "url": f"{self.base_url}/c/pay/{session_id}"}
        self._keep(self.sessions, session)
        # what completing the session will do, kept off the object
        session["_lines"] = lines
        session["_subscription_metadata"] = metadata(as_dict(params, "subscription_data"))
        trial = as_int(as_dict(params, "subscription_data"), "trial_period_days")
        session["_trial_days"] = trial or 0
        session["_payment_metadata"] = metadata(as_dict(params, "payment_intent_data"))
        return session

    def session(self, ident: str) -> dict[str, Any]:
        found = self.sessions.get(ident)
        if found is None:
            raise no_such("checkout.session", ident)
        return found

    def list_sessions(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"created", "customer", "customer_account", "customer_details", "ending_before", "limit",
                       "payment_intent", "payment_link", "starting_after", "status", "subscription"})
        status = params.get("status")
        if status not in (None, "", "open", "complete", "expired"):
            raise invalid("status", "Invalid status: must be one of complete, expired, or open",
                          "parameter_invalid_string")
        rows = [self.public(r) for r in self.sessions.values()]
        for name in ("customer", "payment_intent", "subscription", "status"):
            if params.get(name):
                rows = [r for r in rows if r[name] == params[name]]
        email = as_dict(params, "customer_details").get("email")
        if email:
            rows = [r for r in rows if (r["customer_details"] or {}).get("email") == email]
        rows = self._created_between(rows, params)
        return self.page("/v1/checkout/sessions", rows, params)

    def _created_between(self, rows: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
        """`created=<t>` or `created[gt|gte|lt|lte]=<t>`, as every list endpoint takes it."""
        raw = params.get("created")
        if raw in (None, ""):
            return rows
        if not isinstance(raw, dict):
            moment = as_int(params, "created")
            return [r for r in rows if r["created"] == moment]
        allow(raw, {"gt", "gte", "lt", "lte"}, "created")
        tests = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b, "lt": lambda a, b: a < b,
                 "lte": lambda a, b: a <= b}
        for op, test in tests.items():
            if op in raw:
                bound = as_int(raw, op)
                rows = [r for r in rows if test(r["created"], bound)]
        return rows

    def create_portal_session(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"customer", "return_url", "configuration", "flow_data", "locale", "on_behalf_of"})
        if not params.get("customer"):
            raise missing("customer")
        self.customer(params["customer"], "customer")
        ident = self.new_id("bps_")
        return self._keep(self.portal_sessions, {
            "id": ident, "object": "billing_portal.session",
            "configuration": params.get("configuration") or "bpc_default", "created": self.now(),
            "customer": params["customer"], "flow": None, "livemode": False, "locale": params.get("locale"),
            "on_behalf_of": None, "return_url": params.get("return_url"),
            "url": f"{self.base_url}/p/session/{self.new_id('test_', 40)}"})

    def complete_session(self, ident: str, *, trial_days: int | None = None) -> dict[str, Any]:
        """What Stripe's hosted page does when the customer pays: the session completes and the
        subscription (or payment) it describes comes into being, each with its events."""
        session = self.session(ident)
        if session["status"] != "open":
            raise StripeError(400, f"This Checkout Session is {session['status']}.", param="session")
        if session["customer"] is None:
            customer = self.create_customer({"email": session["customer_email"] or "buyer@example.com"})
            session["customer"] = customer["id"]
        customer_id = session["customer"]
        customer = self.customer(customer_id)
        session["customer_details"] = {"email": customer["email"], "name": customer["name"],
                                       "address": None, "phone": None, "tax_exempt": "none", "tax_ids": []}
        if session["mode"] == "subscription":
            trial = session["_trial_days"] if trial_days is None else trial_days
            subscription = self._create_subscription(customer_id, session["_lines"],
                                                     session["_subscription_metadata"], trial)
            session.update(status="complete", subscription=subscription["id"],
                           invoice=subscription["latest_invoice"],
                           payment_status="no_payment_required" if trial else "paid")
        else:
            intent = self._payment_intent(customer_id, session["amount_total"], session["currency"],
                                          session["_payment_metadata"], description="Checkout payment")
            self._charge(intent, succeed=True)
            session.update(status="complete", payment_intent=intent["id"], payment_status="paid")
        self.emit("checkout.session.completed", self.public(session))
        return session

    def expire_session(self, ident: str) -> dict[str, Any]:
        session = self.session(ident)
        if session["status"] != "open":
            raise StripeError(400, f"Only Checkout Sessions with a status in [\"open\"] can be expired.")
        session["status"] = "expired"
        self.emit("checkout.session.expired", self.public(session))
        return session

    @staticmethod
    def public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    # ---- subscriptions ---------------------------------------------------------------

    def _item(self, subscription_id: str, price_id: str, quantity: int | None, start: int, end: int) -> dict[str, Any]:
        price = self.prices[price_id]
        metered = price["recurring"]["usage_type"] == "metered"
        return {"id": self.new_id("si_", 14), "object": "subscription_item", "billing_thresholds": None,
                "created": self.now(), "current_period_end": end, "current_period_start": start,
                "discounts": [], "metadata": {}, "price": copy.deepcopy(price),
                "quantity": None if metered else (quantity or 1), "subscription": subscription_id,
                "tax_rates": []}

    def _create_subscription(self, customer: str, lines: list[dict[str, Any]], meta: dict[str, str],
                             trial_days: int) -> dict[str, Any]:
        now = self.now()
        ident = self.new_id("sub_")
        first = self.prices[lines[0]["price"]]["recurring"]
        trial_end = now + trial_days * DAY if trial_days else None
        end = trial_end or period_end(now, first["interval"], first["interval_count"], 1)
        subscription = {
            "id": ident, "object": "subscription", "application": None, "application_fee_percent": None,
            "automatic_tax": {"enabled": False, "liability": None}, "billing_cycle_anchor": trial_end or now,
            "billing_mode": {"type": "flexible"}, "cancel_at": None, "cancel_at_period_end": False,
            "canceled_at": None, "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically", "created": now, "currency":
            self.prices[lines[0]["price"]]["currency"], "customer": customer, "days_until_due": None,
            "default_payment_method": None, "description": None, "discounts": [], "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": list_object(f"/v1/subscription_items?subscription={ident}",
                                 [self._item(ident, l["price"], l["quantity"], now, end) for l in lines]),
            "latest_invoice": None, "livemode": False, "metadata": dict(meta),
            "next_pending_invoice_item_invoice": None, "pause_collection": None, "pending_setup_intent": None,
            "pending_update": None, "schedule": None, "start_date": now,
            "status": "trialing" if trial_days else "active", "trial_end": trial_end,
            "trial_start": now if trial_days else None}
        subscription["items"]["total_count"] = len(lines)
        self._keep(self.subscriptions, subscription)
        self.cycles[ident] = 1
        self.emit("customer.subscription.created", subscription)
        invoice = self._invoice(subscription, "subscription_create",
                                self._licensed_lines(subscription, now, end, trial=bool(trial_days)), now, end)
        self._pay(invoice, checkout=True)
        return subscription

    def subscription(self, ident: str) -> dict[str, Any]:
        found = self.subscriptions.get(ident)
        if found is None:
            raise no_such("subscription", ident)
        return found

    def list_subscriptions(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"customer", "price", "status", "limit", "starting_after", "ending_before", "created"})
        rows = list(self.subscriptions.values())
        if params.get("customer"):
            rows = [r for r in rows if r["customer"] == params["customer"]]
        status = params.get("status")
        if status and status != "all":
            rows = [r for r in rows if r["status"] == status]
        elif not status:
            rows = [r for r in rows if r["status"] != "canceled"]
        return self.page("/v1/subscriptions", rows, params)

    def update_subscription(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"items", "proration_behavior", "cancel_at_period_end", "metadata", "cancel_at",
                       "payment_behavior", "default_payment_method", "proration_date", "description",
                       "cancellation_details", "trial_end"})
        subscription = self.subscription(ident)
        if subscription["status"] in ("canceled", "incomplete_expired"):
            raise StripeError(400, "A canceled subscription can only update its cancellation_details "
                              "and metadata.", param="items" if "items" in params else None)
        proration = params.get("proration_behavior", "create_prorations")
        if proration not in ("create_prorations", "none", "always_invoice"):
            raise invalid("proration_behavior", "Invalid proration_behavior", "parameter_invalid_string")
        changes: dict[str, Any] = {}
        previous_price = None
        if "items" in params:
            data = copy.deepcopy(subscription["items"]["data"])
            for i, raw in enumerate(as_list(params, "items")):
                allow(raw, {"id", "price", "quantity", "deleted", "metadata", "clear_usage"}, f"items[{i}]")
                if raw.get("id"):
                    matches = [item for item in data if item["id"] == raw["id"]]
                    if not matches:
                        raise no_such("subscription_item", raw["id"], f"items[{i}][id]")
                    item = matches[0]
                    if as_bool(raw, "deleted"):
                        data.remove(item)
                        continue
                    if raw.get("price") and raw["price"] != item["price"]["id"]:
                        new = self.price(raw["price"], f"items[{i}][price]")
                        if item["price"]["recurring"]["usage_type"] == "licensed":
                            previous_price = item["price"]  # what is prorated: the licensed fee
                        item["price"] = copy.deepcopy(new)
                    if raw.get("quantity"):
                        item["quantity"] = as_int(raw, "quantity", minimum=1)
                else:
                    if not raw.get("price"):
                        raise missing(f"items[{i}][price]")
                    self.price(raw["price"], f"items[{i}][price]")
                    current = data[0]
                    data.append(self._item(ident, raw["price"], as_int(raw, "quantity"),
                                           current["current_period_start"], current["current_period_end"]))
            items = dict(subscription["items"], data=data, total_count=len(data))
            changes["items"] = items
            if previous_price is not None and self._new_interval(previous_price, data):
                # a change of billing period starts a new one now (the anchor is reset), invoiced
                # at once: see _new_period
                now = self.now()
                licensed = next(i for i in data if i["price"]["recurring"]["usage_type"] == "licensed")
                ended = (licensed["current_period_start"], licensed["current_period_end"])
                recurring = licensed["price"]["recurring"]
                new_end = period_end(now, recurring["interval"], recurring["interval_count"], 1)
                for item in data:
                    item["current_period_start"], item["current_period_end"] = now, new_end
                changes["billing_cycle_anchor"] = now
        if "cancel_at_period_end" in params:
            changes["cancel_at_period_end"] = bool(as_bool(params, "cancel_at_period_end"))
            changes["cancel_at"] = subscription["items"]["data"][0]["current_period_end"] \
                if changes["cancel_at_period_end"] else None
            changes["canceled_at"] = self.now() if changes["cancel_at_period_end"] else None
        if "cancel_at" in params:
            changes["cancel_at"] = as_int(params, "cancel_at") if params["cancel_at"] != "" else None
        if "metadata" in params:
            changes["metadata"] = metadata(params, subscription["metadata"])
        self._update(subscription, "customer.subscription.updated", **changes)
        if previous_price is not None and "billing_cycle_anchor" in changes:
            self._new_period(subscription, previous_price, proration, *ended)
        elif previous_price is not None:
            self._prorate(subscription, previous_price, proration)
        return subscription

    @staticmethod
    def _new_interval(old_price: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        """Whether the licensed price now bills over another interval than `old_price` did."""
        new = next(i["price"]["recurring"] for i in items if i["price"]["recurring"]["usage_type"] == "licensed")
        old = old_price["recurring"]
        return (old["interval"], old["interval_count"]) != (new["interval"], new["interval_count"])

    def _new_period(self, subscription: dict[str, Any], old_price: dict[str, Any], behaviour: str,
                    start: int, end: int) -> None:
        """Stripe, for a change of billing period (month -> year): "updating a subscription generates
        a new invoice when ... the billing period changes"; the billing cycle anchor is reset to the
        change (done by the update) and the new period is invoiced at once, billing_reason
        subscription_update: its full price (not a proration), less a proration credit for the old
        price's unused time (none with proration_behavior=none), with the usage of the period it
        cut short (metered, in arrears) and any pending prorations. With the default
        payment_behavior (allow_incomplete) the update stands whatever the payment: a declined card
        leaves the subscription past_due."""
        ident = subscription["id"]
        now = self.now()
        item = next(i for i in subscription["items"]["data"] if i["price"]["recurring"]["usage_type"] == "licensed")
        new_end = item["current_period_end"]
        self.cycles[ident] = 1
        lines = []
        if behaviour != "none" and end > start:
            remaining = Decimal(max(0, end - now)) / Decimal(end - start)
            credit = int((Decimal(old_price["unit_amount"] or 0) * remaining).quantize(Decimal(1), ROUND_HALF_UP))
            lines.append(self._line(old_price, -credit, 1, now, end, f"Unused time on {old_price['id']}",
                                    proration=True, subscription=ident, item=item["id"]))
        lines += self._licensed_lines(subscription, now, new_end)
        lines += self._metered_lines(subscription, start, now)
        lines += self.pending_items.pop(ident, [])
        self._pay(self._invoice(subscription, "subscription_update", lines, now, new_end))

    def _licensed_price(self, subscription: dict[str, Any]) -> dict[str, Any]:
        return next(i["price"] for i in subscription["items"]["data"]
                    if i["price"]["recurring"]["usage_type"] == "licensed")

    def _prorate(self, subscription: dict[str, Any], old_price: dict[str, Any], behaviour: str) -> None:
        if behaviour == "none":
            return
        new_price = self._licensed_price(subscription)
        item = next(i for i in subscription["items"]["data"] if i["price"]["recurring"]["usage_type"] == "licensed")
        start, end, now = item["current_period_start"], item["current_period_end"], self.now()
        if end <= start:
            return
        remaining = Decimal(max(0, end - now)) / Decimal(end - start)
        lines = []
        for price, sign, text in ((old_price, -1, "Unused time on"), (new_price, 1, "Remaining time on")):
            amount = int((Decimal(price["unit_amount"] or 0) * remaining).quantize(Decimal(1), ROUND_HALF_UP))
            lines.append(self._line(price, sign * amount, 1, now, end, f"{text} {price['id']}", proration=True,
                                    subscription=subscription["id"], item=item["id"]))
        if behaviour == "always_invoice":
            # the invoice made at once sweeps up the subscription's pending prorations too
            lines = self.pending_items.pop(subscription["id"], []) + lines
            invoice = self._invoice(subscription, "subscription_update", lines, now, end)
            self._pay(invoice)
        else:
            self.pending_items.setdefault(subscription["id"], []).extend(lines)

    def cancel_subscription(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"invoice_now", "prorate", "cancellation_details"})
        subscription = self.subscription(ident)
        if subscription["status"] == "canceled":
            raise StripeError(404, f"No such subscription: '{ident}'", param="id", code="resource_missing")
        details = as_dict(params, "cancellation_details")
        allow(details, {"comment", "feedback"}, "cancellation_details")
        if details.get("feedback") not in (None, "", "customer_service", "low_quality", "missing_features", "other",
                                           "switched_service", "too_complex", "too_expensive", "unused"):
            raise invalid("cancellation_details[feedback]", "Invalid cancellation_details[feedback]",
                          "parameter_invalid_string")
        # (prorate and invoice_now are accepted and not modelled: a credit for unused time and a
        # final invoice; Codeplan refunds through /v1/refunds instead)
        self._cancel(subscription, reason="cancellation_requested",
                     comment=details.get("comment") or None, feedback=details.get("feedback") or None)
        return subscription

    def _cancel(self, subscription: dict[str, Any], reason: str, comment: str | None = None,
                feedback: str | None = None) -> None:
        now = self.now()
        details = dict(subscription["cancellation_details"], reason=reason)
        if comment is not None:
            details["comment"] = comment
        if feedback is not None:
            details["feedback"] = feedback
        subscription.update(status="canceled", ended_at=now, canceled_at=subscription["canceled_at"] or now,
                            cancellation_details=details)
        self.scheduled_price.pop(subscription["id"], None)
        for invoice in self.invoices.values():  # Stripe stops retrying a canceled subscription's invoices
            if invoice["parent"]["subscription_details"]["subscription"] == subscription["id"]:
                invoice["next_payment_attempt"] = None
        self.emit("customer.subscription.deleted", subscription)

    def schedule_price(self, ident: str, price: str) -> dict[str, Any]:
        """What the Customer Portal does for a downgrade configured to happen at period end."""
        subscription = self.subscription(ident)
        self.price(price, "price")
        self.scheduled_price[ident] = price
        self._update(subscription, "customer.subscription.updated", schedule=self.new_id("sub_sched_"))
        return subscription

    # ---- invoices and payments ----------------------------------------------------------

    def _line(self, price: dict[str, Any], amount: int, quantity: int | None, start: int, end: int,
              description: str, proration: bool = False, subscription: str | None = None,
              item: str | None = None) -> dict[str, Any]:
        """A line as 2025-03-31.basil and later shape it: what generated it is its `parent` (a
        subscription item; for a proration, the invoice item Stripe made for the item's change),
        where its `proration` flag lives (no longer on the line itself)."""
        return {"id": self.new_id("il_"), "object": "line_item", "amount": amount,
                "currency": price["currency"], "description": description, "discount_amounts": [],
                "discountable": not proration, "discounts": [], "livemode": False, "metadata": {},
                "parent": {"invoice_item_details": None, "subscription_item_details": {
                    "invoice_item": self.new_id("ii_") if proration else None, "proration": proration,
                    "proration_details": {"credited_items": None}, "subscription": subscription,
                    "subscription_item": item}, "type": "subscription_item_details"},
                "period": {"end": end, "start": start},
                "pricing": {"price_details": {"price": price["id"], "product": price["product"]},
                            "type": "price_details", "unit_amount_decimal": price["unit_amount_decimal"]},
                "quantity": quantity}

    def _licensed_lines(self, subscription: dict[str, Any], start: int, end: int,
                        trial: bool = False) -> list[dict[str, Any]]:
        lines = []
        for item in subscription["items"]["data"]:
            price = item["price"]
            if price["recurring"]["usage_type"] != "licensed":
                continue
            amount = 0 if trial else int(price["unit_amount"] or 0) * (item["quantity"] or 1)
            label = "Trial period for" if trial else f"{item['quantity'] or 1} ×"
            lines.append(self._line(price, amount, item["quantity"], start, end,
                                    f"{label} {self.products[price['product']]['name']}",
                                    subscription=subscription["id"], item=item["id"]))
        return lines

    def _metered_lines(self, subscription: dict[str, Any], start: int, end: int) -> list[dict[str, Any]]:
        """Usage in arrears: what the item's meter summed for this customer over the period."""
        lines = []
        for item in subscription["items"]["data"]:
            price = item["price"]
            meter_id = price["recurring"]["meter"]
            if price["recurring"]["usage_type"] != "metered" or meter_id not in self.meters:
                continue
            used = self.meter_total(self.meters[meter_id], subscription["customer"], start, end)
            amount = int((Decimal(used) * Decimal(price["unit_amount_decimal"])).quantize(
                Decimal(1), ROUND_HALF_UP))
            lines.append(self._line(price, amount, used, start, end,
                                    f"{used} × {self.products[price['product']]['name']} (usage)",
                                    subscription=subscription["id"], item=item["id"]))
        return lines

    def _invoice(self, subscription: dict[str, Any], reason: str, lines: list[dict[str, Any]],
                 start: int, end: int) -> dict[str, Any]:
        now = self.now()
        customer = self.customers[subscription["customer"]]
        total = sum(line["amount"] for line in lines)
        credit = min(-customer["balance"], max(total, 0)) if customer["balance"] < 0 else 0
        if total < 0:  # a net credit goes to the customer's balance
            customer["balance"] += total
        customer["balance"] += credit
        due = max(total, 0) - credit
        ident = self.new_id("in_")
        customer["next_invoice_sequence"] += 1
        invoice = {
            "id": ident, "object": "invoice", "account_country": "US", "account_name": "Codeplan (fake)",
            "amount_due": due, "amount_overpaid": 0, "amount_paid": 0, "amount_remaining": due,
            "amount_shipping": 0, "attempt_count": 0, "attempted": False, "auto_advance": True,
            "billing_reason": reason, "collection_method": "charge_automatically", "created": now,
            "currency": subscription["currency"], "customer": subscription["customer"],
            "customer_email": customer["email"], "customer_name": customer["name"],
            "default_payment_method": None, "description": None, "discounts": [], "due_date": None,
            "effective_at": now, "ending_balance": customer["balance"],
            "hosted_invoice_url": f"{self.base_url}/i/{ident}", "invoice_pdf": f"{self.base_url}/i/{ident}/pdf",
            "issuer": {"type": "self"}, "last_finalization_error": None,
            # the invoice carries "the first handful" of its lines (a list's default page, 10), the
            # rest are read from /v1/invoices/{id}/lines (list_invoice_lines)
            "lines": dict(list_object(f"/v1/invoices/{ident}/lines", lines[:self.INVOICE_LINES],
                                      has_more=len(lines) > self.INVOICE_LINES), total_count=len(lines)),
            "_lines": lines,
            "livemode": False, "metadata": {}, "next_payment_attempt": None,
            "number": f"{customer['invoice_prefix']}-{customer['next_invoice_sequence'] - 1:04d}",
            "parent": {"quote_details": None, "subscription_details": {
                "metadata": dict(subscription["metadata"]), "subscription": subscription["id"]},
                "type": "subscription_details"},
            "payments": list_object(f"/v1/invoice_payments?invoice={ident}", []),
            "period_end": end, "period_start": start, "starting_balance": 0, "status": "open",
            "status_transitions": {"finalized_at": now, "marked_uncollectible_at": None, "paid_at": None,
                                   "voided_at": None},
            "subtotal": total, "total": total, "webhooks_delivered_at": now}
        self._keep(self.invoices, invoice)
        subscription["latest_invoice"] = ident
        self.emit("invoice.created", invoice)
        self.emit("invoice.finalized", invoice)
        return invoice

    INVOICE_LINES = 10

    def list_invoice_lines(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        """GET /v1/invoices/{id}/lines: every line of the invoice, in its order, a page at a time."""
        allow(params, {"limit", "starting_after", "ending_before"})
        rows = self.invoice(ident)["_lines"]
        limit = as_int(params, "limit") or 10
        if not 1 <= limit <= 100:
            raise invalid("limit", "This value must be between 1 and 100.", "parameter_invalid_integer")
        ids = [r["id"] for r in rows]
        for cursor in ("starting_after", "ending_before"):
            if params.get(cursor) and params[cursor] not in ids:
                raise no_such("line_item", params[cursor], cursor)
        if params.get("starting_after"):
            rows = rows[ids.index(params["starting_after"]) + 1:]
        elif params.get("ending_before"):
            rows = rows[:ids.index(params["ending_before"])]
            return list_object(f"/v1/invoices/{ident}/lines", rows[-limit:], has_more=len(rows) > limit)
        return list_object(f"/v1/invoices/{ident}/lines", rows[:limit], has_more=len(rows) > limit)

    def _payment_intent(self, customer: str, amount: int, currency: str, meta: dict[str, str],
                        description: str) -> dict[str, Any]:
        return self._keep(self.payment_intents, {
            "id": self.new_id("pi_"), "object": "payment_intent", "amount": amount, "amount_received": 0,
            "capture_method": "automatic", "created": self.now(), "currency": currency, "customer": customer,
            "description": description, "last_payment_error": None, "latest_charge": None,
            "livemode": False, "metadata": dict(meta), "payment_method": self.new_id("pm_"),
            "payment_method_types": ["card"], "status": "requires_payment_method"})

    def _charge(self, intent: dict[str, Any], *, succeed: bool) -> dict[str, Any]:
        ident = self.new_id("ch_")
        charge = self._keep(self.charges, {
            "id": ident, "object": "charge", "amount": intent["amount"],
            "amount_captured": intent["amount"] if succeed else 0, "amount_refunded": 0,
            "balance_transaction": self.new_id("txn_") if succeed else None,
            "billing_details": {"address": None, "email": None, "name": None, "phone": None},
            "captured": succeed, "created": self.now(), "currency": intent["currency"],
            "customer": intent["customer"], "description": intent["description"], "disputed": False,
            "failure_code": None if succeed else "card_declined",
            "failure_message": None if succeed else "Your card was declined.", "livemode": False,
            "metadata": dict(intent["metadata"]),
            "outcome": {"network_status": "approved_by_network" if succeed else "declined_by_network",
                        "reason": None if succeed else "generic_decline", "risk_level": "normal",
                        "seller_message": "Payment complete." if succeed else "The bank did not return any "
                        "further details with this decline.", "type": "authorized" if succeed else "issuer_declined"},
            "paid": succeed, "payment_intent": intent["id"], "payment_method": intent["payment_method"],
            "receipt_url": f"{self.base_url}/r/{ident}", "refunded": False,
            "refunds": list_object(f"/v1/charges/{ident}/refunds", []),
            "status": "succeeded" if succeed else "failed"})
        intent["latest_charge"] = ident
        if succeed:
            intent.update(status="succeeded", amount_received=intent["amount"], last_payment_error=None)
            self.emit("charge.succeeded", charge)
            self.emit("payment_intent.succeeded", intent)
        else:
            intent.update(status="requires_payment_method", last_payment_error={
                "code": "card_declined", "decline_code": "generic_decline", "message": "Your card was declined.",
                "type": "card_error"})
            self.emit("charge.failed", charge)
            self.emit("payment_intent.payment_failed", intent)
        return charge

    def _pay(self, invoice: dict[str, Any], *, checkout: bool = False, automatic: bool = True) -> str:
        """One payment attempt on an open invoice with the customer's payment method.
        Returns ok | decline | requires_action."""
        subscription = self.subscriptions[invoice["parent"]["subscription_details"]["subscription"]]
        if invoice["amount_due"] == 0:
            self._mark_paid(invoice, subscription)
            return "ok"
        behaviour = "ok" if checkout else self.payment_behavior.get(invoice["customer"], "ok")
        invoice["attempted"] = True
        invoice["attempt_count"] += 1
        intent_id = invoice.get("_payment_intent")
        intent = self.payment_intents.get(intent_id) if intent_id else None
        if intent is None:
            intent = self._payment_intent(invoice["customer"], invoice["amount_due"], invoice["currency"], {},
                                          f"Subscription {invoice['billing_reason'].replace('_', ' ')}")
            invoice["_payment_intent"] = intent["id"]
            invoice["payments"]["data"].append({
                "id": self.new_id("inpay_"), "object": "invoice_payment", "amount_paid": None,
                "amount_requested": invoice["amount_due"], "created": self.now(), "currency": invoice["currency"],
                "invoice": invoice["id"], "is_default": True, "livemode": False,
                "payment": {"payment_intent": intent["id"], "type": "payment_intent"}, "status": "open"})
        if behaviour == "ok":
            self._charge(intent, succeed=True)
            self._mark_paid(invoice, subscription)
            return "ok"
        if behaviour == "requires_action":
            intent["status"] = "requires_action"
            invoice["next_payment_attempt"] = None
            self.emit("invoice.payment_action_required", self.public(invoice))
            self._fall_behind(subscription, final=False)
            return "requires_action"
        self._charge(intent, succeed=False)
        final = False
        if automatic:  # a customer's own attempt leaves Stripe's retry schedule alone
            attempts = invoice["_automatic_attempts"] = invoice.get("_automatic_attempts", 0) + 1
            final = attempts > len(self.retry_delays)
            invoice["next_payment_attempt"] = None if final else self.now() + self.retry_delays[attempts - 1]
        self.emit("invoice.payment_failed", self.public(invoice))
        self._fall_behind(subscription, final=final)
        return "decline"

    def _mark_paid(self, invoice: dict[str, Any], subscription: dict[str, Any]) -> None:
        now = self.now()
        invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0,
                       next_payment_attempt=None,
                       status_transitions=dict(invoice["status_transitions"], paid_at=now))
        for payment in invoice["payments"]["data"]:
            payment.update(status="paid", amount_paid=invoice["amount_due"])
        self.emit("invoice.paid", self.public(invoice))
        self.emit("invoice.payment_succeeded", self.public(invoice))
        if subscription["status"] in ("past_due", "unpaid", "incomplete") and subscription["latest_invoice"] == invoice["id"]:
            self._update(subscription, "customer.subscription.updated", status="active")

    def _fall_behind(self, subscription: dict[str, Any], final: bool) -> None:
        """After a failed attempt: past_due; after the last retry, what the settings say."""
        if subscription["status"] in ("active", "trialing"):
            self._update(subscription, "customer.subscription.updated", status="past_due")
        if final:
            if self.after_retries == "canceled":
                self._cancel(subscription, reason="payment_failed")
            elif self.after_retries == "unpaid":
                self._update(subscription, "customer.subscription.updated", status="unpaid")

    def invoice(self, ident: str) -> dict[str, Any]:
        found = self.invoices.get(ident)
        if found is None:
            raise no_such("invoice", ident)
        return found

    def list_invoices(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"customer", "subscription", "status", "limit", "starting_after", "ending_before", "created"})
        rows = list(self.invoices.values())
        if params.get("customer"):
            rows = [r for r in rows if r["customer"] == params["customer"]]
        if params.get("subscription"):
            rows = [r for r in rows if r["parent"]["subscription_details"]["subscription"] == params["subscription"]]
        if params.get("status"):
            rows = [r for r in rows if r["status"] == params["status"]]
        return self.page("/v1/invoices", [self.public(r) for r in rows], params)

    def pay_invoice(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"payment_method", "off_session", "paid_out_of_band", "forgive", "source", "mandate"})
        invoice = self.invoice(ident)
        if invoice["status"] == "paid":
            raise StripeError(400, "Invoice is already paid")
        if invoice["status"] != "open":
            raise StripeError(400, f"You cannot pay an invoice with status {invoice['status']}.")
        outcome = self._pay(invoice, automatic=False)
        if outcome == "decline":
            raise StripeError(402, "Your card was declined.", type="card_error", code="card_declined",
                              extra={"decline_code": "generic_decline"})
        if outcome == "requires_action":
            raise StripeError(402, "This payment requires additional user action before it can be "
                              "completed successfully.", type="card_error", code="authentication_required")
        return invoice

    def void_invoice(self, ident: str, params: dict[str, Any]) -> dict[str, Any]:
        """Marks a finalized invoice void, for good: only an open or uncollectible one. It can no
        longer be paid; its payment is canceled; invoice.voided."""
        allow(params, ())
        invoice = self.invoice(ident)
        if invoice["status"] not in ("open", "uncollectible"):
            raise StripeError(400, f"You can only void an open or uncollectible invoice; this invoice is "
                              f"{invoice['status']}.")
        now = self.now()
        invoice.update(status="void", next_payment_attempt=None,
                       status_transitions=dict(invoice["status_transitions"], voided_at=now))
        intent = self.payment_intents.get(invoice.get("_payment_intent") or "")
        if intent is not None and intent["status"] != "succeeded":
            intent.update(status="canceled", canceled_at=now, cancellation_reason="void_invoice")
        for payment in invoice["payments"]["data"]:
            if payment["status"] == "open":
                payment["status"] = "canceled"
        self.emit("invoice.voided", self.public(invoice))
        return invoice

    def _invoice_payments(self) -> list[dict[str, Any]]:
        return [payment for invoice in self.invoices.values() for payment in invoice["payments"]["data"]]

    def list_invoice_payments(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"created", "ending_before", "invoice", "limit", "payment", "starting_after", "status"})
        rows = self._invoice_payments()
        if params.get("invoice"):
            if params["invoice"] not in self.invoices:
                raise no_such("invoice", params["invoice"], "invoice")
            rows = [r for r in rows if r["invoice"] == params["invoice"]]
        status = params.get("status")
        if status:
            if status not in ("canceled", "open", "paid"):
                raise invalid("status", "Invalid status: must be one of canceled, open, or paid",
                              "parameter_invalid_string")
            rows = [r for r in rows if r["status"] == status]
        payment = as_dict(params, "payment")
        if payment:
            allow(payment, {"type", "payment_intent", "payment_record"}, "payment")
            if payment.get("type") != "payment_intent":
                raise missing("payment[type]") if not payment.get("type") else invalid(
                    "payment[type]", "Invalid payment[type]: must be one of payment_intent or payment_record",
                    "parameter_invalid_string")
            if payment.get("payment_intent"):
                rows = [r for r in rows if r["payment"].get("payment_intent") == payment["payment_intent"]]
        rows = self._created_between(rows, params)
        return self.page("/v1/invoice_payments", [copy.deepcopy(r) for r in rows], params)

    def invoice_payment(self, ident: str) -> dict[str, Any]:
        for payment in self._invoice_payments():
            if payment["id"] == ident:
                return payment
        raise no_such("invoice_payment", ident)

    def payment_intent(self, ident: str) -> dict[str, Any]:
        found = self.payment_intents.get(ident)
        if found is None:
            raise no_such("payment_intent", ident)
        return found

    def charge(self, ident: str, param: str | None = None) -> dict[str, Any]:
        found = self.charges.get(ident)
        if found is None:
            raise no_such("charge", ident, param)
        return found

    def create_refund(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"charge", "payment_intent", "amount", "reason", "metadata", "instructions_email"})
        if params.get("charge"):
            charge = self.charge(params["charge"], "charge")
        elif params.get("payment_intent"):
            intent = self.payment_intent(params["payment_intent"])
            if not intent["latest_charge"]:
                raise StripeError(400, "This PaymentIntent has no successful charge to refund.",
                                  param="payment_intent")
            charge = self.charges[intent["latest_charge"]]
        else:
            raise missing("charge")
        if charge["status"] != "succeeded":
            raise StripeError(400, f"Charge {charge['id']} has not succeeded; it cannot be refunded.",
                              param="charge")
        left = charge["amount"] - charge["amount_refunded"]
        amount = as_int(params, "amount", minimum=1)
        amount = left if amount is None else amount
        if left == 0:
            raise StripeError(400, f"Charge {charge['id']} has already been refunded.",
                              param="charge", code="charge_already_refunded")
        if amount > left:
            raise StripeError(400, f"Refund amount ({amount}) is greater than unrefunded amount on "
                              f"charge ({left})", param="amount", code="amount_too_large")
        if params.get("reason") not in (None, "duplicate", "fraudulent", "requested_by_customer"):
            raise invalid("reason", "Invalid reason", "parameter_invalid_string")
        refund = self._keep(self.refunds, {
            "id": self.new_id("re_"), "object": "refund", "amount": amount,
            "balance_transaction": self.new_id("txn_"), "charge": charge["id"], "created": self.now(),
            "currency": charge["currency"], "metadata": metadata(params),
            "payment_intent": charge["payment_intent"], "reason": params.get("reason"), "receipt_number": None,
            "source_transfer_reversal": None, "status": "succeeded", "transfer_reversal": None})
        previous = {"amount_refunded": charge["amount_refunded"], "refunded": charge["refunded"]}
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        charge["refunds"]["data"].insert(0, copy.deepcopy(refund))
        self.emit("refund.created", refund)
        self.emit("charge.refunded", charge, previous)
        return refund

    def refund(self, ident: str) -> dict[str, Any]:
        found = self.refunds.get(ident)
        if found is None:
            raise no_such("refund", ident)
        return found

    # ---- disputes (a cardholder's bank takes a payment back) ----------------------------------

    DISPUTE_WITHDRAWS = ("needs_response", "under_review", "lost")

    def open_dispute(self, charge_id: str, status: str = "needs_response") -> dict[str, Any]:
        """What Stripe does when a bank disputes a charge: a Dispute, `charge.disputed`, and for a
        chargeback (not an inquiry, `warning_*`) the funds withdrawn at once."""
        charge = self.charge(charge_id)
        dispute = self._keep(self.disputes, {
            "id": self.new_id("du_"), "object": "dispute", "amount": charge["amount"] - charge["amount_refunded"],
            "balance_transactions": [], "charge": charge["id"], "created": self.now(), "currency": charge["currency"],
            "evidence_details": {"due_by": self.now() + 7 * 86400, "has_evidence": False, "past_due": False,
                                 "submission_count": 0},
            "is_charge_refundable": False, "livemode": False, "metadata": {},
            "payment_intent": charge["payment_intent"], "reason": "fraudulent", "status": status})
        charge["disputed"] = True
        self.emit("charge.dispute.created", dispute)
        if status in self.DISPUTE_WITHDRAWS:
            dispute["balance_transactions"].append(self.new_id("txn_"))
            self.emit("charge.dispute.funds_withdrawn", dispute)
        return dispute

    def close_dispute(self, ident: str, status: str) -> dict[str, Any]:
        """The bank's decision: `won` reinstates the funds, `lost` keeps them withdrawn."""
        dispute = self.dispute(ident)
        if status not in ("won", "lost", "warning_closed"):
            raise ValueError("a dispute closes as won, lost or warning_closed")
        previous = {"status": dispute["status"]}
        dispute["status"] = status
        self.emit("charge.dispute.closed", dispute, previous)
        if status == "won" and dispute["balance_transactions"]:
            dispute["balance_transactions"].append(self.new_id("txn_"))
            self.emit("charge.dispute.funds_reinstated", dispute)
        return dispute

    def dispute(self, ident: str) -> dict[str, Any]:
        found = self.disputes.get(ident)
        if found is None:
            raise no_such("dispute", ident)
        return found

    def list_disputes(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"charge", "payment_intent", "limit", "starting_after", "ending_before", "created"})
        rows = list(self.disputes.values())
        for field in ("charge", "payment_intent"):
            if params.get(field):
                rows = [r for r in rows if r[field] == params[field]]
        return self.page("/v1/disputes", rows, params)

    # ---- events ----------------------------------------------------------------------

    def event(self, ident: str) -> dict[str, Any]:
        for event in self.events:
            if event["id"] == ident:
                return event
        raise no_such("event", ident)

    def list_events(self, params: dict[str, Any]) -> dict[str, Any]:
        allow(params, {"type", "types", "created", "limit", "starting_after", "ending_before",
                       "delivery_success"})
        rows = self.events
        created = params.get("created")
        if isinstance(created, dict):  # created[gte]=... and the like
            bounds = {"gte": int.__ge__, "gt": int.__gt__, "lte": int.__le__, "lt": int.__lt__}
            for op, value in created.items():
                if op not in bounds:
                    raise invalid(f"created[{op}]", "Received unknown parameter", "parameter_unknown")
                rows = [e for e in rows if bounds[op](e["created"], int(value))]
        elif created is not None:
            rows = [e for e in rows if e["created"] == int(created)]
        if params.get("type"):
            wanted = params["type"]
            rows = [e for e in rows if e["type"] == wanted or (wanted.endswith("*") and e["type"].startswith(wanted[:-1]))]
        return self.page("/v1/events", rows, params)

    # ---- the clock ---------------------------------------------------------------------

    def advance(self, seconds: int) -> None:
        """Move the account's clock and run everything that falls due, in time order."""
        target = self.now() + seconds
        for _ in range(100_000):
            due = self._next_due()
            if due is None or due > target:
                break
            self.offset += max(0, due - self.now())
            self._run_due()
        self.offset += max(0, target - self.now())

    def _next_due(self) -> int | None:
        moments = []
        for sub in self.subscriptions.values():
            if sub["status"] in ("canceled", "incomplete_expired"):
                continue
            moments.append(sub["items"]["data"][0]["current_period_end"])
            if sub["cancel_at"]:
                moments.append(sub["cancel_at"])
        for invoice in self.invoices.values():
            if invoice["status"] == "open" and invoice["next_payment_attempt"]:
                moments.append(invoice["next_payment_attempt"])
        return min(moments) if moments else None

    def _run_due(self) -> None:
        now = self.now()
        for invoice in list(self.invoices.values()):
            if invoice["status"] == "open" and invoice["next_payment_attempt"] and invoice["next_payment_attempt"] <= now:
                subscription = self.subscriptions[invoice["parent"]["subscription_details"]["subscription"]]
                if subscription["status"] not in ("canceled",):
                    self._pay(invoice)
        for subscription in list(self.subscriptions.values()):
            if subscription["status"] in ("canceled", "incomplete_expired"):
                continue
            end = subscription["items"]["data"][0]["current_period_end"]
            if subscription["cancel_at"] and subscription["cancel_at"] <= now:
                self._cancel(subscription, reason="cancellation_requested")
                continue
            if end <= now:
                self._renew(subscription)

    def _renew(self, subscription: dict[str, Any]) -> None:
        ident = subscription["id"]
        old = subscription["items"]["data"][0]
        start, end = old["current_period_start"], old["current_period_end"]
        usage = self._metered_lines(subscription, start, end)
        changes: dict[str, Any] = {}
        items = copy.deepcopy(subscription["items"])
        scheduled = self.scheduled_price.pop(ident, None)
        if scheduled:
            for item in items["data"]:
                if item["price"]["recurring"]["usage_type"] == "licensed":
                    item["price"] = copy.deepcopy(self.prices[scheduled])
            changes["schedule"] = None
        recurring = next(i["price"]["recurring"] for i in items["data"]
                         if i["price"]["recurring"]["usage_type"] == "licensed")
        if subscription["status"] == "trialing":
            self.cycles[ident] = 1
            subscription["billing_cycle_anchor"] = end
            new_end = period_end(end, recurring["interval"], recurring["interval_count"], 1)
            changes["status"] = "active"
        else:
            self.cycles[ident] = self.cycles.get(ident, 1) + 1
            new_end = period_end(subscription["billing_cycle_anchor"], recurring["interval"],
                                 recurring["interval_count"], self.cycles[ident])
        for item in items["data"]:
            item["current_period_start"], item["current_period_end"] = end, new_end
        changes["items"] = items
        if subscription["status"] == "unpaid":
            # Stripe keeps creating invoices for an unpaid subscription but does not attempt them
            subscription.update(items=items)
            return
        self._update(subscription, "customer.subscription.updated", **changes)
        lines = self._licensed_lines(subscription, end, new_end) + usage + self.pending_items.pop(ident, [])
        invoice = self._invoice(subscription, "subscription_cycle", lines, end, new_end)
        self._pay(invoice)
