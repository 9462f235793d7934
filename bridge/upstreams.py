"""Upstream profiles: several named upstreams at once, chosen per model and weight, with
failover before the first byte, key health, and the per-key concurrency cap.

A **profile** is one upstream: a base URL, its keys, the models it serves, how many requests
each key may carry at once, its weight among the profiles serving a model, and its prices
(USD per million input, cached-input and output tokens), so each settlement records what the
request cost. Presets fill the URL and the published prices of the usual upstreams.

The **router** picks, for each request, a profile serving its model (weighted at random among
the healthy ones) and a key of it (the least busy, in turn among equals). Before any byte has
reached the client, a failure that another key or upstream may not meet (a connection failure,
a 5xx, 429/1302, 1305, a 503, the deployment's 404 or a proxy's 408, our key's billing or
credentials; each also when a whole answer's 200 carries it as its only body, or a stream's as
its first event) is retried on another key or profile with backoff, at most `attempts` times. A
key that keeps failing cools down (30 s, doubling while it keeps failing) and shows as
unhealthy; a cooling key is used only when nothing else is left. A request fault (400, content
policy, context length) is never retried, nor a timeout (ours, or a 504/524 from the upstream's
gateway: the model may have computed it all). A model the upstream account may not use (1211,
1220, 1311) cools no key and is tried on another profile serving it, if there is one.

With a per-key cap configured, a request holds a slot of its key until its response ends. In
one process that is a counter; across processes and hosts it is a lease in PostgreSQL (the
`KeyLeases` port, implemented by the service), taken only when a cap is set, so the default
path pays nothing. When every slot is busy, the requests waiting for one are served **in turn by
account** (`FairQueue`): each account's requests in their order of arrival, the accounts
round-robin, so one account with a hundred requests queued delays another's next request by at
most one of its own, not by all of them. (Per process: across processes each one's queue is
fair, and the lease shares the slots among them.)
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import hashlib
import logging
import random
import re
import time
import urllib.parse
from typing import Annotated, Callable, Hashable, Literal, Protocol

import aiohttp
import msgspec

from . import glm, sse, wire
from .errors import BridgeError, Kind
from .metrics import BridgeMetrics, NoMetrics
from .upstream import UpstreamResponse, _refuses_stream_options, asks_for_usage

log = logging.getLogger("codeplan.upstreams")

# the most a price may be, USD per million tokens: far past any model's (Z.ai's dearest is a few
# dollars), and it keeps a request's cost inside the ledger's upstream_cost numeric(18,9), whose
# settlement would otherwise fail for ever (service/ledger.py `_usd` is the last guard)
MAX_PRICE = 100_000.0
PerMillion = Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE)]
# a key is sent as `Authorization: Bearer <key>`: printable ASCII without spaces. A CR, LF or
# other control character would inject a header or make aiohttp refuse every request sent with it
KEY_PATTERN = r"^[\x21-\x7e]+\Z"  # \Z: `$` would let a final newline through
_KEY = re.compile(KEY_PATTERN)


def sendable(key: str) -> bool:
    """Whether a key can be sent as a bearer token (KEY_PATTERN)."""
    return _KEY.match(key) is not None


# A stream on its way is accepted at its first event (`Router._first_event`), but the upstream
# took it, and works on it, from its success status on: a client that leaves in between still
# pays the prompt, as one that leaves before the first token always did. So whoever opens a stream
# may set this, around creating the task that opens it (bridge/journey.py), to be told the
# response once an upstream took the request, and None when that attempt then fails after all
# (its first event a refusal: another key is tried, or none).
stream_taken: contextvars.ContextVar[Callable[[UpstreamResponse | None], None] | None] = \
    contextvars.ContextVar("stream_taken", default=None)


# ---- configuration ---------------------------------------------------------------------------

class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens, at most MAX_PRICE each."""
    input: PerMillion = 0.0
    cached: PerMillion = 0.0
    output: PerMillion = 0.0

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        cached = min(max(cached, 0), max(prompt, 0))
        return (max(prompt - cached, 0) * self.input + cached * self.cached
                + max(completion, 0) * self.output) / 1_000_000


class ProfileConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    preset: Literal["", "zai", "zhipu", "zai-coding", "vllm", "sglang", "simulator"] = ""
    base_url: str = ""
    keys: tuple[Annotated[str, msgspec.Meta(min_length=1, pattern=KEY_PATTERN)], ...] = ()
    # the name of an environment variable holding comma-separated keys (kept out of the file)
    keys_env: str = ""
    models: tuple[str, ...] = ()  # empty: every model
    # per key; 0: no cap (a slot is a row of upstream_key_leases: bounded so a typo cannot make millions)
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    prices: Price | None = None  # default for its models
    model_prices: dict[str, Price] = {}
    stream_usage: Literal["auto", "ask", "never"] = "auto"
    enabled: bool = True


