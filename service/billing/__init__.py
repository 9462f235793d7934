"""Stripe billing: catalogue, Checkout and Portal, webhooks, subscription state -> allowance,
top-up purchases and the overage meter outbox. The interface is `Billing` (engine.py)."""
