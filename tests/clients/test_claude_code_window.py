"""Claude Code set up exactly as the Setup page says, run headless: the context window it sizes
its model at must not exceed the window of the model the bridge serves Claude's ids with.

What was wrong: the page's settings.json left Claude Code on its default model with a
1,000,000-token window, so it would not compact until long after the bridge refuses prompts at
glm-4.6's 204,800 (Claude Code 2.1.197 reported contextWindow 1000000)."""
from __future__ import annotations

import html
import json
import os
import re
import subprocess

import pytest

from bridge.models import CATALOG

from ..conftest import start_bridge
from ..web_support import Browserish
from .test_real_clients import SECRET, binary, task, workspace  # noqa: F401 - the workspace fixture

QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
         "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}


@pytest.fixture(scope="module")
def site(database, simulator):
    # no SMTP: a sign-up lands on Setup at once; the plan makes the key usable
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SIGNUP_PLAN="lite")
    yield server
    server.stop()


def settings_from_the_setup_page(site) -> str:
    client = Browserish(site.url)
    assert client.sign_up("claude-window@example.com").url.path == "/setup"
    setup = client.get("/setup").text
    after = re.search(r'name="after" value="(\d*)"', setup).group(1)
    page = client.post("/keys", {"name": "claude", "then": "setup", "after": after}).text
    found = re.search(r'<pre id="code-claude"[^>]*><code>(.*?)</code></pre>', page, re.S)
    assert found, page[-2000:]
    return html.unescape(found.group(1))


def test_claude_code_from_the_setup_page_sizes_its_window_within_glm_4_6(site, workspace):  # noqa: F811
    work, home = workspace
    (home / ".claude").mkdir()
    (home / ".claude" / "settings.json").write_text(settings_from_the_setup_page(site))
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CODEPLAN_", "ANTHROPIC_", "OPENAI_"))}
    environment.update(HOME=str(home), **QUIET)
    # no --model: Claude Code asks for its own default model, as someone following the page does
    result = subprocess.run([binary("claude", "claude"), "-p", task(work), "--output-format", "json"],
                            cwd=work, env=environment, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    answer = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert SECRET in answer["result"], answer
    windows = {model: usage["contextWindow"] for model, usage in answer["modelUsage"].items()}
    assert windows and all(w <= CATALOG["glm-4.6"].context_window for w in windows.values()), windows
