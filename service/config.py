"""Configuration: CODEPLAN_* environment variables parsed into one msgspec Struct.

A bad value stops start-up with one line naming the variable, never a traceback.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import urllib.parse
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, Mapping

import msgspec

from bridge import upstreams
from bridge.settings import BridgeSettings
from bridge.upstreams import ProfileConfig

from .credits import DEFAULT_MODELS, ModelConfig, ModelsFile

PREFIX = "CODEPLAN_"
# Stripe's own tools (the CLI, the dashboard's snippets) name these two; they keep their names.
ENV_NAMES = {"stripe_secret_key": "STRIPE_SECRET_KEY", "stripe_webhook_secrets": "STRIPE_WEBHOOK_SECRET"}
SECRET_FIELDS = {"upstream_keys", "stripe_secret_key", "stripe_webhook_secrets", "secret_key", "smtp_url",
                 "admin_token"}

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
# CODEPLAN_HOST values that listen on every address
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
Cents = Annotated[int, msgspec.Meta(ge=0)]


def env_name(field: str) -> str:
    """The environment variable a Config field is read from."""
    return ENV_NAMES.get(field, PREFIX + field.upper())


class PlanPrice(msgspec.Struct, frozen=True):
    """What a plan costs on Stripe, in the smallest unit of the currency (cents)."""
    plan: str
    monthly: Cents
    yearly: Cents | None = None


class TopupBlock(msgspec.Struct, frozen=True):
    """A block of tokens sold once (Checkout in payment mode), spent after a window is exhausted."""
    tokens: Annotated[int, msgspec.Meta(gt=0)]
    price: Annotated[int, msgspec.Meta(gt=0)]

    @property
    def id(self) -> str:
        return str(self.tokens)


class Config(msgspec.Struct, kw_only=True, frozen=True):
    # Empty means: start the embedded PostgreSQL with its data in `data_dir`.
    database_url: str = ""
    data_dir: str = ".codeplan"
    host: str = "127.0.0.1"
    port: Port = 8080
    # Empty means: start the built-in GLM simulator and forward to it.
    upstream_url: str = ""
    upstream_keys: tuple[str, ...] = ()
    upstream_timeout: Seconds = 600.0
    # requests in flight per upstream key at most (Z.ai caps it, 1302); 0 is no cap
    upstream_concurrency: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    # ask the upstream for stream usage (stream_options.include_usage): auto asks every upstream
    # but Z.ai's and Zhipu's own hosts, which send it unasked
    upstream_stream_usage: Literal["auto", "ask", "never"] = "auto"
    # the single upstream's prices, USD per million input, cached input, output tokens
    upstream_prices: tuple[upstreams.PerMillion, ...] = ()
    # a TOML or JSON file of upstream profiles (bridge/upstreams.py), besides or instead of the above
    upstreams_file: str = ""
    # attempts per request across keys and profiles before the first byte
    upstream_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    # a failing key's first cool-down; it doubles while the key keeps failing
    upstream_cooldown: Seconds = 30.0
    # the lease of a concurrency slot shared by every process; renewed while held
    upstream_lease: Seconds = 30.0
    # how often each process reloads the profiles and keys admins changed
    upstream_refresh: Seconds = 10.0
    # a TOML or JSON file of models: limits and credit coefficients (service/credits.py)
    models_file: str = ""
    # peak hours, HH:MM-HH:MM in peak_zone, when models with a peak multiplier cost more
    peak_hours: str = ""
    peak_zone: str = "Asia/Shanghai"
    # a bearer token for the admin API (at least 24 characters); empty: admin accounts only
    admin_token: str = ""
    # on SIGTERM, open streams get this long to finish before they are cut and settled
    shutdown_timeout: Seconds = 30.0
    # a worker (`--workers N`) still running this long past shutdown_timeout is hung and killed
    # (its own bounded closing takes 29 s at most)
    worker_stop_grace: Seconds = 40.0
    # processes sharing the port (`codeplan run --workers N` overrides it)
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    simulator_host: str = "127.0.0.1"
    simulator_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A pending reservation whose process stops heart-beating is expired after this long.
    reservation_lease: Seconds = 120.0
    # How often a live stream proves it is alive and records how much it delivered.
    heartbeat_interval: Seconds = 15.0
    sweep_interval: Seconds = 30.0
    # After a client leaves mid-stream we keep reading the upstream for its usage, bounded.
    drain_timeout: Seconds = 120.0
    max_drains: Annotated[int, msgspec.Meta(ge=0)] = 256
    # any request still open after this long is settled and closed
    max_request_seconds: Seconds = 3600.0
    # Seconds of upstream silence before a keep-alive is sent to the client.
    keepalive_interval: Seconds = 10.0
    # A stream waits this long for the upstream's status, so a refusal keeps its HTTP status;
    # past it the client gets its headers (some tools give up after 10 s without them).
    header_wait: Seconds = 3.0
    # A request whose key's lookup or admission the database has not answered in this long gets
    # a 503 to retry (an admission's is checked every third of it, within 0.5-10 s); should
    # the ledger admit it later, the entry is voided.
    admission_timeout: Seconds = 30.0
    auth_cache_ttl: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    db_pool_size: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    # prepared statements kept per connection; 0 behind PgBouncer in transaction mode
    db_statement_cache: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 256
    # A database connection whose host has been silent this long is given up (TCP keepalive and
    # TCP_USER_TIMEOUT: a partition, a failover without a reset), and opening one takes at most
    # this long; a slow statement never counts (service/db.py `hear_from_server`).
    db_dead_after: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    # operator-configurable model aliases: "alias=model,alias2=model2"
    model_aliases: tuple[str, ...] = ()
    # what Claude Code's claude-* model ids are served by (Z.ai's own defaults)
    claude_model: str = "glm-4.6"
    claude_haiku_model: str = "glm-4.5-air"
    # extra directory with a tokenizer rank file (see bridge/tokens.py)
    tiktoken_cache_dir: str = ""
    # where users reach this service (links in errors and mails; Stripe sends them back to
    # {public_url}/billing); empty: http://HOST:PORT
    public_url: str = ""
    # proxies trusted to say who the client is (X-Forwarded-For), comma-separated addresses or
    # networks, "*" for any; empty: the socket's peer is the client
    forwarded_allow_ips: str = ""
    # the Responses API over WebSockets (Codex's supports_websockets), and the most sockets a
    # process holds (0: no limit); past it, or when off, Codex is sent to HTTP at the upgrade
    responses_websockets: bool = True
    max_websockets: Annotated[int, msgspec.Meta(ge=0)] = 512
    # ---- the web page (service/web) ----
    # smtp://[user:password@]host[:port] (STARTTLS when offered) or smtps://...; empty: no mail,
    # links go to the log and email verification is not required
    smtp_url: str = ""
    mail_from: str = "Codeplan <codeplan@localhost>"
    # plan given to a new sign-up (e.g. lite); empty: no plan until billing or the operator gives one
    signup_plan: str = ""
    # sign-ups one client address (IPv6: its /64) may make per signup_window; 0: no limit
    signup_limit: Annotated[int, msgspec.Meta(ge=0)] = 10
    signup_window: Seconds = 3600.0
    # an account made by the sign-up whose address nobody confirmed in this many days, holding
    # nothing (no usage, payment, admin rights or audit), is deleted; 0: never. Only with mail on.
    unverified_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 7
    # signs CSRF tokens; empty: one made once and kept in the database (shared by all processes)
    secret_key: str = ""
    # HTTP limits (service/http_limits.py), far above what any coding tool sends: Claude Code's
    # bodies are ~75 KB, long agent histories a few MB; 32 MB is Anthropic's own request limit.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    header_timeout: Seconds = 30.0
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024 * 1024
    body_timeout: Seconds = 300.0
    keepalive_timeout: Seconds = 75.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 8192
    # JSON nesting past this is refused before decoding (bridge/depth.py)
    max_json_depth: Annotated[int, msgspec.Meta(ge=8, le=128)] = 64
    # failed authentications (unknown keys looked up) per client address and window before
    # that address gets 429s without a database lookup (service/throttle.py); 0 turns it off
    auth_failure_limit: Annotated[int, msgspec.Meta(ge=0)] = 20
    auth_failure_window: Seconds = 60.0
    # seconds an unknown key's hash is remembered, so repeating it costs no query
    auth_unknown_ttl: Annotated[float, msgspec.Meta(ge=0)] = 30.0

    # ---- billing (service/billing): Stripe. Without a secret key, billing is off. ----
    stripe_secret_key: str = ""
    # several during a secret's rotation: an event signed with any of them is accepted
    stripe_webhook_secrets: tuple[str, ...] = ()
    # where the `stripe` library sends requests (a local fake in tests)
    stripe_api_base: str = "https://api.stripe.com"
    stripe_currency: str = "usd"
    # plan=monthly[/yearly] prices in cents; a plan not named keeps plans.monthly_price_cents
    plan_prices: tuple[PlanPrice, ...] = ()
    # seconds a past_due subscription keeps its plan while Stripe retries the payment; at most 90
    # days (Stripe's retries end within weeks), and finite: PostgreSQL adds it to now()
    past_due_grace: Annotated[float, msgspec.Meta(ge=0, le=90 * 86400)] = 259200.0
    # tokens=cents blocks sold as top-ups (the ledger counts a block's tokens as credits), and how
    # long a bought block stays valid
    topup_blocks: tuple[TopupBlock, ...] = ()
    # at most a century: a block's expiry is now() + this many days in PostgreSQL, whose dates
    # end in the year 294276 (past that every top-up bought would fail)
    topup_valid_days: Annotated[int, msgspec.Meta(ge=1, le=36_500)] = 365
    # plans whose windows may be exceeded, billed per credit through a Stripe Billing Meter
    overage_plans: tuple[str, ...] = ()
    overage_cents_per_million: Decimal = Decimal("0")
    # overage credits one account may run up per billing period at most
    overage_cap_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    # first delay before a failed billing job (a webhook's effect, a meter event) is retried;
    # it doubles with each failure
    billing_retry_seconds: Seconds = 2.0
    # how often Stripe's list of events is read for any the webhook endpoint missed (a delivery
    # given up after Stripe's three days of retries, an endpoint disabled or misconfigured)
    stripe_catchup_seconds: Seconds = 600.0

    @property
    def simulated(self) -> bool:
        return not self.upstream_url and not self.upstreams_file

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def billing_enabled(self) -> bool:
        return bool(self.stripe_secret_key)

    def bridge_settings(self) -> BridgeSettings:
        return BridgeSettings(
            upstream_timeout=self.upstream_timeout, header_wait=self.header_wait,
            keepalive_interval=self.keepalive_interval, heartbeat_interval=self.heartbeat_interval,
            reservation_lease=self.reservation_lease, drain_timeout=self.drain_timeout,
            max_drains=self.max_drains, max_request_seconds=self.max_request_seconds,
            model_aliases=self.model_aliases, claude_model=self.claude_model,
            claude_haiku_model=self.claude_haiku_model, public_url=self.base_url,
            responses_websockets=self.responses_websockets, max_websockets=self.max_websockets,
            max_json_depth=self.max_json_depth)


class ConfigError(Exception):
    """Raised with a message fit to print as the one line of a failed start-up."""


_FIELDS = Config.__struct_fields__


def _describe(field: str) -> str:
    hints = {
        "port": "an integer from 1 to 65535",
        "simulator_port": "an integer from 0 to 65535 (0 picks a free port)",
        "log_level": "one of debug, info, warning, error",
        "upstream_stream_usage": "one of auto, ask, never",
        "db_pool_size": "an integer from 1 to 200",
        "db_dead_after": "a number of seconds from 1 to 3600",
        "max_drains": "a non-negative integer",
        "upstream_concurrency": "an integer from 0 to 10000",
        "auth_cache_ttl": "a non-negative number of seconds",
        "responses_websockets": "true or false",
        "max_websockets": "a non-negative integer",
        "signup_limit": "a non-negative integer",
        "unverified_days": "a whole number of days from 0 to 36500 (0: never)",
        "upstream_prices": "three numbers from 0 to 100000, input,cached,output USD per million tokens",
        "upstream_attempts": "an integer from 1 to 10",
        "workers": "an integer from 1 to 64",
        "auth_unknown_ttl": "a non-negative number of seconds",
        "max_header_bytes": "an integer of at least 1024 (bytes)",
        "max_body_bytes": "an integer of at least 1024 (bytes)",
        "max_connections": "a positive integer",
        "max_json_depth": "an integer from 8 to 128",
        "auth_failure_limit": "a non-negative integer",
        "past_due_grace": "a number of seconds from 0 to 7776000 (90 days)",
        "topup_valid_days": "a whole number of days from 1 to 36500",
        "overage_cents_per_million": "a non-negative decimal number of cents",
        "overage_cap_tokens": "a non-negative integer",
        "plan_prices": "plan=monthly[/yearly] prices in cents, comma-separated (pro=3000/30000)",
        "topup_blocks": "tokens=cents pairs, comma-separated (20000000=1000)",
    }
    return hints.get(field, "a positive number of seconds" if field in {
        "upstream_timeout", "reservation_lease", "heartbeat_interval", "sweep_interval",
        "drain_timeout", "keepalive_interval", "header_wait", "max_request_seconds", "header_timeout",
        "body_timeout", "keepalive_timeout", "auth_failure_window", "upstream_cooldown",
        "upstream_lease", "upstream_refresh", "shutdown_timeout", "worker_stop_grace", "admission_timeout",
        "billing_retry_seconds", "stripe_catchup_seconds"} else "a valid value")


_LISTS = {"upstream_keys", "model_aliases", "upstream_prices", "stripe_webhook_secrets", "overage_plans"}
_PAIR = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+)\s*(?:/\s*(\d+)\s*)?$")


def _pairs(field: str, value: str) -> list[dict[str, object]]:
    parsed = []
    for part in value.split(","):
        if not part.strip():
            continue
        match = _PAIR.match(part)
        if not match or (field == "topup_blocks" and (match.group(3) or not match.group(1).isdigit())):
            raise ConfigError(f"{env_name(field)}: expected {_describe(field)}, got {part.strip()!r}")
        if field == "plan_prices":
            parsed.append({"plan": match.group(1), "monthly": int(match.group(2)),
                           "yearly": int(match.group(3)) if match.group(3) else None})
        else:
            parsed.append({"tokens": int(match.group(1)), "price": int(match.group(2))})
    return parsed


def _authority_problem(url: str, *, last_at: bool = False) -> str | None:
    """Why a URL with credentials is not one its parsers read as the operator meant, or None.

    asyncpg and urllib split a URL at the first `/`, `?` or `#` after `//`, and asyncpg its
    authority at the first `@`: a password holding any of those ends up read as a port, a path
    or a query, and their errors then quote it. The check is on the form only; the message it
    gives never holds the value. `last_at`: the reader splits the user part from the host at
    the last `@` (urllib, the mailer's), so an `@` in a user name (an address) is read right."""
    if "#" in url:
        return "holds a '#'"
    try:
        parts = urllib.parse.urlsplit(url)
        # asyncpg takes a comma-separated host list, each with its own port; urllib only one
        for host in parts.netloc.rpartition("@")[2].split(","):
            port = host.rpartition("]")[2] if host.startswith("[") else host
            port = port.rpartition(":")[2] if ":" in port else ""
            if port and not port.isdigit():
                return "has a port that is not a number"
        if (parts.netloc.count("@") > 1 and not last_at) or "@" in parts.path:
            return "has an '@' outside user:password@host"
        # an `@` in the query is a parameter's (user=sa@project.iam) unless a password holding
        # `?` cut the authority short: then the netloc is user:first-piece, with no `@`, and the
        # `?` follows it with no path between
        if "@" in parts.query and "@" not in parts.netloc and ":" in parts.netloc and not parts.path:
            return "has an '@' outside user:password@host"
        if parts.query:
            urllib.parse.parse_qs(parts.query, strict_parsing=True)
    except ValueError:
        return "cannot be parsed"
    return None


def _check_url(field: str, url: str) -> None:
    problem = _authority_problem(url, last_at=field == "smtp_url")
    if not problem and field == "smtp_url":
        # service/web/mail.py reads one host and its port (urllib's, which also wants 0-65535)
        try:
            urllib.parse.urlsplit(url).port  # noqa: B018 - raises for a port that is not one
        except ValueError:
            problem = "has a port that is not a number from 0 to 65535"
    if problem:
        raise ConfigError(
            f"{env_name(field)}: the URL {problem}; percent-encode any of # / ? @ : in the "
            "user name or password (# is %23, / is %2F, ? is %3F, @ is %40, : is %3A); value not shown")


def load(environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for name in _FIELDS:
        value = environ.get(env_name(name))
        if value is None or value == "":
            continue
        if name in _LISTS:
            raw[name] = tuple(part.strip() for part in value.split(",") if part.strip())
        elif name in ("plan_prices", "topup_blocks"):
            raw[name] = _pairs(name, value)
        else:
            raw[name] = value.strip().lower() if name in ("log_level", "upstream_stream_usage") else value.strip()
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.port`"; turn that path back into the variable's name.
        message = str(exc)
        field = message.rsplit("$.", 1)[-1].rstrip("`").split("[")[0] if "$." in message else ""
        if field in _FIELDS:
            shown = environ.get(env_name(field), "")
            if field in SECRET_FIELDS:
                shown = "<hidden>"
            raise ConfigError(
                f"{env_name(field)}: expected {_describe(field)}, got {shown!r}"
            ) from None
        raise ConfigError(f"invalid configuration: {message}") from None
    if config.upstream_url:
        if not config.upstream_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{PREFIX}UPSTREAM_URL: expected an http:// or https:// base URL, "
                f"got {upstreams.shown_url(config.upstream_url)}")
        if "@" in config.upstream_url:
            # the profile is named after the URL's host part, shown on /metrics and /readyz
            # (no credential asked) and in logs: credentials there would be everybody's
            raise ConfigError(
                f"{PREFIX}UPSTREAM_URL: expected a base URL without user:password@ (it would show "
                f"wherever the upstream is named); the keys go in {PREFIX}UPSTREAM_KEYS; value not shown")
        if not config.upstream_keys:
            raise ConfigError(
                f"{PREFIX}UPSTREAM_KEYS: required when {PREFIX}UPSTREAM_URL is set "
                "(comma-separated coding-plan keys)")
    if config.public_url and not config.public_url.startswith(("http://", "https://")):
        raise ConfigError(f"{PREFIX}PUBLIC_URL: expected an http:// or https:// URL, got {upstreams.shown_url(config.public_url)}")
    if config.database_url and not config.database_url.startswith(("postgres://", "postgresql://")):
        raise ConfigError(
            f"{PREFIX}DATABASE_URL: expected a postgresql:// URL, got a value of another form")
    if config.database_url:
        _check_url("database_url", config.database_url)
    if config.smtp_url and not config.smtp_url.startswith(("smtp://", "smtps://")):
        raise ConfigError(
            f"{PREFIX}SMTP_URL: expected smtp://host:port or smtps://host:port, got a value of another form")
    if config.smtp_url:
        _check_url("smtp_url", config.smtp_url)
    if config.smtp_url and not config.public_url and config.host in WILDCARD_HOSTS:
        # mailed links (verify, reset) are built from the configured base URL only; on every
        # address there is no one URL to name, and a request's Host header may be anybody's
        raise ConfigError(
            f"{PREFIX}PUBLIC_URL: required when {PREFIX}SMTP_URL is set and {PREFIX}HOST ({config.host or '*'}) "
            "listens on every address: mailed links must name this server")
    if config.upstream_prices and len(config.upstream_prices) != 3:
        raise ConfigError(f"{PREFIX}UPSTREAM_PRICES: expected {_describe('upstream_prices')}, "
                          f"got {environ.get(PREFIX + 'UPSTREAM_PRICES', '')!r}")
    if config.admin_token and len(config.admin_token) < 24:
        raise ConfigError(f"{PREFIX}ADMIN_TOKEN: expected at least 24 characters (a random token)")
    _check_peak(config)
    upstream_profiles(config)  # a bad file stops start-up here, with one line
    model_catalog(config)
    _check_billing(config)
    for alias in config.model_aliases:
        if "=" not in alias:
            raise ConfigError(
                f"{PREFIX}MODEL_ALIASES: expected alias=model pairs separated by commas, got {alias!r}")
    return config


# names zoneinfo finds in a host's zone files that are not IANA zones PostgreSQL knows
_HOST_ZONES = frozenset({"localtime", "posixrules"})


def _check_peak(config: Config) -> None:
    import zoneinfo

    if config.peak_hours:
        window = peak_window(config.peak_hours)
        if window is None:
            raise ConfigError(f"{PREFIX}PEAK_HOURS: expected HH:MM-HH:MM, got {config.peak_hours!r}")
        if window[0] == window[1] and window[0] != dt.time(0):
            # credit_peak_now() (migrations/0030) reads start >= end as a span over midnight:
            # equal ends are peak all day, which nobody writing 14:00-14:00 means; all day is
            # spelt 00:00-00:00 (as it always was)
            raise ConfigError(f"{PREFIX}PEAK_HOURS: start and end are equal ({config.peak_hours!r}); "
                              "write 00:00-00:00 for peak hours all day, or leave it empty for none")
        # PostgreSQL applies the zone (credit_peak_now, migrations/0030) with its own list of
        # IANA names: a name only this host's files give (localtime, posixrules, posix/...) would
        # pass here and make every chat request fail. The IANA set zoneinfo lists is the one both
        # know; `localtime` is in it on some hosts (a link in /usr/share/zoneinfo), never in PG's.
        try:
            zoneinfo.ZoneInfo(config.peak_zone)
            known = config.peak_zone in zoneinfo.available_timezones() and config.peak_zone not in _HOST_ZONES
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            known = False
        if not known:
            raise ConfigError(f"{PREFIX}PEAK_ZONE: expected an IANA time zone name such as Asia/Shanghai, "
                              f"got {config.peak_zone!r}")


def peak_window(text: str) -> tuple[dt.time, dt.time] | None:
    start, _, end = text.partition("-")
    try:
        return dt.time.fromisoformat(start.strip()), dt.time.fromisoformat(end.strip())
    except ValueError:
        return None


def _read_structured(variable: str, path: str, kind: type):
    """A TOML or JSON file (by its extension) decoded into `kind`; one clear line on error."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{PREFIX}{variable}: cannot read {path!r}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            return msgspec.json.decode(data, type=kind)
        return msgspec.toml.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{PREFIX}{variable}: {path}: {exc}") from None


def upstream_profiles(config: Config, simulator_url: str = "") -> list[ProfileConfig]:
    """Every configured upstream profile, presets applied and keys read: the single
    CODEPLAN_UPSTREAM_URL (one profile named after its host), the profiles file, or the
    built-in simulator when neither is set."""
    profiles: list[ProfileConfig] = []
    if config.upstream_url:
        profiles.append(upstreams.legacy_profile(
            config.upstream_url, config.upstream_keys, concurrency=config.upstream_concurrency,
            stream_usage=config.upstream_stream_usage, prices=config.upstream_prices))
    if config.upstreams_file:
        profiles += _read_structured("UPSTREAMS_FILE", config.upstreams_file, upstreams.UpstreamsFile).upstreams
    if not profiles and simulator_url:
        profiles.append(upstreams.legacy_profile(
            simulator_url, ("simulator",), concurrency=config.upstream_concurrency,
            stream_usage=config.upstream_stream_usage, name="simulator", preset="simulator"))
    resolved = []
    for profile in profiles:
        try:
            resolved.append(upstreams.resolve(profile))
        except ValueError as exc:
            raise ConfigError(f"{PREFIX}UPSTREAMS_FILE: {exc}") from None
    names = [p.name for p in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"{PREFIX}UPSTREAMS_FILE: two upstream profiles share a name ({', '.join(names)})")
    return resolved


class ModelCatalog(msgspec.Struct, frozen=True):
    models: list[ModelConfig]
    # the ids CODEPLAN_MODELS_FILE names: their coefficients are the configuration's word and
    # overwrite what `model_credits` holds, even when they equal the built-in defaults
    from_file: frozenset[str]


def read_model_catalog(config: Config) -> ModelCatalog:
    """The built-in models plus (and overridden by) those of CODEPLAN_MODELS_FILE, and which
    ids that file names."""
    models = {m.id: m for m in DEFAULT_MODELS}
    named: set[str] = set()
    if config.models_file:
        for model in _read_structured("MODELS_FILE", config.models_file, ModelsFile).models:
            models[model.id.lower()] = msgspec.structs.replace(model, id=model.id.lower())
            named.add(model.id.lower())
    return ModelCatalog(models=list(models.values()), from_file=frozenset(named))


def model_catalog(config: Config) -> list[ModelConfig]:
    """The built-in models plus (and overridden by) those of CODEPLAN_MODELS_FILE."""
    return read_model_catalog(config).models


def _check_billing(config: Config) -> None:
    # secrets are never echoed, not even in part
    if config.stripe_secret_key and not config.stripe_secret_key.startswith(("sk_", "rk_")):
        raise ConfigError("STRIPE_SECRET_KEY: expected a Stripe secret or restricted key (sk_... or rk_...), "
                          "got a value of another form")
    for secret in config.stripe_webhook_secrets:
        if not secret.startswith("whsec_"):
            raise ConfigError("STRIPE_WEBHOOK_SECRET: expected webhook signing secrets (whsec_...), "
                              "comma-separated, got a value of another form")
    for name in ("stripe_api_base",):
        url = getattr(config, name)
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{env_name(name)}: expected an http:// or https:// URL, got {upstreams.shown_url(url)}")
    if not re.fullmatch(r"[a-z]{3}", config.stripe_currency):
        raise ConfigError(f"{env_name('stripe_currency')}: expected a three-letter ISO currency code in "
                          f"lower case (usd), got {config.stripe_currency!r}")
    if not config.overage_cents_per_million.is_finite() or config.overage_cents_per_million < 0:
        raise ConfigError(f"{env_name('overage_cents_per_million')}: expected {_describe('overage_cents_per_million')}, "
                          f"got {str(config.overage_cents_per_million)!r}")
    plans = [p.plan for p in config.plan_prices]
    if len(set(plans)) != len(plans):
        raise ConfigError(f"{env_name('plan_prices')}: a plan is priced twice")
    tokens = [b.tokens for b in config.topup_blocks]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"{env_name('topup_blocks')}: two blocks have the same number of tokens")
