-- Per-day aggregates of settled ledger rows, so old rows can leave the raw ledger without
-- changing any total. Window totals live in quota_windows and are not touched by a rollup.

CREATE TABLE usage_daily (
    subscription_id     bigint NOT NULL REFERENCES subscriptions (id),
    day                 date NOT NULL,
    model               text NOT NULL,
    requests            bigint NOT NULL DEFAULT 0,
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0,
    cached_tokens       bigint NOT NULL DEFAULT 0,
    reasoning_tokens    bigint NOT NULL DEFAULT 0,
    billed_tokens       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subscription_id, day, model)
);

-- Moves settled rows created before `p_before` into usage_daily, in one statement.
-- Voided rows carry no usage and are dropped; pending rows are never touched.
CREATE FUNCTION ledger_rollup(p_before timestamptz) RETURNS bigint
LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM usage_ledger
         WHERE state <> 'pending' AND created_at < p_before
        RETURNING subscription_id, (created_at AT TIME ZONE 'UTC')::date AS day, model, state,
                  prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, billed_tokens
    ), summed AS (
        INSERT INTO usage_daily AS d (subscription_id, day, model, requests, prompt_tokens,
                                      completion_tokens, cached_tokens, reasoning_tokens, billed_tokens)
        SELECT subscription_id, day, model, count(*), sum(prompt_tokens), sum(completion_tokens),
               sum(cached_tokens), sum(reasoning_tokens), sum(billed_tokens)
          FROM moved WHERE state <> 'voided'
         GROUP BY subscription_id, day, model
        ON CONFLICT (subscription_id, day, model) DO UPDATE SET
            requests = d.requests + excluded.requests,
            prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = d.completion_tokens + excluded.completion_tokens,
            cached_tokens = d.cached_tokens + excluded.cached_tokens,
            reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
            billed_tokens = d.billed_tokens + excluded.billed_tokens
        RETURNING 1
    )
    SELECT count(*) FROM moved;
$$;
