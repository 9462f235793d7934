-- Running Codeplan as a business (issue 14): credits per model, what each request cost
-- upstream, admin accounts and their audit trail, upstream profiles managed at run time, and
-- the per-key upstream concurrency lease shared by every process on this database.
--
-- 1. Credits. A plan's allowances (plans.window_tokens / weekly_tokens, and every figure of
--    quota_windows and of usage_ledger's reserved_tokens / held_tokens / billed_tokens) are
--    counted in *credits*. A model has coefficients for input, cached input and output tokens
--    (model_credits; a plan may override them per model in plan_credits) and a multiplier for
--    the configured peak hours (credit_settings). Tokens are still recorded exactly; the billed
--    credits derive from them:
--        billed = ceil(uncached x input + cached x cached_input + completion x output)
--    The coefficients (peak multiplier folded in) are fixed on the ledger row at admission, so
--    a settlement bills at the price the request was admitted at. The defaults (1, 0.2, 1) are
--    exactly the token billing before this migration: a credit is a token.
--
-- 2. Zero overshoot in credits. Admission still receives tokens (the prompt estimate, the
--    expected cost and the proven worst case); it turns them into credits here: the hold is
--    the token bound of the prompt times the larger of the input coefficients, plus the
--    output bound times the output coefficient. A settlement at the upstream's numbers is
--    within it by construction (prompt <= bound, completion <= max_tokens); one at our own
--    numbers is capped at it, as before.
--
-- 3. The lock order of migration 0005 is kept by every function replaced here: the
--    subscription's row in subscription_flights, then the ledger entry, then the windows by id.

-- ---- credits ------------------------------------------------------------------------------

CREATE TABLE model_credits (
    model           text PRIMARY KEY,
    input_coeff     numeric(12, 6) NOT NULL DEFAULT 1 CHECK (input_coeff >= 0),
    cached_coeff    numeric(12, 6) NOT NULL DEFAULT 0.2 CHECK (cached_coeff >= 0),
    output_coeff    numeric(12, 6) NOT NULL DEFAULT 1 CHECK (output_coeff >= 0),
    peak_multiplier numeric(8, 4) NOT NULL DEFAULT 1 CHECK (peak_multiplier >= 1),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- today's behaviour: a cached prompt token is a fifth of a credit, any other token one credit
INSERT INTO model_credits (model) VALUES ('glm-4.6'), ('glm-4.5'), ('glm-4.5-air');

CREATE TABLE plan_credits (
    plan_id         text NOT NULL REFERENCES plans (id),
    model           text NOT NULL,
    input_coeff     numeric(12, 6) NOT NULL CHECK (input_coeff >= 0),
    cached_coeff    numeric(12, 6) NOT NULL CHECK (cached_coeff >= 0),
    output_coeff    numeric(12, 6) NOT NULL CHECK (output_coeff >= 0),
    peak_multiplier numeric(8, 4) NOT NULL DEFAULT 1 CHECK (peak_multiplier >= 1),
    PRIMARY KEY (plan_id, model)
);
-- a plan whose cached weight was changed keeps it, as a per-model override
INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff)
SELECT p.id, m.model, 1, p.cached_weight, 1
  FROM plans p CROSS JOIN model_credits m
 WHERE p.cached_weight <> 0.2;
COMMENT ON COLUMN plans.cached_weight IS
    'superseded by model_credits / plan_credits (migration 0030); kept for old readers';

-- Peak hours, one row; NULL start: none. Written at start-up from CODEPLAN_PEAK_HOURS.
CREATE TABLE credit_settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    peak_start  time,
    peak_end    time,
    peak_zone   text NOT NULL DEFAULT 'Asia/Shanghai'
);
INSERT INTO credit_settings DEFAULT VALUES;

CREATE FUNCTION credit_peak_now() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT CASE
        WHEN c.peak_start IS NULL OR c.peak_end IS NULL THEN false
        WHEN c.peak_start < c.peak_end THEN
             (now() AT TIME ZONE c.peak_zone)::time >= c.peak_start
         AND (now() AT TIME ZONE c.peak_zone)::time < c.peak_end
        ELSE (now() AT TIME ZONE c.peak_zone)::time >= c.peak_start
          OR (now() AT TIME ZONE c.peak_zone)::time < c.peak_end END
      FROM credit_settings c), false);
$$;

