-- The ledger finds its rows by key, in time that does not grow with a subscription's history.
--
-- Measured through the bridge at 32 connections on one key, with pg_stat_statements and
-- auto_explain (bench/PROFILE.md): a tick took ~11 ms, most of it in three kinds of scan whose
-- cost grows with the tables.
--
-- 1. Settlement looked its entries up as `id = ANY(...) AND subscription_id = $sub AND state =
--    'pending'`, inside a loop over subscriptions. The generic plan (0037), made while the tables
--    were small, answered it by AND-ing a bitmap of *every* entry of the subscription
--    (usage_ledger_sub_time) with the pending ones: 8.5 ms at 1,000 entries, and a subscription
--    only ever gains entries. Settlement is now set-based over all the subscriptions of a batch:
--    entries by primary key only, the mutexes of all their subscriptions first (in id order, as
--    ledger_tick already takes them), then all entries in id order, then all windows in id order;
--    the same order as before, since nothing takes an entry or a window of a subscription without
--    its mutex. One statement per phase whatever the number of subscriptions.
-- 2. A generic plan made while usage_ledger was small keeps a sequential scan for `id = ANY(...)`
--    while the table grows by a thousand rows a second, until an analyze invalidates it: three such
--    scans (the replay check, the tick's mutex query, the entries' lock) took ~4 ms of the tick.
--    These functions read every row by a key, so they plan with enable_seqscan off.
-- 3. Admission read every 5-hour window a subscription ever had to find the newest (one more
--    each 5 hours, ~1,750 a year): it now reads the newest of each kind by the index, LIMIT 1.
--
-- Everything else is 0031's and 0037's, restated here (CREATE OR REPLACE resets a function's
-- settings, so the generic-plan setting is part of each definition).

CREATE OR REPLACE FUNCTION ledger_admit_batch(
    p_ids uuid[], p_subscription_ids bigint[], p_api_key_ids bigint[], p_surfaces text[],
    p_models text[], p_prompt_estimates integer[], p_reserves bigint[], p_helds bigint[],
    p_lease_seconds double precision)
RETURNS TABLE (i integer, outcome text, window_kind text, resets_at timestamptz, allowance bigint, detail text,
               room bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $$
DECLARE
    n integer := cardinality(p_ids);
    v_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    v_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_resets timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    v_allowance bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_detail text[] := array_fill(NULL::text, ARRAY[n]);
    v_room bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    -- per request, in credits: reserved and held, and the coefficients they were priced at
    c_reserve bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_held bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    c_in numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    c_cached numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    c_out numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    -- per request, its split: what the plan's windows hold, what one extra window holds
    v_plan_held bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_plan_reserved bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_extra bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_extra_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_extra_held bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_extra_reserved bigint[] := array_fill(0::bigint, ARRAY[n]);
    price record;
    v_out bigint;
    v_peak boolean := credit_peak_now();
    v_seen uuid[];
    sub record;
    mirror record;
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
    j integer;
    xi integer;
    admitted integer[];
    add_reserved bigint;
    add_held bigint;
    plan_room bigint;
    part bigint;
    need bigint;
    sub_room bigint;
    best_extra bigint;
    -- the subscription's open extra windows (locked with the plan's), and those a request may
    -- draw on, in the order it draws: top-ups soonest to expire first, then overage
    x_live bigint[];
    x_ids bigint[];
    x_kinds text[];
    x_room bigint[];
    x_add_held bigint[];
    x_add_reserved bigint[];
    x_overage_looked boolean;
    v_now timestamptz := now();
