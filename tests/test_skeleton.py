"""The one path that is the product: key -> admission -> bridge -> GLM -> exact usage in the ledger."""
from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
import uuid

import asyncpg
import httpx
import openai
import pytest

from service import config as config_module
from service import db

from .conftest import CODEPLAN, ROOT, base_env, new_user, query, run, settled_query, with_database


def ledger_rows(database: str):
    return settled_query(database, "SELECT * FROM usage_ledger ORDER BY created_at")


def direct_usage(simulator, body: dict) -> dict:
    """What the simulator itself reports for a request, asked directly."""
    request = urllib.request.Request(
        simulator.url + "/api/coding/paas/v4/chat/completions", data=json.dumps(body).encode(),
        headers={"authorization": "Bearer direct", "content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())["usage"]


def unique_prompt() -> str:
    return f"Explain the change in commit {uuid.uuid4().hex[:8]} briefly."


def test_streamed_completion_leaves_one_posted_row_with_simulator_usage(bridge, database, simulator, key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key)
    prompt = unique_prompt()
    before = len(ledger_rows(database))
    stream = client.chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": prompt}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None

    rows = ledger_rows(database)
    assert len(rows) == before + 1
    row = rows[-1]
    expected = direct_usage(simulator, {"model": "glm-4.6", "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": 131072})
    assert row["state"] == "posted" and not row["estimated"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        expected["prompt_tokens"], expected["completion_tokens"], expected["prompt_tokens_details"]["cached_tokens"])
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected["prompt_tokens"], expected["completion_tokens"])
    # GLM gives no reasoning breakdown; the bridge counts the reasoning it relayed
    assert 0 < row["reasoning_tokens"] == usage.completion_tokens_details.reasoning_tokens < row["completion_tokens"]
    assert row["billed_tokens"] == expected["prompt_tokens"] + expected["completion_tokens"]


def test_non_streamed_completion_leaves_one_posted_row(bridge, database, simulator, key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key)
    prompt = unique_prompt()
    before = len(ledger_rows(database))
    response = client.chat.completions.create(
        model="GLM-4.6", messages=[{"role": "user", "content": prompt}], max_tokens=20)
    # 24 reasoning tokens > 20: the whole budget went to reasoning, which comes separately
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == ""
    assert response.choices[0].message.model_extra["reasoning_content"].strip()
    rows = ledger_rows(database)
    assert len(rows) == before + 1
    expected = direct_usage(simulator, {"model": "glm-4.6", "max_tokens": 20,
                                        "messages": [{"role": "user", "content": prompt}]})
    assert rows[-1]["state"] == "posted"
    assert rows[-1]["prompt_tokens"] == response.usage.prompt_tokens == expected["prompt_tokens"]
    assert rows[-1]["completion_tokens"] == response.usage.completion_tokens == expected["completion_tokens"] == 20


def test_same_endpoint_on_the_zai_path(bridge, key):
    client = openai.OpenAI(base_url=bridge.url + "/api/coding/paas/v4", api_key=key)
    response = client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}])
    assert response.usage.total_tokens > 0


