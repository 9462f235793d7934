-- Top-ups and overage in the ledger (issue 12, stage 2): allowance beyond the plan's windows,
-- drawn on only for what the windows cannot hold.
--
-- 1. Extra windows. A bought top-up block is a quota window of kind 'topup' (allowance: its
--    tokens; ends when the block expires), an overage allowance one of kind 'overage' (allowance:
--    the plan's per-account cap; the subscription's current Stripe billing period). They keep
--    reserved/held/posted like the 5-hour and weekly windows, always the sum of the ledger.
-- 2. Admission splits a request's hold: the plan's windows hold what they have room for, the
--    rest is held in one extra window (top-ups first, soonest to expire first, then overage). A
--    request the windows can hold costs exactly what it did before: no extra window is read.
-- 3. Settlement bills the plan first: the plan's windows post min(billed, their part), the extra
--    window the rest, so a top-up is spent only on what the plan could not hold. The entry keeps
--    which extra window it drew on and how much it posted there (`extra_kind` = 'overage' marks
--    overage). Overage tokens enter the meter outbox (0010) in the settling transaction.
-- 4. Locks, as 0005: the subscription's flight row (its mutex), its entries, its windows. Every
--    transition of a subscription's windows, extra ones included, runs under that mutex, so the
--    extra windows an admission reads after the plan's are never contended out of order.
-- 5. A window that opens takes the plan's allowance read under the mutex: a plan change racing
--    the first request of a window can no longer leave that window at the old plan's allowance.

ALTER TABLE quota_windows DROP CONSTRAINT quota_windows_kind_check;
ALTER TABLE quota_windows ADD CONSTRAINT quota_windows_kind_check
    CHECK (kind IN ('5h', 'week', 'topup', 'overage'));

-- an entry the plan cannot hold at all holds nothing in the plan's windows
ALTER TABLE usage_ledger DROP CONSTRAINT usage_ledger_reserved_tokens_check;
ALTER TABLE usage_ledger ADD CONSTRAINT usage_ledger_reserved_tokens_check CHECK (reserved_tokens >= 0);
ALTER TABLE usage_ledger
    ADD COLUMN extra_window_id bigint,
    ADD COLUMN extra_kind text CHECK (extra_kind IN ('topup', 'overage')),
    ADD COLUMN extra_reserved_tokens bigint NOT NULL DEFAULT 0 CHECK (extra_reserved_tokens >= 0),
    ADD COLUMN extra_held_tokens bigint NOT NULL DEFAULT 0 CHECK (extra_held_tokens >= 0),
    ADD COLUMN extra_billed_tokens bigint NOT NULL DEFAULT 0 CHECK (extra_billed_tokens >= 0);

-- overage per plan (written from CODEPLAN_OVERAGE_PLANS / CODEPLAN_OVERAGE_CAP_TOKENS when billing
-- starts); NULL: the plan's windows are a hard limit
ALTER TABLE plans ADD COLUMN overage_cap_tokens bigint CHECK (overage_cap_tokens > 0);

-- what overage needs from Stripe's side: the current billing period, and a metered item to bill on
ALTER TABLE stripe_subscriptions
    ADD COLUMN current_period_start timestamptz,
    ADD COLUMN has_overage_item boolean NOT NULL DEFAULT false;

ALTER TABLE topups
    ADD COLUMN window_id bigint UNIQUE REFERENCES quota_windows (id),
    ADD COLUMN tokens_revoked bigint NOT NULL DEFAULT 0 CHECK (tokens_revoked >= 0);

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
    -- each request's split: what the plan's windows hold, what one extra window holds
    v_plan_held bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_plan_reserved bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_extra bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_extra_kind text[] := array_fill(NULL::text, ARRAY[n]);
    v_extra_held bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_extra_reserved bigint[] := array_fill(0::bigint, ARRAY[n]);
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
    j integer;
    admitted integer[];
    add_reserved bigint;
    add_held bigint;
    plan_room bigint;
    part bigint;
    need bigint;
    -- the subscription's extra windows, loaded when a request first needs one
    x_loaded boolean;
    x_ids bigint[];
    x_kinds text[];
    x_room bigint[];
    x_add_held bigint[];
    x_add_reserved bigint[];
    mirror record;
    v_now timestamptz := now();
