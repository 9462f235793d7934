"""The web page's HTTP routes: thin adapters between forms, the logic modules and templates."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import asyncpg
import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from bridge import models as bridge_models

from ..billing.sessions import BillingError
from ..config import WILDCARD_HOSTS
from . import apikeys, dashboard, i18n, identity, sessions, tools
from .mail import Letter, MailError

if TYPE_CHECKING:
    from . import Web

log = logging.getLogger("codeplan.web")
T = TypeVar("T")
STATUSLINE_SCRIPT = Path(__file__).resolve().parent.parent / "statusline.py"


# ---- plumbing --------------------------------------------------------------------------

class GoTo(Exception):
    """Leave this page for another (a redirect, 303 so a POST becomes a GET)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class BadForm(HTTPException):
    status_code = 400


def _web(request: Request) -> "Web":
    return request.app.state.web


def _pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


def language(request: Request) -> str:
    return i18n.choose(request.cookies.get(i18n.COOKIE), request.headers.get("accept-language"))


def safe_next(target: str | None, default: str = "/dashboard") -> str:
    """Only a path on this site: never `//evil.example` or an absolute URL."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or len(target) > 500:
        return default
    return target


async def viewer_of(request: Request) -> sessions.Viewer | None:
    """Who is signed in, looked up once per request."""
    if not hasattr(request.state, "viewer"):
        request.state.viewer = await sessions.lookup(_pool(request), request.cookies.get(sessions.COOKIE))
    return request.state.viewer


async def require(request: Request, *, verified: bool = True) -> sessions.Viewer:
    viewer = await viewer_of(request)
    if viewer is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise GoTo("/login?next=" + quote(here, safe="/"))
    if verified and _web(request).mailer.enabled and not viewer.verified:
        raise GoTo("/welcome")
    return viewer


# Our own script and styles only (the meters' widths are style attributes); no framing, so no
# click-jacking of the revoke buttons; the Referer never leaves the site (reset links carry a token).
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; object-src 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def render(request: Request, template: str, *, viewer: sessions.Viewer | None, status: int = 200,
           cookies: list[Cookie] | None = None, headers: dict[str, str] | None = None, **context: Any) -> Template:
    lang = language(request)
    web = _web(request)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return Template(
        template_name=template, status_code=status, cookies=cookies or [],
        headers={**PAGE_HEADERS, "content-language": "zh-CN" if lang == "zh" else "en", **(headers or {})},
        context={"_": i18n.translator(lang), "lang": lang, "viewer": viewer, "here": here,
                 "mail_enabled": web.mailer.enabled, "asset_version": web.asset_version,
                 "base_url": public_base(request), "billing_on": _billing(request) is not None,
                 "notice": context.pop("notice", None), "error": context.pop("error", None), **context})


class FormRequest(Request):
    """Litestar's request, whose form answers a part it cannot decode (bytes not in the part's
    charset, a charset Python does not know or cannot name) with a 400 where Litestar raised (a
    500): the CSRF
    middleware reads every page's form before a handler runs (the app's `request_class`)."""

    async def form(self):  # type: ignore[override]
        try:
            return await super().form()
        except KeyError:
            raise
        except (ValueError, LookupError):  # UnicodeError is a ValueError; LookupError: no such charset
            raise BadForm(detail="The form could not be decoded.") from None


async def form_of(request: Request, shape: type[T]) -> T:
    data = await request.form()
    raw = {}
    for name in shape.__struct_fields__:  # type: ignore[attr-defined]
        value = data.get(name)
        if isinstance(value, str):
            if "\x00" in value:  # no text column takes it; nobody types it
                raise BadForm(detail="The request was not understood.")
            raw[name] = value
    try:
        return msgspec.convert(raw, shape)
    except msgspec.ValidationError:
        raise BadForm(detail="The request was not understood.") from None


def public_base(request: Request) -> str:
    """The URL shown on our pages: CODEPLAN_PUBLIC_URL, else HOST:PORT, else (when we listen on
    every address, 0.0.0.0) the host the browser used. Only for the page this browser reads:
    mailed links use the configured base URL alone (see _mail_link)."""
    config = _web(request).config
    if not config.public_url and config.host in WILDCARD_HOSTS:
        return f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc}"
    return config.base_url


def _secure(request: Request) -> bool:
    return _web(request).config.base_url.startswith("https://")


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _billing(request: Request) -> Any:
    return getattr(request.app.state, "billing", None)


# ---- forms -----------------------------------------------------------------------------

class Credentials(msgspec.Struct):
    email: str = ""
    password: str = ""
    next: str = ""


class EmailForm(msgspec.Struct):
    email: str = ""


class TokenForm(msgspec.Struct):
    token: str = ""


class ResetForm(msgspec.Struct):
    token: str = ""
    password: str = ""


class PasswordChange(msgspec.Struct):
    current: str = ""
    password: str = ""


class EmailChangeForm(msgspec.Struct):
    email: str = ""
    password: str = ""  # the current one


class CloseForm(msgspec.Struct):
    password: str = ""
    confirm: str = ""  # the account's address, typed


class KeyForm(msgspec.Struct):
    name: str = ""
    then: str = "keys"
    # the account's newest key id when the form was drawn (see create_key); empty: not checked
    after: str = ""


class PlanForm(msgspec.Struct):
    plan: str = ""


class TopupForm(msgspec.Struct):
    block: str = ""


class LanguageForm(msgspec.Struct):
    lang: str = "en"
    next: str = "/"


_REFUSALS = {
    # (a real address in another script is refused too: say what is taken, not "not an address")
    "bad_email": "Enter one email address in plain ASCII letters, such as name@example.com.",
    "too_short": "The password needs at least 10 characters.",
    "too_long": "That password is too long.",
    "exists": "An account with this email exists already. Log in, or reset its password.",
    "bad_credentials": "Wrong email or password.",
    "bad_link": "This link is not valid any more. Ask for a new one.",
    "wrong_password": "The current password is wrong.",
    "same_email": "That is this account's address already.",
    "email_taken": "Another account uses this address already.",
    "email_taken_since": "This address belongs to another account now: it was taken after the link was sent. "
                         "Your address is unchanged.",
    "mail_limit": "Too many mails were sent in the last hour. Try again later.",
    "confirm_mismatch": "Type this account's email address to confirm.",
    "stripe_live": "This account's plan is paid through Stripe: cancel it in the billing portal first "
                   "(Plans & billing), then close the account.",
}
# the status a refusal answers with, when not 400
_REFUSAL_STATUS = {"throttled": 429, "signup_throttled": 429, "mail_limit": 429, "stripe_live": 409,
                   "email_taken_since": 409}


def _refusal_text(request: Request, refusal: identity.Refusal) -> str:
    _ = i18n.translator(language(request))
    if refusal.code == "throttled":
        minutes = max(1, -(-(refusal.retry_after or 60) // 60))
        return _("Too many failed attempts. Try again in {minutes} minutes.").format(minutes=minutes)
    if refusal.code == "signup_throttled":
        minutes = max(1, -(-(refusal.retry_after or 60) // 60))
        return _("Too many sign-ups from your address. Try again in {minutes} minutes.").format(minutes=minutes)
    return _(_REFUSALS.get(refusal.code, "The request was not understood."))


def _letter(_: Any, base: str, account: identity.Account, purpose: str, token: str) -> Letter:
    """The verify or reset mail for `token`, in the language `_` translates to."""
    if purpose == "verify":
        link = f"{base}/verify?token={token}"
        subject = _("Check your mail") + " · Codeplan"
        body = (f"{_('We sent a link to {email}. Open it to confirm your address; it is valid for 48 hours.').format(email=account.email)}\n\n{link}\n")
    else:
        link = f"{base}/reset?token={token}"
        subject = _("Reset your password") + " · Codeplan"
        body = f"{_('Set a new password')}:\n\n{link}\n"
    return Letter(to=account.email, subject=subject, body=body, link=link)


async def _send_link(pool: asyncpg.Pool, web: "Web", lang: str, account: identity.Account,
                     purpose: str) -> str | None:
    """Send a verify or reset link; returns a notice code when it could not go."""
    token = await identity.issue_link(pool, account.id, purpose)
    if token is None:
        return "mail_limit"
    # never the request's Host header: a forged one would mail the owner a link to its sender
    # (config refuses SMTP on every address without CODEPLAN_PUBLIC_URL)
    try:
        await web.mailer.send(_letter(i18n.translator(lang), web.config.base_url, account, purpose, token))
    except MailError:
        # a link nobody received does not count against the hour's mails (MAILS_PER_HOUR)
        try:
            await identity.withdraw_link(pool, token)
        except (OSError, asyncpg.PostgresError) as exc:  # it then counts, as before: the page still answers
            log.warning("unsent link not taken back", extra={"account": account.id, "error": type(exc).__name__})
        return "mail_failed"
    return None


def _change_letter(_: Any, base: str, change: identity.EmailChange) -> Letter:
    """The link that confirms a new address, mailed to that address."""
    link = f"{base}/email/confirm?token={change.token}"
    text = _("Someone asked to make {email} the address of a Codeplan account. Open the link and confirm to do so; it is valid for 48 hours. If it was not you, ignore this mail: nothing changes.")
    return Letter(to=change.new_email, subject=_("Confirm your new address") + " · Codeplan",
                  body=f"{text.format(email=change.new_email)}\n\n{link}\n", link=link)


def _changing_letter(_: Any, base: str, change: identity.EmailChange) -> Letter:
    """The notice to the old address: no link that acts, only where to change the password."""
    text = _("Your Codeplan account's address is being changed to {email}: it changes once a link mailed there is confirmed. If this wasn't you, change your password now and sign out every other browser, on the Account page:")
    return Letter(to=change.old_email, subject=_("Your address is being changed") + " · Codeplan",
                  body=f"{text.format(email=change.new_email)}\n\n{base}/account\n", link="")


def _closed_letter(_: Any, closed: identity.Closed) -> Letter:
    text = _("Your Codeplan account ({email}) is closed: its API keys no longer work, every browser is signed out, and the address is free for a new account. If this wasn't you, write to the operator of this service.")
    return Letter(to=closed.email, subject=_("Your account is closed") + " · Codeplan",
                  body=f"{text.format(email=closed.email)}\n", link="")


async def _notify(web: "Web", letter: Letter, account_id: int) -> None:
    """A notice (no link): sent after the page's answer; a failure is logged, nothing else."""
    try:
        await web.mailer.send(letter)
    except MailError:
        log.warning("notice mail not sent", extra={"account": account_id})


