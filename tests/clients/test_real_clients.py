"""The real coding tools, installed from npm, run headless against the bridge on 127.0.0.1.

Each runs one task that needs a tool call (read a file, answer from it). The answer must carry
the file's secret, and the ledger must hold one settled row for every request the simulator
served (its own count, independent of the bridge's).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from ..conftest import CODEPLAN, Server, base_env, free_port, new_user, query, run, start_bridge, wait_settled

CLIENTS = Path(os.environ.get("CODEPLAN_CLIENTS_DIR", Path.home() / ".cache" / "codeplan-clients"))
SECRET = "PINEAPPLE-42"


def binary(name: str, tool: str) -> str:
    path = CLIENTS / name / "node_modules" / ".bin" / tool
    assert path.exists(), f"{path} missing: run `make clients` (tests/clients/install.sh) first"
    return str(path)


def sim_stats(simulator) -> dict:
    with urllib.request.urlopen(simulator.url + "/_sim/stats") as response:
        return json.loads(response.read())


@pytest.fixture(scope="module", params=["glm", "openai-style"])
def simulator(request):
    """Every client against two upstreams: GLM's own behaviour (stream usage sent unasked) and an
    OpenAI-style server's (vLLM, SGLang, most hosts: stream usage only when asked)."""
    mode = "always" if request.param == "glm" else "when_asked"
    port = free_port()
    server = Server(CODEPLAN + ["simulate", "--port", str(port), "--usage-mode", mode], base_env(), port,
                    "/_sim/stats").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def codeplan(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    yield server
    server.stop()


@pytest.fixture
def workspace(tmp_path):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "secret.txt").write_text(f"The launch code is {SECRET}.\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=work, check=True)
    subprocess.run(git + ["add", "-A"], cwd=work, check=True)
    subprocess.run(git + ["commit", "-qm", "fixture"], cwd=work, check=True)
    home = tmp_path / "home"
    home.mkdir()
    return work, home


def task(work: Path) -> str:
    return f"Read the file {work / 'notes' / 'secret.txt'} and tell me the launch code."


def run_client(argv: list[str], work: Path, home: Path, env: dict[str, str], timeout: int = 180) -> str:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("CODEPLAN_", "ANTHROPIC_", "OPENAI_"))}
    environment.update(HOME=str(home), **env)
    result = subprocess.run(argv, cwd=work, env=environment, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def check_metered(database: str, key: str, served: int) -> None:
    wait_settled(database)
    rows = run(query(database, "SELECT l.state, l.estimated FROM usage_ledger l JOIN api_keys k"
                               " ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
    assert served >= 2, "a tool round trip takes at least two model calls"
    assert len(rows) == served
    assert all(r["state"] == "posted" and not r["estimated"] for r in rows), rows


def opencode_config(path: Path, base: str, key: str) -> None:
    path.write_text(json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"codeplan": {
            "npm": "@ai-sdk/openai-compatible", "name": "Codeplan",
            "options": {"baseURL": base + "/v1", "apiKey": key},
            "models": {"glm-4.6": {"name": "GLM-4.6", "tool_call": True,
                                   "limit": {"context": 204800, "output": 131072}}}}},
        "model": "codeplan/glm-4.6", "small_model": "codeplan/glm-4.6",
        # headless: nobody is there to approve a read
        "permission": {"external_directory": "allow", "read": "allow"}}))


def test_opencode(codeplan, database, simulator, workspace):
    work, home = workspace
    key = new_user(database)
    opencode_config(home / "opencode.json", codeplan.url, key)
    before = sim_stats(simulator)["requests"]
    output = run_client([binary("opencode", "opencode"), "run", task(work)], work, home, {
        "OPENCODE_CONFIG": str(home / "opencode.json"), "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1", "OPENCODE_DISABLE_SHARE": "1",
        "OPENCODE_DISABLE_CLAUDE_CODE": "1"})
    assert SECRET in output.split("From the tool result:")[-1], output[-2000:]
    check_metered(database, key, sim_stats(simulator)["requests"] - before)


def test_kilo(codeplan, database, simulator, workspace):
    work, home = workspace
    key = new_user(database)
    opencode_config(home / "kilo.json", codeplan.url, key)
    before = sim_stats(simulator)["requests"]
    flags = ["AUTOUPDATE", "MODELS_FETCH", "LSP_DOWNLOAD", "DEFAULT_PLUGINS", "SHARE", "CLAUDE_CODE",
             "SESSION_INGEST", "PRESENCE", "CODEBASE_INDEXING"]
    output = run_client([binary("kilo", "kilo"), "run", task(work)], work, home, {
        "KILO_CONFIG": str(home / "kilo.json"), **{f"KILO_DISABLE_{f}": "1" for f in flags}})
    assert SECRET in output.split("From the tool result:")[-1], output[-2000:]
    check_metered(database, key, sim_stats(simulator)["requests"] - before)