BEGIN
    -- ids admitted before: their first reply was lost, they were admitted
    SELECT array_agg(l.id) INTO v_seen FROM usage_ledger l WHERE l.id = ANY(p_ids);

    FOR sub IN
        SELECT s.id, subscription_refusal(s) AS refusal, s.started_at, p.window_tokens,
               p.weekly_tokens, p.max_concurrent, p.cached_weight, p.overage_cap_tokens
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
             WHERE q.subscription_id = sub.id AND q.kind IN ('5h', 'week')
             ORDER BY q.kind, q.starts_at DESC
        LOOP
            IF w.kind = '5h' THEN w5 := w; ELSE ww := w; END IF;
        END LOOP;
        week_start := sub.started_at + floor(extract(epoch FROM v_now - sub.started_at) / 604800)
                                       * interval '7 days';
        -- the 5-hour window opens at the first request admitted after the previous one closed
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
        x_loaded := false;
        FOR k IN 1..n LOOP
            CONTINUE WHEN p_subscription_ids[k] <> sub.id;
            IF v_seen IS NOT NULL AND p_ids[k] = ANY(v_seen) THEN
                v_outcome[k] := 'replayed';
                CONTINUE;
            ELSIF p_helds[k] > sub.window_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := '5h'; v_allowance[k] := sub.window_tokens;
                CONTINUE;
            ELSIF p_helds[k] > sub.weekly_tokens THEN
                v_outcome[k] := 'too_large'; v_kind[k] := 'week'; v_allowance[k] := sub.weekly_tokens;
                CONTINUE;
            ELSIF sub.max_concurrent IS NOT NULL
                  AND v_in_flight + cardinality(admitted) >= sub.max_concurrent THEN
                v_outcome[k] := 'concurrency'; v_allowance[k] := sub.max_concurrent;
                CONTINUE;
            END IF;
            plan_room := greatest(0, least(ww.allowance - ww.posted - ww.held,
                                           w5_allowance - w5_posted - w5_held) - add_held);
            part := least(p_helds[k], plan_room);
            need := p_helds[k] - part;
            j := NULL;
            IF need > 0 THEN
                IF NOT x_loaded THEN
                    x_loaded := true;
                    -- overage: a plan that allows it, a Stripe subscription in good standing with
                    -- a metered item to bill on; its window spans the current billing period
                    IF sub.overage_cap_tokens IS NOT NULL THEN
                        SELECT m.current_period_start, m.current_period_end INTO mirror
                          FROM stripe_subscriptions m
                         WHERE m.subscription_id = sub.id AND m.status IN ('active', 'trialing')
                           AND m.has_overage_item AND m.current_period_start <= v_now
                           AND m.current_period_end > v_now;
                        IF FOUND THEN
                            INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
                            VALUES (sub.id, 'overage', mirror.current_period_start, mirror.current_period_end,
                                    sub.overage_cap_tokens)
                            ON CONFLICT (subscription_id, kind, starts_at) DO NOTHING;
                        END IF;
                    END IF;
                    PERFORM 1 FROM quota_windows q
                     WHERE q.subscription_id = sub.id AND q.kind IN ('topup', 'overage')
                       AND q.starts_at <= v_now AND q.ends_at > v_now
                     ORDER BY q.id FOR NO KEY UPDATE;
                    -- top-ups first, the soonest to expire first; then overage
                    SELECT array_agg(q.id ORDER BY q.kind = 'overage', q.ends_at, q.id),
                           array_agg(q.kind ORDER BY q.kind = 'overage', q.ends_at, q.id),
                           array_agg(q.allowance - q.posted - q.held ORDER BY q.kind = 'overage', q.ends_at, q.id)
                      INTO x_ids, x_kinds, x_room
                      FROM quota_windows q
                     WHERE q.subscription_id = sub.id AND q.kind IN ('topup', 'overage')
                       AND q.starts_at <= v_now AND q.ends_at > v_now
                       AND q.allowance - q.posted - q.held > 0;
                    x_add_held := array_fill(0::bigint, ARRAY[coalesce(cardinality(x_ids), 0)]);
                    x_add_reserved := array_fill(0::bigint, ARRAY[coalesce(cardinality(x_ids), 0)]);
                END IF;
                -- one extra window holds the whole rest of the request
                FOR xi IN 1..coalesce(cardinality(x_ids), 0) LOOP
                    IF x_room[xi] - x_add_held[xi] >= need THEN
                        j := xi;
                        EXIT;
                    END IF;
                END LOOP;
                IF j IS NULL THEN
                    IF ww.posted + ww.held + add_held + p_helds[k] > ww.allowance THEN
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
            v_plan_reserved[k] := least(p_reserves[k], part);
            add_reserved := add_reserved + v_plan_reserved[k];
            add_held := add_held + part;
            IF j IS NOT NULL THEN
                v_extra[k] := x_ids[j];
                v_extra_kind[k] := x_kinds[j];
                v_extra_held[k] := need;
                v_extra_reserved[k] := p_reserves[k] - v_plan_reserved[k];
                x_add_held[j] := x_add_held[j] + need;
                x_add_reserved[j] := x_add_reserved[j] + v_extra_reserved[k];
            END IF;
        END LOOP;
        -- what is left for the next request (the bridge forwards before admission commits only
        -- where the window has room to spare): the plan's room, extra windows not counted
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
        IF x_loaded THEN
            FOR xi IN 1..coalesce(cardinality(x_ids), 0) LOOP
                CONTINUE WHEN x_add_held[xi] = 0;
                UPDATE quota_windows SET reserved = reserved + x_add_reserved[xi], held = held + x_add_held[xi]
                 WHERE id = x_ids[xi];
            END LOOP;
        END IF;
        UPDATE subscription_flights SET in_flight = in_flight + cardinality(admitted)
         WHERE subscription_id = sub.id;
        INSERT INTO usage_ledger (id, subscription_id, api_key_id, window_id, week_window_id, surface,
                                  model, reserved_tokens, held_tokens, prompt_estimate, cached_weight,
                                  lease_until, extra_window_id, extra_kind, extra_reserved_tokens,
                                  extra_held_tokens)
        SELECT p_ids[a], sub.id, p_api_key_ids[a], w5.id, ww.id, p_surfaces[a], p_models[a],
               v_plan_reserved[a], v_plan_held[a], p_prompt_estimates[a], sub.cached_weight,
               v_now + make_interval(secs => p_lease_seconds), v_extra[a], v_extra_kind[a],
               v_extra_reserved[a], v_extra_held[a]
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

