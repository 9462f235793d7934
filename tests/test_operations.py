"""Running Codeplan as a business (issue 14), with real processes: upstream profiles and
failover, the cost of each request, credits per model, the admin API and its audit, Prometheus
metrics, a graceful SIGTERM, and several processes on one database."""
from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import (CODEPLAN, Server, base_env, children, client_pools, free_port, hang_report, new_plan,
                       new_user, query, run, settled_query, start_bridge, start_workers, stream_started,
                       wait_settled)

ADMIN_TOKEN = "test-admin-token-" + "x" * 16


def _say(directive: str) -> list[dict]:
    return [{"role": "user", "content": f"[[sim {directive}]] {uuid.uuid4().hex[:8]}"}]


def _rows(database: str, key: str):
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at", key[:10]))


def _sim(*extra: str) -> Server:
    port = free_port()
    return Server(CODEPLAN + ["simulate", "--port", str(port), *extra], base_env(), port, "/_sim/stats").start()


def _stats(sim: Server) -> dict:
    return json.loads(httpx.get(sim.url + "/_sim/stats").content)


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _admin(server: Server, method: str, path: str, token: str = ADMIN_TOKEN, **kwargs) -> httpx.Response:
    return httpx.request(method, server.url + "/admin" + path, timeout=30,
                         headers={"authorization": f"Bearer {token}"}, **kwargs)


def _cost(row, price: tuple[float, float, float]) -> decimal.Decimal:
    uncached = row["prompt_tokens"] - row["cached_tokens"]
    usd = (uncached * price[0] + row["cached_tokens"] * price[1] + row["completion_tokens"] * price[2]) / 1e6
    return decimal.Decimal(f"{usd:.9f}")


# ---- upstream profiles: failover, key health, cost per row ---------------------------------------

@pytest.fixture(scope="module")
def busy_and_good():
    """Upstream `a` answers every request with Z.ai's 1302 (at its concurrency limit); `b` serves."""
    busy, good = _sim("--fault", "1302"), _sim()
    yield busy, good
    busy.stop()
    good.stop()


def test_failover_to_a_second_profile_when_the_first_answers_1302(fresh_database, busy_and_good, tmp_path):
    busy, good = busy_and_good
    upstreams = _file(tmp_path, "upstreams.toml", f"""
[[upstreams]]
name = "a"
base_url = "{busy.url}/api/paas/v4"
keys = ["a-key-1"]
weight = 1000
prices = {{ input = 0.1, cached = 0.01, output = 0.2 }}

[[upstreams]]
name = "b"
preset = "simulator"
base_url = "{good.url}/api/paas/v4"
keys = ["b-key-1"]
weight = 1
""")
    server = start_bridge(fresh_database, "", CODEPLAN_UPSTREAMS_FILE=upstreams,
                          CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN, CODEPLAN_UPSTREAM_COOLDOWN="60")
    try:
        key = new_user(fresh_database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for i in range(6):
            if i % 2:
                chunks = list(client.chat.completions.create(model="glm-4.6", stream=True,
                                                             messages=_say("tokens=5 reasoning=0")))
                assert chunks[-1].usage.completion_tokens > 0
            else:
                answer = client.chat.completions.create(model="glm-4.6", messages=_say("tokens=5 reasoning=0"))
                assert answer.choices[0].message.content
        assert _stats(busy)["requests"] >= 3  # it was tried first, and refused
        assert _stats(good)["completed"] == 6
        rows = settled_query(fresh_database, "SELECT * FROM usage_ledger ORDER BY created_at")
        assert len(rows) == 6 and all(r["state"] == "posted" and not r["estimated"] for r in rows)
        # cost per row: the answering profile's prices (the simulator preset: Z.ai's for GLM-4.6)
        assert {r["upstream"] for r in rows} == {"b"}
        for row in rows:
            assert row["upstream_cost"] == _cost(row, (0.60, 0.11, 2.20)) > 0
        # after three 1302s in a row, a's key cools down and shows as unhealthy
        health = {p["name"]: p for p in _admin(server, "GET", "/upstreams").json()}
        [a_key] = health["a"]["keys"]
        assert (a_key["healthy"], a_key["last_error"]) == (False, "1302") and a_key["cooling_for_s"] > 0
        assert health["a"]["usable"] is False and health["b"]["usable"] is True
        assert "a-key-1" not in json.dumps(health)  # keys are shown by fingerprint only
        assert httpx.get(server.url + "/readyz").status_code == 200  # b is usable
        metrics = httpx.get(server.url + "/metrics").text
        assert re.search(r'codeplan_upstream_errors_total\{code="1302",profile="a"\} [3-9]', metrics)
        assert 'codeplan_upstream_key_healthy{key="' + a_key["fingerprint"] + '",profile="a"} 0.0' in metrics
        assert "a-key-1" not in server.output() and "b-key-1" not in server.output()
    finally:
        server.stop()


def test_every_upstream_failing_is_an_error_in_the_callers_shape_and_not_ready(fresh_database, busy_and_good, tmp_path):
    busy, _ = busy_and_good
    upstreams = _file(tmp_path, "u.toml", f'[[upstreams]]\nname = "only"\nbase_url = "{busy.url}/api/paas/v4"\n'
                                          'keys = ["k1", "k2"]\n')
    server = start_bridge(fresh_database, "", CODEPLAN_UPSTREAMS_FILE=upstreams, CODEPLAN_UPSTREAM_ATTEMPTS="2")
    try:
        key = new_user(fresh_database)
        before = _stats(busy)["requests"]
        response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "glm-4.6", "messages": _say("tokens=3")}, timeout=30)
        assert response.status_code == 429 and response.json()["error"]["code"] == "1302"
        assert _stats(busy)["requests"] == before + 2  # both keys, one attempt each
        assert "x-codeplan-overhead-ms" in response.headers
        wait_settled(fresh_database)
        [row] = _rows(fresh_database, key)
        assert (row["state"], row["billed_tokens"]) == ("voided", 0)
        for _ in range(2):  # two more failures on each key: both cool down
            httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "glm-4.6", "messages": _say("tokens=3")}, timeout=30)
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and "upstream" in ready.json()["detail"]
        assert httpx.get(server.url + "/healthz").status_code == 200  # alive all the same
    finally:
        server.stop()


