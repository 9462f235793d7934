-- A plan change reaches the live usage feed when it commits (tests/test_plan_change_notifies.py).
--
-- The live feed (service/web/live.py) reads a subscription's figures again when its channel,
-- codeplan_usage, names the subscription (the payload: its id as text), as every settlement and
-- an operator's change of one user's plan (service/admin/users.py) send. Two other ways of changing
-- a subscription's figures sent nothing, so a dashboard's socket and WS /v1/usage/live showed the
-- old plan and allowances until the subscription's next settlement:
--
-- 1. plan_apply_allowances, an operator's change of a plan's allowances (PATCH /admin/plans/...,
--    service/admin/plans.py, which now calls it only when an allowance changes): each of the
--    plan's subscriptions whose figures moved is told, once (pg_notify keeps one of identical
--    payloads in a transaction; a plan with many subscribers sends one per subscription). Its
--    figures moved when an open 5-hour or weekly window took the new allowance, or when it has
--    no open window of a kind: the feed shows the plan's own allowance for it then. An open
--    window already at the plan's allowance is left alone (no row version for nothing).
--
-- 2. billing_apply_subscription, Stripe's plan change (a webhook, service/billing/apply.py):
--    the subscription is told when its plan changes (the feed shows the plan, its name and its
--    allowances), and not for an event that changes no plan (a renewal, metadata, a status).
--
-- plan_apply_allowances is 0031's, billing_apply_subscription 0053's, each replaced whole (same
-- signatures); only the notification (and, in the first, the moved windows counted) is new.

-- A plan's new allowances reach the open 5-hour and weekly windows of its subscriptions at once
-- (0030's, which also gave top-up and overage windows the weekly allowance): each subscription
-- under its mutex, its windows in id order; each whose figures moved told to the live feed.
CREATE OR REPLACE FUNCTION plan_apply_allowances(p_plan text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    n integer := 0;
    v_moved integer;
BEGIN
    FOR s IN
        SELECT sub.id, p.window_tokens, p.weekly_tokens FROM subscriptions sub
          JOIN plans p ON p.id = sub.plan_id
         WHERE sub.plan_id = p_plan AND sub.status <> 'canceled' ORDER BY sub.id
    LOOP
        INSERT INTO subscription_flights (subscription_id) VALUES (s.id)
        ON CONFLICT (subscription_id) DO NOTHING;
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = s.id FOR NO KEY UPDATE;
        PERFORM 1 FROM quota_windows q
         WHERE q.subscription_id = s.id AND q.ends_at > now() AND q.kind IN ('5h', 'week')
         ORDER BY q.id FOR NO KEY UPDATE;
        UPDATE quota_windows q
           SET allowance = CASE WHEN q.kind = '5h' THEN s.window_tokens ELSE s.weekly_tokens END
         WHERE q.subscription_id = s.id AND q.ends_at > now() AND q.kind IN ('5h', 'week')
           AND q.allowance <> CASE WHEN q.kind = '5h' THEN s.window_tokens ELSE s.weekly_tokens END;
        GET DIAGNOSTICS v_moved = ROW_COUNT;
        -- the live feed (service/web/live.py) reads the subscription's figures again when this
        -- commits, as after a settlement: an open window that moved, or a kind with no open
        -- window, whose figure is the plan's own allowance (the caller changed it)
        IF v_moved > 0 OR (SELECT count(DISTINCT q.kind) FROM quota_windows q
                            WHERE q.subscription_id = s.id AND q.ends_at > now()
                              AND q.kind IN ('5h', 'week')) < 2 THEN
            PERFORM pg_notify('codeplan_usage', s.id::text);
        END IF;
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;

-- What Stripe says of a subscription, applied (0053's, with the live feed told of a plan change).
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
        -- the live feed (service/web/live.py) reads the figures again when this commits: the
        -- new plan and its allowances at once, not at the next settlement (0056)
        PERFORM pg_notify('codeplan_usage', local.id::text);
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
