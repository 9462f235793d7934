"""The web page in a real browser: Debian's Chromium driven by Playwright, against the running
server, a real SMTP server and the openai SDK. Skipped, saying how to enable them, when the
browser is not installed (`.ci/run` installs it, so CI always runs them).

Screenshots land in tests/artifacts/screenshots/ (not committed); the README's are copies in
docs/screenshots/."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import openai
import pytest

from .conftest import ROOT, query, run, start_bridge, wait_settled
from .web_support import PASSWORD, SmtpServer, link_in

CHROMIUM = os.environ.get("CODEPLAN_CHROMIUM", "/usr/bin/chromium")
BROWSER_DIR = Path(os.environ.get("CODEPLAN_BROWSER_DIR", Path.home() / ".cache" / "codeplan-browser"))
AXE = BROWSER_DIR / "axe-core" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = ROOT / "tests" / "artifacts" / "screenshots"
ENABLE = ("enable them with `make browser` (as root: apt-get install chromium fonts-wqy-microhei; "
          "npm axe-core into ~/.cache/codeplan-browser), as .ci/run does")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests skipped: the playwright package is missing; `make test` installs it")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests skipped: no Chromium at {CHROMIUM}; {ENABLE}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def axe_script() -> Path:
    if not AXE.exists() and shutil.which("npm"):
        subprocess.run([str(ROOT / "tests" / "browser" / "install.sh")], check=False, timeout=600)
    if not AXE.exists():
        pytest.skip(f"accessibility checks skipped: axe-core not found at {AXE}; {ENABLE}")
    return AXE


@pytest.fixture(scope="module")
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(database, simulator, smtp):
    # a small allowance, so a few requests visibly move the meters (and the screenshots show it)
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models)"
                        " VALUES ('starter', 'GLM Coding Starter', 2000, 10000, 0, ARRAY['glm-4.6', 'glm-4.5-air'])"))
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                          CODEPLAN_AUTH_CACHE_TTL="0", CODEPLAN_SIGNUP_PLAN="starter")
    yield server
    server.stop()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def posted_5h(database: str, email: str) -> int:
    rows = run(query(database, "SELECT w.posted FROM quota_windows w JOIN subscriptions s ON s.id = w.subscription_id"
                               " JOIN accounts a ON a.id = s.account_id WHERE a.email = $1 AND w.kind = '5h'"
                               " ORDER BY w.starts_at DESC LIMIT 1", email))
    return rows[0]["posted"] if rows else 0


def wait_until(page, expression: str, timeout: float = 20.0) -> None:
    """Poll a JS expression from here: Playwright's wait_for_function evaluates strings inside the
    page, which the page's Content-Security-Policy (no 'unsafe-eval') rightly refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {expression}")
        time.sleep(0.1)


def figure(page, kind: str, field: str) -> int:
    return int(re.sub(r"\D", "", page.inner_text(f'[data-window="{kind}"] [data-field="{field}"]')) or 0)


def sign_up_and_verify(page, site, smtp, on_link_page=None) -> str:
    """Sign up, open the mailed link and press its confirm button (`on_link_page(page)` first)."""
    email = f"b{uuid.uuid4().hex[:10]}@example.com"
    page.goto(site.url + "/signup")
    page.locator("#email").fill(email)
    page.locator("#password").fill(PASSWORD)
    page.locator("form.stack button[type=submit]").click()
    page.wait_for_url("**/welcome")
    page.goto(link_in(smtp.inbox.wait_for(email)))
    if on_link_page is not None:
        on_link_page(page)
    page.locator('form[action="/verify"] button[type=submit]').click()
    page.wait_for_url("**/setup?notice=verified")
    return email


