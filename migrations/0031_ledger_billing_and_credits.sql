-- One ledger again: billing's top-ups and overage (0011) and operations' credits, cost and
-- suspension (0030) in the same functions. Both branches rewrote the ledger from 0007's version,
-- and 0030 ran last, so its functions had silently replaced 0011's: top-ups and overage were
-- admitted nowhere. This file holds the one current version of every ledger transition
-- (ledger_admit_batch, ledger_settle_batch and their one-element forms ledger_admit,
-- ledger_settle, plus the sweeper ledger_expire_due), and plan_apply_allowances, which must leave
-- extra windows alone. 0010, 0011 and 0030 stay as they were applied.
--
-- 1. One unit: credits. Every figure of quota_windows and every *_tokens figure of usage_ledger
--    but the token counts (prompt/completion/cached/reasoning/delivered) is in credits (0030),
--    and that now includes the extra windows: a top-up block of N is N credits, an overage cap of
--    N is N credits, and the overage reported to Stripe's meter is credits. A credit is one
--    uncached input or output token at coefficient 1 (GLM-4.6/4.5 by default), so a block
--    bought as "N tokens" buys N tokens of the default models, as sold before credits existed.
--    Why not convert a block's tokens into credits: a block is spent by whatever model the
--    account uses next, so there is no one rate to convert at when it is bought, and a window
--    in another unit than the ledger rows it holds could not keep `posted` equal to the sum of
--    the ledger, nor zero overshoot. A dearer model (GLM-5.3 at 6.9 / 1.7 / 24) spends a block
--    faster, exactly as it spends the plan's windows and as it costs us upstream.
--    `topups.tokens`, `plans.overage_cap_tokens`, CODEPLAN_OVERAGE_CAP_TOKENS, the blocks of
--    CODEPLAN_TOPUP_BLOCKS and the meter `codeplan_overage_tokens` keep their applied names.
--
-- 2. Admission (0006's set-based batch, 0007's room, 0011's split, 0030's credits): each
--    request's token figures are priced into credits at its model's coefficients for its plan
--    (peak multiplier included), fixed on the row. A suspended account is refused like a
--    subscription that may not spend (detail 'suspended'), else subscription_refusal() (billing's
--    states). The plan's windows hold what they have room for; one extra window the rest (top-ups
--    first, the soonest to expire first, then this billing period's overage window, made when a
--    request first needs it). `room` is the largest hold the next request could get (the plan's
--    room plus the roomiest extra window), in tokens at the plan's dearest rate, because the
--    bridge compares it with its hold in tokens.
--
-- 3. Locks, as 0005, exactly: the subscriptions' subscription_flights rows in id order, then
--    (settlement) their entries, then their windows in id order, extra windows among them. An
--    admission therefore locks a subscription's open extra windows together with its 5-hour and
--    weekly windows, in one statement ordered by id, even when the plan can hold the whole batch
--    (0011 locked them after the plan's, out of id order whenever a block was bought before the
--    current 5-hour window opened). A subscription without extra windows pays one index probe.
--
-- 4. Settlement bills the plan first (0011): the plan's windows post at most their part of the
--    hold, the extra window the rest, the entry says which extra window paid and how much
--    (`extra_kind`, `extra_billed_tokens`); the bill is in credits at the row's coefficients and
--    the row records its upstream and cost (0030). Overage enters meter_outbox in the settling
--    transaction; every settling transaction notifies `codeplan_usage` with the subscription id.