-- the coefficients a request was admitted at (NULL on rows admitted before this migration:
-- 1, cached_weight, 1, which is how they were billed)
ALTER TABLE usage_ledger
    ADD COLUMN coeff_input numeric(12, 6),
    ADD COLUMN coeff_cached numeric(12, 6),
    ADD COLUMN coeff_output numeric(12, 6),
    -- which upstream profile served it and what that cost us, in USD, from the profile's prices
    ADD COLUMN upstream text,
    ADD COLUMN upstream_cost numeric(18, 9);
COMMENT ON COLUMN usage_ledger.billed_tokens IS 'billed credits (equal to tokens at coefficients 1, 0.2, 1)';
COMMENT ON COLUMN usage_ledger.held_tokens IS 'held credits: the worst case the request can cost';
COMMENT ON COLUMN usage_ledger.reserved_tokens IS 'reserved credits: the expected cost';

ALTER TABLE usage_daily ADD COLUMN upstream_cost numeric(18, 9) NOT NULL DEFAULT 0;

-- ---- accounts and plans for the admin API -------------------------------------------------

-- The web page's migration adds is_admin too; whichever runs first makes it.
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS is_admin boolean NOT NULL DEFAULT false;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS suspended_at timestamptz;
-- a retired plan takes no new subscriptions; those on it keep it
ALTER TABLE plans ADD COLUMN IF NOT EXISTS retired_at timestamptz;

-- Every admin action: who, what, on what, the state before and after. Written in the same
-- transaction as the change it records.
CREATE TABLE admin_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb
);
CREATE INDEX admin_audit_at ON admin_audit (at);

