-- Billing mends (hunters' scratch tests, proven against the Stripe fake):
--
-- 1. A declined change of billing interval was served free. Stripe answers a change of billing
--    period (month -> year) by starting the new period at once: the billing cycle anchor is reset
--    and an invoice (billing_reason subscription_update) bills the whole new period, less a
--    proration credit for the old one's unused time; the update stands whatever the payment, the
--    subscription goes past_due. 0052 took any open subscription_update invoice for an upgrade's
--    proration, so the grace never ended: a year served unpaid. Now only an invoice that bills
--    nothing but prorations (a price changed within the period already paid for) keeps the plan
--    paid for without a grace. What it bills is told by its lines (each line's
--    parent.*_details.proration since 2025-03-31.basil), read by the applier into
--    billing_invoices.prorations_only. Invoices recorded before this migration (NULL) are judged
--    by when they were made: one made after the subscription's current period began prorates
--    within it; one made as its period began started that period.
--
-- 2. A declined upgrade to a dearer plan with the same windows was served anyway, with no time
--    limit. 0046 applied a plan change outside active/trialing when both windows were no larger
--    (ignoring models, concurrency, overage cap, per-model credits and price), and with only that
--    upgrade's invoice unpaid 0052 ran no grace. Now a change applies outside active/trialing only
--    to a plan no larger in every respect, and never while only an upgrade is unpaid.
--
-- 3. A meter event Stripe refused once was never sent again (`failed` for good): the operator
--    re-drives it with `codeplan stripe outbox retry` (service/billing/outbox.py), which needs to
--    know why a row was set aside: meter_outbox.failure.
--
-- billing_only_upgrade_unpaid is 0052's, replaced whole; billing_apply_subscription is 0052's,
-- replaced whole, with only its plan-change condition changed (and its comment).

ALTER TABLE billing_invoices ADD COLUMN prorations_only boolean;
COMMENT ON COLUMN billing_invoices.prorations_only IS
    'every line is a proration (a change billed within the period paid for); NULL: not read (before 0053)';

-- Whether what keeps `p_stripe_id` past_due is only an upgrade's proration: at least one open
-- invoice, every one of them a subscription_update that bills prorations only (an invoice not
-- recorded yet counts for nothing; its event applies the subscription again).
CREATE OR REPLACE FUNCTION billing_only_upgrade_unpaid(p_stripe_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_and(coalesce(
               i.billing_reason = 'subscription_update'
               AND coalesce(i.prorations_only, i.created_at > m.current_period_start + interval '1 minute'),
               false)), false)
      FROM billing_invoices i
      LEFT JOIN stripe_subscriptions m ON m.stripe_subscription_id = i.stripe_subscription_id
     WHERE i.stripe_subscription_id = p_stripe_id AND i.status = 'open';
$$;

-- Whether plan `p_new` gives nothing plan `p_old` does not: windows no larger, no model `p_old`
-- lacks, no more requests at once (NULL: unlimited), no more overage (NULL: none), no cheaper
-- credits for any of its models (each coefficient and the peak multiplier, as admission prices
-- them: the plan's override, else the model's), and no higher price. False for an unknown plan.
CREATE FUNCTION billing_plan_no_larger(p_new text, p_old text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((
        SELECT n.window_tokens <= o.window_tokens AND n.weekly_tokens <= o.weekly_tokens
           AND n.models <@ o.models
           AND (o.max_concurrent IS NULL OR n.max_concurrent <= o.max_concurrent)
           AND (n.overage_cap_tokens IS NULL OR n.overage_cap_tokens <= o.overage_cap_tokens)
           AND n.monthly_price_cents <= o.monthly_price_cents
           AND NOT EXISTS (
               SELECT 1 FROM unnest(n.models) AS m(model)
                 LEFT JOIN model_credits mc ON mc.model = m.model
                 LEFT JOIN plan_credits pn ON pn.plan_id = n.id AND pn.model = m.model
                 LEFT JOIN plan_credits po ON po.plan_id = o.id AND po.model = m.model
                WHERE coalesce(pn.input_coeff, mc.input_coeff, 1) < coalesce(po.input_coeff, mc.input_coeff, 1)
                   OR coalesce(pn.cached_coeff, mc.cached_coeff, n.cached_weight, 0.2)
                      < coalesce(po.cached_coeff, mc.cached_coeff, o.cached_weight, 0.2)
                   OR coalesce(pn.output_coeff, mc.output_coeff, 1) < coalesce(po.output_coeff, mc.output_coeff, 1)
                   OR coalesce(pn.peak_multiplier, mc.peak_multiplier, 1)
                      < coalesce(po.peak_multiplier, mc.peak_multiplier, 1))
          FROM plans n, plans o WHERE n.id = p_new AND o.id = p_old), false);
$$;

-- Why a row was set aside ('failed'): Stripe refused it outright (a definite 4xx), it was not
-- confirmed within Stripe's 24 hours of identifier memory, or its minute was older than the 35
-- days Stripe accepts. A refused row is provably not recorded by Stripe, so it may be sent again
-- with its identifier (`codeplan stripe outbox retry`). NULL on a failed row: set aside by a
-- process older than this migration, judged as unconfirmed.
ALTER TABLE meter_outbox ADD COLUMN failure text CHECK (failure IN ('refused', 'unconfirmed', 'too_old'));
UPDATE meter_outbox SET failure = CASE WHEN last_error LIKE 'not confirmed within%' THEN 'unconfirmed'
                                       WHEN last_error LIKE 'older than the 35 days%' THEN 'too_old'
                                       ELSE 'refused' END
 WHERE state = 'failed';
CREATE INDEX meter_outbox_failed ON meter_outbox (id) WHERE state = 'failed';

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
    -- "No larger" is in every respect a plan gives (billing_plan_no_larger, 0053): a plan with the
    -- same windows but more models, more requests at once, more overage, cheaper credits or a
    -- higher price is an upgrade too. And none applies while what keeps Stripe past_due is only
    -- an upgrade's proration: Stripe billed the change as dearer, whatever the catalogue says.
    IF v_target <> 'canceled' AND mirror.plan_id IS NOT NULL AND mirror.plan_id <> local.plan_id
       AND (p_status IN ('active', 'trialing')
            OR (billing_plan_no_larger(mirror.plan_id, local.plan_id)
                AND NOT billing_only_upgrade_unpaid(p_stripe_id))) THEN
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