def test_from_sign_up_to_a_working_key_and_a_live_meter(browser, site, smtp, database):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US",
                                  timezone_id="Asia/Shanghai")
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    page.goto(site.url + "/signup")
    shot(page, "signup")
    email = sign_up_and_verify(page, site, smtp)
    assert page.get_by_text("Your address is confirmed.").is_visible()

    # Setup: make a key there; every snippet is filled with it
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create a key for this setup").click()
    key = page.inner_text("#new-key").strip()
    assert key.startswith("cp_")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
    copy = page.locator(".copyable button[data-copy]")
    copy.click()  # the clipboard write is asynchronous: poll for it
    wait_until(page, f"navigator.clipboard.readText().then(text => text === '{key}')")
    assert key in page.inner_text("#code-claude") and key in page.inner_text("#code-opencode")
    assert site.url + "/v1" in page.inner_text("#code-codex")
    shot(page, "setup")

    client = openai.OpenAI(base_url=site.url + "/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": "hi"}], max_tokens=20).usage.total_tokens > 0
    wait_settled(database)

    # three weeks of history, as `codeplan rollup` leaves it in usage_daily, for the chart
    run(query(database, """
        INSERT INTO usage_daily (subscription_id, day, model, requests, prompt_tokens, completion_tokens, billed_tokens)
        SELECT s.id, current_date - d, m.model, 40, 0, 0, (m.scale * (900 + 700 * sin(d / 2.0)))::bigint
          FROM subscriptions s JOIN accounts a ON a.id = s.account_id,
               generate_series(1, 21) d, (VALUES ('glm-4.6', 1.0), ('glm-4.5-air', 0.45)) m(model, scale)
         WHERE a.email = $1 AND d % 7 <> 3""", email))

    # Dashboard: the meter moves by itself after the next request, without a reload
    page.goto(site.url + "/dashboard")
    legend = page.inner_text(".legend")
    assert "glm-4.6" in legend and "glm-4.5-air" in legend
    assert page.locator(".chart rect").count() == 2 * 18 + 1  # 18 past days, two models; today
    page.wait_for_selector("#windows.live")
    page.evaluate("window.__sameDocument = 42")
    before = figure(page, "5h", "used")
    assert before == posted_5h(database, email) > 0
    reset = page.locator('[data-window="5h"] time[data-field="resets_at"]')
    assert not reset.inner_text().endswith("Z")  # shown in the viewer's zone, not as the raw UTC ISO
    requests_before = int(page.inner_text('[data-field="today-requests"]'))
    client.chat.completions.create(model="glm-4.6", max_tokens=900,  # the simulator writes 600 tokens
                                   messages=[{"role": "user", "content": "more please [[sim tokens=600]]"}])
    wait_settled(database)  # settled: the ledger has sent NOTIFY codeplan_usage
    wait_until(page, "Number(document.querySelector('[data-window=\"5h\"] [data-field=\"used\"]')"
                     f".textContent.replace(/\\D/g, '')) > {before}")
    assert page.evaluate("window.__sameDocument") == 42
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert console_errors == []  # nothing blocked by the Content-Security-Policy, no script error
    assert figure(page, "5h", "used") == posted_5h(database, email)
    assert int(page.inner_text('[data-field="today-requests"]')) == requests_before + 1
    # the chart and today's table follow, fetched once the live figures arrived
    wait_until(page, f"document.querySelectorAll('#recent tbody tr').length === {requests_before + 1}")
    assert page.evaluate("window.__sameDocument") == 42
    shot(page, "dashboard")

    # Keys: listed with prefix and name; revoke it, and the bridge refuses it
    page.goto(site.url + "/keys")
    row = page.locator(f'tr[data-prefix="{key[:10]}"]')
    assert "laptop" in row.inner_text() and key not in page.content()
    shot(page, "keys")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_url("**/keys?notice=revoked")
    assert "revoked" in page.locator(f'tr[data-prefix="{key[:10]}"]').inner_text()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}])

    # Plans & billing: the three plans, billing off explained
    page.goto(site.url + "/billing")
    assert page.get_by_text("Billing is off on this server").is_visible()
    shot(page, "billing")

    # Chinese: the switch, remembered
    page.goto(site.url + "/dashboard")
    page.get_by_role("button", name="中文").click()
    page.wait_for_url("**/dashboard")
    assert page.get_attribute("html", "lang") == "zh-CN"
    assert page.get_by_role("heading", name="概览").is_visible()
    page.wait_for_selector("#windows.live")
    shot(page, "dashboard-zh")
    page.goto(site.url + "/keys")
    assert page.get_by_role("heading", name="API 密钥").is_visible()

    # phone width: nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(site.url + "/dashboard")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "dashboard-phone")
    context.close()


def test_first_load_is_under_150_kb(browser, site, smtp):
    context = browser.new_context()
    page = context.new_page()
    sign_up_and_verify(page, site, smtp)
    fresh = browser.new_context(storage_state=context.storage_state())  # a cold cache, the same session
    cold = fresh.new_page()
    cold.goto(site.url + "/dashboard")
    cold.wait_for_load_state("networkidle")
    total = cold.evaluate("""() => performance.getEntriesByType('navigation').concat(
        performance.getEntriesByType('resource')).reduce((sum, e) => sum + e.transferSize, 0)""")
    assert 0 < total < 150 * 1024, total
    context.close()
    fresh.close()


def test_keyboard_users_can_reach_the_content(browser, site):
    page = browser.new_page()
    page.goto(site.url + "/login")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "email"
    page.close()


@pytest.mark.parametrize("lang", ["en-US", "zh-CN"])
def test_no_serious_or_critical_accessibility_violations(browser, site, smtp, axe_script, lang):
    # axe is injected as an inline script, which the pages' Content-Security-Policy forbids
    context = browser.new_context(locale=lang, extra_http_headers={"accept-language": lang}, bypass_csp=True)
    page = context.new_page()
    found = {}
    for path in ("/login", "/signup", "/forgot"):
        page.goto(site.url + path)
        found[path] = _axe(page, axe_script)
    sign_up_and_verify(page, site, smtp, lambda link_page: found.update({"/verify": _axe(link_page, axe_script)}))
    page.goto(site.url + "/keys")
    page.get_by_label("Name" if lang == "en-US" else "名称").fill("a11y")
    page.locator("form.row button[type=submit]").click()
    found["/keys (new key)"] = _axe(page, axe_script)
    for path in ("/dashboard", "/setup", "/billing", "/account", "/no-such-page"):
        page.goto(site.url + path)
        found[path] = _axe(page, axe_script)
    bad = {path: v for path, v in found.items() if v}
    assert not bad, bad
    context.close()


def _axe(page, script: Path) -> list[dict]:
    page.add_script_tag(path=str(script))
    violations = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']}))
        .violations.map(v => ({id: v.id, impact: v.impact, help: v.help, targets: v.nodes.map(n => n.target.join(' '))}))""")
    return [v for v in violations if v["impact"] in ("serious", "critical")]