-- ---- upstream profiles added at run time --------------------------------------------------
-- Profiles from the configuration live in each process's configuration; this table holds the
-- profiles added through the admin API (definition set) and the switches an admin flipped on
-- configured ones (definition NULL). Every process reloads it every few seconds.
CREATE TABLE upstream_profiles (
    name        text PRIMARY KEY,
    definition  jsonb,
    enabled     boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Keys by fingerprint (a digest, never the key); `secret` only for keys added at run time.
CREATE TABLE upstream_keys (
    profile     text NOT NULL,
    fingerprint text NOT NULL,
    secret      text,
    enabled     boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (profile, fingerprint)
);

-- The per-key concurrency cap across every process on this database: `cap` slots per key,
-- each leased by one request at a time until released or until the lease lapses (its process
-- died). Used only when a cap is configured.
CREATE TABLE upstream_key_leases (
    key_id      text NOT NULL,
    slot        integer NOT NULL,
    holder      uuid,
    expires_at  timestamptz,
    PRIMARY KEY (key_id, slot)
);

-- Takes a free slot of the first key in `p_keys` (in that order of preference) that has one
-- below `p_cap`; returns the key and slot, or no row when every slot is busy. SKIP LOCKED: two
-- processes never wait on each other for a slot, they take different ones.
CREATE FUNCTION upstream_lease_acquire(p_keys text[], p_cap integer, p_holder uuid,
                                       p_seconds double precision)
RETURNS TABLE (key_id text, slot integer)
LANGUAGE sql AS $$
    UPDATE upstream_key_leases l
       SET holder = p_holder, expires_at = now() + make_interval(secs => p_seconds)
      FROM (SELECT f.key_id, f.slot FROM upstream_key_leases f
             WHERE f.key_id = ANY (p_keys) AND f.slot < p_cap
               AND (f.holder IS NULL OR f.expires_at < now())
             ORDER BY array_position(p_keys, f.key_id), f.slot
             LIMIT 1
               FOR UPDATE SKIP LOCKED) free
     WHERE l.key_id = free.key_id AND l.slot = free.slot
    RETURNING l.key_id, l.slot;
$$;

-- ---- the ledger, in credits ---------------------------------------------------------------

-- pending: as in 0005, with the request's token figures turned into credits at its model's
-- coefficients for its plan (peak multiplier included), and a suspended account refused.
CREATE OR REPLACE FUNCTION ledger_admit(
    p_id uuid, p_subscription_id bigint, p_api_key_id bigint, p_surface text, p_model text,
    p_prompt_estimate integer, p_reserve bigint, p_held bigint, p_lease_seconds double precision)
RETURNS TABLE (outcome text, window_kind text, resets_at timestamptz, allowance bigint, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    sub record;
    v_in_flight integer;
    w5 quota_windows;
    ww quota_windows;
    w quota_windows;
    week_start timestamptz;
    v_mult numeric;
    v_out bigint;
    v_reserve bigint;
    v_held bigint;
BEGIN
    SELECT coalesce(CASE WHEN a.suspended_at IS NOT NULL THEN 'suspended' END,
                    subscription_refusal(s)) AS refusal,
           s.started_at, p.window_tokens, p.weekly_tokens, p.max_concurrent, p.cached_weight,
           coalesce(pc.input_coeff, mc.input_coeff, 1) AS ci,
           coalesce(pc.cached_coeff, mc.cached_coeff, p.cached_weight) AS cc,
           coalesce(pc.output_coeff, mc.output_coeff, 1) AS co,
           coalesce(pc.peak_multiplier, mc.peak_multiplier, 1) AS peak
      INTO sub
      FROM subscriptions s JOIN plans p ON p.id = s.plan_id JOIN accounts a ON a.id = s.account_id
      LEFT JOIN model_credits mc ON mc.model = p_model
      LEFT JOIN plan_credits pc ON pc.plan_id = s.plan_id AND pc.model = p_model
     WHERE s.id = p_subscription_id;
    IF NOT FOUND OR sub.refusal IS NOT NULL THEN
        RETURN QUERY SELECT 'inactive'::text, NULL::text, NULL::timestamptz, NULL::bigint,
                            coalesce(sub.refusal, 'missing');
        RETURN;
    END IF;
    v_mult := CASE WHEN sub.peak > 1 AND credit_peak_now() THEN sub.peak ELSE 1 END;
    sub.ci := sub.ci * v_mult;
    sub.cc := sub.cc * v_mult;
    sub.co := sub.co * v_mult;
    -- the request's figures are tokens: max_tokens is what reserve adds to the estimate, the
    -- prompt's bound what held adds to max_tokens
    v_out := greatest(p_reserve - p_prompt_estimate, 0);
    v_reserve := greatest(ceil(p_prompt_estimate * sub.ci + v_out * sub.co)::bigint, 1);
    v_held := greatest(ceil((p_held - v_out) * greatest(sub.ci, sub.cc) + v_out * sub.co)::bigint,
                       v_reserve);
    IF v_held > sub.window_tokens THEN
        RETURN QUERY SELECT 'too_large'::text, '5h'::text, NULL::timestamptz, sub.window_tokens, NULL::text;
        RETURN;
    END IF;
    IF v_held > sub.weekly_tokens THEN
        RETURN QUERY SELECT 'too_large'::text, 'week'::text, NULL::timestamptz, sub.weekly_tokens, NULL::text;
        RETURN;
    END IF;

    -- the subscription's mutex, always the first lock
    SELECT f.in_flight INTO v_in_flight FROM subscription_flights f
     WHERE f.subscription_id = p_subscription_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        INSERT INTO subscription_flights (subscription_id) VALUES (p_subscription_id)
        ON CONFLICT (subscription_id) DO NOTHING;
        SELECT f.in_flight INTO v_in_flight FROM subscription_flights f
         WHERE f.subscription_id = p_subscription_id FOR NO KEY UPDATE;
    END IF;
    IF EXISTS (SELECT 1 FROM usage_ledger l WHERE l.id = p_id) THEN
        RETURN QUERY SELECT 'replayed'::text, NULL::text, NULL::timestamptz, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF sub.max_concurrent IS NOT NULL AND v_in_flight >= sub.max_concurrent THEN
        RETURN QUERY SELECT 'concurrency'::text, NULL::text, NULL::timestamptz,
                            sub.max_concurrent::bigint, NULL::text;
        RETURN;
    END IF;

    FOR w IN
        SELECT DISTINCT ON (q.kind) q.* FROM quota_windows q
         WHERE q.subscription_id = p_subscription_id
         ORDER BY q.kind, q.starts_at DESC
    LOOP
        IF w.kind = '5h' THEN w5 := w; ELSE ww := w; END IF;
    END LOOP;

    week_start := sub.started_at + floor(extract(epoch FROM now() - sub.started_at) / 604800)
                                   * interval '7 days';
    IF ww.id IS NULL OR ww.starts_at <> week_start THEN
        INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
        VALUES (p_subscription_id, 'week', week_start, week_start + interval '7 days', sub.weekly_tokens)
        ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
        SELECT * INTO ww FROM quota_windows q
         WHERE q.subscription_id = p_subscription_id AND q.kind = 'week' AND q.starts_at = week_start;
    END IF;
    SELECT * INTO ww FROM quota_windows q WHERE q.id = ww.id FOR NO KEY UPDATE;
    IF ww.posted + ww.held + v_held > ww.allowance THEN
        RETURN QUERY SELECT 'window_full'::text, 'week'::text, ww.ends_at, ww.allowance, NULL::text;
        RETURN;
    END IF;

    IF w5.id IS NULL OR w5.ends_at <= now() THEN
        INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
        VALUES (p_subscription_id, '5h', now(), now() + interval '5 hours', sub.window_tokens)
        RETURNING * INTO w5;
    ELSE
        SELECT * INTO w5 FROM quota_windows q WHERE q.id = w5.id FOR NO KEY UPDATE;
        IF w5.posted + w5.held + v_held > w5.allowance THEN
            RETURN QUERY SELECT 'window_full'::text, '5h'::text, w5.ends_at, w5.allowance, NULL::text;
            RETURN;
        END IF;
    END IF;

    UPDATE quota_windows SET reserved = reserved + v_reserve, held = held + v_held
     WHERE id IN (w5.id, ww.id);
    UPDATE subscription_flights SET in_flight = in_flight + 1 WHERE subscription_id = p_subscription_id;
    INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                              model, reserved_tokens, held_tokens, prompt_estimate, cached_weight,
                              coeff_input, coeff_cached, coeff_output, lease_until)
    VALUES (p_id, p_subscription_id, p_api_key_id, w5.id, ww.id, p_surface, p_model, v_reserve,
            v_held, p_prompt_estimate, sub.cached_weight, sub.ci, sub.cc, sub.co,
            now() + make_interval(secs => p_lease_seconds));
    RETURN QUERY SELECT 'admitted'::text, NULL::text, w5.ends_at, NULL::bigint, NULL::text;
END;
$$;

-- pending -> posted | voided | expired: as in 0005, billed in credits at the row's
-- coefficients, and recording which upstream served it and what that cost.
DROP FUNCTION ledger_settle_many(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[]);
DROP FUNCTION ledger_expire_due(integer);
DROP FUNCTION ledger_settle(uuid, text, integer, integer, integer, integer, boolean, text, text);

CREATE FUNCTION ledger_settle(
    p_id uuid, p_state text, p_prompt integer, p_completion integer, p_cached integer,
    p_reasoning integer, p_estimated boolean, p_reason text, p_upstream_request_id text,
    p_upstream text DEFAULT NULL, p_upstream_cost numeric DEFAULT NULL)
RETURNS TABLE (billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_subscription bigint;
    entry usage_ledger;
    v_billed bigint;
BEGIN
    IF p_state NOT IN ('posted', 'voided', 'expired') THEN
        RAISE EXCEPTION 'ledger_settle: % is not a settled state', p_state;
    END IF;
    SELECT l.subscription_id INTO v_subscription FROM usage_ledger l
     WHERE l.id = p_id AND l.state = 'pending';
    IF NOT FOUND THEN
        RETURN;  -- settled already: a replay is a no-op
    END IF;
    PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = v_subscription FOR NO KEY UPDATE;
    SELECT * INTO entry FROM usage_ledger l WHERE l.id = p_id AND l.state = 'pending' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;  -- another settler won while we waited
    END IF;
    p_cached := least(greatest(p_cached, 0), greatest(p_prompt, 0));
    v_billed := CASE WHEN p_state = 'voided' THEN 0 ELSE
        ceil(greatest(p_prompt - p_cached, 0) * coalesce(entry.coeff_input, 1)
             + p_cached * coalesce(entry.coeff_cached, entry.cached_weight)
             + greatest(p_completion, 0) * coalesce(entry.coeff_output, 1))::bigint END;
    IF p_estimated THEN
        -- our own numbers can never exceed what the request could cost at most
        v_billed := least(v_billed, entry.held_tokens);
    END IF;
    PERFORM ledger_lock_windows(entry.window_id, entry.week_window_id);
    UPDATE quota_windows
       SET reserved = reserved - entry.reserved_tokens, held = held - entry.held_tokens,
           posted = posted + v_billed
     WHERE id IN (entry.window_id, entry.week_window_id);
    UPDATE subscription_flights SET in_flight = in_flight - 1 WHERE subscription_id = v_subscription;
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
           upstream = coalesce(p_upstream, upstream),
           upstream_cost = CASE WHEN p_state = 'voided' THEN 0 ELSE p_upstream_cost END,
           settled_at = now()
     WHERE id = p_id;
    PERFORM pg_notify('codeplan_usage', v_subscription::text);
    RETURN QUERY SELECT v_billed;
END;
$$;

CREATE FUNCTION ledger_settle_many(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[],
    p_upstreams text[] DEFAULT NULL, p_upstream_costs numeric[] DEFAULT NULL)
RETURNS TABLE (i integer, billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    FOR k IN
        SELECT u.o::integer FROM unnest(p_ids) WITH ORDINALITY AS u(id, o)
          LEFT JOIN usage_ledger l ON l.id = u.id
         ORDER BY l.subscription_id NULLS LAST, u.o
    LOOP
        RETURN QUERY SELECT k, s.billed
          FROM ledger_settle(p_ids[k], p_states[k], p_prompt[k], p_completion[k], p_cached[k],
                             p_reasoning[k], p_estimated[k], p_reasons[k], p_upstream_request_ids[k],
                             p_upstreams[k], p_upstream_costs[k]) s;
    END LOOP;
END;
$$;

CREATE FUNCTION ledger_expire_due(p_limit integer)
RETURNS TABLE (id uuid, billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    due record;
BEGIN
    FOR due IN
        SELECT d.id, d.prompt_estimate, d.delivered_tokens FROM (
            SELECT l.id, l.subscription_id, l.prompt_estimate, l.delivered_tokens FROM usage_ledger l
             WHERE l.state = 'pending' AND l.lease_until < now()
             ORDER BY l.lease_until LIMIT p_limit) d
         ORDER BY d.subscription_id, d.id
    LOOP
        RETURN QUERY SELECT due.id, s.billed FROM ledger_settle(
            due.id, 'expired', due.prompt_estimate, due.delivered_tokens, 0, 0, true,
            'lease expired', NULL) s;
    END LOOP;
END;
$$;

-- Rollups keep the upstream cost beside the tokens (as 0002, plus upstream_cost).
CREATE OR REPLACE FUNCTION ledger_rollup(p_before timestamptz) RETURNS bigint
LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM usage_ledger
         WHERE state <> 'pending' AND created_at < p_before
        RETURNING subscription_id, (created_at AT TIME ZONE 'UTC')::date AS day, model, state,
                  prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, billed_tokens,
                  coalesce(upstream_cost, 0) AS upstream_cost
    ), summed AS (
        INSERT INTO usage_daily AS d (subscription_id, day, model, requests, prompt_tokens,
                                      completion_tokens, cached_tokens, reasoning_tokens, billed_tokens,
                                      upstream_cost)
        SELECT subscription_id, day, model, count(*), sum(prompt_tokens), sum(completion_tokens),
               sum(cached_tokens), sum(reasoning_tokens), sum(billed_tokens), sum(upstream_cost)
          FROM moved WHERE state <> 'voided'
         GROUP BY subscription_id, day, model
        ON CONFLICT (subscription_id, day, model) DO UPDATE SET
            requests = d.requests + excluded.requests,
            prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = d.completion_tokens + excluded.completion_tokens,
            cached_tokens = d.cached_tokens + excluded.cached_tokens,
            reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
            billed_tokens = d.billed_tokens + excluded.billed_tokens,
            upstream_cost = d.upstream_cost + excluded.upstream_cost
        RETURNING 1
    )
    SELECT count(*) FROM moved;
$$;

-- A plan's new allowances reach the open windows of its subscriptions at once, each
-- subscription under its mutex (the ledger's first lock), its windows in id order.
CREATE FUNCTION plan_apply_allowances(p_plan text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    n integer := 0;
BEGIN
    FOR s IN
        SELECT sub.id, p.window_tokens, p.weekly_tokens FROM subscriptions sub
          JOIN plans p ON p.id = sub.plan_id
         WHERE sub.plan_id = p_plan AND sub.status <> 'canceled' ORDER BY sub.id
    LOOP
        INSERT INTO subscription_flights (subscription_id) VALUES (s.id)
        ON CONFLICT (subscription_id) DO NOTHING;
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = s.id FOR NO KEY UPDATE;
        PERFORM 1 FROM quota_windows q WHERE q.subscription_id = s.id AND q.ends_at > now()
          ORDER BY q.id FOR NO KEY UPDATE;
        UPDATE quota_windows q
           SET allowance = CASE WHEN q.kind = '5h' THEN s.window_tokens ELSE s.weekly_tokens END
         WHERE q.subscription_id = s.id AND q.ends_at > now();
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;
