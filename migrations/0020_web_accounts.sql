-- The web page's accounts: passwords, sessions, mailed one-time links, login throttling,
-- admins, and when each API key was last used.

-- NULL password: an account made by the CLI; its owner gets in through "forgot password".
ALTER TABLE accounts
    ADD COLUMN password_hash text,
    ADD COLUMN email_verified_at timestamptz,
    ADD COLUMN is_admin boolean NOT NULL DEFAULT false;

-- Written at most once a minute per key by each process, off the request path.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;

-- Server-side sessions: the cookie holds a random token, only its SHA-256 is stored here.
CREATE TABLE web_sessions (
    token_hash  bytea PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX web_sessions_account ON web_sessions (account_id);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);

-- Links sent by mail (verify the address, reset the password): one use each, stored as a hash.
CREATE TABLE mail_tokens (
    token_hash  bytea PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    purpose     text NOT NULL CHECK (purpose IN ('verify', 'reset')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX mail_tokens_account ON mail_tokens (account_id, purpose, created_at);

-- Failed logins, counted per address typed and per client address to throttle guessing.
CREATE TABLE login_failures (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email       text NOT NULL,
    address     text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_email ON login_failures (email, failed_at);
CREATE INDEX login_failures_address ON login_failures (address, failed_at);

-- Secrets the processes of one deployment must share (the CSRF signing key), made once.
CREATE TABLE web_secrets (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
