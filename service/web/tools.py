"""Copy-paste set-up for each coding tool, filled in with this server's URL and a key."""
from __future__ import annotations

import json

import msgspec

PLACEHOLDER = "cp_YOUR_KEY"
MODEL = "glm-4.6"


class Field(msgspec.Struct, frozen=True):
    label: str
    value: str


class Snippet(msgspec.Struct, frozen=True):
    id: str
    tool: str
    where: str       # the file or screen it goes into
    language: str    # json | toml | sh | fields
    text: str = ""
    fields: list[Field] = []
    shell: str = ""  # a command to run as well, shown under the file


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# the script is served by this server (GET /setup/statusline.py) and needs only Python 3
STATUSLINE_PATH = "~/.claude/codeplan-statusline.py"
STATUSLINE_COMMAND = f"python3 {STATUSLINE_PATH}"
# Claude Code sizes its default model's context at 1,000,000 tokens unless told not to (then
# 200,000): it must not wait that long to compact when its claude-* ids map to a smaller window
CLAUDE_CODE_1M = 1_000_000


def snippets(base: str, key: str | None, claude_window: int | None = None) -> list[Snippet]:
    """`claude_window`: the context window of the model Claude Code's claude-* ids are served by
    (CODEPLAN_CLAUDE_MODEL); None when not known."""
    key = key or PLACEHOLDER
    v1 = f"{base}/v1"
    claude_env = {"ANTHROPIC_BASE_URL": base, "ANTHROPIC_AUTH_TOKEN": key, "API_TIMEOUT_MS": "3000000"}
    if claude_window is not None and claude_window < CLAUDE_CODE_1M:
        claude_env["CLAUDE_CODE_DISABLE_1M_CONTEXT"] = "1"
    claude = {"env": claude_env, "statusLine": {"type": "command", "command": STATUSLINE_COMMAND}}
    opencode = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {"codeplan": {
            "npm": "@ai-sdk/openai-compatible", "name": "Codeplan",
            "options": {"baseURL": v1, "apiKey": key},
            "models": {MODEL: {"name": "GLM-4.6", "tool_call": True,
                               "limit": {"context": 204800, "output": 131072}}}}},
        "model": f"codeplan/{MODEL}", "small_model": f"codeplan/{MODEL}",
    }
    codex = (f'model = "{MODEL}"\nmodel_provider = "codeplan"\n'
             # Codex has no metadata for GLM-4.6: without its window it cannot compact in time
             'model_context_window = 204800\n\n'
             f'[model_providers.codeplan]\nname = "Codeplan"\nbase_url = "{v1}"\n'
             f'env_key = "CODEPLAN_API_KEY"\nwire_api = "responses"\n')
    provider_fields = [Field("API Provider", "OpenAI Compatible"), Field("Base URL", v1),
                       Field("API Key", key), Field("Model ID", MODEL)]
    return [
        Snippet(id="claude", tool="Claude Code", where="~/.claude/settings.json", language="json",
                text=_json(claude),
                shell=f"curl -fsSo {STATUSLINE_PATH} {base}/setup/statusline.py"),
        Snippet(id="opencode", tool="OpenCode / Kilo", where="opencode.json", language="json",
                text=_json(opencode)),
        Snippet(id="cline", tool="Cline", where="Settings → API Provider", language="fields",
                fields=[*provider_fields, Field("Context window", "204800")]),
        Snippet(id="roo", tool="Roo Code", where="Settings → API Provider", language="fields",
                fields=provider_fields),
        Snippet(id="codex", tool="Codex", where="~/.codex/config.toml", language="toml", text=codex,
                shell=f"export CODEPLAN_API_KEY={key}"),
    ]
