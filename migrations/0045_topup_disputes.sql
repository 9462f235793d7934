-- A top-up's payment disputed (a chargeback) takes the block back as a refund does; a dispute
-- won, or a refund that failed, gives it back.
--
-- Until now only refunds revoked a block (0034): a cardholder who disputed the charge and won
-- kept every token of it, while Stripe took the money and its dispute fee from us (no dispute
-- event was applied, and a dispute does not move `charge.amount_refunded`). Now the applier
-- reads what of the charge we do not keep: what is refunded plus what disputes have withdrawn
-- (a dispute in `needs_response`, `under_review`, an appeal, or `lost`; an inquiry, `won` or
-- `prevented` withdraws nothing), and the block is revoked in proportion to it.
--
-- That figure can also fall: a dispute won gives the money back, a refund that fails puts it
-- back on the charge. So the block's revocation now follows the figure both ways: what was
-- revoked beyond the new share is given back, first from what the window still owed (never
-- taken), then to its allowance. Like the refund, the call carries Stripe's current figures, so
-- a replay, or events applied in any order, change nothing.
--
-- Locks as 0034: the top-up, then its window's subscription mutex, then the window.

ALTER TABLE topups
    ADD COLUMN amount_disputed bigint NOT NULL DEFAULT 0 CHECK (amount_disputed >= 0);

CREATE FUNCTION billing_topup_money_back(p_payment_intent text, p_amount_refunded bigint,
                                         p_amount_disputed bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t topups;
    v_refunded bigint;
    v_disputed bigint;
    v_target bigint;
    v_change bigint;
    v_subscription bigint;
    v_now_on bigint;
BEGIN
    SELECT * INTO t FROM topups WHERE stripe_payment_intent_id = p_payment_intent FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_refunded := least(t.amount, greatest(p_amount_refunded, 0));
    v_disputed := least(t.amount - v_refunded, greatest(p_amount_disputed, 0));
    IF v_refunded = t.amount_refunded AND v_disputed = t.amount_disputed THEN
        RETURN 0;
    END IF;
    v_target := CASE WHEN t.amount = 0 THEN CASE WHEN v_refunded + v_disputed > 0 THEN t.tokens ELSE 0 END
                     ELSE ceil(t.tokens::numeric * (v_refunded + v_disputed) / t.amount)::bigint END;
    v_change := v_target - t.tokens_revoked;  -- > 0: take more back; < 0: give back
    IF v_change <> 0 AND t.window_id IS NOT NULL THEN
        -- the window's subscription mutex first; a block moves to a new subscription only under
        -- both mutexes, so once the one it is on is held, it stays there
        SELECT q.subscription_id INTO v_subscription FROM quota_windows q WHERE q.id = t.window_id;
        LOOP
            INSERT INTO subscription_flights (subscription_id) VALUES (v_subscription) ON CONFLICT DO NOTHING;
            PERFORM 1 FROM subscription_flights f WHERE f.subscription_id = v_subscription FOR NO KEY UPDATE;
            SELECT q.subscription_id INTO v_now_on FROM quota_windows q WHERE q.id = t.window_id;
            EXIT WHEN v_now_on = v_subscription;
            v_subscription := v_now_on;
        END LOOP;
        IF v_change > 0 THEN
            UPDATE quota_windows q SET revoke_owed = q.revoke_owed + v_change WHERE q.id = t.window_id;
        ELSE
            -- what is still owed was never taken: forgiving it gives that much back; the rest
            -- was taken from the allowance and goes back to it (SET reads the row as it was)
            UPDATE quota_windows q
               SET revoke_owed = q.revoke_owed - least(q.revoke_owed, -v_change),
                   allowance = q.allowance - v_change - least(q.revoke_owed, -v_change)
             WHERE q.id = t.window_id;
        END IF;
    END IF;
    -- a block not attached yet is attached with tokens - tokens_revoked (billing_topup_attach)
    UPDATE topups SET amount_refunded = v_refunded, amount_disputed = v_disputed,
                      refunded_at = CASE WHEN v_refunded + v_disputed > 0 THEN coalesce(refunded_at, now()) END,
                      tokens_revoked = v_target
     WHERE id = t.id;
    RETURN v_change;
END;
$$;

-- Older processes, still running while this one starts, call the refund alone: the dispute
-- figure stays what the last call of the new function recorded.
CREATE OR REPLACE FUNCTION billing_topup_refund(p_payment_intent text, p_amount_refunded bigint) RETURNS bigint
LANGUAGE sql AS $$
    SELECT billing_topup_money_back(p_payment_intent, p_amount_refunded,
                                    (SELECT t.amount_disputed FROM topups t
                                      WHERE t.stripe_payment_intent_id = p_payment_intent));
$$;

-- Dispute and failed-refund events an older process received were marked 'ignored' (it knew no
-- such type): applied now, once this process's worker reads them (Stripe is read again, so they
-- apply what holds today). Events an older process still running ignores after this are applied
-- by the next event of the same dispute or refund.
UPDATE stripe_events SET state = 'pending', next_attempt_at = now()
 WHERE state = 'ignored' AND (type LIKE 'charge.dispute.%' OR type = 'refund.failed');
