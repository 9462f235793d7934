-- An account's owner changes its address or closes it; an address never confirmed expires.
-- (service/web/identity.py: change_email, confirm_email_change, close_account, expire_unverified)

-- When the owner closed the account. A closed account keeps its row (the ledger, invoices and
-- the audit name it) but not its address: `email` becomes closed-<id>@closed.invalid, which no
-- person can type into the sign-up (normal_email refuses .invalid) and no mail server delivers.
ALTER TABLE accounts ADD COLUMN closed_at timestamptz;

-- A link that changes the address carries the address it changes to; only that purpose has one.
ALTER TABLE mail_tokens ADD COLUMN new_email text;
ALTER TABLE mail_tokens DROP CONSTRAINT mail_tokens_purpose_check;
ALTER TABLE mail_tokens ADD CONSTRAINT mail_tokens_purpose_check
    CHECK (purpose IN ('verify', 'reset', 'email_change'));
ALTER TABLE mail_tokens ADD CONSTRAINT mail_tokens_new_email_only_for_a_change
    CHECK ((purpose = 'email_change') = (new_email IS NOT NULL));

-- The expiry's candidates (the web's housekeeping, hourly): addresses never confirmed, oldest
-- first, without reading every account.
CREATE INDEX accounts_unverified ON accounts (created_at)
    WHERE email_verified_at IS NULL AND closed_at IS NULL;

-- "Does the audit name this account?", asked by the expiry for each candidate.
CREATE INDEX admin_audit_target ON admin_audit (target);
