"""A stranger's journey on the web page, followed as the page tells it: sign up, open the mailed
link, read Setup, make a key, copy the snippets. Each test here is a defect a review found by
following that journey literally; its docstring says what was wrong.

The browser tests use the browser tests' Chromium fixture (tests/test_web_browser.py) and are
skipped, saying how to enable them, where it is not installed."""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
import uuid

import httpx
import pytest

from service.web import tools

from .conftest import query, run, start_bridge
from .test_web_browser import browser  # noqa: F401 - the browser tests' fixture (skips without Chromium)
from .web_support import PASSWORD, Browserish, SmtpServer, link_in

SECRET = re.compile(r"cp_[A-Za-z0-9_-]{30,}")
AFTER = re.compile(r'name="after" value="(\d*)"')
NO_PLAN = "This account has no plan, so its keys cannot be used yet."
# every test signs up from 127.0.0.1: far more than one address's default share
MANY_SIGNUPS = {"CODEPLAN_SIGNUP_LIMIT": "1000"}


@pytest.fixture(scope="module")
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(database, simulator, smtp):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                          CODEPLAN_SIGNUP_PLAN="lite", CODEPLAN_AUTH_CACHE_TTL="0", **MANY_SIGNUPS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def noplan(database, simulator, smtp):
    """No CODEPLAN_SIGNUP_PLAN: a new account has no plan (and billing is off)."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_SMTP_URL=smtp.url,
                          CODEPLAN_AUTH_CACHE_TTL="0", **MANY_SIGNUPS)
    yield server
    server.stop()


def unique_email() -> str:
    return f"j{uuid.uuid4().hex[:10]}@example.com"


def signed_up(server, smtp) -> tuple[Browserish, str, str]:
    """A browser-like client signed up (not yet verified), its address, and the mailed link."""
    client = Browserish(server.url)
    address = unique_email()
    count = len(smtp.inbox.messages)
    assert client.sign_up(address).url.path == "/welcome"
    return client, address, link_in(smtp.inbox.wait_for(address, after=count))


def block(page: str, element_id: str) -> str:
    """The text of one of the page's <pre> blocks, as a copy button copies it."""
    found = re.search(rf'<pre id="{element_id}"[^>]*><code>(.*?)</code></pre>', page, re.S)
    assert found, element_id
    return html.unescape(found.group(1))


def key_count(database: str, address: str) -> int:
    return run(query(database, "SELECT count(*) AS n FROM api_keys k JOIN accounts a ON a.id = k.account_id"
                               " WHERE a.email = $1", address))[0]["n"]


# ---- without a browser ---------------------------------------------------------------------

def test_claude_code_settings_keep_its_window_within_the_mapped_model(site, smtp, database, simulator, tmp_path):
    """Claude Code set up from the page's settings.json asked for its default model with a
    1,000,000-token window, so it would not compact until long after the bridge refuses prompts
    at glm-4.6's 204,800. The snippet now turns the 1M window off, unless Claude's ids are
    mapped (CODEPLAN_CLAUDE_MODEL) to a model with a 1M window."""
    def claude_env(window):
        return json.loads(next(s for s in tools.snippets("https://c.example", "cp_x", window) if s.id == "claude").text)["env"]
    assert claude_env(204_800)["CLAUDE_CODE_DISABLE_1M_CONTEXT"] == "1"
    assert "CLAUDE_CODE_DISABLE_1M_CONTEXT" not in claude_env(1_000_000)

    client, _, link = signed_up(site, smtp)
    assert client.confirm(link).url.path == "/setup"
    settings = json.loads(block(client.get("/setup").text, "code-claude"))
    assert settings["env"]["CLAUDE_CODE_DISABLE_1M_CONTEXT"] == "1"

    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "glm-5.3"\ndisplay_name = "GLM-5.3"\ncontext_window = 1000000\n'
                      'max_output = 131072\n')
    million = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_MODELS_FILE=str(models),
                           CODEPLAN_CLAUDE_MODEL="glm-5.3", **MANY_SIGNUPS)
    try:
        other = Browserish(million.url)
        assert other.sign_up(unique_email()).url.path == "/setup"  # no mail: no verification
        settings = json.loads(block(other.get("/setup").text, "code-claude"))
        assert "CLAUDE_CODE_DISABLE_1M_CONTEXT" not in settings["env"]
        assert settings["env"]["ANTHROPIC_BASE_URL"] == million.url
    finally:
        million.stop()