async def _mail_link(request: Request, account: identity.Account, purpose: str) -> str | None:
    return await _send_link(_pool(request), _web(request), language(request), account, purpose)


async def _mail_reset(pool: asyncpg.Pool, web: "Web", lang: str, email: str) -> None:
    """/forgot's work, after its answer: a reset link to the account of `email`, if it has one
    (and its mails for the hour are not spent)."""
    account = await identity.find(pool, email)
    if account is not None and await _send_link(pool, web, lang, account, "reset") == "mail_failed":
        # the mailer logged why; the token is not logged
        log.warning("reset mail not sent", extra={"account": account.id})


# ---- pages: accounts -------------------------------------------------------------------

@get("/", include_in_schema=False)
async def home(request: Request) -> Redirect:
    return Redirect("/dashboard" if await viewer_of(request) else "/login", status_code=303)


@get("/signup")
async def signup_page(request: Request) -> Template:
    return render(request, "signup.html", viewer=await viewer_of(request), email="")


@post("/signup", status_code=200)
async def signup(request: Request) -> Template | Redirect:
    form = await form_of(request, Credentials)
    web = _web(request)
    try:
        account = await identity.sign_up(
            _pool(request), form.email, form.password, web.config.signup_plan,
            identity.SignupLimit(_address(request), web.config.signup_limit, web.config.signup_window))
    except identity.Refusal as refusal:
        if refusal.code == "signup_throttled":
            log.warning("sign-ups throttled", extra={"address": _address(request)})
            return render(request, "signup.html", viewer=None, status=429, email=form.email,
                          headers={"retry-after": str(refusal.retry_after)}, error=_refusal_text(request, refusal))
        return render(request, "signup.html", viewer=None, status=400, email=form.email,
                      error=_refusal_text(request, refusal))
    token = await sessions.create(_pool(request), account.id, account.proven_by)
    if token is None:  # its password changed already (a reset link mailed to the address)
        return Redirect("/login", status_code=303)
    problem = await _mail_link(request, account, "verify")
    log.info("account signed up", extra={"account": account.id})
    target = "/welcome" if web.mailer.enabled else "/setup"
    if problem:
        target += f"?notice={problem}"
    return Redirect(target, status_code=303, cookies=[sessions.cookie(token, secure=_secure(request))])


