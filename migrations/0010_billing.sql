-- Stripe billing (issue 12): the catalogue Codeplan keeps on Stripe, each account's Stripe
-- Customer, a mirror of every Stripe subscription and the Codeplan subscription it drives, the
-- webhook events received (also the queue of work they cause), invoices, top-up purchases and the
-- outbox of Billing Meter events for overage. How it fits together: README.md, "Billing".

-- One Stripe Customer per account, created once and reused.
ALTER TABLE accounts ADD COLUMN stripe_customer_id text UNIQUE;

-- Idempotency keys sent to Stripe name this installation, so two databases sharing one Stripe
-- account (a test database reset, a staging copy) never collide on "customer of account 1".
CREATE TABLE billing_installation (
    id      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    single  boolean NOT NULL DEFAULT true UNIQUE CHECK (single)
);
INSERT INTO billing_installation DEFAULT VALUES;

-- Prices `codeplan stripe sync` made. A price's amount cannot change on Stripe: a new price takes
-- over the lookup key and the old one stays here (not current) so subscriptions on it still map.
CREATE TABLE stripe_prices (
    stripe_price_id     text PRIMARY KEY,
    lookup_key          text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('plan', 'overage', 'topup')),
    plan_id             text REFERENCES plans (id),
    billing_interval    text CHECK (billing_interval IN ('month', 'year')),
    topup_tokens        bigint CHECK (topup_tokens > 0),
    stripe_product_id   text NOT NULL,
    unit_amount_decimal numeric NOT NULL,
    currency            text NOT NULL,
    current             boolean NOT NULL DEFAULT true,
    synced_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'plan') = (plan_id IS NOT NULL AND billing_interval IS NOT NULL)),
    CHECK ((kind = 'topup') = (topup_tokens IS NOT NULL))
);
CREATE UNIQUE INDEX stripe_prices_current ON stripe_prices (lookup_key) WHERE current;

CREATE TABLE stripe_meters (
    event_name      text PRIMARY KEY,
    stripe_meter_id text NOT NULL UNIQUE,
    synced_at       timestamptz NOT NULL DEFAULT now()
);

-- Stripe's view of each subscription, as last read from Stripe, and the Codeplan subscription
-- it drives. `status` is Stripe's own (active, trialing, past_due, unpaid, canceled, incomplete,
-- incomplete_expired, paused).
CREATE TABLE stripe_subscriptions (
    stripe_subscription_id  text PRIMARY KEY,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    stripe_customer_id      text NOT NULL,
    status                  text NOT NULL,
    plan_id                 text REFERENCES plans (id),
    stripe_price_id         text,
    current_period_end      timestamptz,
    cancel_at_period_end    boolean NOT NULL DEFAULT false,
    cancel_at               timestamptz,
    ended_at                timestamptz,
    -- when it became past_due (our clock) and until when it keeps its plan
    past_due_since          timestamptz,
    grace_until             timestamptz,
    subscription_id         bigint UNIQUE REFERENCES subscriptions (id),
    synced_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_subscriptions_account ON stripe_subscriptions (account_id);
CREATE INDEX stripe_subscriptions_grace ON stripe_subscriptions (grace_until) WHERE status = 'past_due';

-- Every webhook event received, once: the row is written before the answer (a redelivery finds
-- it and changes nothing) and is the queue of the work the event causes. That work, and the
-- row's move out of 'pending', commit in one transaction.
CREATE TABLE stripe_events (
    id              text PRIMARY KEY,
    type            text NOT NULL,
    created         timestamptz NOT NULL,
    livemode        boolean NOT NULL,
    payload         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'applied', 'ignored')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz
);
CREATE INDEX stripe_events_pending ON stripe_events (next_attempt_at) WHERE state = 'pending';

