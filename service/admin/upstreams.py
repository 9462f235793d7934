"""Upstream profiles and keys: health, add, enable and disable. A profile added here is stored
in the database (its keys by fingerprint, their secrets only in `upstream_keys`) and every
process picks it up within CODEPLAN_UPSTREAM_REFRESH seconds (this one at once). Keys never
leave: the API and the audit show fingerprints."""
from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Request, get, patch, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, JSONBody

from bridge import upstreams
from bridge.upstreams import ProfileConfig, ProfileHealth

from . import audit
from .auth import errors


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    # sent as a bearer token: printable ASCII without spaces (bridge/upstreams.py KEY_PATTERN)
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=upstreams.KEY_PATTERN)]


class Switch(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool


async def _current(request: Request) -> None:
    """This process's profiles brought up to date with the database before a change is decided
    on them: another process may have added, switched or given keys to one since this one's last
    refresh (every CODEPLAN_UPSTREAM_REFRESH seconds), and a 404 or 409 from a stale view would
    contradict the answer the admin just had from that process."""
    await request.app.state.upstream_store.refresh()


def _health(request: Request, name: str) -> ProfileHealth:
    for profile in request.app.state.router.health():
        if profile.name == name:
            return profile
    raise NotFoundException(f"no upstream profile {name!r}")


def _public(profile: ProfileConfig) -> dict:
    """A profile as the audit may keep it: keys as fingerprints."""
    shown = msgspec.to_builtins(msgspec.structs.replace(profile, keys=()))
    shown["keys"] = [upstreams.fingerprint(k) for k in profile.keys]
    return shown


@get("/upstreams", responses=errors())
async def list_upstreams(request: Request) -> list[ProfileHealth]:
    """Every profile with its keys' health as this process sees it."""
    return request.app.state.router.health()


@post("/upstreams", status_code=201, responses=errors(400, 409))
async def add_upstream(request: Request, data: JSONBody[ProfileConfig]) -> ProfileHealth:
    if data.keys_env:
        # the configuration file's way to keep keys out of the file; through the API it would
        # send any variable of this process (the database URL, Stripe's secret) as a bearer
        # token to whatever base URL the caller names
        raise HTTPException(status_code=400, detail="keys_env is for the upstreams file; send the keys "
                            "themselves in `keys`")
    try:
        profile = upstreams.resolve(data, environ={})
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    await _current(request)
    if any(p.name == profile.name for p in request.app.state.router.health()):
        raise HTTPException(status_code=409, detail=f"upstream profile {profile.name!r} exists already")
    # on or off is kept in the `enabled` column, the one PATCH switches: the definition's own
    # flag is stored as true, so a profile added off can be switched on
    definition = msgspec.json.encode(msgspec.structs.replace(profile, keys=(), enabled=True)).decode()
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO upstream_profiles (name, definition, enabled) VALUES ($1, $2::jsonb, $3)"
            " ON CONFLICT (name) DO NOTHING RETURNING name", profile.name, definition, profile.enabled)
        if inserted is None:
            raise HTTPException(status_code=409, detail=f"upstream profile {profile.name!r} exists already")
        for key in profile.keys:
            await conn.execute("INSERT INTO upstream_keys (profile, fingerprint, secret) VALUES ($1, $2, $3)"
                               " ON CONFLICT DO NOTHING", profile.name, upstreams.fingerprint(key), key)
        await audit.record(conn, request.state.actor, "upstream.add", f"upstream:{profile.name}",
                           None, _public(profile))
    await request.app.state.upstream_store.refresh()
    return _health(request, profile.name)


@patch("/upstreams/{name:str}", responses=errors(400, 404, 409))
async def switch_upstream(request: Request, name: FromPath[str], data: JSONBody[Switch]) -> ProfileHealth:
    await _current(request)
    before = _health(request, name)
    if data.enabled and any(p.name == name and not p.enabled for p in request.app.state.upstream_store.configured):
        # the router ANDs the file's flag with the switch: a 200 here would change nothing
        raise HTTPException(status_code=409, detail=f"upstream profile {name!r} is switched off in "
                            "CODEPLAN_UPSTREAMS_FILE (enabled = false); switch it on there")
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO upstream_profiles (name, enabled) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled, updated_at = now()",
            name, data.enabled)
        if data.enabled:
            # a profile added off by an earlier version kept `enabled: false` in its definition,
            # which the router ANDs with this column: an explicit switch on clears it
            await conn.execute(
                "UPDATE upstream_profiles SET definition = jsonb_set(definition, '{enabled}', 'true')"
                " WHERE name = $1 AND definition IS NOT NULL AND definition->'enabled' = 'false'", name)
        await audit.record(conn, request.state.actor, "upstream.enable" if data.enabled else "upstream.disable",
                           f"upstream:{name}", {"enabled": before.enabled}, {"enabled": data.enabled})
    await request.app.state.upstream_store.refresh()
    return _health(request, name)


@post("/upstreams/{name:str}/keys", status_code=201, responses=errors(400, 404))
async def add_key(request: Request, name: FromPath[str], data: JSONBody[NewKey]) -> ProfileHealth:
    await _current(request)
    _health(request, name)
    fingerprint = upstreams.fingerprint(data.key)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO upstream_keys (profile, fingerprint, secret) VALUES ($1, $2, $3)"
            " ON CONFLICT (profile, fingerprint) DO UPDATE SET secret = excluded.secret, enabled = true,"
            " updated_at = now()", name, fingerprint, data.key)
        await audit.record(conn, request.state.actor, "upstream.key.add", f"upstream:{name}/{fingerprint}",
                           None, {"fingerprint": fingerprint})
    await request.app.state.upstream_store.refresh()
    return _health(request, name)


@patch("/upstreams/{name:str}/keys/{fingerprint:str}", responses=errors(400, 404))
async def switch_key(request: Request, name: FromPath[str], fingerprint: FromPath[str],
                     data: JSONBody[Switch]) -> ProfileHealth:
    await _current(request)
    profile = _health(request, name)
    key = next((k for k in profile.keys if k.fingerprint == fingerprint), None)
    if key is None:
        raise NotFoundException(f"no key {fingerprint} in upstream profile {name!r}")
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO upstream_keys (profile, fingerprint, enabled) VALUES ($1, $2, $3)"
            " ON CONFLICT (profile, fingerprint) DO UPDATE SET enabled = excluded.enabled, updated_at = now()",
            name, fingerprint, data.enabled)
        await audit.record(conn, request.state.actor,
                           "upstream.key.enable" if data.enabled else "upstream.key.disable",
                           f"upstream:{name}/{fingerprint}", {"enabled": key.enabled}, {"enabled": data.enabled})
    await request.app.state.upstream_store.refresh()
    return _health(request, name)


routes = [list_upstreams, add_upstream, switch_upstream, add_key, switch_key]