@get("/login")
async def login_page(request: Request, next: FromQuery[str] = "", notice: FromQuery[str] = "") -> Template:
    return render(request, "login.html", viewer=await viewer_of(request), email="", next=safe_next(next),
                  notice=notice or None)


@post("/login", status_code=200)
async def login(request: Request) -> Template | Redirect:
    form = await form_of(request, Credentials)
    try:
        account = await identity.log_in(_pool(request), form.email, form.password, _address(request))
    except identity.Refusal as refusal:
        status = 429 if refusal.code == "throttled" else 400
        return render(request, "login.html", viewer=None, status=status, email=form.email,
                      next=safe_next(form.next), error=_refusal_text(request, refusal))
    old = await viewer_of(request)
    if old is not None:
        await sessions.end(_pool(request), old)
    token = await sessions.create(_pool(request), account.id, account.proven_by)
    if token is None:  # the password was reset or changed while it was checked: it is wrong now
        return render(request, "login.html", viewer=None, status=400, email=form.email, next=safe_next(form.next),
                      error=_refusal_text(request, identity.Refusal("bad_credentials")))
    return Redirect(safe_next(form.next), status_code=303, cookies=[sessions.cookie(token, secure=_secure(request))])


@post("/logout", status_code=200)
async def logout(request: Request) -> Redirect:
    viewer = await viewer_of(request)
    if viewer is not None:
        await sessions.end(_pool(request), viewer)
    return Redirect("/login", status_code=303, cookies=[sessions.cleared(secure=_secure(request))])


