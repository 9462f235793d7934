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
-- 3. The lock order of migrations 0005/0006 is kept by every function replaced here: the
--    subscriptions' rows in subscription_flights in id order, then their ledger entries, then
--    their windows in id order.

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
-- 0006's set-based transitions (admission as 0007 left it), changed only where credits,
-- suspension and cost need it; the guards and the lock order (the subscriptions' mutexes in id
-- order, then their entries, then their windows in id order) are theirs.

-- pending: each request's token figures are first turned into credits at its model's
-- coefficients for its plan (peak multiplier included); then everything is 0006's, in credits.
-- A suspended account is refused like a subscription that may not spend (detail 'suspended').
-- The room it reports (0007: where the bridge may forward before admission commits) is in
-- tokens at the plan's dearest coefficient, since the bridge compares it with a hold in tokens.
DROP FUNCTION ledger_admit_batch(uuid[], bigint[], bigint[], text[], text[], integer[], bigint[], bigint[], double precision);
CREATE FUNCTION ledger_admit_batch(
    p_ids uuid[], p_subscription_ids bigint[], p_api_key_ids bigint[], p_surfaces text[],
    p_models text[], p_prompt_estimates integer[], p_reserves bigint[], p_helds bigint[],
    p_lease_seconds double precision)
RETURNS TABLE (i integer, outcome text, window_kind text, resets_at timestamptz, allowance bigint, detail text,
               room bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(p_ids);
    v_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    v_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_resets timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    v_allowance bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_detail text[] := array_fill(NULL::text, ARRAY[n]);
    v_room bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    sub_room bigint;
    -- per request: credits reserved and held, and the coefficients they were priced at
    c_reserve bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_held bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_in numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    c_cached numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    c_out numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    price record;
    v_out bigint;
    v_peak boolean := credit_peak_now();
    v_seen uuid[];
    sub record;
    w quota_windows;
    w5 quota_windows;
    ww quota_windows;
    new_5h boolean;
    w5_posted bigint;
    w5_held bigint;
    w5_allowance bigint;
    w5_ends timestamptz;
    week_start timestamptz;
    v_in_flight integer;
    k integer;
    admitted integer[];
    add_reserved bigint;
    add_held bigint;
    v_now timestamptz := now();
BEGIN
    -- the token figures are: max_tokens is what reserve adds to the estimate, the prompt's
    -- proven bound what held adds to max_tokens; the hold in credits takes the larger of the
    -- input coefficients for the whole prompt bound
    FOR price IN
        SELECT g.k, coalesce(pc.input_coeff, mc.input_coeff, 1) AS ci,
               coalesce(pc.cached_coeff, mc.cached_coeff, p.cached_weight, 0.2) AS cc,
               coalesce(pc.output_coeff, mc.output_coeff, 1) AS co,
               CASE WHEN v_peak THEN coalesce(pc.peak_multiplier, mc.peak_multiplier, 1) ELSE 1 END AS m
          FROM generate_series(1, n) AS g(k)
          LEFT JOIN subscriptions s ON s.id = p_subscription_ids[g.k]
          LEFT JOIN plans p ON p.id = s.plan_id
          LEFT JOIN model_credits mc ON mc.model = p_models[g.k]
          LEFT JOIN plan_credits pc ON pc.plan_id = s.plan_id AND pc.model = p_models[g.k]
    LOOP
        k := price.k;
        c_in[k] := price.ci * price.m;
        c_cached[k] := price.cc * price.m;
        c_out[k] := price.co * price.m;
        v_out := greatest(p_reserves[k] - p_prompt_estimates[k], 0);
        c_reserve[k] := greatest(ceil(p_prompt_estimates[k] * c_in[k] + v_out * c_out[k])::bigint, 1);
        c_held[k] := greatest(ceil((p_helds[k] - v_out) * greatest(c_in[k], c_cached[k])
                                   + v_out * c_out[k])::bigint, c_reserve[k]);
    END LOOP;

    -- ids admitted before: their first reply was lost, they were admitted
    SELECT array_agg(l.id) INTO v_seen FROM usage_ledger l WHERE l.id = ANY(p_ids);

    FOR sub IN
        SELECT s.id, coalesce(CASE WHEN a.suspended_at IS NOT NULL THEN 'suspended' END,
                              subscription_refusal(s)) AS refusal,
               s.started_at, p.window_tokens, p.weekly_tokens, p.max_concurrent, p.cached_weight,
               (SELECT max(greatest(coalesce(pc.input_coeff, mc.input_coeff, 1),
                                    coalesce(pc.cached_coeff, mc.cached_coeff, p.cached_weight),
                                    coalesce(pc.output_coeff, mc.output_coeff, 1))
                           * CASE WHEN v_peak THEN coalesce(pc.peak_multiplier, mc.peak_multiplier, 1) ELSE 1 END)
                  FROM unnest(p.models) AS m(model)
                  LEFT JOIN model_credits mc ON mc.model = m.model
                  LEFT JOIN plan_credits pc ON pc.plan_id = p.id AND pc.model = m.model) AS dearest
          FROM subscriptions s JOIN plans p ON p.id = s.plan_id JOIN accounts a ON a.id = s.account_id
         WHERE s.id = ANY(p_subscription_ids)
         ORDER BY s.id
    LOOP
        IF sub.refusal IS NOT NULL THEN
            FOR k IN 1..n LOOP
                IF p_subscription_ids[k] = sub.id THEN
                    v_outcome[k] := 'inactive';
                    v_detail[k] := sub.refusal;
                END IF;
            END LOOP;
            CONTINUE;
        END IF;

        -- the subscription's mutex, always the first lock
        SELECT f.in_flight INTO v_in_flight FROM subscription_flights f
         WHERE f.subscription_id = sub.id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            INSERT INTO subscription_flights (subscription_id) VALUES (sub.id)
            ON CONFLICT (subscription_id) DO NOTHING;
            SELECT f.in_flight INTO v_in_flight FROM subscription_flights f
             WHERE f.subscription_id = sub.id FOR NO KEY UPDATE;
        END IF;

        w5 := NULL;
        ww := NULL;
        FOR w IN
            SELECT DISTINCT ON (q.kind) q.* FROM quota_windows q
             WHERE q.subscription_id = sub.id
             ORDER BY q.kind, q.starts_at DESC
        LOOP
            IF w.kind = '5h' THEN w5 := w; ELSE ww := w; END IF;
        END LOOP;
        week_start := sub.started_at + floor(extract(epoch FROM v_now - sub.started_at) / 604800)
                                       * interval '7 days';
        IF ww.id IS NULL OR ww.starts_at <> week_start THEN
            INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
            VALUES (sub.id, 'week', week_start, week_start + interval '7 days', sub.weekly_tokens)
            ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
            SELECT * INTO ww FROM quota_windows q
             WHERE q.subscription_id = sub.id AND q.kind = 'week' AND q.starts_at = week_start;
        END IF;
        new_5h := w5.id IS NULL OR w5.ends_at <= v_now;
        IF new_5h THEN
            SELECT * INTO ww FROM quota_windows q WHERE q.id = ww.id FOR NO KEY UPDATE;
            w5_posted := 0; w5_held := 0; w5_allowance := sub.window_tokens;
            w5_ends := v_now + interval '5 hours';
        ELSE
            FOR w IN SELECT * FROM quota_windows q WHERE q.id IN (w5.id, ww.id) ORDER BY q.id
                       FOR NO KEY UPDATE
            LOOP
                IF w.kind = '5h' THEN w5 := w; ELSE ww := w; END IF;
            END LOOP;
            w5_posted := w5.posted; w5_held := w5.held; w5_allowance := w5.allowance;
            w5_ends := w5.ends_at;
        END IF;

        admitted := '{}';
        add_reserved := 0;
        add_held := 0;
        FOR k IN 1..n LOOP
            CONTINUE WHEN p_subscription_ids[k] <> sub.id;
            IF v_seen IS NOT NULL AND p_ids[k] = ANY(v_seen) THEN
                v_outcome[k] := 'replayed';
            ELSIF c_held[k] > sub.window_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := '5h'; v_allowance[k] := sub.window_tokens;
            ELSIF c_held[k] > sub.weekly_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := 'week'; v_allowance[k] := sub.weekly_tokens;
            ELSIF sub.max_concurrent IS NOT NULL
                  AND v_in_flight + cardinality(admitted) >= sub.max_concurrent THEN
                v_outcome[k] := 'concurrency'; v_allowance[k] := sub.max_concurrent;
            ELSIF ww.posted + ww.held + add_held + c_held[k] > ww.allowance THEN
                v_outcome[k] := 'window_full'; v_kind[k] := 'week';
                v_resets[k] := ww.ends_at; v_allowance[k] := ww.allowance;
            ELSIF w5_posted + w5_held + add_held + c_held[k] > w5_allowance THEN
                v_outcome[k] := 'window_full'; v_kind[k] := '5h';
                v_resets[k] := w5_ends; v_allowance[k] := w5_allowance;
            ELSE
                v_outcome[k] := 'admitted';
                admitted := admitted || k;
                add_reserved := add_reserved + c_reserve[k];
                add_held := add_held + c_held[k];
            END IF;
        END LOOP;
        -- what is left for the next request, in tokens at the plan's dearest rate
        sub_room := floor((least(ww.allowance - ww.posted - ww.held, w5_allowance - w5_posted - w5_held)
                           - add_held) / greatest(coalesce(sub.dearest, 1), 0.000001));
        FOR k IN 1..n LOOP
            IF p_subscription_ids[k] = sub.id THEN
                v_room[k] := sub_room;
            END IF;
        END LOOP;
        CONTINUE WHEN cardinality(admitted) = 0;

        IF new_5h THEN
            INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
            VALUES (sub.id, '5h', v_now, v_now + interval '5 hours', sub.window_tokens)
            RETURNING * INTO w5;
        END IF;
        UPDATE quota_windows SET reserved = reserved + add_reserved, held = held + add_held
         WHERE id IN (w5.id, ww.id);
        UPDATE subscription_flights SET in_flight = in_flight + cardinality(admitted)
         WHERE subscription_id = sub.id;
        INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                                  model, reserved_tokens, held_tokens, prompt_estimate, cached_weight,
                                  coeff_input, coeff_cached, coeff_output, lease_until)
        SELECT p_ids[a], sub.id, p_api_key_ids[a], w5.id, ww.id, p_surfaces[a], p_models[a],
               c_reserve[a], c_held[a], p_prompt_estimates[a], sub.cached_weight,
               c_in[a], c_cached[a], c_out[a], v_now + make_interval(secs => p_lease_seconds)
          FROM unnest(admitted) AS a;
        FOREACH k IN ARRAY admitted LOOP
            v_resets[k] := w5.ends_at;
        END LOOP;
    END LOOP;

    RETURN QUERY
        SELECT g.k, coalesce(v_outcome[g.k], 'inactive'), v_kind[g.k], v_resets[g.k], v_allowance[g.k],
               CASE WHEN v_outcome[g.k] IS NULL THEN 'missing' ELSE v_detail[g.k] END, v_room[g.k]
          FROM generate_series(1, n) AS g(k);
