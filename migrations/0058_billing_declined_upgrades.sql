-- Declined upgrades (a hunter's scratch tests, tests/scratch_billing33_*.py, proven against the
-- Stripe fake; the permanent tests: tests/test_billing_declined_upgrades.py):
--
-- 1. A downgrade while only an upgrade was unpaid never reached the account. pro paid, an upgrade
--    to max declined (past_due, pro rightly kept), then a change to lite (prorations created or
--    none): Stripe holds lite, Codeplan kept serving pro. 0053 applied no plan change at all while
--    only an upgrade's proration was unpaid, so that a plan the catalogue calls smaller but Stripe
--    bills dearer than the price paid (a plan re-priced since it was bought) is not served unpaid.
--    What decides is what was paid: stripe_subscriptions.served_price_id, the Stripe price of the
--    plan served, written when that plan is applied or paid for. A plan no larger than the one
--    served (billing_plan_no_larger) at a price no higher a month than the one it was paid at
--    (billing_price_no_dearer) applies at once in any state; the earlier rule stays where the price
--    paid is not known (a price Codeplan did not make, a row older than this migration that was not
--    active).
--
-- 2. An upgrade's proration invoice outlived the period it prorates. lite served all period (the
--    upgrade to max declined), the renewal paid, and Stripe's later retry of the old invoice
--    charged max's price for days only lite was served. When a subscription's current period
--    moves past the one such an invoice was made in, the billing worker voids it on Stripe, and
--    refunds in full a payment of it that lands after that period's end
--    (service/billing/prorations.py), queued here like an ended subscription's invoices (0052):
--      pending --voided, or a late payment refunded, or nothing to do--> done
--              --refused by Stripe for good--> failed   (logged for the operator)
--    The billing state does not offer such an invoice's page meanwhile (service/billing/state.py).
--
-- 3. A larger plan was served unpaid once Stripe said active again: lite, an upgrade to max
--    declined, then max -> pro invoiced at once (a net credit, a $0 invoice paid, so Stripe says
--    active on pro) while max's invoice is still open. A larger plan now applies only while Stripe
--    says active or trialing AND no upgrade's proration invoice of the current period is unpaid
--    (billing_upgrade_unpaid).
--
-- 4. Forgiving the upgrade suspended an account that owes nothing: the upgrade's invoice voided
--    by the operator, the subscription left past_due (Stripe says past_due while "payment on the
--    latest finalized invoice either failed or wasn't attempted"; voiding it is neither a payment
--    nor a new invoice), the grace over: 402. A past_due subscription's grace now runs only while
--    something other than an upgrade's proration is unpaid (billing_arrears: an open or
--    uncollectible invoice that is not prorations only), in billing_apply_subscription and in
--    billing_expire_grace; with nothing owed the plan paid for is served.
--
-- billing_apply_subscription is 0056's (0053's with the live feed told of a plan change), replaced
-- whole: its grace, its plan-change condition and the price served changed, its notification kept.
-- billing_expire_grace is 0052's, replaced whole, with only its condition changed.