def test_key_from_x_api_key_header(bridge, key):
    response = httpx.post(bridge.url + "/v1/chat/completions", headers={"x-api-key": key},
                          json={"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("api_key", ["cp_unknown_key_000000000000", ""])
def test_unknown_key_is_rejected_in_openai_shape(bridge, database, api_key):
    before = len(ledger_rows(database))
    response = httpx.post(bridge.url + "/v1/chat/completions",
                          headers={"authorization": f"Bearer {api_key}"} if api_key else {},
                          json={"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    assert len(ledger_rows(database)) == before
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=bridge.url + "/v1", api_key=api_key or "x").chat.completions.create(
            model="glm-4.6", messages=[{"role": "user", "content": "hi"}])


def test_bad_json_gets_openai_error_not_500(bridge, key):
    response = httpx.post(bridge.url + "/v1/chat/completions", content=b"{not json",
                          headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(bridge.url + "/v1/chat/completions", json={"model": "glm-4.6", "messages": []},
                          headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_healthz(bridge):
    response = httpx.get(bridge.url + "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_unknown_path_is_problem_details(bridge):
    response = httpx.get(bridge.url + "/no/such/thing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 404


# ---- migrations -----------------------------------------------------------------------

def test_migrations_are_idempotent_and_safe_concurrently(fresh_database):
    async def twice_at_once():
        return await asyncio.gather(db.migrate(fresh_database), db.migrate(fresh_database))
    # the template was migrated already: nothing to apply, from two runners at once
    assert run(twice_at_once()) == [[], []]
    rows = run(query(fresh_database, "SELECT version FROM schema_migrations"))
    assert [r["version"] for r in rows] == [p.stem for p in db.migration_files()]


def test_migrations_apply_in_order_each_once(pg_url, tmp_path):
    name = "m_" + uuid.uuid4().hex[:10]
    run(query(pg_url, f"CREATE DATABASE {name}"))
    url = with_database(pg_url, name)
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "0002_b.sql").write_text("INSERT INTO a VALUES (1);")

    async def concurrently():
        return await asyncio.gather(*(db.migrate(url, tmp_path) for _ in range(4)))
    results = run(concurrently())
    assert sorted(v for r in results for v in r) == ["0001_a", "0002_b"]
    assert run(query(url, "SELECT count(*) AS n FROM a"))[0]["n"] == 1
    (tmp_path / "0002_b.sql").write_text("INSERT INTO a VALUES (2);")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        run(db.migrate(url, tmp_path))
    (tmp_path / "0003_c.sql").write_text("INSERT INTO a VALUES (3")  # a failing migration
    (tmp_path / "0002_b.sql").write_text("INSERT INTO a VALUES (1);")
    with pytest.raises(asyncpg.PostgresSyntaxError) as failed:
        run(db.migrate(url, tmp_path))
    assert failed.value.__notes__ == ["in migration 0003_c.sql"]  # which file, with its traceback
    assert "0003_c" not in [r["version"] for r in run(query(url, "SELECT version FROM schema_migrations"))]


# ---- configuration --------------------------------------------------------------------

@pytest.mark.parametrize("variable,value,expected", [
    ("CODEPLAN_PORT", "eighty", "CODEPLAN_PORT: expected an integer from 1 to 65535, got 'eighty'"),
    ("CODEPLAN_PORT", "70000", "CODEPLAN_PORT: expected an integer from 1 to 65535, got '70000'"),
    ("CODEPLAN_LOG_LEVEL", "loud", "CODEPLAN_LOG_LEVEL: expected one of debug, info, warning, error"),
    ("CODEPLAN_UPSTREAM_URL", "api.z.ai", "CODEPLAN_UPSTREAM_URL: expected an http:// or https://"),
    ("CODEPLAN_DATABASE_URL", "mysql://x", "CODEPLAN_DATABASE_URL: expected a postgresql:// URL"),
    ("CODEPLAN_RESERVATION_LEASE", "-3", "CODEPLAN_RESERVATION_LEASE: expected a positive number"),
])
def test_bad_configuration_is_one_clear_line(variable, value, expected):
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load({variable: value})
    assert str(caught.value).startswith(expected)


def test_upstream_url_needs_keys_and_keys_never_echo():
    with pytest.raises(config_module.ConfigError, match="CODEPLAN_UPSTREAM_KEYS: required"):
        config_module.load({"CODEPLAN_UPSTREAM_URL": "https://api.z.ai/api/coding/paas/v4"})
    loaded = config_module.load({"CODEPLAN_UPSTREAM_URL": "https://api.z.ai/api/coding/paas/v4",
                                 "CODEPLAN_UPSTREAM_KEYS": "k1, k2 ,", "CODEPLAN_PORT": "9000"})
    assert loaded.upstream_keys == ("k1", "k2") and loaded.port == 9000 and not loaded.simulated


def test_bad_configuration_stops_start_up_with_exit_2():
    result = subprocess.run(CODEPLAN + ["run"], env=base_env(CODEPLAN_PORT="abc"), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "codeplan: configuration error: CODEPLAN_PORT: expected an integer from 1 to 65535, got 'abc'"


@pytest.mark.parametrize("variable,value,expected", [
    ("CODEPLAN_CLAUDE_MODEL", "gpt-5", "CODEPLAN_CLAUDE_MODEL: expected one of glm-4.6, glm-4.5, glm-4.5-air, got 'gpt-5'"),
    ("CODEPLAN_MODEL_ALIASES", "fast=glm-9", "CODEPLAN_MODEL_ALIASES: 'fast=glm-9' names no model we serve"),
])
def test_bad_model_settings_stop_start_up(variable, value, expected):
    result = subprocess.run(CODEPLAN + ["run"], env=base_env(**{variable: value}), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and expected in result.stderr


def test_env_example_documents_every_variable():
    documented = (ROOT / ".env.example").read_text()
    for field in config_module.Config.__struct_fields__:
        assert f"\n{config_module.env_name(field)}=" in documented, field


# ---- admin CLI --------------------------------------------------------------------------

def test_cli_creates_users_and_keys(database, bridge):
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    env = base_env(CODEPLAN_DATABASE_URL=database)
    created = subprocess.run(CODEPLAN + ["users", "create", "--email", email, "--plan", "lite"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    first = created.stdout.strip().splitlines()[-1]
    added = subprocess.run(CODEPLAN + ["keys", "create", "--email", email], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    second = added.stdout.strip().splitlines()[-1]
    assert first.startswith("cp_") and second.startswith("cp_") and first != second
    for api_key in (first, second):
        client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=api_key)
        assert client.chat.completions.create(
            model="glm-4.6", messages=[{"role": "user", "content": "hi"}]).usage.total_tokens > 0
    stored = run(query(database, "SELECT prefix, secret_hash FROM api_keys k JOIN accounts a"
                                 " ON a.id = k.account_id WHERE a.email = $1", email))
    assert {r["prefix"] for r in stored} == {first[:10], second[:10]}
    assert all(first.encode() not in bytes(r["secret_hash"]) for r in stored)
    duplicate = subprocess.run(CODEPLAN + ["users", "create", "--email", email], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert duplicate.returncode == 1 and "exists already" in duplicate.stderr
    unknown = subprocess.run(CODEPLAN + ["users", "create", "--email", "x" + email, "--plan", "gold"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "unknown plan 'gold'" in unknown.stderr


def test_cli_revokes_a_key(database, bridge):
    key = new_user(database)
    env = base_env(CODEPLAN_DATABASE_URL=database)
    revoked = subprocess.run(CODEPLAN + ["keys", "revoke", "--prefix", key[:10]], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    # an operator's revocation is in the audit trail, as the admin API's changes are
    audit = run(query(database, "SELECT actor, action, after FROM admin_audit WHERE action = 'key.revoke'"
                                " AND after->>'key' = $1", key[:10]))
    assert [(a["actor"], a["action"]) for a in audit] == [("cli", "key.revoke")], audit
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="glm-4.6", messages=[{"role": "user", "content": "hi"}])
    again = subprocess.run(CODEPLAN + ["keys", "revoke", "--prefix", key[:10]], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "revoked already" in again.stderr
    assert len(run(query(database, "SELECT 1 FROM admin_audit WHERE after->>'key' = $1", key[:10]))) == 1
    unknown = subprocess.run(CODEPLAN + ["keys", "revoke", "--prefix", "cp_nothing"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "no key with prefix" in unknown.stderr
