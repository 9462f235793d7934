"""Prometheus metrics: `GET /metrics`, free.

The bridge reports through `bridge.metrics.BridgeMetrics`; this module implements it with
prometheus_client (its exposition format, histograms, and the multi-process mode that
`codeplan run --workers N` needs: each worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR and any worker's scrape sums them all). What lives in the database
(pending reservations, the oldest one's age) and in the pool is read at scrape time.

Cost on the request path: the label children are looked up once and kept, so a request pays a
few dictionary lookups and counter increments (bench figures in README, "Metrics").
"""
from __future__ import annotations

import asyncio
import os
from typing import Callable

import asyncpg
from litestar import Request, Response, get
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client.core import GaugeMetricFamily

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)

REQUESTS = Counter("codeplan_requests", "Requests by surface, model and status",
                   ["surface", "model", "status"])
OVERHEAD = Histogram("codeplan_bridge_overhead_seconds",
                     "Time the bridge spent on a request, not waiting for the upstream",
                     ["surface"], buckets=_OVERHEAD_BUCKETS)
TTFT = Histogram("codeplan_time_to_first_token_seconds", "Time to the first answer bytes of a stream",
                 ["surface", "model"], buckets=_TTFT_BUCKETS)
TOKENS = Counter("codeplan_tokens", "Tokens settled, by model and kind (prompt, cached, completion)",
                 ["model", "kind"])
CREDITS = Counter("codeplan_credits", "Credits billed, by model", ["model"])
REFUSED = Counter("codeplan_admissions_refused", "Admissions refused because a window was full",
                  ["window"])
UPSTREAM_ERRORS = Counter("codeplan_upstream_errors", "Failed upstream attempts, by profile and code",
                          ["profile", "code"])
OPEN_STREAMS = Gauge("codeplan_open_streams", "Streams open to clients", multiprocess_mode="livesum")
SETTLEMENT_LAG = Histogram("codeplan_settlement_lag_seconds",
                           "From a request's end to its settlement written", buckets=_LAG_BUCKETS)
POOL = Gauge("codeplan_db_pool_connections", "Database pool connections by state",
             ["state"], multiprocess_mode="livesum")


class PrometheusMetrics:
    """`bridge.metrics.BridgeMetrics`, with label children kept after their first use."""

    def __init__(self) -> None:
        self._requests: dict[tuple, Counter] = {}
        self._overhead: dict[str, Histogram] = {}
        self._ttft: dict[tuple, Histogram] = {}
        self._tokens: dict[str, tuple] = {}
        self._refused: dict[str, Counter] = {}
        self._errors: dict[tuple, Counter] = {}
        self._lag = SETTLEMENT_LAG

    def request(self, surface: str, model: str, status: int, overhead_s: float,
                ttft_s: float | None) -> None:
        key = (surface, model, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = REQUESTS.labels(surface, model or "none", str(status))
        counter.inc()
        histogram = self._overhead.get(surface)
        if histogram is None:
            histogram = self._overhead[surface] = OVERHEAD.labels(surface)
        histogram.observe(overhead_s)
        if ttft_s is not None:
            key2 = (surface, model)
            ttft = self._ttft.get(key2)
            if ttft is None:
                ttft = self._ttft[key2] = TTFT.labels(surface, model)
            ttft.observe(ttft_s)

    def usage(self, model: str, prompt: int, cached: int, completion: int, credits: int) -> None:
        children = self._tokens.get(model)
        if children is None:
            children = self._tokens[model] = (
                TOKENS.labels(model, "prompt"), TOKENS.labels(model, "cached"),
                TOKENS.labels(model, "completion"), CREDITS.labels(model))
        children[0].inc(prompt)
        children[1].inc(cached)
        children[2].inc(completion)
        children[3].inc(credits)

    def settled(self, lag_s: float) -> None:
        self._lag.observe(lag_s)

    def refused(self, window: str) -> None:
        counter = self._refused.get(window)
        if counter is None:
            counter = self._refused[window] = REFUSED.labels(window)
        counter.inc()

    def upstream_error(self, profile: str, code: str) -> None:
        key = (profile, code)
        counter = self._errors.get(key)
        if counter is None:
            counter = self._errors[key] = UPSTREAM_ERRORS.labels(profile, code)
        counter.inc()

    def stream(self, delta: int) -> None:
        OPEN_STREAMS.inc(delta)


class _Snapshot:
    """Values read at scrape time, offered to prometheus_client as a collector."""

    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self._families = families

    def collect(self):
        return self._families


_PENDING_SQL = """
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest
  FROM usage_ledger WHERE state = 'pending'
"""


async def _database_families(pool: asyncpg.Pool, health: Callable[[], list]) -> list[GaugeMetricFamily]:
    pending = GaugeMetricFamily("codeplan_pending_reservations", "Ledger entries still pending")
    oldest = GaugeMetricFamily("codeplan_oldest_pending_seconds",
                               "Age of the oldest pending entry (settlement lag of what is still open)")
    try:
        async with asyncio.timeout(2):
            row = await pool.fetchrow(_PENDING_SQL)
        pending.add_metric([], row["pending"])
        oldest.add_metric([], float(row["oldest"]))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        pass  # the database's absence shows in /readyz; the other metrics still answer
    keys = GaugeMetricFamily("codeplan_upstream_key_healthy",
                             "1 when an upstream key is enabled and not cooling down (this process's view)",
                             labels=["profile", "key"])
    in_flight = GaugeMetricFamily("codeplan_upstream_key_in_flight",
                                  "Requests on an upstream key now (this process)", labels=["profile", "key"])
    for profile in health():
        for key in profile.keys:
            keys.add_metric([profile.name, key.fingerprint], 1.0 if key.healthy else 0.0)
            in_flight.add_metric([profile.name, key.fingerprint], key.in_flight)
    return [pending, oldest, keys, in_flight]


def update_pool(pool: asyncpg.Pool) -> None:
    size, idle = pool.get_size(), pool.get_idle_size()
    POOL.labels("used").set(size - idle)
    POOL.labels("idle").set(idle)
    POOL.labels("max").set(pool.get_max_size())


async def pool_watcher(pool: asyncpg.Pool, interval: float = 2.0) -> None:
    """Pool use, refreshed every few seconds: in multi-process mode every worker's counts are
    summed at scrape time, so each keeps its own up to date."""
    while True:
        update_pool(pool)
        await asyncio.sleep(interval)


@get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = request.app.state
    update_pool(state.pool)
    registry = REGISTRY
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    body = generate_latest(registry)
    extra = CollectorRegistry()
    extra.register(_Snapshot(await _database_families(state.pool, state.router.health)))
    body += generate_latest(extra)
    return Response(body, media_type=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"content-type": CONTENT_TYPE_LATEST})