-- The Stripe price the served plan (subscriptions.plan_id) was last applied or paid at: what a
-- change is compared with. NULL: not known (then 0053's rule holds).
ALTER TABLE stripe_subscriptions ADD COLUMN served_price_id text;
COMMENT ON COLUMN stripe_subscriptions.served_price_id IS
    'the Stripe price of the plan served, as applied or paid for; NULL: not known (before 0058)';
-- subscriptions Stripe says are paid up, on the plan they are served: that price was paid
UPDATE stripe_subscriptions m SET served_price_id = m.stripe_price_id
  FROM subscriptions s
 WHERE s.id = m.subscription_id AND s.plan_id = m.plan_id AND m.status IN ('active', 'trialing')
   AND s.status <> 'canceled';

-- Whether Stripe price `p_new` costs no more a month than `p_old` (a yearly price counted a
-- twelfth a month), both of them prices `codeplan stripe sync` made, in one currency; NULL when
-- either is not known so.
CREATE FUNCTION billing_price_no_dearer(p_new text, p_old text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN n.currency = o.currency
                THEN n.unit_amount_decimal / CASE n.billing_interval WHEN 'year' THEN 12 ELSE 1 END
                     <= o.unit_amount_decimal / CASE o.billing_interval WHEN 'year' THEN 12 ELSE 1 END END
      FROM stripe_prices n, stripe_prices o
     WHERE n.stripe_price_id = p_new AND o.stripe_price_id = p_old AND n.kind = 'plan' AND o.kind = 'plan';
$$;

-- Whether `p_stripe_id` owes more than an upgrade's proration: an open or uncollectible invoice
-- (both still payable) that is not a subscription_update billing prorations only (an invoice
-- recorded before 0053, its lines never read, judged as 0053 judges it). What runs the grace.
CREATE FUNCTION billing_arrears(p_stripe_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM billing_invoices i
          LEFT JOIN stripe_subscriptions m ON m.stripe_subscription_id = i.stripe_subscription_id
         WHERE i.stripe_subscription_id = p_stripe_id AND i.status IN ('open', 'uncollectible')
           AND NOT coalesce(i.billing_reason = 'subscription_update'
                            AND coalesce(i.prorations_only,
                                         i.created_at > m.current_period_start + interval '1 minute'),
                            false));
$$;

-- Whether an upgrade's proration of the subscription's current period is unpaid: an open or
-- uncollectible subscription_update invoice billing prorations only, made in the current period
-- (one made in an earlier period prorates a period over: the worker voids it, and it holds back
-- nothing; prorations.py).
CREATE FUNCTION billing_upgrade_unpaid(p_stripe_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM billing_invoices i
          JOIN stripe_subscriptions m ON m.stripe_subscription_id = i.stripe_subscription_id
         WHERE i.stripe_subscription_id = p_stripe_id AND i.status IN ('open', 'uncollectible')
           AND i.billing_reason = 'subscription_update'
           AND i.created_at >= coalesce(m.current_period_start, '-infinity')
           AND coalesce(i.prorations_only, i.created_at > m.current_period_start + interval '1 minute'));
$$;

-- An upgrade's proration invoice whose period is over (its subscription's current period began
-- after it was made), queued for the billing worker: voided while open, refunded in full when a
-- payment of it landed after its period's end (service/billing/prorations.py).
CREATE TABLE stale_proration_invoices (
    stripe_invoice_id       text PRIMARY KEY,
    stripe_subscription_id  text NOT NULL,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    state                   text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    voided                  boolean NOT NULL DEFAULT false,
    refunded_amount         bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    attempts                integer NOT NULL DEFAULT 0,
    next_attempt_at         timestamptz NOT NULL DEFAULT now(),
    last_error              text,
    found_at                timestamptz NOT NULL DEFAULT now(),
    done_at                 timestamptz
);
CREATE INDEX stale_proration_invoices_due ON stale_proration_invoices (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX stale_proration_invoices_account ON stale_proration_invoices (account_id);
-- what the event applier looks for at each event of a subscription (apply.py): its upgrades'
-- proration invoices, a few at most
CREATE INDEX billing_invoices_subscription_prorations ON billing_invoices (stripe_subscription_id)
    WHERE billing_reason = 'subscription_update' AND prorations_only;

-- Past_due subscriptions whose grace period ran out lose their plan (run by the billing worker),
-- only while they owe more than an upgrade's proration (billing_arrears): with only an upgrade
-- unpaid, or nothing at all (the upgrade's invoice voided, forgiven), the plan paid for is kept.
CREATE OR REPLACE FUNCTION billing_expire_grace() RETURNS integer
LANGUAGE sql AS $$
    WITH due AS (
        SELECT s.id FROM stripe_subscriptions m JOIN subscriptions s ON s.id = m.subscription_id
         WHERE m.status = 'past_due' AND m.grace_until <= now() AND s.status = 'active'
           AND billing_arrears(m.stripe_subscription_id)
         ORDER BY s.id
           FOR NO KEY UPDATE OF s SKIP LOCKED
    ), moved AS (
        UPDATE subscriptions s SET status = 'past_due' FROM due WHERE s.id = due.id RETURNING 1
    )
    SELECT count(*)::integer FROM moved;
$$;

-- What Stripe says of a subscription, applied (0056's, with the grace, the plan-change condition
-- and the price served as above).
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
    v_no_larger boolean;
    v_applied boolean := false;
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
