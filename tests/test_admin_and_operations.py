"""The admin API, the operator's commands and start-up configuration: defects found by review,
each test naming what was wrong.

Real PostgreSQL, real bridge processes, the GLM simulator and (for billing) the Stripe fake."""
from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
import zoneinfo

import asyncpg
import httpx
import msgspec
import pytest

from bridge import upstreams
from service import config
from service.ledger import _usd

from .billing.conftest import events_settled, fake, new_account, one, start_billing_bridge, stripe_sync  # noqa: F401
from .billing.test_checkout import post, session_id
from .conftest import (CODEPLAN, _fresh_database, base_env, new_user, query, run, start_bridge,
                       wait_settled)

ADMIN_TOKEN = "admin-and-operations-token-" + "q" * 16
H = {"authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "glm-4.6", "max_tokens": 10,
        "messages": [{"role": "user", "content": "[[sim tokens=3 reasoning=0]] hi"}]}


@pytest.fixture(scope="module")
def server(database, simulator):
    s = start_bridge(database, simulator.url + "/api/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN,
                     CODEPLAN_UPSTREAM_REFRESH="0.5", CODEPLAN_UPSTREAM_PRICES="0.6,0.11,2.2")
    yield s
    s.stop()


def _admin(server, method, path, **kw):
    return httpx.request(method, server.url + "/admin" + path, timeout=30, headers=H, **kw)