@get("/welcome")
async def welcome(request: Request, notice: FromQuery[str] = "") -> Template | Redirect:
    viewer = await require(request, verified=False)
    if viewer.verified or not _web(request).mailer.enabled:
        return Redirect("/dashboard", status_code=303)
    return render(request, "welcome.html", viewer=viewer, notice=notice or None)


@post("/verify/resend", status_code=200)
async def resend(request: Request) -> Redirect:
    viewer = await require(request, verified=False)
    problem = await _mail_link(request, identity.Account(viewer.account_id, viewer.email, viewer.verified), "verify")
    return Redirect(f"/welcome?notice={problem or 'mail_sent'}", status_code=303)


@get("/verify")
async def verify_page(request: Request, token: FromQuery[str] = "") -> Template | Redirect:
    """The mailed link's page: a button that confirms (a POST). Opening the link changes nothing,
    so a mail scanner or a link preview that fetches it confirms no address."""
    email = await identity.verify_link_email(_pool(request), token)
    if email is not None:
        return render(request, "verify.html", viewer=await viewer_of(request), token=token, email=email)
    return await _verified_by(request, await identity.verified_by_link(_pool(request), token))


@post("/verify", status_code=200)
async def verify(request: Request) -> Template | Redirect:
    form = await form_of(request, TokenForm)
    account_id = await identity.verify(_pool(request), form.token)
    if account_id is None:
        # confirmed already (another tab, another browser): the address is confirmed, no error
        account_id = await identity.verified_by_link(_pool(request), form.token)
    return await _verified_by(request, account_id)


async def _verified_by(request: Request, account_id: int | None) -> Template | Redirect:
    if account_id is None:
        return render(request, "message.html", viewer=await viewer_of(request), status=400,
                      title="Check your mail", error=_refusal_text(request, identity.Refusal("bad_link")))
    viewer = await viewer_of(request)
    if viewer is None or viewer.account_id != account_id:
        return Redirect("/login?next=/setup&notice=verified", status_code=303)
    return Redirect("/setup?notice=verified", status_code=303)


