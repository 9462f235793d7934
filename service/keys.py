"""API keys: made once, shown once, stored only as a hash and a visible prefix."""
from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "cp_"
VISIBLE = 10


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


def key_hash(key: str) -> bytes:
    # Keys carry 240 random bits: a fast hash is enough, a slow KDF would only cost latency.
    return hashlib.sha256(key.encode()).digest()


def visible_prefix(key: str) -> str:
    return key[:VISIBLE]