def test_a_verify_link_opened_again_says_the_address_is_confirmed(site, smtp, database):
    """A verification link used already (confirmed in another browser, or a second tab's button)
    read "This link is not valid any more. Ask for a new one." though the address was confirmed
    (and asking for a new one led nowhere). A used verify link of a verified account now goes
    where the first confirmation goes, opened or its button pressed again; unknown and expired
    links, and used reset links, are still refused. (Opening a link confirms nothing: a mail
    scanner's fetch is no confirmation, test_account_lifecycle.py.)"""
    client, address, link = signed_up(site, smtp)
    # confirmed from elsewhere (another browser, on the phone), without the owner's session here
    assert Browserish(site.url).confirm(link).url.path == "/login"
    again = client.get(link)
    assert (again.url.path, again.url.params.get("notice")) == ("/setup", "verified"), again.url
    assert "Your address is confirmed." in again.text and "not valid" not in again.text
    pressed = client.post("/verify", {"token": httpx.URL(link).params["token"]})  # a second tab's button
    assert (pressed.url.path, pressed.url.params.get("notice")) == ("/setup", "verified"), pressed.url
    assert "not valid" not in pressed.text
    signed_out = Browserish(site.url).get(link)
    assert signed_out.url.path == "/login" and signed_out.url.params.get("next") == "/setup"
    assert "Your address is confirmed." in signed_out.text and "not valid" not in signed_out.text

    unknown = Browserish(site.url).get("/verify?token=" + "A" * 43)
    assert unknown.status_code == 400 and "not valid" in unknown.text
    run(query(database, "UPDATE mail_tokens SET expires_at = now() - interval '1 minute'"
                        " WHERE purpose = 'verify' AND account_id = (SELECT id FROM accounts WHERE email = $1)",
              address))
    expired = Browserish(site.url).get(link)
    assert expired.status_code == 400 and "not valid" in expired.text

    # a reset link is used once, whatever verify links do
    count = len(smtp.inbox.messages)
    asking = Browserish(site.url)
    asking.get("/forgot")
    asking.post("/forgot", {"email": address})
    reset_link = link_in(smtp.inbox.wait_for(address, subject="Reset", after=count))
    token = httpx.URL(reset_link).params["token"]
    owner = Browserish(site.url)
    owner.get(reset_link)
    assert owner.post("/reset", {"token": token, "password": PASSWORD + "!"}).url.path == "/dashboard"
    replay = Browserish(site.url)
    page = replay.get(reset_link)
    assert page.status_code == 400 and "not valid" in page.text
    refused = replay.post("/reset", {"token": token, "password": PASSWORD + "?"})
    assert refused.status_code == 400 and "not valid" in refused.text


def test_setup_says_the_key_cannot_be_used_without_a_plan(noplan, site, smtp):
    """Without a sign-up plan the newcomer lands on Setup, makes a key and copies the snippets,
    and nothing there said the key could not be used yet (only the Dashboard did). Setup now
    shows the Dashboard's own "No plan yet" notice (one partial, the same words)."""
    client, _, link = signed_up(noplan, smtp)
    setup = client.confirm(link)
    assert setup.url.path == "/setup"
    assert "No plan yet" in setup.text and NO_PLAN in setup.text
    assert "ask the operator to give your account a plan" in setup.text  # billing is off here
    made = client.post("/keys", {"name": "laptop", "then": "setup", "after": AFTER.search(setup.text).group(1)})
    assert SECRET.search(made.text) and NO_PLAN in made.text
    notice = re.compile(r"<p><strong>No plan yet</strong></p>\s*<p>.*?</p>", re.S)
    assert notice.search(setup.text).group(0) == notice.search(client.get("/dashboard").text).group(0)

    with_plan, _, link = signed_up(site, smtp)
    page = with_plan.confirm(link)
    assert page.url.path == "/setup" and "No plan yet" not in page.text and NO_PLAN not in page.text