@get("/forgot")
async def forgot_page(request: Request) -> Template:
    return render(request, "forgot.html", viewer=await viewer_of(request), email="", sent=False)


@post("/forgot", status_code=200)
async def forgot(request: Request) -> Template:
    form = await form_of(request, EmailForm)
    # the same answer, at the same time, whether the account exists or not and whether its mail
    # goes: the form must not tell who has one, so the lookup and the mail run after the answer
    _web(request).in_background(_mail_reset(_pool(request), _web(request), language(request), form.email),
                                "reset mail")
    return render(request, "forgot.html", viewer=await viewer_of(request), email=form.email.strip(), sent=True)


@get("/reset")
async def reset_page(request: Request, token: FromQuery[str] = "") -> Template:
    valid = await identity.link_account(_pool(request), token, "reset") is not None
    return render(request, "reset.html", viewer=await viewer_of(request), token=token if valid else "",
                  status=200 if valid else 400,
                  error=None if valid else _refusal_text(request, identity.Refusal("bad_link")))


@post("/reset", status_code=200)
async def reset(request: Request) -> Template | Redirect:
    form = await form_of(request, ResetForm)
    try:
        account = await identity.reset_password(_pool(request), form.token, form.password)
    except identity.Refusal as refusal:
        return render(request, "reset.html", viewer=None, status=400,
                      token=form.token if refusal.code != "bad_link" else "",
                      error=_refusal_text(request, refusal))
    token = await sessions.create(_pool(request), account.id, account.proven_by)
    if token is None:  # another reset or change came after this one: it signs in there, not here
        return Redirect("/login", status_code=303)
    return Redirect("/dashboard?notice=password_set", status_code=303,
                    cookies=[sessions.cookie(token, secure=_secure(request))])


# ---- pages: the account ----------------------------------------------------------------

async def _account(request: Request, viewer: sessions.Viewer, *, status: int = 200, **context: Any) -> Template:
    return render(request, "account.html", viewer=viewer, nav="account", status=status,
                  others=await sessions.others(_pool(request), viewer), **context)


@get("/account")
async def account_page(request: Request, notice: FromQuery[str] = "") -> Template:
    viewer = await require(request, verified=False)
    return await _account(request, viewer, notice=notice or None)


@post("/account/password", status_code=200)
async def change_password(request: Request) -> Template | Redirect:
    viewer = await require(request, verified=False)
    form = await form_of(request, PasswordChange)
    try:
        await identity.change_password(_pool(request), viewer, form.current, form.password, _address(request))
    except identity.Refusal as refusal:
        status = 429 if refusal.code == "throttled" else 400
        return await _account(request, viewer, status=status, error=_refusal_text(request, refusal),
                              headers={"retry-after": str(refusal.retry_after)} if refusal.retry_after else None)
    log.info("password changed on the web", extra={"account": viewer.account_id})
    return Redirect("/account?notice=password_changed", status_code=303)


async def _refused(request: Request, viewer: sessions.Viewer, refusal: identity.Refusal, **context: Any) -> Template:
    return await _account(request, viewer, status=_REFUSAL_STATUS.get(refusal.code, 400),
                          error=_refusal_text(request, refusal),
                          headers={"retry-after": str(refusal.retry_after)} if refusal.retry_after else None,
                          **context)


@post("/account/email", status_code=200)
async def change_email(request: Request) -> Template | Redirect:
    """Ask to move the account to a new address: a link to it, a notice to the old one. Nothing
    changes until the link is confirmed (confirm_email_change_page, confirm_email_change)."""
    viewer = await require(request, verified=False)
    form = await form_of(request, EmailChangeForm)
    web = _web(request)
    try:
        change = await identity.change_email(
            _pool(request), viewer, form.email, form.password, _address(request),
            identity.SignupLimit(_address(request), web.config.signup_limit, web.config.signup_window))
    except identity.Refusal as refusal:
        return await _refused(request, viewer, refusal, email_typed=form.email.strip()[:320])
    _ = i18n.translator(language(request))
    # never the request's Host header: the configured base URL, as for every mailed link
    try:
        await web.mailer.send(_change_letter(_, web.config.base_url, change))
    except MailError:
        # nobody received it: it does not count against the hour's mails, and nothing is announced
        try:
            await identity.withdraw_link(_pool(request), change.token)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("unsent link not taken back", extra={"account": viewer.account_id,
                                                              "error": type(exc).__name__})
        return Redirect("/account?notice=mail_failed", status_code=303)
    web.in_background(_notify(web, _changing_letter(_, web.config.base_url, change), viewer.account_id),
                      "address change notice")
    log.info("address change asked on the web", extra={"account": viewer.account_id})
    return Redirect(f"/account?notice={'email_link_sent' if web.mailer.enabled else 'email_link_logged'}",
                    status_code=303)