BEGIN
    -- The token figures: max_tokens is what reserve adds to the estimate, the prompt's proven
    -- bound what held adds to max_tokens. The hold in credits takes the larger input coefficient
    -- for the whole prompt bound, so a settlement at the upstream's numbers is within it.
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
               p.overage_cap_tokens,
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

        -- the newest plan window of each kind, and the open extra windows
        w5 := NULL;
        ww := NULL;
        FOR w IN
            (SELECT q.* FROM quota_windows q WHERE q.subscription_id = sub.id AND q.kind = '5h'
              ORDER BY q.starts_at DESC LIMIT 1)
            UNION ALL
            (SELECT q.* FROM quota_windows q WHERE q.subscription_id = sub.id AND q.kind = 'week'
              ORDER BY q.starts_at DESC LIMIT 1)
        LOOP
            IF w.kind = '5h' THEN w5 := w; ELSE ww := w; END IF;
        END LOOP;
        SELECT array_agg(q.id) INTO x_live FROM quota_windows q
         WHERE q.subscription_id = sub.id AND q.kind IN ('topup', 'overage')
           AND q.starts_at <= v_now AND q.ends_at > v_now;
        -- the weekly window is anchored to the subscription's start; the 5-hour window opens at
        -- the first request admitted after the previous one closed
        week_start := sub.started_at + floor(extract(epoch FROM v_now - sub.started_at) / 604800)
                                       * interval '7 days';
        new_5h := w5.id IS NULL OR w5.ends_at <= v_now;
        IF new_5h OR ww.id IS NULL OR ww.starts_at <> week_start THEN
            -- a window opens: its allowance is the plan's as it is now, read under the mutex (a
            -- plan change has committed, or waits for this mutex and then moves the new window too)
            SELECT p.window_tokens, p.weekly_tokens INTO sub.window_tokens, sub.weekly_tokens
              FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.id = sub.id;
        END IF;
        IF ww.id IS NULL OR ww.starts_at <> week_start THEN
            INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
            VALUES (sub.id, 'week', week_start, week_start + interval '7 days', sub.weekly_tokens)
            ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
            SELECT * INTO ww FROM quota_windows q
             WHERE q.subscription_id = sub.id AND q.kind = 'week' AND q.starts_at = week_start;
        END IF;

        -- every window this batch may move, in id order, in one statement (a plan change or a
        -- refund may have moved an allowance meanwhile: these are the figures to decide on)
        FOR w IN
            SELECT * FROM quota_windows q
             WHERE q.id = ANY(ARRAY[ww.id] || CASE WHEN new_5h THEN '{}'::bigint[] ELSE ARRAY[w5.id] END
                              || coalesce(x_live, '{}'::bigint[]))
             ORDER BY q.id FOR NO KEY UPDATE
        LOOP
            IF w.id = ww.id THEN ww := w; ELSIF w.id = w5.id THEN w5 := w; END IF;
        END LOOP;
        IF new_5h THEN
            w5_posted := 0; w5_held := 0; w5_allowance := sub.window_tokens;
            w5_ends := v_now + interval '5 hours';
        ELSE
            w5_posted := w5.posted; w5_held := w5.held; w5_allowance := w5.allowance;
            w5_ends := w5.ends_at;
        END IF;
        x_ids := '{}'; x_kinds := '{}'; x_room := '{}';
        IF x_live IS NOT NULL THEN
            SELECT coalesce(array_agg(q.id ORDER BY q.ends_at, q.id), '{}'),
                   coalesce(array_agg(q.kind ORDER BY q.ends_at, q.id), '{}'),
                   coalesce(array_agg(q.allowance - q.posted - q.held ORDER BY q.ends_at, q.id), '{}')
              INTO x_ids, x_kinds, x_room
              FROM quota_windows q
             WHERE q.id = ANY(x_live) AND q.kind = 'topup' AND q.allowance - q.posted - q.held > 0;
        END IF;
        x_add_held := array_fill(0::bigint, ARRAY[cardinality(x_ids)]);
        x_add_reserved := array_fill(0::bigint, ARRAY[cardinality(x_ids)]);
        x_overage_looked := sub.overage_cap_tokens IS NULL;

        -- each request of this subscription in arrival order, against the running totals
        admitted := '{}';
        add_reserved := 0;
        add_held := 0;
        FOR k IN 1..n LOOP
            CONTINUE WHEN p_subscription_ids[k] <> sub.id;
            IF v_seen IS NOT NULL AND p_ids[k] = ANY(v_seen) THEN
                v_outcome[k] := 'replayed';
                CONTINUE;
            ELSIF c_held[k] > sub.window_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := '5h'; v_allowance[k] := sub.window_tokens;
                CONTINUE;
            ELSIF c_held[k] > sub.weekly_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := 'week'; v_allowance[k] := sub.weekly_tokens;
                CONTINUE;
            ELSIF sub.max_concurrent IS NOT NULL
                  AND v_in_flight + cardinality(admitted) >= sub.max_concurrent THEN
                v_outcome[k] := 'concurrency'; v_allowance[k] := sub.max_concurrent;
                CONTINUE;
            END IF;
            plan_room := greatest(0, least(ww.allowance - ww.posted - ww.held,
                                           w5_allowance - w5_posted - w5_held) - add_held);
            part := least(c_held[k], plan_room);
            need := c_held[k] - part;
            j := NULL;
            IF need > 0 THEN
                IF NOT x_overage_looked THEN
                    x_overage_looked := true;
                    -- overage: a plan that allows it, a Stripe subscription in good standing with
                    -- a metered item to bill on; its window spans the current billing period
                    SELECT m.current_period_start, m.current_period_end INTO mirror
                      FROM stripe_subscriptions m
                     WHERE m.subscription_id = sub.id AND m.status IN ('active', 'trialing')
                       AND m.has_overage_item AND m.current_period_start <= v_now
                       AND m.current_period_end > v_now;
                    IF FOUND THEN
                        -- this period's window: locked above when open, else made here (a new
                        -- row: nobody else can lock it before this transaction commits)
                        SELECT * INTO w FROM quota_windows q
                         WHERE q.id = ANY(coalesce(x_live, '{}'::bigint[])) AND q.kind = 'overage'
                           AND q.starts_at = mirror.current_period_start;
                        IF NOT FOUND THEN
                            INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
                            VALUES (sub.id, 'overage', mirror.current_period_start, mirror.current_period_end,
                                    sub.overage_cap_tokens)
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
                        j := xi;
                        EXIT;
                    END IF;
                END LOOP;
                IF j IS NULL THEN
                    IF ww.posted + ww.held + add_held + c_held[k] > ww.allowance THEN
                        v_outcome[k] := 'window_full'; v_kind[k] := 'week';
                        v_resets[k] := ww.ends_at; v_allowance[k] := ww.allowance;
                    ELSE
                        v_outcome[k] := 'window_full'; v_kind[k] := '5h';
                        v_resets[k] := w5_ends; v_allowance[k] := w5_allowance;
                    END IF;
                    CONTINUE;
                END IF;
            END IF;
            v_outcome[k] := 'admitted';
            admitted := admitted || k;
            v_plan_held[k] := part;
            v_plan_reserved[k] := least(c_reserve[k], part);
            add_reserved := add_reserved + v_plan_reserved[k];
            add_held := add_held + part;
            IF j IS NOT NULL THEN
                v_extra[k] := x_ids[j];
                v_extra_kind[k] := x_kinds[j];
                v_extra_held[k] := need;
                v_extra_reserved[k] := c_reserve[k] - v_plan_reserved[k];
                x_add_held[j] := x_add_held[j] + need;
                x_add_reserved[j] := x_add_reserved[j] + v_extra_reserved[k];
            END IF;
        END LOOP;

        -- what the next request could hold (the bridge forwards before admission commits only
        -- where there is room to spare): the plan's room plus the roomiest extra window, in
        -- tokens at the plan's dearest rate, the unit of the bridge's hold
        sub_room := least(ww.allowance - ww.posted - ww.held, w5_allowance - w5_posted - w5_held) - add_held;
        best_extra := 0;
        FOR xi IN 1..cardinality(x_ids) LOOP
            best_extra := greatest(best_extra, x_room[xi] - x_add_held[xi]);
        END LOOP;
        IF best_extra > 0 THEN
            sub_room := greatest(sub_room, 0) + best_extra;
        END IF;
        sub_room := floor(sub_room / greatest(coalesce(sub.dearest, 1), 0.000001));
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
        FOR xi IN 1..cardinality(x_ids) LOOP
            CONTINUE WHEN x_add_held[xi] = 0;
            UPDATE quota_windows SET reserved = reserved + x_add_reserved[xi], held = held + x_add_held[xi]
             WHERE id = x_ids[xi];
        END LOOP;
        UPDATE subscription_flights SET in_flight = in_flight + cardinality(admitted)
         WHERE subscription_id = sub.id;
        INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                                  model, reserved_tokens, held_tokens, prompt_estimate, cached_weight,
                                  coeff_input, coeff_cached, coeff_output, lease_until,
                                  extra_window_id, extra_kind, extra_reserved_tokens, extra_held_tokens)
        SELECT p_ids[a], sub.id, p_api_key_ids[a], w5.id, ww.id, p_surfaces[a], p_models[a],
               v_plan_reserved[a], v_plan_held[a], p_prompt_estimates[a], sub.cached_weight,
               c_in[a], c_cached[a], c_out[a], v_now + make_interval(secs => p_lease_seconds),
               v_extra[a], v_extra_kind[a], v_extra_reserved[a], v_extra_held[a]
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

