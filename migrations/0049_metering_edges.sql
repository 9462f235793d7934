-- Metering edges (found by a review, proven).
--
-- 1. A settlement is billed at most the entry's hold, the upstream's own numbers too. The hold is
--    a proven upper bound of what a request can cost (migrations/0005, 0030), so admission's
--    posted + held + hold <= allowance means no window passes its allowance, and no top-up or
--    overage window pays more than it held, whatever an upstream reports. Until now only a
--    settlement at our own (estimated) numbers was capped: an upstream reporting more than the
--    bound (a bug of its own, a tokenizer change) was posted in full, passing the 5-hour and
--    weekly allowances and drawing the excess from a top-up or from overage. The row still
--    records the upstream's counts exactly; only billed_tokens stops at the hold. Such a
--    settlement is the operator's to take up with the upstream: ledger_settle_batch (and
--    ledger_tick's settle rows) return the credits not billed as `unbilled`, and service/ledger.py
--    logs a warning naming the entry (nothing on the common path: one more column). An operator
--    finds them all with:
--
--        SELECT l.id, l.subscription_id, l.model, l.settled_at, l.prompt_tokens, l.cached_tokens,
--               l.completion_tokens, l.billed_tokens, l.held_tokens + l.extra_held_tokens AS hold, r.raw
--          FROM usage_ledger l
--         CROSS JOIN LATERAL (SELECT ceil(greatest(l.prompt_tokens - l.cached_tokens, 0) * coalesce(l.coeff_input, 1)
--                                         + l.cached_tokens * coalesce(l.coeff_cached, l.cached_weight)
--                                         + greatest(l.completion_tokens, 0) * coalesce(l.coeff_output, 1))::bigint
--                              AS raw) r
--         WHERE l.state = 'posted' AND NOT l.estimated AND l.billed_tokens < r.raw;
--
--    (rows rolled up into usage_daily keep only their sums). ledger_settle_batch is 0047's,
--    replaced whole (same arguments): the billed amount's cap and the `unbilled` column are new.
--    ledger_tick is 0044's, replaced whole: its settle rows pass `unbilled` on.
--
-- 2. A plan's per-model override inherits the model's peak multiplier unless it names its own:
--    plan_credits.peak_multiplier was NOT NULL DEFAULT 1, so an override silently billed peak
--    hours at 1 (admission's coalesce(pc.peak_multiplier, mc.peak_multiplier, 1) never reached
--    the model's). Now NULL means "the model's". Existing rows holding 1: those migration 0030
--    made (plans whose cached weight was not 0.2, copied into overrides; an admin never wrote
--    them, so admin_audit has no plan.credits record for them) inherit: 0030 copied a cached
--    weight into them, and never chose a multiplier for anyone. Those an admin wrote keep 1: whether the admin meant "no surcharge
--    on this plan" or left the field out cannot be told from the row, and turning it into the
--    model's multiplier would raise that plan's peak-hour price without anyone deciding it.
--    An admin who means to inherit leaves peak_multiplier out or null (service/admin/plans.py).

ALTER TABLE plan_credits ALTER COLUMN peak_multiplier DROP NOT NULL,
                         ALTER COLUMN peak_multiplier DROP DEFAULT;
COMMENT ON COLUMN plan_credits.peak_multiplier IS 'NULL: the model''s (model_credits.peak_multiplier)';
UPDATE plan_credits pc SET peak_multiplier = NULL
 WHERE pc.peak_multiplier = 1
   AND NOT EXISTS (SELECT 1 FROM admin_audit a
                    WHERE a.action = 'plan.credits' AND a.target = 'plan:' || pc.plan_id || '/' || pc.model);

-- a new result column: DROP, then CREATE (older processes read i and billed by name, unchanged)
DROP FUNCTION ledger_settle_batch(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[],
                                  text[], text[], numeric[]);
CREATE FUNCTION ledger_settle_batch(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[],
    p_upstreams text[] DEFAULT NULL, p_upstream_costs numeric[] DEFAULT NULL)
RETURNS TABLE (i integer, billed bigint, unbilled bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $$
DECLARE
    v_subscriptions bigint[];
    v_entries uuid[];
    v_billed bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_ids)]);
    -- overage drawn, per settled entry that drew any (rare): summed per subscription below
    o_subscriptions bigint[] := '{}';
    o_windows bigint[] := '{}';
    o_credits bigint[] := '{}';
    v_customer text;
    r record;
    -- per element: the credits the upstream's numbers priced above the hold, not billed (0049)
    v_unbilled bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_ids)]);
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_states) AS s(state) WHERE s.state NOT IN ('posted', 'voided', 'expired')) THEN
        RAISE EXCEPTION 'ledger_settle_batch: not a settled state in %', p_states;
    END IF;
    -- Every entry is found by its primary key, never by its subscription (whose entries only
    -- grow) nor through usage_ledger_pending_lease: until a vacuum that partial index also holds
    -- every entry settled since, a thousand a second under load, and a plan that trusts it to be
    -- small scans them all. So no statement here restricts `state` where the planner could take
    -- the index for it: the state is read by key and tested outside (OFFSET 0 keeps the test out
    -- of the scan: the planner pushes no condition into a subquery with one).
    SELECT array_agg(e.id ORDER BY e.id), array_agg(DISTINCT e.subscription_id ORDER BY e.subscription_id)
      INTO v_entries, v_subscriptions
      FROM (SELECT l.id, l.subscription_id, l.state FROM usage_ledger l WHERE l.id = ANY(p_ids) OFFSET 0) e
     WHERE e.state = 'pending';
    IF v_entries IS NULL THEN
        RETURN;
    END IF;
    -- lock order: the subscriptions' mutexes in id order, then their entries in id order, then
    -- their windows (extra ones among them) in id order
    PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = ANY(v_subscriptions)
     ORDER BY f.subscription_id FOR NO KEY UPDATE;
    -- the transition's guard: the entries still pending once locked are this call's to settle
    -- (another settler may have won meanwhile; a replay finds none)
    SELECT array_agg(e.id ORDER BY e.id) INTO v_entries
      FROM (SELECT l.id, l.state FROM usage_ledger l WHERE l.id = ANY(v_entries)
             ORDER BY l.id OFFSET 0 FOR UPDATE) e
     WHERE e.state = 'pending';
    IF v_entries IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM quota_windows q
     WHERE q.id IN (SELECT unnest(ARRAY[l.window_id, l.week_window_id, l.extra_window_id]) FROM usage_ledger l
                     WHERE l.id = ANY(v_entries))
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
                   -- at most the hold, the upstream's numbers too (0049): the hold is a proven
                   -- bound, so a count above it is the upstream's to answer for, never the
                   -- window's (nor a top-up's or overage's) to pay
                   CASE WHEN x.state = 'voided' THEN 0::bigint
                        ELSE least(l.held_tokens + l.extra_held_tokens, b.raw) END AS billed,
                   -- what the upstream's own numbers price to (0: none reported)
                   CASE WHEN x.state = 'voided' OR x.estimated THEN 0::bigint ELSE b.raw END AS reported
              FROM input x
              JOIN usage_ledger l ON l.id = x.id
             CROSS JOIN LATERAL (SELECT ceil(
                    greatest(x.prompt - least(greatest(x.cached, 0), greatest(x.prompt, 0)), 0)
                        * coalesce(l.coeff_input, 1)
                    + least(greatest(x.cached, 0), greatest(x.prompt, 0))
                        * coalesce(l.coeff_cached, l.cached_weight)
                    + greatest(x.completion, 0) * coalesce(l.coeff_output, 1))::bigint AS raw) b
             WHERE l.id = ANY(v_entries)
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
             WHERE l.id = p.id
         RETURNING p.k, p.billed, p.reported, p.plan_billed, l.subscription_id, l.window_id, l.week_window_id,
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
        SELECT s.k, s.billed, s.subscription_id, s.extra_window_id,
               CASE WHEN s.extra_kind = 'overage' THEN s.billed - s.plan_billed ELSE 0 END AS overage,
               s.reported - s.billed AS unbilled
          FROM settled s
    LOOP
        v_billed[r.k] := r.billed;
        IF r.overage > 0 THEN
            o_subscriptions := o_subscriptions || r.subscription_id;
            o_windows := o_windows || r.extra_window_id;
            o_credits := o_credits || r.overage;
        END IF;
        v_unbilled[r.k] := greatest(r.unbilled, 0);
    END LOOP;
    FOR r IN
        -- per overage window, i.e. per billing period (0047): stamped inside the period the
        -- credits were drawn in, should the request have run past its end, while that period's
        -- invoice still takes usage (Stripe finalizes a renewal's invoice about an hour after the
        -- period ends); later, in the period it settles in, rather than in a closed invoice
        SELECT o.subscription_id, sum(o.credits)::bigint AS credits, q.starts_at,
               CASE WHEN now() < q.ends_at + interval '45 minutes' THEN least(now(), q.ends_at - interval '1 second')
                    ELSE now() END AS at
          FROM unnest(o_subscriptions, o_windows, o_credits) AS o(subscription_id, window_id, credits)
          JOIN quota_windows q ON q.id = o.window_id
         GROUP BY o.subscription_id, q.id ORDER BY o.subscription_id, q.id
    LOOP
        SELECT m.stripe_customer_id INTO v_customer FROM stripe_subscriptions m
         WHERE m.subscription_id = r.subscription_id;
        IF v_customer IS NULL THEN
            -- admission only draws on overage for a Stripe subscription: cannot happen
            RAISE WARNING 'overage of % credits for subscription % has no Stripe customer',
                r.credits, r.subscription_id;
        ELSE
            -- credits; event name: service/billing/catalog.py METER_EVENT_NAME
            PERFORM billing_overage_add(v_customer, 'codeplan_overage_tokens', r.at, r.credits, r.starts_at);
        END IF;
    END LOOP;
    PERFORM pg_notify('codeplan_usage', s::text) FROM unnest(v_subscriptions) AS s;
    RETURN QUERY SELECT g.k, v_billed[g.k], v_unbilled[g.k] FROM generate_series(1, cardinality(p_ids)) AS g(k)
                  WHERE v_billed[g.k] IS NOT NULL;