@get("/email/confirm")
async def confirm_email_change_page(request: Request, token: FromQuery[str] = "") -> Template:
    """The mailed link's page: a button that confirms (a POST). Opening the link changes nothing,
    so a mail scanner or a link preview that fetches it moves no account."""
    email = await identity.email_change_target(_pool(request), token)
    if email is None:
        return render(request, "message.html", viewer=await viewer_of(request), status=400,
                      title="Confirm your new address", error=_refusal_text(request, identity.Refusal("bad_link")))
    return render(request, "email_confirm.html", viewer=await viewer_of(request), token=token, email=email)


@post("/email/confirm", status_code=200)
async def confirm_email_change(request: Request) -> Template | Redirect:
    form = await form_of(request, TokenForm)
    try:
        account_id = await identity.confirm_email_change(_pool(request), form.token)
    except identity.Refusal as refusal:
        return render(request, "message.html", viewer=await viewer_of(request),
                      status=_REFUSAL_STATUS.get(refusal.code, 400), title="Confirm your new address",
                      error=_refusal_text(request, refusal))
    log.info("address changed on the web", extra={"account": account_id})
    viewer = await viewer_of(request)
    if viewer is None or viewer.account_id != account_id:
        return Redirect("/login?next=/account&notice=email_changed", status_code=303)
    return Redirect("/account?notice=email_changed", status_code=303)


@post("/account/close", status_code=200)
async def close_account(request: Request) -> Template:
    """Close the account for good (identity.close_account); this browser is signed out and told so."""
    viewer = await require(request, verified=False)
    form = await form_of(request, CloseForm)
    try:
        closed = await identity.close_account(_pool(request), viewer, form.password, form.confirm, _address(request))
    except identity.Refusal as refusal:
        return await _refused(request, viewer, refusal)
    log.info("account closed on the web", extra={"account": closed.account_id})
    web = _web(request)
    web.in_background(_notify(web, _closed_letter(i18n.translator(language(request)), closed), closed.account_id),
                      "closed account notice")
    return render(request, "closed.html", viewer=None, cookies=[sessions.cleared(secure=_secure(request))])


@post("/account/sessions/end", status_code=200)
async def end_other_sessions(request: Request) -> Redirect:
    viewer = await require(request, verified=False)
    ended = await sessions.end_others(_pool(request), viewer)
    log.info("other sessions ended on the web", extra={"account": viewer.account_id, "sessions": ended})
    return Redirect("/account?notice=signed_out_others", status_code=303)


# a language cookie is harmless to set from anywhere, and error pages carry no CSRF token
@post("/lang", status_code=200, exclude_from_csrf=True)
async def switch_language(request: Request) -> Redirect:
    form = await form_of(request, LanguageForm)
    lang = form.lang if form.lang in i18n.LANGS else "en"
    return Redirect(safe_next(form.next, "/"), status_code=303, cookies=[
        Cookie(key=i18n.COOKIE, value=lang, path="/", max_age=365 * 86400, samesite="lax",
               secure=_secure(request), httponly=True)])


# ---- pages: the product ----------------------------------------------------------------

@get("/dashboard")
async def dashboard_page(request: Request, notice: FromQuery[str] = "") -> Template:
    viewer = await require(request)
    data = await dashboard.load(_pool(request), viewer.account_id)
    return render(request, "dashboard.html", viewer=viewer, nav="dashboard", data=data, notice=notice or None)