def _chat(server, key):
    return httpx.post(server.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"}, json=CHAT)


def _account(database, key):
    return run(query(database, "SELECT account_id FROM api_keys WHERE prefix = $1", key[:10]))[0]["account_id"]


def _account_without_plan(database) -> int:
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    return run(query(database, "INSERT INTO accounts (email) VALUES ($1) RETURNING id", email))[0]["id"]


def _cli(database, *args):
    return subprocess.run(CODEPLAN + list(args), env=base_env(CODEPLAN_DATABASE_URL=database),
                          capture_output=True, text=True, timeout=60)


# ---- upstream prices and the ledger's cost column ------------------------------------------

def test_an_upstream_price_past_the_bound_is_refused(server):
    """Prices had no upper bound: a profile priced at 1e15 USD per million tokens was accepted,
    and every request it served made a cost `upstream_cost numeric(18,9)` cannot hold, so the
    settlement failed for ever (entry pending, never billed)."""
    r = _admin(server, "POST", "/upstreams", json={
        "name": "pricey", "base_url": "http://127.0.0.1:9/v1", "keys": ["pricey-key"],
        "prices": {"input": 1e15, "cached": 1e15, "output": 1e15}})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    fine = _admin(server, "POST", "/upstreams", json={
        "name": "dear", "base_url": "http://127.0.0.1:9/v1", "keys": ["dear-key"], "enabled": False,
        "prices": {"input": upstreams.MAX_PRICE, "cached": 1, "output": upstreams.MAX_PRICE}})
    assert fine.status_code == 201, fine.text
    with pytest.raises(config.ConfigError, match="CODEPLAN_UPSTREAM_PRICES"):
        config.load({"CODEPLAN_UPSTREAM_PRICES": "1e15,1,1"})


def test_a_cost_the_ledger_cannot_hold_is_recorded_as_unknown():
    """The last guard: a cost out of numeric(18,9)'s range (or not finite) is stored as NULL,
    so one bad cost never blocks a settlement."""
    assert _usd(1.5) == _usd(1.5000000001)
    assert str(_usd(999_999_999.5)) == "999999999.500000000"
    for cost in (1e9, 999_999_999.9999999999, 1e15, float("inf"), float("nan"), -1e10):
        assert _usd(cost) is None, cost


def test_every_cost_usd_gives_fits_the_ledger_column(database):
    """The same through PostgreSQL: the value `_usd` gives for the largest cost fits the column."""
    for cost in (999_999_999.4, 5e14):
        run(query(database, "SELECT $1::numeric(18,9)", _usd(cost)))


# ---- upstream keys --------------------------------------------------------------------------

def test_an_upstream_key_with_a_control_character_is_refused(server):
    """A key holding CR/LF (or a space, NUL, non-ASCII) was accepted: a header injection, and
    aiohttp refused to send every request routed to it (a 500)."""
    for key in ("abc\r\nX-Injected: 1", "abc def", "k\u0000", "\U0001F600", "abc\t"):
        r = _admin(server, "POST", "/upstreams", json={
            "name": "badkey", "base_url": "http://127.0.0.1:9/v1", "keys": [key]})
        assert r.status_code == 400, (key, r.status_code, r.text[:300])
        assert key not in r.text
    configured = _admin(server, "GET", "/upstreams").json()[0]["name"]
    r = _admin(server, "POST", f"/upstreams/{configured}/keys", json={"key": "abc\nX-Injected: 1"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    with pytest.raises(ValueError, match="value not shown"):
        upstreams.resolve(upstreams.ProfileConfig(name="env", base_url="http://a/v1", keys=("a\nb",)))


def test_a_stored_key_aiohttp_refuses_is_that_keys_fault_not_a_500(fresh_database, simulator):
    """A key with a newline (stored by a version that checked less) made aiohttp raise
    ValueError while the request was built: every request routed to it was a 500."""
    database = fresh_database
    server = start_bridge(database, simulator.url + "/api/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN,
                          CODEPLAN_UPSTREAM_ATTEMPTS="1")
    try:
        [configured] = _admin(server, "GET", "/upstreams").json()
        bad = "abc\nX-Injected: 1"
        run(query(database, "INSERT INTO upstream_keys (profile, fingerprint, secret) VALUES ($1, $2, $3)",
                  configured["name"], upstreams.fingerprint(bad), bad))
        for key in configured["keys"]:  # the good keys off: the bad one is all that is left
            off = _admin(server, "PATCH", f"/upstreams/{configured['name']}/keys/{key['fingerprint']}",
                         json={"enabled": False})
            assert off.status_code == 200, off.text
        r = _chat(server, new_user(database))
        assert r.status_code == 502, (r.status_code, r.text[:300])
        assert "X-Injected" not in r.text
    finally:
        server.stop()


# ---- upstream profiles ----------------------------------------------------------------------

def test_an_upstream_added_disabled_can_be_enabled(server, database):
    """`"enabled": false` was kept inside the stored definition, which the router ANDs with the
    switch PATCH changes: the PATCH said 200 and the profile stayed off for ever."""
    r = _admin(server, "POST", "/upstreams", json={
        "name": "offatfirst", "base_url": "http://127.0.0.1:9/v1", "keys": ["k-off"], "enabled": False})
    assert r.status_code == 201, r.text
    assert r.json()["enabled"] is False
    on = _admin(server, "PATCH", "/upstreams/offatfirst", json={"enabled": True})
    assert on.status_code == 200
    assert on.json()["enabled"] is True, on.json()
    off = _admin(server, "PATCH", "/upstreams/offatfirst", json={"enabled": False})
    assert off.json()["enabled"] is False


def test_an_upstream_added_off_by_an_earlier_version_is_switched_on_by_patch(server, database):
    """A row written before the fix keeps `enabled: false` in its definition: an explicit switch
    on clears it (and nothing else turns it on)."""
    definition = '{"name": "legacyoff", "base_url": "http://127.0.0.1:9/v1", "enabled": false}'
    run(query(database, "INSERT INTO upstream_profiles (name, definition) VALUES ('legacyoff', $1::jsonb)",
              definition))
    run(query(database, "INSERT INTO upstream_keys (profile, fingerprint, secret) VALUES ('legacyoff', $1, 'k-l')",
              upstreams.fingerprint("k-l")))
    deadline = time.monotonic() + 15  # GET shows this process's view: its next refresh (0.5 s)
    while "legacyoff" not in (listed := {p["name"]: p for p in _admin(server, "GET", "/upstreams").json()}):
        assert time.monotonic() < deadline, listed
        time.sleep(0.1)
    assert listed["legacyoff"]["enabled"] is False
    on = _admin(server, "PATCH", "/upstreams/legacyoff", json={"enabled": True})
    assert on.status_code == 200 and on.json()["enabled"] is True, on.text


def test_upstream_changes_through_another_process_see_the_database(fresh_database, simulator):
    """Each process decided 404/409 on its own in-memory profiles, refreshed every
    CODEPLAN_UPSTREAM_REFRESH seconds: a profile added through one process was 'not found' by the
    next call answered by another."""
    one_ = start_bridge(fresh_database, simulator.url + "/api/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN)
    two = start_bridge(fresh_database, simulator.url + "/api/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN)
    try:
        body = {"name": "shared", "base_url": simulator.url + "/api/paas/v4", "keys": ["shared-key-1"]}
        assert httpx.post(one_.url + "/admin/upstreams", headers=H, json=body).status_code == 201
        key = httpx.post(two.url + "/admin/upstreams/shared/keys", headers=H, json={"key": "shared-key-2"})
        assert key.status_code == 201, key.text[:200]
        switch = httpx.patch(two.url + "/admin/upstreams/shared", headers=H, json={"enabled": False})
        assert switch.status_code == 200, switch.text[:200]
        fp = upstreams.fingerprint("shared-key-2")
        key_off = httpx.patch(one_.url + f"/admin/upstreams/shared/keys/{fp}", headers=H, json={"enabled": False})
        assert key_off.status_code == 200, key_off.text[:200]
        again = httpx.post(two.url + "/admin/upstreams", headers=H, json=body)
        assert again.status_code == 409, again.text[:200]
    finally:
        one_.stop()
        two.stop()


# ---- text PostgreSQL cannot hold --------------------------------------------------------------

def test_a_nul_in_text_stored_as_jsonb_is_a_400(server, database):
    """asyncpg's UntranslatableCharacterError (22P05: a NUL inside jsonb) was not mapped like
    CharacterNotInRepertoireError: a 500."""
    account = _account(database, new_user(database))
    r = _admin(server, "POST", f"/users/{account}/topups", json={"credits": 10, "reason": "a\u0000b"})
    assert r.status_code == 400, (r.status_code, r.text)
    for body in ({"name": "nulmodel", "base_url": "http://127.0.0.1:9/v1", "keys": ["k-nul"], "models": ["glm-4.6\u0000"]},
                 {"name": "nulurl", "base_url": "http://a/v1\u0000", "keys": ["k8"]}):
        r = _admin(server, "POST", "/upstreams", json=body)
        assert r.status_code == 400, (r.status_code, r.text)


# ---- users: plans and top-ups ---------------------------------------------------------------

def test_a_granted_topup_attaches_when_an_admin_gives_a_plan(server, database):
    """A top-up granted to an account without a plan waits for its next subscription; a plan
    given by an admin inserted the subscription without attaching it (the Stripe path does)."""
    account = _account_without_plan(database)
    granted = _admin(server, "POST", f"/users/{account}/topups", json={"credits": 5000, "reason": "welcome"})
    assert granted.status_code == 201, granted.text
    assert granted.json()["window_id"] is None
    given = _admin(server, "PATCH", f"/users/{account}", json={"plan": "pro"})
    assert given.status_code == 200, given.text
    row = run(query(database, "SELECT t.window_id, q.subscription_id, q.allowance FROM topups t"
                              " JOIN quota_windows q ON q.id = t.window_id WHERE t.id = $1",
                    granted.json()["topup_id"]))
    assert row and row[0]["allowance"] == 5000, row
    live = run(query(database, "SELECT id FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'",
                     account))[0]["id"]
    assert row[0]["subscription_id"] == live


def test_an_ended_subscriptions_topup_moves_to_the_plan_an_admin_gives(server, database):
    """The unexpired top-up windows of an account's canceled subscriptions move to the new one,
    as billing_apply_subscription does for a subscription paid through Stripe."""
    account = _account_without_plan(database)
    assert _admin(server, "PATCH", f"/users/{account}", json={"plan": "lite"}).status_code == 200
    granted = _admin(server, "POST", f"/users/{account}/topups", json={"credits": 700, "reason": "r"}).json()
    assert granted["window_id"] is not None
    run(query(database, "UPDATE subscriptions SET status = 'canceled', ended_at = now()"
                        " WHERE account_id = $1", account))
    assert _admin(server, "PATCH", f"/users/{account}", json={"plan": "pro"}).status_code == 200
    live = run(query(database, "SELECT id FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'",
                     account))[0]["id"]
    moved = run(query(database, "SELECT subscription_id FROM quota_windows WHERE id = $1", granted["window_id"]))
    assert moved[0]["subscription_id"] == live


def test_simultaneous_plan_assignments_never_500(server, database):
    """Two plan assignments at once on an account without a plan both inserted a subscription:
    the second a UniqueViolation (subscriptions_one_live), a 500."""
    statuses = []
    for _ in range(5):
        account = _account_without_plan(database)

        async def all_at_once():
            async with httpx.AsyncClient(timeout=30, headers=H) as c:
                return await asyncio.gather(*[c.patch(f"{server.url}/admin/users/{account}", json={"plan": plan})
                                              for plan in ("pro", "lite", "max")])
        statuses += [(r.status_code, r.text[:120]) for r in asyncio.run(all_at_once())]
        live = run(query(database, "SELECT count(*) AS n FROM subscriptions WHERE account_id = $1"
                                   " AND status <> 'canceled'", account))[0]["n"]
        assert live == 1
    assert all(code in (200, 409) for code, _ in statuses), statuses


# ---- reports and rollups --------------------------------------------------------------------

def test_reports_do_not_change_when_rows_are_rolled_up(server, database):
    """The ledger's rows were cut at `now - days` and the rolled-up ones at the whole UTC day:
    a row of that day before the hour was out of a report, then in it once rolled up."""
    run(query(database, "DELETE FROM usage_ledger"))
    run(query(database, "DELETE FROM usage_daily"))
    key = new_user(database)
    assert _chat(server, key).status_code == 200
    wait_settled(database)
    run(query(database, "UPDATE usage_ledger SET created_at = now() - interval '24 hours 1 minute'"))

    def reports():
        usage = _admin(server, "GET", "/reports/usage", params={"by": "model", "days": 1}).json()
        margin = {m["plan"]: (m["requests"], m["credits"]) for m in
                  _admin(server, "GET", "/reports/margin", params={"days": 1}).json()}
        return usage, margin
    before = reports()
    moved = run(query(database, "SELECT ledger_rollup(now()) AS n"))[0]["n"]  # whole UTC days before today
    assert moved == 1
    assert reports() == before


# ---- billing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def billing(pg_url, simulator, fake):  # noqa: F811
    database = _fresh_database(pg_url)
    assert stripe_sync(database, fake).returncode == 0
    service = start_billing_bridge(database, simulator, fake, CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN,
                                   CODEPLAN_AUTH_CACHE_TTL="0")
    yield database, service
    service.stop()


def test_a_suspended_account_cannot_buy(billing):
    """A suspended account (refused on every request) could still start Stripe Checkout for a
    plan or a top-up: paying for what it cannot use."""
    database, service = billing
    account, key = new_account(database)
    assert httpx.post(f"{service.url}/admin/users/{account}/suspend", headers=H).status_code == 200
    for path, body in (("/v1/billing/checkout", {"plan": "pro"}), ("/v1/billing/topup", {"block": "20000000"})):
        r = post(service, path, key, body)
        assert r.status_code == 403 and r.json()["code"] == "account_suspended", (path, r.status_code, r.text)
    assert httpx.post(f"{service.url}/admin/users/{account}/restore", headers=H).status_code == 200
    assert post(service, "/v1/billing/checkout", key, {"plan": "pro"}).status_code == 200


def test_an_admin_plan_change_on_a_stripe_subscriber_is_a_409(billing, fake):  # noqa: F811
    """An admin's plan change on a subscription paid through Stripe was a 200, silently undone
    by the next event from Stripe (billing_apply_subscription puts Stripe's plan back). The plan
    of such a subscription changes in Stripe: refused with a 409 saying so."""
    database, service = billing
    account, key = new_account(database)
    url = post(service, "/v1/billing/checkout", key, {"plan": "lite"}).json()["url"]
    fake.complete_checkout(session_id(url))
    events_settled(database, fake)
    changed = httpx.patch(f"{service.url}/admin/users/{account}", headers=H, json={"plan": "max"})
    assert changed.status_code == 409, changed.text
    assert "Stripe" in changed.json()["detail"]
    plan = one(database, "SELECT plan_id FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'",
               account)[0]
    assert plan == "lite"
    same = httpx.patch(f"{service.url}/admin/users/{account}", headers=H, json={"plan": "lite", "is_admin": True})
    assert same.status_code == 200, same.text


# ---- start-up configuration -------------------------------------------------------------------

def test_every_peak_zone_accepted_at_start_up_is_one_postgresql_knows(database):
    """CODEPLAN_PEAK_ZONE=localtime passed (zoneinfo finds the host's file), PostgreSQL does not
    know it: every chat request was a 503."""
    with pytest.raises(config.ConfigError, match="CODEPLAN_PEAK_ZONE"):
        config.load({"CODEPLAN_PEAK_HOURS": "00:00-00:00", "CODEPLAN_PEAK_ZONE": "localtime"})
    accepted = []
    for zone in ["localtime", "posixrules", "posix/Asia/Shanghai", "right/UTC", *sorted(zoneinfo.available_timezones())]:
        try:
            config.load({"CODEPLAN_PEAK_HOURS": "14:00-18:00", "CODEPLAN_PEAK_ZONE": zone})
        except config.ConfigError:
            continue
        accepted.append(zone)
    assert "Asia/Shanghai" in accepted and "UTC" in accepted

    async def unknown_to_postgresql():
        conn = await asyncpg.connect(database)
        try:
            missing = []
            for zone in accepted:
                try:
                    await conn.execute("SELECT now() AT TIME ZONE $1::text", zone)
                except asyncpg.PostgresError:
                    missing.append(zone)
            return missing
        finally:
            await conn.close()
    assert run(unknown_to_postgresql()) == []


def test_topup_validity_and_past_due_grace_are_bounded(database):
    """CODEPLAN_TOPUP_VALID_DAYS=200000000 and CODEPLAN_PAST_DUE_GRACE=inf were accepted at
    start-up; PostgreSQL then refused the date for every top-up bought and every subscription
    going past_due."""
    for env, name in (({"CODEPLAN_TOPUP_VALID_DAYS": "200000000"}, "CODEPLAN_TOPUP_VALID_DAYS"),
                      ({"CODEPLAN_TOPUP_VALID_DAYS": "36501"}, "CODEPLAN_TOPUP_VALID_DAYS"),
                      ({"CODEPLAN_PAST_DUE_GRACE": "inf"}, "CODEPLAN_PAST_DUE_GRACE"),
                      ({"CODEPLAN_PAST_DUE_GRACE": "nan"}, "CODEPLAN_PAST_DUE_GRACE"),
                      ({"CODEPLAN_PAST_DUE_GRACE": "1e300"}, "CODEPLAN_PAST_DUE_GRACE")):
        with pytest.raises(config.ConfigError, match=name):
            config.load(env)
    largest = config.load({"CODEPLAN_TOPUP_VALID_DAYS": "36500", "CODEPLAN_PAST_DUE_GRACE": str(90 * 86400)})
    run(query(database, "SELECT now() + make_interval(days => $1)", largest.topup_valid_days))
    run(query(database, "SELECT now() + make_interval(secs => $1)", largest.past_due_grace))


# ---- the command line -------------------------------------------------------------------------

def test_cli_promote_is_in_the_audit_trail(fresh_database):
    """`codeplan users promote` granted admin rights without an admin_audit row."""
    made = _cli(fresh_database, "users", "create", "--email", "boss@example.com", "--plan", "pro")
    assert made.returncode == 0, made.stderr
    promoted = _cli(fresh_database, "users", "promote", "--email", "Boss@example.com")
    assert promoted.returncode == 0, promoted.stderr
    account = run(query(fresh_database, "SELECT id, is_admin FROM accounts WHERE email = 'boss@example.com'"))[0]
    assert account["is_admin"]
    audit = run(query(fresh_database, "SELECT actor, action, target, before, after FROM admin_audit"))
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        ("cli", "user.promote", f"account:{account['id']}")], audit
    missing = _cli(fresh_database, "users", "promote", "--email", "nobody@example.com")
    assert missing.returncode == 1
    assert len(run(query(fresh_database, "SELECT 1 FROM admin_audit"))) == 1


def test_cli_rollup_with_days_out_of_range_says_one_line(database):
    """`codeplan rollup --older-than-days 9999999999` printed a traceback (an OverflowError).
    The range is checked with the arguments, before any configuration or database is touched
    (here a bad CODEPLAN_PORT would otherwise be the complaint)."""
    for days in ("9999999999", "0", "-3"):
        done = subprocess.run(CODEPLAN + ["rollup", "--older-than-days", days], capture_output=True, text=True,
                              timeout=60, env=base_env(CODEPLAN_DATABASE_URL=database, CODEPLAN_PORT="notaport"))
        assert done.returncode == 2, (days, done.stderr[-600:])
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "--older-than-days" in done.stderr, done.stderr


# ---- upstream keys as pasted ------------------------------------------------------------------

PASTED = "abcdef0123456789abcdef0123456789.AbCdEfGhIjKlMnOp\n"  # `cat key.txt`, a JSON string's \n


def test_a_key_ending_in_a_newline_is_refused_everywhere_a_key_enters():
    """The key check was `^[\x21-\x7e]+$`, and `$` matches before a final newline: the commonest
    control character in a pasted key passed resolve(), the upstreams file and the admin API, and
    the key then failed at every use (aiohttp refuses the header)."""
    from bridge.upstreams import ProfileConfig, resolve
    from service.admin.upstreams import NewKey

    with pytest.raises(ValueError):
        resolve(ProfileConfig(name="zai", base_url="https://api.z.ai/api/paas/v4", keys=(PASTED,)), environ={})
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode({"name": "zai", "keys": [PASTED]}), type=ProfileConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode({"key": PASTED}), type=NewKey)
    assert resolve(ProfileConfig(name="zai", base_url="https://api.z.ai/api/paas/v4", keys=(PASTED.strip(),)),
                   environ={}).keys == (PASTED.strip(),)


def test_one_stored_key_that_cannot_be_sent_leaves_the_profiles_good_keys_serving():
    """A profile an admin added, holding one key stored by a version that checked less (a
    zero-width space pasted with it): the whole profile was left out, its good keys with it, and
    a model only it served answered 502 for every user. Now only that key is left out."""
    from bridge.upstreams import ProfileConfig
    from service.upstream_store import UpstreamStore

    store = UpstreamStore(pool=None, router=None, configured=[])  # type: ignore[arg-type]
    definition = msgspec.json.encode(ProfileConfig(name="gpu", base_url="http://gpu-1:8000/v1", keys=()))
    good = PASTED.strip()
    served = store._stored("gpu", definition, (good, "sk-proj-pasted\u200b"))
    assert served is not None and served.keys == (good,)
    assert store._stored("gpu", definition, ("sk-proj-pasted\u200b",)) is None  # nothing left to send with