-- pending -> posted | voided | expired for a batch. Billed in credits at each row's coefficients
-- (rows admitted before 0030 have none: 1, their cached weight, 1, as they were billed), capped
-- at the whole hold when the numbers are ours; the plan's windows post at most their part of the
-- hold, the extra window the rest; overage enters the meter outbox in this transaction. Returns
-- each element's billed credits, or nothing for an element whose entry was not pending (a replay,
-- or another settler won).
CREATE OR REPLACE FUNCTION ledger_settle_batch(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[],
    p_upstreams text[] DEFAULT NULL, p_upstream_costs numeric[] DEFAULT NULL)
RETURNS TABLE (i integer, billed bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $$
DECLARE
    v_subscriptions bigint[];
    v_billed bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_ids)]);
    -- overage drawn, per settled entry that drew any (rare): summed per subscription below
    o_subscriptions bigint[] := '{}';
    o_credits bigint[] := '{}';
    v_customer text;
    r record;
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_states) AS s(state) WHERE s.state NOT IN ('posted', 'voided', 'expired')) THEN
        RAISE EXCEPTION 'ledger_settle_batch: not a settled state in %', p_states;
    END IF;
    -- every entry is found by its primary key: never by its subscription, whose rows only grow
    SELECT array_agg(DISTINCT l.subscription_id ORDER BY l.subscription_id) INTO v_subscriptions
      FROM usage_ledger l WHERE l.id = ANY(p_ids) AND l.state = 'pending';
    IF v_subscriptions IS NULL THEN
        RETURN;
    END IF;
    -- lock order: the subscriptions' mutexes in id order, then their entries in id order, then
    -- their windows (extra ones among them) in id order
    PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = ANY(v_subscriptions)
     ORDER BY f.subscription_id FOR NO KEY UPDATE;
    PERFORM 1 FROM usage_ledger l WHERE l.id = ANY(p_ids) AND l.state = 'pending'
     ORDER BY l.id FOR UPDATE;
    PERFORM 1 FROM quota_windows q
     WHERE q.id IN (SELECT unnest(ARRAY[l.window_id, l.week_window_id, l.extra_window_id]) FROM usage_ledger l
                     WHERE l.id = ANY(p_ids) AND l.state = 'pending')
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
            SELECT x.*, l.subscription_id, l.reserved_tokens, l.held_tokens, l.window_id, l.week_window_id,
                   l.extra_window_id, l.extra_kind, l.extra_reserved_tokens, l.extra_held_tokens,
                   least(greatest(x.cached, 0), greatest(x.prompt, 0)) AS cached_counted,
                   CASE WHEN x.state = 'voided' THEN 0::bigint ELSE
                       CASE WHEN x.estimated THEN least(l.held_tokens + l.extra_held_tokens, b.raw) ELSE b.raw END
                   END AS billed
              FROM input x
              JOIN usage_ledger l ON l.id = x.id
             CROSS JOIN LATERAL (SELECT ceil(
                    greatest(x.prompt - least(greatest(x.cached, 0), greatest(x.prompt, 0)), 0)
                        * coalesce(l.coeff_input, 1)
                    + least(greatest(x.cached, 0), greatest(x.prompt, 0))
                        * coalesce(l.coeff_cached, l.cached_weight)
                    + greatest(x.completion, 0) * coalesce(l.coeff_output, 1))::bigint AS raw) b
             WHERE l.state = 'pending'
        ), split AS (
            -- the plan first: a top-up or overage pays only for what the plan's part cannot
            SELECT p.*, CASE WHEN p.extra_window_id IS NULL THEN p.billed
                             ELSE least(p.billed, p.held_tokens) END AS plan_billed
              FROM priced p
        ), settled AS (
            UPDATE usage_ledger l
               SET state = p.state,
                   prompt_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.prompt END,
                   completion_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.completion END,
                   cached_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.cached_counted END,
                   reasoning_tokens = CASE WHEN p.state = 'voided' THEN 0 ELSE p.reasoning END,
                   billed_tokens = p.billed,
                   extra_billed_tokens = p.billed - p.plan_billed,
                   estimated = p.estimated,
                   settle_reason = p.reason,
                   upstream_request_id = coalesce(p.upstream_request_id, l.upstream_request_id),
                   upstream = coalesce(p.upstream, l.upstream),
                   upstream_cost = CASE WHEN p.state = 'voided' THEN 0 ELSE p.cost END,
                   settled_at = now()
              FROM split p
             WHERE l.id = p.id AND l.state = 'pending'
         RETURNING p.k, p.billed, p.plan_billed, l.subscription_id, l.window_id, l.week_window_id,
                   l.reserved_tokens, l.held_tokens, l.extra_window_id, l.extra_kind, l.extra_reserved_tokens,
                   l.extra_held_tokens
        ), moved AS (
            UPDATE quota_windows q
               SET reserved = q.reserved - m.reserved, held = q.held - m.held, posted = q.posted + m.billed
              FROM (SELECT v.window_id, sum(v.reserved) AS reserved, sum(v.held) AS held, sum(v.billed) AS billed
                      FROM settled s
                     CROSS JOIN LATERAL (VALUES
                           (s.window_id, s.reserved_tokens, s.held_tokens, s.plan_billed),
                           (s.week_window_id, s.reserved_tokens, s.held_tokens, s.plan_billed),
                           (s.extra_window_id, s.extra_reserved_tokens, s.extra_held_tokens,
                            s.billed - s.plan_billed)) AS v(window_id, reserved, held, billed)
                     WHERE v.window_id IS NOT NULL
                     GROUP BY v.window_id) m
             WHERE q.id = m.window_id
         RETURNING 1
        ), counted AS (
            UPDATE subscription_flights f
               SET in_flight = f.in_flight - c.n
              FROM (SELECT s.subscription_id, count(*) AS n FROM settled s GROUP BY s.subscription_id) c
             WHERE f.subscription_id = c.subscription_id
         RETURNING 1
        )
        -- (moved and counted run to completion whether read or not)
        SELECT s.k, s.billed, s.subscription_id,
               CASE WHEN s.extra_kind = 'overage' THEN s.billed - s.plan_billed ELSE 0 END AS overage
          FROM settled s
    LOOP
        v_billed[r.k] := r.billed;
        IF r.overage > 0 THEN
            o_subscriptions := o_subscriptions || r.subscription_id;
            o_credits := o_credits || r.overage;
        END IF;
    END LOOP;
    FOR r IN
        SELECT o.subscription_id, sum(o.credits)::bigint AS credits
          FROM unnest(o_subscriptions, o_credits) AS o(subscription_id, credits)
         GROUP BY o.subscription_id ORDER BY o.subscription_id
    LOOP
        SELECT m.stripe_customer_id INTO v_customer FROM stripe_subscriptions m
         WHERE m.subscription_id = r.subscription_id;
        IF v_customer IS NULL THEN
            -- admission only draws on overage for a Stripe subscription: cannot happen
            RAISE WARNING 'overage of % credits for subscription % has no Stripe customer',
                r.credits, r.subscription_id;
        ELSE
            -- credits; event name: service/billing/catalog.py METER_EVENT_NAME
            PERFORM billing_overage_add(v_customer, 'codeplan_overage_tokens', now(), r.credits);
        END IF;
    END LOOP;
    PERFORM pg_notify('codeplan_usage', s::text) FROM unnest(v_subscriptions) AS s;
    RETURN QUERY SELECT g.k, v_billed[g.k] FROM generate_series(1, cardinality(p_ids)) AS g(k)
                  WHERE v_billed[g.k] IS NOT NULL;
END;
$$;

ALTER FUNCTION ledger_tick(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[],
                           text[], numeric[], uuid[], bigint[], bigint[], text[], text[], integer[], bigint[],
                           bigint[], double precision)
    SET enable_seqscan = off;