END;
$$;

-- pending -> posted | voided | expired for a batch: 0006's, billed in credits at each row's
-- coefficients (rows admitted before 0030 have none: 1, their cached weight, 1, as they were
-- billed), recording which upstream served each request and what it cost.
DROP FUNCTION ledger_settle(uuid, text, integer, integer, integer, integer, boolean, text, text);
DROP FUNCTION ledger_settle_batch(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[]);
CREATE FUNCTION ledger_settle_batch(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[],
    p_upstreams text[] DEFAULT NULL, p_upstream_costs numeric[] DEFAULT NULL)
RETURNS TABLE (i integer, billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_subscription bigint;
    v_billed bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_ids)]);
    r record;
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_states) AS s(state) WHERE s.state NOT IN ('posted', 'voided', 'expired')) THEN
        RAISE EXCEPTION 'ledger_settle_batch: not a settled state in %', p_states;
    END IF;
    FOR v_subscription IN
        SELECT DISTINCT l.subscription_id FROM usage_ledger l
         WHERE l.id = ANY(p_ids) AND l.state = 'pending'
         ORDER BY 1
    LOOP
        -- lock order: the subscription's mutex, its entries, its windows in id order
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = v_subscription FOR NO KEY UPDATE;
        PERFORM 1 FROM usage_ledger l
         WHERE l.id = ANY(p_ids) AND l.subscription_id = v_subscription AND l.state = 'pending'
         ORDER BY l.id FOR UPDATE;
        PERFORM 1 FROM quota_windows q
         WHERE q.id IN (SELECT unnest(ARRAY[l.window_id, l.week_window_id]) FROM usage_ledger l
                         WHERE l.id = ANY(p_ids) AND l.subscription_id = v_subscription AND l.state = 'pending')
         ORDER BY q.id FOR NO KEY UPDATE;

        FOR r IN
            WITH input AS (
                SELECT DISTINCT ON (u.id) u.*
                  FROM unnest(p_ids, p_states, p_prompt, p_completion, p_cached, p_reasoning, p_estimated,
                              p_reasons, p_upstream_request_ids, p_upstreams, p_upstream_costs)
                       WITH ORDINALITY AS u(id, state, prompt, completion, cached, reasoning, estimated,
                                            reason, upstream_request_id, upstream, cost, k)
                 WHERE u.id IS NOT NULL
                 ORDER BY u.id, u.k
            ), priced AS (
                SELECT x.*, l.reserved_tokens, l.held_tokens, l.window_id, l.week_window_id,
                       least(greatest(x.cached, 0), greatest(x.prompt, 0)) AS cached_counted,
                       CASE WHEN x.state = 'voided' THEN 0::bigint ELSE
                           CASE WHEN x.estimated THEN least(l.held_tokens, b.raw) ELSE b.raw END
                       END AS billed
                  FROM input x
                  JOIN usage_ledger l ON l.id = x.id
                 CROSS JOIN LATERAL (SELECT ceil(
                        greatest(x.prompt - least(greatest(x.cached, 0), greatest(x.prompt, 0)), 0)
                            * coalesce(l.coeff_input, 1)
                        + least(greatest(x.cached, 0), greatest(x.prompt, 0))
                            * coalesce(l.coeff_cached, l.cached_weight)
                        + greatest(x.completion, 0) * coalesce(l.coeff_output, 1))::bigint AS raw) b
                 WHERE l.subscription_id = v_subscription AND l.state = 'pending'
            ), settled AS (
                UPDATE usage_ledger l
                   SET state = p.state,
                       prompt_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.prompt END,
                       completion_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.completion END,
                       cached_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.cached_counted END,
                       reasoning_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.reasoning END,
                       billed_tokens = p.billed,
                       estimated = p.estimated,
                       settle_reason = p.reason,
                       upstream_request_id = coalesce(p.upstream_request_id, l.upstream_request_id),
                       upstream = coalesce(p.upstream, l.upstream),
                       upstream_cost = CASE WHEN p.state = 'voided' THEN 0 ELSE p.cost END,
                       settled_at = now()
                  FROM priced p
                 WHERE l.id = p.id AND l.state = 'pending'
             RETURNING p.k, p.billed, l.window_id, l.week_window_id, l.reserved_tokens, l.held_tokens
            ), moved AS (
                UPDATE quota_windows q
                   SET reserved = q.reserved - m.reserved, held = q.held - m.held, posted = q.posted + m.billed
                  FROM (SELECT v.window_id, sum(s.reserved_tokens) AS reserved, sum(s.held_tokens) AS held,
                               sum(s.billed) AS billed
                          FROM settled s
                         CROSS JOIN LATERAL (VALUES (s.window_id), (s.week_window_id)) AS v(window_id)
                         GROUP BY v.window_id) m
                 WHERE q.id = m.window_id
             RETURNING 1
            ), counted AS (
                UPDATE subscription_flights f
                   SET in_flight = f.in_flight - (SELECT count(*) FROM settled)
                 WHERE f.subscription_id = v_subscription
             RETURNING 1
            )
            SELECT s.k, s.billed FROM settled s
        LOOP
            v_billed[r.k] := r.billed;
        END LOOP;
        PERFORM pg_notify('codeplan_usage', v_subscription::text);
    END LOOP;
    RETURN QUERY SELECT g.k, v_billed[g.k] FROM generate_series(1, cardinality(p_ids)) AS g(k)
                  WHERE v_billed[g.k] IS NOT NULL;
END;
$$;

CREATE FUNCTION ledger_settle(
    p_id uuid, p_state text, p_prompt integer, p_completion integer, p_cached integer,
    p_reasoning integer, p_estimated boolean, p_reason text, p_upstream_request_id text,
    p_upstream text DEFAULT NULL, p_upstream_cost numeric DEFAULT NULL)
RETURNS TABLE (billed bigint)
LANGUAGE sql AS $$
    SELECT s.billed FROM ledger_settle_batch(ARRAY[p_id], ARRAY[p_state], ARRAY[p_prompt], ARRAY[p_completion],
                                             ARRAY[p_cached], ARRAY[p_reasoning], ARRAY[p_estimated],
                                             ARRAY[p_reason], ARRAY[p_upstream_request_id],
                                             ARRAY[p_upstream], ARRAY[p_upstream_cost]) s;
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
