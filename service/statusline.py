#!/usr/bin/env python3
"""Codeplan's usage in one line: `codeplan usage`, and Claude Code's status line.

Standard library only, so the same file also works downloaded on its own
(`curl -o ~/.claude/codeplan-statusline.py BASE/setup/statusline.py`, then
`"statusLine": {"type": "command", "command": "python3 ~/.claude/codeplan-statusline.py"}`).

The key: CODEPLAN_API_KEY, else ANTHROPIC_AUTH_TOKEN / ANTHROPIC_API_KEY (what Claude Code's
settings.json already sets). The server: CODEPLAN_BASE_URL, else ANTHROPIC_BASE_URL, else
http://127.0.0.1:8080.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT = 2.0


def settings(environ: dict[str, str] | None = None) -> tuple[str, str]:
    env = os.environ if environ is None else environ
    key = env.get("CODEPLAN_API_KEY") or env.get("ANTHROPIC_AUTH_TOKEN") or env.get("ANTHROPIC_API_KEY") or ""
    base = (env.get("CODEPLAN_BASE_URL") or env.get("ANTHROPIC_BASE_URL") or "http://127.0.0.1:8080").rstrip("/")
    for suffix in ("/api/anthropic", "/v1"):  # the bases tools are given, back to the server's root
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base, key.strip()


class UsageError(Exception):
    pass


def fetch(base: str, key: str, timeout: float = TIMEOUT) -> dict:
    if not key:
        raise UsageError("no key (set CODEPLAN_API_KEY)")
    request = urllib.request.Request(base + "/v1/usage", headers={"authorization": f"Bearer {key}",
                                                                  "user-agent": "codeplan-statusline"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("title") or exc.reason
        except ValueError:
            detail = exc.reason
        raise UsageError(str(detail).lower() if exc.code == 401 else f"HTTP {exc.code}: {detail}") from None
    except (OSError, ValueError):
        raise UsageError(f"cannot reach {base}") from None


def compact(n: float) -> str:
    """A count in a few characters: 950, 1.5k, 160M, 1.2B. The unit is chosen on the figure as
    printed (rounded to a tenth): 999,950 is "1M", never "1000k". (The web pages' figures too:
    service/web/chart.py uses this one.)"""
    if abs(n) < 1e3:
        return str(int(n))
    for unit, size in (("k", 1e3), ("M", 1e6)):
        figure = f"{n / size:.1f}"
        if abs(float(figure)) < 1e3:
            return figure.rstrip("0").rstrip(".") + unit
    return f"{n / 1e9:.1f}".rstrip("0").rstrip(".") + "B"


def _local_time(iso: str | None, now: dt.datetime) -> str:
    if not iso:
        return ""
    moment = dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone()
    local_now = now.astimezone()
    return moment.strftime("%H:%M" if moment.date() == local_now.date() else "%a %H:%M")


def percentage(spent: int, allowance: int, remaining: int) -> int:
    """The share of a window spent, as a whole percent: 100 only when nothing is left; otherwise
    rounded down and at most 99, so a window a request still fits never reads full."""
    if remaining <= 0 or allowance <= 0:
        return 100
    return min(99, 100 * spent // allowance)


def one_line(report: dict, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    parts = [f"Codeplan {report.get('plan', {}).get('id', '?')}"]
    for window in report.get("windows", []):
        allowance = int(window.get("allowance") or 0)
        spent = int(window.get("used") or 0) + int(window.get("reserved") or 0)
        remaining = int(window.get("remaining") or 0)
        label = "5h" if window.get("kind") == "5h" else "week"
        text = f"{label} {percentage(spent, allowance, remaining)}% ({compact(remaining)} left"
        reset = _local_time(window.get("resets_at"), now)
        parts.append(text + (f", resets {reset})" if reset else ")"))
    return " · ".join(parts)


def usage_main(environ: dict[str, str] | None = None) -> int:
    base, key = settings(environ)
    try:
        print(one_line(fetch(base, key)))
    except UsageError as exc:
        print(f"codeplan: {exc}", file=sys.stderr)
        return 1
    return 0


def statusline_main(stdin=None, environ: dict[str, str] | None = None) -> int:
    """Claude Code pipes its session JSON in and shows the first line printed. Always print one."""
    stdin = sys.stdin if stdin is None else stdin
    model = ""
    try:
        if not stdin.isatty():
            session = json.loads(stdin.read() or "{}")
            model = (session.get("model") or {}).get("display_name") or ""
    except (ValueError, AttributeError, OSError):
        pass
    base, key = settings(environ)
    try:
        line = one_line(fetch(base, key))
    except UsageError as exc:
        line = f"Codeplan: {exc}"
    print(f"{model} | {line}" if model else line)
    return 0


if __name__ == "__main__":
    sys.exit(statusline_main())
