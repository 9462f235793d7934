-- Billing defects found over a customer's months (a hunter's scratch tests, proven against the
-- Stripe fake):
--
-- 1. A subscription's invoices outlive it. Stripe's dunning cancels a subscription whose renewal
--    stays unpaid (after_retries = canceled), and cancelling one stops automatic collection only:
--    its finalized invoices stay open, their hosted pages payable. A customer who paid one late
--    paid for a month no longer served. When a subscription ends, the billing worker voids its
--    open invoices on Stripe, and refunds any payment that still lands on one of its invoices
--    after it ended (service/billing/ended.py), queued here like duplicate subscriptions (0035):
--      pending --open invoices voided, late payments refunded--> done  (again pending when a
--                                                                      later event names it)
--              --refused by Stripe for good--> failed   (logged for the operator)
--
-- 2. A declined upgrade cost the plan already paid for. An upgrade's proration invoice declined
--    leaves the subscription past_due on Stripe (0046 keeps the smaller plan meanwhile), but the
--    grace then ran out and suspended the whole subscription (402 on every request), though the
--    period of the smaller plan was paid. README: an upgrade whose proration invoice is unpaid
--    keeps the plan paid for until it is paid. Now, while the only open invoices of a past_due
--    subscription are proration invoices (billing_reason subscription_update), its grace neither
--    suspends it (billing_expire_grace) nor counts against it (billing_apply_subscription): the
--    plan paid for is served; a renewal that fails still starts and ends the grace as before.
--
-- billing_apply_subscription is 0046's, replaced whole, with only v_target changed;
-- billing_expire_grace is 0010's, replaced whole, with only the proration exception added.

