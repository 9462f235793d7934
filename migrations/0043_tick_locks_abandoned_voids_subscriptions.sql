-- The void of an abandoned admission waits for that admission, should it still be in PostgreSQL.
--
-- An admission whose connection was lost (or whose client left) while its statement waited for
-- its subscription's flight row (another tick held it) commits after the bridge gave up on it.
-- Its void (bridge/flight.py `void_abandoned`) read the entry before taking any lock, found
-- nothing, changed nothing, and the entry committed after it was left to the sweeper, who bills
-- its prompt estimate: a charge for an answer nobody got.
--
-- So ledger_tick takes `s_subscription_ids`, per settlement the subscription whose flight row it
-- locks whether or not the entry is found (the ticker names it for such voids only), with the
-- rows it locked already, in the same id order. Queued behind the admission on that row, the
-- tick's next statements (ledger_settle_batch's, each with a snapshot of its own: READ COMMITTED,
-- a VOLATILE function) see the entry it committed, and void it. Not covered: an admission still
-- waiting for another subscription's row (a tick of several) when the void's tick ran. Without
-- the argument (older processes in a rolling restart) nothing changes: it defaults to none.
-- Everything else is 0041's function.
DROP FUNCTION ledger_tick(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[],
                          text[], numeric[], uuid[], bigint[], bigint[], text[], text[], integer[], bigint[],
                          bigint[], double precision, boolean[]);

CREATE FUNCTION ledger_tick(
    s_ids uuid[], s_states text[], s_prompt integer[], s_completion integer[], s_cached integer[],
    s_reasoning integer[], s_estimated boolean[], s_reasons text[], s_upstream_request_ids text[],
    s_upstreams text[], s_upstream_costs numeric[],
    a_ids uuid[], a_subscription_ids bigint[], a_api_key_ids bigint[], a_surfaces text[],
    a_models text[], a_prompt_estimates integer[], a_reserves bigint[], a_helds bigint[],
    a_lease_seconds double precision, a_plan_only boolean[] DEFAULT NULL,
    s_subscription_ids bigint[] DEFAULT NULL)
RETURNS TABLE (kind text, i integer, billed bigint, outcome text, window_kind text,
               resets_at timestamptz, allowance bigint, detail text, room bigint)
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
                   NULL::text, NULL::bigint
              FROM ledger_settle_batch(s_ids, s_states, s_prompt, s_completion, s_cached, s_reasoning,
                                       s_estimated, s_reasons, s_upstream_request_ids, s_upstreams,
                                       s_upstream_costs) s;
    END IF;
    IF cardinality(a_ids) > 0 THEN
        RETURN QUERY
            SELECT 'admit'::text, a.i, NULL::bigint, a.outcome, a.window_kind, a.resets_at, a.allowance,
                   a.detail, a.room
              FROM ledger_admit_batch(a_ids, a_subscription_ids, a_api_key_ids, a_surfaces, a_models,
                                      a_prompt_estimates, a_reserves, a_helds, a_lease_seconds, a_plan_only) a;
    END IF;
END;
$$;
