"""Upstream profiles at run time: the configured ones, plus what admins added or switched off
(tables `upstream_profiles` and `upstream_keys`), reloaded by every process every
CODEPLAN_UPSTREAM_REFRESH seconds; and the per-key concurrency lease in PostgreSQL.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import msgspec

from bridge.upstreams import ProfileConfig, Router, fingerprint, resolve, sendable

log = logging.getLogger("codeplan.upstreams")


class UpstreamStore:
    def __init__(self, pool: asyncpg.Pool, router: Router, configured: list[ProfileConfig]) -> None:
        self._pool = pool
        self._router = router
        self.configured = configured
        self._last: bytes | None = None
        self._refused: set[str] = set()  # stored profiles left out, logged once each
        self._refused_keys: set[tuple[str, tuple[str, ...]]] = set()  # stored keys left out, likewise

    async def refresh(self) -> None:
        async with self._pool.acquire() as conn:
            profiles = await conn.fetch("SELECT name, definition, enabled FROM upstream_profiles")
            keys = await conn.fetch("SELECT profile, fingerprint, secret, enabled FROM upstream_keys")
        added: dict[str, list[str]] = {}
        disabled: dict[str, set[str]] = {}
        for row in keys:
            if row["secret"]:  # a disabled one stays listed, switched off
                added.setdefault(row["profile"], []).append(row["secret"])
            if not row["enabled"]:
                disabled.setdefault(row["profile"], set()).add(row["fingerprint"])
        configs: list[ProfileConfig] = []
        names = set()
        for profile in self.configured:
            configs.append(msgspec.structs.replace(profile, keys=profile.keys + tuple(added.get(profile.name, ()))))
            names.add(profile.name)
        for row in profiles:
            if row["definition"] is None or row["name"] in names:
                continue
            keys_of = tuple(added.get(row["name"], ()))
            if keys_of and (definition := self._stored(row["name"], row["definition"], keys_of)) is not None:
                configs.append(definition)
        enabled = {row["name"]: row["enabled"] for row in profiles}
        frozen = {name: frozenset(fps) for name, fps in disabled.items()}
        signature = msgspec.json.encode([configs, sorted(enabled.items()),
                                         sorted((k, sorted(v)) for k, v in frozen.items())])
        if signature == self._last:
            return
        await self._router.replace(configs, enabled, frozen)
        self._last = signature

    def _stored(self, name: str, raw: str | bytes, keys: tuple[str, ...]) -> ProfileConfig | None:
        """A profile an admin added, or None when it cannot be served (stored by a version that
        checked less): left out and logged, so one bad row never stops a start-up or a refresh."""
        # a key stored by a version that checked less (a space, a control character) cannot be
        # sent: it is left out, not the profile with it (its good keys keep serving)
        unsendable = [fingerprint(k) for k in keys if not sendable(k)]
        if unsendable:
            if (name, tuple(unsendable)) not in self._refused_keys:
                self._refused_keys.add((name, tuple(unsendable)))
                log.error("stored upstream keys left out: they cannot be sent; delete them",
                          extra={"upstream": name, "keys": unsendable})
            keys = tuple(k for k in keys if sendable(k))
            if not keys:
                return None
        try:
            definition = msgspec.json.decode(raw.encode() if isinstance(raw, str) else raw, type=ProfileConfig)
            resolved = resolve(msgspec.structs.replace(definition, keys=keys), environ={})
            self._refused.discard(name)  # fixed: a later breakage is said again
            return resolved
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            if name not in self._refused:
                self._refused.add(name)
                log.error("stored upstream profile left out: it cannot be served; fix or delete it",
                          extra={"upstream": name, "error": str(exc)[:300]})
            return None

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the last good set keeps serving
                log.warning("upstream refresh failed", extra={"error": type(exc).__name__})


class PgKeyLeases:
    """`bridge.upstreams.KeyLeases` over `upstream_key_leases`: a slot is a row leased to one
    request of one process; the process renews what it holds every third of the lease, so a
    process that dies frees its slots within one lease."""

    def __init__(self, pool: asyncpg.Pool, lease_seconds: float) -> None:
        self._pool = pool
        self._lease = lease_seconds
        self._holder = uuid.uuid4()
        self._held: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._renewer: asyncio.Task | None = None
        self.on_released = lambda: None

    async def prepare(self, key_ids: list[str], cap: int) -> None:
        await self._pool.execute(
            "INSERT INTO upstream_key_leases (key_id, slot)"
            " SELECT k, s FROM unnest($1::text[]) k, generate_series(0, $2 - 1) s"
            " ON CONFLICT DO NOTHING", key_ids, cap)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def acquire(self, key_ids: list[str], cap: int) -> tuple[str, int] | None:
        row = await self._pool.fetchrow("SELECT * FROM upstream_lease_acquire($1, $2, $3, $4)",
                                        key_ids, cap, self._holder, self._lease)
        if row is None:
            return None
        self._held.add((row["key_id"], row["slot"]))
        return row["key_id"], row["slot"]

    def release(self, key_id: str, slot: int) -> None:
        self._held.discard((key_id, slot))
        task = asyncio.get_running_loop().create_task(self._release(key_id, slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, key_id: str, slot: int) -> None:
        try:
            await self._pool.execute(
                "UPDATE upstream_key_leases SET holder = NULL, expires_at = NULL"
                " WHERE key_id = $1 AND slot = $2 AND holder = $3", key_id, slot, self._holder)
        except Exception as exc:  # noqa: BLE001 - the lease lapses on its own
            log.warning("lease release failed; it lapses", extra={"error": type(exc).__name__})
        finally:
            self.on_released()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            if not self._held:
                continue
            try:
                await self._pool.execute(
                    "UPDATE upstream_key_leases SET expires_at = now() + make_interval(secs => $2)"
                    " WHERE holder = $1", self._holder, self._lease)
            except Exception as exc:  # noqa: BLE001 - the next renewal tries again
                log.warning("lease renewal failed", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