END;
$$;

-- a new result column: DROP, then CREATE
DROP FUNCTION ledger_tick(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[],
                          text[], numeric[], uuid[], bigint[], bigint[], text[], text[], integer[], bigint[],
                          bigint[], double precision, boolean[], bigint[]);
CREATE FUNCTION ledger_tick(
    s_ids uuid[], s_states text[], s_prompt integer[], s_completion integer[], s_cached integer[],
    s_reasoning integer[], s_estimated boolean[], s_reasons text[], s_upstream_request_ids text[],
    s_upstreams text[], s_upstream_costs numeric[],
    a_ids uuid[], a_subscription_ids bigint[], a_api_key_ids bigint[], a_surfaces text[],
    a_models text[], a_prompt_estimates integer[], a_reserves bigint[], a_helds bigint[],
    a_lease_seconds double precision, a_plan_only boolean[] DEFAULT NULL,
    s_subscription_ids bigint[] DEFAULT NULL)
RETURNS TABLE (kind text, i integer, billed bigint, outcome text, window_kind text,
               resets_at timestamptz, allowance bigint, detail text, room bigint, unbilled bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $$
BEGIN
    PERFORM 1 FROM subscription_flights f
     WHERE f.subscription_id IN (SELECT l.subscription_id FROM usage_ledger l WHERE l.id = ANY(s_ids)
                                 UNION SELECT unnest(a_subscription_ids)
                                 UNION SELECT unnest(s_subscription_ids))
     ORDER BY f.subscription_id FOR NO KEY UPDATE;
    IF cardinality(s_ids) > 0 THEN
        RETURN QUERY
            SELECT 'settle'::text, s.i, s.billed, NULL::text, NULL::text, NULL::timestamptz, NULL::bigint,
                   NULL::text, NULL::bigint, s.unbilled
              FROM ledger_settle_batch(s_ids, s_states, s_prompt, s_completion, s_cached, s_reasoning,
                                       s_estimated, s_reasons, s_upstream_request_ids, s_upstreams,
                                       s_upstream_costs) s;
        -- an abandoned admission's void that found no entry leaves a mark, under its
        -- subscription's flight row: an admission still on its way there (waiting for another
        -- subscription's row) reads it once it holds that row, and writes nothing
        IF s_subscription_ids IS NOT NULL THEN
            INSERT INTO ledger_void_marks (id)
            SELECT s_ids[g.k] FROM generate_subscripts(s_ids, 1) AS g(k)
             WHERE s_subscription_ids[g.k] IS NOT NULL AND s_states[g.k] = 'voided'
               AND NOT EXISTS (SELECT 1 FROM usage_ledger l WHERE l.id = s_ids[g.k])
            ON CONFLICT (id) DO NOTHING;
        END IF;
    END IF;
    IF cardinality(a_ids) > 0 THEN
        RETURN QUERY
            SELECT 'admit'::text, a.i, NULL::bigint, a.outcome, a.window_kind, a.resets_at, a.allowance,
                   a.detail, a.room, NULL::bigint
              FROM ledger_admit_batch(a_ids, a_subscription_ids, a_api_key_ids, a_surfaces, a_models,
                                      a_prompt_estimates, a_reserves, a_helds, a_lease_seconds, a_plan_only) a;
    END IF;
END;
$$;
