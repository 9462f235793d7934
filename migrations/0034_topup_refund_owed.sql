-- A refunded top-up is taken back in full, also the part requests in flight were holding (review
-- finding 2). 0011's billing_topup_refund took only what was neither spent nor held, yet recorded
-- the whole refund as done: when those requests settled below their hold, the refunded credits
-- came back spendable, and a redelivered refund event changed nothing.
--
-- What is still owed is remembered on the block's window (`revoke_owed`, in credits) and taken
-- back as it is freed:
--   * the refund adds what it revokes to `revoke_owed`, in one UPDATE of the window;
--   * every UPDATE of a window that owes something (the refund's own, a settlement releasing a
--     hold, an expiry) takes from its allowance what is neither spent nor held, up to what is
--     owed, in that same statement (the trigger below). Nothing else changes a top-up window's
--     room, so while a window owes anything it has no room, and no admission can draw on it.
-- When every request has settled, the block's allowance is what it was bought for, less the
-- refunded share, or what was spent if that is more; what stays owed then was spent before the
-- refund and cannot be taken back (the page shows only what was).
--
-- Why a trigger rather than a change of settlement: the release happens in the ledger's
-- settlement (ledger_settle_batch, 0031, and whatever version follows it), which knows nothing of
-- refunds; a BEFORE UPDATE row trigger does the taking in the same statement and under the lock
-- that statement already holds on the window, so it takes no lock of its own and the ledger's lock
-- order (subscription_flights, entries, windows by id) is untouched. Its WHEN clause is evaluated
-- without calling the function, so the 5-hour, weekly and overage windows, which never owe
-- anything, pay one integer comparison per update.

ALTER TABLE quota_windows
    ADD COLUMN revoke_owed bigint NOT NULL DEFAULT 0 CHECK (revoke_owed >= 0);

CREATE FUNCTION quota_window_take_owed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_take bigint := least(NEW.revoke_owed, greatest(NEW.allowance - NEW.posted - NEW.held, 0));
BEGIN
    NEW.allowance := NEW.allowance - v_take;
    NEW.revoke_owed := NEW.revoke_owed - v_take;
    RETURN NEW;
END;
$$;

CREATE TRIGGER quota_windows_take_owed BEFORE UPDATE ON quota_windows
    FOR EACH ROW WHEN (NEW.revoke_owed > 0) EXECUTE FUNCTION quota_window_take_owed();

-- A refund of a top-up revokes the block in proportion to the money refunded: what is neither
-- spent nor held at once, the rest as the holds of requests in flight are released.
-- `p_amount_refunded` is the charge's cumulative refunded amount (as read from Stripe), so a
-- replay changes nothing. Returns the credits this call revoked (NULL: not a top-up's payment).
-- Locks: the top-up, then the window's subscription mutex, then the window (the ledger's order).
CREATE OR REPLACE FUNCTION billing_topup_refund(p_payment_intent text, p_amount_refunded bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t topups;
    v_money bigint;
    v_target bigint;
    v_take bigint;
    v_subscription bigint;
    v_now_on bigint;
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
    IF v_take > 0 AND t.window_id IS NOT NULL THEN
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
        UPDATE quota_windows q SET revoke_owed = q.revoke_owed + v_take WHERE q.id = t.window_id;
    END IF;
    -- a block not attached yet is attached with tokens - tokens_revoked (billing_topup_attach)
    UPDATE topups SET amount_refunded = v_money, refunded_at = now(), tokens_revoked = tokens_revoked + v_take
     WHERE id = t.id;
    RETURN v_take;
END;
$$;
