-- Codeplan schema, first version: plans, accounts, subscriptions, API keys, quota windows
-- and the two-phase usage ledger. The ledger's rules are in README.md ("The ledger").

CREATE TABLE plans (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    -- allowance in billed tokens per 5-hour window and per week
    window_tokens   bigint NOT NULL CHECK (window_tokens > 0),
    weekly_tokens   bigint NOT NULL CHECK (weekly_tokens > 0),
    -- NULL: no cap on requests in flight at once
    max_concurrent  integer CHECK (max_concurrent > 0),
    -- a cached prompt token counts as this fraction of a token
    cached_weight   numeric(6, 4) NOT NULL DEFAULT 0.2 CHECK (cached_weight >= 0 AND cached_weight <= 1),
    monthly_price_cents integer NOT NULL CHECK (monthly_price_cents >= 0),
    models          text[] NOT NULL
);

-- Figures: docs/glm-upstream.md §9. 5-hour allowances are the token figures third-party quota
-- tools report for Lite/Pro/Max; the weekly allowance is 5x the 5-hour one, the ratio of Z.ai's
-- 2026 weekly to 5-hour prompt caps (400/80, 2000/400, 8000/1600).
INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models) VALUES
    ('lite', 'GLM Coding Lite',  40000000,  200000000,  600, ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air']),
    ('pro',  'GLM Coding Pro',  160000000,  800000000, 3000, ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air']),
    ('max',  'GLM Coding Max',  800000000, 4000000000, 6000, ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air']);

CREATE TABLE accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email       text NOT NULL CHECK (position('@' IN email) > 1),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX accounts_email_key ON accounts (lower(email));

CREATE TABLE subscriptions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    plan_id     text NOT NULL REFERENCES plans (id),
    status      text NOT NULL CHECK (status IN ('active', 'past_due', 'canceled')),
    -- the weekly window is anchored here
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    stripe_subscription_id text UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX subscriptions_one_live ON subscriptions (account_id) WHERE status <> 'canceled';

CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    -- what the user sees to tell keys apart; the secret itself is never stored
    prefix      text NOT NULL,
    secret_hash bytea NOT NULL UNIQUE,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- One row per window actually opened. Running totals change in the same transaction as the
-- ledger transition that moves them, so they are always the sum of the ledger.
CREATE TABLE quota_windows (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES subscriptions (id),
    kind            text NOT NULL CHECK (kind IN ('5h', 'week')),
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    allowance       bigint NOT NULL,
    reserved        bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    posted          bigint NOT NULL DEFAULT 0 CHECK (posted >= 0),
    UNIQUE (subscription_id, kind, starts_at)
);

CREATE TABLE usage_ledger (
    id                  uuid PRIMARY KEY,
    subscription_id     bigint NOT NULL REFERENCES subscriptions (id),
    api_key_id          bigint NOT NULL REFERENCES api_keys (id),
    window_id           bigint NOT NULL REFERENCES quota_windows (id),
    week_window_id      bigint NOT NULL REFERENCES quota_windows (id),
    state               text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'posted', 'voided', 'expired')),
    surface             text NOT NULL,
    model               text NOT NULL,
    reserved_tokens     bigint NOT NULL CHECK (reserved_tokens > 0),
    prompt_estimate     integer NOT NULL,
    cached_weight       numeric(6, 4) NOT NULL,
    prompt_tokens       integer NOT NULL DEFAULT 0,
    completion_tokens   integer NOT NULL DEFAULT 0,
    cached_tokens       integer NOT NULL DEFAULT 0,
    reasoning_tokens    integer NOT NULL DEFAULT 0,
    billed_tokens       bigint NOT NULL DEFAULT 0,
    -- completion tokens this request has provably delivered so far (heartbeats)
    delivered_tokens    integer NOT NULL DEFAULT 0,
    -- true when the counts are ours, not the upstream's
    estimated           boolean NOT NULL DEFAULT false,
    settle_reason       text,
    upstream_request_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    lease_until         timestamptz NOT NULL,
    settled_at          timestamptz
);
CREATE INDEX usage_ledger_pending_lease ON usage_ledger (lease_until) WHERE state = 'pending';
CREATE INDEX usage_ledger_pending_sub ON usage_ledger (subscription_id) WHERE state = 'pending';
CREATE INDEX usage_ledger_sub_time ON usage_ledger (subscription_id, created_at);

-- Locks the windows a transition moves, always in id order, so two transitions never wait
-- on each other in a cycle.
CREATE FUNCTION ledger_lock_windows(a bigint, b bigint) RETURNS void
LANGUAGE sql AS $$
    SELECT 1 FROM quota_windows WHERE id IN (a, b) ORDER BY id FOR UPDATE;
$$;

-- pending: reserve `p_reserve` tokens in the subscription's open 5-hour and weekly windows.
-- Outcomes: admitted | replayed (this id was admitted before) | inactive | too_large |
-- window_full | concurrency. The subscription row lock serialises admissions of one
-- subscription across every process sharing the database.
CREATE FUNCTION ledger_admit(
    p_id uuid, p_subscription_id bigint, p_api_key_id bigint, p_surface text, p_model text,
    p_prompt_estimate integer, p_reserve bigint, p_lease_seconds double precision)
RETURNS TABLE (outcome text, window_kind text, resets_at timestamptz, allowance bigint)
LANGUAGE plpgsql AS $$
DECLARE
    sub record;
    w5 quota_windows;
    ww quota_windows;
    week_start timestamptz;
    in_flight integer;
BEGIN
    SELECT s.id, s.status, s.started_at, p.window_tokens, p.weekly_tokens, p.max_concurrent,
           p.cached_weight
      INTO sub
      FROM subscriptions s JOIN plans p ON p.id = s.plan_id
     WHERE s.id = p_subscription_id
       FOR UPDATE OF s;
    IF NOT FOUND OR sub.status <> 'active' THEN
        RETURN QUERY SELECT 'inactive'::text, NULL::text, NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM usage_ledger WHERE id = p_id) THEN
        RETURN QUERY SELECT 'replayed'::text, NULL::text, NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    IF p_reserve > sub.window_tokens THEN
        RETURN QUERY SELECT 'too_large'::text, '5h'::text, NULL::timestamptz, sub.window_tokens;
        RETURN;
    END IF;
    IF p_reserve > sub.weekly_tokens THEN
        RETURN QUERY SELECT 'too_large'::text, 'week'::text, NULL::timestamptz, sub.weekly_tokens;
        RETURN;
    END IF;
    IF sub.max_concurrent IS NOT NULL THEN
        SELECT count(*) INTO in_flight FROM usage_ledger
         WHERE subscription_id = p_subscription_id AND state = 'pending' AND lease_until > now();
        IF in_flight >= sub.max_concurrent THEN
            RETURN QUERY SELECT 'concurrency'::text, NULL::text, NULL::timestamptz,
                                sub.max_concurrent::bigint;
            RETURN;
        END IF;
    END IF;

    -- The weekly window is anchored to the subscription's start.
    week_start := sub.started_at + floor(extract(epoch FROM now() - sub.started_at) / 604800)
                                   * interval '7 days';
    INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
    VALUES (p_subscription_id, 'week', week_start, week_start + interval '7 days', sub.weekly_tokens)
    ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
    SELECT * INTO ww FROM quota_windows
     WHERE subscription_id = p_subscription_id AND kind = 'week' AND starts_at = week_start;
    IF ww.reserved + ww.posted + p_reserve > ww.allowance THEN
        RETURN QUERY SELECT 'window_full'::text, 'week'::text, ww.ends_at, ww.allowance;
        RETURN;
    END IF;

    -- The 5-hour window opens at the first request after the previous one closed.
    SELECT * INTO w5 FROM quota_windows
     WHERE subscription_id = p_subscription_id AND kind = '5h'
     ORDER BY starts_at DESC LIMIT 1;
    IF NOT FOUND OR w5.ends_at <= now() THEN
        INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
        VALUES (p_subscription_id, '5h', now(), now() + interval '5 hours', sub.window_tokens)
        RETURNING * INTO w5;
    ELSIF w5.reserved + w5.posted + p_reserve > w5.allowance THEN
        RETURN QUERY SELECT 'window_full'::text, '5h'::text, w5.ends_at, w5.allowance;
        RETURN;
    END IF;

    PERFORM ledger_lock_windows(w5.id, ww.id);
    UPDATE quota_windows SET reserved = reserved + p_reserve WHERE id IN (w5.id, ww.id);
    INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                              model, reserved_tokens, prompt_estimate, cached_weight, lease_until)
    VALUES (p_id, p_subscription_id, p_api_key_id, w5.id, ww.id, p_surface, p_model, p_reserve,
            p_prompt_estimate, sub.cached_weight,
            now() + make_interval(secs => p_lease_seconds));
    RETURN QUERY SELECT 'admitted'::text, NULL::text, w5.ends_at, NULL::bigint;