def test_a_bad_upstreams_file_stops_start_up_with_one_line(tmp_path):
    bad = _file(tmp_path, "bad.toml", '[[upstreams]]\nname = "x"\nbase_url = "ftp://nowhere"\nkeys = ["k"]\n')
    result = subprocess.run(CODEPLAN + ["run"], env=base_env(CODEPLAN_UPSTREAMS_FILE=bad), capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2
    assert result.stderr.strip() == ("codeplan: configuration error: CODEPLAN_UPSTREAMS_FILE: upstream 'x': "
                                     "expected an http:// or https:// base_url, got 'ftp://nowhere'")
    unknown = _file(tmp_path, "unknown.toml", '[[upstreams]]\nname = "x"\nwieght = 3\nkeys = ["k"]\n')
    result = subprocess.run(CODEPLAN + ["run"], env=base_env(CODEPLAN_UPSTREAMS_FILE=unknown), capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2 and "wieght" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- credits ----------------------------------------------------------------------------------

def test_credits_with_two_models_of_different_coefficients_are_billed_exactly(fresh_database, simulator, tmp_path):
    models = _file(tmp_path, "models.toml", """
[[models]]
id = "glm-5.3"
display_name = "GLM-5.3"
context_window = 1000000
max_output = 131072
credits = { input = 6.9, cached = 1.7, output = 24, peak_multiplier = 3 }
""")
    # peak hours from two hours ago to three hours from now (over midnight when it falls
    # there): GLM-5.3 counts 3x, GLM-4.6 has no multiplier
    hour = time.gmtime().tm_hour
    server = start_bridge(fresh_database, simulator.url + "/api/paas/v4", CODEPLAN_MODELS_FILE=models,
                          CODEPLAN_PEAK_HOURS=f"{(hour - 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00",
                          CODEPLAN_PEAK_ZONE="UTC",
                          CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN)
    try:
        plan = new_plan(fresh_database, window=5_000_000, weekly=20_000_000)
        run(query(fresh_database, "UPDATE plans SET models = ARRAY['glm-4.6', 'glm-5.3'] WHERE id = $1", plan))
        key = new_user(fresh_database, plan)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        history = [{"role": "user", "content": "a long shared history " * 40}]
        for model in ("glm-4.6", "glm-5.3", "glm-5.3", "glm-4.6"):
            # the same history again: the simulator reports part of the prompt as cached
            messages = history + [{"role": "assistant", "content": "ok"}] + _say("tokens=20 reasoning=0")
            client.chat.completions.create(model=model, messages=messages, max_tokens=100)
        rows = settled_query(fresh_database, "SELECT * FROM usage_ledger ORDER BY created_at")
        assert [r["model"] for r in rows] == ["glm-4.6", "glm-5.3", "glm-5.3", "glm-4.6"]
        assert any(r["cached_tokens"] > 0 for r in rows)
        coefficients = {"glm-4.6": (1, 0.2, 1), "glm-5.3": (6.9 * 3, 1.7 * 3, 24 * 3)}
        for row in rows:
            ci, cc, co = coefficients[row["model"]]
            assert (float(row["coeff_input"]), float(row["coeff_cached"]), float(row["coeff_output"])) == \
                pytest.approx((ci, cc, co))
            d = decimal.Decimal
            exact = ((row["prompt_tokens"] - row["cached_tokens"]) * d(str(ci)) + row["cached_tokens"] * d(str(cc))
                     + row["completion_tokens"] * d(str(co)))
            assert row["billed_tokens"] == math.ceil(exact), row  # tokens exact, credits derived
            assert row["billed_tokens"] <= row["held_tokens"]  # within its hold in credits
        total = sum(r["billed_tokens"] for r in rows)
        tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
        usage = httpx.get(server.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
        five = usage["windows"][0]
        assert (five["unit"], five["used"], five["tokens"]) == ("credits", total, tokens)
        assert usage["plan"]["credits"]["glm-5.3"] == {"input": 6.9, "cached": 1.7, "output": 24.0,
                                                       "peak_multiplier": 3.0}
        assert usage["today"]["glm-5.3"]["credits"] == sum(r["billed_tokens"] for r in rows if r["model"] == "glm-5.3")
        quota = httpx.get(server.url + "/api/monitor/usage/quota/limit", headers={"authorization": key}).json()
        credit_5h = quota["data"]["limits"][0]
        assert (credit_5h["type"], credit_5h["unit"], credit_5h["number"]) == ("CREDIT_LIMIT", 3, 5)
        assert (credit_5h["usage"], credit_5h["currentValue"], credit_5h["tokens"]) == (5_000_000, total, tokens)
        assert [entry["type"] for entry in quota["data"]["limits"]] == ["CREDIT_LIMIT", "CREDIT_LIMIT",
                                                                        "TOKENS_LIMIT", "TOKENS_LIMIT"]
        models_listed = {m.id for m in client.models.list().data}
        assert models_listed == {"glm-4.6", "glm-5.3"}

        # a plan's own coefficients (admin API) apply from the next request
        changed = _admin(server, "PUT", f"/plans/{plan}/credits/glm-4.6",
                         json={"input": 2, "cached": 0.5, "output": 3})
        assert changed.status_code == 200 and changed.json()["credits"]["glm-4.6"]["output"] == 3.0
        client.chat.completions.create(model="glm-4.6", messages=_say("tokens=10 reasoning=0"), max_tokens=50)
        wait_settled(fresh_database)
        last = _rows(fresh_database, key)[-1]
        assert (float(last["coeff_input"]), float(last["coeff_output"])) == (2.0, 3.0)
        assert last["billed_tokens"] == math.ceil((last["prompt_tokens"] - last["cached_tokens"]) * 2
                                                  + last["cached_tokens"] * 0.5 + last["completion_tokens"] * 3)
    finally:
        server.stop()


async def test_a_window_in_credits_is_never_passed_under_concurrent_load(fresh_database, simulator, tmp_path):
    models = _file(tmp_path, "m.toml", '[[models]]\nid = "glm-5.3"\ncontext_window = 200000\nmax_output = 8000\n'
                                       'credits = { input = 6.9, cached = 1.7, output = 24 }\n')
    server = start_bridge(fresh_database, simulator.url + "/api/paas/v4", CODEPLAN_MODELS_FILE=models)
    try:
        allowance = 40_000
        plan = new_plan(fresh_database, window=allowance, weekly=allowance * 10)
        run(query(fresh_database, "UPDATE plans SET models = ARRAY['glm-5.3'] WHERE id = $1", plan))
        key = new_user(fresh_database, plan)
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)

        async def one(i: int) -> int:
            try:
                await client.chat.completions.create(model="glm-5.3", max_tokens=300,
                                                     messages=_say(f"tokens=40 reasoning=0 n={i}"))
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code
        statuses = await asyncio.gather(*(one(i) for i in range(30)))
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        await asyncio.to_thread(wait_settled, fresh_database)
        [window] = run(query(fresh_database, "SELECT * FROM quota_windows WHERE kind = '5h'"))
        rows = [r for r in _rows(fresh_database, key) if r["state"] == "posted"]
        assert window["posted"] == sum(r["billed_tokens"] for r in rows) <= allowance
        assert (window["reserved"], window["held"]) == (0, 0)
    finally:
        server.stop()


# ---- the admin API ----------------------------------------------------------------------------

def test_admin_api_authorization_and_audit(fresh_database, simulator):
    server = start_bridge(fresh_database, simulator.url + "/api/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN,
                          CODEPLAN_UPSTREAM_PRICES="0.6,0.11,2.2")
    try:
        user_key = new_user(fresh_database)
        schema = httpx.get(server.url + "/admin/schema/openapi.json", follow_redirects=True).json()
        routes = [(method.upper(), path) for path, item in schema["paths"].items() for method in item
                  if path.startswith("/admin/")]
        assert len(routes) >= 15
        for method, path in routes:
            concrete = re.sub(r"\{[^}]+\}", "1", path)
            as_user = httpx.request(method, server.url + concrete, json={},
                                    headers={"authorization": f"Bearer {user_key}"})
            assert as_user.status_code == 403, (method, path, as_user.text)
            assert httpx.request(method, server.url + concrete, json={}).status_code == 401
            wrong = httpx.request(method, server.url + concrete, json={}, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
        # a user made admin (by the token) may use the API with their own key
        account = run(query(fresh_database, "SELECT account_id FROM api_keys WHERE prefix = $1", user_key[:10]))[0]
        # a web session of that account (service/web/sessions.py makes it as a login does)
        from service.web import sessions
        session = run(_with_pool(fresh_database, lambda pool: sessions.create(pool, account["account_id"], None)))
        cookies = {"codeplan_session": session}
        assert httpx.get(server.url + "/admin/plans", cookies=cookies).status_code == 403  # not an admin
        promoted = _admin(server, "PATCH", f"/users/{account['account_id']}", json={"is_admin": True})
        assert promoted.status_code == 200 and promoted.json()["is_admin"] is True
        assert _admin(server, "GET", "/plans", token=user_key).status_code == 200
        assert httpx.get(server.url + "/admin/plans", cookies=cookies).status_code == 200
        # a session may read, never change: a cookie rides along on cross-site requests
        assert httpx.post(server.url + "/admin/plans/lite/retire", cookies=cookies).status_code == 403

        # plans: create, change allowances (open windows follow), retire
        created = _admin(server, "POST", "/plans", json={
            "id": "team", "name": "Team", "window_credits": 1000, "weekly_credits": 5000,
            "monthly_price_cents": 9900, "models": ["glm-4.6"]})
        assert created.status_code == 201, created.text
        assert _admin(server, "POST", "/plans", json={"id": "team", "name": "x", "window_credits": 1,
                                                      "weekly_credits": 1, "monthly_price_cents": 0,
                                                      "models": ["glm-4.6"]}).status_code == 409
        bad = _admin(server, "POST", "/plans", json={"id": "Bad Id!", "window_credits": -1})
        assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/problem+json")
        member = new_user(fresh_database, "team")
        member_account = run(query(fresh_database, "SELECT account_id FROM api_keys WHERE prefix = $1",
                                   member[:10]))[0]["account_id"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=member, max_retries=0)
        client.chat.completions.create(model="glm-4.6", messages=_say("tokens=3 reasoning=0"), max_tokens=20)
        assert _admin(server, "PATCH", "/plans/team", json={"window_credits": 200_000,
                                                             "weekly_credits": 900_000}).status_code == 200
        windows = {r["kind"]: r["allowance"] for r in run(query(
            fresh_database, "SELECT w.kind, w.allowance FROM quota_windows w JOIN subscriptions s"
                            " ON s.id = w.subscription_id WHERE s.account_id = $1", member_account))}
        assert windows == {"5h": 200_000, "week": 900_000}
        assert _admin(server, "POST", "/plans/team/retire", token=user_key).json()["retired"] is True

        # users: find, suspend (403 in the caller's protocol), restore, change plan
        found = _admin(server, "GET", "/users", params={"q": "@example.com"}).json()
        assert any(u["id"] == member_account for u in found)
        assert _admin(server, "POST", f"/users/{member_account}/suspend").json()["suspended"] is True
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="glm-4.6", messages=_say("tokens=3"), max_tokens=20)
        assert refused.value.body["code"] == "account_suspended"
        _admin(server, "POST", f"/users/{member_account}/restore")
        assert _admin(server, "PATCH", f"/users/{member_account}", json={"plan": "max"}).json()["plan"] == "max"
        client.chat.completions.create(model="glm-4.6", messages=_say("tokens=3 reasoning=0"), max_tokens=20)
        detail = _admin(server, "GET", f"/users/{member_account}").json()
        assert detail["windows"][0]["allowance"] == 800_000_000  # max's
        topup = _admin(server, "POST", f"/users/{member_account}/topups", json={"credits": 1000, "reason": "sorry"})
        assert topup.status_code == 201, topup.text
        # a granted block is billing's top-up window, in credits; a change of the plan's
        # allowances (the plan's, or the user's plan) moves the plan's windows and leaves it alone
        block = "SELECT kind, allowance, posted FROM quota_windows WHERE id = $1"
        assert tuple(run(query(fresh_database, block, topup.json()["window_id"]))[0]) == ("topup", 1000, 0)
        assert _admin(server, "PATCH", "/plans/max", json={"window_credits": 700_000_000}).status_code == 200
        assert _admin(server, "PATCH", f"/users/{member_account}", json={"plan": "max"}).status_code == 200
        windows = {r["kind"]: r["allowance"] for r in run(query(
            fresh_database, "SELECT w.kind, w.allowance FROM quota_windows w JOIN subscriptions s"
                            " ON s.id = w.subscription_id WHERE s.account_id = $1 AND w.ends_at > now()",
            member_account))}
        assert windows == {"5h": 700_000_000, "week": detail["windows"][1]["allowance"], "topup": 1000}

        # reports: per user / model / day, top consumers, margin against upstream cost
        wait_settled(fresh_database)
        rows = run(query(fresh_database, "SELECT * FROM usage_ledger WHERE state = 'posted'"))
        cost = float(sum(r["upstream_cost"] for r in rows))
        by_model = _admin(server, "GET", "/reports/usage", params={"by": "model"}).json()
        assert by_model[0]["key"] == "glm-4.6" and by_model[0]["requests"] == len(rows)
        assert by_model[0]["upstream_cost_usd"] == pytest.approx(cost)
        assert _admin(server, "GET", "/reports/usage", params={"by": "day"}).json()[0]["credits"] == \
            sum(r["billed_tokens"] for r in rows)
        assert _admin(server, "GET", "/reports/usage", params={"by": "nonsense"}).status_code == 400
        top = _admin(server, "GET", "/reports/top", params={"hours": 5}).json()
        assert top[0]["account_id"] == member_account
        margin = {m["plan"]: m for m in _admin(server, "GET", "/reports/margin", params={"days": 1}).json()}
        assert sum(m["upstream_cost_usd"] for m in margin.values()) == pytest.approx(cost)
        assert margin["max"]["revenue_usd"] > 0 and margin["max"]["margin_usd"] < margin["max"]["revenue_usd"]

        # the audit: who, what, before and after, for every change
        audit = run(query(fresh_database, "SELECT * FROM admin_audit ORDER BY id"))
        actions = [(a["actor"], a["action"]) for a in audit]
        admin_account = "account:%d" % account["account_id"]
        assert {actor for actor, action in actions if action != "plan.retire"} == {"admin-token"}
        assert ("plan.retire" , admin_account) in [(a, b) for b, a in actions]
        assert [a for _, a in actions] == ["user.change", "plan.create", "plan.change", "plan.retire",
                                           "user.suspend", "user.restore", "user.change", "user.topup",
                                           "plan.change", "user.change"]
        change = json.loads(audit[2]["after"])
        assert (json.loads(audit[2]["before"])["window_tokens"], change["window_tokens"]) == (1000, 200_000)
        assert json.loads(audit[4]["before"])["suspended_at"] is None and json.loads(audit[4]["after"])["suspended_at"]
        assert _admin(server, "GET", "/audit").json()[0]["action"] == "user.change"
        assert new_user_refused(fresh_database, "team")
    finally:
        server.stop()


async def _with_pool(database: str, action):
    import asyncpg
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        return await action(pool)
    finally:
        await pool.close()


def new_user_refused(database: str, plan: str) -> bool:
    from service.accounts import AccountError
    try:
        new_user(database, plan)
    except AccountError as exc:
        return "unknown plan" in str(exc)
    return False


def test_admin_adds_and_disables_upstream_profiles_and_keys(fresh_database, busy_and_good):
    busy, good = busy_and_good
    server = start_bridge(fresh_database, busy.url + "/api/paas/v4", CODEPLAN_UPSTREAM_KEYS="busy-key",
                          CODEPLAN_ADMIN_TOKEN=ADMIN_TOKEN, CODEPLAN_UPSTREAM_ATTEMPTS="1")
    try:
        key = new_user(fresh_database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="glm-4.6", messages=_say("tokens=3"))
        busy_name = busy.url.removeprefix("http://")
        added = _admin(server, "POST", "/upstreams", json={
            "name": "spare", "base_url": good.url + "/api/paas/v4", "keys": ["spare-key-1"],
            "prices": {"input": 1, "cached": 0.5, "output": 2}})
        assert added.status_code == 201, added.text
        assert "spare-key-1" not in added.text
        # an environment variable may be named only in the operator's own file: here it would send
        # the process's secrets (Stripe's, the admin token) to a host of the admin's choice
        leak = _admin(server, "POST", "/upstreams", json={
            "name": "leak", "base_url": good.url + "/api/paas/v4", "keys_env": "CODEPLAN_ADMIN_TOKEN"})
        assert leak.status_code == 400 and "keys_env" in leak.text
        assert ADMIN_TOKEN not in leak.text
        disabled = _admin(server, "PATCH", f"/upstreams/{busy_name}", json={"enabled": False})
        assert disabled.json()["enabled"] is False
        answer = client.chat.completions.create(model="glm-4.6", messages=_say("tokens=3 reasoning=0"))
        assert answer.usage.completion_tokens > 0
        wait_settled(fresh_database)
        row = _rows(fresh_database, key)[-1]
        assert row["upstream"] == "spare" and row["upstream_cost"] == _cost(row, (1, 0.5, 2))
        # another key for it, then its first key switched off: requests go to the new one
        _admin(server, "POST", "/upstreams/spare/keys", json={"key": "spare-key-2"})
        fingerprint = [k["fingerprint"] for k in added.json()["keys"]][0]
        keys = _admin(server, "PATCH", f"/upstreams/spare/keys/{fingerprint}", json={"enabled": False}).json()["keys"]
        assert sorted(k["enabled"] for k in keys) == [False, True]
        client.chat.completions.create(model="glm-4.6", messages=_say("tokens=3 reasoning=0"))
        assert _stats(good)["in_flight"].get("spare-key-2") == 0
        audit = run(query(fresh_database, "SELECT action, target, after FROM admin_audit ORDER BY id"))
        assert [a["action"] for a in audit] == ["upstream.add", "upstream.disable", "upstream.key.add",
                                                "upstream.key.disable"]
        assert all("spare-key" not in (a["after"] or "") for a in audit)
    finally:
        server.stop()


# ---- metrics ----------------------------------------------------------------------------------

def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_are_present_and_move_with_traffic(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    try:
        key = new_user(database, new_plan(database, window=3000))
        before = httpx.get(server.url + "/metrics").text
        for name in ("codeplan_requests_total", "codeplan_bridge_overhead_seconds", "codeplan_open_streams",
                     "codeplan_pending_reservations", "codeplan_db_pool_connections",
                     "codeplan_settlement_lag_seconds", "codeplan_oldest_pending_seconds"):
            assert name in before, name
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="glm-4.6", max_tokens=1200,
                                                               messages=_say("tokens=1000 reasoning=0"))
        assert float(raw.headers["x-codeplan-overhead-ms"]) >= 0
        with client.chat.completions.with_streaming_response.create(
                model="glm-4.6", stream=True, max_tokens=100, messages=_say("tokens=5 reasoning=0")) as streamed:
            assert float(streamed.headers["x-codeplan-overhead-ms"]) >= 0
            list(streamed.iter_lines())
        with pytest.raises(openai.RateLimitError) as full:  # 1,000 used: the window of 3,000 cannot hold this
            client.chat.completions.create(model="glm-4.6", max_tokens=2000, messages=_say("tokens=5"))
        assert "x-codeplan-overhead-ms" in full.value.response.headers
        wait_settled(database)
        time.sleep(0.2)
        after = httpx.get(server.url + "/metrics").text
        moved = lambda name, **labels: _sample(after, name, **labels) - _sample(before, name, **labels)  # noqa: E731
        assert moved("codeplan_requests_total", surface="chat", model="glm-4.6", status="200") == 2
        assert moved("codeplan_requests_total", surface="chat", status="429") == 1
        assert moved("codeplan_bridge_overhead_seconds_count", surface="chat") == 3
        assert moved("codeplan_time_to_first_token_seconds_count", surface="chat", model="glm-4.6") == 1
        rows = _rows(database, key)
        assert moved("codeplan_tokens_total", model="glm-4.6", kind="completion") == \
            sum(r["completion_tokens"] for r in rows)
        assert moved("codeplan_credits_total", model="glm-4.6") == sum(r["billed_tokens"] for r in rows)
        assert moved("codeplan_admissions_refused_total", window="5h") == 1
        assert moved("codeplan_settlement_lag_seconds_count") == 2
        assert _sample(after, "codeplan_open_streams") == 0
        assert _sample(after, "codeplan_db_pool_connections", state="max") == 10
        assert _sample(after, "codeplan_pending_reservations") == 0
    finally:
        server.stop()


# ---- lifecycle --------------------------------------------------------------------------------

def test_a_stream_in_flight_completes_and_is_settled_across_a_sigterm(fresh_database, simulator):
    server = start_bridge(fresh_database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SHUTDOWN_TIMEOUT="20")
    key = new_user(fresh_database)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(model="glm-4.6", stream=True,
                                            messages=_say("tps=10 tokens=25 reasoning=0"))
    first = next(iter(stream))
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(server.url + "/healthz", timeout=2)
    chunks = [first, *stream]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens > 0
    assert server.process.wait(30) == 0
    [row] = run(query(fresh_database, "SELECT * FROM usage_ledger"))
    assert (row["state"], row["estimated"]) == ("posted", False)
    assert row["completion_tokens"] == chunks[-1].usage.completion_tokens


def test_a_stream_past_the_shutdown_deadline_is_cut_and_settled(fresh_database, simulator):
    server = start_bridge(fresh_database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SHUTDOWN_TIMEOUT="1",
                          CODEPLAN_DRAIN_TIMEOUT="60")
    key = new_user(fresh_database)
    reader, _ = stream_started(server, key, _say("tps=5 tokens=200 reasoning=0")[0]["content"])
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert time.monotonic() - started < 15  # the deadline, not the 40-second answer
    reader.join(10)
    [row] = run(query(fresh_database, "SELECT * FROM usage_ledger"))
    # settled before exit at what was delivered, not left to a sweeper
    assert row["state"] == "posted" and row["estimated"] and row["completion_tokens"] > 0


# ---- several processes on one database ----------------------------------------------------------

async def test_three_processes_hold_one_allowance_and_one_upstream_key_cap(fresh_database, tmp_path):
    sim = _sim()
    upstream_key = f"shared-{uuid.uuid4().hex[:6]}"
    servers = [start_bridge(fresh_database, sim.url + "/api/coding/paas/v4", CODEPLAN_UPSTREAM_KEYS=upstream_key,
                            CODEPLAN_UPSTREAM_CONCURRENCY="2", CODEPLAN_DB_POOL_SIZE="6") for _ in range(3)]
    try:
        async def streams(key: str, count: int) -> list[int]:
            clients = [openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=120)
                       for s in servers]

            async def one(i: int) -> int:
                try:
                    stream = await clients[i % 3].chat.completions.create(
                        model="glm-4.6", stream=True, max_tokens=100,
                        messages=_say(f"tps=100 tokens=20 reasoning=0 n={i}"))
                    async for _ in stream:
                        pass
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code
                except openai.APITimeoutError as exc:
                    # (this failed now and then in CI with nothing logged: the stacks and open
                    # connections of every process, taken while the request still hangs, and
                    # the clients' connection pools say where it waits)
                    hung.append(f"{i % 3}: {type(exc.__cause__).__name__}")
                    if len(hung) == 1:
                        print(hang_report(servers + [sim]), file=sys.stderr)
                        print(client_pools(clients), file=sys.stderr)
                    return 0
            hung: list[str] = []
            try:
                statuses = await asyncio.gather(*(one(i) for i in range(count)))
            finally:  # closed here, not by the garbage collector on whatever loop runs then
                await asyncio.gather(*(client.close() for client in clients))
            assert not hung, (f"requests to servers {hung} (server: what timed out) got no answer in 120 s; "
                              "every process's stacks are in the captured stderr")
            return statuses

        # The cap, measured where no request is refused: a refused request that was forwarded
        # early is abandoned, and the simulator notices the closed connection only after the
        # bridge has given the slot back (another process may be on it by then), so its count
        # would include requests the bridge no longer holds.
        roomy = new_user(fresh_database, new_plan(fresh_database, window=10**9))
        assert await streams(roomy, 30) == [200] * 30
        stats = _stats(sim)
        # one upstream key, a cap of 2, three processes: never more than 2 at once, and 2 reached
        assert stats["max_in_flight"][upstream_key] == 2, stats
        await asyncio.to_thread(wait_settled, fresh_database)

        # The allowance, shared by the three processes at its edge.
        allowance = 6_000
        key = new_user(fresh_database, new_plan(fresh_database, window=allowance, weekly=allowance * 10))
        statuses = await streams(key, 60)
        assert statuses.count(200) >= 6 and 429 in statuses and set(statuses) <= {200, 429}
        await asyncio.to_thread(wait_settled, fresh_database)
        windows = run(query(fresh_database, "SELECT w.* FROM quota_windows w JOIN api_keys k ON k.prefix = $1"
                                            " JOIN subscriptions s ON s.account_id = k.account_id"
                                            " AND s.id = w.subscription_id", key[:10]))
        rows = run(query(fresh_database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                         " WHERE k.prefix = $1 AND l.state = 'posted'", key[:10]))
        assert len(rows) == statuses.count(200) and len(windows) == 2
        for window in windows:
            assert window["posted"] == sum(r["billed_tokens"] for r in rows) <= allowance
            assert (window["reserved"], window["held"]) == (0, 0)
        leases = run(query(fresh_database, "SELECT count(*) AS n FROM upstream_key_leases WHERE holder IS NOT NULL"))
        assert leases[0]["n"] == 0  # every slot given back
    finally:
        for server in servers:
            server.stop()
        sim.stop()


def test_run_with_workers_serves_one_port_and_stops_cleanly(fresh_database, simulator):
    server = start_workers(fresh_database, simulator.url + "/api/coding/paas/v4", 3)
    try:
        assert server.process is not None
        workers = children(server.process.pid)
        assert len(workers) == 3
        key = new_user(fresh_database)
        for _ in range(12):
            response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                  json={"model": "glm-4.6", "messages": _say("tokens=3 reasoning=0")})
            assert response.status_code == 200
        wait_settled(fresh_database)
        # the workers' ticks take turns with the run's tick baton (service/tick_baton.py): a
        # session of its own each, opened at start-up, holding no lock between ticks
        deadline = time.monotonic() + 15  # (the last worker may still be starting)
        while (batons := run(query(fresh_database, "SELECT count(*) AS n FROM pg_stat_activity"
                                                   " WHERE application_name = 'codeplan tick baton'"
                                                   " AND datname = current_database()"))[0]["n"]) < 3:
            assert time.monotonic() < deadline, batons
            time.sleep(0.1)
        assert batons == 3
        deadline = time.monotonic() + 5  # (the last tick's COMMIT of its baton goes after its answer)
        while (held := run(query(fresh_database, "SELECT count(*) AS n FROM pg_locks l JOIN pg_database d"
                                                 " ON d.oid = l.database WHERE l.locktype = 'advisory'"
                                                 " AND d.datname = current_database()"))[0]["n"]) > 0:
            assert time.monotonic() < deadline, held
            time.sleep(0.05)
        # every worker's samples, from whichever worker answers the scrape
        for _ in range(3):
            text = httpx.get(server.url + "/metrics").text
            assert _sample(text, "codeplan_requests_total", status="200") == 12
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(40) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        server.stop()


