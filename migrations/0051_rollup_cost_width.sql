-- A day's upstream cost in `usage_daily` may be the sum of many rows, each of which the ledger
-- accepts below 1e9 USD (service/ledger.py `_usd`, the column `usage_ledger.upstream_cost
-- numeric(18,9)`): summed into the same numeric(18,9), a few such rows of one subscription,
-- day and model overflowed it, and `ledger_rollup`, one statement, then failed on every run,
-- rolling up nothing (found by a review, proven). The daily column gets room for any sum the
-- ledger can hold. (Only the precision grows, the scale is the same: no table rewrite.)

ALTER TABLE usage_daily ALTER COLUMN upstream_cost TYPE numeric(28, 9);
