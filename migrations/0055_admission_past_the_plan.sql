-- Admission past the plan (found by a hunt, each proven by a test: tests/test_admission_mends.py):
--
-- 1. An "unlimited" plan failed every admission. The admin API takes allowances up to a bigint
--    (service/admin/plans.py), and the room admission answers (what the next request could
--    hold, in tokens at the plan's dearest rate) is the room in credits divided by that rate:
--    below one credit a token (0.25, say), a room past 2^63 / 4 credits made more tokens than a
--    bigint holds (a free model's rate is taken as 0.000001: a room of 10^13 credits did), and
--    with a top-up beside it the plan's room plus the top-up's did already.
--    Every admission of the plan failed (bigint out of range), was tried again alone, failed the
--    same, and its client was told the database could not be reached (a 503, on every request).
--    Now the room is summed and divided in numeric and kept within a bigint: a room that large
--    is as good as any (the bridge only compares it with twice a request's hold).
--    (The other sums on allowances here add posted, held and one request's hold to a window's
--    figures, which no usage brings near 2^63; the admin API now bounds allowances at 2^53 - 1.)
--
-- 2. A request larger than a whole plan window was refused as too_large before any extra window
--    was looked at, though README "Beyond the plan" says the plan holds what it has room for and
--    one extra window the rest: a fresh window of 1,000 credits and a top-up of 100,000 refused a
--    request of 1,500 (with a room of 101,000 in the same answer). Now a request is too large
--    only when the rest, past the smaller of the plan's whole windows, is more than any live
--    extra window could ever hold (its allowance less what it has posted; this period's
--    overage cap where the overage window is yet to be made); otherwise it goes on to the split
--    as any other request, and is admitted or refused as full (a plan-only try, 0041, as full:
--    it is tried again, then may draw on the extra window). That bound is read only for such a
--    request, once per subscription of the batch: nothing is added to a request within the plan.
--
-- ledger_admit_batch is 0050's, replaced whole (same signature: prepared statements of older
-- processes still run); only the too_large test and the room's arithmetic changed.

CREATE OR REPLACE FUNCTION ledger_admit_batch(
    p_ids uuid[], p_subscription_ids bigint[], p_api_key_ids bigint[], p_surfaces text[],
    p_models text[], p_prompt_estimates integer[], p_reserves bigint[], p_helds bigint[],
    p_lease_seconds double precision, p_plan_only boolean[] DEFAULT NULL)
RETURNS TABLE (i integer, outcome text, window_kind text, resets_at timestamptz, allowance bigint, detail text,
               room bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $$
DECLARE
    n integer := cardinality(p_ids);
    v_now timestamptz := now();
    v_peak boolean := credit_peak_now();
    -- per request (index k, arrival order)
    v_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    v_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_resets timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    v_allowance bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_detail text[] := array_fill(NULL::text, ARRAY[n]);
    v_room bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_reserve bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_held bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_in numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    c_cached numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    c_out numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    v_plan_held bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_plan_reserved bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_extra bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_extra_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_extra_held bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_extra_reserved bigint[] := array_fill(0::bigint, ARRAY[n]);
    r_sub integer[];      -- the position of the request's subscription in the s_ arrays
    r_order integer[];    -- requests by subscription position, then arrival
    v_admitted integer[] := '{}';
    v_seen uuid[];
    v_marked uuid[];  -- voided before they got here (0044)
    -- per subscription of the batch (index j, by subscription id)
    s_id bigint[];
    s_count integer;
    s_refusal text[];
    s_started timestamptz[];
    s_window bigint[];
    s_weekly bigint[];
    s_max_concurrent integer[];
    s_cached_weight numeric[];
    s_overage_cap bigint[];
    s_dearest numeric[];
    s_in_flight integer[];
    s_has_extra boolean[];
    s_first integer[];
    s_last integer[];
    w5_id bigint[];
    w5_posted bigint[];
    w5_held bigint[];
    w5_allowance bigint[];
    w5_ends timestamptz[];
    ww_id bigint[];
    ww_posted bigint[];
    ww_held bigint[];
    ww_allowance bigint[];
    ww_starts timestamptz[];
    ww_ends timestamptz[];
    -- what the batch writes: new windows, holds per window, flights per subscription
    open_week_subs bigint[] := '{}';
    open_week_starts timestamptz[] := '{}';
    open_week_allowances bigint[] := '{}';
    open_5h_subs bigint[] := '{}';
    open_5h_allowances bigint[] := '{}';
    hold_subs integer[] := '{}';
    hold_reserved bigint[] := '{}';
    hold_held bigint[] := '{}';
    d_ids bigint[] := '{}';
    d_reserved bigint[] := '{}';
    d_held bigint[] := '{}';
    flight_subs bigint[] := '{}';
    flight_counts integer[] := '{}';
    -- one subscription's running figures
    price record;
    sub record;
    mirror record;
    w quota_windows;
    j integer;
    k integer;
    idx integer;
    xi integer;
    v_out bigint;
    week_start timestamptz;
    new_5h boolean;
    p5_posted bigint;
    p5_held bigint;
    p5_allowance bigint;
    p5_ends timestamptz;
    admitted_here integer;
    add_reserved bigint;
    add_held bigint;
    plan_room bigint;
    part bigint;
    need bigint;
    sub_room bigint;
    best_extra bigint;
    x_ids bigint[];
    x_kinds text[];
    x_room bigint[];
    x_add_held bigint[];
    x_add_reserved bigint[];
    x_overage_looked boolean;
    x_pick integer;
    x_most bigint;     -- the most one live extra window could ever hold (0055), of subscription x_most_of
    x_most_of integer;
    marked_refused integer;  -- this subscription's first plan-only request refused as full
    mutexes integer;  -- the batch's subscriptions whose flight row exists
BEGIN
    -- The token figures (0031): max_tokens is what reserve adds to the estimate, the prompt's
    -- proven bound what held adds to max_tokens, priced at the request's model for its plan.
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

    -- 1. the batch's subscriptions (those that exist), their mutexes in id order
    SELECT array_agg(s.id ORDER BY s.id) INTO s_id FROM subscriptions s WHERE s.id = ANY(p_subscription_ids);
    s_count := coalesce(cardinality(s_id), 0);
    IF s_count > 0 THEN
        -- the mutexes that exist, in id order, before any is made: the order ledger_tick takes
        -- them in (its own lock first), now that a tick of admissions alone calls this directly
        s_in_flight := array_fill(0, ARRAY[s_count]);
        mutexes := 0;
        FOR sub IN
            SELECT f.subscription_id, f.in_flight FROM subscription_flights f
             WHERE f.subscription_id = ANY(s_id) ORDER BY f.subscription_id FOR NO KEY UPDATE
        LOOP
            s_in_flight[array_position(s_id, sub.subscription_id)] := sub.in_flight;
            mutexes := mutexes + 1;
        END LOOP;
        IF mutexes < s_count THEN
            -- a subscription's first admission ever: its row is made (and so held) here
            INSERT INTO subscription_flights (subscription_id)
            SELECT x.id FROM unnest(s_id) AS x(id)
             WHERE NOT EXISTS (SELECT 1 FROM subscription_flights f WHERE f.subscription_id = x.id)
             ORDER BY x.id
            ON CONFLICT (subscription_id) DO NOTHING;
            FOR sub IN
                SELECT f.subscription_id, f.in_flight FROM subscription_flights f
                 WHERE f.subscription_id = ANY(s_id) ORDER BY f.subscription_id FOR NO KEY UPDATE
            LOOP
                s_in_flight[array_position(s_id, sub.subscription_id)] := sub.in_flight;
            END LOOP;
        END IF;

        -- under the mutexes (0044): ids admitted before (their first reply was lost, they were
        -- admitted, perhaps by a try that committed while this one waited for a mutex) and ids
        -- voided before they got here (their caller was told they failed)
        SELECT (SELECT array_agg(l.id) FROM usage_ledger l WHERE l.id = ANY(p_ids)),
               (SELECT array_agg(m.id) FROM ledger_void_marks m WHERE m.id = ANY(p_ids))
          INTO v_seen, v_marked;

        -- 2. under the mutexes: the subscriptions' standing and their plans' figures
        s_refusal := array_fill(NULL::text, ARRAY[s_count]);
        s_started := array_fill(NULL::timestamptz, ARRAY[s_count]);
        s_window := array_fill(NULL::bigint, ARRAY[s_count]);
        s_weekly := array_fill(NULL::bigint, ARRAY[s_count]);
        s_max_concurrent := array_fill(NULL::integer, ARRAY[s_count]);
        s_cached_weight := array_fill(NULL::numeric, ARRAY[s_count]);
        s_overage_cap := array_fill(NULL::bigint, ARRAY[s_count]);
        s_dearest := array_fill(NULL::numeric, ARRAY[s_count]);
        s_has_extra := array_fill(false, ARRAY[s_count]);
        w5_id := array_fill(NULL::bigint, ARRAY[s_count]);
        w5_posted := array_fill(NULL::bigint, ARRAY[s_count]);
        w5_held := array_fill(NULL::bigint, ARRAY[s_count]);
        w5_allowance := array_fill(NULL::bigint, ARRAY[s_count]);
        w5_ends := array_fill(NULL::timestamptz, ARRAY[s_count]);
        ww_id := array_fill(NULL::bigint, ARRAY[s_count]);
        ww_posted := array_fill(NULL::bigint, ARRAY[s_count]);
        ww_held := array_fill(NULL::bigint, ARRAY[s_count]);
        ww_allowance := array_fill(NULL::bigint, ARRAY[s_count]);
        ww_starts := array_fill(NULL::timestamptz, ARRAY[s_count]);
        ww_ends := array_fill(NULL::timestamptz, ARRAY[s_count]);
        FOR sub IN
            SELECT s.id, coalesce(CASE WHEN a.suspended_at IS NOT NULL THEN 'suspended' END,
                                  subscription_refusal(s)) AS refusal,
                   s.started_at, p.window_tokens, p.weekly_tokens, p.max_concurrent, p.cached_weight,
                   p.overage_cap_tokens,
                   (SELECT max(greatest(coalesce(pc.input_coeff, mc.input_coeff, 1),
                                        coalesce(pc.cached_coeff, mc.cached_coeff, p.cached_weight),
                                        coalesce(pc.output_coeff, mc.output_coeff, 1))
                               * CASE WHEN v_peak THEN coalesce(pc.peak_multiplier, mc.peak_multiplier, 1) ELSE 1 END)
                      FROM unnest(p.models) AS m(model)
                      LEFT JOIN model_credits mc ON mc.model = m.model
                      LEFT JOIN plan_credits pc ON pc.plan_id = p.id AND pc.model = m.model) AS dearest
              FROM subscriptions s JOIN plans p ON p.id = s.plan_id JOIN accounts a ON a.id = s.account_id
             WHERE s.id = ANY(s_id)
        LOOP
            j := array_position(s_id, sub.id);
            s_refusal[j] := sub.refusal;
            s_started[j] := sub.started_at;
            s_window[j] := sub.window_tokens;
            s_weekly[j] := sub.weekly_tokens;
            s_max_concurrent[j] := sub.max_concurrent;
            s_cached_weight[j] := sub.cached_weight;
            s_overage_cap[j] := sub.overage_cap_tokens;
            s_dearest[j] := sub.dearest;
        END LOOP;

        -- 3. every window the batch may move, in id order, in one statement: the newest 5-hour
        -- and weekly windows of each subscription that may spend, and its live extra windows
        FOR w IN
            SELECT q.* FROM quota_windows q
             WHERE q.id = ANY(ARRAY(
                   SELECT x.id
                     FROM unnest(s_id, s_refusal) AS s(id, refusal)
                    CROSS JOIN LATERAL (
                          (SELECT q5.id FROM quota_windows q5 WHERE q5.subscription_id = s.id AND q5.kind = '5h'
                            ORDER BY q5.starts_at DESC LIMIT 1)
                          UNION ALL
                          (SELECT qw.id FROM quota_windows qw WHERE qw.subscription_id = s.id AND qw.kind = 'week'
                            ORDER BY qw.starts_at DESC LIMIT 1)
                          UNION ALL
                          (SELECT qx.id FROM quota_windows qx
                            WHERE qx.subscription_id = s.id AND qx.kind IN ('topup', 'overage')
                              AND qx.starts_at <= v_now AND qx.ends_at > v_now)) AS x
                    WHERE s.refusal IS NULL))
             ORDER BY q.id FOR NO KEY UPDATE
        LOOP
            j := array_position(s_id, w.subscription_id);
            IF w.kind = '5h' THEN
                w5_id[j] := w.id; w5_posted[j] := w.posted; w5_held[j] := w.held;
                w5_allowance[j] := w.allowance; w5_ends[j] := w.ends_at;
            ELSIF w.kind = 'week' THEN
                ww_id[j] := w.id; ww_posted[j] := w.posted; ww_held[j] := w.held;
                ww_allowance[j] := w.allowance; ww_starts[j] := w.starts_at; ww_ends[j] := w.ends_at;
            ELSE
                s_has_extra[j] := true;
            END IF;
        END LOOP;
        -- the weekly window is anchored to the subscription's start: the ones that must open now
        FOR j IN 1..s_count LOOP
            CONTINUE WHEN s_refusal[j] IS NOT NULL;
            -- whole weeks of 604,800 seconds since the start, added as seconds (0050): a week
            -- of `interval '7 days'` is 7 calendar days in the session's TimeZone, 167 or 169
            -- hours across a clock change, and the anchor then depended on who computed it
            week_start := s_started[j]
                          + make_interval(secs => 604800 * floor((extract(epoch FROM v_now)
                                                                  - extract(epoch FROM s_started[j])) / 604800)
                                                 ::double precision);
            IF ww_id[j] IS NULL OR ww_starts[j] <> week_start THEN
                open_week_subs := open_week_subs || s_id[j];
                open_week_starts := open_week_starts || week_start;
                open_week_allowances := open_week_allowances || s_weekly[j];
            END IF;
        END LOOP;
        IF cardinality(open_week_subs) > 0 THEN
            INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
            SELECT o.id, 'week', o.starts, o.starts + interval '168 hours', o.allowance
              FROM unnest(open_week_subs, open_week_starts, open_week_allowances) AS o(id, starts, allowance)
             ORDER BY o.id
            ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
            FOR w IN
                SELECT q.* FROM quota_windows q
                  JOIN unnest(open_week_subs, open_week_starts) AS o(id, starts)
                    ON q.subscription_id = o.id AND q.kind = 'week' AND q.starts_at = o.starts
                 ORDER BY q.id FOR NO KEY UPDATE OF q
            LOOP
                j := array_position(s_id, w.subscription_id);
                ww_id[j] := w.id; ww_posted[j] := w.posted; ww_held[j] := w.held;
                ww_allowance[j] := w.allowance; ww_starts[j] := w.starts_at; ww_ends[j] := w.ends_at;
            END LOOP;
        END IF;

        -- 4. each subscription's requests, in arrival order, against its running totals
        SELECT array_agg(array_position(s_id, p_subscription_ids[g.k]) ORDER BY g.k) INTO r_sub
          FROM generate_series(1, n) AS g(k);
        SELECT array_agg(g.k ORDER BY r_sub[g.k], g.k) INTO r_order
          FROM generate_series(1, n) AS g(k) WHERE r_sub[g.k] IS NOT NULL;
        s_first := array_fill(0, ARRAY[s_count]);
        s_last := array_fill(-1, ARRAY[s_count]);
        FOR idx IN 1..coalesce(cardinality(r_order), 0) LOOP
            j := r_sub[r_order[idx]];
            IF s_first[j] = 0 THEN s_first[j] := idx; END IF;
            s_last[j] := idx;
        END LOOP;

        FOR j IN 1..s_count LOOP
            CONTINUE WHEN s_first[j] = 0;
            IF s_refusal[j] IS NOT NULL THEN
                FOR idx IN s_first[j]..s_last[j] LOOP
                    k := r_order[idx];
                    IF v_seen IS NOT NULL AND p_ids[k] = ANY(v_seen) THEN
                        v_outcome[k] := 'replayed';  -- admitted before the refusal came
                    ELSE
                        v_outcome[k] := 'inactive';
                        v_detail[k] := s_refusal[j];
                    END IF;
                END LOOP;
                CONTINUE;
            END IF;
            new_5h := w5_id[j] IS NULL OR w5_ends[j] <= v_now;
            IF new_5h THEN
                p5_posted := 0; p5_held := 0; p5_allowance := s_window[j];
                p5_ends := v_now + interval '5 hours';
            ELSE
                p5_posted := w5_posted[j]; p5_held := w5_held[j]; p5_allowance := w5_allowance[j];
                p5_ends := w5_ends[j];
            END IF;
            x_ids := '{}'; x_kinds := '{}'; x_room := '{}';
            IF s_has_extra[j] THEN
                -- the live top-ups with room, soonest to expire first (locked above)
                SELECT coalesce(array_agg(q.id ORDER BY q.ends_at, q.id), '{}'),
                       coalesce(array_agg(q.kind ORDER BY q.ends_at, q.id), '{}'),
                       coalesce(array_agg(q.allowance - q.posted - q.held ORDER BY q.ends_at, q.id), '{}')
                  INTO x_ids, x_kinds, x_room
                  FROM quota_windows q
                 WHERE q.subscription_id = s_id[j] AND q.kind = 'topup'
                   AND q.starts_at <= v_now AND q.ends_at > v_now AND q.allowance - q.posted - q.held > 0;
            END IF;
            x_add_held := array_fill(0::bigint, ARRAY[cardinality(x_ids)]);
            x_add_reserved := array_fill(0::bigint, ARRAY[cardinality(x_ids)]);
            x_overage_looked := s_overage_cap[j] IS NULL;
            marked_refused := NULL;
            admitted_here := 0;
            add_reserved := 0;
            add_held := 0;
            FOR idx IN s_first[j]..s_last[j] LOOP
                k := r_order[idx];
                IF v_seen IS NOT NULL AND p_ids[k] = ANY(v_seen) THEN
                    v_outcome[k] := 'replayed';
                    CONTINUE;
                ELSIF v_marked IS NOT NULL AND p_ids[k] = ANY(v_marked) THEN
                    v_outcome[k] := 'voided';  -- nobody waits for it: not written
                    CONTINUE;
                ELSIF c_held[k] > s_window[j] OR c_held[k] > s_weekly[j] THEN
                    -- more than a whole plan window (0055): too large only if one extra window
                    -- could never hold the rest either (README "Beyond the plan": the plan holds
                    -- what it has room for, one extra window the rest); read for such a request
                    -- only, once per subscription of the batch
                    IF x_most_of IS DISTINCT FROM j THEN
                        x_most_of := j;
                        -- a live top-up or overage window (all locked above), once what it
                        -- holds for requests in flight is back
                        SELECT coalesce(max(q.allowance - q.posted), 0) INTO x_most
                          FROM quota_windows q
                         WHERE q.subscription_id = s_id[j] AND q.kind IN ('topup', 'overage')
                           AND q.starts_at <= v_now AND q.ends_at > v_now;
                        -- this period's overage window, made when a request first needs it
                        IF s_overage_cap[j] > x_most THEN
                            PERFORM 1 FROM stripe_subscriptions m
                             WHERE m.subscription_id = s_id[j] AND m.status IN ('active', 'trialing')
                               AND m.has_overage_item AND m.current_period_start <= v_now
                               AND m.current_period_end > v_now
                               AND NOT EXISTS (SELECT 1 FROM quota_windows q
                                                WHERE q.subscription_id = s_id[j] AND q.kind = 'overage'
                                                  AND q.starts_at = m.current_period_start);
                            IF FOUND THEN
                                x_most := s_overage_cap[j];
                            END IF;
                        END IF;
                    END IF;
                    IF c_held[k] - least(s_window[j], s_weekly[j]) > x_most THEN
                        v_outcome[k] := 'too_large';
                        IF c_held[k] > s_window[j] THEN
                            v_kind[k] := '5h'; v_allowance[k] := s_window[j];
                        ELSE
                            v_kind[k] := 'week'; v_allowance[k] := s_weekly[j];
                        END IF;
                        CONTINUE;
                    END IF;
                END IF;
                IF marked_refused IS NOT NULL AND coalesce(p_plan_only[k], false) THEN
                    -- an earlier plan-only request of the batch was refused: this one goes after
                    -- it, on the retry, in arrival order, not into the room it could not use
                    -- (refused as it was, should the answer ever reach a client)
                    v_outcome[k] := 'window_full'; v_kind[k] := v_kind[marked_refused];
                    v_resets[k] := v_resets[marked_refused]; v_allowance[k] := v_allowance[marked_refused];
                    CONTINUE;
                ELSIF s_max_concurrent[j] IS NOT NULL
                      AND s_in_flight[j] + admitted_here >= s_max_concurrent[j] THEN
                    v_outcome[k] := 'concurrency'; v_allowance[k] := s_max_concurrent[j];
                    CONTINUE;
                END IF;
                plan_room := greatest(0, least(ww_allowance[j] - ww_posted[j] - ww_held[j],
                                               p5_allowance - p5_posted - p5_held) - add_held);
                part := least(c_held[k], plan_room);
                need := c_held[k] - part;
                x_pick := NULL;
                IF need > 0 THEN
                    -- a request marked plan-only draws on no extra window: settlements of its
                    -- process were still waiting, one may free the plan's room, and the
                    -- admission is tried again after them (refused here as full)
                    IF NOT coalesce(p_plan_only[k], false) THEN
                        IF NOT x_overage_looked THEN
                            x_overage_looked := true;
                            -- overage: a plan that allows it, a Stripe subscription in good standing
                            -- with a metered item to bill on; its window spans the billing period
                            SELECT m.current_period_start, m.current_period_end INTO mirror
                              FROM stripe_subscriptions m
                             WHERE m.subscription_id = s_id[j] AND m.status IN ('active', 'trialing')
                               AND m.has_overage_item AND m.current_period_start <= v_now
                               AND m.current_period_end > v_now;
                            IF FOUND THEN
                                -- this period's window: locked above when live, else made here (a
                                -- new row: nobody else can lock it before this transaction commits)
                                SELECT * INTO w FROM quota_windows q
                                 WHERE q.subscription_id = s_id[j] AND q.kind = 'overage'
                                   AND q.starts_at = mirror.current_period_start
                                   AND q.starts_at <= v_now AND q.ends_at > v_now;
                                IF NOT FOUND THEN
                                    INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
                                    VALUES (s_id[j], 'overage', mirror.current_period_start, mirror.current_period_end,
                                            s_overage_cap[j])
                                    ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING
                                    RETURNING * INTO w;
                                END IF;
                                IF w.id IS NOT NULL AND w.allowance - w.posted - w.held > 0 THEN
                                    x_ids := x_ids || w.id;
                                    x_kinds := x_kinds || 'overage'::text;
                                    x_room := x_room || (w.allowance - w.posted - w.held);
                                    x_add_held := x_add_held || 0::bigint;
                                    x_add_reserved := x_add_reserved || 0::bigint;
                                END IF;
                            END IF;
                        END IF;
                        -- one extra window holds the whole rest of the request
                        FOR xi IN 1..cardinality(x_ids) LOOP
                            IF x_room[xi] - x_add_held[xi] >= need THEN
                                x_pick := xi;
                                EXIT;
                            END IF;
                        END LOOP;
                    END IF;
                    IF x_pick IS NULL THEN
                        IF marked_refused IS NULL AND coalesce(p_plan_only[k], false) THEN
                            marked_refused := k;
                        END IF;
                        -- the window that frees last (0050): with both full, the request is
                        -- refused until both have reset, so the client is sent back then
                        IF ww_posted[j] + ww_held[j] + add_held + c_held[k] > ww_allowance[j]
                           AND (p5_posted + p5_held + add_held + c_held[k] <= p5_allowance
                                OR ww_ends[j] >= p5_ends) THEN
                            v_outcome[k] := 'window_full'; v_kind[k] := 'week';
                            v_resets[k] := ww_ends[j]; v_allowance[k] := ww_allowance[j];
                        ELSE
                            v_outcome[k] := 'window_full'; v_kind[k] := '5h';
                            v_resets[k] := p5_ends; v_allowance[k] := p5_allowance;
                        END IF;
                        CONTINUE;
                    END IF;
                END IF;
                v_outcome[k] := 'admitted';
                v_admitted := v_admitted || k;
                admitted_here := admitted_here + 1;
                v_plan_held[k] := part;
                v_plan_reserved[k] := least(c_reserve[k], part);
                add_reserved := add_reserved + v_plan_reserved[k];
                add_held := add_held + part;
                IF x_pick IS NOT NULL THEN
                    v_extra[k] := x_ids[x_pick];
                    v_extra_kind[k] := x_kinds[x_pick];
                    v_extra_held[k] := need;
                    v_extra_reserved[k] := c_reserve[k] - v_plan_reserved[k];
                    x_add_held[x_pick] := x_add_held[x_pick] + need;
                    x_add_reserved[x_pick] := x_add_reserved[x_pick] + v_extra_reserved[k];
                END IF;
            END LOOP;

            -- what the next request could hold (the bridge forwards before admission commits
            -- only where there is room to spare): the plan's room plus the roomiest extra
            -- window, in tokens at the plan's dearest rate, the unit of the bridge's hold
            sub_room := least(ww_allowance[j] - ww_posted[j] - ww_held[j], p5_allowance - p5_posted - p5_held)
                        - add_held;
            best_extra := 0;
            FOR xi IN 1..cardinality(x_ids) LOOP
                best_extra := greatest(best_extra, x_room[xi] - x_add_held[xi]);
            END LOOP;
            -- summed and divided in numeric, kept within a bigint (0055): an "unlimited" plan's
            -- room plus a top-up's, or divided by a rate below one credit a token, passes 2^63
            sub_room := greatest(least(floor((CASE WHEN best_extra > 0 THEN greatest(sub_room, 0)::numeric + best_extra
                                                    ELSE sub_room END)
                                                   / greatest(coalesce(s_dearest[j], 1), 0.000001)),
                                             9223372036854775807), -9223372036854775808);
            FOR idx IN s_first[j]..s_last[j] LOOP
                v_room[r_order[idx]] := sub_room;
            END LOOP;
            CONTINUE WHEN admitted_here = 0;

            IF new_5h THEN
                open_5h_subs := open_5h_subs || s_id[j];
                open_5h_allowances := open_5h_allowances || s_window[j];
            END IF;
            hold_subs := hold_subs || j;
            hold_reserved := hold_reserved || add_reserved;
            hold_held := hold_held || add_held;
            FOR xi IN 1..cardinality(x_ids) LOOP
                CONTINUE WHEN x_add_held[xi] = 0;
                d_ids := d_ids || x_ids[xi];
                d_reserved := d_reserved || x_add_reserved[xi];
                d_held := d_held || x_add_held[xi];
            END LOOP;
            flight_subs := flight_subs || s_id[j];
            flight_counts := flight_counts || admitted_here;
        END LOOP;

        -- 5. the writes, one statement each
        IF cardinality(open_5h_subs) > 0 THEN
            FOR w IN
                INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
                SELECT o.id, '5h', v_now, v_now + interval '5 hours', o.allowance
                  FROM unnest(open_5h_subs, open_5h_allowances) AS o(id, allowance)
                 ORDER BY o.id
                RETURNING *
            LOOP
                j := array_position(s_id, w.subscription_id);
                w5_id[j] := w.id; w5_ends[j] := w.ends_at;
            END LOOP;
        END IF;
        FOR idx IN 1..cardinality(hold_subs) LOOP
            j := hold_subs[idx];
            d_ids := d_ids || w5_id[j] || ww_id[j];
            d_reserved := d_reserved || hold_reserved[idx] || hold_reserved[idx];
            d_held := d_held || hold_held[idx] || hold_held[idx];
        END LOOP;
        IF cardinality(d_ids) > 0 THEN
            UPDATE quota_windows q SET reserved = q.reserved + d.reserved, held = q.held + d.held
              FROM (SELECT x.id, sum(x.reserved) AS reserved, sum(x.held) AS held
                      FROM unnest(d_ids, d_reserved, d_held) AS x(id, reserved, held) GROUP BY x.id) d
             WHERE q.id = d.id;
            UPDATE subscription_flights f SET in_flight = f.in_flight + x.admitted
              FROM unnest(flight_subs, flight_counts) AS x(id, admitted)
             WHERE f.subscription_id = x.id;
            INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                                      model, reserved_tokens, held_tokens, prompt_estimate, cached_weight,
                                      coeff_input, coeff_cached, coeff_output, lease_until,
                                      extra_window_id, extra_kind, extra_reserved_tokens, extra_held_tokens)
            SELECT p_ids[a], p_subscription_ids[a], p_api_key_ids[a], w5_id[r_sub[a]], ww_id[r_sub[a]],
                   p_surfaces[a], p_models[a], v_plan_reserved[a], v_plan_held[a], p_prompt_estimates[a],
                   s_cached_weight[r_sub[a]], c_in[a], c_cached[a], c_out[a],
                   v_now + make_interval(secs => p_lease_seconds),
                   v_extra[a], v_extra_kind[a], v_extra_reserved[a], v_extra_held[a]
              FROM unnest(v_admitted) AS a;
            FOREACH k IN ARRAY v_admitted LOOP
                v_resets[k] := w5_ends[r_sub[k]];
            END LOOP;
        END IF;
    END IF;

    RETURN QUERY
        SELECT g.k, coalesce(v_outcome[g.k], 'inactive'), v_kind[g.k], v_resets[g.k], v_allowance[g.k],
               CASE WHEN v_outcome[g.k] IS NULL THEN 'missing' ELSE v_detail[g.k] END, v_room[g.k]
          FROM generate_series(1, n) AS g(k);
END;
$$;