-- pending -> posted | voided | expired for a batch, as 0006, billing the plan first: the plan's
-- windows post what the bill fits in their part of the hold, the extra window the rest; overage
-- enters the meter outbox in this same transaction.
CREATE OR REPLACE FUNCTION ledger_settle_batch(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[])
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
        -- lock order: the subscription's mutex, its entries, its windows in id order
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
                              p_reasons, p_upstream_request_ids)
                       WITH ORDINALITY AS u(id, state, prompt, completion, cached, reasoning, estimated,
                                            reason, upstream_request_id, k)
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
                 CROSS JOIN LATERAL (SELECT greatest(x.prompt - least(greatest(x.cached, 0), greatest(x.prompt, 0)), 0)
                                            + ceil(least(greatest(x.cached, 0), greatest(x.prompt, 0)) * l.cached_weight)::bigint
                                            + greatest(x.completion, 0) AS raw) b
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
                RAISE WARNING 'overage of % tokens for subscription % has no Stripe customer', v_overage, v_subscription;
            ELSE
                -- event name: service/billing/catalog.py METER_EVENT_NAME
                PERFORM billing_overage_add(v_customer, 'codeplan_overage_tokens', now(), v_overage);
            END IF;
        END IF;
        PERFORM pg_notify('codeplan_usage', v_subscription::text);
    END LOOP;
    RETURN QUERY SELECT g.k, v_billed[g.k] FROM generate_series(1, cardinality(p_ids)) AS g(k)
                  WHERE v_billed[g.k] IS NOT NULL;
END;
$$;

-- A bought block becomes a 'topup' window of the account's live subscription (none yet: it waits
-- for the next one, see billing_apply_subscription). Under the subscription's mutex, as any change
-- of its windows. Returns the window, or NULL while there is no live subscription.
CREATE FUNCTION billing_topup_attach(p_topup bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t topups;
    v_subscription bigint;
    v_window bigint;
BEGIN
    SELECT * INTO t FROM topups WHERE id = p_topup FOR NO KEY UPDATE;
    IF NOT FOUND OR t.window_id IS NOT NULL OR t.expires_at <= now() THEN
        RETURN t.window_id;
    END IF;
    SELECT s.id INTO v_subscription FROM subscriptions s
     WHERE s.account_id = t.account_id AND s.status <> 'canceled';
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO subscription_flights (subscription_id) VALUES (v_subscription) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = v_subscription FOR NO KEY UPDATE;
    -- clock_timestamp: two blocks bought for one subscription never share a start
    INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)
    VALUES (v_subscription, 'topup', clock_timestamp(), t.expires_at, greatest(t.tokens - t.tokens_revoked, 0))
    RETURNING id INTO v_window;
    UPDATE topups SET window_id = v_window WHERE id = p_topup;
    RETURN v_window;