class UpstreamsFile(msgspec.Struct, forbid_unknown_fields=True):
    upstreams: list[ProfileConfig]


# glm-upstream.md §11: Z.ai's pay-as-you-go prices per million tokens
ZAI_PRICES = {
    "glm-4.6": Price(0.60, 0.11, 2.20),
    "glm-4.5": Price(0.60, 0.11, 2.20),
    "glm-4.5-air": Price(0.20, 0.03, 1.10),
}
PRESETS: dict[str, tuple[str, dict[str, Price]]] = {
    # pay-as-you-go: what a business serving others forwards to
    "zai": ("https://api.z.ai/api/paas/v4", ZAI_PRICES),
    # mainland prices are in CNY and not confirmed: set `prices` yourself
    "zhipu": ("https://open.bigmodel.cn/api/paas/v4", {}),
    # a personal coding plan: a flat fee, so no per-token price; a personal bridge only
    "zai-coding": ("https://api.z.ai/api/coding/paas/v4", {}),
    # your own GPUs: set `base_url` (e.g. http://gpu-1:8000/v1) and what a token costs you
    "vllm": ("", {}),
    "sglang": ("", {}),
    # the built-in simulator, priced like Z.ai so the reports show realistic margins
    "simulator": ("", ZAI_PRICES),
}


def shown_url(url: str) -> str:
    """A URL as an error line may quote it: in full (repr) unless it may carry a password (any
    `@`: a password holding `/`, `?` or `#` ends the authority early, so the `@` can sit
    anywhere), then not at all: error lines reach logs, the admin API's 400s and tickets."""
    if "@" in url:
        return "a value with user:password@ (not shown)"
    return repr(url)


def resolve(profile: ProfileConfig, environ: dict[str, str] | None = None) -> ProfileConfig:
    """The profile with its preset applied and its keys read; raises ValueError worded as a
    start-up error line."""
    base_url, preset_prices = PRESETS.get(profile.preset, ("", {}))
    url = profile.base_url or base_url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"upstream {profile.name!r}: expected an http:// or https:// base_url, "
                         f"got {shown_url(url)}")
    if "@" in url:
        # the profile's URL is shown in the admin API and its host part in /metrics, /readyz
        # and logs; credentials go in `keys` (sent as the bearer token), never in the URL
        raise ValueError(f"upstream {profile.name!r}: expected a base_url without user:password@ "
                         "(the keys go in `keys`); value not shown")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not one
    except ValueError as exc:
        raise ValueError(f"upstream {profile.name!r}: base_url {url!r} is not a URL ({exc})") from None
    if not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"upstream {profile.name!r}: base_url {url!r} names no host")
    keys = list(profile.keys)
    if profile.keys_env:
        import os

        raw = (environ if environ is not None else os.environ).get(profile.keys_env, "")
        keys += [k.strip() for k in raw.split(",") if k.strip()]
    if not keys:
        raise ValueError(f"upstream {profile.name!r}: no keys (set `keys` or `keys_env`)")
    # keys_env and CODEPLAN_UPSTREAM_KEYS skip the Struct's pattern: checked here for every source
    # (the message never shows a key, not even in part)
    if not all(sendable(k) for k in keys):
        raise ValueError(f"upstream {profile.name!r}: a key holds a space, a control character or a "
                         "non-ASCII character (a key is printable ASCII without spaces); value not shown")
    prices = {**preset_prices, **profile.model_prices}
    return msgspec.structs.replace(profile, base_url=url, keys=tuple(keys), keys_env="",
                                   model_prices=prices)


