-- A rollup moves whole UTC days, never part of one (found by a hunt, proven).
--
-- `codeplan rollup --older-than-days N` cut at `now - N days`, whatever the time of day it ran:
-- the day of the cut was split, its rows before the cut summed into usage_daily, the rest left in
-- the ledger. A day in usage_daily has no time inside it any more, so a range that begins or
-- ends inside that day could not be answered from it: the usage views counted it whole or not
-- at all, and their figures changed when a rollup ran. Now the cut is the UTC midnight at or
-- before `p_before`, computed in UTC whatever the session's TimeZone (a half-hour or DST zone
-- would otherwise put "midnight" at 18:30 or 23:00 UTC). service/commands.py asks for a
-- midnight already; this holds for every other caller too.
--
-- Restated whole from migrations/0030 (its newest definition); only the cut changes.

CREATE OR REPLACE FUNCTION ledger_rollup(p_before timestamptz) RETURNS bigint
LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM usage_ledger
         WHERE state <> 'pending' AND created_at < date_trunc('day', p_before, 'UTC')
        RETURNING subscription_id, (created_at AT TIME ZONE 'UTC')::date AS day, model, state,
                  prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, billed_tokens,
                  coalesce(upstream_cost, 0) AS upstream_cost
    ), summed AS (
        INSERT INTO usage_daily AS d (subscription_id, day, model, requests, prompt_tokens,
                                      completion_tokens, cached_tokens, reasoning_tokens, billed_tokens,
                                      upstream_cost)
        SELECT subscription_id, day, model, count(*), sum(prompt_tokens), sum(completion_tokens),
               sum(cached_tokens), sum(reasoning_tokens), sum(billed_tokens), sum(upstream_cost)
          FROM moved WHERE state <> 'voided'
         GROUP BY subscription_id, day, model
        ON CONFLICT (subscription_id, day, model) DO UPDATE SET
            requests = d.requests + excluded.requests,
            prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = d.completion_tokens + excluded.completion_tokens,
            cached_tokens = d.cached_tokens + excluded.cached_tokens,
            reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
            billed_tokens = d.billed_tokens + excluded.billed_tokens,
            upstream_cost = d.upstream_cost + excluded.upstream_cost
        RETURNING 1
    )
    SELECT count(*) FROM moved;
$$;

-- `GET /v1/usage` counts today and this week over every subscription of the key's account (as
-- the dashboard and the live feeds count today), looked up by account on each call: without an
-- index on the account that is a scan of every subscription (the partial unique index
-- subscriptions_one_live leaves out the canceled ones, which are counted too).
CREATE INDEX subscriptions_account ON subscriptions (account_id);
