"""The parts of Stripe's objects Codeplan reads, as msgspec Structs (API version pinned in
stripe_api.py). Unknown fields are ignored, so Stripe adding fields never breaks decoding."""
from __future__ import annotations

from typing import Annotated, Generic, TypeVar

import msgspec

T = TypeVar("T")


class Page(msgspec.Struct, Generic[T]):
    data: list[T]
    has_more: bool = False


class Customer(msgspec.Struct):
    id: str
    email: str | None = None
    metadata: dict[str, str] = {}
    # a customer deleted on Stripe (Dashboard, API) is still retrieved, as {id, object, deleted: true}
    deleted: bool = False


class Product(msgspec.Struct):
    id: str
    name: str
    active: bool = True
    description: str | None = None
    metadata: dict[str, str] = {}


class Recurring(msgspec.Struct):
    interval: str
    interval_count: int = 1
    usage_type: str = "licensed"
    meter: str | None = None


class Price(msgspec.Struct):
    id: str
    product: str
    currency: str
    active: bool = True
    unit_amount: int | None = None
    unit_amount_decimal: str | None = None
    lookup_key: str | None = None
    recurring: Recurring | None = None
    metadata: dict[str, str] = {}


class Meter(msgspec.Struct):
    id: str
    event_name: str
    status: str = "active"
    display_name: str = ""


class SubscriptionItem(msgspec.Struct):
    id: str
    price: Price
    current_period_start: int | None = None
    current_period_end: int | None = None
    quantity: int | None = None


class SubscriptionItems(msgspec.Struct):
    data: list[SubscriptionItem]


class Subscription(msgspec.Struct):
    id: str
    customer: str
    status: str
    items: SubscriptionItems
    created: int = 0
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    ended_at: int | None = None
    latest_invoice: str | None = None  # its id (never expanded here)
    metadata: dict[str, str] = {}

    @property
    def plan_item(self) -> SubscriptionItem | None:
        """The item carrying the plan (the licensed one; an overage item is metered)."""
        for item in self.items.data:
            if item.price.recurring is None or item.price.recurring.usage_type == "licensed":
                return item
        return None


class CheckoutSession(msgspec.Struct):
    id: str
    mode: str
    url: str | None = None
    status: str | None = None
    payment_status: str | None = None
    customer: str | None = None
    client_reference_id: str | None = None
    subscription: str | None = None
    payment_intent: str | None = None
    amount_total: int | None = None
    currency: str | None = None
    metadata: dict[str, str] = {}


class PortalSession(msgspec.Struct):
    id: str
    url: str


class SubscriptionDetails(msgspec.Struct):
    subscription: str | None = None


class InvoiceParent(msgspec.Struct):
    type: str | None = None
    subscription_details: SubscriptionDetails | None = None


class StatusTransitions(msgspec.Struct):
    paid_at: int | None = None
    voided_at: int | None = None


# a line whose period ends by its invoice's making (within an hour: Stripe's clocks and ours)
# billed a period already over; a forward period's line ends a billing interval later
_SAME_MOMENT = 3600


class LinePeriod(msgspec.Struct):
    start: int = 0
    end: int = 0


class LineSource(msgspec.Struct):
    """A line's `parent.subscription_item_details` or `parent.invoice_item_details` (since
    2025-03-31.basil the line's `proration` flag lives there)."""
    proration: bool = False


class LineParent(msgspec.Struct):
    type: str | None = None
    subscription_item_details: LineSource | None = None
    invoice_item_details: LineSource | None = None


class InvoiceLine(msgspec.Struct):
    id: str = ""
    amount: int = 0
    period: LinePeriod = msgspec.field(default_factory=LinePeriod)
    parent: LineParent | None = None

    @property
    def proration(self) -> bool:
        """Whether the line prorates a change within a period (the difference between two prices
        over the time left), rather than billing a period of a price (or its usage)."""
        if self.parent is None:
            return False
        source = self.parent.subscription_item_details or self.parent.invoice_item_details
        return source is not None and source.proration


class InvoiceLines(msgspec.Struct):
    data: list[InvoiceLine] = []
    has_more: bool = False


class Invoice(msgspec.Struct):
    id: str
    currency: str
    created: int
    customer: str | None = None
    status: str | None = None
    billing_reason: str | None = None
    amount_due: int = 0
    amount_paid: int = 0
    attempt_count: int = 0
    period_start: int | None = None
    period_end: int | None = None
    hosted_invoice_url: str | None = None
    parent: InvoiceParent | None = None
    status_transitions: StatusTransitions = msgspec.field(default_factory=StatusTransitions)
    lines: InvoiceLines | None = None

    def served_amount(self) -> int | None:
        """What the invoice bills for a period already over when it was made: usage in arrears
        (a renewal carries the last period's metered overage beside the next period's fee). None
        when its lines are not all here to tell."""
        if self.lines is None or self.lines.has_more:
            return None
        return sum(line.amount for line in self.lines.data if line.period.end <= self.created + _SAME_MOMENT)

    def prorations_only(self, lines: list[InvoiceLine] | None = None) -> bool | None:
        """Whether the invoice bills nothing but prorations: a price changed within the period
        already paid for (an upgrade's difference). An invoice that also bills a period (a change
        of billing interval or a reset anchor starts a new one at once; a renewal) is not. None
        when its lines are not all here to tell: read them with `lines` (every line of it)."""
        if lines is None:
            if self.lines is None or self.lines.has_more:
                return None
            lines = self.lines.data
        return bool(lines) and all(line.proration for line in lines)

    @property
    def subscription(self) -> str | None:
        if self.parent is None or self.parent.subscription_details is None:
            return None
        return self.parent.subscription_details.subscription


class PaymentIntent(msgspec.Struct):
    id: str
    status: str
    latest_charge: str | None = None


class PaymentRef(msgspec.Struct):
    type: str
    payment_intent: str | None = None


class InvoicePayment(msgspec.Struct):
    """One payment of an invoice (since 2025-03-31.basil an invoice names no PaymentIntent itself)."""
    id: str
    invoice: str
    status: str
    payment: PaymentRef
    amount_paid: int | None = None


class Charge(msgspec.Struct):
    id: str
    amount: int
    amount_refunded: int = 0
    refunded: bool = False
    payment_intent: str | None = None
    status: str | None = None


class Refund(msgspec.Struct):
    id: str
    charge: str | None = None
    amount: int = 0


# a dispute's statuses that withdraw nothing: an inquiry (warning_*), a dispute won or prevented;
# every other status, a future one too, is money Stripe has taken back from us
DISPUTE_KEEPS = frozenset({"warning_needs_response", "warning_under_review", "warning_closed", "won", "prevented"})


class Dispute(msgspec.Struct):
    id: str
    amount: int = 0
    charge: str | None = None
    payment_intent: str | None = None
    status: str | None = None

    @property
    def withdrawn(self) -> int:
        return 0 if self.status in DISPUTE_KEEPS else self.amount


class MeterEvent(msgspec.Struct):
    identifier: str
    event_name: str
    timestamp: int


class Ref(msgspec.Struct):
    """Any object, by its id (what an event's data.object is enough to know)."""
    id: str | None = None
    object: str | None = None


class EventData(msgspec.Struct):
    object: msgspec.Raw


class Event(msgspec.Struct):
    """A webhook event. Only its id and type are trusted as-is; the object it names is read
    again from Stripe before anything is applied (events arrive late and out of order)."""
    id: str
    type: str
    created: Annotated[int, msgspec.Meta(ge=0, le=10**11)]  # epoch seconds PostgreSQL can hold
    data: EventData
    livemode: bool = False
    object: str = "event"
