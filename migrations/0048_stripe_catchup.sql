-- How far Stripe's list of events has been read for events the webhook endpoint missed
-- (service/billing/catchup.py): the newest event's time seen. One row; one process reads at a time,
-- holding the row's claim (claimed_until, renewed page by page; a process that dies lets it lapse),
-- the others skip the pass. A claim, not a lock: it holds through a pooler in transaction mode.
CREATE TABLE stripe_catchup (
    id integer PRIMARY KEY CHECK (id = 1),
    through timestamptz,
    read_at timestamptz,
    claimed_until timestamptz
);
INSERT INTO stripe_catchup (id) VALUES (1);
