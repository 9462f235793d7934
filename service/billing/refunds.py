"""A paid invoice refunded, in part or whole, at most once whatever retries or other paths did:
for an ended subscription's invoice paid after its end (ended.py) and an upgrade's proration paid
after its period (prorations.py)."""
from __future__ import annotations

from . import wire
from .stripe_api import StripeAPI, idempotency_key


async def refund_invoice(api: StripeAPI, installation: str, invoice: wire.Invoice, account: int, owed: int, *,
                         purpose: str, reason: str) -> int:
    """Refund `owed` of `invoice`'s payments, less what they have had refunded already (by an
    earlier pass, another path, or the operator): never more than `owed` in all; the amount
    refunded now. Each refund's idempotency key names `purpose`, the charge and what it had
    refunded before, so a retry after a lost answer gets the same refund."""
    charges = []
    for paid in await api.invoice_payments(invoice.id):
        intent_id = paid.payment.payment_intent
        if paid.status != "paid" or paid.payment.type != "payment_intent" or not intent_id:
            continue
        intent = await api.payment_intent(intent_id)
        if not intent.latest_charge:
            continue
        charge = await api.charge(intent.latest_charge)
        if charge.status == "succeeded":
            charges.append((intent_id, charge))
    todo = owed - sum(charge.amount_refunded for _, charge in charges)
    refunded = 0
    for intent_id, charge in charges:
        give = min(charge.amount - charge.amount_refunded, todo - refunded)
        if give <= 0:
            continue
        await api.create_refund(
            {"payment_intent": intent_id, "amount": give,
             "metadata": {"codeplan_account_id": str(account), "codeplan_invoice": invoice.id,
                          "codeplan_reason": reason}},
            idempotency_key(installation, purpose, charge.id, charge.amount_refunded))
        refunded += give
    return refunded
