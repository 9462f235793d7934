-- Batched transitions: under load, the admissions (or settlements) that arrive while one call
-- is in flight go to the database together, in one call and one commit. Each element is still
-- the same guarded transition (ledger_admit / ledger_settle), so replays and races behave alike.
--
-- Elements are taken in subscription order: every batch, in every process, locks subscriptions
-- (and their windows) in the same order, so concurrent batches never wait on each other in a
-- cycle.

CREATE FUNCTION ledger_admit_many(
    p_ids uuid[], p_subscription_ids bigint[], p_api_key_ids bigint[], p_surfaces text[],
    p_models text[], p_prompt_estimates integer[], p_reserves bigint[], p_lease_seconds double precision)
RETURNS TABLE (i integer, outcome text, window_kind text, resets_at timestamptz, allowance bigint)
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    FOR k IN
        SELECT u.o::integer FROM unnest(p_subscription_ids) WITH ORDINALITY AS u(s, o) ORDER BY u.s, u.o
    LOOP
        RETURN QUERY SELECT k, a.outcome, a.window_kind, a.resets_at, a.allowance
          FROM ledger_admit(p_ids[k], p_subscription_ids[k], p_api_key_ids[k], p_surfaces[k],
                            p_models[k], p_prompt_estimates[k], p_reserves[k], p_lease_seconds) a;
    END LOOP;
END;
$$;

CREATE FUNCTION ledger_settle_many(
    p_ids uuid[], p_states text[], p_prompt integer[], p_completion integer[], p_cached integer[],
    p_reasoning integer[], p_estimated boolean[], p_reasons text[], p_upstream_request_ids text[])
RETURNS TABLE (i integer, billed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    FOR k IN
        SELECT u.o::integer FROM unnest(p_ids) WITH ORDINALITY AS u(id, o)
          LEFT JOIN usage_ledger l ON l.id = u.id
         ORDER BY l.subscription_id NULLS LAST, u.o
    LOOP
        RETURN QUERY SELECT k, s.billed
          FROM ledger_settle(p_ids[k], p_states[k], p_prompt[k], p_completion[k], p_cached[k],
                             p_reasoning[k], p_estimated[k], p_reasons[k], p_upstream_request_ids[k]) s;
    END LOOP;
END;
$$;
