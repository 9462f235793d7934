-- The money-safe ledger: zero overshoot, no lock waits that can deadlock, billing states.
--
-- 1. Zero overshoot. Every window keeps `held` besides `reserved`: `reserved` sums what the
--    pending requests are expected to cost (prompt estimate + max_tokens, what users see),
--    `held` what they can cost at most (a proven upper bound of the prompt + max_tokens,
--    bridge/metering.py). Admission requires posted + held + the request's hold <= allowance, so
--    no window's posted can pass its allowance whatever the prompts turn out to be. A settlement
--    at our own numbers (estimated) is capped at the entry's hold; the upstream's own numbers
--    are within it by construction.
--
-- 2. One lock order, no waits in a cycle. Every transition of a subscription's money takes, in
--    this order: the subscription's row in `subscription_flights` (its mutex and its count of
--    requests in flight), then the ledger entry, then the windows in id order. Batches take
--    subscriptions in id order. Nobody locks `subscriptions` itself any more: the old admission
--    held it FOR UPDATE while a concurrent settlement's foreign-key check wanted KEY SHARE on it
--    and held the windows the admission waited for (69 deadlocks at 32 requests on one key).
--    The sweeper no longer locks rows while it scans; each expiry is a guarded settlement.
--
-- 3. Billing states. `subscription_refusal(s)` says why a subscription may not spend (NULL: it
--    may); billing replaces it to add grace periods. Admission reports it as `detail`.
--
-- 4. Live usage. Every settlement notifies channel `codeplan_usage` with the subscription id.

ALTER TABLE quota_windows ADD COLUMN held bigint NOT NULL DEFAULT 0 CHECK (held >= 0);
UPDATE quota_windows SET held = reserved;
ALTER TABLE quota_windows ADD CONSTRAINT quota_windows_held_covers_reserved CHECK (held >= reserved);

ALTER TABLE usage_ledger ADD COLUMN held_tokens bigint;
UPDATE usage_ledger SET held_tokens = reserved_tokens;
ALTER TABLE usage_ledger ALTER COLUMN held_tokens SET NOT NULL;

CREATE TABLE subscription_flights (
    subscription_id bigint PRIMARY KEY REFERENCES subscriptions (id),
    in_flight       integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0)
);
INSERT INTO subscription_flights (subscription_id, in_flight)
SELECT s.id, count(l.id) FROM subscriptions s
  LEFT JOIN usage_ledger l ON l.subscription_id = s.id AND l.state = 'pending'
 GROUP BY s.id;

CREATE FUNCTION subscription_refusal(s subscriptions) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN s.status = 'active' THEN NULL ELSE s.status END;
$$;

DROP FUNCTION ledger_admit_many(uuid[], bigint[], bigint[], text[], text[], integer[], bigint[], double precision);
DROP FUNCTION ledger_admit(uuid, bigint, bigint, text, text, integer, bigint, double precision);