CREATE TABLE ended_subscription_invoices (
    stripe_subscription_id  text PRIMARY KEY,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    state                   text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    voided                  integer NOT NULL DEFAULT 0 CHECK (voided >= 0),
    refunded_amount         bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    attempts                integer NOT NULL DEFAULT 0,
    next_attempt_at         timestamptz NOT NULL DEFAULT now(),
    last_error              text,
    found_at                timestamptz NOT NULL DEFAULT now(),
    done_at                 timestamptz
);
CREATE INDEX ended_subscription_invoices_due ON ended_subscription_invoices (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX ended_subscription_invoices_account ON ended_subscription_invoices (account_id);

-- subscriptions that ended before this migration, with an invoice open or paid after their end:
-- settled by the worker as if their end had just been applied
INSERT INTO ended_subscription_invoices (stripe_subscription_id, account_id)
SELECT m.stripe_subscription_id, m.account_id FROM stripe_subscriptions m
 WHERE m.status IN ('canceled', 'incomplete_expired')
   AND EXISTS (SELECT 1 FROM billing_invoices i
                WHERE i.stripe_subscription_id = m.stripe_subscription_id
                  AND (i.status = 'open'
                       OR (i.status = 'paid' AND i.created_at < m.ended_at AND i.paid_at >= m.ended_at)));

CREATE INDEX billing_invoices_subscription_open ON billing_invoices (stripe_subscription_id)
    WHERE status = 'open';

-- Whether what keeps `p_stripe_id` past_due is only an upgrade's proration: at least one open
-- invoice, every one of them billing_reason subscription_update (an invoice not recorded yet
-- counts for nothing; its event applies the subscription again).
CREATE FUNCTION billing_only_upgrade_unpaid(p_stripe_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_and(coalesce(i.billing_reason = 'subscription_update', false)), false)
      FROM billing_invoices i
     WHERE i.stripe_subscription_id = p_stripe_id AND i.status = 'open';
$$;

-- Past_due subscriptions whose grace period ran out lose their plan (run by the billing worker),
-- unless only an upgrade's proration is unpaid: the plan paid for is kept (above).
CREATE OR REPLACE FUNCTION billing_expire_grace() RETURNS integer
LANGUAGE sql AS $$
    WITH due AS (
        SELECT s.id FROM stripe_subscriptions m JOIN subscriptions s ON s.id = m.subscription_id
         WHERE m.status = 'past_due' AND m.grace_until <= now() AND s.status = 'active'
           AND NOT billing_only_upgrade_unpaid(m.stripe_subscription_id)
         ORDER BY s.id
           FOR NO KEY UPDATE OF s SKIP LOCKED
    ), moved AS (
        UPDATE subscriptions s SET status = 'past_due' FROM due WHERE s.id = due.id RETURNING 1
    )
    SELECT count(*)::integer FROM moved;
$$;

CREATE OR REPLACE FUNCTION billing_apply_subscription(
    p_stripe_id text, p_account_id bigint, p_customer text, p_status text, p_plan_id text,
    p_price_id text, p_period_start timestamptz, p_period_end timestamptz, p_has_overage_item boolean,
    p_cancel_at_period_end boolean, p_cancel_at timestamptz, p_ended_at timestamptz,
    p_grace_seconds double precision)
RETURNS TABLE (outcome text, subscription_id bigint, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    mirror stripe_subscriptions;
    local subscriptions;
    live subscriptions;
    v_since timestamptz;
    v_alive boolean := p_status IN ('active', 'trialing', 'past_due', 'unpaid', 'paused');
    v_target text;
BEGIN
    PERFORM 1 FROM accounts a WHERE a.id = p_account_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_account'::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO mirror FROM stripe_subscriptions m WHERE m.stripe_subscription_id = p_stripe_id FOR UPDATE;
    v_since := CASE WHEN p_status = 'past_due' THEN
                   CASE WHEN mirror.status = 'past_due' THEN coalesce(mirror.past_due_since, now()) ELSE now() END
               END;
    INSERT INTO stripe_subscriptions AS m (
        stripe_subscription_id, account_id, stripe_customer_id, status, plan_id, stripe_price_id,
        current_period_start, current_period_end, has_overage_item, cancel_at_period_end, cancel_at,
        ended_at, past_due_since, grace_until, synced_at)
    VALUES (p_stripe_id, p_account_id, p_customer, p_status, p_plan_id, p_price_id, p_period_start,
            p_period_end, p_has_overage_item, p_cancel_at_period_end, p_cancel_at, p_ended_at, v_since,
            v_since + make_interval(secs => p_grace_seconds), now())
    ON CONFLICT (stripe_subscription_id) DO UPDATE SET
        status = excluded.status, plan_id = coalesce(excluded.plan_id, m.plan_id),
        stripe_price_id = excluded.stripe_price_id, current_period_start = excluded.current_period_start,
        current_period_end = excluded.current_period_end, has_overage_item = excluded.has_overage_item,
        cancel_at_period_end = excluded.cancel_at_period_end, cancel_at = excluded.cancel_at,
        ended_at = excluded.ended_at, past_due_since = excluded.past_due_since,
        grace_until = CASE WHEN m.past_due_since = excluded.past_due_since THEN m.grace_until
                           ELSE excluded.grace_until END,
        synced_at = now()
    RETURNING * INTO mirror;

    IF mirror.subscription_id IS NOT NULL THEN
        SELECT * INTO local FROM subscriptions s WHERE s.id = mirror.subscription_id FOR NO KEY UPDATE;
    END IF;
    IF local.id IS NULL THEN
        IF NOT v_alive THEN
            RETURN QUERY SELECT 'not_live'::text, NULL::bigint, p_status;
            RETURN;
        END IF;
        IF mirror.plan_id IS NULL THEN
            RETURN QUERY SELECT 'unknown_plan'::text, NULL::bigint, p_price_id;
            RETURN;
        END IF;
        SELECT * INTO live FROM subscriptions s
         WHERE s.account_id = mirror.account_id AND s.status <> 'canceled' FOR NO KEY UPDATE;
        IF live.id IS NOT NULL AND live.stripe_subscription_id IS NOT NULL
           AND live.stripe_subscription_id <> p_stripe_id THEN
            RETURN QUERY SELECT 'conflict'::text, live.id, live.stripe_subscription_id;
            RETURN;
        END IF;
        IF live.id IS NOT NULL THEN
            UPDATE subscriptions s SET stripe_subscription_id = p_stripe_id WHERE s.id = live.id
            RETURNING * INTO local;
        ELSE
            INSERT INTO subscriptions (account_id, plan_id, status, stripe_subscription_id)
            VALUES (mirror.account_id, mirror.plan_id, 'active', p_stripe_id)
            RETURNING * INTO local;
            -- top-ups outlive the subscription they were bought under: unexpired blocks of the
            -- account's ended subscriptions move to this one (under each one's mutex, in id order)
            PERFORM 1 FROM subscription_flights f
             WHERE f.subscription_id IN (SELECT q.subscription_id FROM quota_windows q
                                           JOIN subscriptions s ON s.id = q.subscription_id
                                          WHERE s.account_id = mirror.account_id AND s.status = 'canceled'
                                            AND q.kind = 'topup' AND q.ends_at > now())
             ORDER BY f.subscription_id FOR NO KEY UPDATE;
            UPDATE quota_windows q SET subscription_id = local.id
              FROM subscriptions s
             WHERE s.id = q.subscription_id AND s.account_id = mirror.account_id AND s.status = 'canceled'
               AND q.kind = 'topup' AND q.ends_at > now();
        END IF;
        UPDATE stripe_subscriptions m SET subscription_id = local.id
         WHERE m.stripe_subscription_id = p_stripe_id;
        -- blocks bought while the account had no live subscription
        PERFORM billing_topup_attach(t.id) FROM topups t
         WHERE t.account_id = mirror.account_id AND t.window_id IS NULL AND t.expires_at > now();
    END IF;
    IF local.status = 'canceled' THEN
        RETURN QUERY SELECT 'ended'::text, local.id, NULL::text;
        RETURN;
    END IF;

    -- past_due because only an upgrade's proration invoice is unpaid: the plan paid for is kept
    -- (the upgrade is held back below), with no grace to run out (0052)
    v_target := CASE WHEN p_status IN ('active', 'trialing')
                       OR (p_status = 'past_due' AND (mirror.grace_until > now()
                                                      OR billing_only_upgrade_unpaid(p_stripe_id))) THEN 'active'
                     WHEN v_alive THEN 'past_due'
                     ELSE 'canceled' END;
    -- the plan Stripe has been paid for: a larger plan reaches the windows only while Stripe says
    -- active or trialing; past_due (an upgrade's proration invoice unpaid, with Stripe's default
    -- payment_behavior) keeps the last plan until it is paid. A smaller one applies whatever the
    -- state (a downgrade at a renewal whose payment fails must not keep the larger plan) (0046)
    IF v_target <> 'canceled' AND mirror.plan_id IS NOT NULL AND mirror.plan_id <> local.plan_id
       AND (p_status IN ('active', 'trialing')
            OR EXISTS (SELECT 1 FROM plans n, plans o WHERE n.id = mirror.plan_id AND o.id = local.plan_id
                          AND n.window_tokens <= o.window_tokens AND n.weekly_tokens <= o.weekly_tokens)) THEN
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = local.id FOR NO KEY UPDATE;
        PERFORM 1 FROM quota_windows w
         WHERE w.subscription_id = local.id AND w.ends_at > now() AND w.kind IN ('5h', 'week')
         ORDER BY w.id FOR NO KEY UPDATE;
        UPDATE subscriptions s SET plan_id = mirror.plan_id WHERE s.id = local.id;
        UPDATE quota_windows w
           SET allowance = CASE w.kind WHEN '5h' THEN p.window_tokens ELSE p.weekly_tokens END
          FROM plans p
         WHERE p.id = mirror.plan_id AND w.subscription_id = local.id AND w.ends_at > now()
           AND w.kind IN ('5h', 'week');
    END IF;
    IF v_target <> local.status THEN
        UPDATE subscriptions s
           SET status = v_target,
               ended_at = CASE WHEN v_target = 'canceled' THEN coalesce(p_ended_at, now()) END
         WHERE s.id = local.id;
    END IF;
    RETURN QUERY SELECT 'applied'::text, local.id, v_target;
END;
$$;