@get("/dashboard/activity")
async def dashboard_activity(request: Request) -> Template:
    """The chart and today's requests alone: the page fetches them when a live update arrives."""
    viewer = await require(request)
    data = await dashboard.load(_pool(request), viewer.account_id)
    return render(request, "activity.html", viewer=viewer, data=data)


def _newest(keys: list[apikeys.KeyRow]) -> int:
    """The stamp of a key form: the id of the account's newest key (revoked ones too), 0 for none."""
    return max((k.id for k in keys), default=0)


def _keys(request: Request, viewer: sessions.Viewer, keys: list[apikeys.KeyRow], *, status: int = 200,
          created: apikeys.CreatedKey | None = None, **context: Any) -> Template:
    return render(request, "keys.html", viewer=viewer, nav="keys", status=status, keys=keys, created=created,
                  newest_key=_newest(keys), **context)


@get("/keys")
async def keys_page(request: Request, notice: FromQuery[str] = "") -> Template:
    viewer = await require(request)
    return _keys(request, viewer, await apikeys.listing(_pool(request), viewer.account_id), notice=notice or None)


@post("/keys", status_code=200)
async def create_key(request: Request) -> Template:
    viewer = await require(request)
    form = await form_of(request, KeyForm)
    # The new key is shown in this POST's answer, once: reloading that answer sends the form
    # again. A form carries the newest key id it was drawn with; once a key has been made since,
    # it is spent, and sending it again leads back to its page, saying so (no second key). (Two forms sent
    # at the same moment may both make a key, as two clicks would.)
    if form.after and form.after != str(_newest(await apikeys.listing(_pool(request), viewer.account_id))):
        # said, not silent: it may be a form of another tab, sent on purpose (then: once more)
        raise GoTo(f"/{'setup' if form.then == 'setup' else 'keys'}?notice=key_form_spent")
    try:
        created = await apikeys.create(_pool(request), viewer.account_id, form.name)
    except apikeys.KeyRefusal as refusal:
        if refusal.code == "account_closed":  # closed in another tab since `require`: signed out
            raise GoTo(f"/login?next=/{'setup' if form.then == 'setup' else 'keys'}") from None
        return _keys(request, viewer, await apikeys.listing(_pool(request), viewer.account_id), status=409,
                     error=i18n.translator(language(request))("This account has too many keys. Revoke one first."))
    log.info("key created on the web", extra={"account": viewer.account_id, "prefix": created.prefix})
    if form.then == "setup":
        return await _setup(request, viewer, created)
    return _keys(request, viewer, await apikeys.listing(_pool(request), viewer.account_id), created=created)


@post("/keys/{key_id:int}/revoke", status_code=200)
async def revoke_key(request: Request, key_id: FromPath[int]) -> Redirect:
    viewer = await require(request)
    done = await apikeys.revoke(_pool(request), viewer.account_id, key_id)
    if done:
        log.info("key revoked on the web", extra={"account": viewer.account_id, "key": key_id})
    return Redirect(f"/keys?notice={'revoked' if done else 'not_revoked'}", status_code=303)


async def _setup(request: Request, viewer: sessions.Viewer, created: apikeys.CreatedKey | None,
                 notice: str | None = None) -> Template:
    base = public_base(request)
    pool = _pool(request)
    # Codex speaks only the Responses API: say so while this server does not serve it
    responses = any(route.path == "/v1/responses" for route in request.app.routes)
    # what Claude Code's own model ids are served by: its window decides Claude Code's settings
    claude = bridge_models.CATALOG.get(_web(request).config.claude_model.lower())
    return render(request, "setup.html", viewer=viewer, nav="setup", created=created, notice=notice,
                  responses_served=responses,
                  has_plan=await dashboard.subscription(pool, viewer.account_id) is not None,
                  newest_key=None if created else _newest(await apikeys.listing(pool, viewer.account_id)),
                  snippets=tools.snippets(base, created.secret if created else None,
                                          claude.context_window if claude else None),
                  placeholder=tools.PLACEHOLDER, statusline_command=tools.STATUSLINE_COMMAND)


@get("/setup")
async def setup_page(request: Request, notice: FromQuery[str] = "") -> Template:
    viewer = await require(request)
    return await _setup(request, viewer, None, notice or None)