CREATE TABLE billing_invoices (
    stripe_invoice_id       text PRIMARY KEY,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    stripe_subscription_id  text,
    status                  text NOT NULL,
    billing_reason          text,
    amount_due              bigint NOT NULL,
    amount_paid             bigint NOT NULL,
    currency                text NOT NULL,
    attempt_count           integer NOT NULL DEFAULT 0,
    -- while the invoice is open: why its last payment attempt did not go through
    payment_problem         text CHECK (payment_problem IN ('payment_failed', 'action_required')),
    period_start            timestamptz,
    period_end              timestamptz,
    hosted_invoice_url      text,
    paid_at                 timestamptz,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_invoices_account ON billing_invoices (account_id, created_at);

-- Top-up blocks bought through Checkout (payment mode). Turning them into allowance in the
-- ledger follows main's ledger (issue 12, stage 2); the purchase and any refund are kept here.
CREATE TABLE topups (
    id                          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id                  bigint NOT NULL REFERENCES accounts (id),
    tokens                      bigint NOT NULL CHECK (tokens > 0),
    amount                      bigint NOT NULL CHECK (amount >= 0),
    currency                    text NOT NULL,
    amount_refunded             bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0 AND amount_refunded <= amount),
    purchased_at                timestamptz NOT NULL DEFAULT now(),
    expires_at                  timestamptz NOT NULL,
    refunded_at                 timestamptz,
    stripe_checkout_session_id  text NOT NULL UNIQUE,
    stripe_payment_intent_id    text UNIQUE
);
CREATE INDEX topups_account ON topups (account_id, purchased_at);

-- The transactional outbox of Billing Meter events: overage tokens are added here in the same
-- transaction that settles them, aggregated per customer per minute. A background worker sends
-- each closed row once, with an `identifier` fixed when the row was made, so a resend after a
-- crash or a lost answer is refused by Stripe as a duplicate, never counted twice.
--   open --freeze--> sending --sent--> sent
--                            --refused--> failed   (a request Stripe will never accept)
CREATE TABLE meter_outbox (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stripe_customer_id  text NOT NULL,
    event_name          text NOT NULL,
    minute              timestamptz NOT NULL,
    -- the latest usage in the row: the event's timestamp, inside the billing period it belongs to
    -- (the minute's start may fall before a period that began within that minute)
    last_at             timestamptz NOT NULL,
    seq                 integer NOT NULL,
    value               bigint NOT NULL CHECK (value > 0),
    identifier          text NOT NULL UNIQUE,
    state               text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'sending', 'sent', 'failed')),
    attempts            integer NOT NULL DEFAULT 0,
    frozen_at           timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    UNIQUE (stripe_customer_id, event_name, minute, seq)
);
CREATE UNIQUE INDEX meter_outbox_open ON meter_outbox (stripe_customer_id, event_name, minute) WHERE state = 'open';
CREATE INDEX meter_outbox_work ON meter_outbox (next_attempt_at) WHERE state IN ('open', 'sending');

