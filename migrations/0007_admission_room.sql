-- Admission also says how much room the subscription's windows have left after it, so the bridge
-- can start forwarding before admission commits where the window has room to spare (and admit
-- first near the edge, where a refusal is likely). The function is 0006's otherwise, unchanged.

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
    -- ids admitted before: their first reply was lost, they were admitted
    SELECT array_agg(l.id) INTO v_seen FROM usage_ledger l WHERE l.id = ANY(p_ids);

    FOR sub IN
        SELECT s.id, subscription_refusal(s) AS refusal, s.started_at, p.window_tokens,
               p.weekly_tokens, p.max_concurrent, p.cached_weight
          FROM subscriptions s JOIN plans p ON p.id = s.plan_id
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

        -- the newest window of each kind; the weekly one is anchored to the subscription's start
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
        -- the 5-hour window opens at the first request admitted after the previous one closed
        new_5h := w5.id IS NULL OR w5.ends_at <= v_now;
        -- windows in id order; a plan change (billing) may move an allowance meanwhile
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

        -- each request of this subscription in arrival order, against the running totals
        admitted := '{}';
        add_reserved := 0;
        add_held := 0;
        FOR k IN 1..n LOOP
            CONTINUE WHEN p_subscription_ids[k] <> sub.id;
            IF v_seen IS NOT NULL AND p_ids[k] = ANY(v_seen) THEN
                v_outcome[k] := 'replayed';
            ELSIF p_helds[k] > sub.window_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := '5h'; v_allowance[k] := sub.window_tokens;
            ELSIF p_helds[k] > sub.weekly_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := 'week'; v_allowance[k] := sub.weekly_tokens;
            ELSIF sub.max_concurrent IS NOT NULL
                  AND v_in_flight + cardinality(admitted) >= sub.max_concurrent THEN
                v_outcome[k] := 'concurrency'; v_allowance[k] := sub.max_concurrent;
            ELSIF ww.posted + ww.held + add_held + p_helds[k] > ww.allowance THEN
                v_outcome[k] := 'window_full'; v_kind[k] := 'week';
                v_resets[k] := ww.ends_at; v_allowance[k] := ww.allowance;
            ELSIF w5_posted + w5_held + add_held + p_helds[k] > w5_allowance THEN
                v_outcome[k] := 'window_full'; v_kind[k] := '5h';
                v_resets[k] := w5_ends; v_allowance[k] := w5_allowance;
            ELSE
                v_outcome[k] := 'admitted';
                admitted := admitted || k;
                add_reserved := add_reserved + p_reserves[k];
                add_held := add_held + p_helds[k];
            END IF;
        END LOOP;
        -- what is left for the next request (the bridge forwards before admission commits only
        -- where the window has room to spare)
        sub_room := least(ww.allowance - ww.posted - ww.held, w5_allowance - w5_posted - w5_held) - add_held;
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
                                  lease_until)
        SELECT p_ids[a], sub.id, p_api_key_ids[a], w5.id, ww.id, p_surfaces[a], p_models[a],
               p_reserves[a], p_helds[a], p_prompt_estimates[a], sub.cached_weight,
               v_now + make_interval(secs => p_lease_seconds)
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
