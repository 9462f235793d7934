-- Overage drawn in one billing period is billed in that period.
--
-- A request admitted on period N's overage window that was still running when the period ended
-- settled after it, and its overage entered the outbox stamped with the settlement's time: the
-- meter event fell in period N+1 (billed a period late, outside that period's cap), or in no
-- period at all when the subscription ended there (cancelled at period end: never invoiced).
-- And a minute's outbox row could hold both periods' usage, the whole of it stamped with the
-- later one (found by a review, proven). Now settlement adds overage per overage window, stamped
-- no later than the window's last second while that period's invoice still takes usage (Stripe
-- keeps a renewal's invoice open about an hour for it; the outbox sends a row within seconds of
-- its minute's end; after 45 minutes it is stamped when it settles, billed late rather than into
-- an invoice already final), and an outbox row holds one period's usage only: `period_start`
-- joins the row's key.
--
-- billing_overage_add keeps its four-argument form for older processes (their rows carry no
-- period, as before). ledger_settle_batch is 0038's, replaced whole (same signature); only its
-- overage loop changed.

ALTER TABLE meter_outbox ADD COLUMN period_start timestamptz;
DROP INDEX meter_outbox_open;
CREATE UNIQUE INDEX meter_outbox_open ON meter_outbox (stripe_customer_id, event_name, minute, period_start)
    NULLS NOT DISTINCT WHERE state = 'open';

CREATE FUNCTION billing_overage_add(p_customer text, p_event_name text, p_at timestamptz, p_tokens bigint,
                                    p_period_start timestamptz)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_minute timestamptz := date_trunc('minute', p_at);
    v_id bigint;
    v_seq integer;
BEGIN
    IF p_tokens <= 0 THEN
        RETURN NULL;
    END IF;
    -- one adder per customer and meter at a time, so two never pick the same seq
    PERFORM pg_advisory_xact_lock(hashtextextended('meter_outbox:' || p_customer || ':' || p_event_name, 0));
    UPDATE meter_outbox SET value = value + p_tokens, last_at = greatest(last_at, p_at)
     WHERE stripe_customer_id = p_customer AND event_name = p_event_name AND minute = v_minute
       AND period_start IS NOT DISTINCT FROM p_period_start AND state = 'open'
    RETURNING id INTO v_id;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    SELECT coalesce(max(seq) + 1, 0) INTO v_seq FROM meter_outbox
     WHERE stripe_customer_id = p_customer AND event_name = p_event_name AND minute = v_minute;
    INSERT INTO meter_outbox (stripe_customer_id, event_name, minute, last_at, seq, value, identifier, period_start)
    VALUES (p_customer, p_event_name, v_minute, p_at, v_seq, p_tokens,
            'cp-' || p_customer || '-' || extract(epoch FROM v_minute)::bigint || '-' || v_seq, p_period_start)
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

CREATE OR REPLACE FUNCTION billing_overage_add(p_customer text, p_event_name text, p_at timestamptz, p_tokens bigint)
RETURNS bigint
LANGUAGE sql AS $$
    SELECT billing_overage_add(p_customer, p_event_name, p_at, p_tokens, NULL::timestamptz);
$$;

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
    o_windows bigint[] := '{}';
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
        SELECT s.k, s.billed, s.subscription_id, s.extra_window_id,
               CASE WHEN s.extra_kind = 'overage' THEN s.billed - s.plan_billed ELSE 0 END AS overage
          FROM settled s
    LOOP
        v_billed[r.k] := r.billed;
        IF r.overage > 0 THEN
            o_subscriptions := o_subscriptions || r.subscription_id;
            o_windows := o_windows || r.extra_window_id;
            o_credits := o_credits || r.overage;
        END IF;
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
    RETURN QUERY SELECT g.k, v_billed[g.k] FROM generate_series(1, cardinality(p_ids)) AS g(k)
                  WHERE v_billed[g.k] IS NOT NULL;
END;
$$;
