-- Admission and settlement are the request path's two database calls; make them cheaper.
--
-- 1. usage_ledger loses its foreign keys: every insert ran four referential-integrity
--    triggers (each a locking read of the parent row) although ledger_admit writes a row only
--    for the subscription, key and windows it has just read and locked. The references stay
--    true by construction; the columns keep their indexes for lookups.
-- 2. ledger_admit looks for the current windows before trying to create them, instead of a
--    speculative INSERT ... ON CONFLICT on every call, and reads both windows in one query.

ALTER TABLE usage_ledger DROP CONSTRAINT usage_ledger_subscription_id_fkey;
ALTER TABLE usage_ledger DROP CONSTRAINT usage_ledger_api_key_id_fkey;
ALTER TABLE usage_ledger DROP CONSTRAINT usage_ledger_window_id_fkey;
ALTER TABLE usage_ledger DROP CONSTRAINT usage_ledger_week_window_id_fkey;

CREATE OR REPLACE FUNCTION ledger_admit(
    p_id uuid, p_subscription_id bigint, p_api_key_id bigint, p_surface text, p_model text,
    p_prompt_estimate integer, p_reserve bigint, p_lease_seconds double precision)
RETURNS TABLE (outcome text, window_kind text, resets_at timestamptz, allowance bigint)
LANGUAGE plpgsql AS $$
DECLARE
    sub record;
    w5 quota_windows;
    ww quota_windows;
    w quota_windows;
    week_start timestamptz;
    in_flight integer;
BEGIN
    SELECT s.status, s.started_at, p.window_tokens, p.weekly_tokens, p.max_concurrent, p.cached_weight
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

    -- the newest window of each kind, in one read
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
        SELECT * INTO ww FROM quota_windows
         WHERE subscription_id = p_subscription_id AND kind = 'week' AND starts_at = week_start;
    END IF;
    IF ww.reserved + ww.posted + p_reserve > ww.allowance THEN
        RETURN QUERY SELECT 'window_full'::text, 'week'::text, ww.ends_at, ww.allowance;
        RETURN;
    END IF;

    -- The 5-hour window opens at the first request after the previous one closed.
    IF w5.id IS NULL OR w5.ends_at <= now() THEN
        INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
        VALUES (p_subscription_id, '5h', now(), now() + interval '5 hours', sub.window_tokens)
        RETURNING * INTO w5;
    ELSIF w5.reserved + w5.posted + p_reserve > w5.allowance THEN
        RETURN QUERY SELECT 'window_full'::text, '5h'::text, w5.ends_at, w5.allowance;
        RETURN;
    END IF;

    -- the primary key refuses a replay that raced past the check above, before a total moves
    INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                              model, reserved_tokens, prompt_estimate, cached_weight, lease_until)
    VALUES (p_id, p_subscription_id, p_api_key_id, w5.id, ww.id, p_surface, p_model, p_reserve,
            p_prompt_estimate, sub.cached_weight,
            now() + make_interval(secs => p_lease_seconds))
    ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'replayed'::text, NULL::text, NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    PERFORM ledger_lock_windows(w5.id, ww.id);
    UPDATE quota_windows SET reserved = reserved + p_reserve WHERE id IN (w5.id, ww.id);
    RETURN QUERY SELECT 'admitted'::text, NULL::text, w5.ends_at, NULL::bigint;
END;
$$;