-- pending: hold each request's worst case, in credits, in the subscription's open windows (and
-- one extra window for what they cannot hold). Outcomes: admitted | replayed | inactive (detail:
-- why) | too_large | window_full | concurrency.
CREATE OR REPLACE FUNCTION ledger_admit_batch(
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
            SELECT DISTINCT ON (q.kind) q.* FROM quota_windows q
             WHERE q.subscription_id = sub.id AND q.kind IN ('5h', 'week')
             ORDER BY q.kind, q.starts_at DESC
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
LANGUAGE plpgsql AS $$
DECLARE
    v_subscription bigint;
    v_billed bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_ids)]);
    v_overage bigint;
    v_customer text;
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
        -- lock order: the subscription's mutex, its entries, its windows (extra ones among them)
        -- in id order
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = v_subscription FOR NO KEY UPDATE;
        PERFORM 1 FROM usage_ledger l
         WHERE l.id = ANY(p_ids) AND l.subscription_id = v_subscription AND l.state = 'pending'
         ORDER BY l.id FOR UPDATE;
        PERFORM 1 FROM quota_windows q
         WHERE q.id IN (SELECT unnest(ARRAY[l.window_id, l.week_window_id, l.extra_window_id]) FROM usage_ledger l
                         WHERE l.id = ANY(p_ids) AND l.subscription_id = v_subscription AND l.state = 'pending')
         ORDER BY q.id FOR NO KEY UPDATE;

        v_overage := 0;
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
                 WHERE l.subscription_id = v_subscription AND l.state = 'pending'
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
             RETURNING p.k, p.billed, p.plan_billed, l.window_id, l.week_window_id, l.reserved_tokens,
                       l.held_tokens, l.extra_window_id, l.extra_kind, l.extra_reserved_tokens, l.extra_held_tokens
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
                   SET in_flight = f.in_flight - (SELECT count(*) FROM settled)
                 WHERE f.subscription_id = v_subscription
             RETURNING 1
            )
            -- (moved and counted run to completion whether read or not)
            SELECT s.k, s.billed, CASE WHEN s.extra_kind = 'overage' THEN s.billed - s.plan_billed ELSE 0 END
                   AS overage
              FROM settled s
        LOOP
            v_billed[r.k] := r.billed;
            v_overage := v_overage + r.overage;
        END LOOP;
        IF v_overage > 0 THEN
            SELECT m.stripe_customer_id INTO v_customer FROM stripe_subscriptions m
             WHERE m.subscription_id = v_subscription;
            IF v_customer IS NULL THEN
                -- admission only draws on overage for a Stripe subscription: cannot happen
                RAISE WARNING 'overage of % credits for subscription % has no Stripe customer', v_overage, v_subscription;
            ELSE
                -- credits; event name: service/billing/catalog.py METER_EVENT_NAME
                PERFORM billing_overage_add(v_customer, 'codeplan_overage_tokens', now(), v_overage);
            END IF;
        END IF;
        PERFORM pg_notify('codeplan_usage', v_subscription::text);
    END LOOP;
    RETURN QUERY SELECT g.k, v_billed[g.k] FROM generate_series(1, cardinality(p_ids)) AS g(k)
                  WHERE v_billed[g.k] IS NOT NULL;
END;
$$;

-- The single-request transitions are the one-element case of the batches (0006), restated here
-- so that this file is the whole current ledger; their bodies are 0006's and 0030's.
CREATE OR REPLACE FUNCTION ledger_admit(
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
    p_reasoning integer, p_estimated boolean, p_reason text, p_upstream_request_id text,
    p_upstream text DEFAULT NULL, p_upstream_cost numeric DEFAULT NULL)
RETURNS TABLE (billed bigint)
LANGUAGE sql AS $$
    SELECT s.billed FROM ledger_settle_batch(ARRAY[p_id], ARRAY[p_state], ARRAY[p_prompt], ARRAY[p_completion],
                                             ARRAY[p_cached], ARRAY[p_reasoning], ARRAY[p_estimated],
                                             ARRAY[p_reason], ARRAY[p_upstream_request_id],
                                             ARRAY[p_upstream], ARRAY[p_upstream_cost]) s;
$$;

-- The sweeper (0006's): pending entries whose process stopped heart-beating, expired in one batch
-- at what they can prove (the prompt estimate plus the completion tokens their last heartbeat
-- recorded), capped at their whole hold, plan and extra window; the upstream is not known, so
-- no cost. The scan takes no locks; the batch settlement is guarded like any other.
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

-- A plan's new allowances reach the open 5-hour and weekly windows of its subscriptions at once
-- (0030's, which also gave top-up and overage windows the weekly allowance): each subscription
-- under its mutex, its windows in id order.
CREATE OR REPLACE FUNCTION plan_apply_allowances(p_plan text) RETURNS integer
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
        PERFORM 1 FROM quota_windows q
         WHERE q.subscription_id = s.id AND q.ends_at > now() AND q.kind IN ('5h', 'week')
         ORDER BY q.id FOR NO KEY UPDATE;
        UPDATE quota_windows q
           SET allowance = CASE WHEN q.kind = '5h' THEN s.window_tokens ELSE s.weekly_tokens END
         WHERE q.subscription_id = s.id AND q.ends_at > now() AND q.kind IN ('5h', 'week');
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;