END;
$$;

-- pending -> posted | voided | expired, with the counts it settles at. Returns the billed
-- tokens, or no row when the entry was not pending (a replay, or another settler won).
CREATE FUNCTION ledger_settle(
    p_id uuid, p_state text, p_prompt integer, p_completion integer, p_cached integer,
    p_reasoning integer, p_estimated boolean, p_reason text, p_upstream_request_id text)
RETURNS TABLE (billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    entry usage_ledger;
    v_billed bigint;
BEGIN
    IF p_state NOT IN ('posted', 'voided', 'expired') THEN
        RAISE EXCEPTION 'ledger_settle: % is not a settled state', p_state;
    END IF;
    SELECT * INTO entry FROM usage_ledger WHERE id = p_id AND state = 'pending' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    p_cached := least(greatest(p_cached, 0), greatest(p_prompt, 0));
    v_billed := CASE WHEN p_state = 'voided' THEN 0 ELSE
        greatest(p_prompt - p_cached, 0) + ceil(p_cached * entry.cached_weight)::bigint
        + greatest(p_completion, 0) END;
    PERFORM ledger_lock_windows(entry.window_id, entry.week_window_id);
    UPDATE quota_windows
       SET reserved = reserved - entry.reserved_tokens, posted = posted + v_billed
     WHERE id IN (entry.window_id, entry.week_window_id);
    UPDATE usage_ledger
       SET state = p_state,
           prompt_tokens = CASE WHEN p_state = 'voided' THEN 0 ELSE p_prompt END,
           completion_tokens = CASE WHEN p_state = 'voided' THEN 0 ELSE p_completion END,
           cached_tokens = CASE WHEN p_state = 'voided' THEN 0 ELSE p_cached END,
           reasoning_tokens = CASE WHEN p_state = 'voided' THEN 0 ELSE p_reasoning END,
           billed_tokens = v_billed,
           estimated = p_estimated,
           settle_reason = p_reason,
           upstream_request_id = coalesce(p_upstream_request_id, upstream_request_id),
           settled_at = now()
     WHERE id = p_id;
    RETURN QUERY SELECT v_billed;
END;
$$;

-- The sweeper: pending entries whose process stopped heart-beating are expired at what they
-- can prove: the prompt estimate plus the completion tokens their last heartbeat recorded.
CREATE FUNCTION ledger_expire_due(p_limit integer)
RETURNS TABLE (id uuid, billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    due record;
BEGIN
    FOR due IN
        SELECT l.id, l.prompt_estimate, l.delivered_tokens FROM usage_ledger l
         WHERE l.state = 'pending' AND l.lease_until < now()
         ORDER BY l.lease_until LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    LOOP
        RETURN QUERY SELECT due.id, s.billed FROM ledger_settle(
            due.id, 'expired', due.prompt_estimate, due.delivered_tokens, 0, 0, true,
            'lease expired', NULL) s;
    END LOOP;
END;
$$;