def test_the_terminal_usage_command_runs_the_script_where_the_page_saved_it(site, smtp, tmp_path):
    """Setup's download line saves the status line script to ~/.claude/codeplan-statusline.py,
    but "Usage in your terminal" ran `python3 codeplan-statusline.py` from wherever the terminal
    was: No such file. Both now use the one path (tools.STATUSLINE_PATH)."""
    client, _, link = signed_up(site, smtp)
    setup = client.confirm(link).text
    page = client.post("/keys", {"name": "terminal", "then": "setup", "after": AFTER.search(setup).group(1)}).text
    download = block(page, "shell-claude")
    terminal = block(page, "code-terminal").splitlines()[0]
    assert tools.STATUSLINE_PATH in download and terminal.endswith(" " + tools.STATUSLINE_COMMAND)
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    (home / ".claude").mkdir(parents=True)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEPLAN_", "ANTHROPIC_"))}
    env["HOME"] = str(home)
    subprocess.run(["bash", "-c", download], env=env, cwd=elsewhere, check=True, timeout=30)
    shown = subprocess.run(["bash", "-c", terminal], env=env, cwd=elsewhere, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "5h" in shown.stdout, (shown.stdout, shown.stderr)


def test_sending_the_create_key_form_again_makes_no_second_key(site, smtp, database):
    """The new key is shown in the answer to the form's POST, so reloading that page sent the
    form again and made a second key. A form now carries the newest key id it was drawn with:
    sent again after it made a key, it leads back to its page, saying no key was made. The key is still
    shown once, in the first answer."""
    client, address, link = signed_up(site, smtp)
    client.confirm(link)
    for page, extra in (("/keys", {}), ("/setup", {"then": "setup"})):
        form = {"name": "once", "after": AFTER.search(client.get(page).text).group(1), **extra}
        first = client.post("/keys", form)
        assert first.status_code == 200 and SECRET.search(first.text)
        again = client.post("/keys", form)  # what a reload of the first answer sends
        assert again.history and again.history[0].status_code == 303 and again.url.path == page
        assert not SECRET.search(again.text) and "No key was made" in again.text  # said, not silent
    assert key_count(database, address) == 2
    # a form drawn after those keys makes one
    fresh = {"name": "third", "after": AFTER.search(client.get("/keys").text).group(1)}
    assert SECRET.search(client.post("/keys", fresh).text)
    assert key_count(database, address) == 3


# ---- in Chromium -----------------------------------------------------------------------------

def browser_sign_up(browser, site, smtp, **options):  # noqa: F811
    """A new context, signed up and verified through the mailed link: (context, page, address)."""
    context = browser.new_context(locale="en-US", **options)
    page = context.new_page()
    address = unique_email()
    count = len(smtp.inbox.messages)
    page.goto(site.url + "/signup")
    page.locator("#email").fill(address)
    page.locator("#password").fill(PASSWORD)
    page.locator("form.stack button[type=submit]").click()
    page.wait_for_url("**/welcome")
    page.goto(link_in(smtp.inbox.wait_for(address, after=count)))
    page.get_by_role("button", name="Confirm my address").click()
    page.wait_for_url("**/setup?notice=verified")
    return context, page, address


def make_key_on_setup(page) -> str:
    page.get_by_label("Name").fill("phone")
    page.get_by_role("button", name="Create a key for this setup").click()
    page.wait_for_load_state()
    return page.inner_text("#new-key").strip()


def overflow(page) -> tuple[list[int], list[str]]:
    """The document's and the window's widths, and what sticks out on the right."""
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e =>
        e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 8)
        .map(e => e.tagName + '.' + e.className + ':' + Math.round(e.getBoundingClientRect().right))""")
    return widths, wide


PHONE = {"viewport": {"width": 390, "height": 844}}


def test_setup_fits_a_phone_with_a_new_key(browser, site, smtp):  # noqa: F811
    """On a 390 px phone, Setup scrolled sideways: the Cline and Roo field tables kept the
    base URL and the key on one line (th, td {white-space: nowrap}). Their values now wrap."""
    context, page, _ = browser_sign_up(browser, site, smtp, **PHONE)
    try:
        make_key_on_setup(page)
        widths, wide = overflow(page)
        assert widths[0] <= widths[1], (widths, wide)
    finally:
        context.close()


def test_keys_fits_a_phone_once_a_key_exists(browser, site, smtp):  # noqa: F811
    """On a phone, Keys scrolled sideways once a key existed: the visually hidden "Revoke" header
    was positioned against the page, not its scroll box, and stuck out past the screen's edge.
    It is now a 1 px clipped box inside a positioned .scroll."""
    context, page, _ = browser_sign_up(browser, site, smtp, **PHONE)
    try:
        make_key_on_setup(page)
        page.goto(site.url + "/keys")
        assert page.locator("table.keys tbody tr").count() == 1
        widths, wide = overflow(page)
        assert widths[0] <= widths[1], (widths, wide)
    finally:
        context.close()


def test_reloading_the_new_key_page_makes_no_second_key(browser, site, smtp, database):  # noqa: F811
    """Reloading the page that shows a new key sent the form again and made a second key; now
    it lands back on Setup, saying no key was made: the key made once."""
    context, page, address = browser_sign_up(browser, site, smtp)
    try:
        secret = make_key_on_setup(page)
        assert SECRET.fullmatch(secret)
        page.reload()
        page.wait_for_load_state()
        assert page.url == site.url + "/setup?notice=key_form_spent" and page.locator("#new-key").count() == 0
        assert "No key was made" in page.content()
        assert secret not in page.content()
        assert key_count(database, address) == 1
    finally:
        context.close()
