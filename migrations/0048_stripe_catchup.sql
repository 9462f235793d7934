-- How far Stripe's list of events has been read for events the webhook endpoint missed
-- (service/billing/catchup.py): the newest event's time seen. One row; one process reads at a time
-- (a session advisory lock), the others skip the pass.
CREATE TABLE stripe_catchup (
    id integer PRIMARY KEY CHECK (id = 1),
    through timestamptz,
    read_at timestamptz
);
INSERT INTO stripe_catchup (id) VALUES (1);
