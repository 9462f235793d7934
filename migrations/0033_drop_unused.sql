-- ledger_lock_windows has had no caller since 0006 (the batch functions lock windows themselves,
-- in id order): gone, so nobody reads it as part of the ledger's lock order.
DROP FUNCTION ledger_lock_windows(bigint, bigint);