END;
$$;

-- A refund of a top-up takes back what remains of it, in proportion to the money refunded: the
-- window's allowance drops by at most what is neither spent nor held. `p_amount_refunded` is the
-- charge's cumulative refunded amount (as read from Stripe), so a replay changes nothing.
-- Returns the tokens taken back by this call.
CREATE FUNCTION billing_topup_refund(p_payment_intent text, p_amount_refunded bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t topups;
    v_money bigint;
    v_target bigint;
    v_take bigint;
    v_subscription bigint;
    win quota_windows;
BEGIN
    SELECT * INTO t FROM topups WHERE stripe_payment_intent_id = p_payment_intent FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_money := least(t.amount, greatest(p_amount_refunded, 0));
    IF v_money <= t.amount_refunded THEN
        RETURN 0;
    END IF;
    v_target := CASE WHEN t.amount = 0 THEN t.tokens ELSE ceil(t.tokens::numeric * v_money / t.amount)::bigint END;
    v_take := greatest(v_target - t.tokens_revoked, 0);
    IF t.window_id IS NOT NULL THEN
        SELECT q.subscription_id INTO v_subscription FROM quota_windows q WHERE q.id = t.window_id;
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = v_subscription FOR NO KEY UPDATE;
        SELECT * INTO win FROM quota_windows q WHERE q.id = t.window_id FOR NO KEY UPDATE;
        v_take := least(v_take, greatest(win.allowance - win.posted - win.held, 0));
        UPDATE quota_windows q SET allowance = q.allowance - v_take WHERE q.id = t.window_id;
    END IF;
    UPDATE topups SET amount_refunded = v_money, refunded_at = now(), tokens_revoked = tokens_revoked + v_take
     WHERE id = t.id;
    RETURN v_take;
END;
$$;

-- 0010's, also keeping the billing period and whether the subscription has a metered item (what
-- overage needs), leaving top-up and overage windows alone on a plan change, and handing an
-- account's top-ups to its new subscription.
DROP FUNCTION billing_apply_subscription(text, bigint, text, text, text, text, timestamptz, boolean,
                                         timestamptz, timestamptz, double precision);
CREATE FUNCTION billing_apply_subscription(
    p_stripe_id text, p_account_id bigint, p_customer text, p_status text, p_plan_id text,
    p_price_id text, p_period_start timestamptz, p_period_end timestamptz, p_has_overage_item boolean,
    p_cancel_at_period_end boolean, p_cancel_at timestamptz, p_ended_at timestamptz,
    p_grace_seconds double precision)
