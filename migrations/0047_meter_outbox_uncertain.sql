-- Whether a meter event's row may already be counted at Stripe.
--
-- A row not confirmed within 23 hours of being frozen was set aside ('failed') whatever had
-- happened to its attempts, because Stripe dedupes identifiers only for about 24 hours and a send
-- after that could count it twice. But most failures prove nothing reached Stripe's meter (a 401
-- of a rolled key, a 403, a 429, a request refused before it ran): such a row can be sent safely
-- for as long as Stripe accepts its timestamp (35 days). Only an attempt whose outcome is unknown
-- (a 5xx, a timeout, a connection lost after the request left) makes the row `uncertain`, and
-- only an uncertain row is set aside at 23 hours (service/billing/outbox.py).
ALTER TABLE meter_outbox ADD COLUMN uncertain boolean NOT NULL DEFAULT false;
-- rows on their way while this runs: what their attempts met is not known
UPDATE meter_outbox SET uncertain = true WHERE state = 'sending' AND attempts > 0;
