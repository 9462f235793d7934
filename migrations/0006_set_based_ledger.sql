-- Set-based transitions: a batch of admissions (or settlements) costs a handful of statements per
-- subscription, not per request. Under load on one key, 32 admissions that arrive together take
-- one lock of the subscription's mutex, one read and one update of each window, one update of the
-- flight counter and one INSERT; before, each ran the whole single-request function.
--
-- The rules are 0005's, unchanged: the same guards (only a pending entry settles; an id admitted
-- before is `replayed`), the same hold arithmetic, the same lock order (the subscriptions'
-- mutexes in id order, then their entries, then their windows in id order). The single-request
-- functions become the one-element case of these, so there is one implementation.

DROP INDEX usage_ledger_pending_sub;  -- it served the pending count the flight counter replaced
DROP FUNCTION ledger_admit_many(uuid[], bigint[], bigint[], text[], text[], integer[], bigint[], bigint[], double precision);
DROP FUNCTION ledger_settle_many(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[]);

CREATE FUNCTION ledger_admit_batch(
    p_ids uuid[], p_subscription_ids bigint[], p_api_key_ids bigint[], p_surfaces text[],
    p_models text[], p_prompt_estimates integer[], p_reserves bigint[], p_helds bigint[],
    p_lease_seconds double precision)
RETURNS TABLE (i integer, outcome text, window_kind text, resets_at timestamptz, allowance bigint, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(p_ids);
    v_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    v_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_resets timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    v_allowance bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_detail text[] := array_fill(NULL::text, ARRAY[n]);
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
               CASE WHEN v_outcome[g.k] IS NULL THEN 'missing' ELSE v_detail[g.k] END
          FROM generate_series(1, n) AS g(k);
END;
$$;

-- pending -> posted | voided | expired for a batch. Returns each element's billed tokens, or no
-- billed value for an element whose entry was not pending (a replay, or another settler won).
CREATE FUNCTION ledger_settle_batch(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[])
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
                              p_reasons, p_upstream_request_ids)
                       WITH ORDINALITY AS u(id, state, prompt, completion, cached, reasoning, estimated,
                                            reason, upstream_request_id, k)
                 ORDER BY u.id, u.k
            ), priced AS (
                SELECT x.*, l.reserved_tokens, l.held_tokens, l.window_id, l.week_window_id,
                       least(greatest(x.cached, 0), greatest(x.prompt, 0)) AS cached_counted,
                       CASE WHEN x.state = 'voided' THEN 0::bigint ELSE
                           CASE WHEN x.estimated THEN least(l.held_tokens, b.raw) ELSE b.raw END
                       END AS billed
                  FROM input x
                  JOIN usage_ledger l ON l.id = x.id
                 CROSS JOIN LATERAL (SELECT greatest(x.prompt - least(greatest(x.cached, 0), greatest(x.prompt, 0)), 0)
                                            + ceil(least(greatest(x.cached, 0), greatest(x.prompt, 0)) * l.cached_weight)::bigint
                                            + greatest(x.completion, 0) AS raw) b
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
            -- (moved and counted run to completion whether read or not)
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

-- The single-request transitions are the one-element case, so there is one implementation.
DROP FUNCTION ledger_admit(uuid, bigint, bigint, text, text, integer, bigint, bigint, double precision);
CREATE FUNCTION ledger_admit(
    p_id uuid, p_subscription_id bigint, p_api_key_id bigint, p_surface text, p_model text,
    p_prompt_estimate integer, p_reserve bigint, p_held bigint, p_lease_seconds double precision)
RETURNS TABLE (outcome text, window_kind text, resets_at timestamptz, allowance bigint, detail text)
LANGUAGE sql AS $$
    SELECT a.outcome, a.window_kind, a.resets_at, a.allowance, a.detail
      FROM ledger_admit_batch(ARRAY[p_id], ARRAY[p_subscription_id], ARRAY[p_api_key_id], ARRAY[p_surface],
                              ARRAY[p_model], ARRAY[p_prompt_estimate], ARRAY[p_reserve], ARRAY[p_held],
                              p_lease_seconds) a;
$$;

CREATE OR REPLACE FUNCTION ledger_settle(
    p_id uuid, p_state text, p_prompt integer, p_completion integer, p_cached integer,
    p_reasoning integer, p_estimated boolean, p_reason text, p_upstream_request_id text)
RETURNS TABLE (billed bigint)
LANGUAGE sql AS $$
    SELECT s.billed FROM ledger_settle_batch(ARRAY[p_id], ARRAY[p_state], ARRAY[p_prompt], ARRAY[p_completion],
                                             ARRAY[p_cached], ARRAY[p_reasoning], ARRAY[p_estimated],
                                             ARRAY[p_reason], ARRAY[p_upstream_request_id]) s;
$$;

-- The sweeper: pending entries whose process stopped heart-beating, expired in one batch at what
-- they can prove (the prompt estimate plus the completion tokens their last heartbeat recorded).
-- The scan takes no locks; the batch settlement is guarded like any other.
CREATE OR REPLACE FUNCTION ledger_expire_due(p_limit integer)
RETURNS TABLE (id uuid, billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[];
    prompts integer[];
    delivered integer[];
    n integer;
BEGIN
    SELECT array_agg(d.id), array_agg(d.prompt_estimate), array_agg(d.delivered_tokens)
      INTO ids, prompts, delivered
      FROM (SELECT l.id, l.prompt_estimate, l.delivered_tokens FROM usage_ledger l
             WHERE l.state = 'pending' AND l.lease_until < now()
             ORDER BY l.lease_until LIMIT p_limit) d;
    n := coalesce(cardinality(ids), 0);
    IF n = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT ids[s.i], s.billed
          FROM ledger_settle_batch(ids, array_fill('expired'::text, ARRAY[n]), prompts, delivered,
                                   array_fill(0, ARRAY[n]), array_fill(0, ARRAY[n]),
                                   array_fill(true, ARRAY[n]), array_fill('lease expired'::text, ARRAY[n]),
                                   array_fill(NULL::text, ARRAY[n])) s;
END;
$$;
