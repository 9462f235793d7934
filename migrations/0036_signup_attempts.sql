-- Sign-ups per client address, to throttle them (review finding 15): each one costs a scrypt hash
-- (~0.1 s of CPU, 32 MiB) and an account row, so an address gets CODEPLAN_SIGNUP_LIMIT of them per
-- CODEPLAN_SIGNUP_WINDOW seconds (service/web/throttle.py). Rows older than a day are deleted by
-- the web's housekeeping.
CREATE TABLE signup_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX signup_attempts_address ON signup_attempts (address, at);
