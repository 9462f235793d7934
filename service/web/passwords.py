"""Password hashing with the standard library's scrypt: memory-hard, a fresh salt per password.

Stored as `scrypt$n$r$p$salt$hash` (base64), so the cost can rise later without breaking old
hashes: `needs_rehash` tells when a login should store a stronger one.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import secrets

# n=2**15, r=8: 32 MiB and ~0.1 s per hash on this machine's cores, OWASP's scrypt floor
# (2**17 with r=8 is their first choice; this keeps a 2-core server responsive under sign-ups).
N, R, P = 2 ** 15, 8, 1
_MAXMEM = 64 * 1024 * 1024
MIN_LENGTH = 10
MAX_LENGTH = 1024  # hashing cost does not depend on it, but a 10 MB "password" is not one


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(_derive(password, salt, N, R, P))}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        # no password set: spend the same time, so timing does not tell which accounts have one
        _derive(password, b"0" * 16, N, R, P)
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        return hmac.compare_digest(_derive(password, _unb64(salt), int(n), int(r), int(p)), _unb64(digest))
    except (ValueError, TypeError):
        return False


def needs_rehash(stored: str) -> bool:
    return not stored.startswith(f"scrypt${N}${R}${P}$")


def weakness(password: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < MIN_LENGTH:
        return "too_short"
    if len(password) > MAX_LENGTH:
        return "too_long"
    return None


# A hash takes ~0.1 s of CPU and 32 MiB: off the event loop, so other requests keep flowing, and
# on threads of its own, not asyncio's default executor, which the bridge's token counting uses
# (bridge/metering.py): a burst of sign-ups or logins queues behind itself, never ahead of metering.
# Two threads: the cores this runs on, and at most 64 MiB of scrypt memory at once.
HASHING_THREADS = 2
_hashing = concurrent.futures.ThreadPoolExecutor(HASHING_THREADS, thread_name_prefix="codeplan-scrypt")


async def hash_async(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_hashing, hash_password, password)


async def verify_async(password: str, stored: str | None) -> bool:
    return await asyncio.get_running_loop().run_in_executor(_hashing, verify_password, password, stored)