-- Adds `p_tokens` of usage at `p_at` to the customer's open row for that minute (or opens one).
-- A minute whose row was already frozen for sending gets a new row with the next `seq`.
CREATE FUNCTION billing_overage_add(p_customer text, p_event_name text, p_at timestamptz, p_tokens bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_minute timestamptz := date_trunc('minute', p_at);
    v_id bigint;
    v_seq integer;
BEGIN
    IF p_tokens <= 0 THEN
        RETURN NULL;
    END IF;
    -- one adder per customer and meter at a time, so two never pick the same seq
    PERFORM pg_advisory_xact_lock(hashtextextended('meter_outbox:' || p_customer || ':' || p_event_name, 0));
    UPDATE meter_outbox SET value = value + p_tokens, last_at = greatest(last_at, p_at)
     WHERE stripe_customer_id = p_customer AND event_name = p_event_name AND minute = v_minute
       AND state = 'open'
    RETURNING id INTO v_id;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    SELECT coalesce(max(seq) + 1, 0) INTO v_seq FROM meter_outbox
     WHERE stripe_customer_id = p_customer AND event_name = p_event_name AND minute = v_minute;
    INSERT INTO meter_outbox (stripe_customer_id, event_name, minute, last_at, seq, value, identifier)
    VALUES (p_customer, p_event_name, v_minute, p_at, v_seq, p_tokens,
            'cp-' || p_customer || '-' || extract(epoch FROM v_minute)::bigint || '-' || v_seq)
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

-- Applies Stripe's view of one subscription (as just read from Stripe) to the mirror and to the
-- Codeplan subscription it drives, in one transaction:
--   active, trialing            -> the plan (Codeplan status 'active')
--   past_due                    -> the plan until grace_until, then none ('past_due')
--   unpaid, paused              -> none ('past_due'); the row stays, Stripe may still recover it
--   canceled, incomplete_expired-> ended ('canceled'); an ended row never comes back
--   incomplete                  -> nothing yet (no Codeplan subscription is made for it)
-- A plan change reaches the open windows at once (Stripe itself applies a downgrade at period
-- end). An account's operator-assigned subscription is adopted, usage and windows included.
-- Locks: the account and its subscription rows (FOR NO KEY UPDATE: never in the way of the key
-- share a foreign-key check takes), then the ledger's order for a subscription's money (0005):
-- its flight row, the mutex, then its windows in id order.
-- Outcomes: applied | not_live | unknown_plan | conflict (another live Stripe subscription
-- drives the account's subscription: `detail` names it) | ended | no_account.
CREATE FUNCTION billing_apply_subscription(
    p_stripe_id text, p_account_id bigint, p_customer text, p_status text, p_plan_id text,
    p_price_id text, p_period_end timestamptz, p_cancel_at_period_end boolean,
    p_cancel_at timestamptz, p_ended_at timestamptz, p_grace_seconds double precision)
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
        current_period_end, cancel_at_period_end, cancel_at, ended_at, past_due_since, grace_until, synced_at)
    VALUES (p_stripe_id, p_account_id, p_customer, p_status, p_plan_id, p_price_id, p_period_end,
            p_cancel_at_period_end, p_cancel_at, p_ended_at, v_since,
            v_since + make_interval(secs => p_grace_seconds), now())
    ON CONFLICT (stripe_subscription_id) DO UPDATE SET
        status = excluded.status, plan_id = coalesce(excluded.plan_id, m.plan_id),
        stripe_price_id = excluded.stripe_price_id, current_period_end = excluded.current_period_end,
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
        END IF;
        UPDATE stripe_subscriptions m SET subscription_id = local.id
         WHERE m.stripe_subscription_id = p_stripe_id;
    END IF;
    IF local.status = 'canceled' THEN
        RETURN QUERY SELECT 'ended'::text, local.id, NULL::text;
        RETURN;
    END IF;

    v_target := CASE WHEN p_status IN ('active', 'trialing')
                       OR (p_status = 'past_due' AND mirror.grace_until > now()) THEN 'active'
                     WHEN v_alive THEN 'past_due'
                     ELSE 'canceled' END;
    IF v_target <> 'canceled' AND mirror.plan_id IS NOT NULL AND mirror.plan_id <> local.plan_id THEN
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = local.id FOR NO KEY UPDATE;
        PERFORM 1 FROM quota_windows w
         WHERE w.subscription_id = local.id AND w.ends_at > now() ORDER BY w.id FOR NO KEY UPDATE;
        UPDATE subscriptions s SET plan_id = mirror.plan_id WHERE s.id = local.id;
        UPDATE quota_windows w
           SET allowance = CASE w.kind WHEN '5h' THEN p.window_tokens ELSE p.weekly_tokens END
          FROM plans p
         WHERE p.id = mirror.plan_id AND w.subscription_id = local.id AND w.ends_at > now();
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

-- Past_due subscriptions whose grace period ran out lose their plan (run by the billing worker).
CREATE FUNCTION billing_expire_grace() RETURNS integer
LANGUAGE sql AS $$
    WITH due AS (
        SELECT s.id FROM stripe_subscriptions m JOIN subscriptions s ON s.id = m.subscription_id
         WHERE m.status = 'past_due' AND m.grace_until <= now() AND s.status = 'active'
         ORDER BY s.id
           FOR NO KEY UPDATE OF s SKIP LOCKED
    ), moved AS (
        UPDATE subscriptions s SET status = 'past_due' FROM due WHERE s.id = due.id RETURNING 1
    )
    SELECT count(*)::integer FROM moved;
$$;

-- Why a subscription may not spend (NULL: it may), as admission reports it (0005): for one that
-- billing drives, Stripe's own state (past_due once the grace period is over, unpaid, paused,
-- canceled); otherwise the Codeplan status. The grace period itself is kept by the status, which
-- stays 'active' until billing_expire_grace() ends it, so a subscription in good standing costs
-- admission no lookup here.
CREATE OR REPLACE FUNCTION subscription_refusal(s subscriptions) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN s.status = 'active' THEN NULL
                ELSE coalesce((SELECT m.status FROM stripe_subscriptions m WHERE m.subscription_id = s.id
                                  AND m.status NOT IN ('active', 'trialing')), s.status) END;
$$;