def test_cline(codeplan, database, simulator, workspace):
    work, home = workspace
    key = new_user(database)
    cline = binary("cline", "cline")
    dirs = ["--config", str(home / "cfg"), "--data-dir", str(home / "data")]
    run_client([cline, "auth", "-p", "openai", "-k", key, "-m", "glm-4.6", "-b", codeplan.url + "/v1", *dirs],
               work, home, {})
    before = sim_stats(simulator)["requests"]
    output = run_client([cline, *dirs, "--json", "-t", "120", task(work)], work, home, {})
    result = [json.loads(line) for line in output.splitlines()
              if line.startswith("{") and '"run_result"' in line]
    assert result and result[-1]["finishReason"] == "completed", output[-2000:]
    assert SECRET in result[-1]["text"]
    check_metered(database, key, sim_stats(simulator)["requests"] - before)


def test_claude_code(codeplan, database, simulator, workspace):
    work, home = workspace
    key = new_user(database)
    before = sim_stats(simulator)["requests"]
    output = run_client([binary("claude", "claude"), "-p", task(work), "--model", "glm-4.6",
                         "--output-format", "json"], work, home, {
        "ANTHROPIC_BASE_URL": codeplan.url, "ANTHROPIC_AUTH_TOKEN": key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"})
    result = json.loads(output[output.index("{"):output.rindex("}") + 1])
    assert result["subtype"] == "success" and not result["is_error"], output[-2000:]
    assert result["num_turns"] >= 2 and SECRET in result["result"]
    check_metered(database, key, sim_stats(simulator)["requests"] - before)


def codex_home(home: Path, base: str, websockets: bool) -> Path:
    """Codex with a custom provider at the bridge: the Responses API, the key from an env var."""
    folder = home / "codex"
    folder.mkdir()
    (folder / "config.toml").write_text(f'''model = "glm-4.6"
model_provider = "codeplan"
approval_policy = "never"
sandbox_mode = "read-only"

[analytics]
enabled = false

[model_providers.codeplan]
name = "Codeplan"
base_url = "{base}/v1"
env_key = "CODEPLAN_API_KEY"
wire_api = "responses"
supports_websockets = {"true" if websockets else "false"}
''')
    return folder


def run_codex(codeplan, database, simulator, workspace, websockets: bool) -> str:
    work, home = workspace
    key = new_user(database)
    config = codex_home(home, codeplan.url, websockets)
    before = sim_stats(simulator)["requests"]
    output = run_client([binary("codex", "codex"), "exec", "--skip-git-repo-check", task(work)], work, home, {
        "CODEX_HOME": str(config), "CODEPLAN_API_KEY": key, "RUST_LOG": "codex_api=info"})
    assert SECRET in output.split("From the tool result:")[-1], output[-2000:]
    assert "cat " in output and "succeeded" in output, output[-2000:]  # it really ran the command
    check_metered(database, key, sim_stats(simulator)["requests"] - before)
    return output


def test_codex_over_http(codeplan, database, simulator, workspace):
    output = run_codex(codeplan, database, simulator, workspace, websockets=False)
    assert "WebSocket" not in output


def test_codex_over_websocket(database, simulator, workspace):
    # a bridge of its own, logging at info: its socket lines show the turns went over the socket
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_LOG_LEVEL="info")
    try:
        output = run_codex(server, database, simulator, workspace, websockets=True)
        assert "successfully connected to Responses WebSocket" in output, output[-2000:]
        assert "Falling back" not in output and "HTTPS transport" not in output, output[-2000:]
    finally:
        server.stop()
    sockets = [json.loads(line) for line in server.output().splitlines() if '"response socket closed"' in line]
    # every model call went over a socket, the second continuing the first's response
    assert sum(s["turns"] for s in sockets) >= 2 and sum(s["continued"] for s in sockets) >= 1, sockets
    assert sum(s["refused"] for s in sockets) == 0


def test_codex_refused_socket_falls_back_to_http_at_once(database, simulator, workspace):
    # a server that cannot serve the socket answers the upgrade 426: Codex tries once, uses HTTP
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_RESPONSES_WEBSOCKETS="false")
    try:
        output = run_codex(server, database, simulator, workspace, websockets=True)
    finally:
        server.stop()
    assert output.count("connecting to Responses WebSocket") == 1, output[-2000:]
    assert "successfully connected to Responses WebSocket" not in output
