-- Seeded plans get a cap on requests in flight at once, so one account cannot hold every upstream
-- slot. The values are far above what one developer's tools use (Claude Code runs a few
-- sub-agents in parallel; Kilo, Cline and OpenCode one request at a time per task) and grow with
-- the plan. An operator's own values are kept.
UPDATE plans SET max_concurrent = 10 WHERE id = 'lite' AND max_concurrent IS NULL;
UPDATE plans SET max_concurrent = 20 WHERE id = 'pro' AND max_concurrent IS NULL;
UPDATE plans SET max_concurrent = 40 WHERE id = 'max' AND max_concurrent IS NULL;