@get("/setup/statusline.py", media_type="text/x-python")
async def statusline_script() -> Response:
    return Response(STATUSLINE_SCRIPT.read_bytes(), media_type="text/x-python; charset=utf-8",
                    headers={"content-disposition": 'attachment; filename="codeplan-statusline.py"'})


class PaymentProblem(msgspec.Struct):
    """A Stripe subscription whose payment failed, as the billing page says it: the 402 every
    tool then gets sends its user here."""
    refused: bool  # its grace is over: every request is refused
    grace_until: str | None
    pay_url: str | None  # the open invoice's hosted page


async def _payment_problem(billing, account_id: int) -> PaymentProblem | None:
    try:
        state = await billing.state(account_id)
    except Exception as exc:  # noqa: BLE001 - the page is shown without it
        log.warning("billing state unavailable", extra={"account": account_id, "error": type(exc).__name__})
        return None
    sub = state.subscription
    if sub is None or (sub.stripe_status not in ("past_due", "unpaid") and sub.refusal not in ("past_due", "unpaid")):
        return None
    pay = next((i.hosted_invoice_url for i in state.invoices if i.status == "open" and i.hosted_invoice_url), None)
    return PaymentProblem(refused=sub.refusal is not None, grace_until=sub.grace_until, pay_url=pay)


@get(["/billing", "/plans"])
async def billing_page(request: Request, notice: FromQuery[str] = "", checkout: FromQuery[str] = "") -> Template:
    viewer = await require(request)
    billing = _billing(request)
    return render(request, "billing.html", viewer=viewer, nav="billing",
                  payment=await _payment_problem(billing, viewer.account_id) if billing else None,
                  notice=notice or ("paid" if checkout == "success" else None),
                  plans=await dashboard.plans(_pool(request), viewer.account_id),
                  current=await dashboard.subscription(_pool(request), viewer.account_id),
                  topup_blocks=list(getattr(billing, "topup_blocks", ()) or ()) if billing else [])


async def _billing_url(request: Request, action: str, *args: object) -> Redirect:
    viewer = await require(request)
    billing = _billing(request)
    if billing is None:
        return Redirect("/billing?notice=billing_off", status_code=303)
    try:
        url = getattr(billing, action)(viewer.account_id, *args)
        if inspect.isawaitable(url):
            url = await url
    except BillingError as exc:
        if exc.kind == "suspended":  # the one refusal the page names: nothing else would help
            return Redirect("/billing?notice=suspended", status_code=303)
        log.warning("billing refused", extra={"action": action, "account": viewer.account_id, "kind": exc.kind})
        return Redirect("/billing?notice=billing_failed", status_code=303)
    except Exception as exc:  # noqa: BLE001 - whatever billing raises, the page says it failed
        log.error("billing call failed", extra={"action": action, "account": viewer.account_id,
                                                "error": type(exc).__name__})
        return Redirect("/billing?notice=billing_failed", status_code=303)
    return Redirect(str(url), status_code=303)


@post("/billing/checkout", status_code=200)
async def billing_checkout(request: Request) -> Redirect:
    form = await form_of(request, PlanForm)
    return await _billing_url(request, "checkout", form.plan)


@post("/billing/portal", status_code=200)
async def billing_portal(request: Request) -> Redirect:
    return await _billing_url(request, "portal")


@post("/billing/topup", status_code=200)
async def billing_topup(request: Request) -> Redirect:
    form = await form_of(request, TopupForm)
    return await _billing_url(request, "topup", form.block)


# `home` shares the path "/" with the bridge's HEAD probe, so it is registered on the app itself:
# Litestar cannot merge one path from two routers
routes = [signup_page, signup, login_page, login, logout, welcome, resend, verify_page, verify, forgot_page,
          forgot, reset_page, reset, account_page, change_password, end_other_sessions, change_email,
          confirm_email_change_page, confirm_email_change, close_account, switch_language,
          dashboard_page, dashboard_activity, keys_page, create_key, revoke_key,
          setup_page, statusline_script, billing_page, billing_checkout, billing_portal, billing_topup]
