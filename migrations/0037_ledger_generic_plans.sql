-- The ledger's batch functions plan their statements once per connection, not on every call.
--
-- PL/pgSQL prepares each statement once per session, but while a statement's parameters are
-- arrays (the batch's columns) PostgreSQL's plan cache keeps choosing a custom plan, planned
-- anew at every call: a profile of one connection doing admit+settle pairs (perf, bench/PROFILE.md)
-- spent its time in the planner and executor set-up, not in the rows. Every statement here looks
-- rows up by primary key or by an indexed subscription id, so the generic plan is the plan.
-- Measured: ledger_admit_batch's own time 2.2 -> 1.3 ms per call on this machine.
ALTER FUNCTION ledger_admit_batch(uuid[], bigint[], bigint[], text[], text[], integer[], bigint[], bigint[],
                                  double precision)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION ledger_settle_batch(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[],
                                   text[], text[], numeric[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION ledger_tick(uuid[], text[], integer[], integer[], integer[], integer[], boolean[], text[], text[],
                           text[], numeric[], uuid[], bigint[], bigint[], text[], text[], integer[], bigint[],
                           bigint[], double precision)
    SET plan_cache_mode = force_generic_plan;
