-- One commit for every transition waiting at a moment: the settlements first (the room they
-- free is there for the admissions after them), then the admissions, in one transaction.
--
-- With synchronous_commit on (no money on an unsynced commit), a transition's cost is its
-- commit's WAL flush, not its statements: a fraction of a millisecond on a quiet disk, several on
-- a busy shared one. Before, an admission and a settlement were two commits per request, and the
-- next admission of the same subscription waited for the settlement's flush behind its mutex.
--
-- The lock order stays 0005's: the subscriptions' mutexes first, taken here for all of them in id
-- order (the batch functions re-take them: no-ops), then entries, then windows by id.
CREATE FUNCTION ledger_tick(
    s_ids uuid[], s_states text[], s_prompt integer[], s_completion integer[], s_cached integer[],
    s_reasoning integer[], s_estimated boolean[], s_reasons text[], s_upstream_request_ids text[],
    s_upstreams text[], s_upstream_costs numeric[],
    a_ids uuid[], a_subscription_ids bigint[], a_api_key_ids bigint[], a_surfaces text[],
    a_models text[], a_prompt_estimates integer[], a_reserves bigint[], a_helds bigint[],
    a_lease_seconds double precision)
RETURNS TABLE (kind text, i integer, billed bigint, outcome text, window_kind text,
               resets_at timestamptz, allowance bigint, detail text, room bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM subscription_flights f
     WHERE f.subscription_id IN (SELECT l.subscription_id FROM usage_ledger l WHERE l.id = ANY(s_ids)
                                 UNION SELECT unnest(a_subscription_ids))
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
                                      a_prompt_estimates, a_reserves, a_helds, a_lease_seconds) a;
    END IF;
END;
$$;