-- pending: hold `p_held` tokens (reserve `p_reserve` of them) in the subscription's open
-- 5-hour and weekly windows. Outcomes: admitted | replayed (this id was admitted before) |
-- inactive (detail: why) | too_large | window_full | concurrency.
CREATE FUNCTION ledger_admit(
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
BEGIN
    SELECT subscription_refusal(s) AS refusal, s.started_at, p.window_tokens, p.weekly_tokens,
           p.max_concurrent, p.cached_weight
      INTO sub
      FROM subscriptions s JOIN plans p ON p.id = s.plan_id
     WHERE s.id = p_subscription_id;
    IF NOT FOUND OR sub.refusal IS NOT NULL THEN
        RETURN QUERY SELECT 'inactive'::text, NULL::text, NULL::timestamptz, NULL::bigint,
                            coalesce(sub.refusal, 'missing');
        RETURN;
    END IF;
    IF p_held > sub.window_tokens THEN
        RETURN QUERY SELECT 'too_large'::text, '5h'::text, NULL::timestamptz, sub.window_tokens, NULL::text;
        RETURN;
    END IF;
    IF p_held > sub.weekly_tokens THEN
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

    -- the newest window of each kind (under the mutex, no admission or settlement moves them)
    FOR w IN
        SELECT DISTINCT ON (q.kind) q.* FROM quota_windows q
         WHERE q.subscription_id = p_subscription_id
         ORDER BY q.kind, q.starts_at DESC
    LOOP
        IF w.kind = '5h' THEN w5 := w; ELSE ww := w; END IF;
    END LOOP;

    -- The weekly window is anchored to the subscription's start.
    week_start := sub.started_at + floor(extract(epoch FROM now() - sub.started_at) / 604800)
                                   * interval '7 days';
    IF ww.id IS NULL OR ww.starts_at <> week_start THEN
        INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
        VALUES (p_subscription_id, 'week', week_start, week_start + interval '7 days', sub.weekly_tokens)
        ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
        SELECT * INTO ww FROM quota_windows q
         WHERE q.subscription_id = p_subscription_id AND q.kind = 'week' AND q.starts_at = week_start;
    END IF;
    -- windows in id order; a plan change (billing) may move an allowance meanwhile
    SELECT * INTO ww FROM quota_windows q WHERE q.id = ww.id FOR NO KEY UPDATE;
    IF ww.posted + ww.held + p_held > ww.allowance THEN
        RETURN QUERY SELECT 'window_full'::text, 'week'::text, ww.ends_at, ww.allowance, NULL::text;
        RETURN;
    END IF;

    -- The 5-hour window opens at the first request after the previous one closed.
    IF w5.id IS NULL OR w5.ends_at <= now() THEN
        INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
        VALUES (p_subscription_id, '5h', now(), now() + interval '5 hours', sub.window_tokens)
        RETURNING * INTO w5;
    ELSE
        SELECT * INTO w5 FROM quota_windows q WHERE q.id = w5.id FOR NO KEY UPDATE;
        IF w5.posted + w5.held + p_held > w5.allowance THEN
            RETURN QUERY SELECT 'window_full'::text, '5h'::text, w5.ends_at, w5.allowance, NULL::text;
            RETURN;
        END IF;
    END IF;

    UPDATE quota_windows SET reserved = reserved + p_reserve, held = held + p_held
     WHERE id IN (w5.id, ww.id);
    UPDATE subscription_flights SET in_flight = in_flight + 1 WHERE subscription_id = p_subscription_id;
    INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                              model, reserved_tokens, held_tokens, prompt_estimate, cached_weight,
                              lease_until)
    VALUES (p_id, p_subscription_id, p_api_key_id, w5.id, ww.id, p_surface, p_model, p_reserve,
            p_held, p_prompt_estimate, sub.cached_weight,
            now() + make_interval(secs => p_lease_seconds));
    RETURN QUERY SELECT 'admitted'::text, NULL::text, w5.ends_at, NULL::bigint, NULL::text;
END;
$$;

CREATE FUNCTION ledger_admit_many(
    p_ids uuid[], p_subscription_ids bigint[], p_api_key_ids bigint[], p_surfaces text[],
    p_models text[], p_prompt_estimates integer[], p_reserves bigint[], p_helds bigint[],
    p_lease_seconds double precision)
RETURNS TABLE (i integer, outcome text, window_kind text, resets_at timestamptz, allowance bigint,
               detail text)
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    -- subscriptions in id order: every batch in every process locks in the same order
    FOR k IN
        SELECT u.o::integer FROM unnest(p_subscription_ids) WITH ORDINALITY AS u(s, o) ORDER BY u.s, u.o
    LOOP
        RETURN QUERY SELECT k, a.outcome, a.window_kind, a.resets_at, a.allowance, a.detail
          FROM ledger_admit(p_ids[k], p_subscription_ids[k], p_api_key_ids[k], p_surfaces[k],
                            p_models[k], p_prompt_estimates[k], p_reserves[k], p_helds[k],
                            p_lease_seconds) a;
    END LOOP;
END;
$$;

-- pending -> posted | voided | expired, with the counts it settles at. Returns the billed
-- tokens, or no row when the entry was not pending (a replay, or another settler won).
CREATE OR REPLACE FUNCTION ledger_settle(
    p_id uuid, p_state text, p_prompt integer, p_completion integer, p_cached integer,
    p_reasoning integer, p_estimated boolean, p_reason text, p_upstream_request_id text)
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
        greatest(p_prompt - p_cached, 0) + ceil(p_cached * entry.cached_weight)::bigint
        + greatest(p_completion, 0) END;
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
           settled_at = now()
     WHERE id = p_id;
    PERFORM pg_notify('codeplan_usage', v_subscription::text);
    RETURN QUERY SELECT v_billed;
END;
$$;

-- Locks the windows a transition moves, in id order, without taking the key lock a foreign
-- key check would conflict with.
CREATE OR REPLACE FUNCTION ledger_lock_windows(a bigint, b bigint) RETURNS void
LANGUAGE sql AS $$
    SELECT 1 FROM quota_windows WHERE id IN (a, b) ORDER BY id FOR NO KEY UPDATE;
$$;

-- The sweeper: pending entries whose process stopped heart-beating are expired at what they
-- can prove: the prompt estimate plus the completion tokens their last heartbeat recorded.
-- The scan takes no locks; each expiry is a guarded settlement, so a settler that wins the
-- race leaves nothing to do. Subscriptions in id order, as every batch.
CREATE OR REPLACE FUNCTION ledger_expire_due(p_limit integer)
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
