-- The ledger's hot rows lose their foreign keys to `subscriptions`, as usage_ledger's did (0003).
--
-- A tick settles and admits in one transaction (0032), so at one request at a time it updates the
-- same 5-hour window, weekly window and flight row twice: once to release the previous request's
-- hold, once to take the next one's. PostgreSQL re-checks a foreign key on the update of a row
-- that its own transaction wrote earlier, keys unchanged or not (RI_FKey_fk_upd_check_required):
-- three `SELECT 1 FROM subscriptions ... FOR KEY SHARE` per tick, each a trigger, a query and a
-- row lock on the subscription (pg_stat_statements counted 3 per tick at 1 and at 32 connections).
-- The references hold by construction: admission opens windows and flight rows only for the
-- subscriptions it has just read under their mutexes, billing only for the subscription whose
-- mirror it holds, and nothing deletes a subscription. The columns keep their indexes.
ALTER TABLE quota_windows DROP CONSTRAINT quota_windows_subscription_id_fkey;
ALTER TABLE subscription_flights DROP CONSTRAINT subscription_flights_subscription_id_fkey;