def fingerprint(key: str) -> str:
    """How a key is named anywhere it may be seen (admin API, metrics, the lease table)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# ---- the concurrency lease across processes -------------------------------------------------

class KeyLeases(Protocol):
    """Per-key slots shared by every process (PostgreSQL, in the service)."""

    async def prepare(self, key_ids: list[str], cap: int) -> None: ...

    async def acquire(self, key_ids: list[str], cap: int) -> tuple[str, int] | None: ...

    def release(self, key_id: str, slot: int) -> None:
        """Give the slot back, in the background; a lost release lapses with its lease."""


# ---- waiting for a slot, in turn by account ---------------------------------------------------

class FairQueue:
    """Requests waiting for a slot, served round-robin by account.

    Only the waiter at the head may try to take a slot; when it gets one, its account moves to
    the back of the turn and the next account's oldest waiter becomes the head. So with slots
    scarce, accounts alternate whatever the number each has waiting. A waiter that leaves
    without a slot (its client went away) passes the head on if it had it."""

    __slots__ = ("_accounts",)

    def __init__(self) -> None:
        # account -> its waiters in arrival order; the dict's order is the accounts' turn
        self._accounts: collections.OrderedDict[Hashable, collections.deque[asyncio.Future]] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return sum(map(len, self._accounts.values()))

    def join(self, account: Hashable) -> asyncio.Future:
        """A future resolved when this waiter is at the head (at once, if no one else waits)."""
        turn = asyncio.get_running_loop().create_future()
        self._accounts.setdefault(account, collections.deque()).append(turn)
        self._wake_head()
        return turn

    def leave(self, account: Hashable, turn: asyncio.Future, *, served: bool) -> None:
        """`turn` stops waiting: `served` with a slot (its account's turn is over), or not."""
        waiters = self._accounts.get(account)
        if waiters is None:
            return
        try:
            waiters.remove(turn)
        except ValueError:
            return
        if not waiters:
            del self._accounts[account]
        elif served:
            self._accounts.move_to_end(account)
        if not turn.done():
            turn.cancel()
        self._wake_head()

    def _wake_head(self) -> None:
        for waiters in self._accounts.values():
            if not waiters[0].done():
                waiters[0].set_result(None)
            return


# ---- state ----------------------------------------------------------------------------------

class KeyHealth(msgspec.Struct):
    fingerprint: str
    enabled: bool
    healthy: bool
    in_flight: int
    served: int
    failures: int
    cooling_for_s: float
    last_error: str | None


class ProfileHealth(msgspec.Struct):
    name: str
    base_url: str
    models: list[str]
    weight: int
    concurrency: int
    enabled: bool
    usable: bool
    prices: dict[str, Price]
    keys: list[KeyHealth]


class _Key:
    __slots__ = ("secret", "fingerprint", "lease_id", "enabled", "in_flight", "served", "failures",
                 "trips", "cooling_until", "last_error")

    def __init__(self, profile: str, secret: str, enabled: bool = True) -> None:
        self.secret = secret
        self.fingerprint = fingerprint(secret)
        self.lease_id = f"{profile}/{self.fingerprint}"
        self.enabled = enabled
        self.in_flight = 0
        self.served = 0
        self.failures = 0  # in a row
        self.trips = 0  # cool-downs in a row
        self.cooling_until = 0.0
        self.last_error: str | None = None

    def cooling(self, now: float) -> bool:
        return self.cooling_until > now


class Profile:
    def __init__(self, config: ProfileConfig, *, enabled: bool = True,
                 disabled_keys: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.name = config.name
        self.enabled = enabled and config.enabled
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.ask_usage = asks_for_usage(config.base_url, config.stream_usage)
        self.keys = [_Key(config.name, k) for k in dict.fromkeys(config.keys)]
        for key in self.keys:
            key.enabled = key.fingerprint not in disabled_keys
        self.cap = config.concurrency
        self.waiting = FairQueue()  # requests waiting for a slot of this profile's keys
        self._turn = 0

    def serves(self, model: str) -> bool:
        return not self.config.models or model in self.config.models

    def price(self, model: str) -> Price:
        return self.config.model_prices.get(model) or self.config.prices or Price()

    def live_keys(self) -> list[_Key]:
        return [k for k in self.keys if k.enabled] if self.enabled else []

    def usable(self, now: float) -> bool:
        return any(not k.cooling(now) for k in self.live_keys())

    def ordered(self, now: float, tried: set[str]) -> list[_Key]:
        """Keys to try: untried first, healthy first, least busy first, in turn among equals."""
        keys = self.live_keys()
        n = len(keys)
        if not n:
            return []
        if n == 1:
            return keys
        turn = self._turn
        self._turn = (turn + 1) % n
        return sorted(keys, key=lambda k: (k.lease_id in tried, k.cooling(now), k.in_flight,
                                           (keys.index(k) - turn) % n))

    def health(self, now: float) -> ProfileHealth:
        return ProfileHealth(
            name=self.name, base_url=self.config.base_url, models=list(self.config.models),
            weight=self.config.weight, concurrency=self.cap, enabled=self.enabled,
            usable=self.usable(now), prices={m: p for m, p in self.config.model_prices.items()}
            | ({"*": self.config.prices} if self.config.prices else {}),
            keys=[KeyHealth(fingerprint=k.fingerprint, enabled=k.enabled,
                            healthy=k.enabled and not k.cooling(now), in_flight=k.in_flight,
                            served=k.served, failures=k.failures,
                            cooling_for_s=round(max(0.0, k.cooling_until - now), 1),
                            last_error=k.last_error) for k in self.keys])


class _RefusedStreamOptions(Exception):
    pass


class _Failure(Exception):
    """One attempt failed: the error for the client, and whether it was our key's fault."""

    def __init__(self, error: BridgeError, *, key_fault: bool, at_once: bool = False,
                 final: bool = False, other_profile: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.key_fault = key_fault
        self.at_once = at_once  # cool the key now (credentials, billing, quota), not after 3
        self.final = final  # no other attempt, whatever its kind
        # the profile cannot serve this request with any of its keys (a model its account may
        # not use): tried on another profile serving the model, if there is one; never this one
        self.other_profile = other_profile


# failures another key or upstream may well not meet; never a refusal of the request itself
_RETRY_ON = {Kind.upstream_error, Kind.upstream_rate_limited, Kind.upstream_overloaded,
             Kind.upstream_billing, Kind.upstream_timeout}
_QUOTA_CODES = {"1113", "1308", "1309", "1310", "1316", "1317", "1318", "1319", "1320", "1321"}
_FAILURES_BEFORE_COOLING = 3
# A stream's first event is looked for this many bytes at a time, and in this many bytes at most
# (`_look`): a GLM chunk is a few hundred bytes and a refusal fewer, while a fast upstream's first
# read may hold its whole answer, which the relay decodes anyway (decoded whole, a 3.6 KB answer
# cost the look ~45 us, against ~9 us in steps of 512). A first line longer than the most is no
# refusal: it is the relay's (whose decoder ends the stream at sse.MAX_LINE), not held twice.
_PEEK_STEP = 512
_PEEK_MAX = 65536
_MAX_TRIPS = 5  # cool-downs double up to 2^5 times the base


class Router:
    """The bridge's upstream: `open(request, request_id)` as `bridge.upstream.Upstream`."""

    def __init__(self, profiles: list[ProfileConfig], *, timeout: float, attempts: int = 3,
                 cooldown: float = 30.0, leases: KeyLeases | None = None,
                 metrics: BridgeMetrics | None = None,
                 on_health: Callable[[str, str, bool, str | None], None] | None = None) -> None:
        self.profiles: list[Profile] = [Profile(p) for p in profiles]
        self._attempts = max(1, attempts)
        self._cooldown = cooldown
        self._leases = leases
        self._metrics = metrics or NoMetrics()
        self._on_health = on_health
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._released = asyncio.Event()
        self._rng = random.Random()
        if leases is not None and hasattr(leases, "on_released"):
            leases.on_released = self._released.set  # a slot freed in the database: look again

    @property
    def name(self) -> str:
        """How logs name the upstream when no profile is known yet."""
        return ",".join(p.name for p in self.profiles)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # no Accept-Encoding: a compressed SSE stream costs CPU per chunk and may be buffered.
        # No cookie jar: every user's requests share this session, so a cookie the upstream sets
        # on one answer (a load balancer's, a bot shield's) must not ride on the next request;
        # it also spares each request the jar's look-up.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"), cookie_jar=aiohttp.DummyCookieJar())
        await self._prepare_leases()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _prepare_leases(self) -> None:
        if self._leases is None:
            return
        for profile in self.profiles:
            if profile.cap:
                await self._leases.prepare([k.lease_id for k in profile.keys], profile.cap)

    async def replace(self, configs: list[ProfileConfig], enabled: dict[str, bool],
                      disabled_keys: dict[str, frozenset[str]]) -> None:
        """A new set of profiles (configuration plus what admins changed); keys that stay
        keep their health and in-flight counts."""
        old = {(p.name, k.fingerprint): k for p in self.profiles for k in p.keys}
        profiles = []
        for config in configs:
            profile = Profile(config, enabled=enabled.get(config.name, True),
                              disabled_keys=disabled_keys.get(config.name, frozenset()))
            for i, key in enumerate(profile.keys):
                kept = old.get((profile.name, key.fingerprint))
                if kept is not None:
                    kept.enabled = key.enabled
                    profile.keys[i] = kept
            before = next((p for p in self.profiles if p.name == profile.name), None)
            if before is not None:
                profile.waiting = before.waiting  # those waiting keep their place
                if before.config.base_url == config.base_url:
                    profile.ask_usage = before.ask_usage  # what it learned about stream_options
            profiles.append(profile)
        # A request waiting for a slot holds the profile it picked: one disabled or removed now
        # must not serve it (it is told no usable key is left there, and tries the others)
        kept = {p.name: p.enabled for p in profiles}
        for before in self.profiles:
            before.enabled = before.enabled and kept.get(before.name, False)
        self.profiles = profiles
        await self._prepare_leases()

    def usable(self) -> bool:
        """At least one profile has an enabled key that is not cooling down (readiness)."""
        now = time.monotonic()
        return any(p.usable(now) for p in self.profiles)

    def health(self) -> list[ProfileHealth]:
        now = time.monotonic()
        return [p.health(now) for p in self.profiles]

    # ---- choosing ----------------------------------------------------------------------------

    def _candidates(self, model: str) -> list[Profile]:
        return [p for p in self.profiles if p.serves(model) and p.live_keys()]

    def _pick(self, candidates: list[Profile], tried: set[str], now: float) -> Profile | None:
        """Weighted at random among profiles with an untried healthy key; then untried keys
        that are cooling; then anything (a retry on the same key beats none)."""
        if len(candidates) == 1:
            return candidates[0]  # the usual case; the last rule below takes it whatever its keys
        for usable in (lambda p: any(k.lease_id not in tried and not k.cooling(now) for k in p.live_keys()),
                       lambda p: any(k.lease_id not in tried for k in p.live_keys()),
                       lambda p: True):
            pool = [p for p in candidates if usable(p)]
            if pool:
                return self._rng.choices(pool, weights=[p.config.weight for p in pool])[0]
        return None

    # ---- sending -----------------------------------------------------------------------------

    async def open(self, request: wire.ChatRequest, request_id: str,
                   account: Hashable = None) -> UpstreamResponse:
        """Send the request; return the response once its status is a success (a whole answer's:
        once its body is in and is not a refusal, `_read_whole`; a stream's: once its first
        event is in and is not a refusal, `_first_event`). Raises
        BridgeError when every attempt failed or the request itself was refused. `account`:
        whose request it is, for the turn among waiters when slots are scarce."""
        assert self._session is not None, "Router.start() was not awaited"
        candidates = self._candidates(request.model)
        if not candidates:
            raise _given_up(BridgeError(Kind.upstream_error, f"No upstream serves the model "
                                        f"`{request.model}` right now. Request id {request_id}."))
        tried: set[str] = set()
        last: BridgeError | None = None
        for attempt in range(self._attempts):
            if attempt:
                # backoff: 50 ms, 100 ms, 200 ms... with jitter, at most 1 s
                await asyncio.sleep(min(0.05 * 2 ** (attempt - 1), 1.0) * self._rng.uniform(0.5, 1.0))
            profile = self._pick(candidates, tried, time.monotonic())
            if profile is None:
                break
            try:
                key, slot = await self._take(profile, tried, account)
            except _Failure as failure:
                # its keys were disabled while this request waited for a slot (the profile is
                # dropped, the others are tried), or the database keeping the slots failed (tried
                # again after the backoff); an upstream's answer to an earlier attempt says more
                last = last or failure.error
                if failure.error.kind is not Kind.unavailable:  # no usable key left in it
                    candidates = [p for p in candidates if p is not profile]
                    if not candidates:
                        break
                continue
            tried.add(key.lease_id)
            try:
                response = await self._send(profile, key, slot, request, request_id)
            except _Failure as failure:
                last = failure.error
                self._failed(profile, key, failure)
                if failure.other_profile and not failure.final:
                    candidates = [p for p in candidates if p is not profile]
                    if not candidates:
                        raise _given_up(failure.error) from None
                elif failure.final or failure.error.kind not in _RETRY_ON:
                    raise _given_up(failure.error) from None
                log.warning("upstream attempt failed" + ("; trying another" if attempt + 1 < self._attempts
                                                         else "; no attempts left"), extra={
                    "upstream": profile.name, "kind": failure.error.kind.value,
                    "code": failure.error.code, "attempt": attempt + 1})
                continue
            self._succeeded(profile, key)
            return response
        assert last is not None
        raise _given_up(last)

    async def _take(self, profile: Profile, tried: set[str],
                    account: Hashable = None) -> tuple[_Key, int | None]:
        """A key of the profile and, with a cap, a slot of it. While every slot is busy (in this
        process or, through the lease, in any), waits in the profile's fair queue: in turn by
        account, only the head trying for a slot."""
        failed = False  # a try has just found every slot busy
        if not profile.cap or not profile.waiting:
            got = await self._try_take(profile, tried)
            if got is not None:
                return got
            failed = True
        queue = profile.waiting
        turn = queue.join(account)
        served = False
        delay = 0.005
        try:
            while True:
                await turn  # at the head
                if not failed:
                    got = await self._try_take(profile, tried)
                    if got is not None:
                        served = True
                        return got
                failed = False
                # every slot busy: wait for one of ours to come back, or poll the others' leases
                self._released.clear()
                try:
                    await asyncio.wait_for(self._released.wait(), delay)
                except TimeoutError:
                    delay = min(delay * 2, 0.1)
        finally:
            queue.leave(account, turn, served=served)

    async def _try_take(self, profile: Profile, tried: set[str]) -> tuple[_Key, int | None] | None:
        """A key and, with a cap, a free slot of it now; None when every slot is busy."""
        keys = profile.ordered(time.monotonic(), tried)
        if not keys:
            raise _no_key(profile)
        if not profile.cap:
            keys[0].in_flight += 1
            return keys[0], None
        free = [k for k in keys if k.in_flight < profile.cap]
        if not free:
            return None
        if self._leases is None:
            free[0].in_flight += 1
            return free[0], None
        got = await self._lease(free, profile.cap)
        if got is None:
            return None
        key = next(k for k in free if k.lease_id == got[0])
        key.in_flight += 1
        return key, got[1]

    async def _lease(self, free: list[_Key], cap: int) -> tuple[str, int] | None:
        """A slot from the database. A request cancelled meanwhile (the client left, admission
        refused it) must not strand a slot it never learnt it had: the acquisition runs on,
        and a slot it got is given back."""
        assert self._leases is not None
        leases = self._leases
        acquiring = asyncio.ensure_future(leases.acquire([k.lease_id for k in free], cap))
        try:
            return await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None and done.result() is not None:
                    leases.release(*done.result())
            acquiring.add_done_callback(give_back)
            raise
        except Exception as exc:  # noqa: BLE001 - the database keeping the slots: a 503 at last, not a 500
            log.warning("upstream key lease failed", extra={"error": type(exc).__name__})
            raise _Failure(BridgeError(Kind.unavailable, "The service cannot reach its database right "
                                       "now; please retry in a few seconds.", retry_after=2),
                           key_fault=False) from None

    def _give_back(self, key: _Key, slot: int | None) -> None:
        key.in_flight -= 1
        if slot is not None and self._leases is not None:
            self._leases.release(key.lease_id, slot)
        self._released.set()

    async def _send(self, profile: Profile, key: _Key, slot: int | None, request: wire.ChatRequest,
                    request_id: str) -> UpstreamResponse:
        headers = {"authorization": "Bearer " + key.secret, "content-type": "application/json",
                   "accept-language": "en-US,en"}
        while True:
            if request.stream and profile.ask_usage:
                request.stream_options = wire.StreamOptions(include_usage=True)
            else:
                request.stream_options = msgspec.UNSET
            body = wire.encoder.encode(request)
            try:
                return await self._post(profile, key, slot, body, headers, request_id,
                                        profile.price(request.model), bool(request.stream))
            except _RefusedStreamOptions:
                # remembered for every later request; this one is resent at once, without it
                log.warning("upstream refuses stream_options; no longer asking it for stream usage",
                            extra={"upstream": profile.name})
                profile.ask_usage = False

    async def _post(self, profile: Profile, key: _Key, slot: int | None, body: bytes,
                    headers: dict[str, str], request_id: str, price: Price, stream: bool) -> UpstreamResponse:
        assert self._session is not None
        try:
            response = await self._session.post(profile.url, data=body, headers=headers)
        except aiohttp.SocketTimeoutError:
            # sent, and silent for the whole read timeout: the upstream is slow, not unreachable,
            # and may have computed it all. Not the key's fault, and not sent again: another key
            # would cost as much again after the client has already waited this long.
            self._give_back(key, slot)
            waited = self._timeout.sock_read
            log.warning("upstream answer timed out", extra={"upstream": profile.name, "seconds": waited})
            raise _Failure(BridgeError(Kind.upstream_timeout, f"The model provider did not start answering "
                                       f"within {waited:g} seconds. Request id {request_id}."),
                           key_fault=False, final=True) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._give_back(key, slot)
            log.warning("upstream unreachable", extra={"upstream": profile.name, "error": type(exc).__name__})
            raise _Failure(BridgeError(Kind.upstream_error, "The model provider could not be "
                                       f"reached. Request id {request_id}."), key_fault=True) from None
        except ValueError as exc:
            # aiohttp refuses to build the request: the URL was checked when the profile was
            # resolved and the body is ours, so it is the key (a control character in a key
            # stored by a version that checked less). The key cools down at once and another is
            # tried; never a 500. Its text is not logged: it may quote the key.
            self._give_back(key, slot)
            log.warning("upstream request could not be built with this key", extra={
                "upstream": profile.name, "key": key.fingerprint, "error": type(exc).__name__})
            raise _Failure(BridgeError(Kind.upstream_error, "The model provider could not be "
                                       f"reached. Request id {request_id}."), key_fault=True, at_once=True) from None
        except BaseException:
            self._give_back(key, slot)
            raise
        if response.status >= 400:
            try:
                error_body = await response.read()
            except (aiohttp.ClientError, OSError):
                error_body = b""
            except BaseException:
                # cancelled while the error's body was read (the client left, admission refused
                # an early forward): the slot goes back here, or never
                response.release()
                self._give_back(key, slot)
                raise
            response.release()
            if profile.ask_usage and _refuses_stream_options(response.status, error_body):
                raise _RefusedStreamOptions()  # resent on the same key and slot
            self._give_back(key, slot)
            error = glm.upstream_error(response.status, error_body, request_id,
                                       response.headers.get("retry-after"))
            raise _refusal(response.status, error)
        answer = UpstreamResponse(response, lambda: self._give_back(key, slot), profile.name, price, stream=stream)
        if stream:
            taken = stream_taken.get()
            if taken is not None:
                taken(answer)
            try:
                await self._first_event(answer, request_id)
            except _Failure:
                if taken is not None:
                    taken(None)
                raise
        else:
            await self._read_whole(answer, request_id)
        key.served += 1
        return answer

    async def _first_event(self, answer: UpstreamResponse, request_id: str) -> None:
        """A stream is a success once its first event is not a refusal. GLM says a key out of
        balance (1113) or a rate limit (1302) as a 200 stream whose first event is
        `{"error": ...}`; counted a success at its headers, such a key kept its turn for ever and
        the request was not tried elsewhere, though nothing had reached the client. So the first
        event is read here: one that `glm.carried_refusal` reads as a refusal the router would
        blame a key for or try elsewhere (`_routed`) is this attempt's failure, exactly as the
        same refusal with its status; any other first event (an answer's, a refusal of the
        request itself) is the relay's, and the bytes read for it are handed on untouched
        (`_ReadAhead`). The read is the relay's first read, made earlier: the answer is
        accepted when its first event has come (`arrived`), so the wait for it is the
        upstream's, not the bridge's. Comment pings before it do not count: the whole wait is
        bounded by the read timeout, as the relay bounds an upstream's silence between events.
        The look is bounded too (`_PEEK_MAX` bytes): a first line longer is no refusal."""
        content = answer.content
        decoder = sse.SSEDecoder()
        # one deadline for the whole look, not one per read: pings each just inside the read
        # timeout would otherwise hold it for twice that (aiohttp bounds the first read itself)
        waited = self._timeout.sock_read
        deadline = None if waited is None else asyncio.get_running_loop().time() + waited
        try:
            data = await content.readany()
            events, looked = _look(decoder, data, 0)
            if data and not events and looked < _PEEK_MAX:
                # (rare) comments first, or an event cut across reads: read on for one
                read = [data]
                async with asyncio.timeout_at(deadline):
                    while not events and looked < _PEEK_MAX and (data := await content.readany()):
                        read.append(data)
                        events, looked = _look(decoder, data, looked)
                data = b"".join(read)
        except (aiohttp.SocketTimeoutError, TimeoutError):
            answer.close()
            log.warning("upstream stream sent no event in time", extra={"upstream": answer.profile, "seconds": waited})
            raise _Failure(BridgeError(Kind.upstream_timeout, f"The model provider did not start answering "
                                       f"within {waited:g} seconds. Request id {request_id}."),
                           key_fault=False, final=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            # broke off before its first event: as a whole answer that breaks off (`_read_whole`),
            # not sent again, and no key's fault
            answer.close()
            log.warning("upstream stream broke off before its first event",
                        extra={"upstream": answer.profile, "error": type(exc).__name__})
            raise _Failure(BridgeError(Kind.upstream_error, "The model provider failed to answer. "
                                       f"Request id {request_id}."), key_fault=False, final=True) from None
        except BaseException:
            answer.close()  # cancelled (the client left, the cap): the slot goes back here, or never
            raise
        if events:
            carried = glm.carried_refusal(events[0].data, request_id)
            if carried is not None:
                failure = _refusal(*carried)
                if _routed(failure):
                    answer.end()  # read to its end, the connection goes back to the pool; else closed
                    log.warning("upstream refused as a stream's first event",
                                extra={"upstream": answer.profile, "status": carried[0]})
                    raise failure
        answer.arrived = time.monotonic()
        if data:
            answer.content = _ReadAhead(answer, data)  # type: ignore[assignment]

    async def _read_whole(self, answer: UpstreamResponse, request_id: str) -> None:
        """A whole answer's body, read here rather than by the journey (whose read then returns
        it: aiohttp keeps it): a 200 whose body is only a refusal (`glm.carried_refusal`:
        llama-server, LiteLLM, some GLM proxies) is this attempt's failure, which blames and
        cools the key and is tried elsewhere exactly as the same refusal with its status would
        be, before anything reaches the client. Counted a success, a key out of balance (1113)
        kept its turn for ever, every other request failing with a 402. (A whole answer is
        accepted when it has come: most upstreams send their status only with the body anyway.)
        A body that breaks off is not sent again, nor is it the key's fault: the model may have
        computed it all, as for the read timeout."""
        try:
            body = await answer.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            answer.close()
            log.warning("upstream answer broke off", extra={"upstream": answer.profile, "error": type(exc).__name__})
            raise _Failure(BridgeError(Kind.upstream_error, "The model provider failed to answer. "
                                       f"Request id {request_id}."), key_fault=False, final=True) from None
        except BaseException:
            answer.close()  # cancelled (the client left, the cap): the slot goes back here, or never
            raise
        carried = glm.carried_refusal(body, request_id)
        if carried is not None:
            answer.end()  # read to its end: the connection goes back to the pool
            log.warning("upstream refused inside a 200", extra={"upstream": answer.profile, "status": carried[0]})
            raise _refusal(*carried)

    # ---- health ------------------------------------------------------------------------------

    def _failed(self, profile: Profile, key: _Key, failure: _Failure) -> None:
        error = failure.error
        self._metrics.upstream_error(profile.name, error.code or error.kind.value)
        if not failure.key_fault:
            return
        key.failures += 1
        key.last_error = error.code or error.kind.value
        if failure.at_once or key.failures >= _FAILURES_BEFORE_COOLING:
            was_cooling = key.cooling(time.monotonic())
            key.cooling_until = time.monotonic() + self._cooldown * 2 ** min(key.trips, _MAX_TRIPS)
            key.trips += 1
            key.failures = 0
            if not was_cooling:
                log.warning("upstream key cools down", extra={
                    "upstream": profile.name, "key": key.fingerprint, "error": key.last_error,
                    "seconds": round(key.cooling_until - time.monotonic(), 1)})
                if self._on_health is not None:
                    self._on_health(profile.name, key.fingerprint, False, key.last_error)

    def _succeeded(self, profile: Profile, key: _Key) -> None:
        if key.trips or key.failures:
            if key.trips and self._on_health is not None:
                self._on_health(profile.name, key.fingerprint, True, None)
            key.failures = key.trips = 0
            key.cooling_until = 0.0


def _refusal(status: int, error: BridgeError) -> _Failure:
    """An upstream's error status as one attempt's failure: whose fault, and what is tried next."""
    kind = error.kind
    if kind is Kind.upstream_timeout:
        # a gateway before the model (504, 524) waited for it and gave up: as the router's own
        # read timeout, the model may have computed it all. No key's fault, and not sent again
        return _Failure(error, key_fault=False, final=True)
    if kind is Kind.not_found:
        # a model the profile's upstream account may not use (1211, 1220, 1311): the same for
        # every key of it, and no key's fault (cooling would take the bridge out of service for
        # every model: /readyz). Another profile serving the model may
        return _Failure(error, key_fault=False, other_profile=True)
    # our key's own trouble, cooled at once: its credentials (a plain 401 or 403), its account's
    # billing (402, 1113, 1309) or quota
    at_once = ((status in (401, 403) and kind is Kind.upstream_error)
               or kind is Kind.upstream_billing or error.code in _QUOTA_CODES)
    # 404 (a deployment that does not serve the path or model name) and a proxy's 408 are tried
    # elsewhere, but say nothing of the key
    key_fault = at_once or (kind in _RETRY_ON and status not in (404, 408))
    return _Failure(error, key_fault=key_fault, at_once=at_once)


def _look(decoder: sse.SSEDecoder, data: bytes, looked: int) -> tuple[list[sse.Event], int]:
    """The events whole once `data` is fed to `decoder`, fed `_PEEK_STEP` bytes at a time and
    stopped at the first whole event or at `_PEEK_MAX` bytes fed in all (`looked`: so far)."""
    at = 0
    while at < len(data) and looked < _PEEK_MAX:
        step = data[at:at + _PEEK_STEP]
        at += len(step)
        looked += len(step)
        events = decoder.feed(step)
        if events:
            return events, looked
    return [], looked


def _routed(failure: _Failure) -> bool:
    """Whether a refusal that came as a stream's first event is the attempt's failure: one the
    router blames a key for, or tries on another key or profile. A refusal of the request
    itself (content policy, a bad parameter) or a gateway's timeout is the relay's to tell, as
    it was."""
    return (failure.key_fault or failure.other_profile
            or (not failure.final and failure.error.kind in _RETRY_ON))


class _ReadAhead:
    """A stream's content with the bytes the router read for its first event in front of it:
    the first read returns them, and puts the response's own content back, so the relay reads
    exactly the upstream's stream, no byte lost or doubled, and each later read costs what it
    did. (What the relay and a drain use: `readany`, `at_eof`.)"""

    __slots__ = ("_answer", "_ahead", "_content")

    def __init__(self, answer: UpstreamResponse, ahead: bytes) -> None:
        self._answer = answer
        self._ahead = ahead
        self._content = answer.content

    async def readany(self) -> bytes:
        self._answer.content = self._content
        if self._ahead:
            ahead, self._ahead = self._ahead, b""
            return ahead
        return await self._content.readany()  # (a reader that kept this object)

    def at_eof(self) -> bool:
        return not self._ahead and self._content.at_eof()


def _given_up(error: BridgeError) -> BridgeError:
    """`error`, stamped with the moment the router gave up on the upstream."""
    error.upstream_at = time.monotonic()
    return error


def _no_key(profile: Profile) -> _Failure:
    return _Failure(BridgeError(Kind.upstream_error, f"Upstream {profile.name} has no usable key."),
                    key_fault=False)


def legacy_profile(url: str, keys: tuple[str, ...], *, concurrency: int, stream_usage: str,
                   prices: tuple[float, ...] = (), name: str | None = None,
                   preset: str = "") -> ProfileConfig:
    """CODEPLAN_UPSTREAM_URL / _KEYS as one profile, named after its host as logs always did."""
    price = Price(*prices) if prices else None
    # never from a URL with an `@`: it may carry user:password@ (refused by resolve(), whose
    # error names the profile, so the name must not carry it either)
    host = "" if "@" in url else urllib.parse.urlsplit(url).netloc
    return ProfileConfig(name=name or host or "default", preset=preset,  # type: ignore[arg-type]
                         base_url=url, keys=keys, concurrency=concurrency, stream_usage=stream_usage,  # type: ignore[arg-type]
                         prices=price)
