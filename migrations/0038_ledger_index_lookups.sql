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
-- 3. With those gone, the next plan found the pending entries through usage_ledger_pending_lease,
--    which until a vacuum also holds every entry settled since (2,864 for 32 pending: 5.3 ms of
--    a tick). Settlement now reads each entry's state by key and tests it outside the scan.
-- Admission's share of the first two (and its read of every 5-hour window a subscription ever
-- had) is in 0039, which replaces ledger_admit_batch whole.
--
-- Everything else is 0031's and 0037's, restated here (CREATE OR REPLACE resets a function's
-- settings, so the generic-plan setting is part of the definition).

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
    v_entries uuid[];
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