def test_a_worker_that_does_not_stop_is_killed_not_left_holding_the_port(fresh_database, simulator):
    """A worker hung at the stop (here SIGSTOPped: a blocked loop, a stuck call) was left running
    when the supervisor gave up waiting: an orphan holding the listening socket, connections
    queued and never answered, while the supervisor exited 0. Now it is killed and the exit is 1."""
    # the supervisor's bound, shortened (40 s past the shutdown timeout by default): the healthy
    # worker stops well within it, the stopped one is killed at it
    server = start_workers(fresh_database, simulator.url + "/api/coding/paas/v4", 2,
                           CODEPLAN_SHUTDOWN_TIMEOUT="1", CODEPLAN_WORKER_STOP_GRACE="6")
    hung = None
    try:
        assert server.process is not None
        deadline = time.monotonic() + 20
        while len(workers := children(server.process.pid)) < 2:
            assert time.monotonic() < deadline, workers
            time.sleep(0.1)
        hung = workers[0]
        os.kill(hung, signal.SIGSTOP)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(90) == 1
        time.sleep(0.2)
        stat = Path(f"/proc/{hung}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        with pytest.raises(httpx.ConnectError):  # nobody holds the port
            httpx.get(server.url + "/healthz", timeout=3)
        assert "worker did not stop in time; killed" in server.output()
    finally:
        if hung is not None and Path(f"/proc/{hung}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
        server.stop()

