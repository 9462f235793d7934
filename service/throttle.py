"""A throttle on failed authentication, consulted before a key is looked up in the database.

Without it, every made-up key costs one database query: 2,000 random keys in 1.3 s were 2,000
queries. With it:
- a key hash found unknown is remembered for `unknown_ttl` seconds, so sending it again (a
  misconfigured tool retrying, a flood of one key) is answered without a query;
- each client address may look up at most `limit` unknown keys per `window` seconds; past that
  its lookups are refused (429, Retry-After: the end of its window) without touching the
  database. IPv6 addresses count per /64, the block one machine usually holds;
- a key hash that authenticated before is never throttled, so colleagues behind the same NAT
  as a misbehaving tool keep working, and a key found in the authenticator's cache costs nothing.
Memory stays bounded under a flood of addresses or keys: each table is an LRU of fixed size
(~100 bytes an entry), and evicting an address only forgets its failures.

`GuardedAuthenticator` wraps any authenticator (`async authenticate(key) -> principal | None`)
with it: every caller gets the unknown-key cache, and failures count against the address of
the request being served (`calling_client`); the refusal itself comes from the caller that
knows the address (service/throttle_gate.py before the journey, the quota API with its own).
"""
from __future__ import annotations

import contextvars
import ipaddress
import math
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Protocol

from . import keys


# the address of the client whose request is being served (set by service/throttle_gate.py), so
# that an authenticator called without one still counts a failure against the right address
calling_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("calling_client", default=None)


class Throttled(Exception):
    """Too many unknown keys from this address: answer 429 with Retry-After."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed authentications; retry in {math.ceil(retry_after)} s")
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


def address_key(client: str) -> str:
    """Who failures are counted against: an IPv4 address, or an IPv6 address's /64."""
    if ":" not in client:
        return client  # IPv4 (or a name): as it is; parsing it costs microseconds per request
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False).network_address) + "/64"
    return client


class AuthThrottle:
    def __init__(self, *, limit: int = 20, window: float = 60.0, unknown_ttl: float = 30.0,
                 max_addresses: int = 16384, max_keys: int = 16384,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.unknown_ttl = unknown_ttl
        self._max_addresses = max_addresses
        self._max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()  # address -> [count, window end]
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # key hash -> forgotten at
        self._valid: OrderedDict[bytes, None] = OrderedDict()  # key hashes that authenticated
        # what the throttle saved: lookups answered from the unknown-key cache, lookups refused
        self.cached_unknown = 0
        self.refused = 0

    def is_unknown(self, digest: bytes) -> bool:
        """A key hash looked up and not found within the last `unknown_ttl` seconds."""
        until = self._unknown.get(digest)
        if until is None:
            return False
        if until <= self._clock():
            del self._unknown[digest]
            return False
        self.cached_unknown += 1
        return True

    def watching(self, client: str | None) -> bool:
        """Whether `retry_after` could refuse `client` at all: callers skip hashing its key when
        not (nearly always: no address has failed lately)."""
        return self.limit > 0 and client is not None and bool(self._failures)

    def retry_after(self, client: str | None, digest: bytes) -> float | None:
        """Seconds `client` must wait before looking up `digest`; None when it may now."""
        if self.limit <= 0 or client is None or not self._failures or digest in self._valid:
            return None
        entry = self._failures.get(address_key(client))
        if entry is None or entry[0] < self.limit:
            return None
        wait = entry[1] - self._clock()
        if wait <= 0:
            return None
        self.refused += 1
        return wait

    def failed(self, client: str | None, digest: bytes) -> None:
        """`digest` was looked up (from `client`) and is no key of ours."""
        now = self._clock()
        if self.unknown_ttl > 0:
            self._unknown[digest] = now + self.unknown_ttl
            self._unknown.move_to_end(digest)
            while len(self._unknown) > self._max_keys:
                self._unknown.popitem(last=False)
        if self.limit <= 0 or client is None:
            return
        address = address_key(client)
        entry = self._failures.get(address)
        if entry is None or entry[1] <= now:
            self._failures[address] = [1, now + self.window]
        else:
            entry[0] += 1
        self._failures.move_to_end(address)
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, digest: bytes) -> None:
        self._valid[digest] = None
        self._valid.move_to_end(digest)
        while len(self._valid) > self._max_keys:
            self._valid.popitem(last=False)
        self._unknown.pop(digest, None)


class _Authenticates(Protocol):
    def authenticate(self, key: str) -> Awaitable[Any]: ...


class GuardedAuthenticator:
    """An authenticator behind the throttle; the same `authenticate(key)` for existing callers."""

    def __init__(self, inner: _Authenticates, throttle: AuthThrottle) -> None:
        self.inner = inner
        self.throttle = throttle

    async def authenticate(self, key: str, client: str | None = None) -> Any:
        """The principal for `key`, or None when it is unknown.

        With `client`, raises Throttled when that address has looked up too many unknown keys.
        Without one (the journey, which answers any exception as an outage) it never raises:
        a failure still counts against the address of the request being served, and the
        throttle gate (service/throttle_gate.py) refuses that address before its next request gets here.
        """
        if not key:
            return None
        digest = keys.key_hash(key)
        throttle = self.throttle
        if throttle.is_unknown(digest):
            return None
        if client is not None:
            wait = throttle.retry_after(client, digest)
            if wait is not None:
                raise Throttled(wait)
        # the inner authenticator takes the hash made here when it can (one SHA-256 a request)
        by_digest = getattr(self.inner, "authenticate_digest", None)
        principal = await (by_digest(digest) if by_digest is not None else self.inner.authenticate(key))
        if principal is None:
            throttle.failed(client if client is not None else calling_client.get(), digest)
        else:
            throttle.succeeded(digest)
        return principal
