-- A second Stripe subscription paid for an account that already has one (review finding 8): two
-- Checkout sessions opened before either was paid (two plans, two tabs). The account keeps the
-- subscription that drives it; the other is cancelled on Stripe and what it charged refunded.
--
-- The event applier finds it (billing_apply_subscription says 'conflict', and re-reading the
-- other subscription does not end it) and records it here in the event's transaction; the
-- billing worker then cancels and refunds it through Stripe, outside any transaction that locks
-- an account, with idempotency keys and backoff, like the meter outbox (0010):
--   pending --cancelled and refunded--> done
--           --it drives the account now (the other one ended first)--> moot
--           --refused by Stripe for good--> failed   (logged for the operator)
CREATE TABLE duplicate_subscriptions (
    stripe_subscription_id  text PRIMARY KEY,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    -- the Stripe subscription the account kept
    kept_subscription_id    text NOT NULL,
    state                   text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'moot', 'failed')),
    refunded_amount         bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    attempts                integer NOT NULL DEFAULT 0,
    next_attempt_at         timestamptz NOT NULL DEFAULT now(),
    last_error              text,
    found_at                timestamptz NOT NULL DEFAULT now(),
    done_at                 timestamptz
);
CREATE INDEX duplicate_subscriptions_due ON duplicate_subscriptions (next_attempt_at) WHERE state = 'pending';
CREATE INDEX duplicate_subscriptions_account ON duplicate_subscriptions (account_id);
