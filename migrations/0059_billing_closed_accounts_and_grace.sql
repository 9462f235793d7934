-- Closed accounts and the grace of an unpaid renewal (permanent tests:
-- tests/test_billing_closed_and_grace.py):
--
-- 1. A closed account could be charged for a plan it can never use. Closing an account
--    (identity.close_account, 0057) is refused while a Stripe subscription is live, but a
--    Checkout Session opened before the close stays payable for up to 24 hours: paid after it,
--    the webhook attached a paid subscription to the closed account (its keys revoked, never to
--    sign in again) and Stripe billed it every month; a top-up paid so became a block nobody can
--    use. Now billing_apply_subscription refuses a closed account ('closed', read under the
--    account's lock, the lock close_account takes before it looks for a live subscription, so a
--    close and a purchase applied at once end refused-close or undone, never served-and-closed),
--    and the event applier queues the subscription, or the top-up's payment, in
--    duplicate_subscriptions with reason 'account_closed': the billing worker undoes it as it
--    undoes a second paid subscription (service/billing/duplicates.py): cancelled on Stripe at
--    once, every payment refunded (reason requested_by_customer), idempotency keys, backoff. A
--    top-up's row names its payment intent (stripe_object 'payment_intent'), which is refunded;
--    nothing is cancelled. Codeplan keeps no list of the Checkout Sessions it opened (Stripe
--    lists a customer's open ones), so the close does not expire them: this undo covers them.
--      pending --cancelled and refunded--> done
--              --drives its account now (a duplicate whose kept subscription ended first)--> moot
--              --refused by Stripe for good--> failed   (logged for the operator)
--
-- 2. The grace of an unpaid renewal was counted from the first failure while past_due
--    (past_due_since): after a declined upgrade (served the plan paid for, past the grace: 0058)
--    or a forgiven one, Stripe says past_due from the upgrade on, and a renewal failing more than
--    CODEPLAN_PAST_DUE_GRACE after it was suspended at once, with no grace at all. The grace now
--    runs from when what is owed began: billing_arrears_since, the moment the oldest invoice still
--    owed that is arrears (billing_arrears' invoices) was first recorded owed
--    (billing_invoices.unpaid_since, the database's clock, as past_due_since and the grace are:
--    Stripe's own times run ahead under a test clock). Stripe attempts a renewal when it
--    finalizes it, so that is its first failed payment, within the moments an event takes.
--
-- billing_arrears is 0058's, restated over billing_arrears_since (one predicate for both).
-- billing_apply_subscription is 0058's, replaced whole: its account lock reads closed_at, a closed
-- account's new subscription is refused, and its grace's start is the arrears'. billing_expire_grace
-- (0058's) is unchanged: it reads the grace_until this function writes.

ALTER TABLE duplicate_subscriptions
    -- why it is undone: a second paid subscription of one account, or anything paid for a closed one
    ADD COLUMN reason text NOT NULL DEFAULT 'duplicate' CHECK (reason IN ('duplicate', 'account_closed')),
    -- what stripe_subscription_id names: a subscription (cancelled, each payment refunded) or a
    -- top-up's payment intent (refunded)
    ADD COLUMN stripe_object text NOT NULL DEFAULT 'subscription'
        CHECK (stripe_object IN ('subscription', 'payment_intent')),
    ALTER COLUMN kept_subscription_id DROP NOT NULL,
    ADD CONSTRAINT duplicate_subscriptions_kept CHECK (reason <> 'duplicate' OR kept_subscription_id IS NOT NULL),
    ADD CONSTRAINT duplicate_subscriptions_payment CHECK (stripe_object = 'subscription' OR reason = 'account_closed');
COMMENT ON COLUMN duplicate_subscriptions.stripe_subscription_id IS
    'the Stripe object undone: a subscription, or (stripe_object payment_intent) a top-up''s payment intent';

-- When Codeplan first recorded the invoice owed (open or uncollectible), in the database's clock;
-- kept once set. Invoices owed now take their creation (Stripe's clock, no later than their
-- last record here).
ALTER TABLE billing_invoices ADD COLUMN unpaid_since timestamptz;
UPDATE billing_invoices SET unpaid_since = least(created_at, updated_at) WHERE status IN ('open', 'uncollectible');

-- Since when `p_stripe_id` owes more than an upgrade's proration: the earliest start of an open
-- or uncollectible invoice that is not a subscription_update billing prorations only (0058's
-- billing_arrears' invoices); NULL when it owes no such invoice. Where the grace starts.
CREATE FUNCTION billing_arrears_since(p_stripe_id text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(coalesce(i.unpaid_since, i.updated_at)) FROM billing_invoices i
      LEFT JOIN stripe_subscriptions m ON m.stripe_subscription_id = i.stripe_subscription_id
     WHERE i.stripe_subscription_id = p_stripe_id AND i.status IN ('open', 'uncollectible')
       AND NOT coalesce(i.billing_reason = 'subscription_update'
                        AND coalesce(i.prorations_only,
                                     i.created_at > m.current_period_start + interval '1 minute'),
                        false);
$$;

-- Whether `p_stripe_id` owes more than an upgrade's proration (0058's, over the function above).
-- What runs the grace.
CREATE OR REPLACE FUNCTION billing_arrears(p_stripe_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT billing_arrears_since(p_stripe_id) IS NOT NULL;
$$;

-- What Stripe says of a subscription, applied (0058's, with a closed account refused and the grace
-- counted from the arrears, as above).
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
    v_closed boolean;
    v_alive boolean := p_status IN ('active', 'trialing', 'past_due', 'unpaid', 'paused');
    v_target text;
    v_no_larger boolean;
    v_applied boolean := false;
BEGIN
    -- the account's lock first, as identity.close_account takes it (after the account's links,
    -- which this never takes) before it looks for a live subscription: whichever of the two comes
    -- second sees what the first did (a close refused, or a closed account refused here) (0059)
    SELECT a.closed_at IS NOT NULL INTO v_closed FROM accounts a WHERE a.id = p_account_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_account'::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO mirror FROM stripe_subscriptions m WHERE m.stripe_subscription_id = p_stripe_id FOR UPDATE;
    -- the grace runs from when what is owed began (billing_arrears_since: a renewal's or another
    -- invoice's first failure, the oldest still owed), not from when Stripe began to say past_due:
    -- that may be a declined upgrade's failure long before, which is served unpaid past any grace
    -- (0059). While nothing but an upgrade is owed no grace runs, and the first failure while
    -- past_due stands in, as before.
    v_since := CASE WHEN p_status = 'past_due' THEN
                   coalesce(billing_arrears_since(p_stripe_id),
                            CASE WHEN mirror.status = 'past_due' THEN coalesce(mirror.past_due_since, now())
                                 ELSE now() END)
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
        -- a closed account is never served again: a subscription paid after the close (a Checkout
        -- opened before it, its page payable for 24 hours) is refused, and the event applier queues
        -- it to be cancelled and refunded as a duplicate is (duplicate_subscriptions, 0059)
        IF v_closed THEN
            RETURN QUERY SELECT 'closed'::text, NULL::bigint, NULL::text;
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
    -- (the upgrade is held back below), with no grace to run out (0052); nor when nothing is
    -- owed at all (the upgrade's invoice voided, forgiven: Stripe leaves it past_due) (0058)
    v_target := CASE WHEN p_status IN ('active', 'trialing')
                       OR (p_status = 'past_due' AND (mirror.grace_until > now()
                                                      OR NOT billing_arrears(p_stripe_id))) THEN 'active'
                     WHEN v_alive THEN 'past_due'
                     ELSE 'canceled' END;
    -- the plan Stripe has been paid for: a larger plan reaches the windows only while Stripe says
    -- active or trialing; past_due (an upgrade's proration invoice unpaid, with Stripe's default
    -- payment_behavior) keeps the last plan until it is paid. A smaller one applies whatever the
    -- state (a downgrade at a renewal whose payment fails must not keep the larger plan) (0046)
    -- "No larger" is in every respect a plan gives (billing_plan_no_larger, 0053): a plan with the
    -- same windows but more models, more requests at once, more overage, cheaper credits or a
    -- higher price is an upgrade too; and its Stripe price costs no more a month than the price
    -- the served plan was paid at (served_price_id), since the catalogue may have re-priced the
    -- served plan since it was bought (a "smaller" plan billed dearer than what was paid). Such a
    -- change applies at once in any state, also while an upgrade is unpaid (a way back down from
    -- it). Where that price is not known, none applies while what keeps Stripe past_due is only
    -- an upgrade's proration (0053). A larger plan applies only while Stripe says active or
    -- trialing and no upgrade's proration of the current period is unpaid: Stripe says active
    -- again after a change it invoices at a net credit (a $0 invoice paid) while the upgrade
    -- before it is still open (0058).
    IF v_target <> 'canceled' AND mirror.plan_id IS NOT NULL AND mirror.plan_id <> local.plan_id THEN
        v_no_larger := billing_plan_no_larger(mirror.plan_id, local.plan_id)
                       AND coalesce(billing_price_no_dearer(p_price_id, (
                                        SELECT sp.stripe_price_id FROM stripe_prices sp
                                         WHERE sp.stripe_price_id = mirror.served_price_id
                                           AND sp.plan_id = local.plan_id)),
                                    NOT billing_only_upgrade_unpaid(p_stripe_id));
        v_applied := v_no_larger
                     OR (p_status IN ('active', 'trialing') AND NOT billing_upgrade_unpaid(p_stripe_id));
    END IF;
    IF v_applied THEN
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
        -- the live feed (service/web/live.py) reads the figures again when this commits: the
        -- new plan and its allowances at once, not at the next settlement (0056)
        PERFORM pg_notify('codeplan_usage', local.id::text);
    END IF;
    -- the price of the plan served: the one just applied, or the served plan's own once Stripe
    -- says it is paid for (a re-price of the same plan) (0058)
    IF v_target <> 'canceled' AND p_price_id IS NOT NULL AND mirror.served_price_id IS DISTINCT FROM p_price_id
       AND (v_applied
            OR (mirror.plan_id = local.plan_id AND p_status IN ('active', 'trialing')
                AND NOT billing_upgrade_unpaid(p_stripe_id))) THEN
        UPDATE stripe_subscriptions m SET served_price_id = p_price_id WHERE m.stripe_subscription_id = p_stripe_id;
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