RETURNS TABLE (outcome text, subscription_id bigint, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    mirror stripe_subscriptions;
    local subscriptions;
    live subscriptions;
    v_since timestamptz;
    v_alive boolean := p_status IN ('active', 'trialing', 'past_due', 'unpaid', 'paused');
    v_target text;
BEGIN
    PERFORM 1 FROM accounts a WHERE a.id = p_account_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_account'::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO mirror FROM stripe_subscriptions m WHERE m.stripe_subscription_id = p_stripe_id FOR UPDATE;
    v_since := CASE WHEN p_status = 'past_due' THEN
                   CASE WHEN mirror.status = 'past_due' THEN coalesce(mirror.past_due_since, now()) ELSE now() END
               END;
    INSERT INTO stripe_subscriptions AS m (
        stripe_subscription_id, account_id, stripe_customer_id, status, plan_id, stripe_price_id,
        current_period_start, current_period_end, has_overage_item, cancel_at_period_end, cancel_at,
        ended_at, past_due_since, grace_until, synced_at)
    VALUES (p_stripe_id, p_account_id, p_customer, p_status, p_plan_id, p_price_id, p_period_start,
            p_period_end, p_has_overage_item, p_cancel_at_period_end, p_cancel_at, p_ended_at, v_since,
            v_since + make_interval(secs => p_grace_seconds), now())
    ON CONFLICT (stripe_subscription_id) DO UPDATE SET
        status = excluded.status, plan_id = coalesce(excluded.plan_id, m.plan_id),
        stripe_price_id = excluded.stripe_price_id, current_period_start = excluded.current_period_start,
        current_period_end = excluded.current_period_end, has_overage_item = excluded.has_overage_item,
        cancel_at_period_end = excluded.cancel_at_period_end, cancel_at = excluded.cancel_at,
        ended_at = excluded.ended_at, past_due_since = excluded.past_due_since,
        grace_until = CASE WHEN m.past_due_since = excluded.past_due_since THEN m.grace_until
                           ELSE excluded.grace_until END,
        synced_at = now()
    RETURNING * INTO mirror;

    IF mirror.subscription_id IS NOT NULL THEN
        SELECT * INTO local FROM subscriptions s WHERE s.id = mirror.subscription_id FOR NO KEY UPDATE;
    END IF;
    IF local.id IS NULL THEN
        IF NOT v_alive THEN
            RETURN QUERY SELECT 'not_live'::text, NULL::bigint, p_status;
            RETURN;
        END IF;
        IF mirror.plan_id IS NULL THEN
            RETURN QUERY SELECT 'unknown_plan'::text, NULL::bigint, p_price_id;
            RETURN;
        END IF;
        SELECT * INTO live FROM subscriptions s
         WHERE s.account_id = mirror.account_id AND s.status <> 'canceled' FOR NO KEY UPDATE;
        IF live.id IS NOT NULL AND live.stripe_subscription_id IS NOT NULL
           AND live.stripe_subscription_id <> p_stripe_id THEN
            RETURN QUERY SELECT 'conflict'::text, live.id, live.stripe_subscription_id;
            RETURN;
        END IF;
        IF live.id IS NOT NULL THEN
            UPDATE subscriptions s SET stripe_subscription_id = p_stripe_id WHERE s.id = live.id
            RETURNING * INTO local;
        ELSE
            INSERT INTO subscriptions (account_id, plan_id, status, stripe_subscription_id)
            VALUES (mirror.account_id, mirror.plan_id, 'active', p_stripe_id)
            RETURNING * INTO local;
            -- top-ups outlive the subscription they were bought under: unexpired blocks of the
            -- account's ended subscriptions move to this one (under each one's mutex, in id order)
            PERFORM 1 FROM subscription_flights f
             WHERE f.subscription_id IN (SELECT q.subscription_id FROM quota_windows q
                                           JOIN subscriptions s ON s.id = q.subscription_id
                                          WHERE s.account_id = mirror.account_id AND s.status = 'canceled'
                                            AND q.kind = 'topup' AND q.ends_at > now())
             ORDER BY f.subscription_id FOR NO KEY UPDATE;
            UPDATE quota_windows q SET subscription_id = local.id
              FROM subscriptions s
             WHERE s.id = q.subscription_id AND s.account_id = mirror.account_id AND s.status = 'canceled'
               AND q.kind = 'topup' AND q.ends_at > now();
        END IF;
        UPDATE stripe_subscriptions m SET subscription_id = local.id
         WHERE m.stripe_subscription_id = p_stripe_id;
        -- blocks bought while the account had no live subscription
        PERFORM billing_topup_attach(t.id) FROM topups t
         WHERE t.account_id = mirror.account_id AND t.window_id IS NULL AND t.expires_at > now();
    END IF;
    IF local.status = 'canceled' THEN
        RETURN QUERY SELECT 'ended'::text, local.id, NULL::text;
        RETURN;
    END IF;

    v_target := CASE WHEN p_status IN ('active', 'trialing')
                       OR (p_status = 'past_due' AND mirror.grace_until > now()) THEN 'active'
                     WHEN v_alive THEN 'past_due'
                     ELSE 'canceled' END;
    IF v_target <> 'canceled' AND mirror.plan_id IS NOT NULL AND mirror.plan_id <> local.plan_id THEN
        PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = local.id FOR NO KEY UPDATE;
        PERFORM 1 FROM quota_windows w
         WHERE w.subscription_id = local.id AND w.ends_at > now() AND w.kind IN ('5h', 'week')
         ORDER BY w.id FOR NO KEY UPDATE;
        UPDATE subscriptions s SET plan_id = mirror.plan_id WHERE s.id = local.id;
        UPDATE quota_windows w
           SET allowance = CASE w.kind WHEN '5h' THEN p.window_tokens ELSE p.weekly_tokens END
          FROM plans p
         WHERE p.id = mirror.plan_id AND w.subscription_id = local.id AND w.ends_at > now()
           AND w.kind IN ('5h', 'week');
    END IF;
    IF v_target <> local.status THEN
        UPDATE subscriptions s
           SET status = v_target,
               ended_at = CASE WHEN v_target = 'canceled' THEN coalesce(p_ended_at, now()) END
         WHERE s.id = local.id;
    END IF;
    RETURN QUERY SELECT 'applied'::text, local.id, v_target;
END;
$$;
